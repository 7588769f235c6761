"""AdamW with weight-decay parameter groups, the learning-rate schedules, and the non-finite step guard.

The schedule is a pure function of the training step (``lr_at``), so restoring the step restores the
scheduler exactly; skipped (non-finite) steps still advance it, like the data position does.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from hybridlm.config import TrainConfig

# Parameters that get no weight decay besides every 1-D tensor (biases, norm weights, D, dt_bias):
# A_log is 2-D in Mamba-1, and embeddings (tied with the LM head or not) are matrices.
NO_DECAY_NAMES = ("A_log", "D", "dt_bias", "embed_tokens.weight")


def decays(name: str, param: nn.Parameter) -> bool:
    """Whether weight decay applies: only to matrices of projections, experts and an untied LM head."""
    if param.dim() < 2 or name.endswith(".bias"):
        return False
    return not any(name == n or name.endswith("." + n) for n in NO_DECAY_NAMES)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed matrices and everything else (tied weights appear once)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if decays(name, p) else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def lr_at(step: int, t: TrainConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then cosine, linear or WSD.

    Cosine and linear decay from ``lr`` to ``lr * min_lr_ratio`` over the steps after warmup. WSD
    (warmup-stable-decay) holds ``lr`` and decays linearly to the floor over the last
    ``decay_fraction`` of all steps.
    """
    floor = t.lr * t.min_lr_ratio
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    if t.schedule == "wsd":
        decay_steps = max(1, round(t.decay_fraction * t.max_steps))
        decay_start = max(t.warmup_steps, t.max_steps - decay_steps)
        if step < decay_start:
            return t.lr
        progress = min(1.0, (step - decay_start + 1) / max(1, t.max_steps - decay_start))
        return t.lr - (t.lr - floor) * progress
    progress = min(1.0, (step - t.warmup_steps + 1) / max(1, t.max_steps - t.warmup_steps))
    if t.schedule == "linear":
        return t.lr - (t.lr - floor) * progress
    return floor + 0.5 * (t.lr - floor) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's learning rate (DeepSpeed's ZeRO optimizers share these group dicts)."""
    for group in optimizer.param_groups:
        group["lr"] = lr


class AdamW(torch.optim.AdamW):
    """torch AdamW that, when ``guard`` is on, clips, reports the grad norm and refuses a non-finite update.

    Under ZeRO 1-3 DeepSpeed computes the global norm, clips, and skips a step whose norm is not
    finite before this optimizer runs. Without ZeRO (stage 0) it would apply the NaNs, so there the
    engine's clipping is off and this class guards: it clips to ``clip`` (0 = no clipping), leaves
    the norm in ``_global_grad_norm`` (the engine copies it) and, on a non-finite norm, skips the
    update and sets ``overflow``, which the engine reads to count a skipped step.
    """

    def __init__(self, params, guard: bool = False, clip: float = 0.0, **kwargs):
        super().__init__(params, **kwargs)
        self.guard, self.clip = guard, clip
        self.overflow = False
        self._global_grad_norm: float | None = None

    @torch.no_grad()
    def step(self, closure=None):
        if not self.guard:
            return super().step(closure)
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        self._global_grad_norm = norm.item()
        self.overflow = not math.isfinite(self._global_grad_norm)
        if self.overflow:
            return None
        if self.clip > 0:
            torch.nn.utils.clip_grads_with_norm_(grads, self.clip, norm)
        return super().step(closure)
