"""The registry of HF architectures and the choice of export target.

Each architecture module provides ``MODEL_TYPE``, ``can_express(cfg)``, ``to_hf(model)``,
``from_hf(hf_config, state_dict)`` and ``weight_table(cfg, keys)``. ``TARGETS`` is ordered from
the most specific to the most general: auto-selection takes the first that can express a model.
"""

from __future__ import annotations

from types import ModuleType

from hybridlm.config import ModelConfig
from hybridlm.convert import bamba, granitemoehybrid, jamba, llama, mamba, mamba2, nemotron_h
from hybridlm.convert.common import ConvertError, describe_pattern

# pure models first, then Mamba-2 hybrids (bamba, granitemoehybrid, nemotron_h), then Mamba-1 hybrids
TARGETS: dict[str, ModuleType] = {
    m.MODEL_TYPE: m for m in (mamba2, mamba, llama, bamba, granitemoehybrid, nemotron_h, jamba)
}


def expressible_by(cfg: ModelConfig) -> list[str]:
    """Every target that can express ``cfg``, in preference order."""
    return [name for name, target in TARGETS.items() if target.can_express(cfg) is None]


def select_target(cfg: ModelConfig, arch: str | None = None) -> ModuleType:
    """The target module for ``cfg``: ``arch`` if given and able, else the most specific that can express it."""
    if arch is not None:
        if arch not in TARGETS:
            raise ConvertError(f"unknown target architecture {arch!r}; supported: {', '.join(sorted(TARGETS))}")
        reason = TARGETS[arch].can_express(cfg)
        if reason is None:
            return TARGETS[arch]
        able = expressible_by(cfg)
        others = f"targets that can: {', '.join(able)}" if able else "no supported target can express this model"
        raise ConvertError(f"cannot convert to {arch}: {reason} ({others})")
    able = expressible_by(cfg)
    if able:
        return TARGETS[able[0]]
    why = "; ".join(f"{name}: {target.can_express(cfg)}" for name, target in TARGETS.items())
    raise ConvertError(
        f"no Hugging Face architecture can express this model (pattern {describe_pattern(cfg.layers)!r}): {why}"
    )
