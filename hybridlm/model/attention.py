"""Causal self-attention: MHA/GQA, optional (partial) RoPE, optional sliding window.
Parameter names follow transformers' Llama / Bamba / Jamba / Nemotron-H."""

from __future__ import annotations

import torch
from torch import nn

from hybridlm import ops
from hybridlm.config import ModelConfig
from hybridlm.model.cache import InferenceCache


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        a = cfg.attention
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = a.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.window = a.window
        self.q_proj = nn.Linear(cfg.d_model, self.n_heads * self.head_dim, bias=a.bias)
        self.k_proj = nn.Linear(cfg.d_model, self.n_kv_heads * self.head_dim, bias=a.bias)
        self.v_proj = nn.Linear(cfg.d_model, self.n_kv_heads * self.head_dim, bias=a.bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.d_model, bias=a.bias)
        self.rotary = Rotary(cfg.rotary_dim, a.rope_theta) if cfg.rotary_dim else None

    def forward(
        self,
        h: torch.Tensor,
        positions: torch.Tensor,  # (batch, seqlen) or (seqlen,): position of each token in its document
        doc_ids: torch.Tensor | None = None,
        cache: InferenceCache | None = None,
    ) -> torch.Tensor:
        q, k, v = ops.linears(h, (self.q_proj, self.k_proj, self.v_proj))
        q = q.unflatten(-1, (self.n_heads, self.head_dim))  # (batch, seqlen, heads, head_dim)
        k, v = (t.unflatten(-1, (self.n_kv_heads, self.head_dim)) for t in (k, v))
        if self.rotary is not None:
            q, k = self.rotary(q, positions), self.rotary(k, positions)
        query_start = None
        if cache is not None:
            if cache.seqlen_offset == 0:
                cache.store_kv(self.layer_idx, k, v)
            elif cache.position is not None:  # fixed shapes for a CUDA graph: the whole buffer, masked
                k, v = cache.layers[self.layer_idx].write_at(cache.position, k, v)
                query_start = cache.position
            else:
                k, v = cache.layers[self.layer_idx].append(k, v)
        y = ops.attention(q, k, v, causal=True, window=self.window, doc_ids=doc_ids, query_start=query_start)
        return self.o_proj(y.flatten(-2))


class Rotary(nn.Module):
    """Rotary embedding on the first ``dim`` channels of each head (the rest pass through),
    rotating halves (transformers' ``rotate_half`` convention)."""

    def __init__(self, dim: int, theta: float):
        super().__init__()
        self.dim = dim
        inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return ops.rotary(x, positions, self.inv_freq)
