"""Fixtures for training tests: the default corpus prepared once per session, and tiny run overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from hybridlm.config import DataConfig
from hybridlm.data.prepare import prepare

# A hybrid with every sub-layer kind (Mamba-2, MLP, attention, MoE) that steps in tens of milliseconds.
TINY_RUN = [
    "model.d_model=64",
    "model.pattern=M-*E",
    "model.mamba.head_dim=16",
    "model.mamba.d_state=16",
    "model.mamba.chunk_size=32",
    "model.attention.n_heads=4",
    "model.moe.n_experts=4",
    "model.moe.top_k=2",
    "train.seq_len=64",
    "train.micro_batch_size=4",
    "train.max_steps=8",
    "train.warmup_steps=2",
    "train.lr=3e-3",
    "train.log_every=1",
    "train.eval_batches=2",
    "train.sample_tokens=0",
]


@pytest.fixture(scope="session")
def prepared(tmp_path_factory) -> Path:
    """The embedded default corpus, tokenized once for all training tests."""
    return prepare(DataConfig(prepared_dir=str(tmp_path_factory.mktemp("data") / "prepared")))


@pytest.fixture
def run_args(prepared, tmp_path):
    """``run_args(*extra, out="a")`` -> overrides for a tiny run writing under tmp_path/out."""

    def make(*extra: str, out: str = "run") -> list[str]:
        return [*TINY_RUN, f"data.prepared_dir={prepared}", f"out_dir={tmp_path / out}", *extra]

    return make
