"""Mamba2 (transformers ``Mamba2ForCausalLM``): a pure Mamba-2 stack, one block (norm + mixer)
per sub-layer; the ``backbone.`` weight layout is Mamba's."""

from __future__ import annotations

from typing import Any

import torch
from transformers import Mamba2Config

from hybridlm.config import ModelConfig
from hybridlm.convert.common import (
    ConvertError,
    build_config,
    common_hf_kwargs,
    export_state,
    from_hf_state,
    pad_multiple_for,
    reference_state,
    stored_config,
)
from hybridlm.convert.mamba import in_memory_names, weight_table
from hybridlm.model import HybridLM

MODEL_TYPE = "mamba2"


def can_express(cfg: ModelConfig) -> str | None:
    if set(cfg.layers) != {"M"}:
        return "Mamba2 is a pure Mamba stack (pattern of M only)"
    if cfg.mamba.version != 2:
        return "this is the Mamba-2 target (model.mamba.version=2; use mamba)"
    return None


def hf_config(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> Mamba2Config:
    m = cfg.mamba
    return Mamba2Config(
        **common_hf_kwargs(cfg, dtype),
        hidden_size=cfg.d_model,
        num_hidden_layers=len(cfg.layers),
        num_heads=cfg.mamba_n_heads,
        head_dim=m.head_dim,
        n_groups=m.ngroups,
        state_size=m.d_state,
        conv_kernel=m.d_conv,
        expand=m.expand,
        chunk_size=m.chunk_size,
        time_step_limit=list(m.dt_limit),
        time_step_min=m.dt_min,
        time_step_max=m.dt_max,
        time_step_floor=m.dt_init_floor,
        use_bias=m.proj_bias,
        use_conv_bias=m.conv_bias,
        hidden_act="silu",
        layer_norm_epsilon=cfg.norm_eps,
        # hybridlm keeps the residual stream in the compute dtype
        residual_in_fp32=False,
        initializer_range=cfg.init_std,
    )


def to_hf(model: HybridLM) -> tuple[Mamba2Config, dict[str, torch.Tensor]]:
    return export_state(model, hf_config, weight_table)


def config_from_hf(c: Any) -> ModelConfig:
    source = "mamba2 config"
    if c.hidden_act != "silu":
        raise ConvertError(f"{source}: hidden_act={c.hidden_act!r}; only 'silu' is supported")
    return build_config(
        {
            "vocab_size": c.vocab_size,
            "vocab_pad_multiple": pad_multiple_for(c.vocab_size),
            "d_model": c.hidden_size,
            "pattern": "M" * c.num_hidden_layers,
            "tie_embeddings": bool(c.tie_word_embeddings),
            "norm_eps": c.layer_norm_epsilon,
            "init_std": c.initializer_range,
            "mamba": {
                "version": 2,
                "d_state": c.state_size,
                "d_conv": c.conv_kernel,
                "expand": c.expand,
                "head_dim": c.head_dim,
                "ngroups": c.n_groups,
                "chunk_size": c.chunk_size,
                "dt_limit": list(c.time_step_limit),
                "dt_min": c.time_step_min,
                "dt_max": c.time_step_max,
                "dt_init_floor": c.time_step_floor,
                "conv_bias": bool(c.use_conv_bias),
                "proj_bias": bool(c.use_bias),
            },
        },
        source,
    )


def from_hf(c: Any, state: dict[str, torch.Tensor]) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    cfg = stored_config(c, config_from_hf(c), hf_config)
    shapes = reference_state(cfg)
    table = weight_table(cfg, list(shapes))
    return cfg, from_hf_state(table, in_memory_names(state), shapes, ignore=(r"^lm_head\.weight$",))
