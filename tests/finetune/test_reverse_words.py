"""A tiny hybrid fine-tuned on the synthetic "reverse these words" set learns it: its held-out response
loss falls far below the base model's and below what the answer words' frequencies alone give."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from hybridlm.config import DataConfig, SourceConfig
from hybridlm.data import PackedLoader, load_tokenizer
from hybridlm.data.prepare import prepare
from hybridlm.model import HybridLM

SEQ_LEN = 128
MAKE_REVERSE = Path(__file__).parents[2] / "data" / "examples" / "make_reverse.py"


def make_reverse_words(out: Path) -> Path:
    spec = importlib.util.spec_from_file_location("make_reverse", MAKE_REVERSE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(out, n=400)


def response_loss(model: HybridLM, prepared: Path) -> float:
    """Mean next-token loss over every response token of the validation split."""
    model.eval()
    loader = PackedLoader(prepared, "val", SEQ_LEN, 4, shuffle=False)
    total, count = 0.0, 0
    with torch.no_grad():
        for _ in range(-(-loader.num_rows // 4)):
            batch = loader.next_batch()
            out = model(batch["input_ids"], batch["doc_ids"], batch["labels"])
            n = int((batch["labels"][:, 1:] != -100).sum())
            total, count = total + out.loss.item() * n, count + n
    model.train()
    return total / count


def unigram_entropy(prepared: Path) -> float:
    """Entropy of the response tokens' frequencies: the loss of a model that ignores the prompt."""
    loader = PackedLoader(prepared, "train", SEQ_LEN, 1, shuffle=False)
    labels = np.concatenate([loader.next_batch()["labels"].numpy().ravel() for _ in range(loader.num_rows)])
    p = np.bincount(labels[labels != -100]) / (labels != -100).sum()
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


@pytest.mark.slow
def test_tiny_model_learns_to_reverse_words(tmp_path, tiny_config):
    source = SourceConfig(path=str(make_reverse_words(tmp_path / "reverse_words.jsonl")), format="instruct")
    data = DataConfig(sources=[source], tokenizer={"train": {"vocab_size": 320}}, val_fraction=0.1)
    prepared = prepare(data, root=tmp_path / "prepared", seq_len=SEQ_LEN)
    cfg = tiny_config(
        vocab_size=len(load_tokenizer(prepared)), d_model=64, pattern="M*-", mamba={"chunk_size": 16, "head_dim": 16}
    )
    model = HybridLM(cfg)
    base_loss = response_loss(model, prepared)

    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    loader = PackedLoader(prepared, "train", SEQ_LEN, 8, seed=0)
    for _ in range(200):
        batch = loader.next_batch()
        loss = model(batch["input_ids"], batch["doc_ids"], batch["labels"]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    tuned_loss = response_loss(model, prepared)

    # seen: base 5.8, word frequencies alone 3.9, tuned 0.85 (nats per response token)
    assert tuned_loss < base_loss - 3.0
    assert tuned_loss < 0.5 * unigram_entropy(prepared)  # it reads the prompt's words to answer
