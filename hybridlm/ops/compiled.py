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


def rotary_fused(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    # eager, the rotation is ~10 kernels each way over strided halves of q and k
    return compiled(rotary_ref)(x, positions, inv_freq)


def cross_entropy_fused(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    # the fp32 upcast is fused into the log-softmax: no fp32 copy of the logits is stored. The fused path of
    # ops.cross_entropy until hybridlm's own kernels (ops/triton_cross_entropy.py) measured faster; kept as their
    # comparison in benchmarks/op_variants.py
    return compiled(cross_entropy_ref)(logits, targets, ignore_index)
