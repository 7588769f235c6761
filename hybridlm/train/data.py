"""What the trainer reads: packed shards of a prepared dataset, or a synthetic task generated on the fly."""

from __future__ import annotations

from pathlib import Path

from hybridlm.config import ModelConfig, RunConfig, SourceConfig
from hybridlm.data.loader import PackedLoader
from hybridlm.eval.tasks import MQARLoader, MQARTask


def task_source(cfg: RunConfig) -> SourceConfig | None:
    """The synthetic-task source (``task: mqar``) when the run trains on one; validation makes it the only source."""
    return next((s for s in cfg.data.sources if s.task is not None), None)


def make_loader(
    cfg: RunConfig, model_cfg: ModelConfig, prepared: Path | None, split: str, rank: int, world_size: int
) -> PackedLoader | MQARLoader:
    """The loader of ``split`` for this rank: MQAR batches for a task source, else the prepared shards."""
    t = cfg.train
    task = task_source(cfg)
    if task is None:
        return PackedLoader(prepared, split, t.seq_len, t.micro_batch_size, rank, world_size, cfg.seed)
    mqar = MQARTask(model_cfg.vocab_size, t.seq_len, task.n_pairs, seed=cfg.seed, power_a=task.power_a)
    return MQARLoader(mqar, t.micro_batch_size, rank, world_size, split=split)
