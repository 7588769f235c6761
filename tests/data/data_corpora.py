"""Tiny corpora for the data tests, written to tmp_path, and a helper that prepares them with a small BPE."""

from __future__ import annotations

import random
from pathlib import Path

from hybridlm.config import DataConfig, SourceConfig
from hybridlm.data.prepare import prepare

WORDS = (
    "the a mamba layer reads its state while attention looks back at every token and the model learns "
    "which words follow ünïcödé 日本語 emoji 🙂 tabs\tand  double  spaces"
).split(" ")


def make_docs(n: int, seed: int, prefix: str = "", max_words: int = 60) -> list[str]:
    """``n`` distinct documents without blank lines (so a .txt file holds one per paragraph)."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        lines = [" ".join(rng.choices(WORDS, k=rng.randint(1, max_words))) for _ in range(rng.randint(1, 3))]
        lines = [line if line.strip() else "state" for line in lines]  # a blank line would end the document
        docs.append(f"{prefix}{i}: " + "\n".join(lines))
    return docs


def write_txt(path: Path, docs: list[str]) -> Path:
    """Write ``docs`` one per paragraph; an unchanged file is left alone (its mtime is part of the data's identity)."""
    text = "\n\n".join(docs) + "\n"
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        path.write_text(text, encoding="utf-8")
    return path


def prepare_docs(tmp_path: Path, docs: list[str], **data) -> Path:
    """Prepare one .txt source holding ``docs`` with a 320-token BPE; extra DataConfig fields in ``data``."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    src = write_txt(tmp_path / "corpus.txt", docs)
    data.setdefault("tokenizer", {"train": {"vocab_size": 320}})
    cfg = DataConfig(sources=[SourceConfig(path=str(src))], **data)
    return prepare(cfg, root=tmp_path / "prepared")
