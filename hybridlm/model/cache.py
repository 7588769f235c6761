"""Inference state: a constant-size conv + SSM state per Mamba layer, a growing KV cache per
attention layer. Created by ``HybridLM.generate`` (or by hand for step-by-step decoding)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class MambaState:
    conv_state: torch.Tensor  # (batch, conv_channels, d_conv): the last d_conv conv inputs
    ssm_state: torch.Tensor  # (batch, nheads, headdim, d_state) for Mamba-2, (batch, d_inner, d_state) for Mamba-1


@dataclass
class KVCache:
    keys: torch.Tensor  # (batch, t, n_kv_heads, head_dim)
    values: torch.Tensor

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys = torch.cat([self.keys, keys], dim=1)
        self.values = torch.cat([self.values, values], dim=1)
        return self.keys, self.values


@dataclass
class InferenceCache:
    """Per-layer state, keyed by sub-layer index; ``seqlen_offset`` counts tokens already seen."""

    layers: dict[int, MambaState | KVCache] = field(default_factory=dict)
    seqlen_offset: int = 0

    def nbytes(self) -> int:
        total = 0
        for state in self.layers.values():
            tensors = (
                (state.conv_state, state.ssm_state) if isinstance(state, MambaState) else (state.keys, state.values)
            )
            total += sum(t.numel() * t.element_size() for t in tensors)
        return total
