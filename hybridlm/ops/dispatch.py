"""The one place that decides which implementation each op uses.

An op runs fused when all hold: kernels are not forced to the reference (run config key
``kernels: reference``, or the environment variable ``HYBRIDLM_KERNELS=reference``), the op is not
named in ``reference_ops`` (one lever off at a time, for ablations), its input lives on CUDA, and the
packages that provide the kernel import. Attention is the exception: without flash-attn it uses torch
SDPA, which is torch's own fused kernel on every device. The choice is logged once per process.

Some ops are compositions (``add_rms_norm``, ``conv_ssd_scan``): their reference is the chain of the
simpler ops, each dispatched on its own, so forcing only the composite to its reference measures
exactly what fusing it gains. ``add_rms_norm``, ``swiglu`` and ``rotary`` are fused by ``torch.compile``
(Inductor writes the Triton kernels); ``cross_entropy`` runs Triton kernels of hybridlm's own; ``linears``
(layers sharing an input) adds their input gradients in torch's GEMMs instead of kernels of their own.
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

# op -> the packages its fused path needs (the first is the one named in kernel tables)
FUSED_PACKAGES: dict[str, tuple[str, ...]] = {
    "selective_scan": ("mamba_ssm",),
    "selective_state_update": ("mamba_ssm",),
    "ssd_scan": ("mamba_ssm",),
    "conv_ssd_scan": ("mamba_ssm", "causal_conv1d"),  # their kernels, orchestrated in ops/conv_ssd.py
    "causal_conv1d": ("causal_conv1d",),
    "causal_conv1d_update": ("causal_conv1d",),
    "rms_norm": ("mamba_ssm",),
    "add_rms_norm": ("triton",),  # torch.compile
    "gated_rms_norm": ("mamba_ssm",),
    "swiglu": ("triton",),  # torch.compile
    "cross_entropy": ("triton",),  # hybridlm's kernels: ops/triton_cross_entropy.py
    "rotary": ("triton",),  # torch.compile
    "attention": ("flash_attn",),
    "linears": ("torch",),  # ops/shared_input.py: torch's GEMMs, the input's gradient summed in their epilogues
}
OPS = tuple(FUSED_PACKAGES)
# how the kernel tables name a fused path whose package does not say who wrote its kernels
FUSED_NAMES = {
    "add_rms_norm": "torch.compile",
    "swiglu": "torch.compile",
    "rotary": "torch.compile",
    "cross_entropy": "Triton (hybridlm)",
    "linears": "GEMM-epilogue gradient sum (hybridlm)",
}
COMPOSITE_OPS = ("add_rms_norm", "conv_ssd_scan")  # unfused, they run the simpler ops (each dispatched)

_forced_reference = False
_reference_ops: frozenset[str] = frozenset()


def set_kernels(mode: str, reference_ops: tuple[str, ...] | list[str] = ()) -> None:
    """``"reference"`` forces every op to its pure-PyTorch reference; ``"auto"`` lets dispatch decide,
    except for the ops named in ``reference_ops``, which run their reference."""
    global _forced_reference, _reference_ops
    if mode not in ("auto", "reference"):
        raise ValueError(f"kernels={mode!r} must be 'auto' or 'reference'")
    _check_ops(reference_ops)
    _forced_reference = mode == "reference"
    _reference_ops = frozenset(reference_ops)
    _announced.clear()


def _check_ops(names) -> None:
    unknown = [n for n in names if n not in FUSED_PACKAGES]
    if unknown:
        raise ValueError(f"reference_ops: unknown op {', '.join(map(repr, unknown))} (ops: {', '.join(OPS)})")


@contextlib.contextmanager
def reference_ops(*names: str) -> Iterator[None]:
    """Run the enclosed code with ``names`` on their reference (one lever off, for an ablation)."""
    global _reference_ops
    _check_ops(names)
    before = _reference_ops
    _reference_ops = before | frozenset(names)
    try:
        yield
    finally:
        _reference_ops = before


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
    if reference_forced() or op in _reference_ops:
        return "reference"
    if device.type == "cuda" and all(available(p) for p in FUSED_PACKAGES[op]):
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
    for op, packages in FUSED_PACKAGES.items():
        choice = _decide(op, device)
        if choice == "reference" and op in COMPOSITE_OPS and not reference_forced():
            table[op] = "unfused (the ops it is made of)"
        else:
            table[op] = names[choice].format(pkg=FUSED_NAMES.get(op, packages[0]))
    return table
