"""The shipped recall experiment: configs/recall/*.yaml and benchmarks/recall.py."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image
import pytest

from hybridlm.config import load_run_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def experiment(load_benchmark):
    return load_benchmark("recall")


def test_configs_are_trainer_run_configs_on_the_mqar_task(experiment):
    runs = {name: load_run_config(ROOT / "configs" / "recall" / f"{name}.yaml") for name in experiment.NAMES}
    assert all([s.task for s in run.data.sources] == ["mqar"] for run in runs.values())
    mixers = {name: "".join(c for c in run.model.layers if c in "M*") for name, run in runs.items()}
    assert mixers == {
        "mamba2": "MMMMMMMM",
        "hybrid-1to7": "MMMM*MMM",
        "hybrid-1to3": "MM*MMM*M",
        "transformer": "********",
    }


@pytest.mark.parametrize("small", [False, True])
def test_models_share_parameter_count_and_token_budget(experiment, small):
    runs = experiment.load_variant(list(experiment.NAMES), small, [])
    counts = [experiment.count_parameters(run) for run in runs.values()]
    assert max(counts) / min(counts) - 1 < (0.001 if not small else 0.01)
    trains = [run.train for run in runs.values()]
    assert len({(t.max_steps, t.micro_batch_size, t.grad_accum, t.seq_len) for t in trains}) == 1


def test_small_run_writes_results_and_plots(experiment, tmp_path):
    code = experiment.main(
        ["--small", "--models", "transformer", "--set", "train.max_steps=3", "--out", str(tmp_path), "--log-every", "1"]
    )
    assert code == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert list(results["models"]) == ["transformer"] and results["tokens_per_model"] == 3 * 32 * 32
    rows = results["models"]["transformer"]["mqar"]["rows"]
    assert {(r["seq_len"], r["n_pairs"]) for r in rows} == {
        (t, n) for t in experiment.SMALL["eval_seq_lens"] for n in experiment.SMALL["eval_pairs"] if 4 * n <= t
    }
    assert matplotlib.image.imread(tmp_path / "mqar_comparison.png").ndim == 3
    assert (tmp_path / "transformer" / "model" / "model.safetensors").is_file()
