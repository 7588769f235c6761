"""The backward of Mamba's short causal depthwise conv (with its SiLU), channel-last, as one Triton kernel.

causal_conv1d's channel-last backward took 0.31 ms a layer at the 500M config's 8x4096 (32768 rows of 2304
channels, width 4: 6.4 ms of a step, ``benchmarks/profile_step.py``), where reading x and the output's gradient
and writing x's gradient moves 453 MB, ~0.10 ms at the H200's bandwidth. This kernel reads and writes the same
tensors: each program walks tiles of rows of one sequence, computes the gradient at the conv's pre-activation
once per row (the SiLU's derivative needs the pre-activation: recomputed from four shifted tiles of x, three of
them hits in the cache) and finishes x's gradient from it and its rows shifted by one to three (``tl.gather``
within the tile; tiles overlap by three rows); the weight's and bias's gradients are summed per program in fp32
and the partial sums added after the kernel (deterministic, no atomics). With ``seq_idx`` no tap reaches across a
document boundary, as in the forward (``hybridlm.ops.conv.causal_conv1d_ref``); there are no initial states.

CUDA only; imported by the fused paths that use it (``hybridlm.ops.conv_ssd``), never by the CPU reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# The launch shape, from benchmarks/own_kernels.py --kernels conv at the 500M config's shapes on an H200.
BLOCK_T = 32  # rows per tile
BLOCK_C = 64  # channels per tile
PROGRAMS_PER_SM = 8  # programs along the sequence: each sums its rows' weight gradient, added after the kernel
NUM_WARPS = 4
RECOMPUTE = False  # the later rows' gradients recomputed, else shifted within the tile (tl.gather)


@triton.jit
def _rows_of(base, rows, stride_t, cols, seqlen, col_ok):
    """(BLOCK_T, BLOCK_C) fp32 tile at ``rows`` (zero outside the sequence)."""
    ok = (rows >= 0) & (rows < seqlen)
    ptrs = base + rows.to(tl.int64)[:, None] * stride_t + cols[None, :]
    return tl.load(ptrs, mask=ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)


@triton.jit
def _docs_of(seq_base, rows, seqlen):
    return tl.load(seq_base + rows, mask=(rows >= 0) & (rows < seqlen), other=-1)


@triton.jit
def _same_doc(x, doc, out_doc, HAS_SEQ_IDX: tl.constexpr):
    """``x`` where its row is in the output row's document, else 0."""
    if HAS_SEQ_IDX:
        x = tl.where((doc == out_doc)[:, None], x, 0.0)
    return x


@triton.jit
def _tap(W, cols, stride_w_c, col_ok, k: tl.constexpr, WIDTH: tl.constexpr):
    """Tap ``k`` of the conv padded to 4 taps on the left (taps before ``4 - WIDTH`` are 0)."""
    if k >= 4 - WIDTH:
        return tl.load(W + cols * stride_w_c + (k - (4 - WIDTH)), mask=col_ok, other=0.0).to(tl.float32)
    else:
        return tl.zeros(cols.shape, dtype=tl.float32)


@triton.jit
def _pre_grad(
    x_base, dout_base, seq_base, out_rows, stride_x_t, stride_dout_t, cols, seqlen, col_ok, w0, w1, w2, w3, BIAS,
    HAS_BIAS: tl.constexpr, HAS_SEQ_IDX: tl.constexpr, SILU: tl.constexpr,
):  # fmt: skip
    """The gradient at the pre-activation of the outputs at ``out_rows``, and the four rows of x each reads
    (oldest first; rows of other documents zeroed)."""
    xm3 = _rows_of(x_base, out_rows - 3, stride_x_t, cols, seqlen, col_ok)
    xm2 = _rows_of(x_base, out_rows - 2, stride_x_t, cols, seqlen, col_ok)
    xm1 = _rows_of(x_base, out_rows - 1, stride_x_t, cols, seqlen, col_ok)
    x0 = _rows_of(x_base, out_rows, stride_x_t, cols, seqlen, col_ok)
    if HAS_SEQ_IDX:
        doc = _docs_of(seq_base, out_rows, seqlen)
        xm3 = _same_doc(xm3, _docs_of(seq_base, out_rows - 3, seqlen), doc, HAS_SEQ_IDX)
        xm2 = _same_doc(xm2, _docs_of(seq_base, out_rows - 2, seqlen), doc, HAS_SEQ_IDX)
        xm1 = _same_doc(xm1, _docs_of(seq_base, out_rows - 1, seqlen), doc, HAS_SEQ_IDX)
    dpre = _rows_of(dout_base, out_rows, stride_dout_t, cols, seqlen, col_ok)
    if SILU:
        pre = w0 * xm3 + w1 * xm2 + w2 * xm1 + w3 * x0
        if HAS_BIAS:
            pre += tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        sig = tl.sigmoid(pre)
        dpre = dpre * sig * (1 + pre * (1 - sig))
    return dpre, xm3, xm2, xm1, x0


@triton.jit
def _shifted(t, j: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """Row i of the result is row i + j of ``t`` (the last rows repeat the tile's last: never used)."""
    idx = tl.minimum(tl.arange(0, BLOCK_T) + j, BLOCK_T - 1)
    return tl.gather(t, tl.broadcast_to(idx[:, None], (BLOCK_T, BLOCK_C)), axis=0)


@triton.jit
def _causal_conv1d_bwd_kernel(
    X, W, BIAS, DOUT, SEQ_IDX,  # X, DOUT (batch, seqlen, channels), unit channel stride; W (channels, width)
    DX, DWB_PARTIAL,  # DX like X; DWB_PARTIAL (programs, channels * width + channels) fp32
    seqlen, channels, rows_per_program,
    stride_x_b, stride_x_t, stride_w_c, stride_dout_b, stride_dout_t, stride_dx_b, stride_dx_t, stride_seq_b,
    WIDTH: tl.constexpr,  # 2 to 4, padded to 4 taps: tap k reads x at row t - 3 + k
    HAS_BIAS: tl.constexpr,
    HAS_SEQ_IDX: tl.constexpr,
    SILU: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
    RECOMPUTE: tl.constexpr,
    STEP: tl.constexpr,  # rows of x's gradient a tile finishes: BLOCK_T, or BLOCK_T - 3 without RECOMPUTE
):  # fmt: skip
    pid_t = tl.program_id(0)
    pid_c = tl.program_id(1)
    batch = tl.program_id(2).to(tl.int64)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < channels
    w0 = _tap(W, cols, stride_w_c, col_ok, 0, WIDTH)[None, :]
    w1 = _tap(W, cols, stride_w_c, col_ok, 1, WIDTH)[None, :]
    w2 = _tap(W, cols, stride_w_c, col_ok, 2, WIDTH)[None, :]
    w3 = _tap(W, cols, stride_w_c, col_ok, 3, WIDTH)[None, :]
    x_base = X + batch * stride_x_b
    dout_base = DOUT + batch * stride_dout_b
    seq_base = SEQ_IDX + batch * stride_seq_b if HAS_SEQ_IDX else SEQ_IDX
    # the weight's and bias's gradients, summed over rows once after the loop
    dw0 = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    dw1 = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    dw2 = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    dw3 = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    db = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    first_row = pid_t * rows_per_program
    last_row = tl.minimum(first_row + rows_per_program, seqlen)
    # Each tile computes the pre-activation's gradient at BLOCK_T rows and finishes x's gradient at the first
    # STEP of them (x at row t feeds the outputs at t .. t + 3): with the gradient shifted within the tile
    # (RECOMPUTE False), tiles overlap by 3 rows; else the three later rows' gradients are recomputed.
    for block_start in range(first_row, last_row, STEP):
        local = tl.arange(0, BLOCK_T)
        rows = block_start + local
        owned = (local < STEP) & (rows < last_row)
        dpre, xm3, xm2, xm1, x0 = _pre_grad(
            x_base, dout_base, seq_base, rows, stride_x_t, stride_dout_t, cols, seqlen, col_ok, w0, w1, w2, w3,
            BIAS, HAS_BIAS, HAS_SEQ_IDX, SILU,
        )  # fmt: skip
        g = tl.where(owned[:, None], dpre, 0.0)  # each output row enters the sums once
        dw0 += g * xm3
        dw1 += g * xm2
        dw2 += g * xm1
        dw3 += g * x0
        db += g
        # x's gradient at row t: the taps' products with the pre-activation's gradient at t .. t + 3
        if RECOMPUTE:
            g1, _, _, _, _ = _pre_grad(
                x_base, dout_base, seq_base, rows + 1, stride_x_t, stride_dout_t, cols, seqlen, col_ok, w0, w1, w2,
                w3, BIAS, HAS_BIAS, HAS_SEQ_IDX, SILU,
            )  # fmt: skip
            g2, _, _, _, _ = _pre_grad(
                x_base, dout_base, seq_base, rows + 2, stride_x_t, stride_dout_t, cols, seqlen, col_ok, w0, w1, w2,
                w3, BIAS, HAS_BIAS, HAS_SEQ_IDX, SILU,
            )  # fmt: skip
            g3, _, _, _, _ = _pre_grad(
                x_base, dout_base, seq_base, rows + 3, stride_x_t, stride_dout_t, cols, seqlen, col_ok, w0, w1, w2,
                w3, BIAS, HAS_BIAS, HAS_SEQ_IDX, SILU,
            )  # fmt: skip
        else:
            g1 = _shifted(dpre, 1, BLOCK_T, BLOCK_C)
            g2 = _shifted(dpre, 2, BLOCK_T, BLOCK_C)
            g3 = _shifted(dpre, 3, BLOCK_T, BLOCK_C)
        if HAS_SEQ_IDX:
            d0 = _docs_of(seq_base, rows, seqlen)
            g1 = _same_doc(g1, _docs_of(seq_base, rows + 1, seqlen), d0, HAS_SEQ_IDX)
            g2 = _same_doc(g2, _docs_of(seq_base, rows + 2, seqlen), d0, HAS_SEQ_IDX)
            g3 = _same_doc(g3, _docs_of(seq_base, rows + 3, seqlen), d0, HAS_SEQ_IDX)
        dx = w3 * dpre + w2 * g1 + w1 * g2 + w0 * g3
        tl.store(
            DX + batch * stride_dx_b + rows.to(tl.int64)[:, None] * stride_dx_t + cols[None, :],
            dx.to(DX.dtype.element_ty),
            mask=owned[:, None] & col_ok[None, :],
        )
    partial = DWB_PARTIAL + (tl.program_id(2) * tl.num_programs(0) + pid_t) * (channels * (WIDTH + 1))
    # padded tap k is the weight's tap k - (4 - WIDTH)
    if WIDTH >= 4:
        tl.store(partial + cols * WIDTH + (0 - (4 - WIDTH)), tl.sum(dw0, axis=0), mask=col_ok)
    if WIDTH >= 3:
        tl.store(partial + cols * WIDTH + (1 - (4 - WIDTH)), tl.sum(dw1, axis=0), mask=col_ok)
    tl.store(partial + cols * WIDTH + (2 - (4 - WIDTH)), tl.sum(dw2, axis=0), mask=col_ok)
    tl.store(partial + cols * WIDTH + (3 - (4 - WIDTH)), tl.sum(dw3, axis=0), mask=col_ok)
    tl.store(partial + channels * WIDTH + cols, tl.sum(db, axis=0), mask=col_ok)


def causal_conv1d_bwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    dout: torch.Tensor,
    seq_idx: torch.Tensor | None = None,
    dx: torch.Tensor | None = None,
    silu: bool = True,
    block_t: int = BLOCK_T,
    block_c: int = BLOCK_C,
    programs_per_sm: int = PROGRAMS_PER_SM,
    num_warps: int = NUM_WARPS,
    recompute: bool = RECOMPUTE,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gradients of ``silu(causal_conv1d(x, weight, bias))`` (or the conv alone when ``silu`` is False) from the
    output's gradient ``dout``. ``x`` and ``dout`` are channel-last (batch, seqlen, channels) with unit channel
    stride and any row stride (``x`` a slice of in_proj's output, say); ``weight`` (channels, width); ``seq_idx``
    (batch, seqlen) int; ``dx``, when given, is a view like ``x`` the kernel writes into. ``block_t``,
    ``block_c``, ``programs_per_sm`` and ``num_warps`` are the launch's shape (``benchmarks/own_kernels.py``
    sweeps them). Returns ``(dx, dweight, dbias)``, the last two in the parameters' dtypes."""
    batch, seqlen, channels = x.shape
    width = weight.shape[1]
    if not 2 <= width <= 4:
        raise ValueError(f"causal_conv1d_bwd: width {width} is not 2, 3 or 4")
    named = (("x", x), ("dout", dout)) + ((("dx", dx),) if dx is not None else ())
    for name, t in named:
        if t.shape != x.shape or t.stride(-1) != 1:
            raise ValueError(f"causal_conv1d_bwd: {name} {tuple(t.shape)} must be {tuple(x.shape)}, unit stride")
    if weight.shape[0] != channels or weight.stride(-1) != 1:
        raise ValueError(f"causal_conv1d_bwd: weight {tuple(weight.shape)} must be ({channels}, width), unit stride")
    if seq_idx is not None and seq_idx.shape != (batch, seqlen):
        raise ValueError(f"causal_conv1d_bwd: seq_idx {tuple(seq_idx.shape)} must be ({batch}, {seqlen})")
    dx = torch.empty_like(x) if dx is None else dx
    sm_count = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 1
    col_blocks = triton.cdiv(channels, block_c)
    if block_t < 8:
        raise ValueError(f"causal_conv1d_bwd: block_t {block_t} must be at least 8 (tiles overlap by 3 rows)")
    step = block_t if recompute else block_t - 3  # rows of x's gradient a tile finishes
    per_row = max(1, min(triton.cdiv(seqlen, step), triton.cdiv(sm_count * programs_per_sm, batch * col_blocks)))
    rows_per_program = triton.cdiv(triton.cdiv(seqlen, per_row), step) * step
    per_row = max(1, triton.cdiv(seqlen, rows_per_program))
    # every program writes its whole slice of the partial sums (zeros only when there is nothing to launch)
    alloc = torch.empty if seqlen else torch.zeros
    partial = alloc((batch * per_row, channels * (width + 1)), dtype=torch.float32, device=x.device)
    if seqlen:
        _causal_conv1d_bwd_kernel[(per_row, col_blocks, batch)](
            x, weight, bias, dout, seq_idx, dx, partial,
            seqlen, channels, rows_per_program,
            x.stride(0), x.stride(1), weight.stride(0), dout.stride(0), dout.stride(1), dx.stride(0), dx.stride(1),
            seq_idx.stride(0) if seq_idx is not None else 0,
            WIDTH=width, HAS_BIAS=bias is not None,
            HAS_SEQ_IDX=seq_idx is not None, SILU=silu, BLOCK_T=block_t, BLOCK_C=block_c, RECOMPUTE=recompute,
            STEP=step, num_warps=num_warps,
        )  # fmt: skip
    sums = partial.sum(0)
    dweight = sums[: channels * width].view(channels, width).to(weight.dtype)
    dbias = sums[channels * width :].to(bias.dtype) if bias is not None else None
    return dx, dweight, dbias
