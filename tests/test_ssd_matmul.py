"""benchmarks/ssd_matmul.py computes the reference's SSD scan (so op_variants times a correct candidate):
outputs, final states and every input's gradient, with packed documents, an initial state and a padded chunk."""

import pytest
import torch

from hybridlm.ops.ssd import ssd_scan_ref

BATCH, NHEADS, HEADDIM, NGROUPS, DSTATE = 2, 4, 3, 2, 5


@pytest.fixture(scope="module")
def ssd_scan_matmul(load_benchmark):
    return load_benchmark("ssd_matmul").ssd_scan_matmul


@pytest.mark.parametrize("seqlen, chunk_size, packed", [(16, 4, False), (13, 4, True), (40, 8, True), (7, 16, False)])
def test_matmul_scan_equals_reference(ssd_scan_matmul, seqlen, chunk_size, packed):
    torch.manual_seed(seqlen)
    inputs = {
        "x": torch.randn(BATCH, seqlen, NHEADS, HEADDIM),
        "dt": torch.randn(BATCH, seqlen, NHEADS),
        "A": -torch.rand(NHEADS) * 2 - 0.1,
        "B": torch.randn(BATCH, seqlen, NGROUPS, DSTATE),
        "C": torch.randn(BATCH, seqlen, NGROUPS, DSTATE),
        "D": torch.randn(NHEADS),
        "z": torch.randn(BATCH, seqlen, NHEADS, HEADDIM),
        "dt_bias": torch.randn(NHEADS) * 0.5,
        "initial_states": torch.randn(BATCH, NHEADS, HEADDIM, DSTATE),
    }
    inputs = {k: v.double().requires_grad_() for k, v in inputs.items()}
    # documents 0, 1, 2 in runs of random length (sorted draws), so boundaries fall inside and between chunks
    seq_idx = torch.sort(torch.randint(0, 3, (BATCH, seqlen)), dim=1).values if packed else None
    results = []
    for scan in (ssd_scan_ref, ssd_scan_matmul):
        y, final = scan(**inputs, chunk_size=chunk_size, seq_idx=seq_idx, return_final_states=True)
        weights = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)  # a loss that weighs every output
        grads = torch.autograd.grad((y * weights).sum() + final.square().sum(), list(inputs.values()))
        results.append((y, final, grads))
    (y_ref, final_ref, grads_ref), (y, final, grads) = results
    # the reference computes in fp32 whatever its inputs: agreement to fp32 rounding
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(final, final_ref.to(final.dtype), rtol=1e-5, atol=1e-5)
    for name, got, want in zip(inputs, grads, grads_ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=lambda m, name=name: f"d{name}: {m}")
