"""Where training numbers go: rank 0's progress bar, ``metrics.jsonl``, TensorBoard, W&B and ``loss.png``.

Every sink is rank 0's; other ranks get a logger that does nothing. TensorBoard is used when
``torch.utils.tensorboard`` imports (the ``tensorboard`` package), W&B only when ``wandb`` imports
and ``WANDB_PROJECT`` is set.
"""

from __future__ import annotations

import json
import math
import os
import resource
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

METRICS_FILE = "metrics.jsonl"
LOSS_PLOT = "loss.png"


def say(message: str, rank: int = 0) -> None:
    """A line for the user from rank 0, printed above the progress bar."""
    if rank == 0:
        tqdm.write(message)


def memory_gb(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocations on GPU, resident set size on CPU (GiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class MetricsLogger:
    """Appends one JSON object per record to ``metrics.jsonl`` and mirrors scalars to TensorBoard / W&B."""

    def __init__(self, out_dir: Path, enabled: bool, run_config: dict[str, Any]):
        self.enabled = enabled
        self.path = Path(out_dir) / METRICS_FILE
        self.tb = self.wandb = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(out_dir) / "tensorboard"))
        except ImportError:
            pass
        if os.environ.get("WANDB_PROJECT"):
            try:
                import wandb

                self.wandb = wandb.init(config=run_config, dir=str(out_dir), resume="allow")
            except ImportError:
                pass

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self.tb is not None:
            for key, value in scalars.items():
                self.tb.add_scalar(key, value, record["step"])
        if self.wandb is not None:
            self.wandb.log(scalars, step=record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def truncate_metrics(out_dir: Path, step: int) -> None:
    """Drop records after ``step`` (a resumed run redoes those steps)."""
    path = Path(out_dir) / METRICS_FILE
    if path.is_file():
        kept = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
        path.write_text("".join(line + "\n" for line in kept))


def read_metrics(out_dir: Path) -> list[dict[str, Any]]:
    path = Path(out_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.is_file() else []


def plot_loss(out_dir: Path) -> Path | None:
    """Train (and validation) loss against step, from ``metrics.jsonl``, as ``loss.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(out_dir)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r and _finite(r["loss"])]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if not train and not val:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train")
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(out_dir) / LOSS_PLOT
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


class ProgressBar:
    """tqdm on rank 0 with loss, lr, tokens/s and MFU; tqdm supplies the ETA."""

    def __init__(self, enabled: bool, total: int, initial: int):
        self.bar = tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True)

    def update(self, n: int = 1, record: dict[str, Any] | None = None) -> None:
        if record is not None:
            mfu, loss = record.get("mfu"), record["loss"]
            self.bar.set_postfix(
                loss="skipped" if loss is None else f"{loss:.4f}",
                lr=f"{record['lr']:.2e}",
                tok_s=f"{record['tokens_per_second']:.0f}",
                mfu="-" if mfu is None else f"{100 * mfu:.1f}%",
                refresh=False,
            )
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()
