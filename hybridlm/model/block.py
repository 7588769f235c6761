"""A residual sub-layer ``h + f(norm(h))``; ``f`` is built from one character of the layer pattern.

The residual stream is carried as (sub-layer output, running sum) and each block adds the previous
output at the start, fused with its norm (as mamba_ssm and flash-attn's blocks do): one kernel reads
both and writes the sum and the normalised input, where a separate add would take another pass."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from hybridlm.config import ModelConfig
from hybridlm.model.attention import Attention
from hybridlm.model.cache import InferenceCache
from hybridlm.model.mamba1 import Mamba1
from hybridlm.model.mamba2 import Mamba2
from hybridlm.model.mlp import MLP
from hybridlm.model.moe import MoE
from hybridlm.model.norm import RMSNorm


@dataclass
class LayerContext:
    """What every sub-layer may need besides the hidden states, computed once per forward."""

    positions: torch.Tensor  # (batch, seqlen) or (seqlen,): RoPE positions
    doc_ids: torch.Tensor | None = None  # (batch, seqlen): packed-document ids
    seq_idx: torch.Tensor | None = None  # (batch, seqlen) int32: document index within the row
    reset: torch.Tensor | None = None  # (batch, seqlen) bool: first token of a document (not t=0)
    cache: InferenceCache | None = None


def build_mixer(kind: str, cfg: ModelConfig, layer_idx: int) -> nn.Module:
    if kind == "M":
        return Mamba1(cfg, layer_idx) if cfg.mamba.version == 1 else Mamba2(cfg, layer_idx)
    if kind == "*":
        return Attention(cfg, layer_idx)
    if kind == "-":
        return MLP(cfg, layer_idx)
    if kind == "E":
        return MoE(cfg, layer_idx)
    raise ValueError(f"unknown sub-layer kind {kind!r}")  # the config validator rejects this earlier


class Block(nn.Module):
    def __init__(self, kind: str, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.kind = kind
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mixer = build_mixer(kind, cfg, layer_idx)

    def forward(
        self, hidden: torch.Tensor, residual: torch.Tensor | None, ctx: LayerContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``hidden``: the previous sub-layer's output (the embeddings for the first); ``residual``: the sum
        of everything before it (None for the first). Returns (this sub-layer's output, the new sum)."""
        x, residual = self.norm(hidden, residual, prenorm=True)
        return self._mix(x, ctx), residual

    def _mix(self, x: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        if isinstance(self.mixer, Mamba2):
            y = self.mixer(x, ctx.seq_idx, ctx.cache)
        elif isinstance(self.mixer, Mamba1):
            y = self.mixer(x, ctx.reset, ctx.cache)
        elif isinstance(self.mixer, Attention):
            y = self.mixer(x, ctx.positions, ctx.doc_ids, ctx.cache)
        else:
            y = self.mixer(x)
        return y
