"""Training: the loop on DeepSpeed, optimizer and schedules, checkpoints, metrics, fault handling, fine-tuning.

The names below are imported on first use, so that ``import hybridlm.train.lora`` (or ``.optim``) does not
pull in the whole trainer and its data pipeline.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hybridlm.train.faults import TrainingDiverged
    from hybridlm.train.trainer import run_train, train

__all__ = ["TrainingDiverged", "run_train", "train"]
_HOMES = {
    "TrainingDiverged": "hybridlm.train.faults",
    "run_train": "hybridlm.train.trainer",
    "train": "hybridlm.train.trainer",
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value
