"""The training loop end to end on CPU: learning, non-finite steps, precision inside the engine, bad configs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from hybridlm.config import ConfigError, ModelConfig
from hybridlm.model import HybridLM
from hybridlm.model.mamba2 import Mamba2
from hybridlm.train import TrainingDiverged, run_train
from hybridlm.train.metrics import read_metrics


@pytest.mark.slow
def test_loss_falls_on_the_default_corpus_and_run_dir_is_complete(run_args, tmp_path):
    steps = ["train.max_steps=60", "train.warmup_steps=5", "train.lr=5e-3", "train.micro_batch_size=8"]
    result = run_train(None, run_args(*steps, "train.sample_tokens=8"))
    train = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    first, last = train[0]["loss"], sum(r["loss"] for r in train[-5:]) / 5
    assert first > 7.0  # about ln(vocab size 2048) at initialisation
    assert last < first - 1.0
    assert result["val_loss"] < first - 1.0
    assert result["val_ppl"] == pytest.approx(torch.tensor(result["val_loss"]).exp().item())
    for key in ("lr", "grad_norm", "tokens_per_second", "memory_gb", "aux_loss"):
        assert all(key in r for r in train)
    out = tmp_path / "run"
    assert (out / "loss.png").stat().st_size > 0
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000060"
    model = HybridLM.from_pretrained(out / "model")  # the consolidated export loads for inference
    assert (out / "model" / "tokenizer.json").is_file()
    assert isinstance(result["sample"], str) and "⟶" in result["sample"]
    assert model.num_parameters() > 0


def _inject(monkeypatch, bad_calls: set[int], value: float) -> list[int]:
    """Make the LM loss of the given training forward calls (0-based) equal to ``value``."""
    calls = []
    original = HybridLM.forward

    def forward(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if self.training:
            if len(calls) in bad_calls:
                out.loss = out.loss * value
            calls.append(1)
        return out

    monkeypatch.setattr(HybridLM, "forward", forward)
    return calls


@pytest.mark.parametrize(("stage", "value"), [(0, float("nan")), (0, float("inf")), (2, float("nan"))])
def test_non_finite_step_is_skipped_and_counted(run_args, tmp_path, monkeypatch, stage, value):
    _inject(monkeypatch, {0, 3}, value)  # steps 1 and 4
    result = run_train(None, run_args("train.max_steps=5", f"train.zero_stage={stage}", "train.max_bad_steps=2"))
    assert result["skipped_steps"] == 2
    records = {r["step"]: r for r in read_metrics(tmp_path / "run") if "loss" in r}
    assert records[1]["loss"] is None and records[1]["grad_norm"] is None
    assert math.isfinite(records[5]["loss"]) and records[5]["skipped_steps"] == 2


def test_skipped_step_leaves_weights_untouched(run_args, tmp_path, monkeypatch):
    _inject(monkeypatch, {0}, float("nan"))
    run_train(None, run_args("train.max_steps=1", "train.max_bad_steps=2"))
    torch.manual_seed(0)  # the run's seed: the same initial weights
    cfg = ModelConfig.from_dict(json.loads((tmp_path / "run" / "model" / "config.json").read_text())["model"])
    initial = HybridLM(cfg).state_dict()
    trained = load_file(tmp_path / "run" / "model" / "model.safetensors")
    assert all(torch.equal(trained[k], initial[k]) for k in trained)


def test_stops_after_max_bad_steps_in_a_row(run_args, monkeypatch):
    _inject(monkeypatch, set(range(100)), float("nan"))
    with pytest.raises(TrainingDiverged, match=r"3 steps in a row .*train.max_bad_steps=3"):
        run_train(None, run_args("train.max_bad_steps=3"))


@pytest.mark.parametrize("stage", [0, 3])
def test_ssm_parameters_stay_fp32_while_compute_is_bf16_inside_the_engine(run_args, monkeypatch, stage):
    seen = []
    original = Mamba2.forward

    def forward(self, h, *args, **kwargs):
        y = original(self, h, *args, **kwargs)
        if self.training:
            seen.append(
                {
                    "ssm": {self.A_log.dtype, self.D.dtype, self.dt_bias.dtype},
                    "numel": self.A_log.numel(),  # gathered, not a ZeRO-3 placeholder
                    "in_proj_weight": self.in_proj.weight.dtype,
                    "out": y.dtype,
                }
            )
        return y

    monkeypatch.setattr(Mamba2, "forward", forward)
    run_train(None, run_args("train.max_steps=2", "train.precision=bf16", f"train.zero_stage={stage}"))
    assert seen
    for s in seen:
        assert s["ssm"] == {torch.float32} and s["numel"] > 0
        assert s["in_proj_weight"] == torch.float32  # master weights stay fp32 too
        assert s["out"] == torch.bfloat16  # the projections ran in bf16 under autocast


def test_deepspeed_bf16_mode_is_refused_for_mamba_models(run_args, tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"bf16": {"enabled": True}}))
    with pytest.raises(ConfigError, match=r"train.deepspeed_config=.*bf16.*train.precision=bf16"):
        run_train(None, run_args(f"train.deepspeed_config={ds}"))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["train.offload_optimizer=true", "train.zero_stage=0"],
            r"train.offload_optimizer=true needs train.zero_stage",
        ),
        (["train.seq_len=48"], r"train.seq_len=48 must be a multiple of model.mamba.chunk_size=32"),
        (["train.keep_last=0"], r"train.keep_last=0"),
        (["train.activation_checkpointing=0"], r"train.activation_checkpointing=0"),
        (["init_from=/nonexistent"], r"init_from=/nonexistent: not a hybridlm model directory"),
        (["resume=/nonexistent"], r"resume=/nonexistent: not a checkpoint"),
    ],
)
def test_configs_that_cannot_run_fail_before_training_naming_keys(run_args, tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message):
        run_train(None, run_args(*extra))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_user_deepspeed_json_may_not_contradict_the_batch(run_args, tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"overlap_comm": False}}))
    with pytest.raises(ConfigError, match=r"train_micro_batch_size_per_gpu=2 but train.micro_batch_size=4"):
        run_train(None, run_args(f"train.deepspeed_config={ds}"))


def test_init_from_loads_weights_and_rejects_other_shapes(run_args, tmp_path):
    run_train(None, run_args("train.max_steps=2", out="first"))
    exported = tmp_path / "first" / "model"
    result = run_train(
        None, run_args("train.max_steps=1", "train.lr=1e-9", "train.warmup_steps=1", f"init_from={exported}")
    )
    before, after = (
        load_file(exported / "model.safetensors"),
        load_file(tmp_path / "run" / "model" / "model.safetensors"),
    )
    assert all(torch.allclose(before[k], after[k], atol=1e-6) for k in before)
    assert result["step"] == 1
    with pytest.raises(ConfigError, match=r"init_from=.*model.d_model"):
        run_train(None, run_args("model.d_model=96", f"init_from={exported}", out="other"))


@pytest.mark.parametrize("stage", [0, 3])
def test_chunked_loss_trains_like_the_full_loss_inside_the_engine(run_args, tmp_path, stage):
    # ZeRO-3 partitions the LM head: the chunked loss must gather it like any module call
    steps = ["train.max_steps=3", f"train.zero_stage={stage}"]
    run_train(None, run_args(*steps, out="full"))
    run_train(None, run_args(*steps, "train.loss_chunk_tokens=50", out="chunked"))

    full = [r["loss"] for r in read_metrics(tmp_path / "full") if "loss" in r]
    chunked = [r["loss"] for r in read_metrics(tmp_path / "chunked") if "loss" in r]
    assert chunked == pytest.approx(full, rel=1e-5)
