"""The LM head and the summed cross-entropy as one autograd op whose forward writes the logits' gradient.

Unfused (``ops.cross_entropy`` after the head's GEMM), the loss reads the (tokens, vocab) logits in its forward
for the log-sum-exp, and again in its backward to write ``(softmax - onehot) * grad`` into a second buffer as
large: at the 500M config's 8x4096 step, 3.3 GB read twice and written once besides the GEMMs'. The backward
waits for the upstream gradient; a scalar, it can wait until after the GEMMs instead. So here one kernel reads
each row and overwrites it in place with ``softmax - onehot``: the logits' buffer becomes their gradient's, and
the backward's two GEMMs (d hidden = G W, d weight = Gᵀ hidden) are scaled by the upstream gradient afterwards,
on their small outputs. The kernel passes over a row twice (the log-sum-exp, then the gradient); with few rows in
flight the second pass can find the row in L2, so that the logits cross device memory once each way.

The logits are gone after the forward, so the op does not return them. Gradients are those of
``ops.cross_entropy`` over the head's logits except where rounding happens: G is rounded to the logits' dtype
before the scale, not after (one rounding either way).

CUDA only (Triton); ``hybridlm.ops.linear_cross_entropy`` decides when it runs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Launch shape: a persistent grid of PROGRAMS_PER_SM programs per SM, each walking rows. Few rows in flight at once
# (~100 KB each at a 50k vocabulary) is what lets the second pass over a row find it in L2.
PROGRAMS_PER_SM = 2
BLOCK = 8192  # logits per iteration of a row's loops
NUM_WARPS = 16
CPU_PROGRAMS = 4  # under Triton's interpreter (CPU tests): several rows per program, as on a GPU


@triton.jit
def _loss_and_grad_kernel(
    LOGITS, TARGETS, LOSS,
    n_rows, n_vocab, n_cols, stride_row, ignore_index,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """Each row's loss into LOSS, and its logits overwritten with ``softmax - onehot`` (zero for an ignored row,
    and in the columns from ``n_vocab`` to ``n_cols``, the head's padding): an online log-sum-exp over the row,
    then a second pass writing the gradient."""
    cols = tl.arange(0, BLOCK)
    first, programs = tl.program_id(0), tl.num_programs(0)
    for i in range(0, tl.cdiv(n_rows - first, programs)):
        row = (first + i * programs).to(tl.int64)
        row_logits = LOGITS + row * stride_row
        target = tl.load(TARGETS + row)
        valid = target != ignore_index
        in_range = (target >= 0) & (target < n_vocab)  # unchecked on the host (a sync); a bad id gives NaN
        running_max = -float("inf")
        running_sum = 0.0
        for start in range(0, n_vocab, BLOCK):
            x = tl.load(row_logits + start + cols, mask=start + cols < n_vocab, other=-float("inf")).to(tl.float32)
            block_max = tl.maximum(running_max, tl.max(x, axis=0))
            running_sum = running_sum * tl.exp(running_max - block_max) + tl.sum(tl.exp(x - block_max), axis=0)
            running_max = block_max
        lse = running_max + tl.log(running_sum)
        target_logit = tl.load(row_logits + tl.where(valid & in_range, target, 0)).to(tl.float32)  # before the writes
        keep = tl.where(valid, 1.0, 0.0)
        for start in range(0, n_cols, BLOCK):
            offsets = start + cols
            x = tl.load(row_logits + offsets, mask=offsets < n_vocab, other=-float("inf")).to(tl.float32)
            grad = tl.exp(x - lse) - tl.where(offsets == target, 1.0, 0.0)
            tl.store(row_logits + offsets, (grad * keep).to(LOGITS.dtype.element_ty), mask=offsets < n_cols)
        tl.store(LOSS + row, tl.where(valid, tl.where(in_range, lse - target_logit, float("nan")), 0.0))


def loss_and_grad_in_place(
    logits: torch.Tensor, targets: torch.Tensor, n_vocab: int, ignore_index: int
) -> torch.Tensor:
    """Each row's cross-entropy over its first ``n_vocab`` logits (fp32, (rows,)); ``logits`` (rows, columns),
    rows contiguous, is overwritten with the loss's gradient with respect to it (for an upstream gradient of 1)."""
    rows, n_cols = logits.shape
    if logits.stride(1) != 1:
        raise ValueError(f"loss_and_grad_in_place: the logits' rows must be contiguous, got strides {logits.stride()}")
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows:
        if logits.device.type == "cuda":
            sms = torch.cuda.get_device_properties(logits.device).multi_processor_count
            programs = min(rows, PROGRAMS_PER_SM * sms)
        else:
            programs = min(rows, CPU_PROGRAMS)
        _loss_and_grad_kernel[(programs,)](
            logits, targets.contiguous(), loss, rows, n_vocab, n_cols, logits.stride(0), ignore_index,
            BLOCK=BLOCK, num_warps=NUM_WARPS,
        )  # fmt: skip
    return loss


class LinearCrossEntropySum(torch.autograd.Function):
    """sum over rows of cross_entropy((hidden @ weight.T)[:, :n_vocab], targets); under autocast both inputs are
    cast as ``F.linear`` would cast them (autograd casts their gradients back)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, n_vocab: int, ignore_index: int) -> torch.Tensor:
        device_type = hidden.device.type
        if torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
            hidden, weight = hidden.to(dtype), weight.to(dtype)
        with torch.autocast(device_type, enabled=False):
            logits = hidden @ weight.t()  # (rows, padded vocab), becomes the gradient's buffer
            loss = loss_and_grad_in_place(logits, targets, n_vocab, ignore_index)
        ctx.save_for_backward(hidden, weight, logits)
        return loss.sum()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        hidden, weight, dlogits = ctx.saved_tensors
        dhidden = dweight = None
        with torch.autocast(hidden.device.type, enabled=False):  # every tensor is in its compute dtype already
            if ctx.needs_input_grad[0]:
                dhidden = (dlogits @ weight).mul_(grad_out)
            if ctx.needs_input_grad[1]:
                dweight = (dlogits.t() @ hidden).mul_(grad_out)
        return dhidden, dweight, None, None, None


def linear_cross_entropy_fused(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, n_vocab: int, ignore_index: int = -100
) -> torch.Tensor:
    """Summed fp32 cross-entropy of ``(hidden @ weight.T)[:, :n_vocab]`` (hidden (rows, d), weight (columns, d),
    columns >= n_vocab) against (rows,) ``targets``; rows whose target is ``ignore_index`` add nothing."""
    return LinearCrossEntropySum.apply(hidden, weight, targets, n_vocab, ignore_index)
