"""Mixture-of-experts FFN: a top-k router over FFN experts, dropless, plus an optional shared expert.

Routers (``model.moe.router``): ``softmax`` keeps the top-k softmax weights (Jamba),
``softmax_norm`` renormalises them to sum to one (GraniteMoeHybrid), ``sigmoid`` scores experts
with a sigmoid, picks them using a per-expert bias buffer within the best groups, renormalises
and scales (Nemotron-H). The load-balancing loss is returned, not added: the trainer weighs it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hybridlm.config import ModelConfig
from hybridlm.model.mlp import MLP, activation_fn


class Router(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        e = cfg.moe
        self.kind, self.top_k, self.scale = e.router, e.top_k, e.scale
        self.n_experts, self.n_groups, self.topk_groups = e.n_experts, e.n_groups, e.topk_groups
        self.weight = nn.Parameter(torch.empty(e.n_experts, cfg.d_model))
        if self.kind == "sigmoid":
            # steers only which experts are chosen; adjusted outside SGD to balance load
            self.register_buffer("expert_bias", torch.zeros(e.n_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (tokens, d_model) -> (probs (tokens, experts), weights (tokens, k), expert indices (tokens, k))."""
        logits = F.linear(x.float(), self.weight.float())
        if self.kind == "sigmoid":
            probs = torch.sigmoid(logits)
            indices = self._grouped_topk(probs + self.expert_bias)
            weights = probs.gather(1, indices)
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20) * self.scale
            return probs, weights, indices
        probs = torch.softmax(logits, dim=-1)
        weights, indices = torch.topk(probs, self.top_k, dim=-1)
        if self.kind == "softmax_norm":
            weights = weights / weights.sum(-1, keepdim=True)
        return probs, weights, indices

    def _grouped_topk(self, choice_scores: torch.Tensor) -> torch.Tensor:
        if self.n_groups == 1:
            return torch.topk(choice_scores, self.top_k, dim=-1).indices
        grouped = choice_scores.unflatten(-1, (self.n_groups, -1))  # (tokens, groups, experts/group)
        group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)
        kept = torch.zeros_like(group_scores, dtype=torch.bool)
        kept.scatter_(1, group_scores.topk(self.topk_groups, dim=-1).indices, True)
        masked = grouped.masked_fill(~kept[..., None], float("-inf")).flatten(1)
        return torch.topk(masked, self.top_k, dim=-1).indices


class Experts(nn.Module):
    """Expert weights stacked as 3-D tensors (transformers' layout): for SwiGLU ``gate_up_proj``
    holds [gate | up] along the output dim; otherwise ``up_proj``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        n, d, d_ff = cfg.moe.n_experts, cfg.d_model, cfg.expert_d_ff
        self.gated = cfg.mlp.activation == "swiglu"
        self.act = activation_fn(cfg.mlp.activation)
        if self.gated:
            self.gate_up_proj = nn.Parameter(torch.empty(n, 2 * d_ff, d))
        else:
            self.up_proj = nn.Parameter(torch.empty(n, d_ff, d))
        self.down_proj = nn.Parameter(torch.empty(n, d, d_ff))

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            gate, up = F.linear(x, self.gate_up_proj[e]).chunk(2, dim=-1)
            return F.linear(self.act(gate) * up, self.down_proj[e])
        return F.linear(self.act(F.linear(x, self.up_proj[e])), self.down_proj[e])


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.n_experts = cfg.moe.n_experts
        self.router = Router(cfg)
        self.experts = Experts(cfg)
        self.shared_expert = MLP(cfg, layer_idx, d_ff=cfg.moe.shared_d_ff) if cfg.moe.shared_d_ff else None
        self.aux_loss: torch.Tensor | None = None  # set by every forward, read by the model

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = h.reshape(-1, h.shape[-1])  # (tokens, d_model)
        probs, weights, indices = self.router(x)
        out = torch.zeros_like(x)
        # Dropless: every expert runs on exactly the tokens routed to it. Every expert is visited
        # even with no tokens, so all ranks touch the same parameters (no ZeRO-3 gather hang).
        for e in range(self.n_experts):
            token_idx, slot = torch.where(indices == e)
            y = self.experts.expert(e, x[token_idx])
            out.index_add_(0, token_idx, (y * weights[token_idx, slot, None]).to(x.dtype))
        if self.shared_expert is not None:
            out = out + self.shared_expert(x)
        self.aux_loss = load_balancing_loss(probs, indices, self.n_experts)
        return out.view_as(h)


def load_balancing_loss(probs: torch.Tensor, indices: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Switch-Transformer loss: n_experts * Σ_e (share of routed slots to e) * (mean router prob of e).
    Equals 1 for perfectly uniform routing."""
    routed_share = F.one_hot(indices, n_experts).float().mean(dim=(0, 1))
    mean_prob = probs.mean(0) if probs.shape[0] else probs.sum(0)
    mean_prob = mean_prob / mean_prob.sum().clamp_min(1e-20)  # sigmoid scores do not sum to one
    return n_experts * (routed_share * mean_prob).sum()
