"""Reference depthwise causal conv1d: against torch's conv, across document boundaries, and its step."""

import pytest
import torch
import torch.nn.functional as F

from hybridlm.ops.conv import causal_conv1d_ref, causal_conv1d_update_ref

BATCH, CHANNELS, WIDTH = 2, 6, 4


def torch_causal_conv(x, weight, bias, activation):
    out = F.conv1d(F.pad(x, (weight.shape[1] - 1, 0)), weight[:, None], bias, groups=x.shape[1])
    return F.silu(out) if activation == "silu" else out


@pytest.mark.parametrize("activation", ["silu", None])
def test_conv_equals_torch_conv(activation):
    x, weight, bias = torch.randn(BATCH, CHANNELS, 11), torch.randn(CHANNELS, WIDTH), torch.randn(CHANNELS)
    out = causal_conv1d_ref(x, weight, bias, activation)
    torch.testing.assert_close(out, torch_causal_conv(x, weight, bias, activation), atol=1e-5, rtol=1e-5)


def test_conv_is_causal():
    x, weight = torch.randn(1, CHANNELS, 10), torch.randn(CHANNELS, WIDTH)
    changed = x.clone()
    changed[..., 6] += 1.0
    a, b = causal_conv1d_ref(x, weight), causal_conv1d_ref(changed, weight)
    torch.testing.assert_close(a[..., :6], b[..., :6], atol=0, rtol=0)
    assert not torch.allclose(a[..., 6:], b[..., 6:])


def test_conv_with_seq_idx_equals_separate_convs():
    lengths = [[2, 5, 3], [7, 3]]  # a document shorter than the conv width, different boundaries per row
    seqlen = 10
    x, weight, bias = torch.randn(BATCH, CHANNELS, seqlen), torch.randn(CHANNELS, WIDTH), torch.randn(CHANNELS)
    seq_idx = torch.stack([torch.repeat_interleave(torch.arange(len(ls)), torch.tensor(ls)) for ls in lengths])
    out = causal_conv1d_ref(x, weight, bias, "silu", seq_idx=seq_idx.to(torch.int32))
    for b, row in enumerate(lengths):
        start = 0
        for length in row:
            alone = causal_conv1d_ref(x[b : b + 1, :, start : start + length], weight, bias, "silu")
            torch.testing.assert_close(out[b : b + 1, :, start : start + length], alone, atol=1e-6, rtol=1e-5)
            start += length


def test_conv_update_steps_equal_the_full_conv():
    seqlen, prefill = 9, 3
    x, weight, bias = torch.randn(BATCH, CHANNELS, seqlen), torch.randn(CHANNELS, WIDTH), torch.randn(CHANNELS)
    full = causal_conv1d_ref(x, weight, bias, "silu")
    # the state after a prefill holds its last WIDTH inputs, zero-padded on the left (as the layers build it)
    conv_state = F.pad(x[..., :prefill], (WIDTH - prefill, 0)).contiguous()
    for t in range(prefill, seqlen):
        y = causal_conv1d_update_ref(x[..., t], conv_state, weight, bias, "silu")
        torch.testing.assert_close(y, full[..., t], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(conv_state, x[..., -WIDTH:])
