"""Jamba (transformers ``JambaForCausalLM``): decoder layers of a Mamba-1 mixer (with RMSNorms on
Δ, B and C) or attention without positional encoding, then a SwiGLU MLP or a softmax-routed MoE.
Attention and MoE sit at periodic layers: ``i % period == offset``.

hybridlm sub-layers 2i and 2i+1 are HF layer i's mixer and feed-forward. On disk experts are
stored one module each (gate_proj / up_proj / down_proj); in memory transformers stacks them
into ``gate_up_proj`` [gate | up] and ``down_proj``, the layout hybridlm uses.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from transformers import JambaConfig

from hybridlm.config import ModelConfig
from hybridlm.convert.common import (
    ConvertError,
    Param,
    build_config,
    common_hf_kwargs,
    decoder_layers,
    export_state,
    from_hf_state,
    head_dim_of,
    head_params,
    pad_multiple_for,
    periodic,
    reference_state,
    rename,
    require,
    require_attention,
    same_names,
    stored_config,
)
from hybridlm.model import HybridLM

MODEL_TYPE = "jamba"


def can_express(cfg: ModelConfig) -> str | None:
    reasons: list[str] = []
    layers, m, a, e = cfg.layers, cfg.mamba, cfg.attention, cfg.moe
    pairs = decoder_layers(layers)
    if pairs is None:
        return "the pattern must be decoder layers of a mixer (M or *) then an FFN (- or E), e.g. 'M-M-*E'"
    require_attention(layers, "Jamba", reasons)
    for char, what in (("*", "attention"), ("E", "MoE")):
        flags = [char in pair for pair in pairs]
        if periodic(flags) is None:
            at = [i for i, f in enumerate(flags) if f]
            reasons.append(f"{what} at decoder layers {at} is not periodic (Jamba needs i % period == offset)")
    if "M" in layers:
        require(m.version == 1, "Jamba's mixer is Mamba-1 (model.mamba.version=1)", reasons)
        require(m.inner_norms, "Jamba's Mamba normalises Δ, B and C (needs model.mamba.inner_norms=true)", reasons)
    if "*" in layers:
        require(not a.rope, "Jamba attention has no positional encoding (needs model.attention.rope=false)", reasons)
        require(a.window is None, "Jamba attention has no sliding window (model.attention.window)", reasons)
        require(not a.bias, "Jamba attention has no biases (model.attention.bias)", reasons)
    require(
        cfg.mlp.activation == "swiglu",
        f"Jamba's FFNs are SwiGLU, not model.mlp.activation={cfg.mlp.activation}",
        reasons,
    )
    require(not cfg.mlp.bias, "Jamba's FFNs have no biases (model.mlp.bias)", reasons)
    if "E" in layers:
        require(e.router == "softmax", f"Jamba routes with model.moe.router=softmax, not {e.router}", reasons)
        require(e.shared_d_ff == 0, "Jamba's MoE has no shared expert (model.moe.shared_d_ff=0)", reasons)
        if "-" in layers:
            require(cfg.expert_d_ff == cfg.d_ff, "Jamba's experts are as wide as its MLPs (model.moe.d_ff)", reasons)
    return "; ".join(reasons) or None


def hf_config(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> JambaConfig:
    m, a, e = cfg.mamba, cfg.attention, cfg.moe
    pairs = decoder_layers(cfg.layers)
    attn_period, attn_offset = periodic([mixer == "*" for mixer, _ in pairs])
    moe_period, moe_offset = periodic([ffn == "E" for _, ffn in pairs])
    has_moe = "E" in cfg.layers
    return JambaConfig(
        **common_hf_kwargs(cfg, dtype),
        hidden_size=cfg.d_model,
        intermediate_size=cfg.expert_d_ff if has_moe and "-" not in cfg.layers else cfg.d_ff,
        num_hidden_layers=len(pairs),
        attn_layer_period=attn_period,
        attn_layer_offset=attn_offset,
        expert_layer_period=moe_period,
        expert_layer_offset=moe_offset,
        num_experts=e.n_experts if has_moe else 1,
        num_experts_per_tok=e.top_k if has_moe else 1,
        num_attention_heads=a.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim,
        hidden_act="silu",
        rms_norm_eps=cfg.norm_eps,
        mamba_d_state=m.d_state,
        mamba_d_conv=m.d_conv,
        mamba_expand=m.expand,
        mamba_dt_rank=cfg.dt_rank,
        mamba_conv_bias=m.conv_bias,
        mamba_proj_bias=m.proj_bias,
        initializer_range=cfg.init_std,
    )


def weight_table(cfg: ModelConfig, keys: list[str]) -> list[Param]:
    table = [
        rename("embed_tokens.weight", "model.embed_tokens.weight"),
        rename("norm_f.weight", "model.final_layernorm.weight"),
    ]
    for i, (mixer, _) in enumerate(decoder_layers(cfg.layers)):
        hf = f"model.layers.{i}."
        table += [
            rename(f"layers.{2 * i}.norm.weight", hf + "input_layernorm.weight"),
            rename(f"layers.{2 * i + 1}.norm.weight", hf + "pre_ff_layernorm.weight"),
            *same_names(keys, f"layers.{2 * i}.mixer.", hf + ("mamba." if mixer == "M" else "self_attn.")),
            *same_names(keys, f"layers.{2 * i + 1}.mixer.", hf + "feed_forward."),
        ]
    return table + head_params(cfg, "lm_head.weight", can_tie=True)


def to_hf(model: HybridLM) -> tuple[JambaConfig, dict[str, torch.Tensor]]:
    return export_state(model, hf_config, weight_table)


def config_from_hf(c: Any) -> ModelConfig:
    source = "jamba config"
    if c.hidden_act != "silu":
        raise ConvertError(f"{source}: hidden_act={c.hidden_act!r}; only 'silu' (SwiGLU FFN, SiLU conv) is supported")
    has_moe = c.num_experts > 1
    layout = {
        "n_layers": c.num_hidden_layers,
        "attn_period": c.attn_layer_period,
        "attn_offset": c.attn_layer_offset,
        "moe_period": c.expert_layer_period if has_moe else 0,
        "moe_offset": c.expert_layer_offset,
    }
    d: dict[str, Any] = {
        "vocab_size": c.vocab_size,
        "vocab_pad_multiple": pad_multiple_for(c.vocab_size),
        "d_model": c.hidden_size,
        "pattern": layout,
        "tie_embeddings": bool(c.tie_word_embeddings),
        "norm_eps": c.rms_norm_eps,
        "init_std": c.initializer_range,
        "mamba": {
            "version": 1,
            "d_state": c.mamba_d_state,
            "d_conv": c.mamba_d_conv,
            "expand": c.mamba_expand,
            "dt_rank": c.mamba_dt_rank,
            "conv_bias": bool(c.mamba_conv_bias),
            "proj_bias": bool(c.mamba_proj_bias),
            "inner_norms": True,
        },
        "attention": {
            "n_heads": c.num_attention_heads,
            "n_kv_heads": c.num_key_value_heads,
            "head_dim": head_dim_of(c),
            "rope": False,
        },
        "mlp": {"d_ff": c.intermediate_size, "activation": "swiglu"},
    }
    if has_moe:
        d["moe"] = {"n_experts": c.num_experts, "top_k": c.num_experts_per_tok, "router": "softmax"}
    return build_config(d, source)


def in_memory_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-expert modules on disk -> the stacked ``gate_up_proj`` / ``down_proj`` of transformers."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for key, tensor in state.items():
        match = re.match(r"(.*\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$", key)
        if match:
            experts.setdefault((match[1], match[3]), {})[int(match[2])] = tensor
        else:
            out[key] = tensor

    def stacked(prefix: str, name: str) -> torch.Tensor:
        by_index = experts.pop((prefix, name))
        return torch.stack([by_index[i] for i in sorted(by_index)])

    for prefix in sorted({p for p, _ in experts}):
        out[f"{prefix}.gate_up_proj"] = torch.cat([stacked(prefix, "gate_proj"), stacked(prefix, "up_proj")], dim=1)
        out[f"{prefix}.down_proj"] = stacked(prefix, "down_proj")
    return out


def from_hf(c: Any, state: dict[str, torch.Tensor]) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    cfg = stored_config(c, config_from_hf(c), hf_config)
    shapes = reference_state(cfg)
    table = weight_table(cfg, list(shapes))
    return cfg, from_hf_state(table, in_memory_names(state), shapes, ignore=(r"^lm_head\.weight$",))
