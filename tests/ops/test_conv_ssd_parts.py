"""The pure-PyTorch part of the fused Mamba-2 mixer's backward (``ops/conv_ssd.py``), on CPU: the gradient of
the cumulative log decays summed from its parts, against the sum written out step by step."""

import pytest
import torch

from hybridlm.ops.conv_ssd import decay_grad


@pytest.mark.parametrize("from_B_summed", [False, True], ids=["terms through B per step", "summed through B"])
def test_decay_grad_reaches_each_step_from_every_later_step_of_its_chunk(from_B_summed):
    """A step's decay gets the in-chunk scan's partial sums (over row tiles) at that step, the terms through B of
    that step and every earlier one of its chunk, and the terms through C of that step and every later one, plus
    the state leaving the chunk's (partial sums) at every step."""
    batch, nheads, nchunks, chunk = 2, 3, 4, 5
    in_chunk = torch.randn(batch, nheads, nchunks, 2, chunk, dtype=torch.float64)  # two row tiles' partial sums
    from_B, from_C = (torch.randn(batch, nheads, nchunks, chunk, dtype=torch.float64) for _ in range(2))
    from_chunk_end = torch.randn(batch, nheads, nchunks, 3, dtype=torch.float64)  # partial sums
    expected = torch.empty_like(from_B)
    for t in range(chunk):
        earlier_B = from_B[..., t] if from_B_summed else sum(from_B[..., s] for s in range(t + 1))
        later_C = sum(from_C[..., s] for s in range(t, chunk))  # steps t..end of the same chunk, none of the next
        expected[..., t] = in_chunk[..., 0, t] + in_chunk[..., 1, t] + earlier_B + later_C + from_chunk_end.sum(-1)
    got = decay_grad(in_chunk, from_B, from_C, from_chunk_end, from_B_summed)
    torch.testing.assert_close(got, expected)
