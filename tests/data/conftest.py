"""Fixtures of the data tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from data_corpora import make_docs, prepare_docs


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> tuple[Path, list[str]]:
    """A prepared dir of 200 documents (10% held out) shared by the loader tests."""
    tmp = tmp_path_factory.mktemp("prepared")
    docs = make_docs(200, seed=0)
    return prepare_docs(tmp, docs, val_fraction=0.1), docs
