"""The one place that decides which implementation each op uses.

An op runs fused when all hold: kernels are not forced to the reference (run config key
``kernels: reference``, or the environment variable ``HYBRIDLM_KERNELS=reference``), its input
lives on CUDA, and the package that provides the kernel imports. Attention is the exception:
without flash-attn it uses torch SDPA, which is torch's own fused kernel on every device.
The choice is logged once per process.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from collections.abc import Iterator
from functools import cache

import torch

log = logging.getLogger("hybridlm.ops")

# op -> the package its fused path needs
FUSED_PACKAGE = {
    "selective_scan": "mamba_ssm",
    "selective_state_update": "mamba_ssm",
    "ssd_scan": "mamba_ssm",
    "causal_conv1d": "causal_conv1d",
    "causal_conv1d_update": "causal_conv1d",
    "rms_norm": "mamba_ssm",
    "gated_rms_norm": "mamba_ssm",
    "attention": "flash_attn",
}

_forced_reference = False


def set_kernels(mode: str) -> None:
    """``"reference"`` forces every op to its pure-PyTorch reference; ``"auto"`` lets dispatch decide."""
    global _forced_reference
    if mode not in ("auto", "reference"):
        raise ValueError(f"kernels={mode!r} must be 'auto' or 'reference'")
    _forced_reference = mode == "reference"
    _announced.clear()


@contextlib.contextmanager
def reference_kernels() -> Iterator[None]:
    """Run the enclosed code on the reference ops (tests compare fused against this)."""
    global _forced_reference
    before = _forced_reference
    _forced_reference = True
    try:
        yield
    finally:
        _forced_reference = before


def reference_forced() -> bool:
    return _forced_reference or os.environ.get("HYBRIDLM_KERNELS", "auto").lower() == "reference"


@cache
def available(package: str) -> bool:
    """Whether a kernel package imports (cached; a broken install counts as absent)."""
    if importlib.util.find_spec(package) is None:
        return False
    try:
        importlib.import_module(package)
    except Exception as e:  # a wheel built for another torch/CUDA fails at import
        log.warning("%s is installed but does not import (%s); using the reference path", package, e)
        return False
    return True


def choose(op: str, device: torch.device) -> str:
    """Name of the implementation ``op`` uses for tensors on ``device``: 'fused', 'sdpa' or 'reference'."""
    choice = _decide(op, device)
    _announce(op, device.type, choice)
    return choice


def _decide(op: str, device: torch.device) -> str:
    if reference_forced():
        return "reference"
    if device.type == "cuda" and available(FUSED_PACKAGE[op]):
        return "fused"
    return "sdpa" if op == "attention" else "reference"


_announced: set[tuple[str, str]] = set()


def _announce(op: str, device_type: str, choice: str) -> None:
    if (op, device_type) not in _announced:
        _announced.add((op, device_type))
        log.info("kernel for %s on %s: %s", op, device_type, choice)


def kernel_table(device: torch.device) -> dict[str, str]:
    """What each op will use on ``device``, for ``hybridlm info`` and start-up logs."""
    names = {"fused": "{pkg}", "sdpa": "torch SDPA", "reference": "reference (PyTorch)"}
    table = {}
    for op, pkg in FUSED_PACKAGE.items():
        table[op] = names[_decide(op, device)].format(pkg=pkg)
    return table
