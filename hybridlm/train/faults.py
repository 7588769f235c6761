"""What the loop does when things go wrong: preemption signals, non-finite steps, configs that cannot run."""

from __future__ import annotations

import signal

import torch

from hybridlm.config import ConfigError, RunConfig


class TrainingDiverged(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


class StopRequest:
    """Turns SIGTERM / SIGINT into a flag the loop polls at step boundaries, so it can checkpoint and exit.

    A second signal gets the default behaviour back (a second Ctrl-C interrupts at once); the
    checkpoint being written then is abandoned atomically and the previous one stays valid.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signal_name: str | None = None
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name
        self.restore()

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def requested(self, world_size: int) -> bool:
        """Whether any rank was signalled (a collective when world_size > 1, so all ranks stop together)."""
        flag = self.signal_name is not None
        if world_size == 1:
            return flag
        t = torch.tensor([float(flag)], device=_collective_device())
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        if t.item() and self.signal_name is None:
            self.signal_name = "SIGTERM (on another rank)"
        return bool(t.item())


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def poison_if_nonfinite(loss: torch.Tensor) -> torch.Tensor:
    """``loss`` unchanged if finite, else NaN, without a host sync.

    An infinite loss can still give finite gradients; turning it into NaN makes every gradient NaN
    so the engine's finiteness check (ZeRO) or our AdamW's (stage 0) skips the step on every rank.
    """
    return loss * torch.where(torch.isfinite(loss), 1.0, float("nan"))


def check_train_config(cfg: RunConfig) -> None:
    """Checks of ``train:`` the loop needs, before any work; one line naming the key (``init_from`` is checked
    by ``init_from.resolve_init_from``)."""
    t = cfg.train
    rules = [
        ("train.warmup_steps", t.warmup_steps, t.warmup_steps >= 0, "must be >= 0"),
        ("train.min_lr_ratio", t.min_lr_ratio, 0.0 <= t.min_lr_ratio <= 1.0, "must be in [0, 1]"),
        ("train.decay_fraction", t.decay_fraction, 0.0 < t.decay_fraction <= 1.0, "must be in (0, 1]"),
        ("train.weight_decay", t.weight_decay, t.weight_decay >= 0, "must be >= 0"),
        ("train.betas", list(t.betas), all(0.0 <= b < 1.0 for b in t.betas), "must both be in [0, 1)"),
        ("train.grad_clip", t.grad_clip, t.grad_clip >= 0, "must be >= 0 (0 = no clipping)"),
        ("train.save_every", t.save_every, t.save_every >= 0, "must be >= 0 (0 = only at the end)"),
        ("train.eval_every", t.eval_every, t.eval_every >= 0, "must be >= 0 (0 = only at the end)"),
        ("train.keep_last", t.keep_last, t.keep_last >= 1, "must be >= 1"),
        ("train.eval_batches", t.eval_batches, t.eval_batches >= 1, "must be >= 1"),
        ("train.log_every", t.log_every, t.log_every >= 1, "must be >= 1"),
        ("train.max_bad_steps", t.max_bad_steps, t.max_bad_steps >= 1, "must be >= 1"),
        ("train.sample_tokens", t.sample_tokens, t.sample_tokens >= 0, "must be >= 0"),
        ("train.seq_len", t.seq_len, t.seq_len >= 2, "must be >= 2 (an input and a target)"),
    ]
    for key, value, ok, why in rules:
        if not ok:
            raise ConfigError(f"{key}={value} {why}")
    ac = t.activation_checkpointing
    if isinstance(ac, int) and ac < 1:
        raise ConfigError(f"train.activation_checkpointing={ac} must be 'none', 'every' or a layer period >= 1")
    if t.offload_optimizer and t.zero_stage == 0:
        raise ConfigError("train.offload_optimizer=true needs train.zero_stage >= 1 (ZeRO holds the offloaded state)")
