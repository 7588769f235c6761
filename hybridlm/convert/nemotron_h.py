"""Nemotron-H (transformers ``NemotronHForCausalLM``): one block per sub-layer, any string of
Mamba-2 (M), attention without positional encoding (*), non-gated MLP (-) and MoE (E) with a
sigmoid router and an always-on shared expert. The same layout as hybridlm's pattern, so
sub-layer j is HF layer j.

On disk (what ``save_pretrained`` writes and published checkpoints hold) the prefix is
``backbone.`` and experts are stored one module each; transformers merges them into 3-D tensors
on load, and ``from_hf`` accepts either form.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
from transformers import NemotronHConfig

from hybridlm.config import ModelConfig
from hybridlm.convert.common import (
    ConvertError,
    Param,
    build_config,
    common_hf_kwargs,
    from_hf_state,
    head_params,
    pad_multiple_for,
    reference_state,
    rename,
    require,
    require_attention,
    stored_config,
    to_hf_state,
)
from hybridlm.model import HybridLM

MODEL_TYPE = "nemotron_h"
BLOCK_TYPES = {"M": "linear_attention", "*": "full_attention", "-": "mlp", "E": "moe"}
ACTIVATIONS = ("relu2", "gelu")  # non-gated activations with the same name in ACT2FN
# our MoE names -> Nemotron-H's
MOE_NAMES = ((".router.weight", ".gate.weight"), (".router.expert_bias", ".gate.e_score_correction_bias"))
MOE_PREFIXES = ((".shared_expert.", ".shared_experts."),)


def can_express(cfg: ModelConfig) -> str | None:
    reasons: list[str] = []
    layers, m, a, e = cfg.layers, cfg.mamba, cfg.attention, cfg.moe
    require_attention(layers, "Nemotron-H", reasons)
    if "M" in layers:
        require(m.version == 2, "Nemotron-H's mixer is Mamba-2 (model.mamba.version=2)", reasons)
        require(
            math.isinf(m.dt_limit[1]),
            f"Nemotron-H clamps the time step only from below, model.mamba.dt_limit={list(m.dt_limit)} from above",
            reasons,
        )
    if "*" in layers:
        require(
            not a.rope, "Nemotron-H attention has no positional encoding (needs model.attention.rope=false)", reasons
        )
        require(a.window is None, "Nemotron-H attention has no sliding window (model.attention.window)", reasons)
        require(not a.bias, "Nemotron-H attention has no biases (model.attention.bias)", reasons)
    if "-" in layers or "E" in layers:
        require(
            cfg.mlp.activation in ACTIVATIONS,
            f"Nemotron-H's MLPs are non-gated relu2/gelu, not model.mlp.activation={cfg.mlp.activation}",
            reasons,
        )
    if "E" in layers:
        require(e.router == "sigmoid", f"Nemotron-H routes with model.moe.router=sigmoid, not {e.router}", reasons)
        require(e.shared_d_ff > 0, "Nemotron-H's MoE always has a shared expert (model.moe.shared_d_ff > 0)", reasons)
    return "; ".join(reasons) or None


def hf_config(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> NemotronHConfig:
    m, a, e = cfg.mamba, cfg.attention, cfg.moe
    return NemotronHConfig(
        # transformers' Nemotron-H never ties the head: it is exported as a copy of the embedding
        **{**common_hf_kwargs(cfg, dtype), "tie_word_embeddings": False},
        hidden_size=cfg.d_model,
        layers_block_type=[BLOCK_TYPES[k] for k in cfg.layers],
        num_attention_heads=a.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim,
        attention_bias=False,
        intermediate_size=cfg.d_ff,
        mlp_hidden_act=cfg.mlp.activation,
        mlp_bias=cfg.mlp.bias,
        ssm_state_size=m.d_state,
        mamba_num_heads=cfg.mamba_n_heads,
        mamba_head_dim=m.head_dim,
        mamba_hidden_act="silu",
        n_groups=m.ngroups,
        conv_kernel=m.d_conv,
        expand=m.expand,
        # the mixer clamps the time step to (time_step_min, inf): time_step_min carries our lower limit
        time_step_min=m.dt_limit[0],
        time_step_max=m.dt_max,
        time_step_floor=m.dt_init_floor,
        time_step_limit=list(m.dt_limit),
        use_conv_bias=m.conv_bias,
        chunk_size=m.chunk_size,
        use_bias=m.proj_bias,
        mamba_proj_bias=m.proj_bias,
        n_routed_experts=e.n_experts,
        num_experts_per_tok=e.top_k,
        moe_intermediate_size=cfg.expert_d_ff,
        moe_shared_expert_intermediate_size=e.shared_d_ff,
        n_shared_experts=1,
        routed_scaling_factor=e.scale,
        n_group=e.n_groups,
        topk_group=e.topk_groups,
        norm_topk_prob=True,
        layer_norm_epsilon=cfg.norm_eps,
        residual_in_fp32=False,
        initializer_range=cfg.init_std,
    )


def hf_name(key: str) -> str:
    """Our ``layers.{j}.…`` key -> Nemotron-H's in-memory name."""
    name = "model." + key
    for ours, theirs in MOE_NAMES:
        if name.endswith(ours):
            name = name[: -len(ours)] + theirs
    for ours, theirs in MOE_PREFIXES:
        name = name.replace(ours, theirs)
    return name


def weight_table(cfg: ModelConfig, keys: list[str]) -> list[Param]:
    table = [rename("embed_tokens.weight", "model.embeddings.weight"), rename("norm_f.weight", "model.norm_f.weight")]
    table += [rename(k, hf_name(k)) for k in keys if k.startswith("layers.")]
    return table + head_params(cfg, "lm_head.weight", can_tie=False)


def to_hf(model: HybridLM) -> tuple[NemotronHConfig, dict[str, torch.Tensor]]:
    state = model.state_dict()
    config = hf_config(model.cfg, model.embed_tokens.weight.dtype)
    hf_state = to_hf_state(weight_table(model.cfg, list(state)), state)
    if model.cfg.tie_embeddings:  # a tied head is written as its own tensor (safetensors refuses shared storage)
        hf_state["lm_head.weight"] = hf_state["lm_head.weight"].clone()
    return config, hf_state


def config_from_hf(c: Any, tie: bool) -> ModelConfig:
    source = "nemotron_h config"
    pattern = "".join({v: k for k, v in BLOCK_TYPES.items()}[t] for t in c.layers_block_type)
    d: dict[str, Any] = {
        "vocab_size": c.vocab_size,
        "vocab_pad_multiple": pad_multiple_for(c.vocab_size),
        "d_model": c.hidden_size,
        "pattern": pattern,
        "tie_embeddings": tie,
        "norm_eps": c.layer_norm_epsilon,
        "init_std": c.initializer_range,
    }
    if "M" in pattern:
        d_inner = c.mamba_num_heads * c.mamba_head_dim
        if c.mamba_hidden_act != "silu" or d_inner % c.hidden_size:
            raise ConvertError(
                f"{source}: mamba_hidden_act={c.mamba_hidden_act!r} must be 'silu' and mamba_num_heads * "
                f"mamba_head_dim = {d_inner} a multiple of hidden_size={c.hidden_size}"
            )
        d["mamba"] = {
            "version": 2,
            "d_state": c.ssm_state_size,
            "d_conv": c.conv_kernel,
            "expand": d_inner // c.hidden_size,
            "head_dim": c.mamba_head_dim,
            "ngroups": c.n_groups,
            "chunk_size": c.chunk_size,
            "dt_limit": [c.time_step_min, math.inf],
            "dt_max": c.time_step_max,
            "dt_init_floor": c.time_step_floor,
            "conv_bias": bool(c.use_conv_bias),
            "proj_bias": bool(c.use_bias),
        }
    if "*" in pattern:
        if c.sliding_window is not None:
            raise ConvertError(f"{source}: sliding_window={c.sliding_window} is not supported")
        d["attention"] = {
            "n_heads": c.num_attention_heads,
            "n_kv_heads": c.num_key_value_heads,
            "head_dim": c.head_dim,
            "rope": False,
        }
    if "-" in pattern or "E" in pattern:
        if c.mlp_hidden_act not in ACTIVATIONS:
            raise ConvertError(f"{source}: mlp_hidden_act={c.mlp_hidden_act!r}; supported: {', '.join(ACTIVATIONS)}")
        d["mlp"] = {"d_ff": c.intermediate_size, "activation": c.mlp_hidden_act, "bias": bool(c.mlp_bias)}
    if "E" in pattern:
        if c.moe_latent_size is not None or not c.norm_topk_prob:
            raise ConvertError(
                f"{source}: moe_latent_size={c.moe_latent_size} and norm_topk_prob={c.norm_topk_prob} "
                "are not supported (need null and true)"
            )
        d["moe"] = {
            "n_experts": c.n_routed_experts,
            "top_k": c.num_experts_per_tok,
            "d_ff": c.moe_intermediate_size,
            "router": "sigmoid",
            "n_groups": c.n_group,
            "topk_groups": c.topk_group,
            "scale": float(c.routed_scaling_factor),
            "shared_d_ff": c.moe_shared_expert_intermediate_size,
        }
    return build_config(d, source)


def in_memory_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The on-disk layout (``backbone.``, one module per expert) -> transformers' in-memory one."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[int, torch.Tensor]] = {}
    for key, tensor in state.items():
        key = re.sub(r"^backbone\.", "model.", key)
        match = re.match(r"(.*\.experts)\.(\d+)\.(up_proj|down_proj)\.weight$", key)
        if match:
            experts.setdefault(f"{match[1]}.{match[3]}", {})[int(match[2])] = tensor
        else:
            out[key] = tensor
    for key, by_index in experts.items():
        out[key] = torch.stack([by_index[i] for i in sorted(by_index)])
    return out


def from_hf(c: Any, state: dict[str, torch.Tensor]) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    state = in_memory_names(state)
    head, embed = state.get("lm_head.weight"), state.get("model.embeddings.weight")
    # transformers cannot tie this head; a head equal to the embedding was tied when trained here
    tie = head is None or (embed is not None and torch.equal(head, embed))
    cfg = stored_config(c, config_from_hf(c, tie), hf_config)
    shapes = reference_state(cfg)
    table = weight_table(cfg, list(shapes))
    return cfg, from_hf_state(table, state, shapes, ignore=(r"^mtp\.",))
