"""mamba_ssm's ``MambaLMHeadModel`` checkpoints (weights import only): ``config.json`` with ``d_model``,
``n_layer``, ``ssm_cfg``, ``attn_layer_idx``, ``attn_cfg``, ``d_intermediate`` and weights named
``backbone.embedding``, ``backbone.layers.{i}.{norm,mixer,norm2,mlp}``, ``backbone.norm_f``.

A mamba_ssm block is norm + mixer (Mamba-1, Mamba-2, or attention at ``attn_layer_idx``), plus
norm2 + a gated MLP when ``d_intermediate > 0``: block i is hybridlm sub-layer i, or sub-layers
2i (mixer) and 2i+1 (MLP). Attention packs q, k, v in ``mixer.in_proj``; the MLP's ``fc1`` packs
[value | gate] (``y, gate = fc1(x).chunk(2); y * silu(gate)``).

``raw_config`` maps the other way, config only: it builds mamba_ssm's own model with a hybridlm config's
dimensions (``hybridlm bench``'s anchor).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from hybridlm.config import ModelConfig
from hybridlm.convert.common import (
    ConvertError,
    Param,
    build_config,
    decoder_layers,
    from_hf_state,
    head_params,
    reference_state,
    rename,
    same_names,
)

MODEL_TYPE = "mamba_ssm"
NORM_EPS = 1e-5  # mamba_ssm's norm_epsilon default, used by every norm of the model
# mamba_ssm options hybridlm implements only at their default value
MAMBA2_FIXED = {"D_has_hdim": False, "rmsnorm": True, "norm_before_gate": False}
ATTENTION_FIXED = {"mlp_dim": 0, "d_conv": 0, "rotary_emb_interleaved": False, "causal": True, "softmax_scale": None}


def is_mamba_ssm_config(raw: dict[str, Any]) -> bool:
    return "d_model" in raw and "n_layer" in raw


def config_from_raw(raw: dict[str, Any], state: dict[str, torch.Tensor]) -> ModelConfig:
    source = "mamba_ssm config"
    if not raw.get("rms_norm", True):
        raise ConvertError(f"{source}: rms_norm=false (LayerNorm) is not supported; hybridlm uses RMSNorm")
    n_layers, d_model = raw["n_layer"], raw["d_model"]
    attn_idx = set(raw.get("attn_layer_idx") or [])
    has_mlp = raw.get("d_intermediate", 0) > 0
    pattern = "".join(("*" if i in attn_idx else "M") + ("-" if has_mlp else "") for i in range(n_layers))
    d: dict[str, Any] = {
        "vocab_size": raw["vocab_size"],
        "vocab_pad_multiple": raw.get("pad_vocab_size_multiple", 8),
        "d_model": d_model,
        "pattern": pattern,
        "tie_embeddings": raw.get("tie_embeddings", True),
        "norm_eps": raw.get("norm_epsilon", NORM_EPS),
    }
    if "M" in pattern:
        d["mamba"] = mamba_section(raw.get("ssm_cfg") or {}, d_model, source)
    if "*" in pattern:
        d["attention"] = attention_section(raw.get("attn_cfg") or {}, d_model, source)
    if has_mlp:
        # GatedMLP rounds d_intermediate up to a multiple of 128: the weights say the real width
        fc1 = next(v for k, v in state.items() if k.endswith(".mlp.fc1.weight"))
        d["mlp"] = {"d_ff": fc1.shape[0] // 2, "activation": "swiglu"}
    return build_config(d, source)


def can_express(cfg: ModelConfig) -> str | None:
    """Why ``raw_config`` cannot describe ``cfg``, or None: mamba_ssm's hybrid is decoder layers of a Mamba-2 or
    attention mixer, each followed by a SwiGLU MLP."""
    pairs = decoder_layers(cfg.layers)
    if pairs is None or any(ffn != "-" for _, ffn in pairs) or "M" in cfg.layers and cfg.mamba.version != 2:
        return "mamba_ssm's hybrid is decoder layers of Mamba-2 or attention then a dense MLP"
    if cfg.mlp.activation != "swiglu":
        return f"mamba_ssm's MLP is gated with SiLU, not mlp.activation={cfg.mlp.activation!r}"
    return None


def raw_config(cfg: ModelConfig, rotary_dim: int | None = None) -> dict[str, Any]:
    """mamba_ssm's ``MambaConfig`` fields for ``cfg`` (see ``can_express``); the inverse of ``config_from_raw``.
    ``rotary_dim`` overrides the attention's rotary width (mamba_ssm rotates through flash_attn only)."""
    if reason := can_express(cfg):
        raise ConvertError(reason)
    m, a = cfg.mamba, cfg.attention
    pairs = decoder_layers(cfg.layers)
    return {
        "d_model": cfg.d_model,
        "d_intermediate": cfg.d_ff,
        "n_layer": len(pairs),
        "vocab_size": cfg.vocab_size,
        "ssm_cfg": {
            "layer": "Mamba2",
            "d_state": m.d_state,
            "d_conv": m.d_conv,
            "expand": m.expand,
            "headdim": m.head_dim,
            "ngroups": m.ngroups,
            "chunk_size": m.chunk_size,
        },
        "attn_layer_idx": [i for i, (mixer, _) in enumerate(pairs) if mixer == "*"],
        "attn_cfg": {
            "num_heads": a.n_heads,
            "num_heads_kv": cfg.n_kv_heads,
            "head_dim": cfg.head_dim,
            "rotary_emb_dim": cfg.rotary_dim if rotary_dim is None else rotary_dim,
            "rotary_emb_base": a.rope_theta,
            "qkv_proj_bias": a.bias,
            "out_proj_bias": a.bias,
            "causal": True,
        },
        "rms_norm": True,
        "residual_in_fp32": True,
        "fused_add_norm": True,
        "pad_vocab_size_multiple": cfg.vocab_pad_multiple,
        "tie_embeddings": cfg.tie_embeddings,
    }


def mamba_section(ssm: dict[str, Any], d_model: int, source: str) -> dict[str, Any]:
    expand = ssm.get("expand", 2)
    common = {
        "d_conv": ssm.get("d_conv", 4),
        "expand": expand,
        "conv_bias": ssm.get("conv_bias", True),
        "proj_bias": ssm.get("bias", False),
    }
    if ssm.get("layer", "Mamba1") == "Mamba1":
        dt_rank = ssm.get("dt_rank", "auto")
        return {
            **common,
            "version": 1,
            "d_state": ssm.get("d_state", 16),
            "dt_rank": None if dt_rank == "auto" else dt_rank,
            "dt_min": ssm.get("dt_min", 0.001),
            "dt_max": ssm.get("dt_max", 0.1),
            "dt_init_floor": ssm.get("dt_init_floor", 1e-4),
        }
    require_defaults(ssm, MAMBA2_FIXED, "ssm_cfg", source)
    if ssm.get("d_ssm") not in (None, expand * d_model):
        raise ConvertError(
            f"{source}: ssm_cfg.d_ssm={ssm['d_ssm']} (an SSM narrower than expand * d_model) is not supported"
        )
    return {
        **common,
        "version": 2,
        "d_state": ssm.get("d_state", 128),
        "head_dim": ssm.get("headdim", 64),
        "ngroups": ssm.get("ngroups", 1),
        "chunk_size": ssm.get("chunk_size", 256),
        "dt_limit": list(ssm.get("dt_limit", (0.0, math.inf))),
        "dt_min": ssm.get("dt_min", 0.001),
        "dt_max": ssm.get("dt_max", 0.1),
        "dt_init_floor": ssm.get("dt_init_floor", 1e-4),
    }


def attention_section(attn: dict[str, Any], d_model: int, source: str) -> dict[str, Any]:
    n_heads = attn["num_heads"]
    head_dim = attn.get("head_dim") or d_model // n_heads
    require_defaults(attn, ATTENTION_FIXED, "attn_cfg", source)
    qkv_bias, out_bias = attn.get("qkv_proj_bias", True), attn.get("out_proj_bias", True)
    if qkv_bias != out_bias:
        raise ConvertError(f"{source}: attn_cfg.qkv_proj_bias={qkv_bias} and out_proj_bias={out_bias} must agree")
    rotary_dim = attn.get("rotary_emb_dim", 0)
    return {
        "n_heads": n_heads,
        "n_kv_heads": attn.get("num_heads_kv") or n_heads,
        "head_dim": head_dim,
        "rope": rotary_dim > 0,
        "rope_theta": float(attn.get("rotary_emb_base", 10000.0)),
        "rope_fraction": rotary_dim / head_dim if rotary_dim else 1.0,
        "bias": qkv_bias,
    }


def require_defaults(section: dict[str, Any], fixed: dict[str, Any], name: str, source: str) -> None:
    """Refuse a mamba_ssm option set away from the one value hybridlm implements (its default)."""
    for key, needed in fixed.items():
        if section.get(key, needed) != needed:
            raise ConvertError(f"{source}: {name}.{key}={section[key]} is not supported (only {needed})")


def weight_table(cfg: ModelConfig, keys: list[str]) -> list[Param]:
    table = [
        rename("embed_tokens.weight", "backbone.embedding.weight"),
        rename("norm_f.weight", "backbone.norm_f.weight"),
    ]
    has_mlp = "-" in cfg.layers
    mixers = cfg.layers.replace("-", "")
    for i, kind in enumerate(mixers):
        j = 2 * i if has_mlp else i
        ours, theirs = f"layers.{j}.", f"backbone.layers.{i}."
        table.append(rename(ours + "norm.weight", theirs + "norm.weight"))
        if kind == "M":
            table += same_names(keys, ours + "mixer.", theirs + "mixer.")
        else:
            for suffix in ("weight", "bias") if cfg.attention.bias else ("weight",):
                qkv = tuple(f"{ours}mixer.{p}_proj.{suffix}" for p in "qkv")
                table += [
                    Param(qkv, f"{theirs}mixer.in_proj.{suffix}"),
                    rename(f"{ours}mixer.o_proj.{suffix}", f"{theirs}mixer.out_proj.{suffix}"),
                ]
        if has_mlp:
            mlp = f"layers.{j + 1}."
            table += [
                rename(mlp + "norm.weight", theirs + "norm2.weight"),
                Param((mlp + "mixer.up_proj.weight", mlp + "mixer.gate_proj.weight"), theirs + "mlp.fc1.weight"),
                rename(mlp + "mixer.down_proj.weight", theirs + "mlp.fc2.weight"),
            ]
    return table + head_params(cfg, "lm_head.weight", can_tie=True)


def from_hf(raw: dict[str, Any], state: dict[str, torch.Tensor]) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    cfg = config_from_raw(raw, state)
    shapes = reference_state(cfg)
    table = weight_table(cfg, list(shapes))
    return cfg, from_hf_state(table, state, shapes, ignore=(r"^lm_head\.weight$",))
