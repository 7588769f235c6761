"""Bamba (transformers ``BambaForCausalLM``): decoder layers of a Mamba-2 mixer or attention
(at any indices) followed by a SwiGLU MLP; partial RoPE; one RMSNorm epsilon everywhere.

hybridlm sub-layers 2i and 2i+1 are HF layer i's mixer and feed-forward.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import BambaConfig

from hybridlm.config import ModelConfig
from hybridlm.convert.common import (
    ConvertError,
    Param,
    build_config,
    common_hf_kwargs,
    decoder_layers,
    default_rope,
    export_state,
    from_hf_state,
    head_dim_of,
    head_params,
    pad_multiple_for,
    reference_state,
    rename,
    require,
    require_attention,
    same_names,
    stored_config,
)
from hybridlm.model import HybridLM

MODEL_TYPE = "bamba"


def can_express(cfg: ModelConfig) -> str | None:
    reasons: list[str] = []
    layers = cfg.layers
    pairs = decoder_layers(layers)
    require(
        pairs is not None and all(f == "-" for _, f in pairs),
        "the pattern must be decoder layers of a mixer (M or *) then a dense MLP (-), e.g. 'M-M-*-'",
        reasons,
    )
    require_attention(layers, "Bamba", reasons)
    if "M" in layers:
        require(cfg.mamba.version == 2, "Bamba's mixer is Mamba-2 (model.mamba.version=2)", reasons)
    if "*" in layers:
        a = cfg.attention
        require(a.rope, "Bamba attention always applies RoPE (model.attention.rope=true)", reasons)
        require(a.window is None, "Bamba attention has no sliding window (model.attention.window)", reasons)
    require(
        cfg.mlp.activation == "swiglu", f"Bamba's MLP is SwiGLU, not model.mlp.activation={cfg.mlp.activation}", reasons
    )
    return "; ".join(reasons) or None


def hf_config(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> BambaConfig:
    m, a = cfg.mamba, cfg.attention
    pairs = decoder_layers(cfg.layers)
    return BambaConfig(
        **common_hf_kwargs(cfg, dtype),
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_ff,
        num_hidden_layers=len(pairs),
        attn_layer_indices=[i for i, (mixer, _) in enumerate(pairs) if mixer == "*"],
        num_attention_heads=a.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim,
        attention_bias=a.bias,
        rope_parameters={"rope_type": "default", "rope_theta": a.rope_theta, "partial_rotary_factor": a.rope_fraction},
        hidden_act="silu",
        mlp_bias=cfg.mlp.bias,
        rms_norm_eps=cfg.norm_eps,
        mamba_n_heads=cfg.mamba_n_heads,
        mamba_d_head=m.head_dim,
        mamba_n_groups=m.ngroups,
        mamba_d_state=m.d_state,
        mamba_d_conv=m.d_conv,
        mamba_expand=m.expand,
        mamba_chunk_size=m.chunk_size,
        mamba_conv_bias=m.conv_bias,
        mamba_proj_bias=m.proj_bias,
        time_step_limit=list(m.dt_limit),
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


def to_hf(model: HybridLM) -> tuple[BambaConfig, dict[str, torch.Tensor]]:
    return export_state(model, hf_config, weight_table)


def config_from_hf(c: Any) -> ModelConfig:
    source = "bamba config"
    if c.hidden_act != "silu":
        raise ConvertError(f"{source}: hidden_act={c.hidden_act!r}; only 'silu' (SwiGLU MLP, SiLU conv) is supported")
    pattern = "".join("*-" if t == "full_attention" else "M-" for t in c.layers_block_type)
    d = {
        "vocab_size": c.vocab_size,
        "vocab_pad_multiple": pad_multiple_for(c.vocab_size),
        "d_model": c.hidden_size,
        "pattern": pattern,
        "tie_embeddings": bool(c.tie_word_embeddings),
        "norm_eps": c.rms_norm_eps,
        "init_std": c.initializer_range,
        "mlp": {"d_ff": c.intermediate_size, "activation": "swiglu", "bias": bool(c.mlp_bias)},
    }
    if "M" in pattern:
        d["mamba"] = mamba_section(c, source)
    if "*" in pattern:
        theta, fraction = default_rope(c, source, partial_default=0.5)
        d["attention"] = attention_section(c, rope=True, theta=theta, fraction=fraction)
    return build_config(d, source)


def mamba_section(c: Any, source: str) -> dict[str, Any]:
    """Our ``model.mamba`` from the ``mamba_*`` fields Bamba and GraniteMoeHybrid share."""
    d_inner = c.mamba_n_heads * c.mamba_d_head
    if d_inner % c.hidden_size:
        raise ConvertError(f"{source}: mamba_n_heads * mamba_d_head = {d_inner} is not a multiple of hidden_size")
    return {
        "version": 2,
        "d_state": c.mamba_d_state,
        "d_conv": c.mamba_d_conv,
        "expand": d_inner // c.hidden_size,
        "head_dim": c.mamba_d_head,
        "ngroups": c.mamba_n_groups,
        "chunk_size": c.mamba_chunk_size,
        "dt_limit": list(c.time_step_limit or (0.0, float("inf"))),
        "conv_bias": bool(c.mamba_conv_bias),
        "proj_bias": bool(c.mamba_proj_bias),
    }


def attention_section(c: Any, rope: bool, theta: float = 10000.0, fraction: float = 1.0) -> dict[str, Any]:
    """Our ``model.attention`` from the Llama-style attention fields."""
    return {
        "n_heads": c.num_attention_heads,
        "n_kv_heads": c.num_key_value_heads,
        "head_dim": head_dim_of(c),
        "rope": rope,
        "rope_theta": theta,
        "rope_fraction": fraction,
        "bias": bool(getattr(c, "attention_bias", False)),
    }


def from_hf(c: Any, state: dict[str, torch.Tensor]) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    cfg = stored_config(c, config_from_hf(c), hf_config)
    shapes = reference_state(cfg)
    return cfg, from_hf_state(weight_table(cfg, list(shapes)), state, shapes, ignore=(r"^lm_head\.weight$",))
