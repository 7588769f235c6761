"""Causal attention (MHA/GQA, sliding window, packed documents): reference, SDPA and flash-attn.

Queries are aligned to the end of the keys, so the same call serves training (tq == tk),
prefill and one-token decoding against a KV cache. ``query_start`` (a (1,) tensor) places them
elsewhere: decoding into a fixed-size KV buffer (CUDA graphs) masks the unfilled keys after them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attention_mask(
    tq: int,
    tk: int,
    device: torch.device,
    causal: bool = True,
    window: int | None = None,
    doc_ids: torch.Tensor | None = None,
    query_start: torch.Tensor | None = None,  # (1,): position of the first query; None = tk - tq
) -> torch.Tensor:
    """Boolean mask (batch or 1, 1, tq, tk): True where a query may attend to a key."""
    start = tk - tq if query_start is None else query_start
    q_pos = (torch.arange(tq, device=device) + start)[:, None]
    k_pos = torch.arange(tk, device=device)[None, :]
    allowed = torch.ones(tq, tk, dtype=torch.bool, device=device)
    if causal:
        allowed &= k_pos <= q_pos
    if window is not None:
        allowed &= q_pos - k_pos < window
    allowed = allowed[None, None]
    if doc_ids is not None:  # packed rows: tq == tk
        allowed = allowed & (doc_ids[:, :, None] == doc_ids[:, None, :])[:, None]
    return allowed


def attention_ref(
    q: torch.Tensor,  # (batch, tq, nheads, head_dim)
    k: torch.Tensor,  # (batch, tk, n_kv_heads, head_dim)
    v: torch.Tensor,  # (batch, tk, n_kv_heads, head_dim)
    causal: bool = True,
    window: int | None = None,
    doc_ids: torch.Tensor | None = None,  # (batch, tq), only when tq == tk
    scale: float | None = None,
    query_start: torch.Tensor | None = None,  # (1,): queries' position among the keys (default: at the end)
) -> torch.Tensor:
    """softmax(q kᵀ · scale + mask) v in fp32, computed explicitly."""
    rep = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * scale
    mask = attention_mask(q.shape[1], k.shape[1], q.device, causal, window, doc_ids, query_start)
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v.float()).to(q.dtype)


def attention_sdpa(q, k, v, causal=True, window=None, doc_ids=None, scale=None, query_start=None):
    tq, tk = q.shape[1], k.shape[1]
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    gqa = q.shape[2] != k.shape[2]
    plain = window is None and doc_ids is None and query_start is None
    if plain and (tq == tk or tq == 1 or not causal):
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=causal and tq > 1, scale=scale, enable_gqa=gqa)
    else:
        mask = attention_mask(tq, tk, q.device, causal, window, doc_ids, query_start)
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return out.transpose(1, 2)


def attention_flash(q, k, v, causal=True, window=None, doc_ids=None, scale=None):
    """flash-attn's kernels (no ``query_start``: the dispatcher sends those calls to SDPA)."""
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    window_size = (window - 1, 0) if window is not None else (-1, -1)
    if doc_ids is None:
        return flash_attn_func(q, k, v, causal=causal, window_size=window_size, softmax_scale=scale)
    batch, seqlen = doc_ids.shape
    cu_seqlens, max_len = doc_cu_seqlens(doc_ids)
    out = flash_attn_varlen_func(
        q.flatten(0, 1),
        k.flatten(0, 1),
        v.flatten(0, 1),
        cu_seqlens,
        cu_seqlens,
        max_len,
        max_len,
        causal=causal,
        window_size=window_size,
        softmax_scale=scale,
    )
    return out.unflatten(0, (batch, seqlen))


def doc_cu_seqlens(doc_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Cumulative document lengths over the flattened batch (a row start is always a boundary)."""
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    start_idx = torch.nonzero(starts.flatten()).flatten()
    total = torch.tensor([doc_ids.numel()], device=doc_ids.device)
    cu_seqlens = torch.cat([start_idx, total]).to(torch.int32)
    return cu_seqlens, int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
