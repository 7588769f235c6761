"""What the loop does when things go wrong: preemption signals and non-finite steps."""

from __future__ import annotations

import signal

import torch


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
