"""The reference Mamba-2 SSD scan against a naive token-by-token recurrence written here, a gradient identity, and
the matmul candidate benchmarks/ssd_matmul.py against the reference."""

import pytest
import torch
import torch.nn.functional as F

from hybridlm.ops.ssd import ssd_scan_ref

BATCH, NHEADS, HEADDIM, NGROUPS, DSTATE = 2, 4, 3, 2, 5


def make_inputs(seqlen: int, batch: int = BATCH) -> dict[str, torch.Tensor]:
    return {
        "x": torch.randn(batch, seqlen, NHEADS, HEADDIM),
        "dt": torch.randn(batch, seqlen, NHEADS),
        "A": -torch.rand(NHEADS) * 2 - 0.1,
        "B": torch.randn(batch, seqlen, NGROUPS, DSTATE),
        "C": torch.randn(batch, seqlen, NGROUPS, DSTATE),
        "D": torch.randn(NHEADS),
        "z": torch.randn(batch, seqlen, NHEADS, HEADDIM),
        "dt_bias": torch.randn(NHEADS) * 0.5,
    }


def naive_ssd(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_limit=(0.0, float("inf")), initial_states=None):
    """h_t = exp(Δ_t A) h_{t-1} + Δ_t x_t B_tᵀ;  y_t = h_t C_t + D x_t, then gated by silu(z). One step at a time."""
    batch, seqlen, nheads, headdim = x.shape
    group = torch.arange(nheads) // (nheads // B.shape[2])  # the B/C group each head reads
    delta = F.softplus(dt + (dt_bias if dt_bias is not None else 0.0)).clamp(*dt_limit)
    h = initial_states.clone() if initial_states is not None else torch.zeros(batch, nheads, headdim, B.shape[-1])
    ys = []
    for t in range(seqlen):
        Bt, Ct = B[:, t, group], C[:, t, group]  # (batch, nheads, d_state)
        decay = torch.exp(delta[:, t] * A)[..., None, None]
        h = decay * h + (delta[:, t, :, None] * x[:, t])[..., None] * Bt[:, :, None, :]
        y = torch.einsum("bhpn,bhn->bhp", h, Ct)
        if D is not None:
            y = y + D[:, None] * x[:, t]
        if z is not None:
            y = y * F.silu(z[:, t])
        ys.append(y)
    return torch.stack(ys, dim=1), h


@pytest.mark.parametrize("seqlen, chunk_size", [(16, 4), (13, 4), (7, 16), (1, 8)])
def test_ssd_ref_equals_naive_recurrence(seqlen, chunk_size):
    inputs = make_inputs(seqlen)
    initial = torch.randn(BATCH, NHEADS, HEADDIM, DSTATE)
    y, final = ssd_scan_ref(**inputs, chunk_size=chunk_size, initial_states=initial, return_final_states=True)
    y_naive, final_naive = naive_ssd(**inputs, initial_states=initial)
    torch.testing.assert_close(y, y_naive, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(final, final_naive, atol=1e-4, rtol=1e-4)


def test_ssd_ref_without_optional_inputs_and_with_dt_limit():
    inputs = make_inputs(12)
    del inputs["D"], inputs["z"], inputs["dt_bias"]
    y = ssd_scan_ref(**inputs, chunk_size=4, dt_limit=(0.05, 0.5))
    torch.testing.assert_close(y, naive_ssd(**inputs, dt_limit=(0.05, 0.5))[0], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(y, naive_ssd(**inputs)[0], atol=1e-3)  # the limit matters


def test_ssd_ref_per_channel_D():
    inputs = make_inputs(8)
    D2 = torch.randn(NHEADS, HEADDIM)
    inputs["D"] = D2
    y = ssd_scan_ref(**inputs, chunk_size=4)
    expected = naive_ssd(**{**inputs, "D": None, "z": None})[0] + D2 * inputs["x"]
    torch.testing.assert_close(y, expected * F.silu(inputs["z"]), atol=1e-4, rtol=1e-4)


def test_chunked_scan_does_not_depend_on_chunk_size():
    inputs = make_inputs(24)
    initial = torch.randn(BATCH, NHEADS, HEADDIM, DSTATE)
    outs = [ssd_scan_ref(**inputs, chunk_size=c, initial_states=initial, return_final_states=True) for c in (1, 8, 64)]
    for y, final in outs[1:]:
        torch.testing.assert_close(y, outs[0][0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(final, outs[0][1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("chunk_size", [4, 5, 32])
def test_seq_idx_restarts_the_state_at_each_document(chunk_size):
    lengths = [[5, 9, 2], [11, 5]]  # boundaries mid-chunk and at a chunk edge, different per row
    seqlen = 16
    inputs = make_inputs(seqlen)
    seq_idx = torch.stack([torch.repeat_interleave(torch.arange(len(ls)), torch.tensor(ls)) for ls in lengths])
    y, final = ssd_scan_ref(**inputs, chunk_size=chunk_size, seq_idx=seq_idx, return_final_states=True)
    for b, row in enumerate(lengths):
        start = 0
        for length in row:
            piece = {
                k: (v[b : b + 1, start : start + length] if v.dim() > 1 else v) for k, v in inputs.items() if k != "A"
            }
            piece["A"] = inputs["A"]
            alone, alone_final = ssd_scan_ref(**piece, chunk_size=chunk_size, return_final_states=True)
            torch.testing.assert_close(y[b : b + 1, start : start + length], alone, atol=1e-5, rtol=1e-4)
            start += length
        torch.testing.assert_close(final[b : b + 1], alone_final, atol=1e-5, rtol=1e-4)  # the last document's


def test_initial_state_applies_only_to_the_first_document():
    inputs = make_inputs(12, batch=1)
    initial = torch.randn(1, NHEADS, HEADDIM, DSTATE)
    seq_idx = torch.tensor([[0] * 5 + [1] * 7])
    with_init = ssd_scan_ref(**inputs, chunk_size=4, seq_idx=seq_idx, initial_states=initial)
    without = ssd_scan_ref(**inputs, chunk_size=4, seq_idx=seq_idx)
    assert not torch.allclose(with_init[:, :5], without[:, :5])
    torch.testing.assert_close(with_init[:, 5:], without[:, 5:], atol=1e-6, rtol=0)


def test_ssd_ref_is_differentiable_without_nans():
    inputs = {k: v.requires_grad_() for k, v in make_inputs(10).items()}
    seq_idx = torch.tensor([[0] * 4 + [1] * 6, [0] * 10])
    ssd_scan_ref(**inputs, chunk_size=4, seq_idx=seq_idx).square().sum().backward()
    for name, t in inputs.items():
        assert torch.isfinite(t.grad).all(), name
        assert t.grad.abs().sum() > 0, name


def test_log_decay_gradient_is_a_per_step_identity():
    """The gradient with respect to the cumulative log decay cs_t (A · the running sum of Δ) at step t is
    dy_t · (y_t − D x_t) − x_t · (dx_t − D dy_t) per head (the second term is u_t · du_t for u = Δ x), plus
    ⟨dS, S⟩ of the final state at the last step: no pairwise sum over steps. A fused backward could take dA (and
    Δ's share through the decay) from it instead of a kernel of its own, if the cancellation in its reverse
    cumulative sum proves harmless (mamba_ssm keeps a kernel for that reason; README, Performance). Here the
    reference's autograd dA is held to it, in float64."""
    inputs = make_inputs(11)
    del inputs["z"]  # the identity is on the scan's output, before the gate
    inputs = {k: v.double().requires_grad_() for k, v in inputs.items()}
    initial = torch.randn(BATCH, NHEADS, HEADDIM, DSTATE, dtype=torch.float64)
    y, final = ssd_scan_ref(**inputs, chunk_size=4, initial_states=initial, return_final_states=True)
    y, final = y.double(), final.double()
    dy, dfinal = torch.randn_like(y), torch.randn_like(final)
    dx, dA = torch.autograd.grad((y * dy).sum() + (final * dfinal).sum(), [inputs["x"], inputs["A"]])

    x, D = inputs["x"].detach(), inputs["D"].detach()[:, None]
    y = y.detach()
    d_cumdecay = (dy * (y - D * x)).sum(-1) - (x * (dx - D * dy)).sum(-1)  # (batch, seqlen, nheads)
    d_cumdecay[:, -1] += (dfinal * final.detach()).sum((-1, -2))
    delta = F.softplus(inputs["dt"].detach() + inputs["dt_bias"].detach())
    # cs_t = A · sum_{k <= t} Δ_k, so dL/dA = sum_t dL/dcs_t · sum_{k <= t} Δ_k
    dA_identity = (d_cumdecay * delta.cumsum(1)).sum((0, 1))
    torch.testing.assert_close(dA, dA_identity, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seqlen, chunk_size, packed", [(16, 4, False), (13, 4, True), (40, 8, True), (7, 16, False)])
def test_benchmarks_matmul_scan_equals_reference(load_benchmark, seqlen, chunk_size, packed):
    """benchmarks/ssd_matmul.py (a candidate op_variants times) computes this scan: outputs, final states and every
    input's gradient, with packed documents, an initial state and a padded chunk."""
    ssd_scan_matmul = load_benchmark("ssd_matmul").ssd_scan_matmul
    torch.manual_seed(seqlen)
    inputs = make_inputs(seqlen) | {"initial_states": torch.randn(BATCH, NHEADS, HEADDIM, DSTATE)}
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
