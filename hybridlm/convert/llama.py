"""Llama (transformers ``LlamaForCausalLM``): the pure-attention baseline. Decoder layers of
attention with full RoPE then a SwiGLU MLP; hybridlm sub-layers 2i and 2i+1 are HF layer i."""

from __future__ import annotations

from typing import Any

import torch
from transformers import LlamaConfig

from hybridlm.config import ModelConfig
from hybridlm.convert.bamba import attention_section
from hybridlm.convert.common import (
    ConvertError,
    Param,
    build_config,
    common_hf_kwargs,
    default_rope,
    export_state,
    from_hf_state,
    head_params,
    pad_multiple_for,
    reference_state,
    rename,
    require,
    same_names,
    stored_config,
)
from hybridlm.model import HybridLM

MODEL_TYPE = "llama"


def can_express(cfg: ModelConfig) -> str | None:
    layers, a = cfg.layers, cfg.attention
    if layers != "*-" * (len(layers) // 2):
        return "Llama is attention then MLP in every layer (pattern '*-' repeated)"
    reasons: list[str] = []
    require(
        a.rope and a.rope_fraction == 1.0, "Llama applies RoPE to whole heads (rope=true, rope_fraction=1)", reasons
    )
    require(a.window is None, "Llama attention has no sliding window (model.attention.window)", reasons)
    require(
        cfg.mlp.activation == "swiglu", f"Llama's MLP is SwiGLU, not model.mlp.activation={cfg.mlp.activation}", reasons
    )
    require(cfg.d_model % a.n_heads == 0, "transformers' Llama needs d_model divisible by attention.n_heads", reasons)
    return "; ".join(reasons) or None


def hf_config(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> LlamaConfig:
    a = cfg.attention
    return LlamaConfig(
        **common_hf_kwargs(cfg, dtype),
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_ff,
        num_hidden_layers=len(cfg.layers) // 2,
        num_attention_heads=a.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim,
        attention_bias=a.bias,
        rope_parameters={"rope_type": "default", "rope_theta": a.rope_theta},
        hidden_act="silu",
        mlp_bias=cfg.mlp.bias,
        rms_norm_eps=cfg.norm_eps,
        initializer_range=cfg.init_std,
    )


def weight_table(cfg: ModelConfig, keys: list[str]) -> list[Param]:
    table = [rename("embed_tokens.weight", "model.embed_tokens.weight"), rename("norm_f.weight", "model.norm.weight")]
    for i in range(len(cfg.layers) // 2):
        hf = f"model.layers.{i}."
        table += [
            rename(f"layers.{2 * i}.norm.weight", hf + "input_layernorm.weight"),
            rename(f"layers.{2 * i + 1}.norm.weight", hf + "post_attention_layernorm.weight"),
            *same_names(keys, f"layers.{2 * i}.mixer.", hf + "self_attn."),
            *same_names(keys, f"layers.{2 * i + 1}.mixer.", hf + "mlp."),
        ]
    return table + head_params(cfg, "lm_head.weight", can_tie=True)


def to_hf(model: HybridLM) -> tuple[LlamaConfig, dict[str, torch.Tensor]]:
    return export_state(model, hf_config, weight_table)


def config_from_hf(c: Any) -> ModelConfig:
    source = "llama config"
    if c.hidden_act != "silu":
        raise ConvertError(f"{source}: hidden_act={c.hidden_act!r}; only 'silu' (SwiGLU) is supported")
    theta, fraction = default_rope(c, source)
    if fraction != 1.0:
        raise ConvertError(f"{source}: rope_parameters.partial_rotary_factor={fraction} is not used by Llama")
    return build_config(
        {
            "vocab_size": c.vocab_size,
            "vocab_pad_multiple": pad_multiple_for(c.vocab_size),
            "d_model": c.hidden_size,
            "pattern": "*-" * c.num_hidden_layers,
            "tie_embeddings": bool(c.tie_word_embeddings),
            "norm_eps": c.rms_norm_eps,
            "init_std": c.initializer_range,
            "attention": attention_section(c, rope=True, theta=theta),
            "mlp": {"d_ff": c.intermediate_size, "activation": "swiglu", "bias": bool(c.mlp_bias)},
        },
        source,
    )


def from_hf(c: Any, state: dict[str, torch.Tensor]) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    cfg = stored_config(c, config_from_hf(c), hf_config)
    shapes = reference_state(cfg)
    table = weight_table(cfg, list(shapes))
    return cfg, from_hf_state(table, state, shapes, ignore=(r"^lm_head\.weight$", r"rotary_emb\.inv_freq$"))
