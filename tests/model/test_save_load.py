"""save_pretrained / from_pretrained: safetensors + config.json, bit-identical logits, dtypes kept."""

import json

import pytest
import torch
from safetensors.torch import load_file

from hybridlm import HybridLM
from hybridlm.model.model import FP32_PARAM_SUFFIXES


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_round_trip_gives_identical_logits(tiny_model, tmp_path, tie):
    model = tiny_model(pattern="M*-ME", tie_embeddings=tie, moe={"router": "sigmoid"})
    with torch.no_grad():
        model.layers[4].mixer.router.expert_bias.copy_(torch.randn(4))  # a buffer must travel too
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    stored = load_file(tmp_path / "model.safetensors")
    assert ("lm_head.weight" in stored) is not tie  # tied weights are stored once
    assert json.loads((tmp_path / "config.json").read_text())["model"]["tie_embeddings"] is tie

    loaded = HybridLM.from_pretrained(tmp_path).eval()
    assert loaded.cfg == model.cfg
    assert (loaded.lm_head.weight is loaded.embed_tokens.weight) is tie
    ids = torch.randint(0, 61, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("version", [1, 2])
def test_bf16_round_trip_keeps_ssm_parameters_fp32(tiny_model, tmp_path, version):
    model = tiny_model(pattern="M*-", mamba={"version": version}).cast(torch.bfloat16)

    def dtypes(m):
        return {name: p.dtype for name, p in m.named_parameters()}

    before = dtypes(model)
    fp32 = {name for name in before if name.endswith(FP32_PARAM_SUFFIXES)}
    expected_fp32 = {"layers.0.mixer.A_log", "layers.0.mixer.D"} | (
        {"layers.0.mixer.dt_proj.bias"} if version == 1 else {"layers.0.mixer.dt_bias"}
    )
    assert fp32 == expected_fp32
    assert all((dtype == torch.float32) == (name in fp32) for name, dtype in before.items())
    assert before["layers.0.mixer.in_proj.weight"] == torch.bfloat16

    model.save_pretrained(tmp_path)
    loaded = HybridLM.from_pretrained(tmp_path).eval()
    assert dtypes(loaded) == before
    ids = torch.randint(0, 61, (1, 7))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_from_pretrained_names_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        HybridLM.from_pretrained(tmp_path)


def test_from_pretrained_rejects_weights_of_another_model(tiny_model, tmp_path):
    tiny_model(pattern="M-").save_pretrained(tmp_path)
    other = tiny_model(pattern="*-")
    (tmp_path / "config.json").write_text(json.dumps({"model": other.cfg.to_dict()}))
    with pytest.raises(ValueError, match="missing keys"):
        HybridLM.from_pretrained(tmp_path)
