"""Does the fast (fused-kernel) path train like the reference ops? Run the first N steps both ways and
compare the loss curves step by step.

    python benchmarks/track_reference.py configs/hybrid-500m.yaml train.micro_batch_size=4 train.seq_len=2048 \\
        --steps 200 --out-dir runs/track --tolerance 0.02

Runs ``train.py CONFIG [overrides] kernels=auto`` into ``OUT_DIR/fast`` and the same with ``kernels=reference``
into ``OUT_DIR/reference``, one subprocess each, one after the other or, with ``--parallel``, at the same
time (logs: ``OUT_DIR/fast.log``, ``OUT_DIR/reference.log``). Both use the config's seed and data, so the
only difference is the kernels, and that the reference runs its steps as written (``train.cuda_graph=false``)
where the fast path replays CUDA graphs when it can. The two run directories are deleted first: a stale
``metrics.jsonl`` or checkpoint must not mix into the curves.

The script always sets ``out_dir``, ``train.max_steps=N``, ``kernels`` and ``train.log_every=1`` (one
``metrics.jsonl`` row per step: the per-step loss, averaged over ``grad_accum``); overriding those is an error.
Before the user's overrides (which win) it sets defaults that keep evaluation and checkpoint noise out:
``train.eval_every=0`` and ``train.save_every=0`` (0 = only at the end; the trainer always saves, evaluates
and exports once at the end), ``train.eval_batches=1`` and ``train.keep_last=1`` (make that end cheap) and
``train.sample_tokens=0`` (no generated sample).

Verdict. Per step: absolute and relative difference ``|fast - ref| / |ref|``. "Tracks" means both

- the mean loss over the last 10% of steps agrees within ``--tolerance`` (relative, default 0.02), and
- no single step differs by more than ``--step-factor`` x tolerance (default 5, i.e. 10%),

and both runs have a finite loss at every step 1..N (a missing, skipped or NaN step fails). Why two limits:
bf16 rounding differs between fused and reference kernels, and through the optimizer that makes individual
steps wander (noisy early steps most), so a per-step limit at the tolerance would flag noise; what must agree
is the trend, read over a window at the end, while the loose per-step limit still catches a real divergence
that later recovers. On CPU there are no fused kernels: both paths run PyTorch ops (``auto`` takes SDPA
attention and the unfused composites where ``reference`` takes its own), so the curves agree to fp32 rounding.

Prints a few sampled steps and a PASS/FAIL line, appends one JSON row to ``--results`` (default
``benchmarks/results/track_reference.jsonl``) and exits 1 on FAIL (2 on bad arguments). The row also holds
both loss curves and each run's kernel table (its ``kernels:`` start-up line): proof that the fast path really
ran the fused kernels (when both tables are the same, the script says so).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from hybridlm.bench import git_commit
from hybridlm.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parent.parent
TRAIN_SCRIPT = ROOT / "train.py"
DEFAULT_RESULTS = ROOT / "benchmarks" / "results" / "track_reference.jsonl"
PATHS = {"fast": "auto", "reference": "reference"}  # run name -> kernels=
DEFAULT_OVERRIDES = [
    "train.eval_every=0",
    "train.save_every=0",
    "train.eval_batches=1",
    "train.keep_last=1",
    "train.sample_tokens=0",
]
FORCED_KEYS = ("out_dir", "train.max_steps", "train.log_every", "kernels")  # set by this script per run
LAST_FRACTION = 0.1  # the window whose mean losses must agree within the tolerance
SAMPLED_STEPS = 8  # rows of the printed table (plus the worst step)


def read_losses(run_dir: Path, steps: int) -> list[float | None]:
    """The training loss of steps 1..``steps`` from ``run_dir/metrics.jsonl`` (written with log_every=1):
    None where a step has no row, NaN where its update was skipped (the trainer logs ``loss: null``)."""
    losses: list[float | None] = [None] * steps
    for row in read_metrics(run_dir):
        step = row.get("step")
        if "loss" in row and isinstance(step, int) and 1 <= step <= steps:  # val rows have val_loss only
            losses[step - 1] = math.nan if row["loss"] is None else float(row["loss"])
    return losses


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def _relative(a: float, b: float) -> float:
    """|a - b| / |b|; a zero reference is only matched by zero."""
    diff = abs(a - b)
    return diff / abs(b) if b else (0.0 if diff == 0 else math.inf)


def compare_curves(
    fast: list[float | None],
    reference: list[float | None],
    tolerance: float = 0.02,
    step_factor: float = 5.0,
    last_fraction: float = LAST_FRACTION,
) -> dict[str, Any]:
    """Compare two per-step loss curves (index i = step i+1; None = missing step). Passes when every step is
    present and finite on both sides, no step's relative difference exceeds ``step_factor * tolerance``, and the
    mean losses over the last ``last_fraction`` of steps differ by at most ``tolerance`` (relative). The
    statistics are over the steps finite on both sides, so a failing comparison still says how far apart
    the curves were; ``reasons`` lists every failed condition."""
    n = max(len(fast), len(reference))
    curves = {
        "fast": list(fast) + [None] * (n - len(fast)),
        "reference": list(reference) + [None] * (n - len(reference)),
    }
    reasons = [] if n else ["no steps to compare"]
    missing, nonfinite = {}, {}
    for name, curve in curves.items():
        missing[name] = [i + 1 for i, x in enumerate(curve) if x is None]
        nonfinite[name] = [i + 1 for i, x in enumerate(curve) if x is not None and not math.isfinite(x)]
        if missing[name]:
            reasons.append(f"{name}: {len(missing[name])} step(s) missing (first: step {missing[name][0]})")
        if nonfinite[name]:
            reasons.append(f"{name}: {len(nonfinite[name])} non-finite loss(es) (first: step {nonfinite[name][0]})")

    f, r = curves["fast"], curves["reference"]
    both = [i for i in range(n) if _finite(f[i]) and _finite(r[i])]
    common = set(both)
    abs_diff: list[float | None] = [abs(f[i] - r[i]) if i in common else None for i in range(n)]
    rel_diff: list[float | None] = [_relative(f[i], r[i]) if i in common else None for i in range(n)]
    worst = max(both, key=lambda i: rel_diff[i], default=None)
    max_rel = rel_diff[worst] if worst is not None else None
    mean_rel = sum(rel_diff[i] for i in both) / len(both) if both else None
    step_limit = step_factor * tolerance
    if max_rel is not None and max_rel > step_limit:
        reasons.append(f"step {worst + 1}: relative difference {max_rel:.3g} > {step_factor:g} x tolerance")

    window = max(1, math.ceil(last_fraction * n)) if n else 0
    in_window = [i for i in both if i >= n - window]
    fast_mean = sum(f[i] for i in in_window) / len(in_window) if in_window else None
    ref_mean = sum(r[i] for i in in_window) / len(in_window) if in_window else None
    window_rel = _relative(fast_mean, ref_mean) if in_window else None
    if window_rel is not None and window_rel > tolerance:
        reasons.append(f"last {window} steps: mean loss relative difference {window_rel:.3g} > tolerance")

    return {
        "steps": n,
        "tolerance": tolerance,
        "step_factor": step_factor,
        "step_limit": step_limit,
        "abs_diff": abs_diff,
        "rel_diff": rel_diff,
        "max_rel_diff": max_rel,
        "max_rel_diff_step": worst + 1 if worst is not None else None,
        "mean_rel_diff": mean_rel,
        "window_steps": window,
        "fast_window_mean": fast_mean,
        "reference_window_mean": ref_mean,
        "window_rel_diff": window_rel,
        "missing": missing,
        "nonfinite": nonfinite,
        "passed": not reasons,
        "reasons": reasons,
    }


def _fmt(x: float | None, spec: str) -> str:
    return "-".rjust(len(format(0.0, spec))) if x is None else format(x, spec)


def format_report(fast: list[float | None], reference: list[float | None], result: dict[str, Any]) -> str:
    """A table of a few evenly spaced steps (and the worst one), then the summary line with PASS/FAIL."""
    n = result["steps"]
    picks = {round(1 + k * (n - 1) / (SAMPLED_STEPS - 1)) for k in range(SAMPLED_STEPS)} if n > 1 else {1}
    if result["max_rel_diff_step"] is not None:
        picks.add(result["max_rel_diff_step"])
    lines = [f"{'step':>6}  {'fast loss':>10}  {'ref loss':>10}  {'rel diff':>9}"]
    for step in sorted(p for p in picks if 1 <= p <= n):
        i = step - 1
        f = fast[i] if i < len(fast) else None
        r = reference[i] if i < len(reference) else None
        lines.append(f"{step:>6}  {_fmt(f, '10.4f')}  {_fmt(r, '10.4f')}  {_fmt(result['rel_diff'][i], '9.2e')}")
    lines.append(
        f"max rel diff {_fmt(result['max_rel_diff'], '.2e')} at step {result['max_rel_diff_step']} "
        f"(limit {result['step_limit']:.2e}), mean {_fmt(result['mean_rel_diff'], '.2e')}; "
        f"last {result['window_steps']} steps mean loss {_fmt(result['fast_window_mean'], '.4f')} fast vs "
        f"{_fmt(result['reference_window_mean'], '.4f')} reference, rel diff {_fmt(result['window_rel_diff'], '.2e')} "
        f"(limit {result['tolerance']:.2e}): {'PASS' if result['passed'] else 'FAIL'}"
    )
    lines.extend(f"  - {reason}" for reason in result["reasons"])
    return "\n".join(lines)


def check_overrides(overrides: list[str]) -> None:
    for item in overrides:
        key, sep, _ = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} must look like key=value")
        if key in FORCED_KEYS:
            raise ValueError(f"{key} is set by this script (see --steps, --out-dir); drop {item!r}")


def train_command(config: str, overrides: list[str], run_dir: Path, steps: int, kernels: str) -> list[str]:
    """``python train.py CONFIG defaults overrides forced``: the user's overrides win over the defaults."""
    forced = [f"out_dir={run_dir}", f"train.max_steps={steps}", "train.log_every=1", f"kernels={kernels}"]
    if kernels == "reference":  # the ground truth runs as written: no CUDA-graphed step
        forced.append("train.cuda_graph=false")
    return [sys.executable, str(TRAIN_SCRIPT), config, *DEFAULT_OVERRIDES, *overrides, *forced]


def run_training(command: list[str], log: Path) -> dict[str, Any]:
    """Run one training subprocess with its output in ``log``; its exit code, seconds and kernel table."""
    start = time.perf_counter()
    with log.open("w") as f:
        rc = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - start
    text = log.read_text(errors="replace")
    kernels = next((line[len("kernels: ") :] for line in text.splitlines() if line.startswith("kernels: ")), None)
    if rc != 0:
        print(f"exit code {rc}; last lines of {log}:\n" + "\n".join(text.splitlines()[-20:]), file=sys.stderr)
    return {"returncode": rc, "seconds": round(seconds, 1), "kernels": kernels}


def environment() -> dict[str, Any]:
    """Called after the runs: the parent process never holds a CUDA context while they train."""
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    return {"device": device, "torch": torch.__version__, "git_commit": git_commit()}


def json_safe(x: Any) -> Any:
    """NaN and inf as null: the row stays standard JSON (the ``nonfinite`` field says which steps)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x


def append_row(row: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(json_safe(row), allow_nan=False) + "\n")


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", help="run config YAML")
    ap.add_argument("overrides", nargs="*", help="key=value overrides for both runs")
    ap.add_argument("--steps", type=int, default=200, help="training steps per run (default 200)")
    ap.add_argument("--out-dir", type=Path, default=Path("runs/track"), help="runs go to OUT_DIR/{fast,reference}")
    ap.add_argument("--tolerance", type=float, default=0.02, help="last-window mean loss, relative (default 0.02)")
    ap.add_argument("--step-factor", type=float, default=5.0, help="per-step limit = this x tolerance (default 5)")
    ap.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="append the JSON row here")
    ap.add_argument("--parallel", action="store_true", help="run both trainings at once (one GPU holds both)")
    args = ap.parse_intermixed_args(argv)
    if args.steps < 1 or args.tolerance <= 0 or args.step_factor < 1:
        ap.error("need --steps >= 1, --tolerance > 0 and --step-factor >= 1")
    try:
        check_overrides(args.overrides)
    except ValueError as e:
        ap.error(str(e))
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    commands = {}
    for name, kernels in PATHS.items():
        run_dir = args.out_dir / name
        shutil.rmtree(run_dir, ignore_errors=True)
        print(f"{name}: kernels={kernels}, {args.steps} steps -> {run_dir} (log {args.out_dir / name}.log)", flush=True)
        commands[name] = train_command(args.config, args.overrides, run_dir, args.steps, kernels)
    # each run is its own one-process group on a free port, so the two can share a machine (and a GPU)
    with ThreadPoolExecutor(len(PATHS) if args.parallel else 1) as pool:
        futures = {name: pool.submit(run_training, cmd, args.out_dir / f"{name}.log") for name, cmd in commands.items()}
        runs = {name: future.result() for name, future in futures.items()}
    curves = {}
    for name, run in runs.items():
        curves[name] = read_losses(args.out_dir / name, args.steps)
        print(f"{name}: {run['seconds']} s, exit code {run['returncode']}", flush=True)

    result = compare_curves(curves["fast"], curves["reference"], args.tolerance, args.step_factor)
    for name, run in runs.items():
        if run["returncode"] != 0:
            result["reasons"].append(f"{name} run exited with code {run['returncode']} (log {args.out_dir}/{name}.log)")
    result["passed"] = not result["reasons"]
    if runs["fast"]["kernels"] is not None and runs["fast"]["kernels"] == runs["reference"]["kernels"]:
        print("note: both runs used the same ops (no fused kernel here), so this compares the reference to itself")
    print(format_report(curves["fast"], curves["reference"], result))

    summary = {k: v for k, v in result.items() if k not in ("abs_diff", "rel_diff")}
    row = {
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": args.config,
        "overrides": args.overrides,
        **summary,
        **environment(),
        "runs": runs,
        "out_dir": str(args.out_dir),
        "loss": curves,  # per step, None = missing
    }
    append_row(row, args.results)
    print(f"row appended to {args.results}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
