"""Training: the loop on DeepSpeed, optimizer and schedules, checkpoints, metrics and fault handling."""

from hybridlm.train.faults import TrainingDiverged
from hybridlm.train.trainer import run_train, train

__all__ = ["TrainingDiverged", "run_train", "train"]
