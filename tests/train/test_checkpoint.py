"""Checkpoints: exact resume, resume under another ZeRO stage, atomic writes, retention and the latest pointer."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from hybridlm.model import HybridLM
from hybridlm.train import checkpoint as ckpt_io
from hybridlm.train import run_train
from hybridlm.train.metrics import read_metrics


def _losses(out) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out) if "loss" in r}


def _tensors(ckpt) -> dict[str, torch.Tensor]:
    return {**load_file(ckpt / "model.safetensors"), **load_file(ckpt / "optimizer.safetensors")}


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU fp32 property: fused GPU kernels accumulate with atomics")
@pytest.mark.parametrize(
    "engine", [["train.zero_stage=0"], ["train.zero_stage=2"], ["train.zero_stage=3", "train.offload_optimizer=true"]]
)
def test_resumed_run_matches_uninterrupted_run_bitwise(run_args, tmp_path, engine):
    full = run_train(None, run_args(*engine, "train.save_every=4", "train.keep_last=5", out="full"))
    half = tmp_path / "full" / "checkpoints" / "step_00000004"
    resumed = run_train(None, run_args(*engine, f"resume={half}", out="resumed"))
    assert resumed["loss"] == full["loss"]  # the loss at step 8, bit for bit
    assert _losses(tmp_path / "resumed") == {s: v for s, v in _losses(tmp_path / "full").items() if s > 4}
    a, b = (
        _tensors(tmp_path / "full" / "checkpoints" / "step_00000008"),
        _tensors(tmp_path / "resumed" / "checkpoints" / "step_00000008"),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # weights and AdamW moments
    state = json.loads((half / "trainer.json").read_text())
    assert state["adam_step"] == 4 and state["loader"]["rows_consumed"] == 4 * 4


@pytest.mark.parametrize(("saved", "resumed"), [(0, 3), (3, 1)])
def test_resume_under_another_zero_stage(run_args, tmp_path, saved, resumed):
    full = run_train(None, run_args(f"train.zero_stage={saved}", "train.save_every=4", out="full"))
    half = tmp_path / "full" / "checkpoints" / "step_00000004"
    other = run_train(None, run_args(f"train.zero_stage={resumed}", f"resume={half}", out="other"))
    # ZeRO and stage 0 sum gradients and norms in different orders: close, not bitwise
    assert other["loss"] == pytest.approx(full["loss"], rel=2e-3)
    moments = load_file(tmp_path / "other" / "checkpoints" / "step_00000008" / "optimizer.safetensors")
    assert all(v.abs().sum() > 0 for k, v in moments.items() if k.startswith("exp_avg_sq."))


def test_crash_while_checkpointing_leaves_previous_checkpoint_loadable(run_args, tmp_path, monkeypatch):
    calls = []
    real_save = ckpt_io.save_file

    def crashing_save(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 3:  # the second checkpoint's weights file, half written
            path.write_bytes(b"partial")
            raise OSError("disk full")
        real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(ckpt_io, "save_file", crashing_save)
    with pytest.raises(OSError, match="disk full"):
        run_train(None, run_args("train.save_every=2", out="run"))
    root = tmp_path / "run" / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_00000002"
    assert not (root / "step_00000004").exists() and (root / ".tmp_step_00000004").exists()
    HybridLM.from_pretrained(root / "step_00000002")  # a complete checkpoint is also a model directory

    monkeypatch.setattr(ckpt_io, "save_file", real_save)
    result = run_train(None, run_args("train.save_every=2", "resume=auto", out="run"))
    assert result["step"] == 8
    assert min(_losses(tmp_path / "run")) == 1 and sorted(_losses(tmp_path / "run")) == list(range(1, 9))
    assert not (root / ".tmp_step_00000004").exists()


def test_keeps_the_last_k_checkpoints_and_latest_points_at_the_newest(run_args, tmp_path):
    run_train(None, run_args("train.save_every=2", "train.keep_last=2"))
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000006", "step_00000008"]
    assert ckpt_io.latest_checkpoint(root) == root / "step_00000008"
    assert ckpt_io.resolve_resume("auto", tmp_path / "run") == root / "step_00000008"
    assert ckpt_io.resolve_resume(str(root), tmp_path / "elsewhere") == root / "step_00000008"
    assert ckpt_io.resolve_resume("auto", tmp_path / "fresh") is None


def test_resume_refuses_a_different_architecture(run_args, tmp_path):
    run_train(None, run_args("train.max_steps=2"))
    with pytest.raises(Exception, match=r"resume=.*model.d_model"):
        run_train(None, run_args("train.max_steps=4", "resume=auto", "model.d_model=96"))
