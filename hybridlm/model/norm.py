"""RMSNorm module; the arithmetic lives in hybridlm.ops."""

from __future__ import annotations

import torch
from torch import nn

from hybridlm import ops


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, prenorm: bool = False):
        """``norm(x)``; with ``prenorm`` the residual step in one pass, returning (norm(residual + x),
        residual + x) (see ops.add_rms_norm). Always called as a module so ZeRO-3 gathers the weight."""
        if prenorm:
            return ops.add_rms_norm(x, residual, self.weight, self.eps)
        return ops.rms_norm(x, self.weight, self.eps)


class GatedRMSNorm(nn.Module):
    """Mamba-2's output norm: ``rms_norm(x * silu(z))`` over groups of ``group_size`` channels."""

    def __init__(self, dim: int, group_size: int, eps: float):
        super().__init__()
        self.eps, self.group_size = eps, group_size
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return ops.gated_rms_norm(x, z, self.weight, self.eps, self.group_size)
