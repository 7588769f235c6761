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
from hybridlm.ops import compiled as _compiled
from hybridlm.ops import conv as _conv
from hybridlm.ops import conv_ssd as _conv_ssd
from hybridlm.ops import layout as _layout
from hybridlm.ops import norm as _norm
from hybridlm.ops import selective as _s6
from hybridlm.ops import shared_input as _shared_input
from hybridlm.ops import ssd as _ssd
from hybridlm.ops.dispatch import choose, kernel_table, reference_kernels, reference_ops, set_kernels

__all__ = [
    "add_rms_norm",
    "attention",
    "causal_conv1d",
    "causal_conv1d_update",
    "conv_ssd_scan",
    "cross_entropy",
    "gated_rms_norm",
    "kernel_table",
    "linears",
    "reference_kernels",
    "reference_ops",
    "rms_norm",
    "rotary",
    "selective_scan",
    "selective_state_update",
    "set_kernels",
    "ssd_scan",
    "swiglu",
    "syncs_host_on_packed_rows",
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


def attention(q, k, v, causal=True, window=None, doc_ids=None, scale=None, query_start=None) -> torch.Tensor:
    """Causal attention with GQA, sliding window and packed documents; (batch, t, heads, head_dim).
    ``query_start`` ((1,) tensor): the queries' position among the keys, for fixed-size KV buffers."""
    choice = choose("attention", q.device)
    if choice == "fused" and (q.dtype not in (torch.float16, torch.bfloat16) or query_start is not None):
        choice = "sdpa"  # flash-attn runs only in half precision and takes no mask
    if choice == "fused":
        return _attn.attention_flash(q, k, v, causal, window, doc_ids, scale)
    impl = _attn.attention_sdpa if choice == "sdpa" else _attn.attention_ref
    return impl(q, k, v, causal, window, doc_ids, scale, query_start)


def rotary(x, positions, inv_freq) -> torch.Tensor:
    """Rotary embedding of (batch, seqlen, heads, head_dim) ``x`` on its first ``2 * len(inv_freq)`` channels."""
    impl = _compiled.rotary_fused if choose("rotary", x.device) == "fused" else _compiled.rotary_ref
    return impl(x, positions, inv_freq)


def syncs_host_on_packed_rows(device: torch.device) -> bool:
    """Whether attention over packed rows on ``device`` reads a device value on the host (flash-attn's
    variable-length call takes the longest document's length as a Python int): a CUDA graph cannot
    capture that. Conservative: flash-attn's fp32 calls, which go to SDPA, count too."""
    return choose("attention", device) == "fused"


def rms_norm(x, weight, eps) -> torch.Tensor:
    impl = _norm.rms_norm_fused if choose("rms_norm", x.device) == "fused" else _norm.rms_norm_ref
    return impl(x, weight, eps)


def gated_rms_norm(x, z, weight, eps, group_size) -> torch.Tensor:
    impl = _norm.gated_rms_norm_fused if choose("gated_rms_norm", x.device) == "fused" else _norm.gated_rms_norm_ref
    return impl(x, z, weight, eps, group_size)


def add_rms_norm(x, residual, weight, eps) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-norm residual step: ``residual + x`` (just ``x`` when ``residual`` is None) and its RMSNorm.
    Returns (normed in ``x``'s dtype, the new residual in ``residual``'s dtype, else ``x``'s)."""
    if choose("add_rms_norm", x.device) == "fused":
        return _compiled.add_rms_norm_fused(x, residual, weight, eps)
    residual = x if residual is None else residual + x.to(residual.dtype)
    return rms_norm(residual, weight, eps).to(x.dtype), residual


def conv_ssd_scan(
    zxbcdt,  # (batch, seqlen, d_inner + conv_channels + nheads): in_proj's [z | x B C | dt]
    conv_weight,  # (conv_channels, width)
    conv_bias,
    dt_bias,
    A,
    D,
    chunk_size: int,
    seq_idx,
    dt_limit,
    norm_weight,
    norm_eps: float,
    headdim: int,
    ngroups: int,
    return_final_states: bool = False,
):
    """Mamba-2's mixer between its two projections: causal conv + SiLU on ``xBC``, the SSD scan, then
    the gated RMSNorm ``norm(y * silu(z))`` per group; (batch, seqlen, d_inner). With
    ``return_final_states`` (prefill) also the SSM state after the last token, (batch, nheads, headdim, d_state)."""
    args = (zxbcdt, conv_weight, conv_bias, dt_bias, A, D, chunk_size, seq_idx, dt_limit, norm_weight, norm_eps)
    # The fused kernel indexes zxbcdt with int32 offsets (past 2**31 elements the unfused ops copy the
    # slices), and it serves training: prefill keeps the separately fused conv and scan it has always used.
    fused = choose("conv_ssd_scan", zxbcdt.device) == "fused" and zxbcdt.numel() < _layout.INT32_LIMIT
    if fused and not return_final_states:
        return _conv_ssd.conv_ssd_scan_fused(*args, headdim, ngroups)
    d_inner, nheads = norm_weight.shape[0], A.shape[0]
    d_state = (conv_weight.shape[0] - d_inner) // ngroups // 2
    z, xBC, dt = zxbcdt.split([d_inner, conv_weight.shape[0], nheads], dim=-1)
    xBC = causal_conv1d(xBC.transpose(1, 2), conv_weight, conv_bias, "silu", seq_idx).transpose(1, 2)
    x, B, C = xBC.split([d_inner, ngroups * d_state, ngroups * d_state], dim=-1)
    out = ssd_scan(
        x.unflatten(-1, (nheads, headdim)),
        dt,
        A,
        B.unflatten(-1, (ngroups, d_state)),
        C.unflatten(-1, (ngroups, d_state)),
        chunk_size,
        D=D,
        dt_bias=dt_bias,
        dt_limit=dt_limit,
        seq_idx=seq_idx,
        return_final_states=return_final_states,
    )
    y, final_states = out if return_final_states else (out, None)
    y = gated_rms_norm(y.flatten(-2), z, norm_weight, norm_eps, d_inner // ngroups)
    return (y, final_states) if return_final_states else y


def swiglu(gate, up) -> torch.Tensor:
    """``silu(gate) * up``, the gated MLP's activation."""
    impl = _compiled.swiglu_fused if choose("swiglu", gate.device) == "fused" else _compiled.swiglu_ref
    return impl(gate, up)


def linears(x: torch.Tensor, layers) -> tuple[torch.Tensor, ...]:
    """Each of ``layers`` (linear layers) applied to ``x``. Fused: one op whose backward adds the products that
    make ``x``'s gradient inside their GEMMs; layers other than a plain ``nn.Linear`` (peft's LoRA layers, a
    layer with hooks, as under ZeRO-3) run as modules."""
    if choose("linears", x.device) == "fused" and all(_shared_input.plain_linear(m) for m in layers):
        return _shared_input.shared_input_linears(x, [m.weight for m in layers], [m.bias for m in layers])
    return tuple(m(x) for m in layers)


def cross_entropy(logits, targets, ignore_index: int = -100) -> torch.Tensor:
    """Summed cross-entropy in fp32 of (tokens, vocab) ``logits`` against (tokens,) ``targets``."""
    if choose("cross_entropy", logits.device) == "fused":
        from hybridlm.ops.triton_cross_entropy import cross_entropy_triton  # imports triton: CUDA only

        return cross_entropy_triton(logits, targets, ignore_index)
    return _compiled.cross_entropy_ref(logits, targets, ignore_index)
