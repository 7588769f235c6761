"""benchmarks/track_reference.py: the loss-curve comparison, the metrics reading, and the two-run plumbing."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def track(load_benchmark):
    return load_benchmark("track_reference")


def decaying(n: int, start: float = 8.0, end: float = 3.0) -> list[float]:
    """A loss curve falling from ``start`` towards ``end`` over ``n`` steps."""
    return [end + (start - end) * math.exp(-4 * i / n) for i in range(n)]


# ---------------------------------------------------------------------------------------------
# compare_curves


def test_identical_curves_pass_with_zero_differences(track):
    ref = decaying(100)
    result = track.compare_curves(list(ref), ref, tolerance=0.02, step_factor=5.0)
    assert result["passed"] and result["reasons"] == []
    assert result["max_rel_diff"] == 0.0 and result["mean_rel_diff"] == 0.0 and result["window_rel_diff"] == 0.0
    assert result["window_steps"] == 10
    assert result["fast_window_mean"] == pytest.approx(sum(ref[90:]) / 10)


def test_small_wobble_around_the_reference_passes(track):
    ref = decaying(200)
    fast = [x * (1 + 0.04 * (-1) ** i) for i, x in enumerate(ref)]  # 4% per step, alternating: no trend
    result = track.compare_curves(fast, ref, tolerance=0.02, step_factor=5.0)
    assert result["passed"], result["reasons"]
    assert result["max_rel_diff"] == pytest.approx(0.04)
    assert result["window_rel_diff"] < 0.02


def test_drifting_trend_fails_on_the_last_window_even_when_each_step_is_within_the_step_limit(track):
    ref = decaying(200)
    fast = [x * (1 + 0.05 * i / 199) for i, x in enumerate(ref)]  # drifts to +5%, never above 5 x 2%
    result = track.compare_curves(fast, ref, tolerance=0.02, step_factor=5.0)
    assert not result["passed"]
    assert result["max_rel_diff"] < result["step_limit"]
    assert result["window_rel_diff"] > 0.02
    assert any("last 20 steps" in reason for reason in result["reasons"])


def test_a_single_spike_above_step_factor_times_tolerance_fails(track):
    ref = decaying(200)
    fast = list(ref)
    fast[50] = ref[50] * 1.11  # above 5 x 2%; the last window is untouched
    result = track.compare_curves(fast, ref, tolerance=0.02, step_factor=5.0)
    assert not result["passed"]
    assert result["window_rel_diff"] == 0.0
    assert result["max_rel_diff_step"] == 51
    assert any("step 51" in reason for reason in result["reasons"])
    fast[50] = ref[50] * 1.09  # below the step limit: passes
    assert track.compare_curves(fast, ref, tolerance=0.02, step_factor=5.0)["passed"]


@pytest.mark.parametrize("side", ["fast", "reference"])
def test_a_nan_step_fails(track, side):
    curves = {"fast": decaying(50), "reference": decaying(50)}
    curves[side][20] = math.nan
    result = track.compare_curves(curves["fast"], curves["reference"])
    assert not result["passed"]
    assert result["nonfinite"][side] == [21]
    assert result["rel_diff"][20] is None and result["max_rel_diff"] == 0.0  # the other steps still compared


@pytest.mark.parametrize("side", ["fast", "reference"])
def test_missing_steps_fail(track, side):
    curves = {"fast": decaying(50), "reference": decaying(50)}
    curves[side][10] = None
    curves[side] = curves[side][:45]  # a run that stopped early
    result = track.compare_curves(curves["fast"], curves["reference"])
    assert not result["passed"]
    assert result["missing"][side] == [11, 46, 47, 48, 49, 50]
    assert result["steps"] == 50


def test_no_steps_fail(track):
    assert not track.compare_curves([], [])["passed"]


# ---------------------------------------------------------------------------------------------
# read_losses


def test_read_losses_takes_train_rows_by_step(track, tmp_path):
    rows = [
        {"step": 1, "loss": 5.0, "lr": 1e-3},
        {"step": 2, "loss": None, "lr": 1e-3},  # a skipped (non-finite) step
        {"step": 4, "loss": 4.0, "lr": 1e-3},
        {"step": 4, "val_loss": 9.0, "val_ppl": 8103.0},  # validation rows carry no training loss
        {"step": 5, "loss": 3.0, "lr": 1e-3},  # past the steps asked for
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    losses = track.read_losses(tmp_path, 4)
    assert losses[0] == 5.0 and math.isnan(losses[1]) and losses[2] is None and losses[3] == 4.0
    assert track.read_losses(tmp_path / "absent", 2) == [None, None]


# ---------------------------------------------------------------------------------------------
# the script: arguments, subprocesses, row, exit code

FAKE_TRAIN = """
import json, sys
from pathlib import Path
args = dict(a.split("=", 1) for a in sys.argv[2:])
out, steps = Path(args["out_dir"]), int(args["train.max_steps"])
out.mkdir(parents=True)
assert args["train.log_every"] == "1" and args["train.eval_every"] == "0"
assert (args.get("train.cuda_graph") == "false") == (args["kernels"] == "reference")  # the reference runs eagerly
print("kernels: attention=" + args["kernels"])
stop = int(args.get("stop_fast_at", steps)) if args["kernels"] == "auto" else steps
with open(out / "metrics.jsonl", "w") as f:
    for step in range(1, stop + 1):
        f.write(json.dumps({"step": step, "loss": 8.0 - step * 0.1}) + "\\n")
sys.exit(0 if stop == steps else 3)
"""


@pytest.fixture
def fake_trainer(track, tmp_path, monkeypatch):
    """A stand-in train.py: writes a linear loss curve; ``stop_fast_at=k`` makes the fast run die after step k."""
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE_TRAIN)
    monkeypatch.setattr(track, "TRAIN_SCRIPT", script)
    return script


@pytest.mark.parametrize("parallel", [False, True], ids=["one_after_the_other", "parallel"])
def test_script_compares_two_runs_and_appends_a_passing_row(track, fake_trainer, tmp_path, capsys, parallel):
    results = tmp_path / "results.jsonl"
    stale = tmp_path / "out" / "fast" / "metrics.jsonl"
    stale.parent.mkdir(parents=True)
    stale.write_text(json.dumps({"step": 1, "loss": 99.0}) + "\n")  # a previous run's rows must not count
    argv = ["cfg.yaml", "x.y=1", "--steps", "6", "--out-dir", str(tmp_path / "out"), "--results", str(results)]
    assert track.main(argv + ["--parallel"] * parallel) == 0
    assert "PASS" in capsys.readouterr().out
    [row] = [json.loads(line) for line in results.read_text().splitlines()]
    assert row["passed"] and row["steps"] == 6 and row["config"] == "cfg.yaml" and row["overrides"] == ["x.y=1"]
    assert row["loss"]["fast"] == row["loss"]["reference"] == pytest.approx([8.0 - s * 0.1 for s in range(1, 7)])
    assert row["runs"]["fast"]["kernels"] == "attention=auto"
    assert row["runs"]["reference"]["kernels"] == "attention=reference"
    assert row["device"] and row["torch"]


def test_a_run_that_dies_fails_the_check_with_exit_code_1(track, fake_trainer, tmp_path):
    results = tmp_path / "results.jsonl"
    argv = ["cfg.yaml", "stop_fast_at=4", "--steps", "6", "--out-dir", str(tmp_path / "out"), "--results", str(results)]
    assert track.main(argv) == 1
    row = json.loads(results.read_text())
    assert not row["passed"]
    assert row["missing"]["fast"] == [5, 6] and row["loss"]["fast"][4:] == [None, None]
    assert any("exited with code 3" in reason for reason in row["reasons"])


@pytest.mark.parametrize("override", ["kernels=reference", "train.max_steps=5", "out_dir=x", "train.log_every=10"])
def test_overrides_of_what_the_script_sets_are_refused(track, override):
    with pytest.raises(SystemExit) as e:
        track.parse_args(["cfg.yaml", override])
    assert e.value.code == 2


@pytest.mark.slow
def test_tiny_config_tracks_itself_on_cpu(tmp_path):
    """The real trainer, twice: on CPU neither path has a fused kernel, so the curves agree to fp32 rounding
    (``auto`` uses SDPA attention, ``reference`` its own)."""
    results = tmp_path / "results.jsonl"
    tiny = [
        "model.d_model=64",
        "model.mamba.head_dim=16",
        "model.mamba.d_state=16",
        "model.mamba.chunk_size=32",
        "model.attention.n_heads=4",
        "train.seq_len=64",
        "train.micro_batch_size=4",
        "train.warmup_steps=2",
        f"data.prepared_dir={tmp_path / 'prepared'}",
    ]
    command = [sys.executable, str(ROOT / "benchmarks" / "track_reference.py"), "configs/tiny.yaml", *tiny]
    command += ["--steps", "4", "--out-dir", str(tmp_path / "out"), "--results", str(results)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    [row] = [json.loads(line) for line in results.read_text().splitlines()]
    assert row["passed"] and row["steps"] == 4 and row["device"] == "CPU"
    assert all(run["returncode"] == 0 for run in row["runs"].values())
    fast, ref = row["loss"]["fast"], row["loss"]["reference"]
    assert len(fast) == len(ref) == 4 and all(math.isfinite(x) for x in fast + ref)
    assert fast == pytest.approx(ref, rel=1e-5)
    assert fast[-1] < fast[0]  # it trained: the comparison is of a moving curve
