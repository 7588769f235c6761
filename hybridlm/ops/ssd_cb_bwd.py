"""The in-chunk scan's backward through C·Bᵀ and the decays, as one Triton kernel: the gradient of C·Bᵀ per
chunk (``dCB``) and the in-chunk part of the log decays' gradient, which mamba_ssm computes with two kernels
(``_chunk_scan_bwd_dcb`` and ``_chunk_scan_bwd_ddAcs_stable``) that each multiply the output's gradient by x
again, head by head.

Within a chunk the scan's output at step m takes ``CB[m, n] · exp(S[m] - S[n]) · dt[n] · x[n]`` from every step
n ≤ m of its document (S: the cumulative log decay). With ``P[m, n] = dout[m]·x[n] · dt[n] · exp(S[m] - S[n])``
(per head), C·Bᵀ's gradient is P summed over the group's heads, and the gradient of step i's log decay is
``Σ_{m ≥ i > n} P[m, n] · CB[m, n]``: the sum over each row of the terms left of column i, summed over the rows
at or below i, with no difference of large numbers (the "stable" form; a difference of row and column sums loses
A's and dt_bias's gradients, ``ops/conv_ssd.py``). Each program holds a block of rows of one chunk, every column,
and walks a run of one group's heads: one product ``dout·xᵀ`` per head serves both gradients, and C·Bᵀ's gradient
sums in registers, so it is written once per run of heads (summed over runs after, deterministic).

The prefix sums along each row are ``tl.cumsum`` or, with ``cumsum_by_dot``, a product with a triangle of ones on
the tensor cores, the fp32 terms split into two bf16 parts (a ~2⁻¹⁶ relative rounding of each term).
CUDA (or Triton's interpreter); imported by the fused path that uses it (``hybridlm.ops.conv_ssd``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# The launch shape, from ``benchmarks/own_kernels.py --kernels cb``: see the sweep's times there and in the note.
BLOCK_M = 64  # rows of a chunk per program
HEADS_PER_PROGRAM = 8  # a run of one group's heads; dCB's partial sums are summed over runs
NUM_WARPS = 8
CUMSUM_BY_DOT = False


@triton.jit
def _dcb_ddA_kernel(
    X, DOUT, DT, DA_CS, CB, SEQ_IDX,  # X, DOUT (batch, seqlen, nheads, headdim); DT, DA_CS (batch, nheads, nchunks,
    DCB, DDA,  # chunk); DCB (batch, nchunks, runs, ngroups, chunk, chunk), DDA (batch, nheads, nchunks, tiles, chunk)
    chunk_size, headdim, seqlen, batch, ngroups, heads_per_group, heads_per_program,
    stride_x_b, stride_x_t, stride_x_h, stride_x_d,
    stride_dout_b, stride_dout_t, stride_dout_h, stride_dout_d,
    stride_dt_b, stride_dt_h, stride_dt_c, stride_dt_t,
    stride_da_b, stride_da_h, stride_da_c, stride_da_t,
    stride_cb_b, stride_cb_c, stride_cb_g, stride_cb_m, stride_cb_n,
    stride_seq_b, stride_seq_t,
    stride_dcb_b, stride_dcb_c, stride_dcb_r, stride_dcb_g, stride_dcb_m, stride_dcb_n,
    stride_dda_b, stride_dda_h, stride_dda_c, stride_dda_tile, stride_dda_t,
    HAS_SEQ_IDX: tl.constexpr,
    CUMSUM_BY_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_bc = tl.program_id(1)
    pid_c = pid_bc // batch
    pid_b = (pid_bc - pid_c * batch).to(tl.int64)
    pid_rg = tl.program_id(2)
    pid_r = pid_rg // ngroups  # the run of heads
    pid_g = pid_rg - pid_r * ngroups
    head0 = pid_g * heads_per_group + pid_r * heads_per_program
    run = tl.minimum(heads_per_program, heads_per_group - pid_r * heads_per_program)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    limit = tl.minimum(chunk_size, seqlen - pid_c * chunk_size)  # the last chunk may be partial
    rows = (pid_c * chunk_size + offs_m).to(tl.int64)
    cols = (pid_c * chunk_size + offs_n).to(tl.int64)
    in_chunk = (offs_m[:, None] < chunk_size) & (offs_n[None, :] < chunk_size)
    below = offs_m[:, None] > offs_n[None, :]  # the decay terms: n < i <= m for some step i
    keep = offs_m[:, None] >= offs_n[None, :]  # C·Bᵀ's causal triangle, within one document
    if HAS_SEQ_IDX:
        seq = SEQ_IDX + pid_b * stride_seq_b
        seq_m = tl.load(seq + rows * stride_seq_t, mask=offs_m < limit, other=-1)
        seq_n = tl.load(seq + cols * stride_seq_t, mask=offs_n < limit, other=-2)
        keep &= seq_m[:, None] == seq_n[None, :]
    # C·Bᵀ as the forward computed it: zero across documents, so the decay terms there vanish with it
    cb_ptrs = CB + pid_b * stride_cb_b + pid_c * stride_cb_c + pid_g * stride_cb_g
    cb = tl.load(cb_ptrs + offs_m[:, None] * stride_cb_m + offs_n[None, :] * stride_cb_n, mask=in_chunk, other=0.0)
    cb = cb.to(tl.float32)
    if CUMSUM_BY_DOT:
        ones_upper = (offs_n[:, None] <= offs_n[None, :]).to(
            tl.bfloat16
        )  # (t @ ones_upper)[m, n] = Σ_{n' <= n} t[m, n']

    dout_ptrs = DOUT + pid_b * stride_dout_b + rows[:, None] * stride_dout_t + offs_k[None, :] * stride_dout_d
    x_ptrs = X + pid_b * stride_x_b + cols[None, :] * stride_x_t + offs_k[:, None] * stride_x_d
    dt_ptrs = DT + pid_b * stride_dt_b + pid_c * stride_dt_c
    da_ptrs = DA_CS + pid_b * stride_da_b + pid_c * stride_da_c
    dda_ptrs = DDA + pid_b * stride_dda_b + pid_c * stride_dda_c + pid_m * stride_dda_tile
    dcb = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i in range(run):
        h = head0 + i
        dout = tl.load(
            dout_ptrs + h * stride_dout_h, mask=(offs_m[:, None] < limit) & (offs_k[None, :] < headdim), other=0.0
        )
        xT = tl.load(x_ptrs + h * stride_x_h, mask=(offs_k[:, None] < headdim) & (offs_n[None, :] < limit), other=0.0)
        prod = tl.dot(dout, xT)  # (rows, columns) fp32
        dt_n = tl.load(dt_ptrs + h * stride_dt_h + offs_n * stride_dt_t, mask=offs_n < chunk_size, other=0.0)
        da_m = tl.load(da_ptrs + h * stride_da_h + offs_m * stride_da_t, mask=offs_m < chunk_size, other=0.0)
        da_n = tl.load(da_ptrs + h * stride_da_h + offs_n * stride_da_t, mask=offs_n < chunk_size, other=0.0)
        decay = tl.exp(tl.minimum(da_m.to(tl.float32)[:, None] - da_n.to(tl.float32)[None, :], 0.0))
        prod *= dt_n.to(tl.float32)[None, :] * decay
        dcb += prod
        terms = tl.where(below, prod * cb, 0.0)
        if CUMSUM_BY_DOT:
            hi = terms.to(tl.bfloat16)
            lo = (terms - hi.to(tl.float32)).to(tl.bfloat16)
            left = tl.dot(hi, ones_upper) + tl.dot(lo, ones_upper)
        else:
            left = tl.cumsum(terms, axis=1)
        # step n+1's gradient: the terms left of it (columns <= n) in the rows at or below it
        dda = tl.sum(tl.where(below, left, 0.0), axis=0)
        out = dda_ptrs + h * stride_dda_h
        tl.store(out + (offs_n + 1) * stride_dda_t, dda, mask=offs_n + 1 < chunk_size)
        tl.store(out, 0.0)  # step 0's in-chunk gradient: no term has a decay through it
    dcb = tl.where(keep, dcb, 0.0)
    dcb_ptrs = DCB + pid_b * stride_dcb_b + pid_c * stride_dcb_c + pid_r * stride_dcb_r + pid_g * stride_dcb_g
    tl.store(dcb_ptrs + offs_m[:, None] * stride_dcb_m + offs_n[None, :] * stride_dcb_n, dcb, mask=in_chunk)


def chunk_scan_bwd_dcb_ddA(
    x: torch.Tensor,
    dt: torch.Tensor,
    dA_cumsum: torch.Tensor,
    dout: torch.Tensor,
    cb: torch.Tensor,
    seq_idx: torch.Tensor | None = None,
    *,
    block_m: int = BLOCK_M,
    heads_per_program: int = HEADS_PER_PROGRAM,
    num_warps: int = NUM_WARPS,
    cumsum_by_dot: bool = CUMSUM_BY_DOT,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(C·Bᵀ's gradient (batch, nchunks, ngroups, chunk, chunk) fp32, the in-chunk log-decay gradient as partial
    sums per row tile (batch, nheads, nchunks, tiles, chunk) fp32): what ``_chunk_scan_bwd_dcb`` and
    ``_chunk_scan_bwd_ddAcs_stable`` (before its sum over tiles) return. ``x``, ``dout``: (batch, seqlen, nheads,
    headdim); ``dt``, ``dA_cumsum``: (batch, nheads, nchunks, chunk); ``cb``: (batch, nchunks, ngroups, chunk,
    chunk), zero across documents; ``seq_idx``: (batch, seqlen) int32 or None."""
    batch, seqlen, nheads, headdim = x.shape
    _, _, nchunks, chunk_size = dt.shape
    ngroups = cb.shape[2]
    if dout.shape != x.shape or dA_cumsum.shape != dt.shape or dt.shape[:2] != (batch, nheads):
        raise ValueError(f"x {tuple(x.shape)}, dout {tuple(dout.shape)}, dt {tuple(dt.shape)} and dA_cumsum "
                         f"{tuple(dA_cumsum.shape)} do not agree")  # fmt: skip
    if nchunks * chunk_size < seqlen or nheads % ngroups:
        raise ValueError(f"{nchunks} chunks of {chunk_size} do not cover {seqlen} steps, or {ngroups} groups do not "
                         f"divide {nheads} heads")  # fmt: skip
    if cb.shape != (batch, nchunks, ngroups, chunk_size, chunk_size):
        raise ValueError(f"cb is {tuple(cb.shape)}, not {(batch, nchunks, ngroups, chunk_size, chunk_size)}")
    if seq_idx is not None and seq_idx.shape != (batch, seqlen):
        raise ValueError(f"seq_idx is {tuple(seq_idx.shape)}, not {(batch, seqlen)}")
    heads_per_group = nheads // ngroups
    heads_per_program = min(heads_per_program, heads_per_group)
    runs = triton.cdiv(heads_per_group, heads_per_program)
    block_n = max(triton.next_power_of_2(chunk_size), 16)
    block_m = min(block_m, block_n)
    tiles = triton.cdiv(chunk_size, block_m)
    dcb = torch.empty(batch, nchunks, runs, ngroups, chunk_size, chunk_size, device=x.device, dtype=torch.float32)
    dda = torch.empty(batch, nheads, nchunks, tiles, chunk_size, device=x.device, dtype=torch.float32)
    seq_strides = (seq_idx.stride(0), seq_idx.stride(1)) if seq_idx is not None else (0, 0)
    grid = (tiles, batch * nchunks, runs * ngroups)
    if batch * nchunks * nheads > 0:
        _dcb_ddA_kernel[grid](
            x, dout, dt, dA_cumsum, cb, seq_idx if seq_idx is not None else dt, dcb, dda,  # dt: never read
            chunk_size, headdim, seqlen, batch, ngroups, heads_per_group, heads_per_program,
            *x.stride(), *dout.stride(), *dt.stride(), *dA_cumsum.stride(), *cb.stride(), *seq_strides,
            *dcb.stride(), *dda.stride(),
            HAS_SEQ_IDX=seq_idx is not None, CUMSUM_BY_DOT=cumsum_by_dot,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=max(triton.next_power_of_2(headdim), 16),
            num_warps=num_warps,
        )  # fmt: skip
    return (dcb.squeeze(2) if runs == 1 else dcb.sum(2)), dda
