"""Two of the SSD's chunked-scan kernels as Triton kernels whose programs walk a run of a group's heads, for the
Mamba-2 mixer (``ops/conv_ssd.py``): the scan's forward (mamba_ssm's ``_chunk_scan_fwd_kernel``) and its x
gradient (``_chunk_scan_chunk_state_bwd_dx_kernel``), the same arithmetic as mamba_ssm's.

Per chunk and head, with A the cumulative log decays, S the state entering the chunk and dS the gradient of the one
leaving it, the forward writes for each step i (over the chunk's steps k ≤ i)

    y_i   = exp(A_i) C_i · S + Σ_k exp(A_i − A_k) (C_i · B_k) dt_k x_k + D x_i

and the backward for each step j (over the chunk's steps k ≥ j)

    dx_j  = dt_j (exp(A_last − A_j) B_j · dS + Σ_k exp(A_k − A_j) (C_k · B_j) dy_k) + D dy_j
    ddt_j = x_j · (the bracket),   dD = Σ_j dy_j · x_j

mamba_ssm gives each program one head and one tile of (rows, columns), so every program loads its rows of C (or B)
and of C·Bᵀ again, though all heads of a group share them. Here a program takes a whole chunk and holds C's (B's)
rows and C·Bᵀ (fp32, as upstream reads it) across ``heads`` heads of one group, loading only each head's decays,
states, x and dy, its loop over the heads software-pipelined. The chunk is worked in two halves of rows and of
columns, so of C·Bᵀ's four blocks the one above (below) the diagonal, all zeros, is skipped. In the backward a
program owns every column of a row: dt's gradient is stored, not added atomically, and D's is summed per chunk and
then over chunks (deterministic). C·Bᵀ is multiplied by the head's decays (and dt) in fp32 and rounded to x's
(dy's) dtype before its product, as upstream does.

16-bit inputs on CUDA (``launches``), or any under Triton's interpreter; called by the fused mixer only
(``MixerKernels.own_scan_fwd`` and ``own_dx``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Launch shapes, from ``benchmarks/own_kernels.py --kernels scan,dx`` on an H200 at the 500M config's 1x32768 (chunk
# 128, head_dim 64, d_state 128, 32 heads in one group). The first design (3c28159, e8fd103: one block of the
# chunk's rows against all its columns): the x gradient 0.349-0.351 ms a layer at 128 rows, 32 heads, 8 warps, 3
# stages against mamba_ssm's 0.409-0.413 (its wider autotuning list); 16 / 8 heads 0.357 / 0.372, 2 stages 0.386-
# 0.404, 64 rows 0.48-0.62 (dy and dS read twice), 4 warps 0.83-0.95 (spilled registers); the forward 0.261 against
# 0.287 at the same shape.
HEADS = 32  # heads per program (of one group)
NUM_WARPS = 8
STAGES = 3  # the head loop's software pipelining


def launches(x: torch.Tensor) -> bool:
    """Whether these launch shapes take ``x``: 16-bit inputs only. With fp32 tiles a program needs ~290 KB of shared
    memory, over the H200's 227 KB; the mixer then runs mamba_ssm's kernels (fp32 is not the fast path)."""
    return x.element_size() == 2


@triton.jit
def _tile(ptr, rows, cols, stride_r, stride_c, n_rows, n_cols):
    """``ptr[rows, cols]``, zero past ``n_rows`` rows and ``n_cols`` columns."""
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    return tl.load(ptr + rows[:, None] * stride_r + cols[None, :] * stride_c, mask=mask, other=0.0)


@triton.jit
def _decayed(cb, da_to, da_from, mask):
    """C·Bᵀ's entries times the decay from step ``da_from`` (columns) to ``da_to`` (rows), zero outside ``mask``
    (after the exp: outside it the difference can be large and positive, inf * 0)."""
    return tl.where(mask, cb * tl.exp(tl.minimum(da_to - da_from, 0.0)), 0.0)


@triton.jit
def _dx_kernel(
    X, CB, DY, DT, DA_CS, SEQ_IDX, D, B, DSTATES,  # inputs; DT and DA_CS (batch, nheads, nchunks, chunk)
    DX, DDT, DD,  # DX like X; DDT like DT, fp32; DD (batch, nchunks, nheads, D's columns) fp32
    seqlen, batch, heads_per_group, dstate,
    stride_x_b, stride_x_t, stride_x_h, stride_x_p,
    stride_cb_b, stride_cb_c, stride_cb_g, stride_cb_i, stride_cb_j,
    stride_dy_b, stride_dy_t, stride_dy_h, stride_dy_p,
    stride_dt_b, stride_dt_h, stride_dt_c, stride_dt_k,
    stride_da_b, stride_da_h, stride_da_c, stride_da_k,
    stride_seq_b, stride_seq_t,
    stride_d_h,
    stride_b_b, stride_b_t, stride_b_g, stride_b_n,
    stride_ds_b, stride_ds_c, stride_ds_h, stride_ds_p, stride_ds_n,
    stride_dx_b, stride_dx_t, stride_dx_h, stride_dx_p,
    stride_ddt_b, stride_ddt_h, stride_ddt_c, stride_ddt_k,
    stride_dd_b, stride_dd_c, stride_dd_h,
    CHUNK: tl.constexpr,
    HEADDIM: tl.constexpr,
    DSTATE: tl.constexpr,  # a power of two, at least dstate (B and dS are masked beyond it)
    HAS_SEQ_IDX: tl.constexpr,
    D_HAS_HDIM: tl.constexpr,
    HEADS: tl.constexpr,
    STAGES: tl.constexpr,
):  # fmt: skip
    pid_bc, pid_run = tl.program_id(0), tl.program_id(1)
    c, b = pid_bc // batch, pid_bc % batch
    first_head = pid_run * HEADS
    group = first_head // heads_per_group
    start = c * CHUNK  # the chunk's first step in the sequence
    limit = min(CHUNK, seqlen - start)  # steps of this chunk inside the sequence
    HALF: tl.constexpr = CHUNK // 2
    lo = tl.arange(0, HALF)  # the chunk's first half of steps (rows j, columns k), then its second
    hi = HALF + lo
    p = tl.arange(0, HEADDIM)
    n = tl.arange(0, DSTATE)

    # shared by the run's heads: B's rows and C·Bᵀ's (j, k) entries C_k · B_j for k ≥ j (the block k < j is zero)
    b_base = B + b * stride_b_b + start * stride_b_t + group * stride_b_g
    b_lo = _tile(b_base, lo, n, stride_b_t, stride_b_n, limit, dstate)
    b_hi = _tile(b_base, hi, n, stride_b_t, stride_b_n, limit, dstate)
    cb_base = CB + b * stride_cb_b + c * stride_cb_c + group * stride_cb_g
    causal_00 = (lo[None, :] >= lo[:, None]) & (lo[None, :] < limit)
    causal_01 = (hi[None, :] < limit) & (lo[:, None] >= 0)
    causal_11 = (hi[None, :] >= hi[:, None]) & (hi[None, :] < limit)
    cb_00 = tl.load(cb_base + lo[None, :] * stride_cb_i + lo[:, None] * stride_cb_j, mask=causal_00, other=0.0)
    cb_01 = tl.load(cb_base + hi[None, :] * stride_cb_i + lo[:, None] * stride_cb_j, mask=causal_01, other=0.0)
    cb_11 = tl.load(cb_base + hi[None, :] * stride_cb_i + hi[:, None] * stride_cb_j, mask=causal_11, other=0.0)
    cb_00, cb_01, cb_11 = cb_00.to(tl.float32), cb_01.to(tl.float32), cb_11.to(tl.float32)
    keep_lo = lo < limit  # the state leaving the chunk: with documents, only its last step's document
    keep_hi = hi < limit
    if HAS_SEQ_IDX:
        seq_base = SEQ_IDX + b * stride_seq_b + start * stride_seq_t
        seq_last = tl.load(seq_base + (limit - 1) * stride_seq_t)
        keep_lo &= tl.load(seq_base + lo * stride_seq_t, mask=lo < limit, other=-1) == seq_last
        keep_hi &= tl.load(seq_base + hi * stride_seq_t, mask=hi < limit, other=-1) == seq_last

    for i in tl.range(0, HEADS, num_stages=STAGES):
        h = first_head + i
        decays = DA_CS + b * stride_da_b + h * stride_da_h + c * stride_da_c
        da_lo = tl.load(decays + lo * stride_da_k, mask=lo < limit, other=0.0).to(tl.float32)
        da_hi = tl.load(decays + hi * stride_da_k, mask=hi < limit, other=0.0).to(tl.float32)
        da_last = tl.load(decays + (CHUNK - 1) * stride_da_k).to(tl.float32)
        dstates = tl.load(
            DSTATES + b * stride_ds_b + c * stride_ds_c + h * stride_ds_h + n[:, None] * stride_ds_n
            + p[None, :] * stride_ds_p,
            mask=n[:, None] < dstate,
            other=0.0,
        ).to(b_lo.dtype)  # (DSTATE, HEADDIM)  # fmt: skip
        acc_lo = tl.dot(b_lo, dstates) * tl.where(keep_lo, tl.exp(tl.minimum(da_last - da_lo, 0.0)), 0.0)[:, None]
        acc_hi = tl.dot(b_hi, dstates) * tl.where(keep_hi, tl.exp(tl.minimum(da_last - da_hi, 0.0)), 0.0)[:, None]

        dy_base = DY + b * stride_dy_b + start * stride_dy_t + h * stride_dy_h
        dy_lo = _tile(dy_base, lo, p, stride_dy_t, stride_dy_p, limit, HEADDIM)
        dy_hi = _tile(dy_base, hi, p, stride_dy_t, stride_dy_p, limit, HEADDIM)
        acc_lo += tl.dot(_decayed(cb_00, da_lo[None, :], da_lo[:, None], causal_00).to(dy_lo.dtype), dy_lo)
        acc_lo += tl.dot(_decayed(cb_01, da_hi[None, :], da_lo[:, None], causal_01).to(dy_lo.dtype), dy_hi)
        acc_hi += tl.dot(_decayed(cb_11, da_hi[None, :], da_hi[:, None], causal_11).to(dy_lo.dtype), dy_hi)

        x_base = X + b * stride_x_b + start * stride_x_t + h * stride_x_h
        x_lo = _tile(x_base, lo, p, stride_x_t, stride_x_p, limit, HEADDIM).to(tl.float32)
        x_hi = _tile(x_base, hi, p, stride_x_t, stride_x_p, limit, HEADDIM).to(tl.float32)
        dt_base = DT + b * stride_dt_b + h * stride_dt_h + c * stride_dt_c
        dt_lo = tl.load(dt_base + lo * stride_dt_k, mask=lo < limit, other=0.0).to(tl.float32)
        dt_hi = tl.load(dt_base + hi * stride_dt_k, mask=hi < limit, other=0.0).to(tl.float32)
        if D_HAS_HDIM:
            d = tl.load(D + h * stride_d_h + p).to(tl.float32)
        else:
            d = tl.load(D + h * stride_d_h).to(tl.float32)
        dy_lo, dy_hi = dy_lo.to(tl.float32), dy_hi.to(tl.float32)
        dx_base = DX + b * stride_dx_b + start * stride_dx_t + h * stride_dx_h
        dx_lo = acc_lo * dt_lo[:, None] + dy_lo * d
        dx_hi = acc_hi * dt_hi[:, None] + dy_hi * d
        tl.store(dx_base + lo[:, None] * stride_dx_t + p[None, :] * stride_dx_p, dx_lo, mask=(lo < limit)[:, None])
        tl.store(dx_base + hi[:, None] * stride_dx_t + p[None, :] * stride_dx_p, dx_hi, mask=(hi < limit)[:, None])
        ddt_base = DDT + b * stride_ddt_b + h * stride_ddt_h + c * stride_ddt_c
        tl.store(ddt_base + lo * stride_ddt_k, tl.sum(acc_lo * x_lo, axis=1))
        tl.store(ddt_base + hi * stride_ddt_k, tl.sum(acc_hi * x_hi, axis=1))
        dd_base = DD + b * stride_dd_b + c * stride_dd_c + h * stride_dd_h
        if D_HAS_HDIM:
            tl.store(dd_base + p, tl.sum(dy_lo * x_lo, axis=0) + tl.sum(dy_hi * x_hi, axis=0))
        else:
            tl.store(dd_base, tl.sum(dy_lo * x_lo) + tl.sum(dy_hi * x_hi))


def chunk_scan_chunk_state_bwd_dx(
    x: torch.Tensor,  # (batch, seqlen, nheads, headdim)
    dt: torch.Tensor,  # (batch, nheads, nchunks, chunk), after softplus
    dA_cumsum: torch.Tensor,  # like dt
    B: torch.Tensor,  # (batch, seqlen, ngroups, dstate)
    CB: torch.Tensor,  # (batch, nchunks, ngroups, chunk, chunk): entry (i, j) is C_i · B_j
    dout: torch.Tensor,  # like x
    dstates: torch.Tensor,  # (batch, nchunks, nheads, headdim, dstate): the states leaving each chunk's gradient
    D: torch.Tensor,  # (nheads,) or (nheads, headdim)
    seq_idx: torch.Tensor | None,  # (batch, seqlen) int32
    dx: torch.Tensor,  # like x, written
    heads: int = HEADS,
    num_warps: int = NUM_WARPS,
    stages: int = STAGES,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dx (written into ``dx``), the dt gradient (batch, nheads, nchunks, chunk) fp32 and D's (D's shape and
    dtype): what mamba_ssm's ``_chunk_scan_chunk_state_bwd_dx`` returns. ``heads`` is capped at the heads per
    group and must divide them."""
    batch, seqlen, nheads, headdim = x.shape
    _, _, nchunks, chunk = dt.shape
    ngroups, dstate = B.shape[-2:]
    heads = _heads_per_program(heads, nheads, ngroups, headdim, chunk)
    ddt = torch.empty(batch, nheads, nchunks, chunk, device=x.device, dtype=torch.float32)
    dD = torch.empty(batch, nchunks, nheads, headdim if D.dim() == 2 else 1, device=x.device, dtype=torch.float32)
    with torch.cuda.device(x.device.index):
        _dx_kernel[(batch * nchunks, nheads // heads)](
            x, CB, dout, dt, dA_cumsum, seq_idx, D, B, dstates,
            dx, ddt, dD,
            seqlen, batch, nheads // ngroups, dstate,
            *x.stride(), *CB.stride(), *dout.stride(), *dt.stride(), *dA_cumsum.stride(), *_seq_strides(seq_idx),
            D.stride(0), *B.stride(), *dstates.stride(), *dx.stride(), *ddt.stride(), *dD.stride()[:3],
            CHUNK=chunk, HEADDIM=headdim, DSTATE=max(triton.next_power_of_2(dstate), 16),
            HAS_SEQ_IDX=seq_idx is not None, D_HAS_HDIM=D.dim() == 2, HEADS=heads, STAGES=stages, num_warps=num_warps,
        )  # fmt: skip
    dD = dD.sum(dim=(0, 1))  # (nheads, D's columns)
    return dx, ddt, (dD if D.dim() == 2 else dD[:, 0]).to(D.dtype)


@triton.jit
def _scan_fwd_kernel(
    CB, X, DT, DA_CS, SEQ_IDX, C, STATES, D,  # DT and DA_CS (batch, nheads, nchunks, chunk)
    OUT,  # like X
    seqlen, batch, heads_per_group, dstate,
    stride_cb_b, stride_cb_c, stride_cb_g, stride_cb_i, stride_cb_j,
    stride_x_b, stride_x_t, stride_x_h, stride_x_p,
    stride_dt_b, stride_dt_h, stride_dt_c, stride_dt_k,
    stride_da_b, stride_da_h, stride_da_c, stride_da_k,
    stride_seq_b, stride_seq_t,
    stride_c_b, stride_c_t, stride_c_g, stride_c_n,
    stride_s_b, stride_s_c, stride_s_h, stride_s_p, stride_s_n,
    stride_d_h,
    stride_o_b, stride_o_t, stride_o_h, stride_o_p,
    CHUNK: tl.constexpr,
    HEADDIM: tl.constexpr,
    DSTATE: tl.constexpr,
    HAS_SEQ_IDX: tl.constexpr,
    D_HAS_HDIM: tl.constexpr,
    HEADS: tl.constexpr,
    STAGES: tl.constexpr,
):  # fmt: skip
    pid_bc, pid_run = tl.program_id(0), tl.program_id(1)
    c, b = pid_bc // batch, pid_bc % batch
    first_head = pid_run * HEADS
    group = first_head // heads_per_group
    start = c * CHUNK
    limit = min(CHUNK, seqlen - start)
    HALF: tl.constexpr = CHUNK // 2
    lo = tl.arange(0, HALF)  # the chunk's first half of steps (rows i, columns k), then its second
    hi = HALF + lo
    p = tl.arange(0, HEADDIM)
    n = tl.arange(0, DSTATE)

    # shared by the run's heads: C's rows and C·Bᵀ's entries C_i · B_k for k ≤ i (the block k > i is zero)
    c_base = C + b * stride_c_b + start * stride_c_t + group * stride_c_g
    c_lo = _tile(c_base, lo, n, stride_c_t, stride_c_n, limit, dstate)
    c_hi = _tile(c_base, hi, n, stride_c_t, stride_c_n, limit, dstate)
    cb_base = CB + b * stride_cb_b + c * stride_cb_c + group * stride_cb_g
    causal_00 = (lo[None, :] <= lo[:, None]) & (lo[None, :] < limit)
    causal_10 = (lo[None, :] < limit) & (hi[:, None] >= 0)
    causal_11 = (hi[None, :] <= hi[:, None]) & (hi[None, :] < limit)
    cb_00 = tl.load(cb_base + lo[:, None] * stride_cb_i + lo[None, :] * stride_cb_j, mask=causal_00, other=0.0)
    cb_10 = tl.load(cb_base + hi[:, None] * stride_cb_i + lo[None, :] * stride_cb_j, mask=causal_10, other=0.0)
    cb_11 = tl.load(cb_base + hi[:, None] * stride_cb_i + hi[None, :] * stride_cb_j, mask=causal_11, other=0.0)
    cb_00, cb_10, cb_11 = cb_00.to(tl.float32), cb_10.to(tl.float32), cb_11.to(tl.float32)
    keep_lo = lo < CHUNK  # the state entering the chunk: with documents, only the steps of its document
    keep_hi = hi < CHUNK
    if HAS_SEQ_IDX:
        seq_base = SEQ_IDX + b * stride_seq_b + start * stride_seq_t
        seq_prev = tl.load(seq_base - stride_seq_t, mask=c >= 1, other=0)
        keep_lo &= tl.load(seq_base + lo * stride_seq_t, mask=lo < limit, other=-1) == seq_prev
        keep_hi &= tl.load(seq_base + hi * stride_seq_t, mask=hi < limit, other=-1) == seq_prev

    for i in tl.range(0, HEADS, num_stages=STAGES):
        h = first_head + i
        decays = DA_CS + b * stride_da_b + h * stride_da_h + c * stride_da_c
        da_lo = tl.load(decays + lo * stride_da_k).to(tl.float32)
        da_hi = tl.load(decays + hi * stride_da_k).to(tl.float32)
        dt_base = DT + b * stride_dt_b + h * stride_dt_h + c * stride_dt_c
        dt_lo = tl.load(dt_base + lo * stride_dt_k).to(tl.float32)
        dt_hi = tl.load(dt_base + hi * stride_dt_k).to(tl.float32)
        states = tl.load(
            STATES + b * stride_s_b + c * stride_s_c + h * stride_s_h + n[:, None] * stride_s_n
            + p[None, :] * stride_s_p,
            mask=n[:, None] < dstate,
            other=0.0,
        ).to(c_lo.dtype)  # (DSTATE, HEADDIM)  # fmt: skip
        acc_lo = tl.dot(c_lo, states) * tl.where(keep_lo, tl.exp(da_lo), 0.0)[:, None]
        acc_hi = tl.dot(c_hi, states) * tl.where(keep_hi, tl.exp(da_hi), 0.0)[:, None]

        x_base = X + b * stride_x_b + start * stride_x_t + h * stride_x_h
        x_lo = _tile(x_base, lo, p, stride_x_t, stride_x_p, limit, HEADDIM)
        x_hi = _tile(x_base, hi, p, stride_x_t, stride_x_p, limit, HEADDIM)
        w_00 = _decayed(cb_00, da_lo[:, None], da_lo[None, :], causal_00) * dt_lo[None, :]
        w_10 = _decayed(cb_10, da_hi[:, None], da_lo[None, :], causal_10) * dt_lo[None, :]
        w_11 = _decayed(cb_11, da_hi[:, None], da_hi[None, :], causal_11) * dt_hi[None, :]
        acc_lo += tl.dot(w_00.to(x_lo.dtype), x_lo)
        acc_hi += tl.dot(w_10.to(x_lo.dtype), x_lo)
        acc_hi += tl.dot(w_11.to(x_lo.dtype), x_hi)

        if D_HAS_HDIM:
            d = tl.load(D + h * stride_d_h + p).to(tl.float32)
        else:
            d = tl.load(D + h * stride_d_h).to(tl.float32)
        out_base = OUT + b * stride_o_b + start * stride_o_t + h * stride_o_h
        out_lo = acc_lo + x_lo.to(tl.float32) * d
        out_hi = acc_hi + x_hi.to(tl.float32) * d
        tl.store(out_base + lo[:, None] * stride_o_t + p[None, :] * stride_o_p, out_lo, mask=(lo < limit)[:, None])
        tl.store(out_base + hi[:, None] * stride_o_t + p[None, :] * stride_o_p, out_hi, mask=(hi < limit)[:, None])


def chunk_scan_fwd(
    CB: torch.Tensor,  # (batch, nchunks, ngroups, chunk, chunk): entry (i, j) is C_i · B_j
    x: torch.Tensor,  # (batch, seqlen, nheads, headdim)
    dt: torch.Tensor,  # (batch, nheads, nchunks, chunk), after softplus
    dA_cumsum: torch.Tensor,  # like dt
    C: torch.Tensor,  # (batch, seqlen, ngroups, dstate)
    states: torch.Tensor,  # (batch, nchunks, nheads, headdim, dstate): the states entering each chunk
    D: torch.Tensor,  # (nheads,) or (nheads, headdim)
    seq_idx: torch.Tensor | None,  # (batch, seqlen) int32
    heads: int = HEADS,
    num_warps: int = NUM_WARPS,
    stages: int = STAGES,
) -> torch.Tensor:
    """The scan's output with D x added, (batch, seqlen, nheads, headdim) in x's dtype: what mamba_ssm's
    ``_chunk_scan_fwd`` returns first without z. ``heads`` as in ``chunk_scan_chunk_state_bwd_dx``."""
    batch, seqlen, nheads, headdim = x.shape
    _, _, nchunks, chunk = dt.shape
    ngroups, dstate = C.shape[-2:]
    heads = _heads_per_program(heads, nheads, ngroups, headdim, chunk)
    out = torch.empty(batch, seqlen, nheads, headdim, device=x.device, dtype=x.dtype)
    with torch.cuda.device(x.device.index):
        _scan_fwd_kernel[(batch * nchunks, nheads // heads)](
            CB, x, dt, dA_cumsum, seq_idx, C, states, D,
            out,
            seqlen, batch, nheads // ngroups, dstate,
            *CB.stride(), *x.stride(), *dt.stride(), *dA_cumsum.stride(), *_seq_strides(seq_idx), *C.stride(),
            *states.stride(), D.stride(0), *out.stride(),
            CHUNK=chunk, HEADDIM=headdim, DSTATE=max(triton.next_power_of_2(dstate), 16),
            HAS_SEQ_IDX=seq_idx is not None, D_HAS_HDIM=D.dim() == 2, HEADS=heads, STAGES=stages, num_warps=num_warps,
        )  # fmt: skip
    return out


def _heads_per_program(heads: int, nheads: int, ngroups: int, headdim: int, chunk: int) -> int:
    """``heads`` capped at a group's heads, which it must divide (a program's heads share one group's C and B)."""
    assert headdim == triton.next_power_of_2(headdim) and chunk == triton.next_power_of_2(chunk) and chunk >= 32
    per_group = nheads // ngroups
    heads = min(heads, per_group)
    assert per_group % heads == 0, f"{heads} heads a program do not divide the {per_group} of a group"
    return heads


def _seq_strides(seq_idx: torch.Tensor | None) -> tuple[int, int]:
    return (seq_idx.stride(0), seq_idx.stride(1)) if seq_idx is not None else (0, 0)
