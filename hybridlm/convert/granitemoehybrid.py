"""GraniteMoeHybrid (transformers ``GraniteMoeHybridForCausalLM``, IBM Granite 4.0-H): decoder
layers of a Mamba-2 mixer or attention (full RoPE or none), then either MoE (top-k softmax
renormalised) plus an always-on shared SwiGLU expert in every layer, or, with no experts, the
shared SwiGLU MLP alone. Granite's scaling multipliers must be neutral: hybridlm has none.

The shared expert fuses [gate | up] in ``input_linear``; on disk the experts are
``input_linear`` / ``output_linear`` and the router ``router.layer``, which transformers renames
on load; ``from_hf`` accepts either form.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
from transformers import GraniteMoeHybridConfig

from hybridlm.config import ModelConfig
from hybridlm.convert.bamba import attention_section, mamba_section
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

MODEL_TYPE = "granitemoehybrid"
LAYER_TYPES = {"M": "linear_attention", "*": "full_attention"}
LEGACY_NAMES = (
    (r"block_sparse_moe\.input_linear\.weight$", "block_sparse_moe.experts.gate_up_proj"),
    (r"block_sparse_moe\.output_linear\.weight$", "block_sparse_moe.experts.down_proj"),
    (r"block_sparse_moe\.router\.layer\.weight$", "block_sparse_moe.router.weight"),
)


def can_express(cfg: ModelConfig) -> str | None:
    reasons: list[str] = []
    layers, a, e = cfg.layers, cfg.attention, cfg.moe
    pairs = decoder_layers(layers)
    ffns = {f for _, f in pairs} if pairs else set()
    require(
        pairs is not None and len(ffns) == 1,
        "the pattern must be decoder layers of a mixer (M or *) then the same FFN kind in every layer "
        "(all '-' or all 'E')",
        reasons,
    )
    require_attention(layers, "GraniteMoeHybrid", reasons)
    if "M" in layers:
        require(cfg.mamba.version == 2, "GraniteMoeHybrid's mixer is Mamba-2 (model.mamba.version=2)", reasons)
    if "*" in layers:
        require(
            not a.rope or a.rope_fraction == 1.0, "GraniteMoeHybrid RoPE rotates whole heads (rope_fraction=1)", reasons
        )
        require(a.window is None, "GraniteMoeHybrid attention has no sliding window (model.attention.window)", reasons)
    require(cfg.mlp.activation == "swiglu", f"GraniteMoeHybrid's FFNs are SwiGLU, not {cfg.mlp.activation}", reasons)
    require(not cfg.mlp.bias, "GraniteMoeHybrid's FFNs have no biases (model.mlp.bias)", reasons)
    if "E" in layers:
        require(e.router == "softmax_norm", f"GraniteMoeHybrid routes with softmax_norm, not {e.router}", reasons)
        require(
            e.shared_d_ff > 0, "GraniteMoeHybrid's MoE always has a shared expert (model.moe.shared_d_ff > 0)", reasons
        )
    return "; ".join(reasons) or None


def hf_config(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> GraniteMoeHybridConfig:
    m, a, e = cfg.mamba, cfg.attention, cfg.moe
    pairs = decoder_layers(cfg.layers)
    has_moe = "E" in cfg.layers
    return GraniteMoeHybridConfig(
        **common_hf_kwargs(cfg, dtype),
        hidden_size=cfg.d_model,
        num_hidden_layers=len(pairs),
        layer_types=[LAYER_TYPES[mixer] for mixer, _ in pairs],
        num_attention_heads=a.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim,
        attention_bias=a.bias,
        position_embedding_type="rope" if a.rope else None,
        rope_parameters={"rope_type": "default", "rope_theta": a.rope_theta},
        hidden_act="silu",
        rms_norm_eps=cfg.norm_eps,
        # hybridlm has no multipliers: Granite's are set neutral (the attention one is its softmax scale)
        embedding_multiplier=1.0,
        residual_multiplier=1.0,
        logits_scaling=1.0,
        attention_multiplier=cfg.head_dim**-0.5,
        num_local_experts=e.n_experts if has_moe else 0,
        num_experts_per_tok=e.top_k if has_moe else 1,
        intermediate_size=cfg.expert_d_ff if has_moe else cfg.d_ff,
        shared_intermediate_size=e.shared_d_ff if has_moe else cfg.d_ff,
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
    table = [rename("embed_tokens.weight", "model.embed_tokens.weight"), rename("norm_f.weight", "model.norm.weight")]
    for i, (mixer, ffn) in enumerate(decoder_layers(cfg.layers)):
        hf, first, second = f"model.layers.{i}.", f"layers.{2 * i}.", f"layers.{2 * i + 1}."
        # the shared SwiGLU: our dense MLP, or the MoE's shared expert
        shared = second + ("mixer.shared_expert." if ffn == "E" else "mixer.")
        table += [
            rename(first + "norm.weight", hf + "input_layernorm.weight"),
            rename(second + "norm.weight", hf + "post_attention_layernorm.weight"),
            *same_names(keys, first + "mixer.", hf + ("mamba." if mixer == "M" else "self_attn.")),
            Param((shared + "gate_proj.weight", shared + "up_proj.weight"), hf + "shared_mlp.input_linear.weight"),
            rename(shared + "down_proj.weight", hf + "shared_mlp.output_linear.weight"),
        ]
        if ffn == "E":
            table += [
                rename(second + "mixer.router.weight", hf + "block_sparse_moe.router.weight"),
                *same_names(keys, second + "mixer.experts.", hf + "block_sparse_moe.experts."),
            ]
    return table + head_params(cfg, "lm_head.weight", can_tie=True)


def to_hf(model: HybridLM) -> tuple[GraniteMoeHybridConfig, dict[str, torch.Tensor]]:
    return export_state(model, hf_config, weight_table)


def config_from_hf(c: Any) -> ModelConfig:
    source = "granitemoehybrid config"
    if c.hidden_act != "silu":
        raise ConvertError(f"{source}: hidden_act={c.hidden_act!r}; only 'silu' (SwiGLU, SiLU conv) is supported")
    scale = head_dim_of(c) ** -0.5
    multipliers = {
        "embedding_multiplier": (c.embedding_multiplier, 1.0),
        "residual_multiplier": (c.residual_multiplier, 1.0),
        "logits_scaling": (c.logits_scaling, 1.0),
        "attention_multiplier": (c.attention_multiplier, scale),
    }
    for name, (value, neutral) in multipliers.items():
        if not math.isclose(value, neutral, rel_tol=1e-6):
            raise ConvertError(
                f"{source}: {name}={value}; hybridlm has no such multiplier (only {neutral:g} converts exactly)"
            )
    mixers = ["*" if t in ("full_attention", "attention") else "M" for t in c.layers_block_type]
    has_moe = c.num_local_experts > 0
    pattern = "".join(m + ("E" if has_moe else "-") for m in mixers)
    d: dict[str, Any] = {
        "vocab_size": c.vocab_size,
        "vocab_pad_multiple": pad_multiple_for(c.vocab_size),
        "d_model": c.hidden_size,
        "pattern": pattern,
        "tie_embeddings": bool(c.tie_word_embeddings),
        "norm_eps": c.rms_norm_eps,
        "init_std": c.initializer_range,
        "mlp": {"d_ff": c.intermediate_size if has_moe else c.shared_intermediate_size, "activation": "swiglu"},
    }
    if has_moe:
        d["moe"] = {
            "n_experts": c.num_local_experts,
            "top_k": c.num_experts_per_tok,
            "router": "softmax_norm",
            "shared_d_ff": c.shared_intermediate_size,
        }
    if "M" in pattern:
        d["mamba"] = mamba_section(c, source)
    if "*" in pattern:
        rope = c.position_embedding_type == "rope"
        theta, _ = default_rope(c, source) if rope else (10000.0, 1.0)
        d["attention"] = attention_section(c, rope=rope, theta=theta)
    return build_config(d, source)


def in_memory_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The on-disk names (``input_linear``, ``output_linear``, ``router.layer``) -> transformers' in-memory ones."""
    out = {}
    for key, tensor in state.items():
        for pattern, name in LEGACY_NAMES:
            key = re.sub(pattern, name, key)
        out[key] = tensor
    return out


def from_hf(c: Any, state: dict[str, torch.Tensor]) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    cfg = stored_config(c, config_from_hf(c), hf_config)
    shapes = reference_state(cfg)
    table = weight_table(cfg, list(shapes))
    return cfg, from_hf_state(table, in_memory_names(state), shapes, ignore=(r"^lm_head\.weight$",))
