"""Summed cross-entropy over rows of logits as two Triton kernels: a forward that reads each row once (an online
log-sum-exp in fp32, one ``exp`` per logit) and keeps the row's log-sum-exp, and a backward that reads the row
again and writes ``(softmax - onehot) * grad`` in the logits' dtype, the upstream gradient read from device memory
(no host synchronisation, so the CUDA-graphed step can capture it).

At the 500M config's 8x4096 step the logits are (32768, 50304) bf16, 3.3 GB: the loss moves them three times
(read, read, write) whatever the implementation, ~2.1 ms at the H200's bandwidth. Inductor's kernels for the same
loss took 4.8 ms in the step's profile (``benchmarks/profile_step.py``), these 2.5 ms
(``benchmarks/own_kernels.py``, ``benchmarks/op_variants.py --ops cross_entropy``).

CUDA only; ``hybridlm.ops.cross_entropy`` decides when it runs. The reference is
``hybridlm.ops.compiled.cross_entropy_ref``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# From benchmarks/own_kernels.py at (32768, 50304) bf16 on an H200, forward + backward: blocks of 4096 or 8192
# logits with 4 warps 2.47-2.49 ms (8 warps 2.56-2.57, 16 warps 2.70-2.98; blocks of 1024 2.73-6.0), against
# 4.15 ms for Inductor's kernels.
BLOCK_V = 4096  # logits per iteration of a row's loop
NUM_WARPS = 4


@triton.jit
def _cross_entropy_fwd_kernel(
    LOGITS, TARGETS, LOSS, LSE,
    n_vocab, stride_row, ignore_index,
    BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    row_logits = LOGITS + row * stride_row
    cols = tl.arange(0, BLOCK)
    running_max = -float("inf")
    running_sum = 0.0
    for start in range(0, n_vocab, BLOCK):
        mask = start + cols < n_vocab
        x = tl.load(row_logits + start + cols, mask=mask, other=-float("inf")).to(tl.float32)
        block_max = tl.maximum(running_max, tl.max(x, axis=0))
        running_sum = running_sum * tl.exp(running_max - block_max) + tl.sum(tl.exp(x - block_max), axis=0)
        running_max = block_max
    lse = running_max + tl.log(running_sum)
    target = tl.load(TARGETS + row)
    valid = target != ignore_index
    in_range = (target >= 0) & (target < n_vocab)  # unchecked on the host (a sync); a bad id reads NaN, not memory
    target_logit = tl.load(row_logits + tl.where(valid & in_range, target, 0)).to(tl.float32)
    tl.store(LOSS + row, tl.where(valid, tl.where(in_range, lse - target_logit, float("nan")), 0.0))
    tl.store(LSE + row, lse)


@triton.jit
def _cross_entropy_bwd_kernel(
    LOGITS, TARGETS, LSE, GRAD_OUT, DLOGITS,
    n_vocab, stride_row, stride_drow, ignore_index,
    BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    row_logits = LOGITS + row * stride_row
    row_dlogits = DLOGITS + row * stride_drow
    cols = tl.arange(0, BLOCK)
    target = tl.load(TARGETS + row)
    # an ignored row's gradient is zero: scaling by zero keeps one code path
    scale = tl.where(target != ignore_index, tl.load(GRAD_OUT).to(tl.float32), 0.0)
    lse = tl.load(LSE + row)
    for start in range(0, n_vocab, BLOCK):
        offsets = start + cols
        mask = offsets < n_vocab
        x = tl.load(row_logits + offsets, mask=mask, other=0.0).to(tl.float32)
        grad = tl.exp(x - lse) - tl.where(offsets == target, 1.0, 0.0)
        tl.store(row_dlogits + offsets, (grad * scale).to(DLOGITS.dtype.element_ty), mask=mask)


class CrossEntropySum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
        rows, n_vocab = logits.shape
        if logits.stride(1) != 1:
            logits = logits.contiguous()
        targets = targets.contiguous()
        loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
        lse = torch.empty(rows, dtype=torch.float32, device=logits.device)
        if rows:
            _cross_entropy_fwd_kernel[(rows,)](
                logits, targets, loss, lse, n_vocab, logits.stride(0), ignore_index, BLOCK=BLOCK_V, num_warps=NUM_WARPS
            )
        ctx.save_for_backward(logits, targets, lse)
        ctx.ignore_index = ignore_index
        return loss.sum()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        logits, targets, lse = ctx.saved_tensors
        rows, n_vocab = logits.shape
        dlogits = torch.empty_like(logits)
        if rows:
            _cross_entropy_bwd_kernel[(rows,)](
                logits, targets, lse, grad_out.contiguous(), dlogits,
                n_vocab, logits.stride(0), dlogits.stride(0), ctx.ignore_index,
                BLOCK=BLOCK_V, num_warps=NUM_WARPS,
            )  # fmt: skip
        return dlogits, None, None


def cross_entropy_triton(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Summed next-token cross-entropy over rows of ``logits`` (tokens, vocab), fp32 arithmetic, as
    ``compiled.cross_entropy_ref``; rows whose target is ``ignore_index`` add nothing and get no gradient."""
    return CrossEntropySum.apply(logits, targets, ignore_index)
