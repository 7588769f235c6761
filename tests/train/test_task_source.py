"""Training on a synthetic task (``data.sources: [{task: mqar}]``): no data preparation, no tokenizer."""

from __future__ import annotations

import json

import pytest
import torch

from hybridlm.config import ConfigError, load_run_config
from hybridlm.eval.tasks import MQARLoader, MQARTask
from hybridlm.model import HybridLM
from hybridlm.train import run_train
from hybridlm.train.data import make_loader
from tests.train.conftest import TINY_RUN

MQAR = ["model.vocab_size=64", "data.sources=[{task: mqar, n_pairs: [2, 4]}]"]


def test_trainer_trains_on_mqar_batches_and_exports_a_model(tmp_path):
    out = tmp_path / "run"
    result = run_train(None, [*TINY_RUN, *MQAR, f"out_dir={out}"])

    assert result["step"] == 8 and torch.isfinite(torch.tensor(result["val_loss"]))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in r for r in records)
    model = HybridLM.from_pretrained(out / "model")
    assert model.cfg.vocab_size == 64  # the task's ids, not a tokenizer's
    assert not (out / "model" / "tokenizer.json").exists()


def test_task_loader_yields_the_tasks_own_batches():
    cfg = load_run_config(None, [*TINY_RUN, *MQAR])
    loader = make_loader(cfg, cfg.model, None, "train", rank=0, world_size=1)
    expected = MQARLoader(MQARTask(64, 64, [2, 4], seed=cfg.seed), 4).next_batch()

    batch = loader.next_batch()
    assert torch.equal(batch["input_ids"], expected["input_ids"])
    assert torch.equal(batch["labels"], expected["labels"])


@pytest.mark.parametrize(
    "extra, message",
    [
        (["data.sources=[{task: mqar, n_pairs: [32]}]"], "data.sources[0] (task mqar"),
        (["data.sources=[{task: mqar}, {path: x.txt}]"], "must be the only source"),
    ],
)
def test_bad_task_sources_fail_at_load_naming_the_key(extra, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_run_config(None, [*TINY_RUN, "model.vocab_size=64", *extra])
