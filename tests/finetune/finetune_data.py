"""Tiny instruction sets for the fine-tuning tests, written to tmp_path and prepared with a small BPE."""

from __future__ import annotations

import json
from pathlib import Path

from hybridlm.config import DataConfig, SourceConfig
from hybridlm.data.prepare import prepare

EOS = "<|endoftext|>"


def write_jsonl(path: Path, records: list) -> Path:
    """One JSON value per line; an unchanged file is left alone (its mtime is part of the data's identity)."""
    text = "".join(json.dumps(r) + "\n" for r in records)
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        path.write_text(text, encoding="utf-8")
    return path


def prepare_examples(tmp_path: Path, records: list, seq_len: int = 64, name: str = "sft.jsonl", **data) -> Path:
    """Prepare one instruct source holding ``records`` with a 320-token BPE; extra DataConfig fields in ``data``."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    src = write_jsonl(tmp_path / name, records)
    data.setdefault("tokenizer", {"train": {"vocab_size": 320}})
    data.setdefault("val_fraction", 0.0)
    cfg = DataConfig(sources=[SourceConfig(path=str(src), format="instruct")], **data)
    return prepare(cfg, root=tmp_path / "prepared", seq_len=seq_len)


def reverse_examples(n: int) -> list[dict]:
    """``n`` distinct prompt/response pairs: reverse a few words."""
    words = "apple river stone cloud green music paper light house water tiger table".split()
    out = []
    for i in range(n):
        picked = [words[(i * 7 + k * 5) % len(words)] for k in range(2 + i % 4)]
        out.append({"prompt": f"Reverse these words: {' '.join(picked)}", "response": " ".join(reversed(picked))})
    return out
