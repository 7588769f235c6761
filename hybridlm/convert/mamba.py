"""Mamba (transformers ``MambaForCausalLM``): a pure Mamba-1 stack, one block (norm + mixer) per
sub-layer, so hybridlm sub-layer j is HF layer j. Also the table ``mamba2`` reuses."""

from __future__ import annotations

from typing import Any

import torch
from transformers import MambaConfig

from hybridlm.config import ModelConfig
from hybridlm.convert.common import (
    ConvertError,
    Param,
    build_config,
    common_hf_kwargs,
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

MODEL_TYPE = "mamba"


def can_express(cfg: ModelConfig) -> str | None:
    if set(cfg.layers) != {"M"}:
        return "Mamba is a pure Mamba stack (pattern of M only)"
    reasons: list[str] = []
    require(cfg.mamba.version == 1, "this is the Mamba-1 target (model.mamba.version=1; use mamba2)", reasons)
    require(not cfg.mamba.inner_norms, "Mamba has no Δ/B/C norms (model.mamba.inner_norms=false; use jamba)", reasons)
    return "; ".join(reasons) or None


def hf_config(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> MambaConfig:
    m = cfg.mamba
    return MambaConfig(
        **common_hf_kwargs(cfg, dtype),
        hidden_size=cfg.d_model,
        num_hidden_layers=len(cfg.layers),
        state_size=m.d_state,
        conv_kernel=m.d_conv,
        expand=m.expand,
        time_step_rank=cfg.dt_rank,
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


def weight_table(cfg: ModelConfig, keys: list[str]) -> list[Param]:
    """The ``backbone.`` layout shared by transformers' Mamba and Mamba2."""
    return [
        rename("embed_tokens.weight", "backbone.embeddings.weight"),
        rename("norm_f.weight", "backbone.norm_f.weight"),
        *same_names(keys, "layers.", "backbone.layers."),
        *head_params(cfg, "lm_head.weight", can_tie=True),
    ]


def to_hf(model: HybridLM) -> tuple[MambaConfig, dict[str, torch.Tensor]]:
    return export_state(model, hf_config, weight_table)


def config_from_hf(c: Any) -> ModelConfig:
    source = "mamba config"
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
                "version": 1,
                "d_state": c.state_size,
                "d_conv": c.conv_kernel,
                "expand": c.expand,
                "dt_rank": c.time_step_rank,
                "dt_min": c.time_step_min,
                "dt_max": c.time_step_max,
                "dt_init_floor": c.time_step_floor,
                "conv_bias": bool(c.use_conv_bias),
                "proj_bias": bool(c.use_bias),
            },
        },
        source,
    )


def in_memory_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Older checkpoints name the embedding ``backbone.embedding`` (transformers renames it on load)."""
    return {k.replace("backbone.embedding.", "backbone.embeddings."): v for k, v in state.items()}


def from_hf(c: Any, state: dict[str, torch.Tensor]) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    cfg = stored_config(c, config_from_hf(c), hf_config)
    shapes = reference_state(cfg)
    table = weight_table(cfg, list(shapes))
    return cfg, from_hf_state(table, in_memory_names(state), shapes, ignore=(r"^lm_head\.weight$",))
