"""The SSD's state passing across chunks, forward and backward, as tiled scans in Triton.

Between the chunked scan's kernels, each head's state crosses the chunks in order: the state entering chunk
``c + 1`` is ``exp(dA_c) * (state entering c) + (state chunk c produces from zero)``, ``dA_c`` the chunk's total
log decay (zero across a document boundary when documents are packed). mamba_ssm's ``_state_passing_fwd/bwd``
walk the chunks one at a time, each step waiting for its loads: ~0.6 µs a chunk forward and ~1.1 backward on an
H200, which at batch 1 and 32768 tokens (256 chunks of 128) is 9.7 ms of a training step for a few MB a layer
(README, Performance). These kernels load ``BLOCK_C`` chunks at once and combine them with an associative scan
(the pair (decay, state) composes like an affine map), carrying one state from tile to tile, so a program waits
on ``nchunks / BLOCK_C`` loads in sequence instead of ``nchunks``.

The contract is the one ``ops/conv_ssd.py`` uses of mamba_ssm's functions, with no initial state and no final
state's gradient: the forward returns the states entering each chunk (the first one zero); the backward returns
the gradient of each chunk's own state, and that of each chunk's ``dA_c`` as partial sums per block of the state's
elements (``decay_grad`` adds them up with the rest of the decays' gradient). Results equal mamba_ssm's up to
the order of fp32 additions (``tests/ops/test_triton_interpreted.py`` holds them to autograd through
``ssd.state_passing_ref``; the GPU tests to mamba_ssm's kernels).

CUDA only; imported by the fused path that uses it (``hybridlm.ops.conv_ssd``), never by the CPU reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# The launch shape (state elements per program, chunks per tile, warps, pipeline stages), from
# benchmarks/own_kernels.py --kernels state on an H200 (500M config; ms a layer at 8x4096 | 1x32768): forward
# 0.099 | 0.102 against mamba_ssm's 0.099 | 0.150-0.323 (its autotuner's pick varies), backward 0.103 | 0.100
# against 0.099 | 0.291-0.325. One or two warps, each thread holding whole columns of a tile, so the scan over its
# rows stays in registers (more warps split the rows and the scan goes through shared memory: 2-4x slower); three
# stages keep the next tiles' loads in flight while one is scanned (at 1x32768 one stage took 0.127 | 0.121).
LAUNCH = (512, 4, 2, 3)


@triton.jit
def _then(decay_first, state_first, decay_second, state_second):
    """Two steps of ``s -> decay * s + state`` applied in order, as one step."""
    return decay_first * decay_second, decay_second * state_first + state_second


@triton.jit
def _chunk_decay(dA_cs_ptr, seq_idx_ptr, chunks, nchunks, seqlen, chunk_size, stride_dA_cs_chunk, stride_seq_idx,
                 HAS_SEQ_IDX: tl.constexpr):  # fmt: skip
    """exp(dA) of each of ``chunks`` (1 past the end), zero where the chunk starts a new document."""
    valid = (chunks >= 0) & (chunks < nchunks)
    decay = tl.exp(tl.load(dA_cs_ptr + chunks * stride_dA_cs_chunk, mask=valid, other=0.0).to(tl.float32))
    if HAS_SEQ_IDX:
        # the document of each chunk's last position against that of the chunk before's
        last = tl.minimum((chunks + 1) * chunk_size, seqlen) - 1
        doc = tl.load(seq_idx_ptr + last * stride_seq_idx, mask=valid, other=0)
        doc_before = tl.load(
            seq_idx_ptr + (chunks * chunk_size - 1) * stride_seq_idx, mask=valid & (chunks > 0), other=0
        )
        decay = tl.where(doc == doc_before, decay, 0.0)
    return decay


@triton.jit
def _state_passing_fwd_kernel(
    STATES, OUT, DA_CS, SEQ_IDX,  # STATES, OUT (batch, nchunks, nheads, dim); DA_CS (batch, nheads, nchunks)
    dim, nchunks, seqlen, chunk_size,
    stride_states_batch, stride_states_chunk, stride_states_head,
    stride_out_batch, stride_out_chunk, stride_out_head,
    stride_dA_cs_batch, stride_dA_cs_head, stride_dA_cs_chunk,
    stride_seq_idx_batch, stride_seq_idx,
    HAS_SEQ_IDX: tl.constexpr,
    BLOCK_DIM: tl.constexpr,
    BLOCK_C: tl.constexpr,
    STAGES: tl.constexpr,
):  # fmt: skip
    # 64-bit offsets: a long sequence's states pass 2**31 elements (1x1048576 at the 500M config's state size)
    pid_m, pid_b, pid_h = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
    STATES += pid_b * stride_states_batch + pid_h * stride_states_head
    OUT += pid_b * stride_out_batch + pid_h * stride_out_head
    DA_CS += pid_b * stride_dA_cs_batch + pid_h * stride_dA_cs_head
    SEQ_IDX += pid_b * stride_seq_idx_batch
    offs = pid_m * BLOCK_DIM + tl.arange(0, BLOCK_DIM)
    dim_mask = offs < dim
    rows = tl.arange(0, BLOCK_C)

    tl.store(OUT + offs, tl.zeros((BLOCK_DIM,), tl.float32).to(OUT.dtype.element_ty), mask=dim_mask)
    carry = tl.zeros((BLOCK_DIM,), tl.float32)  # the state leaving the tiles so far
    for start in tl.range(0, nchunks, BLOCK_C, num_stages=STAGES):
        chunks = (start + rows).to(tl.int64)
        mask = (chunks < nchunks)[:, None] & dim_mask[None, :]
        own = tl.load(STATES + chunks[:, None] * stride_states_chunk + offs[None, :], mask=mask, other=0.0)
        decay = _chunk_decay(DA_CS, SEQ_IDX, chunks, nchunks, seqlen, chunk_size, stride_dA_cs_chunk, stride_seq_idx,
                             HAS_SEQ_IDX)  # fmt: skip
        decay = tl.broadcast_to(decay[:, None], (BLOCK_C, BLOCK_DIM))
        # rows past the end have decay 1 and state 0, so the last row is the state leaving the tile
        decay_so_far, leaving = tl.associative_scan((decay, own.to(tl.float32)), 0, _then)
        leaving += decay_so_far * carry[None, :]
        out_mask = (chunks + 1 < nchunks)[:, None] & dim_mask[None, :]
        tl.store(OUT + (chunks + 1)[:, None] * stride_out_chunk + offs[None, :], leaving.to(OUT.dtype.element_ty),
                 mask=out_mask)  # fmt: skip
        carry = tl.sum(tl.where(rows[:, None] == BLOCK_C - 1, leaving, 0.0), axis=0)


@triton.jit
def _state_passing_bwd_kernel(
    DOUT, OUT, DA_CS, SEQ_IDX,  # DOUT, OUT (batch, nchunks, nheads, dim); DA_CS (batch, nheads, nchunks)
    DSTATES, DDA_PARTIAL, OUT_CONVERTED,  # DSTATES like DOUT; DDA_PARTIAL (batch, nheads, nchunks, blocks) fp32
    dim, nchunks, seqlen, chunk_size,
    stride_dout_batch, stride_dout_chunk, stride_dout_head,
    stride_out_batch, stride_out_chunk, stride_out_head,
    stride_dA_cs_batch, stride_dA_cs_head, stride_dA_cs_chunk,
    stride_seq_idx_batch, stride_seq_idx,
    stride_dstates_batch, stride_dstates_chunk, stride_dstates_head,
    stride_conv_batch, stride_conv_chunk, stride_conv_head,
    HAS_SEQ_IDX: tl.constexpr,
    CONVERT_OUT: tl.constexpr,
    BLOCK_DIM: tl.constexpr,
    BLOCK_C: tl.constexpr,
    STAGES: tl.constexpr,
):  # fmt: skip
    pid_m, pid_b, pid_h = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
    DOUT += pid_b * stride_dout_batch + pid_h * stride_dout_head
    OUT += pid_b * stride_out_batch + pid_h * stride_out_head
    DA_CS += pid_b * stride_dA_cs_batch + pid_h * stride_dA_cs_head
    SEQ_IDX += pid_b * stride_seq_idx_batch
    DSTATES += pid_b * stride_dstates_batch + pid_h * stride_dstates_head
    OUT_CONVERTED += pid_b * stride_conv_batch + pid_h * stride_conv_head
    DDA_PARTIAL += (pid_b * tl.num_programs(2) + pid_h) * nchunks * tl.num_programs(0) + pid_m
    offs = pid_m * BLOCK_DIM + tl.arange(0, BLOCK_DIM)
    dim_mask = offs < dim
    rows = tl.arange(0, BLOCK_C)

    # Tiles from the last chunk back, each read in reverse (row r is chunk end - 1 - r), so the reverse
    # recurrence is a forward scan over rows. g_c, the gradient reaching chunk c's own state, is that of the state
    # entering chunk c + 1: g_c = dout_{c+1} + exp(dA_{c+1}) g_{c+1}, and g of the last chunk is zero.
    carry = tl.zeros((BLOCK_DIM,), tl.float32)
    for end in tl.range(nchunks, 0, -BLOCK_C, num_stages=STAGES):
        chunks = (end - 1 - rows).to(tl.int64)
        valid = chunks >= 0
        mask = valid[:, None] & dim_mask[None, :]
        next_mask = (valid & (chunks + 1 < nchunks))[:, None] & dim_mask[None, :]
        dout_next = tl.load(DOUT + (chunks + 1)[:, None] * stride_dout_chunk + offs[None, :], mask=next_mask,
                            other=0.0)  # fmt: skip
        decay_next = _chunk_decay(DA_CS, SEQ_IDX, chunks + 1, nchunks, seqlen, chunk_size, stride_dA_cs_chunk,
                                  stride_seq_idx, HAS_SEQ_IDX)  # fmt: skip
        decay_next = tl.where(valid, decay_next, 1.0)
        decay_next = tl.broadcast_to(decay_next[:, None], (BLOCK_C, BLOCK_DIM))
        decay_so_far, grad = tl.associative_scan((decay_next, dout_next.to(tl.float32)), 0, _then)
        grad += decay_so_far * carry[None, :]
        tl.store(DSTATES + chunks[:, None] * stride_dstates_chunk + offs[None, :],
                 grad.to(DSTATES.dtype.element_ty), mask=mask)  # fmt: skip

        # dA_c scales the state entering c on its way into c + 1: its gradient is exp(dA_c) <entering_c, g_c>
        entering = tl.load(OUT + chunks[:, None] * stride_out_chunk + offs[None, :], mask=mask, other=0.0)
        if CONVERT_OUT:
            tl.store(OUT_CONVERTED + chunks[:, None] * stride_conv_chunk + offs[None, :],
                     entering.to(OUT_CONVERTED.dtype.element_ty), mask=mask)  # fmt: skip
        decay = _chunk_decay(DA_CS, SEQ_IDX, chunks, nchunks, seqlen, chunk_size, stride_dA_cs_chunk, stride_seq_idx,
                             HAS_SEQ_IDX)  # fmt: skip
        # (zero for the first chunk, whose entering state is the zero initial state)
        ddA = decay * tl.sum(entering.to(tl.float32) * grad, axis=1)
        tl.store(DDA_PARTIAL + chunks * tl.num_programs(0), ddA, mask=valid)
        carry = tl.sum(tl.where(rows[:, None] == BLOCK_C - 1, grad, 0.0), axis=0)


def _check_inputs(
    states: dict[str, torch.Tensor], dA_chunk_last: torch.Tensor, seq_idx: torch.Tensor | None, chunk_size: int | None
) -> None:
    """The shapes and strides the kernels index by, checked before anything is allocated or launched: ``states``
    (name -> tensor) all (batch, nchunks, nheads, dim) with unit last stride, the first one's shape the contract."""
    batch, nchunks, nheads, dim = next(iter(states.values())).shape
    for name, t in states.items():
        if t.shape != (batch, nchunks, nheads, dim) or t.stride(-1) != 1:
            raise ValueError(
                f"state passing: {name} {tuple(t.shape)} must be {(batch, nchunks, nheads, dim)} with unit last stride"
            )
    if dA_chunk_last.shape != (batch, nheads, nchunks):
        raise ValueError(
            f"state passing: dA_chunk_last {tuple(dA_chunk_last.shape)} must be {(batch, nheads, nchunks)}"
        )
    if seq_idx is not None:
        if chunk_size is None:
            raise ValueError("state passing: seq_idx needs chunk_size")
        if seq_idx.dim() != 2 or seq_idx.shape[0] != batch or -(-seq_idx.shape[1] // chunk_size) != nchunks:
            raise ValueError(
                f"state passing: seq_idx {tuple(seq_idx.shape)} must be (batch {batch}, seqlen) with "
                f"{nchunks} chunks of {chunk_size}"
            )


def state_passing_fwd(
    states: torch.Tensor,
    dA_chunk_last: torch.Tensor,
    seq_idx: torch.Tensor | None = None,
    chunk_size: int | None = None,
    out_dtype: torch.dtype | None = None,
    launch: tuple[int, int, int, int] = LAUNCH,
) -> torch.Tensor:
    """The states entering each chunk, (batch, nchunks, nheads, dim) in ``out_dtype`` (``states``' by default),
    from each chunk's own state ``states`` (same shape, from a zero state) and its total log decay
    ``dA_chunk_last`` (batch, nheads, nchunks). With ``seq_idx`` (batch, seqlen), a chunk whose last position
    starts a new document against the chunk before's does not receive its state (mamba_ssm's rule). ``launch``:
    (state elements per program, chunks per tile, warps, stages: tiles loaded ahead of the one scanned)."""
    _check_inputs({"states": states}, dA_chunk_last, seq_idx, chunk_size)
    batch, nchunks, nheads, dim = states.shape
    out = torch.empty_like(states, dtype=out_dtype or states.dtype)
    block_dim, block_c, num_warps, stages = launch
    grid = (triton.cdiv(dim, block_dim), batch, nheads)
    _state_passing_fwd_kernel[grid](
        states, out, dA_chunk_last, seq_idx if seq_idx is not None else states,
        dim, nchunks, seq_idx.shape[-1] if seq_idx is not None else 0, chunk_size or 0,
        states.stride(0), states.stride(1), states.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        *dA_chunk_last.stride(),
        *(seq_idx.stride() if seq_idx is not None else (0, 0)),
        HAS_SEQ_IDX=seq_idx is not None, BLOCK_DIM=block_dim, BLOCK_C=block_c, STAGES=stages, num_warps=num_warps,
    )  # fmt: skip
    return out


def state_passing_bwd(
    entering: torch.Tensor,
    dA_chunk_last: torch.Tensor,
    dentering: torch.Tensor,
    seq_idx: torch.Tensor | None = None,
    chunk_size: int | None = None,
    dstates_dtype: torch.dtype | None = None,
    entering_dtype: torch.dtype | None = None,
    launch: tuple[int, int, int, int] = LAUNCH,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients through ``state_passing_fwd`` from that of its output ``dentering``, given its output
    ``entering``: returns ``(dstates, ddA_partial, entering_converted)`` — the gradient of each chunk's own state
    (in ``dstates_dtype``, ``dentering``'s by default); that of ``dA_chunk_last`` as (batch, nheads, nchunks,
    blocks) fp32 partial sums to add over the last dimension; and ``entering`` in ``entering_dtype`` (written in
    the same pass when the dtype differs, else ``entering`` itself). ``launch`` as ``state_passing_fwd``'s."""
    _check_inputs({"entering": entering, "dentering": dentering}, dA_chunk_last, seq_idx, chunk_size)
    batch, nchunks, nheads, dim = entering.shape
    dstates = torch.empty_like(dentering, dtype=dstates_dtype or dentering.dtype)
    convert = entering_dtype is not None and entering_dtype != entering.dtype
    converted = torch.empty_like(entering, dtype=entering_dtype) if convert else entering
    block_dim, block_c, num_warps, stages = launch
    blocks = triton.cdiv(dim, block_dim)
    ddA_partial = torch.empty((batch, nheads, nchunks, blocks), dtype=torch.float32, device=entering.device)
    _state_passing_bwd_kernel[(blocks, batch, nheads)](
        dentering, entering, dA_chunk_last, seq_idx if seq_idx is not None else entering,
        dstates, ddA_partial, converted,
        dim, nchunks, seq_idx.shape[-1] if seq_idx is not None else 0, chunk_size or 0,
        dentering.stride(0), dentering.stride(1), dentering.stride(2),
        entering.stride(0), entering.stride(1), entering.stride(2),
        *dA_chunk_last.stride(),
        *(seq_idx.stride() if seq_idx is not None else (0, 0)),
        dstates.stride(0), dstates.stride(1), dstates.stride(2),
        converted.stride(0), converted.stride(1), converted.stride(2),
        HAS_SEQ_IDX=seq_idx is not None, CONVERT_OUT=convert, BLOCK_DIM=block_dim, BLOCK_C=block_c, STAGES=stages,
        num_warps=num_warps,
    )  # fmt: skip
    return dstates, ddA_partial, converted
