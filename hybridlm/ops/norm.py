"""RMSNorm and the gated RMSNorm of Mamba-2: references and fused (mamba_ssm Triton) paths. The pre-norm
residual step (add + RMSNorm) is fused by torch.compile: ``hybridlm.ops.compiled``."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * x / rms(x)``, normalised in fp32 and cast back before the weight (as Llama/Bamba)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def gated_rms_norm_ref(
    x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float, group_size: int
) -> torch.Tensor:
    """``rms_norm(x * silu(z))`` per group of ``group_size`` channels (gate before norm, as Mamba-2)."""
    h = x.float() * F.silu(z.float())
    groups = h.unflatten(-1, (-1, group_size))
    groups = groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + eps)
    return weight * groups.flatten(-2).to(x.dtype)


def rms_norm_fused(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    from mamba_ssm.ops.triton.layer_norm import rms_norm_fn

    return rms_norm_fn(x, weight, None, eps=eps)


def gated_rms_norm_fused(
    x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float, group_size: int
) -> torch.Tensor:
    from mamba_ssm.ops.triton.layernorm_gated import rmsnorm_fn

    return rmsnorm_fn(x, weight, None, z=z, eps=eps, group_size=group_size, norm_before_gate=False)
