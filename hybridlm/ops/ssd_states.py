"""Three of the SSD's chunk-state products as Triton kernels whose programs walk a run of a group's heads, for the
Mamba-2 mixer (``ops/conv_ssd.py``): each chunk's own state (mamba_ssm's ``_chunk_state_fwd_kernel``), and B's and
C's gradients through the states with their decay-gradient terms (``_chunk_state_bwd_db_kernel``,
``_chunk_scan_bwd_dc_kernel``): the same arithmetic as mamba_ssm's.

Per chunk and head, with A the cumulative log decays, the chunk's own state (from a zero state) is a
(head_dim, d_state) sum over the chunk's steps k

    state = Σ_k x_kᵀ (B_k dt_k exp(A_last − A_k))

and B's and C's gradients through the states are, per step k, sums over the group's heads of

    dB_k = dt_k exp(A_last − A_k) x_k · dS_leave,   dC_k = exp(A_k) dy_k · S_enter

with a decay-gradient term per head and step, the row's product with B_k (C_k) summed over d_state.

mamba_ssm's state kernel gives each program one head, so every program loads the chunk's rows of B that all heads
of a group share, and its two gradient kernels loop over heads without pipelining the loop, summing the decay terms
with atomic adds. Here a program holds B's (C's) rows across a run of ``heads`` heads, loading only each head's x
(dy), decays and state, the loop over the heads software-pipelined; every output is stored once (no atomics, no
zeroing, deterministic). As upstream, the state kernel scales B (fp32, then rounded to x's dtype) before its
product. The entering states' gradient (``_chunk_scan_bwd_dstates``) stays mamba_ssm's: the same pattern for it
(dy scaled, C shared) ran 0.099 ms a layer against its 0.095 at 1x32768 (b8983a7).

On CUDA the mixer calls them where ``ssd_group.launches`` says (16-bit inputs, the shapes run on the GPU;
``MixerKernels.own_chunk_states`` and ``own_state_grads``); under Triton's interpreter any power-of-two head_dim
and chunk.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hybridlm.ops.layout import seq_idx_strides, sum_splits
from hybridlm.ops.ssd_group import _program_chunk, _tile, launch_heads

# Launch shapes, from ``benchmarks/own_kernels.py --kernels states,stategrads`` on an H200 at the 500M config's
# 1x32768 (chunk 128, head_dim 64, d_state 128, 32 heads in one group; b8983a7). The chunk states: 0.100 ms a layer at
# 64 columns, 8 heads, 4 warps, 3 stages against mamba_ssm's 0.129; 128 columns 0.114-0.120, 2 stages 0.119-0.144,
# 32 heads 0.109-0.113, 8 warps slower. B's gradient: 0.090 ms at rows 64, 32 heads, 4 warps, 3 stages against
# 0.149 (rows 128 at 8 warps 0.089; 2 stages 0.12; 8 heads 0.14-0.25; rows 128 at 4 warps 0.39-0.43, spilled); C's:
# 0.082 against 0.148, the same launch best.
STATE_BLOCK_N = 64  # d_state columns per program
STATE_HEADS = 8  # at most, as ssd_group.HEADS
STATE_NUM_WARPS = 4
STATE_STAGES = 3
GRAD_BLOCK_M = 64  # a chunk's rows per program
GRAD_HEADS = 32  # at most
GRAD_NUM_WARPS = 4
GRAD_STAGES = 3


@triton.jit
def _state_kernel(
    X, B, DT, DA_CS, SEQ_IDX,  # X (batch, seqlen, nheads, headdim); B (batch, seqlen, ngroups, dstate)
    OUT,  # (batch, nchunks, nheads, headdim, dstate)
    seqlen, batch, heads_per_group,
    stride_x_b, stride_x_t, stride_x_h, stride_x_p,
    stride_b_b, stride_b_t, stride_b_g, stride_b_n,
    stride_dt_b, stride_dt_h, stride_dt_c, stride_dt_k,
    stride_da_b, stride_da_h, stride_da_c, stride_da_k,
    stride_seq_b, stride_seq_t,
    stride_o_b, stride_o_c, stride_o_h, stride_o_p, stride_o_n,
    CHUNK: tl.constexpr,
    HEADDIM: tl.constexpr,
    dstate,
    HAS_SEQ_IDX: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEADS: tl.constexpr,
    STAGES: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    b, c, first_head, group, start, limit = _program_chunk(seqlen, batch, heads_per_group, CHUNK, HEADS)
    k = tl.arange(0, CHUNK)
    p = tl.arange(0, HEADDIM)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_in = k < limit

    # shared by the run's heads: B's rows of the chunk, scaled per head in fp32
    b_base = B + b * stride_b_b + start * stride_b_t + group * stride_b_g
    b_rows = _tile(b_base, k, n, stride_b_t, stride_b_n, limit, dstate).to(tl.float32)  # (CHUNK, BLOCK_N)
    if HAS_SEQ_IDX:  # the state leaving the chunk holds only the steps of its last step's document
        seq = SEQ_IDX + b * stride_seq_b + start * stride_seq_t
        seq_k = tl.load(seq + k * stride_seq_t, mask=k_in, other=-1)
        seq_last = tl.load(seq + (limit - 1) * stride_seq_t)
        keep = (seq_last >= 0) & (seq_k == seq_last)

    for i in tl.range(0, HEADS, num_stages=STAGES):
        h = first_head + i
        decays = DA_CS + b * stride_da_b + h * stride_da_h + c * stride_da_c
        da_k = tl.load(decays + k * stride_da_k, mask=k_in, other=0.0).to(tl.float32)
        da_last = tl.load(decays + (CHUNK - 1) * stride_da_k).to(tl.float32)
        dt_k = tl.load(DT + b * stride_dt_b + h * stride_dt_h + c * stride_dt_c + k * stride_dt_k, mask=k_in, other=0.0)
        scale = tl.exp(tl.minimum(da_last - da_k, 0.0)) * dt_k.to(tl.float32)
        if HAS_SEQ_IDX:
            scale = tl.where(keep, scale, 0.0)
        x = _tile(
            X + b * stride_x_b + start * stride_x_t + h * stride_x_h, k, p, stride_x_t, stride_x_p, limit, HEADDIM
        )
        state = tl.dot(tl.trans(x), (b_rows * scale[:, None]).to(x.dtype))  # (HEADDIM, BLOCK_N)
        out = OUT + b * stride_o_b + c * stride_o_c + h * stride_o_h
        tl.store(
            out + p[:, None] * stride_o_p + n[None, :] * stride_o_n,
            state.to(OUT.dtype.element_ty),
            mask=(n < dstate)[None, :],
        )


def chunk_state_fwd(
    B: torch.Tensor,  # (batch, seqlen, ngroups, dstate)
    x: torch.Tensor,  # (batch, seqlen, nheads, headdim)
    dt: torch.Tensor,  # (batch, nheads, nchunks, chunk), after softplus
    dA_cumsum: torch.Tensor,  # like dt
    seq_idx: torch.Tensor | None,  # (batch, seqlen) int32
    out_dtype: torch.dtype = torch.float32,
    block_n: int = STATE_BLOCK_N,
    heads: int | None = None,
    num_warps: int = STATE_NUM_WARPS,
    stages: int = STATE_STAGES,
) -> torch.Tensor:
    """Each chunk's own state (from a zero state), (batch, nchunks, nheads, headdim, dstate) in ``out_dtype``: what
    mamba_ssm's ``_chunk_state_fwd`` returns. ``heads`` a program, as ``ssd_group.launch_heads`` gives them (None:
    up to ``STATE_HEADS``)."""
    batch, seqlen, nheads, headdim = x.shape
    _, _, nchunks, chunk = dA_cumsum.shape
    ngroups, dstate = B.shape[-2:]
    block_n = min(block_n, max(triton.next_power_of_2(dstate), 16))
    heads = launch_heads(heads, STATE_HEADS, nheads, ngroups, triton.cdiv(dstate, block_n) * batch * nchunks, x.device)
    out = torch.empty(batch, nchunks, nheads, headdim, dstate, device=x.device, dtype=out_dtype)
    grid = (triton.cdiv(dstate, block_n), batch * nchunks, nheads // heads)
    with torch.cuda.device(x.device.index):
        _state_kernel[grid](
            x, B, dt, dA_cumsum, seq_idx,
            out,
            seqlen, batch, nheads // ngroups,
            *x.stride(), *B.stride(), *dt.stride(), *dA_cumsum.stride(), *seq_idx_strides(seq_idx), *out.stride(),
            CHUNK=chunk, HEADDIM=headdim, dstate=dstate, HAS_SEQ_IDX=seq_idx is not None,
            BLOCK_N=block_n, HEADS=heads, STAGES=stages, num_warps=num_warps,
        )  # fmt: skip
    return out


@triton.jit
def _state_grad_kernel(
    U, S, V, DT, DA_CS, SEQ_IDX,  # U: x or dy; S (batch, nchunks, nheads, headdim, dstate): dS_leave or S_enter
    DV,  # (batch, seqlen, splits, ngroups, dstate) fp32: a split's heads' sum
    DDA,  # (batch, nheads, nchunks, chunk) fp32: each head's decay-gradient terms
    seqlen, batch, heads_per_group,
    stride_u_b, stride_u_t, stride_u_h, stride_u_p,
    stride_s_b, stride_s_c, stride_s_h, stride_s_p, stride_s_n,
    stride_v_b, stride_v_t, stride_v_g, stride_v_n,
    stride_dt_b, stride_dt_h, stride_dt_c, stride_dt_k,
    stride_da_b, stride_da_h, stride_da_c, stride_da_k,
    stride_seq_b, stride_seq_t,
    stride_dv_b, stride_dv_t, stride_dv_s, stride_dv_g, stride_dv_n,
    stride_dda_b, stride_dda_h, stride_dda_c, stride_dda_k,
    CHUNK: tl.constexpr,
    HEADDIM: tl.constexpr,
    DSTATE: tl.constexpr,  # a power of two, at least d_state
    dstate,
    THROUGH_B: tl.constexpr,  # dB (U = x, S = dS_leave, V = B), else dC (dy, S_enter, C)
    HAS_SEQ_IDX: tl.constexpr,
    BLOCK_M: tl.constexpr,
    HEADS: tl.constexpr,
    STAGES: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    b, c, first_head, group, start, limit = _program_chunk(seqlen, batch, heads_per_group, CHUNK, HEADS)
    split = (first_head % heads_per_group) // HEADS
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # steps k of the chunk
    p = tl.arange(0, HEADDIM)
    n = tl.arange(0, DSTATE)
    row_in = rows < limit

    # shared by the run's heads: B's (C's) rows, read in fp32 for the decay terms
    v_base = V + b * stride_v_b + start * stride_v_t + group * stride_v_g
    v = _tile(v_base, rows, n, stride_v_t, stride_v_n, limit, dstate).to(tl.float32)  # (BLOCK_M, DSTATE)
    if HAS_SEQ_IDX:
        seq = SEQ_IDX + b * stride_seq_b + start * stride_seq_t
        seq_rows = tl.load(seq + rows * stride_seq_t, mask=row_in, other=-1)
        if THROUGH_B:  # as the chunk's own state: its last step's document
            keep = seq_rows == tl.load(seq + (limit - 1) * stride_seq_t)
        else:  # as the entering state: the previous chunk's last step's
            keep = seq_rows == tl.load(seq - stride_seq_t, mask=c >= 1, other=0)
    dv = tl.zeros((BLOCK_M, DSTATE), dtype=tl.float32)

    for i in tl.range(0, HEADS, num_stages=STAGES):
        h = first_head + i
        u = _tile(
            U + b * stride_u_b + start * stride_u_t + h * stride_u_h, rows, p, stride_u_t, stride_u_p, limit, HEADDIM
        )
        state = _tile(
            S + b * stride_s_b + c * stride_s_c + h * stride_s_h, p, n, stride_s_p, stride_s_n, HEADDIM, dstate
        )
        g = tl.dot(u, state.to(u.dtype))  # (BLOCK_M, DSTATE)
        decays = DA_CS + b * stride_da_b + h * stride_da_h + c * stride_da_c
        dda = DDA + b * stride_dda_b + h * stride_dda_h + c * stride_dda_c
        if THROUGH_B:
            da_rows = tl.load(decays + rows * stride_da_k, mask=rows < CHUNK, other=0.0).to(tl.float32)
            da_last = tl.load(decays + (CHUNK - 1) * stride_da_k).to(tl.float32)
            dt_rows = tl.load(
                DT + b * stride_dt_b + h * stride_dt_h + c * stride_dt_c + rows * stride_dt_k,
                mask=rows < CHUNK,
                other=0.0,
            ).to(tl.float32)
            scale = tl.exp(tl.minimum(da_last - da_rows, 0.0))
            if HAS_SEQ_IDX:
                scale = tl.where(keep, scale, 0.0)
            g *= (scale * dt_rows)[:, None]
            # the term of step k's decay reaches A_last − A_k: stored at k + 1, before the cumulative sum (step 0's
            # is zero)
            tl.store(dda + (rows + 1) * stride_dda_k, tl.sum(g * v, axis=1), mask=rows < CHUNK - 1)
            if pid_m == 0:
                tl.store(dda, 0.0)
        else:
            scale = tl.exp(tl.load(decays + rows * stride_da_k, mask=row_in, other=0.0).to(tl.float32))
            if HAS_SEQ_IDX:
                scale = tl.where(keep, scale, 0.0)
            g *= scale[:, None]
            tl.store(dda + rows * stride_dda_k, tl.sum(g * v, axis=1), mask=rows < CHUNK)
        dv += g

    dv_rows = DV + b * stride_dv_b + (start + rows[:, None]) * stride_dv_t + split * stride_dv_s + group * stride_dv_g
    tl.store(dv_rows + n[None, :] * stride_dv_n, dv, mask=row_in[:, None] & (n < dstate)[None, :])


def _state_grad(U, S, V, dt, dA_cumsum, seq_idx, through_B: bool, block_m, heads, num_warps, stages):
    batch, seqlen, nheads, headdim = U.shape
    _, _, nchunks, chunk = dA_cumsum.shape
    ngroups, dstate = V.shape[-2:]
    block_m = min(block_m, chunk)
    heads = launch_heads(heads, GRAD_HEADS, nheads, ngroups, chunk // block_m * batch * nchunks, U.device)
    splits = nheads // ngroups // heads
    dv = torch.empty(batch, seqlen, splits, ngroups, dstate, device=U.device, dtype=torch.float32)
    dda = torch.empty(batch, nheads, nchunks, chunk, device=U.device, dtype=torch.float32)
    grid = (chunk // block_m, batch * nchunks, nheads // heads)
    with torch.cuda.device(U.device.index):
        _state_grad_kernel[grid](
            U, S, V, dt, dA_cumsum, seq_idx,
            dv, dda,
            seqlen, batch, nheads // ngroups,
            *U.stride(), *S.stride(), *V.stride(), *(dt.stride() if dt is not None else (0, 0, 0, 0)),
            *dA_cumsum.stride(), *seq_idx_strides(seq_idx), *dv.stride(), *dda.stride(),
            CHUNK=chunk, HEADDIM=headdim, DSTATE=max(triton.next_power_of_2(dstate), 16), dstate=dstate,
            THROUGH_B=through_B, HAS_SEQ_IDX=seq_idx is not None,
            BLOCK_M=block_m, HEADS=heads, STAGES=stages, num_warps=num_warps,
        )  # fmt: skip
    return sum_splits(dv), dda


def chunk_state_bwd_db(
    x: torch.Tensor,  # (batch, seqlen, nheads, headdim)
    dt: torch.Tensor,  # (batch, nheads, nchunks, chunk), after softplus
    dA_cumsum: torch.Tensor,  # like dt
    dstates: torch.Tensor,  # (batch, nchunks, nheads, headdim, dstate): the states leaving each chunk's gradient
    B: torch.Tensor,  # (batch, seqlen, ngroups, dstate)
    seq_idx: torch.Tensor | None,
    block_m: int = GRAD_BLOCK_M,
    heads: int | None = None,
    num_warps: int = GRAD_NUM_WARPS,
    stages: int = GRAD_STAGES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """B's gradient through the chunk states, (batch, seqlen, ngroups, dstate) fp32, and the decay-gradient terms
    per head and step, (batch, nheads, nchunks, chunk) fp32 before their cumulative sum over the chunk: what
    mamba_ssm's ``_chunk_state_bwd_db`` computes before that sum. ``heads`` as in ``chunk_state_fwd``; with fewer
    than a group's, the splits are summed."""
    return _state_grad(x, dstates, B, dt, dA_cumsum, seq_idx, True, block_m, heads, num_warps, stages)


def chunk_scan_bwd_dC(
    prev_states: torch.Tensor,  # (batch, nchunks, nheads, headdim, dstate): the states entering each chunk
    dA_cumsum: torch.Tensor,  # (batch, nheads, nchunks, chunk)
    dout: torch.Tensor,  # (batch, seqlen, nheads, headdim)
    C: torch.Tensor,  # (batch, seqlen, ngroups, dstate)
    seq_idx: torch.Tensor | None,
    block_m: int = GRAD_BLOCK_M,
    heads: int | None = None,
    num_warps: int = GRAD_NUM_WARPS,
    stages: int = GRAD_STAGES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """C's gradient through the states entering each chunk, (batch, seqlen, ngroups, dstate) fp32, and its
    decay-gradient terms (batch, nheads, nchunks, chunk) fp32: what mamba_ssm's ``_chunk_scan_bwd_dC`` returns."""
    return _state_grad(dout, prev_states, C, None, dA_cumsum, seq_idx, False, block_m, heads, num_warps, stages)
