"""Conversion tests build tiny models on both sides; they run single-threaded."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Every conversion test runs single-threaded (tests/conftest.py's ``one_thread``)."""


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
