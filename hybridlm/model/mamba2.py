"""Mamba-2 mixer (SSD). Parameter names follow transformers' Bamba / Mamba2 / Nemotron-H."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hybridlm import ops
from hybridlm.config import ModelConfig
from hybridlm.model.cache import InferenceCache, MambaState
from hybridlm.model.norm import GatedRMSNorm


class Mamba2(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        m = cfg.mamba
        self.layer_idx = layer_idx
        self.d_inner, self.nheads, self.headdim = cfg.d_inner, cfg.mamba_n_heads, m.head_dim
        self.ngroups, self.d_state, self.chunk_size = m.ngroups, m.d_state, m.chunk_size
        self.dt_limit = m.dt_limit
        self.conv_channels = cfg.conv_channels
        # in_proj emits [z | x B C | dt], the order of mamba_ssm and transformers
        self.in_proj = nn.Linear(cfg.d_model, self.d_inner + self.conv_channels + self.nheads, bias=m.proj_bias)
        self.conv1d = nn.Conv1d(
            self.conv_channels,
            self.conv_channels,
            m.d_conv,
            groups=self.conv_channels,
            bias=m.conv_bias,
            padding=m.d_conv - 1,
        )
        # SSM parameters stay fp32 (the Mamba authors' requirement): see HybridLM.cast
        self.dt_bias = nn.Parameter(torch.empty(self.nheads))
        self.A_log = nn.Parameter(torch.empty(self.nheads))
        self.D = nn.Parameter(torch.empty(self.nheads))
        self.norm = GatedRMSNorm(self.d_inner, self.d_inner // self.ngroups, cfg.norm_eps)
        self.out_proj = nn.Linear(self.d_inner, cfg.d_model, bias=m.proj_bias)
        self._init_ssm(cfg)

    @torch.no_grad()
    def _init_ssm(self, cfg: ModelConfig) -> None:
        m = cfg.mamba
        self.dt_bias.copy_(inverse_softplus(sample_dt(self.nheads, m.dt_min, m.dt_max, m.dt_init_floor)))
        self.A_log.copy_(torch.log(torch.empty(self.nheads).uniform_(*m.A_init_range)))
        self.D.fill_(1.0)

    def forward(
        self, h: torch.Tensor, seq_idx: torch.Tensor | None = None, cache: InferenceCache | None = None
    ) -> torch.Tensor:
        zxbcdt = self.in_proj(h)
        A = -torch.exp(self.A_log.float())
        # (channels, width): a view whose backward is a view too (indexing's backward zero-fills the whole weight)
        conv_weight = self.conv1d.weight.squeeze(1)
        if cache is not None and cache.seqlen_offset > 0:
            z, xBC, dt = zxbcdt.split([self.d_inner, self.conv_channels, self.nheads], dim=-1)
            y = self._step(xBC[:, 0], dt[:, 0], A, conv_weight, cache.layers[self.layer_idx])[:, None]
            return self.out_proj(self.norm(y, z))
        out = ops.conv_ssd_scan(
            zxbcdt,
            conv_weight,
            self.conv1d.bias,
            self.dt_bias,
            A,
            self.D,
            self.chunk_size,
            seq_idx,
            self.dt_limit,
            self.norm.weight,
            self.norm.eps,
            self.headdim,
            self.ngroups,
            return_final_states=cache is not None,
        )
        if cache is None:
            return self.out_proj(out)
        y, ssm_state = out  # prefill: keep the states decoding continues from
        width = self.conv1d.kernel_size[0]
        xBC_t = zxbcdt[..., self.d_inner : self.d_inner + self.conv_channels].transpose(1, 2)
        conv_state = F.pad(xBC_t, (width - xBC_t.shape[-1], 0))[..., -width:]  # the last `width` conv inputs
        cache.store_mamba(self.layer_idx, conv_state.contiguous(), ssm_state.to(self.in_proj.weight.dtype))
        return self.out_proj(y)

    def params_read_directly(self) -> list[nn.Parameter]:
        """Submodule parameters handed to kernels without calling the submodule (ZeRO-3 must gather them)."""
        return [p for p in (self.conv1d.weight, self.conv1d.bias, self.norm.weight) if p is not None]

    def _step(self, xBC, dt, A, conv_weight, state: MambaState) -> torch.Tensor:
        xBC = ops.causal_conv1d_update(xBC, state.conv_state, conv_weight, self.conv1d.bias, "silu")
        x, B, C = xBC.split([self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        p, n = self.headdim, self.d_state
        y = ops.selective_state_update(
            state.ssm_state,
            x.unflatten(-1, (self.nheads, p)),
            dt[..., None].expand(-1, -1, p),
            A[:, None, None].expand(-1, p, n),
            B.unflatten(-1, (self.ngroups, n)),
            C.unflatten(-1, (self.ngroups, n)),
            D=self.D[:, None].expand(-1, p),
            dt_bias=self.dt_bias[:, None].expand(-1, p),
        )
        return y.flatten(-2)

    def empty_state(self, batch: int, device, dtype) -> MambaState:
        return MambaState(
            torch.zeros(batch, self.conv_channels, self.conv1d.kernel_size[0], device=device, dtype=dtype),
            torch.zeros(batch, self.nheads, self.headdim, self.d_state, device=device, dtype=dtype),
        )


def sample_dt(n: int, dt_min: float, dt_max: float, floor: float) -> torch.Tensor:
    """Initial time steps, log-uniform in [dt_min, dt_max] (the Mamba paper's initialisation)."""
    dt = torch.exp(torch.rand(n) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    return dt.clamp(min=floor)


def inverse_softplus(x: torch.Tensor) -> torch.Tensor:
    return x + torch.log(-torch.expm1(-x))
