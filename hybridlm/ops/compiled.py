"""Element-wise chains fused by ``torch.compile``: Inductor turns each into one Triton kernel forward
and one backward, where eager PyTorch launches a kernel per op and stores every intermediate.
Compiled lazily on first use, so importing hybridlm never starts the compiler."""

from __future__ import annotations

from functools import cache

import torch
import torch.nn.functional as F


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def cross_entropy_ref(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Summed next-token cross-entropy in fp32 over rows of ``logits`` (tokens, vocab)."""
    return F.cross_entropy(logits.float(), targets, ignore_index=ignore_index, reduction="sum")


@cache
def _compiled(fn):
    return torch.compile(fn)  # a second shape recompiles once with dynamic shapes


def swiglu_fused(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return _compiled(swiglu_ref)(gate, up)


def cross_entropy_fused(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    # the fp32 upcast is fused into the log-softmax: no fp32 copy of the logits is stored
    return _compiled(cross_entropy_ref)(logits, targets, ignore_index)
