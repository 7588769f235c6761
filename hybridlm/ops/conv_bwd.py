"""The backward of Mamba's short convolution with SiLU, ``silu(bias + causal depthwise conv(x))``, as one Triton
kernel that walks the tokens one row at a time.

causal_conv1d's channel-last backward took 0.30 ms a layer at the 500M config's (32768, 2304) in the graphed
training step on an H200 (``benchmarks/profile_step.py``), ~1.5 TB/s for the ~450 MB it must move (read x and the
output's gradient, write x's gradient), and 0.41 ms with packed documents (``seq_idx``). This kernel gives each
program a span of tokens and one block of channels and carries a sliding window in registers: each step loads one
new row of x and of the gradient, computes one pre-activation and its SiLU slope, and emits the input gradient of
the row three steps behind. The weight's and bias's gradients are summed per program and then over programs
(deterministic, no atomics). With documents it is ~1.4x faster than causal_conv1d's; ``ops/conv_ssd.py`` uses it
only then (the launch-shape comment below has the times).

Width 4 at most (Mamba's ``d_conv``; narrower filters are padded with zero taps in front), any row stride, unit
channel stride. With ``seq_idx`` no tap reaches across a document boundary, as in the forward. CUDA (or Triton's
interpreter); imported by the fused path that uses it (``hybridlm.ops.conv_ssd``), never by the CPU reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

WIDTH = 4  # taps the kernel is written for
# The launch shape, from ``benchmarks/own_kernels.py --kernels conv`` at the 500M config's 1x32768 on an H200 (three
# sweeps, fbd908b / aeecd50 / 70309812, over spans of 32-512 tokens, 128-512 channels, 1-4 warps; x a
# slice of in_proj's bf16 output, documents of 1000 tokens packed): causal_conv1d's backward 0.413-0.419 ms; this
# kernel 0.289 ms at spans of 64 tokens, 256 channels, 4 warps (0.290 at 128 channels and 2 warps, 0.292 at spans of
# 32, 0.298 at 128, 0.352 at 256, 0.363 at 512: fewer programs in flight, each waiting on its row's loads); 1 warp
# was slowest. Loads ahead (STAGES 2 or 3) made no difference. With one document a row: 0.286 ms against
# causal_conv1d's 0.288 (70309812), and the mixer op 2% slower with it (``op_variants.py``), so it serves documents.
# Walking several sub-spans side by side (a (rows, channels) tile a step; 9c29a38, reverted) lost at every launch
# of a 51-shape sweep: at best 0.430 ms with documents and 0.289 without at 1x32768 (causal_conv1d's 0.414 / 0.290,
# the one-row walk 0.335 / 0.377 on that card), 0.097-0.102 ms at 2x4096 against causal_conv1d's 0.058 without
# documents: more rows in flight a program did not make the walk less latency-bound.
SPAN = 64  # tokens per program
BLOCK_C = 256  # channels per program
NUM_WARPS = 4
STAGES = 2  # the token loop's software pipelining, rows loaded ahead of the one computed


@triton.jit
def _silu_slope(pre):
    """d silu(p) / dp."""
    sig = tl.sigmoid(pre)
    return sig * (1 + pre * (1 - sig))


@triton.jit
def _conv_silu_bwd_kernel(
    X, W, BIAS, DOUT, SEQ_IDX,  # X, DOUT (batch, seqlen, channels) unit channel stride; W (channels, 4); SEQ_IDX
    DX, DW_PARTIAL,  # DX like X; DW_PARTIAL (batch, spans, 5, channels) fp32: the four taps', then the bias's
    seqlen, channels, span,
    stride_x_b, stride_x_t, stride_dout_b, stride_dout_t, stride_dx_b, stride_dx_t, stride_seq_b,
    HAS_BIAS: tl.constexpr,
    HAS_SEQ_IDX: tl.constexpr,
    BLOCK_C: tl.constexpr,
    STAGES: tl.constexpr,
):  # fmt: skip
    pid_t, pid_c, b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < channels
    # tap k multiplies x at t - 3 + k in output t
    w0 = tl.load(W + cols * 4 + 0, mask=col_mask, other=0.0).to(tl.float32)
    w1 = tl.load(W + cols * 4 + 1, mask=col_mask, other=0.0).to(tl.float32)
    w2 = tl.load(W + cols * 4 + 2, mask=col_mask, other=0.0).to(tl.float32)
    w3 = tl.load(W + cols * 4 + 3, mask=col_mask, other=0.0).to(tl.float32)
    bias = tl.zeros((BLOCK_C,), dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(BIAS + cols, mask=col_mask, other=0.0).to(tl.float32)
    X += b * stride_x_b
    DOUT += b * stride_dout_b
    DX += b * stride_dx_b
    SEQ_IDX += b * stride_seq_b
    t0 = pid_t * span
    t_end = tl.minimum(t0 + span, seqlen)

    # The window before the first step: x at t0-3 .. t0+2 (xm3 .. xp2), the gradient at the activation's input
    # (g) at t0 .. t0+2, document ids alike (-1 before the sequence: no tap reaches there, x is zero anyway).
    xm3 = _row(X, t0 - 3, stride_x_t, cols, col_mask, seqlen)
    xm2 = _row(X, t0 - 2, stride_x_t, cols, col_mask, seqlen)
    xm1 = _row(X, t0 - 1, stride_x_t, cols, col_mask, seqlen)
    x0 = _row(X, t0, stride_x_t, cols, col_mask, seqlen)
    xp1 = _row(X, t0 + 1, stride_x_t, cols, col_mask, seqlen)
    xp2 = _row(X, t0 + 2, stride_x_t, cols, col_mask, seqlen)
    sm3 = _doc(SEQ_IDX, t0 - 3, seqlen, HAS_SEQ_IDX)
    sm2 = _doc(SEQ_IDX, t0 - 2, seqlen, HAS_SEQ_IDX)
    sm1 = _doc(SEQ_IDX, t0 - 1, seqlen, HAS_SEQ_IDX)
    s0 = _doc(SEQ_IDX, t0, seqlen, HAS_SEQ_IDX)
    sp1 = _doc(SEQ_IDX, t0 + 1, seqlen, HAS_SEQ_IDX)
    sp2 = _doc(SEQ_IDX, t0 + 2, seqlen, HAS_SEQ_IDX)
    g0 = _grad_pre(DOUT, t0, stride_dout_t, cols, col_mask, seqlen, bias, w0, w1, w2, w3,
                   xm3, xm2, xm1, x0, sm3, sm2, sm1, s0, HAS_SEQ_IDX)  # fmt: skip
    g1 = _grad_pre(DOUT, t0 + 1, stride_dout_t, cols, col_mask, seqlen, bias, w0, w1, w2, w3,
                   xm2, xm1, x0, xp1, sm2, sm1, s0, sp1, HAS_SEQ_IDX)  # fmt: skip
    g2 = _grad_pre(DOUT, t0 + 2, stride_dout_t, cols, col_mask, seqlen, bias, w0, w1, w2, w3,
                   xm1, x0, xp1, xp2, sm1, s0, sp1, sp2, HAS_SEQ_IDX)  # fmt: skip

    dw0 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    dw1 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    dw2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    dw3 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    dbias = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for t in tl.range(t0, t_end, num_stages=STAGES):
        # one new row: x and the gradient at t+3, its pre-activation and the gradient there (g3)
        xp3 = _row(X, t + 3, stride_x_t, cols, col_mask, seqlen)
        sp3 = _doc(SEQ_IDX, t + 3, seqlen, HAS_SEQ_IDX)
        g3 = _grad_pre(DOUT, t + 3, stride_dout_t, cols, col_mask, seqlen, bias, w0, w1, w2, w3,
                       x0, xp1, xp2, xp3, s0, sp1, sp2, sp3, HAS_SEQ_IDX)  # fmt: skip
        # x at t feeds outputs t .. t+3 through taps 3 .. 0, those of its own document
        dx = w3 * g0 + _keep(w2 * g1, sp1 == s0, HAS_SEQ_IDX) + _keep(w1 * g2, sp2 == s0, HAS_SEQ_IDX)
        dx += _keep(w0 * g3, sp3 == s0, HAS_SEQ_IDX)
        tl.store(DX + _rows(t, cols) * stride_dx_t + cols, dx.to(DX.dtype.element_ty), mask=col_mask)
        # output t's taps read x at t-3 .. t
        dw0 += _keep(g0 * xm3, sm3 == s0, HAS_SEQ_IDX)
        dw1 += _keep(g0 * xm2, sm2 == s0, HAS_SEQ_IDX)
        dw2 += _keep(g0 * xm1, sm1 == s0, HAS_SEQ_IDX)
        dw3 += g0 * x0
        dbias += g0
        # slide the window one row
        xm3 = xm2
        xm2 = xm1
        xm1 = x0
        x0 = xp1
        xp1 = xp2
        xp2 = xp3
        sm3 = sm2
        sm2 = sm1
        sm1 = s0
        s0 = sp1
        sp1 = sp2
        sp2 = sp3
        g0 = g1
        g1 = g2
        g2 = g3

    partial = DW_PARTIAL + (b * tl.num_programs(0) + pid_t) * 5 * channels + cols
    tl.store(partial, dw0, mask=col_mask)
    tl.store(partial + channels, dw1, mask=col_mask)
    tl.store(partial + 2 * channels, dw2, mask=col_mask)
    tl.store(partial + 3 * channels, dw3, mask=col_mask)
    tl.store(partial + 4 * channels, dbias, mask=col_mask)


@triton.jit
def _row(PTR, t, stride_t, cols, col_mask, seqlen):
    """Row ``t`` of a (seqlen, channels) tensor in fp32, zero outside the sequence."""
    rows = _rows(t, cols)
    mask = col_mask & (rows >= 0) & (rows < seqlen)
    return tl.load(PTR + rows * stride_t + cols, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _rows(t, cols):
    """Row ``t`` repeated for each of ``cols``, int64: offsets past 2**31 elements stay exact, and Triton's
    interpreter (where ``t`` may be a Python int) takes the bounds masks as vectors."""
    return tl.full(cols.shape, 0, tl.int64) + t


@triton.jit
def _doc(SEQ_IDX, t, seqlen, HAS_SEQ_IDX: tl.constexpr):
    """The document id at ``t``, -1 outside the sequence; 0 everywhere without ``seq_idx`` (never compared then)."""
    if HAS_SEQ_IDX:
        return tl.load(SEQ_IDX + t, mask=(t >= 0) & (t < seqlen), other=-1)
    else:
        return tl.full((), 0, tl.int32)


@triton.jit
def _keep(value, same_doc, HAS_SEQ_IDX: tl.constexpr):
    """``value`` where a tap stays within its document, else zero; without ``seq_idx`` every tap does."""
    if HAS_SEQ_IDX:
        return tl.where(same_doc, value, 0.0)
    else:
        return value


@triton.jit
def _grad_pre(
    DOUT, t, stride_t, cols, col_mask, seqlen, bias, w0, w1, w2, w3, xa, xb, xc, xd, sa, sb, sc, sd,
    HAS_SEQ_IDX: tl.constexpr,
):  # fmt: skip
    """The gradient at the activation's input of output ``t``, whose taps read ``xa .. xd`` (x at t-3 .. t, of
    documents ``sa .. sd``); zero past the sequence's end (the output's gradient loads as zero there)."""
    pre = bias + w3 * xd + _keep(w2 * xc, sc == sd, HAS_SEQ_IDX) + _keep(w1 * xb, sb == sd, HAS_SEQ_IDX)
    pre += _keep(w0 * xa, sa == sd, HAS_SEQ_IDX)
    return _row(DOUT, t, stride_t, cols, col_mask, seqlen) * _silu_slope(pre)


def causal_conv1d_silu_bwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    dout: torch.Tensor,
    seq_idx: torch.Tensor | None = None,
    dx: torch.Tensor | None = None,
    span: int = SPAN,
    block_c: int = BLOCK_C,
    num_warps: int = NUM_WARPS,
    stages: int = STAGES,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gradients of ``silu(bias + causal depthwise conv(x, weight))`` from the output's gradient ``dout``.
    ``x``, ``dout`` (and ``dx`` when given: a view the kernel writes into, a slice of in_proj's gradient say) are
    (batch, seqlen, channels) with unit channel stride and any batch and row strides; ``weight`` (channels, width
    <= 4); ``seq_idx`` (batch, seqlen) int32, contiguous. ``span`` (tokens per program), ``block_c`` (channels per
    program), ``num_warps`` and ``stages`` (rows loaded ahead) are the launch's shape. Returns ``(dx, dweight,
    dbias)``, the last two in the parameters' dtypes."""
    batch, seqlen, channels = x.shape
    width = weight.shape[-1]
    if weight.shape != (channels, width) or width > WIDTH:
        raise ValueError(f"causal_conv1d_silu_bwd: weight {tuple(weight.shape)} must be ({channels}, width <= 4)")
    for name, t in (("dout", dout),) + ((("dx", dx),) if dx is not None else ()):
        if t.shape != x.shape or t.stride(-1) != 1:
            raise ValueError(f"causal_conv1d_silu_bwd: {name} {tuple(t.shape)} must be {tuple(x.shape)}, unit stride")
    if x.stride(-1) != 1:
        raise ValueError("causal_conv1d_silu_bwd: x must have unit channel stride")
    if seq_idx is not None and (seq_idx.shape != (batch, seqlen) or seq_idx.dtype != torch.int32):
        raise ValueError(f"causal_conv1d_silu_bwd: seq_idx must be ({batch}, {seqlen}) int32")
    dx = torch.empty_like(x) if dx is None else dx
    # narrower filters: zero taps in front, so tap k still reads x at t - 3 + k
    w4 = weight if width == WIDTH else torch.nn.functional.pad(weight, (WIDTH - width, 0))
    w4 = w4.contiguous()
    spans = triton.cdiv(seqlen, span)
    dw_partial = torch.empty((batch, spans, WIDTH + 1, channels), dtype=torch.float32, device=x.device)
    if seqlen > 0 and batch > 0:
        seq = seq_idx.contiguous() if seq_idx is not None else x  # any pointer: never read without seq_idx
        _conv_silu_bwd_kernel[(spans, triton.cdiv(channels, block_c), batch)](
            x, w4, bias if bias is not None else w4, dout, seq,
            dx, dw_partial,
            seqlen, channels, span,
            x.stride(0), x.stride(1), dout.stride(0), dout.stride(1), dx.stride(0), dx.stride(1),
            seqlen if seq_idx is None else seq.stride(0),
            HAS_BIAS=bias is not None, HAS_SEQ_IDX=seq_idx is not None,
            BLOCK_C=block_c, STAGES=stages, num_warps=num_warps,
        )  # fmt: skip
    else:
        dw_partial.zero_()
    sums = dw_partial.sum((0, 1))  # (5, channels)
    dweight = sums[WIDTH - width : WIDTH].t().to(weight.dtype)
    dbias = sums[WIDTH].to(bias.dtype) if bias is not None else None
    return dx, dweight, dbias
