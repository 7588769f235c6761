"""Memory layouts the fused kernels read and write: int32 guards, document ids' strides, per-split partial sums."""

from __future__ import annotations

import torch

INT32_LIMIT = 2**31  # mamba_ssm's Triton kernels and causal_conv1d compute element offsets in int32


def int32_addressable(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` itself if every element it views lies within 2**31 elements of its storage's start, else a
    compact copy: a slice of a large projection output (dt inside in_proj's (16, 32768, 4384) output, say)
    otherwise makes the kernels read out of bounds."""
    if t is None:
        return t
    last = t.storage_offset() + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride(), strict=True))
    return t if last < INT32_LIMIT else t.contiguous()


def int32_seq_idx(seq_idx: torch.Tensor | None) -> torch.Tensor | None:
    """Document ids as the kernels read them: contiguous int32 (the model passes them in any integer dtype)."""
    return None if seq_idx is None else seq_idx.to(torch.int32).contiguous()


def sum_splits(t: torch.Tensor) -> torch.Tensor:
    """A kernel's per-split partial sums (axis 2: each split of a group's heads wrote its own) summed: a view of the
    only split where there is one."""
    return t.squeeze(2) if t.shape[2] == 1 else t.sum(2)


def seq_idx_strides(seq_idx: torch.Tensor | None) -> tuple[int, int]:
    """Document ids' strides as a Triton kernel takes them, (0, 0) without documents."""
    return (seq_idx.stride(0), seq_idx.stride(1)) if seq_idx is not None else (0, 0)
