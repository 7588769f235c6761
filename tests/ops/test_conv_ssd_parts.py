"""The pure-PyTorch part of the fused Mamba-2 mixer's backward (``ops/conv_ssd.py``), on CPU: the gradient of
the cumulative log decays summed from its parts, against the sum written out step by step."""

import torch

from hybridlm.ops.conv_ssd import decay_grad


def test_decay_grad_reaches_each_step_from_every_later_step_of_its_chunk():
    batch, nheads, nchunks, chunk = 2, 3, 4, 5
    in_chunk, from_B, from_C = (torch.randn(batch, nheads, nchunks, chunk, dtype=torch.float64) for _ in range(3))
    from_chunk_end = torch.randn(batch, nheads, nchunks, 3, dtype=torch.float64)  # partial sums
    expected = torch.empty_like(in_chunk)
    for t in range(chunk):
        later_C = sum(from_C[..., s] for s in range(t, chunk))  # steps t..end of the same chunk, none of the next
        expected[..., t] = in_chunk[..., t] + from_B[..., t] + later_C + from_chunk_end.sum(-1)
    torch.testing.assert_close(decay_grad(in_chunk, from_B, from_C, from_chunk_end), expected)
