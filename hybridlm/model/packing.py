"""Per-token document ids of packed rows, turned into what each layer kind needs."""

from __future__ import annotations

import torch


def doc_starts(doc_ids: torch.Tensor) -> torch.Tensor:
    """(batch, seqlen) bool: True where a token starts a new document (never at t=0)."""
    starts = torch.zeros_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return starts


def seq_idx_from_doc_ids(doc_ids: torch.Tensor) -> torch.Tensor:
    """Document index per token counting from 0 in each row (the form the Mamba-2 kernels take)."""
    return torch.cumsum(doc_starts(doc_ids), dim=1).to(torch.int32)


def positions_from_doc_ids(doc_ids: torch.Tensor) -> torch.Tensor:
    """Position of each token within its own document, so RoPE restarts at every document."""
    idx = torch.arange(doc_ids.shape[1], device=doc_ids.device).expand_as(doc_ids)
    start = torch.where(doc_starts(doc_ids), idx, torch.zeros_like(idx))
    return idx - torch.cummax(start, dim=1).values


def doc_ids_from_cu_seqlens(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """(1, total) document ids from cumulative lengths [0, l0, l0+l1, ...] (flash-attn's varlen form)."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    return torch.repeat_interleave(torch.arange(len(lengths), device=cu_seqlens.device), lengths)[None]
