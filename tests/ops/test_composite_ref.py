"""The unfused compositions behind the fused levers (CPU): what each computes, from first principles."""

import pytest
import torch
import torch.nn.functional as F

from hybridlm import ops


def test_add_rms_norm_returns_the_norm_of_the_sum_and_the_sum():
    torch.manual_seed(0)
    x, residual, weight = torch.randn(2, 5, 16), torch.randn(2, 5, 16), torch.rand(16) + 0.5
    normed, new_residual = ops.add_rms_norm(x, residual, weight, 1e-6)
    total = x + residual
    torch.testing.assert_close(new_residual, total)
    torch.testing.assert_close(normed, weight * total / total.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt())
    first_normed, first_residual = ops.add_rms_norm(x, None, weight, 1e-6)  # the first block: nothing to add
    assert first_residual is x
    torch.testing.assert_close(first_normed, ops.rms_norm(x, weight, 1e-6))


def test_add_rms_norm_keeps_the_sum_in_its_own_dtype_and_the_norm_in_the_outputs():
    x, residual = torch.randn(3, 8).bfloat16(), torch.randn(3, 8)
    normed, new_residual = ops.add_rms_norm(x, residual, torch.ones(8), 1e-6)
    assert (normed.dtype, new_residual.dtype) == (torch.bfloat16, torch.float32)
    torch.testing.assert_close(new_residual, residual + x.float())


def test_swiglu_and_cross_entropy_references():
    gate, up = torch.randn(4, 6), torch.randn(4, 6)
    torch.testing.assert_close(ops.swiglu(gate, up), gate * torch.sigmoid(gate) * up)
    logits, targets = torch.randn(7, 11).bfloat16(), torch.tensor([0, 3, -100, 10, 2, -100, 5])
    summed = ops.cross_entropy(logits, targets)
    assert summed.dtype == torch.float32  # the loss is taken in fp32 whatever the logits' dtype
    kept = targets != -100
    expected = -torch.log_softmax(logits.float()[kept], -1).gather(1, targets[kept, None]).sum()
    torch.testing.assert_close(summed, expected)


@pytest.mark.parametrize("packed", [False, True])
def test_conv_ssd_scan_is_conv_then_scan_then_gated_norm(packed):
    torch.manual_seed(0)
    b, t, nheads, headdim, ngroups, d_state, width, chunk = 2, 32, 4, 8, 2, 8, 4, 16
    d_inner = nheads * headdim
    channels = d_inner + 2 * ngroups * d_state
    zxbcdt = torch.randn(b, t, d_inner + channels + nheads)
    conv_w, conv_b = torch.randn(channels, width) * 0.5, torch.randn(channels) * 0.1
    dt_bias, A, D, norm_w = (
        torch.rand(nheads) - 3,
        -torch.rand(nheads) * 4 - 1,
        torch.randn(nheads),
        torch.rand(d_inner),
    )
    seq_idx = torch.tensor([[0] * 20 + [1] * 12, [0] * 32], dtype=torch.int32) if packed else None
    y = ops.conv_ssd_scan(
        zxbcdt, conv_w, conv_b, dt_bias, A, D, chunk, seq_idx, (0.0, float("inf")), norm_w, 1e-5, headdim, ngroups
    )
    # spelled out with torch's own conv1d and a per-token recurrence of the SSM (no chunking)
    z, xBC, dt = zxbcdt.split([d_inner, channels, nheads], dim=-1)
    conv = F.conv1d(F.pad(xBC.transpose(1, 2), (width - 1, 0)), conv_w[:, None], conv_b, groups=channels)
    if packed:  # the second document of row 0 starts afresh: its conv sees no earlier tokens
        conv[0, :, 20:] = F.conv1d(
            F.pad(xBC[0:1, 20:].transpose(1, 2), (width - 1, 0)), conv_w[:, None], conv_b, groups=channels
        )[0]
    x, B, C = F.silu(conv).transpose(1, 2).split([d_inner, ngroups * d_state, ngroups * d_state], dim=-1)
    x, B, C = (
        x.unflatten(-1, (nheads, headdim)),
        B.unflatten(-1, (ngroups, d_state)),
        C.unflatten(-1, (ngroups, d_state)),
    )
    delta = F.softplus(dt + dt_bias)
    state = torch.zeros(b, nheads, headdim, d_state)
    ys = []
    for i in range(t):
        if packed and i == 20:
            state[0] = 0
        g = torch.arange(nheads) // (nheads // ngroups)
        decay = torch.exp(delta[:, i] * A)[..., None, None]
        state = state * decay + (delta[:, i, :, None] * x[:, i])[..., None] * B[:, i, g][:, :, None, :]
        ys.append((state * C[:, i, g][:, :, None, :]).sum(-1) + D[:, None] * x[:, i])
    y_ssm = torch.stack(ys, dim=1).flatten(-2)
    gated = (y_ssm * F.silu(z)).unflatten(-1, (ngroups, -1))
    expected = norm_w * (gated * torch.rsqrt(gated.pow(2).mean(-1, keepdim=True) + 1e-5)).flatten(-2)
    torch.testing.assert_close(y, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("packed", [False, True], ids=["one document", "packed rows"])
def test_rotary_from_a_table_of_angles_is_the_reference_rotation(packed):
    """The fused rotary's two parts (a cos / sin table per token, then the rotation reading it; each compiled on
    CUDA) give the reference's values and input gradient: equal in fp32, within bf16 rounding in bf16 (the table
    path rounds once, the reference rounds cos and sin to bf16 first)."""
    from hybridlm.ops.compiled import rotary_apply, rotary_ref, rotary_table

    torch.manual_seed(0)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, 32, 2).float() / 32))  # half of each 64-dim head rotated
    positions = torch.cat([torch.arange(30), torch.arange(20)]).repeat(2, 1) if packed else torch.arange(50)
    x = torch.randn(2, 50, 4, 64, requires_grad=True)
    cot = torch.randn(2, 50, 4, 64)
    ref = rotary_ref(x, positions, inv_freq)
    (grad_ref,) = torch.autograd.grad((ref * cot).sum(), x)
    out = rotary_apply(x, *rotary_table(positions, inv_freq))
    (grad,) = torch.autograd.grad((out * cot).sum(), x)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-6, atol=1e-6)
    assert torch.equal(out[..., 32:], x[..., 32:])  # the unrotated channels pass through

    xb = x.detach().bfloat16()
    out_b = rotary_apply(xb, *rotary_table(positions, inv_freq))
    assert out_b.dtype == torch.bfloat16
    torch.testing.assert_close(out_b.float(), rotary_ref(xb.float(), positions, inv_freq), rtol=2e-2, atol=2e-2)
