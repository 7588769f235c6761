"""Fixtures of the recall / inspect tests: one CPU thread (the machine is shared) and a tiny BPE
tokenizer trained on a few documents of the embedded corpus."""

from __future__ import annotations

import itertools

import pytest

from hybridlm.data.sources import DEFAULT_CORPUS_DIR, read_txt
from hybridlm.data.tokenizer import train_bpe


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Every recall / inspect test runs single-threaded (tests/conftest.py's ``one_thread``)."""


@pytest.fixture(scope="session")
def tokenizer():
    docs = list(itertools.islice(read_txt(DEFAULT_CORPUS_DIR / "stdlib_docstrings_00.txt"), 200))
    return train_bpe(docs, 320)
