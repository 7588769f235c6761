"""Import of mamba_ssm ``MambaLMHeadModel`` checkpoints (config.json + pytorch_model.bin with its key
names). The reference is a transformers model holding the same weights: Mamba for a pure
Mamba-1 model; Bamba for a Mamba-2 + attention + gated-MLP hybrid, whose weights the test packs
the way mamba_ssm does (q|k|v in ``mixer.in_proj``, [value | gate] in ``mlp.fc1``)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import transformers

from hybridlm.convert import ConvertError, load_hf_as_hybridlm

PARITY = 1e-4


def write_mamba_ssm_checkpoint(path: Path, config: dict, state: dict[str, torch.Tensor]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    torch.save(state, path / "pytorch_model.bin")


def max_logit_diff(ours, theirs, vocab_size: int) -> float:
    ids = torch.randint(0, vocab_size, (2, 19))
    with torch.no_grad():
        return (ours(ids).logits - theirs(ids).logits[..., :vocab_size]).abs().max().item()


def test_a_mamba1_checkpoint_matches_transformers_mamba_with_the_same_weights(tmp_path, perturb):
    hf = transformers.MambaForCausalLM(
        transformers.MambaConfig(vocab_size=96, hidden_size=64, state_size=16, num_hidden_layers=2, time_step_rank=8)
    ).eval()
    perturb(hf)
    # mamba_ssm names the embedding backbone.embedding and keeps the tied head in its state dict
    state = {k.replace("backbone.embeddings.", "backbone.embedding."): v for k, v in hf.state_dict().items()}
    config = {
        "d_model": 64,
        "n_layer": 2,
        "vocab_size": 90,  # padded to 96 by pad_vocab_size_multiple
        "ssm_cfg": {"d_state": 16, "dt_rank": 8},
        "rms_norm": True,
        "residual_in_fp32": True,
        "fused_add_norm": True,
        "pad_vocab_size_multiple": 16,
        "tie_embeddings": True,
    }
    write_mamba_ssm_checkpoint(tmp_path, config, state)

    ours = load_hf_as_hybridlm(tmp_path).eval()

    assert ours.cfg.layers == "MM" and ours.cfg.vocab_size == 90 and ours.cfg.padded_vocab_size == 96
    assert max_logit_diff(ours, hf, 90) < PARITY
    prompt = torch.randint(0, 90, (1, 5))
    theirs = hf.generate(prompt, max_new_tokens=32, do_sample=False, suppress_tokens=list(range(90, 96)))
    assert torch.equal(ours.generate(prompt, 32, temperature=0), theirs)


def to_mamba_ssm_names(bamba_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Bamba state dict repacked with mamba_ssm's names and fused tensors."""
    out, layers = {}, {}
    for key, tensor in bamba_state.items():
        match = re.match(r"model\.layers\.(\d+)\.(.*)", key)
        if match:
            layers.setdefault(int(match[1]), {})[match[2]] = tensor
    for i, p in layers.items():
        hf = f"backbone.layers.{i}."
        out[hf + "norm.weight"] = p.pop("input_layernorm.weight")
        out[hf + "norm2.weight"] = p.pop("pre_ff_layernorm.weight")
        out[hf + "mlp.fc1.weight"] = torch.cat(
            [p.pop("feed_forward.up_proj.weight"), p.pop("feed_forward.gate_proj.weight")]
        )
        out[hf + "mlp.fc2.weight"] = p.pop("feed_forward.down_proj.weight")
        if "self_attn.q_proj.weight" in p:
            qkv = [p.pop(f"self_attn.{x}_proj.weight") for x in "qkv"]
            out[hf + "mixer.in_proj.weight"] = torch.cat(qkv)
            out[hf + "mixer.out_proj.weight"] = p.pop("self_attn.o_proj.weight")
        out.update({hf + "mixer." + k.removeprefix("mamba."): v for k, v in p.items()})
    out["backbone.embedding.weight"] = bamba_state["model.embed_tokens.weight"]
    out["backbone.norm_f.weight"] = bamba_state["model.final_layernorm.weight"]
    out["lm_head.weight"] = bamba_state["lm_head.weight"]
    return out


def test_a_mamba2_attention_mlp_hybrid_matches_bamba_with_the_same_weights(tmp_path, perturb):
    hf = transformers.BambaForCausalLM(
        transformers.BambaConfig(
            vocab_size=96,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            attn_layer_indices=[1],
            mamba_n_heads=8,
            mamba_d_head=16,
            mamba_n_groups=2,
            mamba_d_state=16,
            mamba_chunk_size=8,
            rms_norm_eps=1e-5,  # mamba_ssm's norm epsilon
        )
    ).eval()
    perturb(hf)
    config = {
        "d_model": 64,
        "d_intermediate": 128,
        "n_layer": 3,
        "vocab_size": 96,
        "ssm_cfg": {"layer": "Mamba2", "d_state": 16, "headdim": 16, "ngroups": 2, "chunk_size": 8},
        "attn_layer_idx": [1],
        # Bamba rotates half of each 16-dim head
        "attn_cfg": {
            "num_heads": 4,
            "num_heads_kv": 2,
            "head_dim": 16,
            "rotary_emb_dim": 8,
            "qkv_proj_bias": False,
            "out_proj_bias": False,
        },
        "rms_norm": True,
        "residual_in_fp32": True,
        "pad_vocab_size_multiple": 16,
        "tie_embeddings": False,
    }
    write_mamba_ssm_checkpoint(tmp_path, config, to_mamba_ssm_names(hf.state_dict()))

    ours = load_hf_as_hybridlm(tmp_path).eval()

    assert ours.cfg.layers == "M-*-M-"
    assert max_logit_diff(ours, hf, 96) < PARITY
    prompt = torch.randint(0, 96, (1, 5))
    theirs = hf.generate(prompt, max_new_tokens=32, do_sample=False)
    assert torch.equal(ours.generate(prompt, 32, temperature=0), theirs)


def test_an_unsupported_mamba_ssm_setting_is_named(tmp_path):
    config = {"d_model": 64, "n_layer": 2, "vocab_size": 96, "rms_norm": False}
    write_mamba_ssm_checkpoint(tmp_path, config, {})
    with pytest.raises(ConvertError, match=r"rms_norm=false \(LayerNorm\) is not supported"):
        load_hf_as_hybridlm(tmp_path)


class NotATensor:
    """Anything but tensors and plain containers must never be unpickled."""


def test_a_pickle_holding_objects_is_refused_not_executed(tmp_path):
    write_mamba_ssm_checkpoint(tmp_path, {"d_model": 64, "n_layer": 2, "vocab_size": 96}, {"x": NotATensor()})
    with pytest.raises(ConvertError, match=r"pytorch_model.bin: cannot be read as a plain tensor state dict"):
        load_hf_as_hybridlm(tmp_path)


HYBRID = {
    "vocab_size": 96,
    "d_model": 64,
    "pattern": "M-*-M-",
    "mamba": {"version": 2, "head_dim": 16, "d_state": 32, "ngroups": 2, "chunk_size": 32},
    "attention": {"n_heads": 4, "n_kv_heads": 2, "head_dim": 16, "rope_fraction": 0.5},
    "mlp": {"d_ff": 128},
}


def test_raw_config_is_read_back_as_the_same_model():
    """``raw_config`` (what builds mamba_ssm's own model for the bench) inverts the import's config mapping."""
    from hybridlm import ModelConfig
    from hybridlm.convert import mamba_ssm

    cfg = ModelConfig.from_dict(HYBRID)
    raw = mamba_ssm.raw_config(cfg)
    assert raw["attn_layer_idx"] == [1] and raw["n_layer"] == 3
    state = {"backbone.layers.0.mlp.fc1.weight": torch.empty(2 * cfg.d_ff, cfg.d_model)}
    assert mamba_ssm.config_from_raw(raw, state) == cfg
    assert mamba_ssm.raw_config(cfg, rotary_dim=0)["attn_cfg"]["rotary_emb_dim"] == 0  # no flash_attn: no RoPE


@pytest.mark.parametrize(
    "change, reason",
    [
        ({"pattern": "M*-"}, "decoder layers of Mamba-2 or attention then a dense MLP"),
        ({"mamba": {"version": 1}}, "decoder layers of Mamba-2"),
        ({"mlp": {"d_ff": 128, "activation": "relu2"}}, "not mlp.activation='relu2'"),
    ],
)
def test_raw_config_names_what_mamba_ssm_cannot_build(change, reason):
    from hybridlm import ModelConfig
    from hybridlm.convert import mamba_ssm

    cfg = ModelConfig.from_dict({**HYBRID, **change})
    assert reason in mamba_ssm.can_express(cfg)
    with pytest.raises(ConvertError, match=re.escape(reason)):
        mamba_ssm.raw_config(cfg)
