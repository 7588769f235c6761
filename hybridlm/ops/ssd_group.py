"""Three of the SSD's chunked-scan kernels as Triton kernels whose programs walk a run of a group's heads, for the
Mamba-2 mixer (``ops/conv_ssd.py``): the scan's forward (mamba_ssm's ``_chunk_scan_fwd_kernel``), its x gradient
(``_chunk_scan_chunk_state_bwd_dx_kernel``) and, in one kernel, C·Bᵀ's gradient and the in-chunk decay gradient
(``_chunk_scan_bwd_dcb_kernel`` and ``_chunk_scan_bwd_ddAcs_stable_kernel``, which both multiply dy by xᵀ per
head), the same arithmetic as mamba_ssm's.

Per chunk and head, with A the cumulative log decays, S the state entering the chunk and dS the gradient of the one
leaving it, the forward writes for each step i (over the chunk's steps k ≤ i)

    y_i   = exp(A_i) C_i · S + Σ_k exp(A_i − A_k) (C_i · B_k) dt_k x_k + D x_i

and the backward for each step j (over the chunk's steps k ≥ j)

    dx_j  = dt_j (exp(A_last − A_j) B_j · dS + Σ_k exp(A_k − A_j) (C_k · B_j) dy_k) + D dy_j
    ddt_j = x_j · (the bracket),   dD = Σ_j dy_j · x_j

mamba_ssm gives each program one head and one tile of (rows, columns), so every program loads its rows of C (or B)
and of C·Bᵀ again, though all heads of a group share them. Here a program takes a block of a chunk's rows and holds
C's (B's) rows and C·Bᵀ's (fp32, as upstream reads it) across ``heads`` heads of one group, loading only each
head's decays, states, x and dy, its loop over the heads software-pipelined. In the backward it owns every column
of a row, so dt's gradient is stored, not added atomically, and D's is summed per row block and then over blocks
(deterministic). C·Bᵀ is multiplied by the head's decays (and dt) in fp32 and rounded to x's (dy's) dtype before
its product, as upstream does.

The third, per head and step t (over the pairs k < t ≤ i of the chunk, g_ik = dy_i · x_k dt_k exp(A_i − A_k))

    d(C_i · B_k) = Σ_heads g_ik (k ≤ i, within a document),   dA_t = Σ_{k<t≤i} g_ik (C_i · B_k)

gives a program a block of rows (i) and only the columns (k) up to its last row; the second sum, a cumulative sum
along each row and then one over the rows, comes per row block.

On CUDA the mixer calls them only where ``launches`` says their tiles fit (16-bit inputs, the shapes run on the
GPU); under Triton's interpreter any power-of-two head_dim and chunk (``MixerKernels.own_scan_fwd``, ``own_dx``
and ``own_cb_grads``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hybridlm.ops.layout import seq_idx_strides, sum_splits

# Launch shapes, from ``benchmarks/own_kernels.py --kernels scan,dx`` on an H200 at the 500M config's 1x32768
# (chunk 128, head_dim 64, d_state 128, 32 heads in one group; 3c28159, e8fd103). The x gradient: 0.349-0.351 ms a
# layer at rows 128, 32 heads, 8 warps, 3 stages against mamba_ssm's 0.409-0.413 (its wider autotuning list); 16 /
# 8 heads 0.357 / 0.372, 2 stages 0.386-0.404, rows 64 0.48-0.62 (dy and dS read twice), 4 warps 0.83-0.95 (spilled
# registers). The forward: 0.261 ms at the same shape against 0.287 (0.262 against 0.295 with documents); 16 / 8
# heads 0.267 / 0.282, 2 stages 0.314-0.332, rows 64 0.347. Working the chunk in two halves of rows and columns to
# skip C·Bᵀ's zero block (bd3c36b, reverted) was slower: 0.475 and 0.357 ms at best (six 64-row products a head).
BLOCK_M = 128  # rows of the chunk per program (both kernels: the same launch won each sweep)
HEADS = 32  # heads per program (of one group), at most: launch_heads takes fewer where the grid would leave SMs idle
NUM_WARPS = 8
STAGES = 3  # the head loop's software pipelining
# C·Bᵀ's gradient with the in-chunk decay gradient (``own_kernels.py --kernels cb``, same shape, fd9d197): 0.317 ms
# a layer at rows 32, 32 heads, 4 warps, 3 stages against mamba_ssm's two kernels' 0.347; 2 stages 0.369, 8 warps
# 0.55-0.68, 2 warps 0.46, rows 64 0.45-0.55, rows 16 0.53, 16 heads 0.37. Every row block taking all the chunk's
# columns (9906e63): 0.41 at best; summing the decay terms by column sums outside the rows' own block (b134f01):
# 0.71-2.7 (the reductions' layout changes cost more than the cumulative sums they replace).
CB_BLOCK_M = 32
CB_HEADS = 32
CB_NUM_WARPS = 4
CB_STAGES = 3


def launches(x: torch.Tensor, dstate: int, chunk: int) -> bool:
    """Whether these kernels take a scan of ``x`` (batch, seqlen, nheads, headdim): 16-bit x, head_dim 32 or 64,
    d_state up to 128 and a chunk of 32 to 128 steps, the shapes run on the GPU (the 500M config's 64 / 128 / 128,
    the GPU tests' 32 / 16 / 32). With fp32 tiles, or larger ones, a program needs more shared memory than an H200
    has (fp32 at the 500M config's shapes: ~290 KB of 227); the mixer then runs mamba_ssm's kernels, which take any
    shape."""
    headdim = x.shape[-1]
    return x.element_size() == 2 and headdim in (32, 64) and dstate <= 128 and chunk in (32, 64, 128)


@triton.jit
def _program_chunk(seqlen, batch, heads_per_group, CHUNK: tl.constexpr, HEADS: tl.constexpr):
    """What a program of these kernels' grids (row blocks, batch x chunks, runs of heads) works on: its batch row,
    chunk, run's first head and group, the chunk's first step and how many of its steps lie in the sequence."""
    pid_bc, pid_run = tl.program_id(1), tl.program_id(2)
    c, b = pid_bc // batch, pid_bc % batch
    first_head = pid_run * HEADS
    start = c * CHUNK
    return b, c, first_head, first_head // heads_per_group, start, min(CHUNK, seqlen - start)


@triton.jit
def _tile(ptr, rows, cols, stride_r, stride_c, n_rows, n_cols):
    """``ptr[rows, cols]``, zero from row ``n_rows`` and column ``n_cols`` on."""
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    return tl.load(ptr + rows[:, None] * stride_r + cols[None, :] * stride_c, mask=mask, other=0.0)


@triton.jit
def _times_state(rows, STATE, n, p, stride_n, stride_p, dstate):
    """``rows`` (of B or C, (BLOCK_M, DSTATE)) times a head's state or its gradient (stored (headdim, dstate)),
    read in the rows' dtype as upstream reads it: (BLOCK_M, HEADDIM) fp32."""
    state = _tile(STATE, n, p, stride_n, stride_p, dstate, p.shape[0])
    return tl.dot(rows, state.to(rows.dtype))


@triton.jit
def _dx_kernel(
    X, CB, DY, DT, DA_CS, SEQ_IDX, D, B, DSTATES,  # inputs; DT and DA_CS (batch, nheads, nchunks, chunk)
    DX, DDT, DD,  # DX like X; DDT like DT, fp32; DD (row blocks, batch, nchunks, nheads, D's columns) fp32
    seqlen, batch, heads_per_group,
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
    stride_dd_m, stride_dd_b, stride_dd_c, stride_dd_h,
    CHUNK: tl.constexpr,
    HEADDIM: tl.constexpr,
    DSTATE: tl.constexpr,  # a power of two, at least d_state (B and dS are masked beyond it)
    dstate,
    HAS_SEQ_IDX: tl.constexpr,
    D_HAS_HDIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    HEADS: tl.constexpr,
    STAGES: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    b, c, first_head, group, start, limit = _program_chunk(seqlen, batch, heads_per_group, CHUNK, HEADS)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # steps j of the chunk this program writes
    cols = tl.arange(0, CHUNK)  # steps k of the chunk
    p = tl.arange(0, HEADDIM)
    n = tl.arange(0, DSTATE)
    row_in = rows < limit

    # shared by the run's heads: B's rows and C·Bᵀ's (k, j) entries for j in the rows, all k, causal (k ≥ j)
    b_base = B + b * stride_b_b + start * stride_b_t + group * stride_b_g
    b_rows = _tile(b_base, rows, n, stride_b_t, stride_b_n, limit, dstate)  # (BLOCK_M, DSTATE)
    causal = (cols[None, :] >= rows[:, None]) & (cols[None, :] < limit)
    cb = tl.load(
        CB + b * stride_cb_b + c * stride_cb_c + group * stride_cb_g + cols[None, :] * stride_cb_i
        + rows[:, None] * stride_cb_j,
        mask=causal,
        other=0.0,
    ).to(tl.float32)  # (BLOCK_M, CHUNK): entry (j, k) is C_k · B_j  # fmt: skip
    if HAS_SEQ_IDX:  # the state leaving the chunk sees only the steps of its last step's document
        seq_rows = tl.load(SEQ_IDX + b * stride_seq_b + (start + rows) * stride_seq_t, mask=row_in, other=-1)
        seq_last = tl.load(SEQ_IDX + b * stride_seq_b + (start + limit - 1) * stride_seq_t)
        same_doc = seq_rows == seq_last

    for i in tl.range(0, HEADS, num_stages=STAGES):
        h = first_head + i
        decays = DA_CS + b * stride_da_b + h * stride_da_h + c * stride_da_c
        da_rows = tl.load(decays + rows * stride_da_k, mask=row_in, other=0.0).to(tl.float32)
        da_cols = tl.load(decays + cols * stride_da_k, mask=cols < limit, other=0.0).to(tl.float32)
        da_last = tl.load(decays + (CHUNK - 1) * stride_da_k).to(tl.float32)
        scale = tl.exp(tl.minimum(da_last - da_rows, 0.0))
        if HAS_SEQ_IDX:
            scale = tl.where(same_doc, scale, 0.0)

        dstates = DSTATES + b * stride_ds_b + c * stride_ds_c + h * stride_ds_h
        acc = _times_state(b_rows, dstates, n, p, stride_ds_n, stride_ds_p, dstate) * scale[:, None]

        dy_base = DY + b * stride_dy_b + start * stride_dy_t + h * stride_dy_h
        dy_cols = _tile(dy_base, cols, p, stride_dy_t, stride_dy_p, limit, HEADDIM)  # (CHUNK, HEADDIM)
        # the mask again after the exp: outside it the difference can be large and positive (inf * 0)
        weights = tl.where(causal, cb * tl.exp(tl.minimum(da_cols[None, :] - da_rows[:, None], 0.0)), 0.0)
        acc += tl.dot(weights.to(dy_cols.dtype), dy_cols)

        dt_rows = tl.load(
            DT + b * stride_dt_b + h * stride_dt_h + c * stride_dt_c + rows * stride_dt_k, mask=row_in, other=0.0
        )
        if BLOCK_M == CHUNK:  # the rows are the chunk's steps: dy is loaded
            dy_rows = dy_cols.to(tl.float32)
        else:
            dy_rows = _tile(dy_base, rows, p, stride_dy_t, stride_dy_p, limit, HEADDIM).to(tl.float32)
        x_base = X + b * stride_x_b + start * stride_x_t + h * stride_x_h
        x_rows = _tile(x_base, rows, p, stride_x_t, stride_x_p, limit, HEADDIM).to(tl.float32)
        if D_HAS_HDIM:
            d = tl.load(D + h * stride_d_h + p).to(tl.float32)
            d_partial = tl.sum(dy_rows * x_rows, axis=0)  # (HEADDIM,)
            dd_cols = p
        else:
            d = tl.load(D + h * stride_d_h).to(tl.float32)
            d_partial = tl.sum(dy_rows * x_rows)
            dd_cols = 0
        dx = acc * dt_rows.to(tl.float32)[:, None] + dy_rows * d
        tl.store(
            DX + b * stride_dx_b + (start + rows[:, None]) * stride_dx_t + h * stride_dx_h + p[None, :] * stride_dx_p,
            dx.to(DX.dtype.element_ty),
            mask=row_in[:, None],
        )
        tl.store(
            DDT + b * stride_ddt_b + h * stride_ddt_h + c * stride_ddt_c + rows * stride_ddt_k,
            tl.sum(acc * x_rows, axis=1),
            mask=rows < CHUNK,
        )
        tl.store(DD + pid_m * stride_dd_m + b * stride_dd_b + c * stride_dd_c + h * stride_dd_h + dd_cols, d_partial)


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
    block_m: int = BLOCK_M,
    heads: int | None = None,
    num_warps: int = NUM_WARPS,
    stages: int = STAGES,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dx (written into ``dx``), the dt gradient (batch, nheads, nchunks, chunk) fp32 and D's (D's shape and
    dtype): what mamba_ssm's ``_chunk_scan_chunk_state_bwd_dx`` returns. ``heads`` a program, as ``launch_heads``
    gives them (None: up to ``HEADS``)."""
    batch, seqlen, nheads, headdim = x.shape
    _, _, nchunks, chunk = dt.shape
    ngroups, dstate = B.shape[-2:]
    row_blocks = triton.cdiv(chunk, block_m)
    heads = launch_heads(heads, HEADS, nheads, ngroups, row_blocks * batch * nchunks, x.device)
    ddt = torch.empty(batch, nheads, nchunks, chunk, device=x.device, dtype=torch.float32)
    d_columns = headdim if D.dim() == 2 else 1
    dD = torch.empty(row_blocks, batch, nchunks, nheads, d_columns, device=x.device, dtype=torch.float32)
    grid = (row_blocks, batch * nchunks, nheads // heads)
    with torch.cuda.device(x.device.index):
        _dx_kernel[grid](
            x, CB, dout, dt, dA_cumsum, seq_idx, D, B, dstates,
            dx, ddt, dD,
            seqlen, batch, nheads // ngroups,
            *x.stride(), *CB.stride(), *dout.stride(), *dt.stride(), *dA_cumsum.stride(), *seq_idx_strides(seq_idx),
            D.stride(0), *B.stride(), *dstates.stride(), *dx.stride(), *ddt.stride(), *dD.stride()[:4],
            CHUNK=chunk, HEADDIM=headdim, DSTATE=max(triton.next_power_of_2(dstate), 16), dstate=dstate,
            HAS_SEQ_IDX=seq_idx is not None, D_HAS_HDIM=D.dim() == 2,
            BLOCK_M=block_m, HEADS=heads, STAGES=stages, num_warps=num_warps,
        )  # fmt: skip
    dD = dD.sum(dim=(0, 1, 2))  # (nheads, D's columns)
    return dx, ddt, (dD if D.dim() == 2 else dD[:, 0]).to(D.dtype)


@triton.jit
def _scan_fwd_kernel(
    CB, X, DT, DA_CS, SEQ_IDX, C, STATES, D,  # DT and DA_CS (batch, nheads, nchunks, chunk)
    OUT,  # like X
    seqlen, batch, heads_per_group,
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
    dstate,
    HAS_SEQ_IDX: tl.constexpr,
    D_HAS_HDIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    HEADS: tl.constexpr,
    STAGES: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    b, c, first_head, group, start, limit = _program_chunk(seqlen, batch, heads_per_group, CHUNK, HEADS)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # steps i of the chunk this program writes
    cols = tl.arange(0, CHUNK)  # steps k
    p = tl.arange(0, HEADDIM)
    n = tl.arange(0, DSTATE)
    row_in = rows < limit

    # shared by the run's heads: C's rows and C·Bᵀ's, causal (k ≤ i)
    c_base = C + b * stride_c_b + start * stride_c_t + group * stride_c_g
    c_rows = _tile(c_base, rows, n, stride_c_t, stride_c_n, limit, dstate)  # (BLOCK_M, DSTATE)
    causal = (cols[None, :] <= rows[:, None]) & (cols[None, :] < limit)
    cb = tl.load(
        CB + b * stride_cb_b + c * stride_cb_c + group * stride_cb_g + rows[:, None] * stride_cb_i
        + cols[None, :] * stride_cb_j,
        mask=causal,
        other=0.0,
    ).to(tl.float32)  # (BLOCK_M, CHUNK)  # fmt: skip
    if HAS_SEQ_IDX:  # the state entering the chunk reaches only the steps of its document
        seq_rows = tl.load(SEQ_IDX + b * stride_seq_b + (start + rows) * stride_seq_t, mask=row_in, other=-1)
        seq_prev = tl.load(SEQ_IDX + b * stride_seq_b + (start - 1) * stride_seq_t, mask=c >= 1, other=0)
        same_doc = seq_rows == seq_prev

    for i in tl.range(0, HEADS, num_stages=STAGES):
        h = first_head + i
        decays = DA_CS + b * stride_da_b + h * stride_da_h + c * stride_da_c
        da_rows = tl.load(decays + rows * stride_da_k, mask=rows < CHUNK, other=0.0).to(tl.float32)
        da_cols = tl.load(decays + cols * stride_da_k).to(tl.float32)
        dt_cols = tl.load(DT + b * stride_dt_b + h * stride_dt_h + c * stride_dt_c + cols * stride_dt_k).to(tl.float32)
        scale = tl.exp(da_rows)
        if HAS_SEQ_IDX:
            scale = tl.where(same_doc, scale, 0.0)

        states = STATES + b * stride_s_b + c * stride_s_c + h * stride_s_h
        acc = _times_state(c_rows, states, n, p, stride_s_n, stride_s_p, dstate) * scale[:, None]

        x_base = X + b * stride_x_b + start * stride_x_t + h * stride_x_h
        x_cols = _tile(x_base, cols, p, stride_x_t, stride_x_p, limit, HEADDIM)  # (CHUNK, HEADDIM)
        weights = cb * tl.exp(tl.minimum(da_rows[:, None] - da_cols[None, :], 0.0)) * dt_cols[None, :]
        acc += tl.dot(tl.where(causal, weights, 0.0).to(x_cols.dtype), x_cols)

        if BLOCK_M == CHUNK:  # the rows are the chunk's steps: x is loaded
            x_rows = x_cols.to(tl.float32)
        else:
            x_rows = _tile(x_base, rows, p, stride_x_t, stride_x_p, limit, HEADDIM).to(tl.float32)
        if D_HAS_HDIM:
            d = tl.load(D + h * stride_d_h + p).to(tl.float32)
        else:
            d = tl.load(D + h * stride_d_h).to(tl.float32)
        acc += x_rows * d
        tl.store(
            OUT + b * stride_o_b + (start + rows[:, None]) * stride_o_t + h * stride_o_h + p[None, :] * stride_o_p,
            acc.to(OUT.dtype.element_ty),
            mask=row_in[:, None],
        )


def chunk_scan_fwd(
    CB: torch.Tensor,  # (batch, nchunks, ngroups, chunk, chunk): entry (i, j) is C_i · B_j
    x: torch.Tensor,  # (batch, seqlen, nheads, headdim)
    dt: torch.Tensor,  # (batch, nheads, nchunks, chunk), after softplus
    dA_cumsum: torch.Tensor,  # like dt
    C: torch.Tensor,  # (batch, seqlen, ngroups, dstate)
    states: torch.Tensor,  # (batch, nchunks, nheads, headdim, dstate): the states entering each chunk
    D: torch.Tensor,  # (nheads,) or (nheads, headdim)
    seq_idx: torch.Tensor | None,  # (batch, seqlen) int32
    block_m: int = BLOCK_M,
    heads: int | None = None,
    num_warps: int = NUM_WARPS,
    stages: int = STAGES,
) -> torch.Tensor:
    """The scan's output with D x added, (batch, seqlen, nheads, headdim) in x's dtype: what mamba_ssm's
    ``_chunk_scan_fwd`` returns first without z. ``heads`` as in ``chunk_scan_chunk_state_bwd_dx``."""
    batch, seqlen, nheads, headdim = x.shape
    _, _, nchunks, chunk = dt.shape
    ngroups, dstate = C.shape[-2:]
    row_blocks = triton.cdiv(chunk, block_m)
    heads = launch_heads(heads, HEADS, nheads, ngroups, row_blocks * batch * nchunks, x.device)
    out = torch.empty(batch, seqlen, nheads, headdim, device=x.device, dtype=x.dtype)
    grid = (row_blocks, batch * nchunks, nheads // heads)
    with torch.cuda.device(x.device.index):
        _scan_fwd_kernel[grid](
            CB, x, dt, dA_cumsum, seq_idx, C, states, D,
            out,
            seqlen, batch, nheads // ngroups,
            *CB.stride(), *x.stride(), *dt.stride(), *dA_cumsum.stride(), *seq_idx_strides(seq_idx), *C.stride(),
            *states.stride(), D.stride(0), *out.stride(),
            CHUNK=chunk, HEADDIM=headdim, DSTATE=max(triton.next_power_of_2(dstate), 16), dstate=dstate,
            HAS_SEQ_IDX=seq_idx is not None, D_HAS_HDIM=D.dim() == 2,
            BLOCK_M=block_m, HEADS=heads, STAGES=stages, num_warps=num_warps,
        )  # fmt: skip
    return out


@triton.jit
def _cb_grads_kernel(
    X, DY, DT, DA_CS, CB, SEQ_IDX,  # DT and DA_CS (batch, nheads, nchunks, chunk)
    DCB,  # (batch, nchunks, splits, ngroups, chunk, chunk) fp32: a split's heads' sum
    DDA,  # (batch, nheads, nchunks, row blocks, chunk) fp32: the in-chunk decay gradient's part from a row block
    seqlen, batch, heads_per_group,
    stride_x_b, stride_x_t, stride_x_h, stride_x_p,
    stride_dy_b, stride_dy_t, stride_dy_h, stride_dy_p,
    stride_dt_b, stride_dt_h, stride_dt_c, stride_dt_k,
    stride_da_b, stride_da_h, stride_da_c, stride_da_k,
    stride_cb_b, stride_cb_c, stride_cb_g, stride_cb_i, stride_cb_j,
    stride_seq_b, stride_seq_t,
    stride_dcb_b, stride_dcb_c, stride_dcb_s, stride_dcb_g, stride_dcb_i, stride_dcb_j,
    stride_dda_b, stride_dda_h, stride_dda_c, stride_dda_m, stride_dda_k,
    CHUNK: tl.constexpr,
    HEADDIM: tl.constexpr,
    HAS_SEQ_IDX: tl.constexpr,
    BLOCK_M: tl.constexpr,
    HEADS: tl.constexpr,
    STAGES: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    b, c, first_head, group, start, limit = _program_chunk(seqlen, batch, heads_per_group, CHUNK, HEADS)
    split = (first_head % heads_per_group) // HEADS
    x = X + b * stride_x_b + start * stride_x_t + first_head * stride_x_h
    dy = DY + b * stride_dy_b + start * stride_dy_t + first_head * stride_dy_h
    dt = DT + b * stride_dt_b + first_head * stride_dt_h + c * stride_dt_c
    da = DA_CS + b * stride_da_b + first_head * stride_da_h + c * stride_da_c
    cb = CB + b * stride_cb_b + c * stride_cb_c + group * stride_cb_g
    seq = SEQ_IDX
    if HAS_SEQ_IDX:
        seq += b * stride_seq_b + start * stride_seq_t
    dcb = DCB + b * stride_dcb_b + c * stride_dcb_c + split * stride_dcb_s + group * stride_dcb_g
    dda = DDA + b * stride_dda_b + first_head * stride_dda_h + c * stride_dda_c + pid_m * stride_dda_m
    # causal: rows i take columns k ≤ i only, so the rows' block takes the fewest columns (a power of two) that
    # reach its last row; each width is its own compiled body
    last_row = (pid_m + 1) * BLOCK_M
    if CHUNK // 4 >= BLOCK_M and CHUNK // 4 >= 16 and last_row <= CHUNK // 4:
        _cb_grads_rows(
            x, dy, dt, da, cb, seq, dcb, dda, pid_m, limit,
            stride_x_t, stride_x_h, stride_x_p, stride_dy_t, stride_dy_h, stride_dy_p, stride_dt_h, stride_dt_k,
            stride_da_h, stride_da_k, stride_cb_i, stride_cb_j, stride_seq_t, stride_dcb_i, stride_dcb_j,
            stride_dda_h, stride_dda_k,
            CHUNK, CHUNK // 4, HEADDIM, HAS_SEQ_IDX, BLOCK_M, HEADS, STAGES,
        )  # fmt: skip
    elif CHUNK // 2 >= BLOCK_M and CHUNK // 2 >= 16 and last_row <= CHUNK // 2:
        _cb_grads_rows(
            x, dy, dt, da, cb, seq, dcb, dda, pid_m, limit,
            stride_x_t, stride_x_h, stride_x_p, stride_dy_t, stride_dy_h, stride_dy_p, stride_dt_h, stride_dt_k,
            stride_da_h, stride_da_k, stride_cb_i, stride_cb_j, stride_seq_t, stride_dcb_i, stride_dcb_j,
            stride_dda_h, stride_dda_k,
            CHUNK, CHUNK // 2, HEADDIM, HAS_SEQ_IDX, BLOCK_M, HEADS, STAGES,
        )  # fmt: skip
    else:
        _cb_grads_rows(
            x, dy, dt, da, cb, seq, dcb, dda, pid_m, limit,
            stride_x_t, stride_x_h, stride_x_p, stride_dy_t, stride_dy_h, stride_dy_p, stride_dt_h, stride_dt_k,
            stride_da_h, stride_da_k, stride_cb_i, stride_cb_j, stride_seq_t, stride_dcb_i, stride_dcb_j,
            stride_dda_h, stride_dda_k,
            CHUNK, CHUNK, HEADDIM, HAS_SEQ_IDX, BLOCK_M, HEADS, STAGES,
        )  # fmt: skip


@triton.jit
def _cb_grads_rows(
    X, DY, DT, DA, CB, SEQ, DCB, DDA,  # at the chunk (its first step) and the run's first head; CB and DCB: group
    pid_m, limit,
    stride_x_t, stride_x_h, stride_x_p, stride_dy_t, stride_dy_h, stride_dy_p, stride_dt_h, stride_dt_k,
    stride_da_h, stride_da_k, stride_cb_i, stride_cb_j, stride_seq_t, stride_dcb_i, stride_dcb_j,
    stride_dda_h, stride_dda_k,
    CHUNK: tl.constexpr,
    COLS: tl.constexpr,  # the chunk's first COLS steps: every column the rows take
    HEADDIM: tl.constexpr,
    HAS_SEQ_IDX: tl.constexpr,
    BLOCK_M: tl.constexpr,
    HEADS: tl.constexpr,
    STAGES: tl.constexpr,
):  # fmt: skip
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # steps i of the chunk (dy's)
    cols = tl.arange(0, COLS)  # steps k (x's)
    p = tl.arange(0, HEADDIM)
    row_in = rows < limit
    later = cols[None, :] < rows[:, None]  # k < i: the pairs whose decay spans step k + 1 to i

    # shared by the run's heads: C·Bᵀ's rows (across documents it is zero: the decay terms need no document mask)
    cb = tl.load(CB + rows[:, None] * stride_cb_i + cols[None, :] * stride_cb_j).to(tl.float32)  # (BLOCK_M, COLS)
    dcb = tl.zeros((BLOCK_M, COLS), dtype=tl.float32)

    for i in tl.range(0, HEADS, num_stages=STAGES):
        da_rows = tl.load(DA + i * stride_da_h + rows * stride_da_k, mask=row_in, other=0.0).to(tl.float32)
        da_cols = tl.load(DA + i * stride_da_h + cols * stride_da_k, mask=cols < limit, other=0.0).to(tl.float32)
        dt_cols = tl.load(DT + i * stride_dt_h + cols * stride_dt_k).to(tl.float32)
        dy_rows = _tile(DY + i * stride_dy_h, rows, p, stride_dy_t, stride_dy_p, limit, HEADDIM)
        x_cols = _tile(X + i * stride_x_h, cols, p, stride_x_t, stride_x_p, limit, HEADDIM)
        # the head's term of d(C_i · B_k): dy_i · x_k dt_k exp(A_i − A_k)
        term = tl.dot(dy_rows, tl.trans(x_cols)) * dt_cols[None, :]
        term *= tl.exp(tl.minimum(da_rows[:, None] - da_cols[None, :], 0.0))
        dcb += term
        # the decay gradient at step t sums term · C·Bᵀ over the pairs k < t ≤ i: per row the sum over k < t
        # (a cumulative sum), then over the rows i ≥ t; stored at t = k + 1 (zero at step 0 and past the columns)
        spans = tl.cumsum(tl.where(later, term * cb, 0.0), axis=1)
        dda = DDA + i * stride_dda_h
        tl.store(dda + (cols + 1) * stride_dda_k, tl.sum(tl.where(later, spans, 0.0), axis=0), mask=cols < CHUNK - 1)
        tl.store(dda, 0.0)
        if COLS < CHUNK:
            rest = COLS + 1 + tl.arange(0, CHUNK)
            tl.store(dda + rest * stride_dda_k, tl.zeros((CHUNK,), dtype=tl.float32), mask=rest < CHUNK)

    keep = cols[None, :] <= rows[:, None]
    if HAS_SEQ_IDX:  # C_i · B_k only within a document
        seq_rows = tl.load(SEQ + rows * stride_seq_t, mask=row_in, other=-1)
        seq_cols = tl.load(SEQ + cols * stride_seq_t, mask=cols < limit, other=-2)
        keep &= seq_rows[:, None] == seq_cols[None, :]
    dcb_rows = DCB + rows[:, None] * stride_dcb_i
    tl.store(dcb_rows + cols[None, :] * stride_dcb_j, tl.where(keep, dcb, 0.0))
    if COLS < CHUNK:  # above the diagonal
        rest = COLS + tl.arange(0, CHUNK)
        zeros = tl.zeros((BLOCK_M, CHUNK), dtype=tl.float32)
        tl.store(dcb_rows + rest[None, :] * stride_dcb_j, zeros, mask=(rest < CHUNK)[None, :])


def chunk_scan_bwd_cb_grads(
    x: torch.Tensor,  # (batch, seqlen, nheads, headdim)
    dt: torch.Tensor,  # (batch, nheads, nchunks, chunk), after softplus
    dA_cumsum: torch.Tensor,  # like dt
    dout: torch.Tensor,  # like x
    CB: torch.Tensor,  # (batch, nchunks, ngroups, chunk, chunk), zero across documents
    seq_idx: torch.Tensor | None,  # (batch, seqlen) int32
    block_m: int = CB_BLOCK_M,
    heads: int | None = None,
    num_warps: int = CB_NUM_WARPS,
    stages: int = CB_STAGES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """C·Bᵀ's gradient (batch, nchunks, ngroups, chunk, chunk) fp32 and the in-chunk decay gradient as partial
    sums per row block (batch, nheads, nchunks, row blocks, chunk) fp32: what mamba_ssm's ``_chunk_scan_bwd_dcb``
    and ``_chunk_scan_bwd_ddAcs_stable`` (before its sum over row blocks) return, from one pass over dy · xᵀ.
    ``heads`` as in ``chunk_scan_chunk_state_bwd_dx``; with fewer than a group's, the splits are summed."""
    batch, seqlen, nheads, headdim = x.shape
    _, _, nchunks, chunk = dt.shape
    ngroups = CB.shape[2]
    block_m = min(block_m, chunk)
    row_blocks = chunk // block_m
    heads = launch_heads(heads, CB_HEADS, nheads, ngroups, row_blocks * batch * nchunks, x.device)
    splits = nheads // ngroups // heads
    dcb = torch.empty(batch, nchunks, splits, ngroups, chunk, chunk, device=x.device, dtype=torch.float32)
    dda = torch.empty(batch, nheads, nchunks, row_blocks, chunk, device=x.device, dtype=torch.float32)
    grid = (row_blocks, batch * nchunks, nheads // heads)
    with torch.cuda.device(x.device.index):
        _cb_grads_kernel[grid](
            x, dout, dt, dA_cumsum, CB, seq_idx,
            dcb, dda,
            seqlen, batch, nheads // ngroups,
            *x.stride(), *dout.stride(), *dt.stride(), *dA_cumsum.stride(), *CB.stride(), *seq_idx_strides(seq_idx),
            *dcb.stride(), *dda.stride(),
            CHUNK=chunk, HEADDIM=headdim, HAS_SEQ_IDX=seq_idx is not None,
            BLOCK_M=block_m, HEADS=heads, STAGES=stages, num_warps=num_warps,
        )  # fmt: skip
    return sum_splits(dcb), dda


def _heads_per_program(heads: int, nheads: int, ngroups: int) -> int:
    """The most heads up to ``heads`` that divide a group's (a program's heads share one group's C and B)."""
    per_group = nheads // ngroups
    return max(h for h in range(1, min(heads, per_group) + 1) if per_group % h == 0)


def launch_heads(
    heads: int | None, default: int, nheads: int, ngroups: int, other_programs: int, device: torch.device
) -> int:
    """Heads a program: ``heads`` as asked (capped to divide a group's), or for None the most up to ``default`` whose
    grid covers at least three quarters of the SMs. The defaults were swept at 256 chunks (1x32768, 8x4096); at
    2x4096 the 500M config has 64, and runs of all 32 heads left half of an H200's 132 SMs idle: the scan's forward
    took 0.127 ms and its x gradient 0.165 against mamba_ssm's 0.071 and 0.106, where runs of 16 (128 programs) took
    0.068 and 0.091 and runs of 8 (256) 0.072 and 0.096 (``own_kernels.py --shape 2x4096``, 1e368a4).
    ``other_programs``: the grid's size along its other axes."""
    if heads is not None:
        return _heads_per_program(heads, nheads, ngroups)
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 0
    return _filling_heads(default, nheads, ngroups, other_programs, sms)


def _filling_heads(default: int, nheads: int, ngroups: int, other_programs: int, sms: int) -> int:
    per_group = nheads // ngroups
    runs = [h for h in range(min(default, per_group), 0, -1) if per_group % h == 0]  # most heads first
    return next((h for h in runs if 4 * other_programs * (nheads // h) >= 3 * sms), runs[-1])
