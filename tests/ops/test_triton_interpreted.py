"""hybridlm's own Triton kernels on the CPU, under Triton's interpreter (``TRITON_INTERPRET=1``), against autograd
through the PyTorch references: CI has no GPU, so this is where the kernels' arithmetic, masking, strides and
multi-program reductions are checked on every run. Their speed and compiled code are the GPU tests' business
(``tests/ops/test_fused_vs_reference.py``), so on a GPU machine this module is skipped. Needs ``triton`` (>= 3.9:
older interpreters fail under numpy 2.4); ``.ci/run`` installs it, and ``tests/conftest.py`` turns the interpreter
on before triton is imported. Inputs are float64 where the kernels allow it, so differences are the kernels' fp32
arithmetic.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch
import torch.nn.functional as F

from hybridlm.ops.compiled import cross_entropy_ref
from hybridlm.ops.conv import causal_conv1d_ref
from hybridlm.ops.norm import gated_rms_norm_ref
from hybridlm.ops.ssd import state_passing_ref

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("a GPU is here: the GPU tests run these kernels compiled", allow_module_level=True)
triton = pytest.importorskip("triton")
if tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 9):
    pytest.skip(f"triton {triton.__version__}'s interpreter fails under numpy 2.4", allow_module_level=True)


@pytest.fixture(scope="module")
def kernels():
    names = ("gated_norm_bwd", "triton_cross_entropy", "state_passing", "conv_bwd")
    return {name: importlib.import_module(f"hybridlm.ops.{name}") for name in names}


@pytest.mark.parametrize(
    "rows, channels, group_size, z_row_pad, block_m",
    [(37, 64, 64, 5, 1), (50, 96, 32, 0, 1), (9, 48, 16, 3, 1), (37, 64, 64, 5, 4)],
    ids=["one group, strided z", "three groups", "rows fewer than programs", "tiles of 4 rows, the last partial"],
)
def test_gated_norm_backward_matches_autograd(kernels, rows, channels, group_size, z_row_pad, block_m):
    torch.manual_seed(0)
    eps = 1e-5
    y = torch.randn(rows, channels, dtype=torch.float64)
    z_rows = torch.randn(rows, channels + z_row_pad, dtype=torch.float64)
    z = z_rows[:, :channels]  # a slice of wider rows, as z inside in_proj's output
    weight = torch.rand(channels, dtype=torch.float64) + 0.5
    leaves = [t.clone().requires_grad_() for t in (y, z, weight)]
    out = gated_rms_norm_ref(*leaves, eps, group_size)
    dout = torch.randn_like(out)
    out.backward(dout)
    gated = (y * F.silu(z)).unflatten(-1, (-1, group_size))
    rstd = torch.rsqrt(gated.pow(2).mean(-1) + eps).t().flatten()  # group-major, as mamba_ssm's forward saves it

    dz_rows = torch.zeros_like(z_rows)
    dy, dz, dweight = kernels["gated_norm_bwd"].gated_rms_norm_bwd(
        dout, y, z, weight, rstd, group_size, dz=dz_rows[:, :channels], block_m=block_m
    )
    for got, leaf in zip((dy, dz, dweight), leaves, strict=True):
        torch.testing.assert_close(got, leaf.grad, atol=1e-5, rtol=1e-5)
    assert dz.data_ptr() == dz_rows.data_ptr()  # written into the given view
    assert not dz_rows[:, channels:].any()  # and nowhere else in its rows


def test_gated_norm_backward_of_no_rows_is_empty(kernels):
    t = torch.zeros(0, 8)
    dy, dz, dweight = kernels["gated_norm_bwd"].gated_rms_norm_bwd(t, t, t, torch.ones(8), torch.ones(0), 8)
    assert dy.shape == dz.shape == (0, 8) and not dweight.any()


def test_gated_norm_backward_refuses_a_channel_count_its_groups_do_not_divide(kernels):
    t = torch.zeros(4, 48)
    with pytest.raises(ValueError, match="not a multiple of group_size 32"):
        kernels["gated_norm_bwd"].gated_rms_norm_bwd(t, t, t, torch.ones(48), torch.ones(4), 32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("row_pad", [0, 24], ids=["rows", "padded rows"])
def test_cross_entropy_matches_the_reference(kernels, monkeypatch, dtype, row_pad):
    module = kernels["triton_cross_entropy"]
    monkeypatch.setattr(module, "BLOCK_V", 64)  # the 150-logit rows span three blocks, the last one partial
    torch.manual_seed(0)
    vocab = 150
    rows = (torch.randn(12, vocab + row_pad) * 4).to(dtype)
    targets = torch.randint(0, vocab, (12,))
    targets[[1, 7]] = -100  # ignored: no loss, no gradient
    upstream = torch.tensor(0.37)  # the mean's 1/count, say: the backward reads it from memory

    ref_logits = rows[:, :vocab].clone().requires_grad_()
    want = cross_entropy_ref(ref_logits, targets)
    want.backward(upstream)
    got_rows = rows.clone().requires_grad_()
    got = module.cross_entropy_triton(got_rows[:, :vocab], targets)
    got.backward(upstream)

    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    atol = 1e-6 if dtype == torch.float32 else 4e-3  # one rounding to bf16 of values below 0.4
    torch.testing.assert_close(got_rows.grad[:, :vocab], ref_logits.grad, atol=atol, rtol=0)
    assert not got_rows.grad[[1, 7]].any()
    assert not got_rows.grad[:, vocab:].any()


def test_cross_entropy_of_only_ignored_rows_is_zero(kernels):
    logits = torch.randn(3, 10, requires_grad=True)
    loss = kernels["triton_cross_entropy"].cross_entropy_triton(logits, torch.full((3,), -100))
    loss.backward()
    assert loss.item() == 0.0 and not logits.grad.any()


def test_cross_entropy_of_a_target_outside_the_vocabulary_is_nan(kernels):
    """The ids are not checked on the host (that would synchronise): the loss says so instead of reading past
    the row."""
    loss = kernels["triton_cross_entropy"].cross_entropy_triton(torch.randn(2, 10), torch.tensor([3, 10]))
    assert loss.isnan()


def _chunk_decay_across_documents(dA_last, seq_idx, chunk_size):
    """exp(dA) per chunk, zero where a chunk's last position is in another document than the chunk before's
    (mamba_ssm's rule; the first chunk compares with document 0)."""
    seqlen = seq_idx.shape[-1]
    last = (torch.arange(dA_last.shape[-1]) + 1).mul(chunk_size).clamp(max=seqlen) - 1
    doc = seq_idx[:, last]
    doc_before = torch.cat([torch.zeros_like(doc[:, :1]), doc[:, :-1]], dim=1)
    return dA_last.exp() * (doc == doc_before)[:, None]


@pytest.mark.parametrize(
    "nchunks, dim, packed, block_c",
    [(11, 40, True, 4), (11, 40, False, 4), (3, 16, True, 8), (8, 32, False, 4)],
    ids=["packed, partial tiles", "one document", "fewer chunks than a tile", "whole tiles"],
)
def test_state_passing_matches_autograd_through_the_reference(kernels, nchunks, dim, packed, block_c):
    module = kernels["state_passing"]
    torch.manual_seed(0)
    batch, nheads, chunk_size = 2, 3, 4
    seqlen = nchunks * chunk_size - 2  # the last chunk is short
    states = torch.randn(batch, nchunks, nheads, dim, dtype=torch.float64)
    dA_last = -torch.rand(batch, nheads, nchunks, dtype=torch.float64)
    seq_idx = None
    if packed:  # documents that start inside a chunk, on a chunk's last position, and in the first chunk
        starts = [3, 11, 19, 26][: max(1, nchunks - 1)] if nchunks > 3 else [2]
        seq_idx = torch.zeros(batch, seqlen, dtype=torch.int32)
        for start in starts:
            seq_idx[0, start:] += 1
        seq_idx[1, seqlen // 2 :] = 1
    decay = _chunk_decay_across_documents(dA_last, seq_idx, chunk_size) if packed else dA_last.exp()

    leaves = [t.clone().requires_grad_() for t in (states, dA_last)]
    ref_decay = _chunk_decay_across_documents(leaves[1], seq_idx, chunk_size) if packed else leaves[1].exp()
    want, _ = state_passing_ref(leaves[0], ref_decay)
    dentering = torch.randn_like(want)
    want.backward(dentering)
    assert (decay == 0).any() == packed  # the packed cases cut the state somewhere

    got = module.state_passing_fwd(states, dA_last, seq_idx, chunk_size, launch=(16, block_c, 1, 1))
    torch.testing.assert_close(got, want.detach(), atol=1e-5, rtol=1e-5)
    dstates, ddA_partial, converted = module.state_passing_bwd(
        got, dA_last, dentering, seq_idx, chunk_size, entering_dtype=torch.float32, launch=(16, block_c, 1, 1)
    )
    torch.testing.assert_close(dstates, leaves[0].grad, atol=1e-5, rtol=1e-5)
    assert ddA_partial.shape == (batch, nheads, nchunks, 3 if dim == 40 else dim // 16)
    torch.testing.assert_close(ddA_partial.sum(-1).double(), leaves[1].grad, atol=1e-5, rtol=1e-5)
    assert converted.dtype == torch.float32 and torch.equal(converted, got.float())


def test_state_passing_stores_in_the_asked_dtype(kernels):
    module = kernels["state_passing"]
    states = torch.randn(1, 6, 2, 24)
    dA_last = -torch.rand(1, 2, 6)
    want, _ = state_passing_ref(states, dA_last.exp())
    got = module.state_passing_fwd(states, dA_last, out_dtype=torch.bfloat16, launch=(16, 4, 1, 2))
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=0, rtol=2**-7)  # within one bf16 step of the fp32 sums
    dstates, _, same = module.state_passing_bwd(got, dA_last, torch.randn_like(want), entering_dtype=torch.bfloat16)
    assert same is got and dstates.dtype == torch.float32


def test_state_passing_refuses_inputs_its_kernels_would_misread(kernels):
    module = kernels["state_passing"]
    states, dA_last = torch.zeros(1, 6, 2, 8), torch.zeros(1, 2, 6)
    with pytest.raises(ValueError, match=r"dA_chunk_last \(1, 2, 5\) must be \(1, 2, 6\)"):
        module.state_passing_fwd(states, torch.zeros(1, 2, 5))
    with pytest.raises(ValueError, match=r"seq_idx \(1, 40\) must be .* 6 chunks of 4"):
        module.state_passing_fwd(states, dA_last, torch.zeros(1, 40, dtype=torch.int32), chunk_size=4)
    with pytest.raises(ValueError, match=r"dentering \(1, 6, 2, 4\) must be \(1, 6, 2, 8\)"):
        module.state_passing_bwd(states, dA_last, torch.zeros(1, 6, 2, 4))


@pytest.mark.parametrize(
    "batch, seqlen, channels, width, packed, bias, span, block_c",
    [
        (2, 37, 48, 4, True, True, 8, 32),
        (1, 20, 40, 4, False, False, 16, 16),
        (2, 19, 24, 3, True, True, 5, 16),
        (1, 9, 8, 2, False, True, 256, 256),
    ],
    ids=[
        "packed, spans and channel blocks partial",
        "one document, no bias",
        "width 3, spans of 5",
        "width 2, one span",
    ],
)
def test_conv_backward_matches_autograd_through_the_reference(
    kernels, batch, seqlen, channels, width, packed, bias, span, block_c
):
    torch.manual_seed(0)
    pad = 5  # x and its gradient are slices of wider rows, as xBC inside in_proj's output and its gradient
    x = torch.randn(batch, seqlen, channels + pad, dtype=torch.float64)[..., :channels]
    weight = torch.randn(channels, width, dtype=torch.float64) * 0.5
    b = torch.randn(channels, dtype=torch.float64) if bias else None
    seq_idx = None
    if packed:  # documents starting mid-span, within a filter's width of each other, and a row of one document
        seq_idx = torch.zeros(batch, 2 * seqlen, dtype=torch.int32)[:, ::2]  # a strided view: copied for the kernel
        seq_idx[:, 7:] += 1
        seq_idx[:, 9:] += 1
        seq_idx[:, seqlen // 2 + 1 :] += 1
        seq_idx[-1] = 0
    leaves = [t.clone().requires_grad_() for t in (x, weight) + ((b,) if bias else ())]
    out = causal_conv1d_ref(leaves[0].transpose(1, 2), leaves[1], leaves[2] if bias else None, "silu", seq_idx)
    dout = torch.randn(batch, seqlen, channels, dtype=torch.float64)
    out.transpose(1, 2).backward(dout)

    dx_rows = torch.zeros(batch, seqlen, channels + pad, dtype=torch.float64)
    dx, dweight, dbias = kernels["conv_bwd"].causal_conv1d_silu_bwd(
        x, weight, b, dout, seq_idx, dx=dx_rows[..., :channels], span=span, block_c=block_c
    )
    torch.testing.assert_close(dx, leaves[0].grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dweight, leaves[1].grad, atol=1e-5, rtol=1e-5)
    if bias:
        torch.testing.assert_close(dbias, leaves[2].grad, atol=1e-5, rtol=1e-5)
    else:
        assert dbias is None
    assert dx.data_ptr() == dx_rows.data_ptr() and not dx_rows[..., channels:].any()  # written into the view only


def test_conv_backward_refuses_inputs_its_kernel_would_misread(kernels):
    module = kernels["conv_bwd"]
    x = torch.zeros(1, 6, 8)
    with pytest.raises(ValueError, match=r"weight \(8, 5\) must be \(8, width <= 4\)"):
        module.causal_conv1d_silu_bwd(x, torch.zeros(8, 5), None, x)
    with pytest.raises(ValueError, match=r"dout \(1, 6, 8\) must be \(1, 6, 8\), unit stride"):
        module.causal_conv1d_silu_bwd(x, torch.zeros(8, 4), None, torch.zeros(1, 8, 6).transpose(1, 2))
    with pytest.raises(ValueError, match=r"seq_idx must be \(1, 6\) int32"):
        module.causal_conv1d_silu_bwd(x, torch.zeros(8, 4), None, x, torch.zeros(1, 6, dtype=torch.int64))
