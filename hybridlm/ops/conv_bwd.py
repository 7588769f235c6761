"""The backward of Mamba's short causal depthwise conv (with its SiLU), channel-last, as one Triton kernel.

causal_conv1d's channel-last backward took 0.31 ms a layer at the 500M config's 8x4096 (32768 rows of 2304
channels, width 4: 6.4 ms of a step, ``benchmarks/profile_step.py``), where reading x and the output's gradient
and writing x's gradient moves 453 MB, ~0.10 ms at the H200's bandwidth. This kernel reads and writes the same
tensors: each program walks tiles of rows of one sequence and recomputes the conv's pre-activation at the
``width`` output positions every input row feeds (the extra reads of x hit the cache), so x's gradient is
finished in one pass; the weight's and bias's gradients are summed per program in fp32 and the partial sums
added after the kernel (deterministic, no atomics). With ``seq_idx`` no tap reaches across a document boundary,
as in the forward (``hybridlm.ops.conv.causal_conv1d_ref``); there are no initial states.

CUDA only; imported by the fused paths that use it (``hybridlm.ops.conv_ssd``), never by the CPU reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# The launch shape, from benchmarks/own_kernels.py --kernels conv at the 500M config's shapes on an H200.
BLOCK_T = 16  # rows per tile
BLOCK_C = 128  # channels per tile
PROGRAMS_PER_SM = 4  # programs along the sequence: each sums its rows' weight gradient, added after the kernel
NUM_WARPS = 4


@triton.jit
def _causal_conv1d_bwd_kernel(
    X, W, BIAS, DOUT, SEQ_IDX,  # X, DOUT (batch, seqlen, channels), unit channel stride; W (channels, width)
    DX, DWB_PARTIAL,  # DX like X; DWB_PARTIAL (programs, channels * width + channels) fp32
    seqlen, channels, rows_per_program,
    stride_x_b, stride_x_t, stride_w_c, stride_dout_b, stride_dout_t, stride_dx_b, stride_dx_t, stride_seq_b,
    WIDTH: tl.constexpr,
    TAPS: tl.constexpr,  # WIDTH rounded up to a power of two
    HAS_BIAS: tl.constexpr,
    HAS_SEQ_IDX: tl.constexpr,
    SILU: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):  # fmt: skip
    pid_t = tl.program_id(0)
    pid_c = tl.program_id(1)
    batch = tl.program_id(2).to(tl.int64)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < channels
    taps = tl.arange(0, TAPS)
    tap_ok = taps < WIDTH
    w = tl.load(W + cols[None, :] * stride_w_c + taps[:, None], mask=tap_ok[:, None] & col_ok[None, :], other=0.0).to(
        tl.float32
    )  # (TAPS, BLOCK_C): tap k multiplies x at row t - (WIDTH - 1) + k
    if HAS_BIAS:
        bias = tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)
    x_base = X + batch * stride_x_b
    dout_base = DOUT + batch * stride_dout_b
    if HAS_SEQ_IDX:
        seq_base = SEQ_IDX + batch * stride_seq_b
    dw = tl.zeros((TAPS, BLOCK_C), dtype=tl.float32)
    db = tl.zeros((BLOCK_C,), dtype=tl.float32)
    first_row = pid_t * rows_per_program
    for block_start in range(first_row, tl.minimum(first_row + rows_per_program, seqlen), BLOCK_T):
        rows = block_start + tl.arange(0, BLOCK_T)  # the rows of x whose gradient this tile writes
        if HAS_SEQ_IDX:
            row_doc = tl.load(seq_base + rows, mask=rows < seqlen, other=-1)
        dx = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
        # x at row t feeds the outputs at t + j, j < WIDTH, through tap WIDTH - 1 - j
        for j in tl.static_range(WIDTH):
            out_rows = rows + j
            out_ok = out_rows < seqlen
            src = out_rows[:, None] - (WIDTH - 1) + taps[None, :]  # (BLOCK_T, TAPS): the rows output t + j reads
            src_ok = (src >= 0) & tap_ok[None, :] & out_ok[:, None]
            if HAS_SEQ_IDX:
                out_doc = tl.load(seq_base + out_rows, mask=out_ok, other=-2)
                src_doc = tl.load(seq_base + src, mask=src_ok, other=-3)
                src_ok = src_ok & (src_doc == out_doc[:, None])
            xs = tl.load(
                x_base + src.to(tl.int64)[:, :, None] * stride_x_t + cols[None, None, :],
                mask=src_ok[:, :, None] & col_ok[None, None, :],
                other=0.0,
            ).to(tl.float32)  # (BLOCK_T, TAPS, BLOCK_C)
            pre = tl.sum(xs * w[None, :, :], axis=1)  # (BLOCK_T, BLOCK_C)
            if HAS_BIAS:
                pre += bias[None, :]
            mask = out_ok[:, None] & col_ok[None, :]
            dpre = tl.load(
                dout_base + out_rows.to(tl.int64)[:, None] * stride_dout_t + cols[None, :], mask=mask, other=0.0
            ).to(tl.float32)
            if SILU:
                sig = tl.sigmoid(pre)
                dpre = dpre * sig * (1 + pre * (1 - sig))
            if j == 0:  # each output row's gradient enters the weight's and bias's sums once
                dw += tl.sum(dpre[:, None, :] * xs, axis=0)
                db += tl.sum(dpre, axis=0)
            if HAS_SEQ_IDX:
                dpre = tl.where((out_doc == row_doc)[:, None], dpre, 0.0)
            w_tap = tl.load(W + cols * stride_w_c + (WIDTH - 1 - j), mask=col_ok, other=0.0).to(tl.float32)
            dx += dpre * w_tap[None, :]
        tl.store(
            DX + batch * stride_dx_b + rows.to(tl.int64)[:, None] * stride_dx_t + cols[None, :],
            dx.to(DX.dtype.element_ty),
            mask=(rows < seqlen)[:, None] & col_ok[None, :],
        )
    partial = DWB_PARTIAL + (tl.program_id(2) * tl.num_programs(0) + pid_t) * (channels * (WIDTH + 1))
    tl.store(partial + cols[None, :] * WIDTH + taps[:, None], dw, mask=tap_ok[:, None] & col_ok[None, :])
    tl.store(partial + channels * WIDTH + cols, db, mask=col_ok)


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gradients of ``silu(causal_conv1d(x, weight, bias))`` (or the conv alone when ``silu`` is False) from the
    output's gradient ``dout``. ``x`` and ``dout`` are channel-last (batch, seqlen, channels) with unit channel
    stride and any row stride (``x`` a slice of in_proj's output, say); ``weight`` (channels, width); ``seq_idx``
    (batch, seqlen) int; ``dx``, when given, is a view like ``x`` the kernel writes into. ``block_t``,
    ``block_c``, ``programs_per_sm`` and ``num_warps`` are the launch's shape (``benchmarks/own_kernels.py``
    sweeps them). Returns ``(dx, dweight, dbias)``, the last two in the parameters' dtypes."""
    batch, seqlen, channels = x.shape
    width = weight.shape[1]
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
    per_row = max(1, min(triton.cdiv(seqlen, block_t), triton.cdiv(sm_count * programs_per_sm, batch * col_blocks)))
    rows_per_program = triton.cdiv(triton.cdiv(seqlen, per_row), block_t) * block_t
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
            WIDTH=width, TAPS=triton.next_power_of_2(width), HAS_BIAS=bias is not None,
            HAS_SEQ_IDX=seq_idx is not None, SILU=silu, BLOCK_T=block_t, BLOCK_C=block_c, num_warps=num_warps,
        )  # fmt: skip
    sums = partial.sum(0)
    dweight = sums[: channels * width].view(channels, width).to(weight.dtype)
    dbias = sums[channels * width :].to(bias.dtype) if bias is not None else None
    return dx, dweight, dbias
