"""The backward of Mamba's depthwise causal conv + SiLU in channel-last layout ((batch, seqlen, channels) with unit
channel stride: a slice of in_proj's output), as one Triton kernel over tiles of (positions, channels).

causal_conv1d's channel-last backward took 0.31 ms a layer at the 500M config's 8x4096 (6.4 ms a step over 21
layers, ``benchmarks/profile_step.py``), ~3x the time its bytes need at the H200's bandwidth. Here each program
recomputes the conv's pre-activation for its tile and the ``width - 1`` positions after it (their gradient flows
back into the tile), so the input and the output's gradient are read from memory about once and the input's
gradient is written once; the taps' and the bias's gradients are summed per program and then across programs.
Document boundaries (``seq_idx``) are honoured as in the forward: no tap reaches across one.

CUDA only; imported by the fused paths that use it (``hybridlm.ops.conv_ssd``). The reference is autograd through
``hybridlm.ops.conv.causal_conv1d_ref``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_L = 32  # positions per tile
BLOCK_C = 128  # channels per tile
L_PER_PROGRAM = 256  # positions per program: a program's tap gradients cover this many before they are stored
NUM_WARPS = 4


@triton.jit
def _pick(k: tl.constexpr, v0, v1, v2, v3):
    """``(v0, v1, v2, v3)[k]``, resolved at compile time."""
    if k == 0:
        return v0
    elif k == 1:
        return v1
    elif k == 2:
        return v2
    else:
        return v3


@triton.jit
def _load_rows(ptr, rows, stride, cols_ok, rows_ok):
    return tl.load(ptr + rows.to(tl.int64)[:, None] * stride, mask=rows_ok[:, None] & cols_ok[None, :], other=0.0)


@triton.jit
def _causal_conv1d_silu_bwd_kernel(
    X, W, BIAS, DOUT, SEQ, DX, DW_PARTIAL, DB_PARTIAL,
    seqlen, channels,
    stride_xb, stride_xl, stride_db, stride_dl, stride_dxb, stride_dxl, stride_seqb,
    HAS_BIAS: tl.constexpr,
    HAS_SEQ: tl.constexpr,
    WIDTH: tl.constexpr,  # at most 4
    BLOCK_L: tl.constexpr,
    BLOCK_C: tl.constexpr,
    L_PER_PROGRAM: tl.constexpr,
):  # fmt: skip
    pid_bl = tl.program_id(0)
    pid_c = tl.program_id(1)
    programs_per_row = tl.cdiv(seqlen, L_PER_PROGRAM)
    b = (pid_bl // programs_per_row).to(tl.int64)
    l_start = (pid_bl % programs_per_row) * L_PER_PROGRAM
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < channels
    # the taps, each a (BLOCK_C,) vector; taps past WIDTH are zero and never used
    w0 = tl.load(W + cols * WIDTH, mask=col_ok, other=0.0).to(tl.float32)
    w1 = tl.load(W + cols * WIDTH + 1, mask=col_ok & (WIDTH > 1), other=0.0).to(tl.float32)
    w2 = tl.load(W + cols * WIDTH + 2, mask=col_ok & (WIDTH > 2), other=0.0).to(tl.float32)
    w3 = tl.load(W + cols * WIDTH + 3, mask=col_ok & (WIDTH > 3), other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros((BLOCK_C,), dtype=tl.float32)
    dw0 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    dw1 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    dw2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    dw3 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    db = tl.zeros((BLOCK_C,), dtype=tl.float32)
    x_rows = X + b * stride_xb + cols[None, :]
    dout_rows = DOUT + b * stride_db + cols[None, :]
    if HAS_SEQ:
        seq_row = SEQ + b * stride_seqb

    for l_offset in range(0, L_PER_PROGRAM, BLOCK_L):
        pos = l_start + l_offset + tl.arange(0, BLOCK_L)  # the positions whose input gradient this tile writes
        pos_ok = pos < seqlen
        if HAS_SEQ:
            seq_pos = tl.load(seq_row + pos, mask=pos_ok, other=-1)
        dx = tl.zeros((BLOCK_L, BLOCK_C), dtype=tl.float32)
        # the output at pos + j reads the input at pos through tap WIDTH - 1 - j
        for j in tl.static_range(WIDTH):
            out_pos = pos + j
            out_ok = out_pos < seqlen
            if HAS_SEQ:
                seq_out = tl.load(seq_row + out_pos, mask=out_ok, other=-2)
            pre = tl.zeros((BLOCK_L, BLOCK_C), dtype=tl.float32) + bias[None, :]
            for k in tl.static_range(WIDTH):
                src = out_pos - (WIDTH - 1) + k
                src_ok = out_ok & (src >= 0)
                if HAS_SEQ:
                    src_ok &= tl.load(seq_row + src, mask=src_ok, other=-3) == seq_out
                x = _load_rows(x_rows, src, stride_xl, col_ok, src_ok).to(tl.float32)
                pre += _pick(k, w0, w1, w2, w3)[None, :] * x
            dout = _load_rows(dout_rows, out_pos, stride_dl, col_ok, out_ok).to(tl.float32)
            sig = tl.sigmoid(pre)
            dpre = dout * sig * (1 + pre * (1 - sig))  # zero where the output is out of range
            reaches = out_ok
            if HAS_SEQ:
                reaches &= seq_out == seq_pos
            dx += tl.where(reaches[:, None], _pick(WIDTH - 1 - j, w0, w1, w2, w3)[None, :] * dpre, 0.0)
            if j == 0:  # the tile's own outputs: their taps' and bias's gradients (the inputs again, from cache)
                db += tl.sum(dpre, axis=0)
                for k in tl.static_range(WIDTH):
                    src = pos - (WIDTH - 1) + k
                    src_ok = pos_ok & (src >= 0)
                    if HAS_SEQ:
                        src_ok &= tl.load(seq_row + src, mask=src_ok, other=-3) == seq_pos
                    x = _load_rows(x_rows, src, stride_xl, col_ok, src_ok).to(tl.float32)
                    tap_grad = tl.sum(dpre * x, axis=0)
                    if k == 0:
                        dw0 += tap_grad
                    elif k == 1:
                        dw1 += tap_grad
                    elif k == 2:
                        dw2 += tap_grad
                    else:
                        dw3 += tap_grad
        tl.store(
            DX + b * stride_dxb + pos.to(tl.int64)[:, None] * stride_dxl + cols[None, :],
            dx.to(DX.dtype.element_ty),
            mask=pos_ok[:, None] & col_ok[None, :],
        )
    dw_out = DW_PARTIAL + pid_bl * channels * WIDTH + cols * WIDTH
    tl.store(dw_out, dw0, mask=col_ok)
    tl.store(dw_out + 1, dw1, mask=col_ok & (WIDTH > 1))
    tl.store(dw_out + 2, dw2, mask=col_ok & (WIDTH > 2))
    tl.store(dw_out + 3, dw3, mask=col_ok & (WIDTH > 3))
    tl.store(DB_PARTIAL + pid_bl * channels + cols, db, mask=col_ok)


def causal_conv1d_silu_bwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    dout: torch.Tensor,
    seq_idx: torch.Tensor | None = None,
    dx: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gradients of ``silu(causal_conv1d(x) + bias)`` for ``x`` and ``dout`` (batch, seqlen, channels) with unit
    channel stride (any other strides), ``weight`` (channels, width), ``seq_idx`` (batch, seqlen) int32 contiguous
    or None. ``dx``, when given, is a view the kernel writes into. Returns ``(dx, dweight, dbias)`` (``dbias`` None
    without a bias), the tap and bias gradients in the weights' dtypes."""
    batch, seqlen, channels = x.shape
    width = weight.shape[1]
    if not 1 <= width <= 4:
        raise ValueError(f"causal_conv1d_silu_bwd: conv width {width} (the kernel takes 1 to 4 taps)")
    for name, t in (("x", x), ("dout", dout)) + ((("dx", dx),) if dx is not None else ()):
        if t.shape != x.shape or t.stride(-1) != 1:
            raise ValueError(f"causal_conv1d_silu_bwd: {name} {tuple(t.shape)} must be {tuple(x.shape)}, unit stride")
    if dx is None:
        dx = torch.empty_like(x)
    programs_per_row = triton.cdiv(seqlen, L_PER_PROGRAM)
    grid = (batch * programs_per_row, triton.cdiv(channels, BLOCK_C))
    dw_partial = torch.empty((grid[0], channels, width), dtype=torch.float32, device=x.device)
    db_partial = torch.empty((grid[0], channels), dtype=torch.float32, device=x.device)
    _causal_conv1d_silu_bwd_kernel[grid](
        x, weight, bias, dout, seq_idx, dx, dw_partial, db_partial,
        seqlen, channels,
        x.stride(0), x.stride(1), dout.stride(0), dout.stride(1), dx.stride(0), dx.stride(1),
        seq_idx.stride(0) if seq_idx is not None else 0,
        HAS_BIAS=bias is not None, HAS_SEQ=seq_idx is not None,
        WIDTH=width, BLOCK_L=BLOCK_L, BLOCK_C=BLOCK_C, L_PER_PROGRAM=L_PER_PROGRAM, num_warps=NUM_WARPS,
    )  # fmt: skip
    dweight = dw_partial.sum(0).to(weight.dtype)
    dbias = db_partial.sum(0).to(bias.dtype) if bias is not None else None
    return dx, dweight, dbias
