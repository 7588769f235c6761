"""Dense feed-forward: SwiGLU (gate_proj, up_proj, down_proj) or non-gated relu² / GELU."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hybridlm import ops
from hybridlm.config import ModelConfig


def activation_fn(name: str):
    """The non-linearity of an FFN; for SwiGLU, the one applied to the gate."""
    return {"swiglu": F.silu, "relu2": lambda x: torch.square(F.relu(x)), "gelu": F.gelu}[name]


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, d_ff: int | None = None):
        super().__init__()
        d_ff = d_ff or cfg.d_ff
        bias = cfg.mlp.bias
        self.gated = cfg.mlp.activation == "swiglu"
        self.act = activation_fn(cfg.mlp.activation)
        if self.gated:
            self.gate_proj = nn.Linear(cfg.d_model, d_ff, bias=bias)
        self.up_proj = nn.Linear(cfg.d_model, d_ff, bias=bias)
        self.down_proj = nn.Linear(d_ff, cfg.d_model, bias=bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.down_proj(ops.swiglu(*ops.linears(h, (self.gate_proj, self.up_proj))))
        return self.down_proj(self.act(self.up_proj(h)))
