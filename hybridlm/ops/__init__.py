"""Every compute kernel the model uses, each as a pure-PyTorch reference and a fused path.

Layers call these functions; ``hybridlm.ops.dispatch`` decides which implementation runs.
This package is the only place that imports mamba_ssm, causal_conv1d or flash_attn.
"""

from __future__ import annotations

import functools
import math
import warnings

import torch

from hybridlm.ops import attn as _attn
from hybridlm.ops import conv as _conv
from hybridlm.ops import norm as _norm
from hybridlm.ops import selective as _s6
from hybridlm.ops import ssd as _ssd
from hybridlm.ops.dispatch import choose, kernel_table, reference_kernels, set_kernels

__all__ = [
    "attention",
    "causal_conv1d",
    "causal_conv1d_update",
    "gated_rms_norm",
    "kernel_table",
    "reference_kernels",
    "rms_norm",
    "selective_scan",
    "selective_state_update",
    "set_kernels",
    "ssd_scan",
]


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, reset=None, return_last_state=False):
    """Mamba-1 scan; see ``selective.selective_scan_ref`` for shapes."""
    fused = choose("selective_scan", u.device) == "fused"
    if fused and reset is not None:
        _warn_once(
            "the fused Mamba-1 selective scan (mamba_ssm) cannot restart its state inside a row: packed documents "
            "leak state into the next document in Mamba-1 layers (attention, conv and Mamba-2 stay isolated). "
            "Set kernels: reference for exact isolation, or pack one document per row."
        )
    impl = _s6.selective_scan_fused if fused else _s6.selective_scan_ref
    return impl(u, delta, A, B, C, D, z, delta_bias, reset, return_last_state)


@functools.cache
def _warn_once(message: str) -> None:
    warnings.warn(message, stacklevel=3)


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None) -> torch.Tensor:
    """One-token SSM step for Mamba-1 and Mamba-2; updates ``state`` in place."""
    fused = choose("selective_state_update", x.device) == "fused"
    impl = _s6.selective_state_update_fused if fused else _s6.selective_state_update_ref
    return impl(state, x, dt, A, B, C, D, z, dt_bias)


def ssd_scan(
    x,
    dt,
    A,
    B,
    C,
    chunk_size,
    D=None,
    z=None,
    dt_bias=None,
    dt_limit=(0.0, math.inf),
    seq_idx=None,
    initial_states=None,
    return_final_states=False,
):
    """Mamba-2 chunked SSD scan; see ``ssd.ssd_scan_ref`` for shapes."""
    impl = _ssd.ssd_scan_fused if choose("ssd_scan", x.device) == "fused" else _ssd.ssd_scan_ref
    return impl(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_limit, seq_idx, initial_states, return_final_states)


def causal_conv1d(x, weight, bias=None, activation="silu", seq_idx=None) -> torch.Tensor:
    impl = _conv.causal_conv1d_fused if choose("causal_conv1d", x.device) == "fused" else _conv.causal_conv1d_ref
    return impl(x, weight, bias, activation, seq_idx)


def causal_conv1d_update(x, conv_state, weight, bias=None, activation="silu") -> torch.Tensor:
    fused = choose("causal_conv1d_update", x.device) == "fused"
    impl = _conv.causal_conv1d_update_fused if fused else _conv.causal_conv1d_update_ref
    return impl(x, conv_state, weight, bias, activation)


def attention(q, k, v, causal=True, window=None, doc_ids=None, scale=None) -> torch.Tensor:
    """Causal attention with GQA, sliding window and packed documents; (batch, t, heads, head_dim)."""
    choice = choose("attention", q.device)
    if choice == "fused" and q.dtype not in (torch.float16, torch.bfloat16):
        choice = "sdpa"  # flash-attn runs only in half precision
    impl = {"fused": _attn.attention_flash, "sdpa": _attn.attention_sdpa, "reference": _attn.attention_ref}[choice]
    return impl(q, k, v, causal, window, doc_ids, scale)


def rms_norm(x, weight, eps) -> torch.Tensor:
    impl = _norm.rms_norm_fused if choose("rms_norm", x.device) == "fused" else _norm.rms_norm_ref
    return impl(x, weight, eps)


def gated_rms_norm(x, z, weight, eps, group_size) -> torch.Tensor:
    impl = _norm.gated_rms_norm_fused if choose("gated_rms_norm", x.device) == "fused" else _norm.gated_rms_norm_ref
    return impl(x, z, weight, eps, group_size)
