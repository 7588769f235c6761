"""RMSNorm and Mamba-2's gated, grouped RMSNorm references."""

import torch
import torch.nn.functional as F

from hybridlm.ops.norm import gated_rms_norm_ref, rms_norm_ref


def test_rms_norm_ref():
    x, w = torch.randn(3, 5, 16), torch.randn(16)
    expected = w * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
    torch.testing.assert_close(rms_norm_ref(x, w, 1e-5), expected)


def test_gated_norm_normalises_each_group_separately():
    dim, groups = 16, 2
    x, z, w = torch.randn(3, dim), torch.randn(3, dim), torch.randn(dim)
    out = gated_rms_norm_ref(x, z, w, 1e-5, group_size=dim // groups)
    half = dim // groups
    for g in range(groups):
        part = slice(g * half, (g + 1) * half)
        expected = rms_norm_ref(x[:, part] * F.silu(z[:, part]), w[part], 1e-5)  # gate first, then normalise
        torch.testing.assert_close(out[:, part], expected)
    # with one group the result differs: groups are not a no-op
    assert not torch.allclose(out, gated_rms_norm_ref(x, z, w, 1e-5, group_size=dim), atol=1e-4)
    # scaling one group leaves the other untouched and its own output unchanged (scale invariance)
    x2 = x.clone()
    x2[:, :half] *= 10.0
    out_no_eps = gated_rms_norm_ref(x, z, w, 0.0, half)
    torch.testing.assert_close(gated_rms_norm_ref(x2, z, w, 0.0, half), out_no_eps, atol=1e-5, rtol=1e-4)


def test_norms_keep_the_input_dtype():
    x = torch.randn(2, 8, dtype=torch.bfloat16)
    w = torch.ones(8, dtype=torch.bfloat16)
    assert rms_norm_ref(x, w, 1e-5).dtype == torch.bfloat16
    assert gated_rms_norm_ref(x, x, w, 1e-5, 4).dtype == torch.bfloat16
