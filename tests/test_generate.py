"""Finding the model inside a run directory, which has a config.json of its own."""

from __future__ import annotations

import json

import pytest

from hybridlm.generate import resolve_model_dir


def test_a_run_directory_resolves_to_its_model_not_its_run_config(tiny_model, tmp_path):
    run = tmp_path / "run"
    tiny_model().save_pretrained(run / "model")
    (run / "config.json").write_text(json.dumps({"train": {"max_steps": 1}}))  # the run's resolved config

    assert resolve_model_dir(run) == run / "model"
    assert resolve_model_dir(run / "model") == run / "model"


def test_a_directory_without_weights_is_refused_by_name(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="not a hybridlm checkpoint"):
        resolve_model_dir(tmp_path)
