"""Conversion tests build tiny models on both sides; they run single-threaded."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: thread start-up and contention on a shared CPU cost far more than they save."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@torch.no_grad()
def _perturb(module: torch.nn.Module) -> None:
    for p in module.parameters():
        p.add_(torch.randn_like(p) * 0.1)
    for name, b in module.named_buffers():
        if b.is_floating_point() and "inv_freq" not in name:
            b.add_(torch.randn_like(b) * 0.1)


@pytest.fixture
def perturb():
    """Moves every parameter and float buffer off its initial value: norms start at one, biases and
    correction biases at zero, so a swapped or dropped tensor would otherwise go unnoticed."""
    return _perturb
