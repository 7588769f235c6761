"""Element-wise chains and row reductions fused by ``torch.compile``: Inductor turns each into one Triton
kernel forward and one or two backward, where eager PyTorch launches a kernel per op and stores every
intermediate.
Compiled lazily on first use, so importing hybridlm never starts the compiler."""

from __future__ import annotations

from functools import cache

import torch
import torch.nn.functional as F

from hybridlm.ops.norm import rms_norm_ref


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def cross_entropy_ref(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Summed next-token cross-entropy in fp32 over rows of ``logits`` (tokens, vocab)."""
    return F.cross_entropy(logits.float(), targets, ignore_index=ignore_index, reduction="sum")


@cache
def compiled(fn):
    # Dynamo compiles a function once per grad mode, dtype mix, None-or-tensor argument and (once) for
    # dynamic shapes, and runs it eagerly past 8 such variants: a process that trains, evaluates and
    # generates, or the test suite's many models, needs more (the limit is global; this only raises it).
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return torch.compile(fn)


def swiglu_fused(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return compiled(swiglu_ref)(gate, up)


def add_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``residual + x`` (``x`` when ``residual`` is None) and its RMSNorm in ``x``'s dtype."""
    residual = x if residual is None else residual + x.to(residual.dtype)
    return rms_norm_ref(residual, weight, eps).to(x.dtype), residual


def add_rms_norm_fused(x, residual, weight, eps) -> tuple[torch.Tensor, torch.Tensor]:
    # Inductor's kernels beat mamba_ssm's Triton add + RMSNorm 1.7x at d_model 1024 (its backward is the
    # slow part): benchmarks/op_variants.py
    return compiled(add_rms_norm_ref)(x, residual, weight, eps)


def rotary_ref(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``x`` (batch, seqlen, heads, head_dim) at ``positions`` ((batch, seqlen) or (seqlen,))
    on its first ``2 * len(inv_freq)`` channels (the rest pass through), rotating halves (transformers'
    ``rotate_half`` convention)."""
    dim = 2 * inv_freq.shape[0]
    freqs = positions.float()[..., None] * inv_freq  # (..., seqlen, dim/2)
    emb = torch.cat([freqs, freqs], dim=-1)[..., None, :]  # broadcast over heads
    cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
    x_rot, x_pass = x[..., :dim], x[..., dim:]
    x1, x2 = x_rot.chunk(2, dim=-1)
    rotated = x_rot * cos + torch.cat([-x2, x1], dim=-1) * sin
    return torch.cat([rotated, x_pass], dim=-1)


def rotary_table(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin in fp32 of each position's angles, (..., seqlen, 1, len(inv_freq)): one row per token,
    broadcast over the heads."""
    angles = positions.float()[..., None, None] * inv_freq
    return angles.cos(), angles.sin()


def rotary_apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``rotary_ref``'s rotation of ``x`` (batch, seqlen, heads, head_dim) given its angles' cos and sin (from
    ``rotary_table``), computed in fp32 and rounded once."""
    half = cos.shape[-1]
    x1, x2, x_pass = x[..., :half].float(), x[..., half : 2 * half].float(), x[..., 2 * half :]
    return torch.cat([(x1 * cos - x2 * sin).to(x.dtype), (x2 * cos + x1 * sin).to(x.dtype), x_pass], dim=-1)


def rotary_fused(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    # Eager, the rotation is ~10 kernels each way over strided halves of q and k. Compiled as one function,
    # Inductor computed the cos and sin inside the rotation's kernels, for every element of every head, forward
    # and backward: fp32 sin / cos made those kernels compute-bound (95 and 215 us a call at 8x4096, 1.4 TB/s).
    # The table is its own compiled kernel, one row per token, so the rotation only moves bytes.
    cos, sin = compiled(rotary_table)(positions, inv_freq)
    return compiled(rotary_apply)(x, cos, sin)


def cross_entropy_fused(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    # the fp32 upcast is fused into the log-softmax: no fp32 copy of the logits is stored. The fused path of
    # ops.cross_entropy until hybridlm's own kernels (ops/triton_cross_entropy.py) measured faster; kept as their
    # comparison in benchmarks/op_variants.py
    return compiled(cross_entropy_ref)(logits, targets, ignore_index)
