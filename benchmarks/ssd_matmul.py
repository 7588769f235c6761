"""Mamba-2's SSD as batched matrix products: a candidate measured against mamba_ssm's Triton kernels by
``op_variants.py`` (``conv_ssd_scan``, "matmul scan N"), not a path the library takes.

On the H200 (8x4096, 500M config, conv + SSD + gated norm forward + backward) it took 7.6-9.4 ms per layer under
``torch.compile`` against mamba_ssm's 3.6: the products are small-K batched GEMMs and every intermediate (the
per-head decay-masked scores, the per-chunk states, their transposes) makes a round trip through memory, where
mamba_ssm's kernels keep them on chip. Its errors against the fp32 reference match mamba_ssm's.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def ssd_scan_matmul(
    x: torch.Tensor,  # (batch, seqlen, nheads, headdim); the rest as ssd_scan_ref
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_limit: tuple[float, float] = (0.0, math.inf),
    seq_idx: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
    return_final_states: bool = False,
):
    """``hybridlm.ops.ssd.ssd_scan_ref``'s scan (same arguments) as batched matrix products in ``x``'s dtype
    (fp32 accumulation) with the decays in fp32, and no loop: the states pass across chunks as one more masked
    product, over chunks. Meant for ``torch.compile``, which leaves the products to cuBLAS and fuses the
    element-wise work between them."""
    batch, seqlen, nheads, headdim = x.shape
    ngroups, d_state = B.shape[-2:]
    dtype = x.dtype
    delta = F.softplus(dt.float() + (dt_bias.float() if dt_bias is not None else 0.0)).clamp(*dt_limit)
    pad = (-seqlen) % chunk_size  # padded steps have dt = 0: they neither decay nor write the state
    if pad:
        x, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x, B, C))
        delta = F.pad(delta, (0, 0, 0, pad))
        seq_idx = F.pad(seq_idx, (0, pad), mode="replicate") if seq_idx is not None else None
    chunks = x.shape[1] // chunk_size

    def chunked(t):  # (batch, L, ...) -> (batch, chunks, chunk_size, ...)
        return t.unflatten(1, (chunks, chunk_size))

    delta = chunked(delta)  # (batch, chunks, q, nheads)
    cumdecay = torch.cumsum(delta * A.float(), dim=2)  # log decay from the chunk's start, inclusive
    chunk_decay = cumdecay[:, :, -1]  # (batch, chunks, nheads)
    docs = chunked(seq_idx) if seq_idx is not None else None  # (batch, chunks, q)
    Bc, Cc = chunked(B).transpose(2, 3), chunked(C).transpose(2, 3)  # (batch, chunks, ngroups, q, d_state)
    xdt = chunked(x).float() * delta[..., None]  # (batch, chunks, q, nheads, headdim)

    def per_head(t):  # (batch, chunks, ngroups, ...) -> (batch, chunks, nheads, ...)
        return t.repeat_interleave(nheads // ngroups, dim=2)

    # 1. within each chunk: y_i += sum_{j <= i} (C_i . B_j) exp(cum_i - cum_j) dt_j x_j
    heads_cum = cumdecay.transpose(2, 3)  # (batch, chunks, nheads, q)
    keep = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=x.device).tril()
    if docs is not None:
        keep = keep & (docs[..., :, None] == docs[..., None, :])[:, :, None]
    decay = torch.exp((heads_cum[..., :, None] - heads_cum[..., None, :]).masked_fill(~keep, -math.inf))
    scores = (per_head(Cc @ Bc.transpose(-1, -2)) * decay).to(dtype)  # (batch, chunks, nheads, q, q)
    y_diag = scores @ xdt.to(dtype).transpose(2, 3)  # (batch, chunks, nheads, q, headdim)

    # 2. the state each chunk leaves by its end, from its tokens of the document it ends in
    to_end = torch.exp(chunk_decay[:, :, None] - cumdecay)
    if docs is not None:
        to_end = to_end * (docs == docs[..., -1:])[..., None]
    xs = (xdt * to_end[..., None]).to(dtype).flatten(3)  # (batch, chunks, q, nheads * headdim)
    xs = xs.unflatten(3, (ngroups, -1)).permute(0, 1, 3, 4, 2)  # (batch, chunks, ngroups, heads·headdim, q)
    states = (xs @ Bc).view(batch, chunks, nheads, headdim * d_state)

    # 3. across chunks: the state at chunk boundary r is sum_{k <= r} exp(E_r - E_k) S_k, S_k the state chunk k-1
    #    writes (S_0 the initial state), E the log decay up to each boundary; a state reaches only boundaries of
    #    its own document. (The product grows with the square of the number of chunks.)
    boundary_decay = F.pad(torch.cumsum(chunk_decay, dim=1), (0, 0, 1, 0)).transpose(1, 2)  # (batch, nh, chunks+1)
    keep = torch.ones(chunks + 1, chunks + 1, dtype=torch.bool, device=x.device).tril()
    if docs is not None:
        boundary_doc = torch.cat([docs[:, :1, 0], docs[:, :, -1]], dim=1)  # (batch, chunks + 1)
        keep = keep & (boundary_doc[:, :, None] == boundary_doc[:, None, :])[:, None]
    weights = torch.exp((boundary_decay[..., :, None] - boundary_decay[..., None, :]).masked_fill(~keep, -math.inf))
    initial = (
        initial_states.flatten(2).to(dtype)
        if initial_states is not None
        else states.new_zeros(batch, nheads, headdim * d_state)
    )
    entering = torch.cat([initial[:, None], states], dim=1).transpose(1, 2)  # (batch, nheads, chunks+1, p·n)
    passed = weights.to(dtype) @ entering  # (batch, nheads, chunks + 1, headdim * d_state)
    final_states = passed[:, :, -1].unflatten(-1, (headdim, d_state)).float()
    incoming = passed[:, :, :-1].transpose(1, 2).reshape(batch, chunks, ngroups, -1, d_state)

    # 4. the incoming state's part: y_i += exp(cum_i) C_i . S, for tokens of the state's document
    y_off = (Cc @ incoming.transpose(-1, -2)).transpose(2, 3).flatten(3).unflatten(3, (nheads, headdim))
    from_start = torch.exp(cumdecay)
    if docs is not None:
        from_start = from_start * (docs == boundary_doc[:, :-1, None])[..., None]
    y = y_diag.transpose(2, 3).float() + y_off.float() * from_start[..., None]
    y = y.flatten(1, 2)[:, :seqlen]
    if D is not None:
        y = y + x[:, :seqlen].float() * (D.float() if D.dim() == 2 else D.float()[:, None])
    if z is not None:
        y = y * F.silu(z.float())
    y = y.to(dtype)
    return (y, final_states) if return_final_states else y
