"""Mamba-1 mixer (selective scan, S6). Parameter names follow transformers' Mamba / Jamba."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hybridlm import ops
from hybridlm.config import ModelConfig
from hybridlm.model.cache import InferenceCache, MambaState
from hybridlm.model.mamba2 import inverse_softplus, sample_dt
from hybridlm.model.norm import RMSNorm


class Mamba1(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        m = cfg.mamba
        self.layer_idx = layer_idx
        self.d_inner, self.d_state, self.dt_rank = cfg.d_inner, m.d_state, cfg.dt_rank
        self.in_proj = nn.Linear(cfg.d_model, 2 * self.d_inner, bias=m.proj_bias)  # [x | z]
        self.conv1d = nn.Conv1d(
            self.d_inner, self.d_inner, m.d_conv, groups=self.d_inner, bias=m.conv_bias, padding=m.d_conv - 1
        )
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * self.d_state, bias=False)  # [dt | B | C]
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)  # its bias is the dt bias
        if m.inner_norms:  # Jamba normalises dt, B and C after x_proj
            self.dt_layernorm = RMSNorm(self.dt_rank, cfg.norm_eps)
            self.b_layernorm = RMSNorm(self.d_state, cfg.norm_eps)
            self.c_layernorm = RMSNorm(self.d_state, cfg.norm_eps)
        self.inner_norms = m.inner_norms
        self.A_log = nn.Parameter(torch.empty(self.d_inner, self.d_state))
        self.D = nn.Parameter(torch.empty(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, cfg.d_model, bias=m.proj_bias)
        self._init_ssm(cfg)

    @torch.no_grad()
    def _init_ssm(self, cfg: ModelConfig) -> None:
        m = cfg.mamba
        std = self.dt_rank**-0.5
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        self.dt_proj.bias.copy_(inverse_softplus(sample_dt(self.d_inner, m.dt_min, m.dt_max, m.dt_init_floor)))
        self.A_log.copy_(torch.log(torch.arange(1, self.d_state + 1, dtype=torch.float32)).expand_as(self.A_log))
        self.D.fill_(1.0)

    def forward(
        self, h: torch.Tensor, reset: torch.Tensor | None = None, cache: InferenceCache | None = None
    ) -> torch.Tensor:
        seqlen = h.shape[1]
        x, z = self.in_proj(h).chunk(2, dim=-1)
        A = -torch.exp(self.A_log.float())
        conv_weight = self.conv1d.weight.squeeze(1)  # (channels, width); a view both ways (indexing zero-fills)
        if cache is not None and cache.seqlen_offset > 0:
            state = cache.layers[self.layer_idx]
            x = ops.causal_conv1d_update(x[:, 0], state.conv_state, conv_weight, self.conv1d.bias, "silu")
            dt, B, C = self._dt_B_C(x)
            y = ops.selective_state_update(
                state.ssm_state, x, dt, A, B, C, D=self.D, z=z[:, 0], dt_bias=self.dt_proj.bias
            )
            return self.out_proj(y[:, None])
        x_t = x.transpose(1, 2)  # (batch, d_inner, seqlen)
        seq_idx = None if reset is None else torch.cumsum(reset, dim=1)
        x_conv = ops.causal_conv1d(x_t, conv_weight, self.conv1d.bias, "silu", seq_idx)
        dt, B, C = self._dt_B_C(x_conv.transpose(1, 2))
        out = ops.selective_scan(
            x_conv,
            dt.transpose(1, 2),
            A,
            B.transpose(1, 2),
            C.transpose(1, 2),
            D=self.D,
            z=z.transpose(1, 2),
            delta_bias=self.dt_proj.bias,
            reset=reset,
            return_last_state=cache is not None,
        )
        if cache is not None:
            out, ssm_state = out
            width = self.conv1d.kernel_size[0]
            conv_state = F.pad(x_t, (width - seqlen, 0))[..., -width:].contiguous()
            cache.store_mamba(self.layer_idx, conv_state, ssm_state.to(self.in_proj.weight.dtype))
        return self.out_proj(out.transpose(1, 2))

    def _dt_B_C(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Input-dependent Δ (before bias and softplus), B and C from the conv output."""
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        if self.inner_norms:
            dt, B, C = self.dt_layernorm(dt), self.b_layernorm(B), self.c_layernorm(C)
        return F.linear(dt, self.dt_proj.weight), B, C

    def params_read_directly(self) -> list[nn.Parameter]:
        """Submodule parameters handed to kernels without calling the submodule (ZeRO-3 must gather them)."""
        candidates = (self.conv1d.weight, self.conv1d.bias, self.dt_proj.weight, self.dt_proj.bias)
        return [p for p in candidates if p is not None]

    def empty_state(self, batch: int, device, dtype) -> MambaState:
        return MambaState(
            torch.zeros(batch, self.d_inner, self.conv1d.kernel_size[0], device=device, dtype=dtype),
            torch.zeros(batch, self.d_inner, self.d_state, device=device, dtype=dtype),
        )
