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


@triton.jit
def _tap(w2d, taps, k):
    """Column ``k`` of the (channels, taps) weight tile."""
    return tl.sum(tl.where(taps[None, :] == k, w2d, 0.0), axis=1)


@triton.jit
def _causal_conv1d_silu_bwd_kernel(
    X, W, BIAS, DOUT, SEQ, DX, DW_PARTIAL, DB_PARTIAL,
    seqlen, channels,
    stride_xb, stride_xl, stride_db, stride_dl, stride_dxb, stride_dxl, stride_seqb,
    HAS_BIAS: tl.constexpr,
    HAS_SEQ: tl.constexpr,
    WIDTH: tl.constexpr,
    WIDTH_POW2: tl.constexpr,
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
    col_mask = cols < channels
    taps = tl.arange(0, WIDTH_POW2)
    w2d = tl.load(
        W + cols[:, None] * WIDTH + taps[None, :], mask=col_mask[:, None] & (taps[None, :] < WIDTH), other=0.0
    ).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(BIAS + cols, mask=col_mask, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros((BLOCK_C,), dtype=tl.float32)
    dw = tl.zeros((BLOCK_C, WIDTH_POW2), dtype=tl.float32)
    db = tl.zeros((BLOCK_C,), dtype=tl.float32)
    x_row = X + b * stride_xb + cols[None, :]
    dout_row = DOUT + b * stride_db + cols[None, :]

    for l_offset in range(0, L_PER_PROGRAM, BLOCK_L):
        pos = l_start + l_offset + tl.arange(0, BLOCK_L)  # the positions whose input gradient this tile writes
        pos_mask = pos < seqlen
        if HAS_SEQ:
            seq_pos = tl.load(SEQ + b * stride_seqb + pos, mask=pos_mask, other=-1)
        dx = tl.zeros((BLOCK_L, BLOCK_C), dtype=tl.float32)
        # the output at pos + j reads the input at pos through tap WIDTH - 1 - j
        for j in tl.static_range(WIDTH):
            out_pos = pos + j
            out_mask = out_pos < seqlen
            if HAS_SEQ:
                seq_out = tl.load(SEQ + b * stride_seqb + out_pos, mask=out_mask, other=-2)
            pre = tl.zeros((BLOCK_L, BLOCK_C), dtype=tl.float32) + bias[None, :]
            for k in tl.static_range(WIDTH):
                src = out_pos - (WIDTH - 1) + k
                src_mask = out_mask & (src >= 0)
                if HAS_SEQ:
                    src_mask &= tl.load(SEQ + b * stride_seqb + src, mask=src_mask, other=-3) == seq_out
                x = tl.load(
                    x_row + src.to(tl.int64)[:, None] * stride_xl, mask=src_mask[:, None] & col_mask[None, :], other=0.0
                )
                pre += _tap(w2d, taps, k)[None, :] * x.to(tl.float32)
            dout = tl.load(
                dout_row + out_pos.to(tl.int64)[:, None] * stride_dl,
                mask=out_mask[:, None] & col_mask[None, :],
                other=0.0,
            )
            sig = tl.sigmoid(pre)
            dpre = dout.to(tl.float32) * sig * (1 + pre * (1 - sig))  # zero where the output is out of range
            reaches = out_mask
            if HAS_SEQ:
                reaches &= seq_out == seq_pos
            dx += tl.where(reaches[:, None], _tap(w2d, taps, WIDTH - 1 - j)[None, :] * dpre, 0.0)
            if j == 0:  # the tile's own outputs: their taps' and bias's gradients
                db += tl.sum(dpre, axis=0)
                for k in tl.static_range(WIDTH):
                    src = pos - (WIDTH - 1) + k
                    src_mask = pos_mask & (src >= 0)
                    if HAS_SEQ:
                        src_mask &= tl.load(SEQ + b * stride_seqb + src, mask=src_mask, other=-3) == seq_pos
                    x = tl.load(
                        x_row + src.to(tl.int64)[:, None] * stride_xl,
                        mask=src_mask[:, None] & col_mask[None, :],
                        other=0.0,
                    )
                    dw += tl.where(taps[None, :] == k, tl.sum(dpre * x.to(tl.float32), axis=0)[:, None], 0.0)
        tl.store(
            DX + b * stride_dxb + pos.to(tl.int64)[:, None] * stride_dxl + cols[None, :],
            dx.to(DX.dtype.element_ty),
            mask=pos_mask[:, None] & col_mask[None, :],
        )
    tl.store(
        DW_PARTIAL + pid_bl * channels * WIDTH + cols[:, None] * WIDTH + taps[None, :],
        dw,
        mask=col_mask[:, None] & (taps[None, :] < WIDTH),
    )
    tl.store(DB_PARTIAL + pid_bl * channels + cols, db, mask=col_mask)


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
        WIDTH=width, WIDTH_POW2=triton.next_power_of_2(width),
        BLOCK_L=BLOCK_L, BLOCK_C=BLOCK_C, L_PER_PROGRAM=L_PER_PROGRAM, num_warps=4,
    )  # fmt: skip
    dweight = dw_partial.sum(0).to(weight.dtype)
    dbias = db_partial.sum(0).to(bias.dtype) if bias is not None else None
    return dx, dweight, dbias
