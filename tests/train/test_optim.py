"""Weight-decay parameter groups and the shapes of the learning-rate schedules."""

from __future__ import annotations

import math

import pytest

from hybridlm.config import ModelConfig, TrainConfig
from hybridlm.model import HybridLM
from hybridlm.train.optim import lr_at, param_groups


def _names(model, params) -> set[str]:
    ids = {id(p) for p in params}
    return {n for n, p in model.named_parameters() if id(p) in ids}


@pytest.mark.parametrize("version", [1, 2])
def test_no_weight_decay_on_biases_norms_ssm_params_and_embeddings(version):
    mamba = {"version": version, "d_state": 8, "head_dim": 16, "chunk_size": 16, "inner_norms": version == 1}
    cfg = ModelConfig.from_dict(
        {
            "d_model": 32,
            "pattern": "M*-E",
            "tie_embeddings": False,
            "mamba": {**mamba, "conv_bias": True},
            "attention": {"n_heads": 4, "bias": True},
            "mlp": {"bias": True},
            "moe": {"n_experts": 2, "top_k": 1},
        }
    )
    model = HybridLM(cfg)
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    decayed, not_decayed = _names(model, decay["params"]), _names(model, no_decay["params"])
    assert decayed | not_decayed == {n for n, _ in model.named_parameters()}
    assert not decayed & not_decayed
    for name in not_decayed:
        leaf = name.rsplit(".", 1)[-1]
        assert leaf in ("bias", "A_log", "D", "dt_bias") or "norm" in name or name == "embed_tokens.weight", name
    for name in decayed:
        assert name.endswith(("proj.weight", "conv1d.weight", "router.weight", "_proj")) or name == "lm_head.weight"
    ssm = {"A_log", "D"} | ({"dt_bias"} if version == 2 else {"dt_proj.bias"})
    assert all(any(n.endswith(s) for n in not_decayed) for s in ssm)
    assert {"embed_tokens.weight", "norm_f.weight"} <= not_decayed
    assert "lm_head.weight" in decayed  # untied: an ordinary projection
    assert any(n.endswith("q_proj.bias") for n in not_decayed)


def test_tied_embedding_appears_once_and_is_not_decayed():
    model = HybridLM(ModelConfig.from_dict({"d_model": 32, "pattern": "*-", "attention": {"n_heads": 4}}))
    groups = param_groups(model, 0.1)
    every = [id(p) for g in groups for p in g["params"]]
    assert len(every) == len(set(every))
    assert id(model.embed_tokens.weight) in {id(p) for p in groups[1]["params"]}


def _schedule(kind: str, **kw) -> list[float]:
    t = TrainConfig(max_steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1, schedule=kind, **kw)
    return [lr_at(s, t) for s in range(t.max_steps)]


@pytest.mark.parametrize("kind", ["cosine", "linear", "wsd"])
def test_warmup_rises_linearly_to_peak(kind):
    lrs = _schedule(kind)
    assert lrs[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert lrs[-1] == pytest.approx(0.1)  # every schedule ends at lr * min_lr_ratio


def test_cosine_decays_monotonically_through_the_midpoint():
    lrs = _schedule("cosine")[10:]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))
    mid = lrs[len(lrs) // 2 - 1]
    assert mid == pytest.approx(0.55, abs=0.02)  # half-way between peak and floor
    assert lrs[5] > 1.0 - (0.9 * 6 / 90)  # slower than linear at the start


def test_linear_decays_by_equal_steps():
    lrs = _schedule("linear")[10:]
    diffs = [a - b for a, b in zip(lrs, lrs[1:], strict=False)]
    assert diffs == pytest.approx([0.9 / 90] * len(diffs))


def test_wsd_holds_then_decays_over_the_last_fraction():
    lrs = _schedule("wsd", decay_fraction=0.2)
    assert lrs[10:80] == [1.0] * 70
    tail = lrs[80:]
    assert all(a > b for a, b in zip(tail, tail[1:], strict=False))
    assert tail[-1] == pytest.approx(0.1)
    assert not any(math.isnan(x) for x in lrs)
