"""Freezing by name pattern, LoRA adapters (only they train), merging back to a plain HybridLM, refusals,
and (GPU) LoRA taking effect on the fused kernel path."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from hybridlm import ops
from hybridlm.config import ConfigError, FinetuneConfig, LoRAConfig
from hybridlm.model import HybridLM
from hybridlm.train.lora import apply_finetune, lora_targets, merge_lora, merge_lora_weights

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "in_proj", "out_proj", "gate_proj", "up_proj", "down_proj"]


def lora_cfg(targets=ALL_TARGETS, r: int = 4, freeze=()) -> FinetuneConfig:
    return FinetuneConfig(lora=LoRAConfig(r=r, alpha=8.0, target_modules=list(targets)), freeze=list(freeze))


def randomize_adapters(model: torch.nn.Module) -> None:
    """peft starts lora_B at zero (adapted == base); give the adapters a real effect."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)


def tokens(batch: int = 2, seqlen: int = 16, vocab: int = 61, device="cpu") -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seqlen), generator=torch.Generator().manual_seed(1)).to(device)


def test_freeze_by_regex_freezes_exactly_the_matching_parameters(tiny_model):
    model = apply_finetune(tiny_model(), FinetuneConfig(freeze=[r"^embed_tokens", r"layers\.0\.mixer\.(A_log|D)$"]))
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"embed_tokens.weight", "layers.0.mixer.A_log", "layers.0.mixer.D"}


def test_freeze_matches_a_tied_head_by_its_own_name(tiny_model):
    model = apply_finetune(tiny_model(), FinetuneConfig(freeze=[r"^lm_head\.weight$"]))
    assert not model.embed_tokens.weight.requires_grad  # the same tensor


def test_freeze_pattern_matching_nothing_names_the_pattern(tiny_model):
    with pytest.raises(ConfigError, match=r"finetune.freeze\[1\]='attn\\\\.q' matches no parameter name"):
        apply_finetune(tiny_model(), FinetuneConfig(freeze=["embed", r"attn\.q"]))
    with pytest.raises(ConfigError, match="freezes every parameter"):
        apply_finetune(tiny_model(), FinetuneConfig(freeze=["."]))


def test_no_lora_and_no_freeze_leaves_the_model_alone(tiny_model):
    model = tiny_model()
    names = [n for n, _ in model.named_parameters()]
    apply_finetune(model, FinetuneConfig())
    assert [n for n, _ in model.named_parameters()] == names and all(p.requires_grad for p in model.parameters())


def test_lora_trains_only_adapter_parameters(tiny_model):
    model = apply_finetune(tiny_model(pattern="M*-"), lora_cfg())
    model.train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    adapted = {n.split(".lora_A")[0] for n in trainable if ".lora_A." in n}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert adapted == {
        "layers.0.mixer.in_proj",
        "layers.0.mixer.out_proj",
        *(f"layers.1.mixer.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")),
        *(f"layers.2.mixer.{p}" for p in ("gate_proj", "up_proj", "down_proj")),
    }
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = tokens()
    for _ in range(2):  # the first step moves only lora_B (lora_A's gradient is zero while B is zero)
        opt.zero_grad()
        model(ids, labels=ids).loss.backward()
        opt.step()
    for name, p in model.named_parameters():
        if name in trainable:
            assert not torch.equal(p, before[name]), f"adapter {name} did not train"
        else:
            assert p.grad is None, f"frozen {name} got a gradient"
            assert torch.equal(p, before[name]), f"frozen {name} changed"


def test_merged_model_is_a_plain_hybridlm_with_the_adapted_logits(tiny_model, tmp_path):
    base = tiny_model(pattern="M*-E", moe={"shared_d_ff": 16})
    base_names = list(base.state_dict())
    model = apply_finetune(copy.deepcopy(base), lora_cfg())
    randomize_adapters(model)
    ids = tokens()
    with torch.no_grad():
        adapted = model(ids).logits
        assert not torch.allclose(adapted, base(ids).logits, atol=1e-3)  # the adapters matter
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}

    merged = merge_lora(model)
    assert type(merged) is HybridLM and list(merged.state_dict()) == base_names
    assert all(p.requires_grad for p in merged.parameters()) and not hasattr(merged, "peft_config")
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted, atol=1e-5, rtol=0)

    merged.save_pretrained(tmp_path / "merged")
    reloaded = HybridLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, adapted, atol=1e-5, rtol=0)

    # the state-dict path (a ZeRO-gathered checkpoint) gives the same weights
    from_weights = merge_lora_weights(weights, lora_cfg().lora)
    own = dict(merged.named_parameters())
    assert sorted(from_weights) == sorted(own)
    for name, value in from_weights.items():
        torch.testing.assert_close(value, own[name].detach(), atol=1e-6, rtol=0)


def test_lora_on_mamba1_x_proj_changes_the_output(tiny_model):
    base = tiny_model(pattern="M", mamba={"version": 1})
    model = apply_finetune(copy.deepcopy(base), lora_cfg(["x_proj"]))
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "layers.0.mixer.x_proj.lora_A.default.weight",
        "layers.0.mixer.x_proj.lora_B.default.weight",
    ]
    randomize_adapters(model)
    with torch.no_grad():
        assert not torch.allclose(model(tokens()).logits, base(tokens()).logits, atol=1e-4)


@pytest.mark.parametrize(
    ("overrides", "target", "message"),
    [
        ({}, "conv1d", "layers.0.mixer.conv1d, which LoRA cannot adapt: its weight is passed to the causal-conv"),
        ({"pattern": "M", "mamba": {"version": 1}}, "dt_proj", "layers.0.mixer.dt_proj, which LoRA cannot adapt"),
        ({}, "lm_head", "selects lm_head, tied to embed_tokens"),
        ({}, "norm", "selects layers.0.norm, a RMSNorm; LoRA adapts linear layers: down_proj, gate_proj"),
        ({"pattern": "E"}, "router", "selects layers.0.mixer.router, a Router"),
        ({}, "gate_up_proj", r"=\['gate_up_proj'\] matches no module of this model; its linear layers: down_proj"),
    ],
)
def test_lora_refuses_targets_it_cannot_adapt(tiny_model, overrides, target, message):
    with pytest.raises(ConfigError, match=f"finetune.lora.target_modules.*{message}"):
        apply_finetune(tiny_model(**overrides), lora_cfg([target]))


def test_a_target_this_model_lacks_is_skipped_with_a_warning(tiny_model, caplog):
    with caplog.at_level(logging.WARNING, logger="hybridlm.train"):
        targets = lora_targets(tiny_model(), ["q_proj", "x_proj"])  # x_proj: Mamba-1 only
    assert targets == ["layers.1.mixer.q_proj"]
    assert "'x_proj' matches no module of this model (skipped)" in caplog.text


def test_untied_lm_head_can_be_adapted(tiny_model):
    assert lora_targets(tiny_model(tie_embeddings=False), ["lm_head", "q_proj"]) == ["layers.1.mixer.q_proj", "lm_head"]


@pytest.mark.gpu
@pytest.mark.parametrize("version", [1, 2])
def test_lora_takes_effect_on_the_fused_kernel_path(tiny_config, version):
    """The fused scans read in_proj/x_proj/out_proj outputs, never their weights: the adapted model's
    fused and reference outputs agree, and both differ from the base model's."""
    # in_proj width 2 * 128 + 2 * 2 * 16 + 8 heads = 328: a multiple of 8, as the fused conv's strides need
    cfg = tiny_config(
        pattern="M*M-", d_model=64, mamba={"version": version, "d_state": 16, "head_dim": 16, "chunk_size": 16}
    )
    base = HybridLM(cfg).cuda().eval()
    targets = ["in_proj", "out_proj", "q_proj", "o_proj", "up_proj"] + (["x_proj"] if version == 1 else [])
    model = apply_finetune(copy.deepcopy(base), lora_cfg(targets)).eval()
    randomize_adapters(model)
    ids = tokens(2, 64, cfg.vocab_size, "cuda")
    with torch.no_grad():
        fused = model(ids).logits
        with ops.reference_kernels():
            reference = model(ids).logits
            base_reference = base(ids).logits
    assert ops.dispatch.choose("ssd_scan" if version == 2 else "selective_scan", ids.device) == "fused"
    torch.testing.assert_close(fused, reference, atol=2e-3, rtol=2e-3)  # the model tolerance of tests/ops
    assert (fused - base_reference).abs().max() > 100 * 2e-3
