"""DeepSpeed as the engine: process group, device, precision, the generated DeepSpeed JSON, and ``initialize``.

The same code runs on one process and on N. On a machine without CUDA DeepSpeed selects its CPU
accelerator by itself (``DS_ACCELERATOR=cpu`` forces it); that accelerator talks over torch's gloo
backend unless oneCCL bindings are installed, so nothing beyond plain torch is needed on CPU.

Precision: ``bf16`` is DeepSpeed's ``torch_autocast`` mode, not its ``bf16`` mode. Parameters and
optimizer state stay fp32 and matmuls run in bf16 under ``torch.autocast``, so A_log, D and dt_bias
are fp32 in every forward under ZeRO 0-3. DeepSpeed's ``bf16`` mode would store every parameter in
bf16, which the Mamba authors advise against; a user DeepSpeed JSON that enables it is refused.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hybridlm.config import ConfigError, TrainConfig
from hybridlm.model.mamba1 import Mamba1
from hybridlm.model.mamba2 import Mamba2
from hybridlm.model.moe import MoE

log = logging.getLogger("hybridlm.train")


def init_distributed() -> tuple[int, int, torch.device]:
    """Join (or, for a plain ``python train.py``, create) the process group; returns rank, world size, device.

    Launchers (deepspeed, torchrun, SLURM via torchrun) set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
    MASTER_PORT. Without them this is a one-process group on a free local port, and RANK / MASTER_PORT stay
    unset so that processes this one starts (tests, launchers) do not inherit them.
    """
    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if "RANK" in os.environ:
            deepspeed.init_distributed(dist_backend=backend, verbose=False)
        else:  # a plain process: a private one-rank group; only LOCAL_RANK (DeepSpeed reads it) goes to the env
            os.environ.setdefault("LOCAL_RANK", "0")
            deepspeed.init_distributed(
                dist_backend=backend,
                auto_mpi_discovery=False,
                init_method=f"tcp://127.0.0.1:{_free_port()}",
                rank=0,
                world_size=1,
                verbose=False,
            )
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), device


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def barrier() -> None:
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()


def resolve_precision(t: TrainConfig, device: torch.device) -> str:
    """``bf16`` or ``fp32``: ``auto`` is bf16 autocast on CUDA and fp32 elsewhere."""
    if t.precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if t.precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"train.precision=bf16 but {torch.cuda.get_device_name(device)} has no bf16 support")
    return t.precision


def deepspeed_config(t: TrainConfig, world_size: int, precision: str, model: nn.Module) -> dict[str, Any]:
    """The DeepSpeed JSON for this run: generated from ``train:``, then ``train.deepspeed_config`` merged over it."""
    # DeepSpeed's 5e8-element communication buckets are allocated whole: cap them at the model's size
    # (a small model on CPU otherwise spends seconds zeroing gigabytes it never fills).
    bucket = min(500_000_000, sum(p.numel() for p in model.parameters()))
    zero: dict[str, Any] = {"stage": t.zero_stage}
    if t.zero_stage in (1, 2):
        zero.update(reduce_bucket_size=bucket, allgather_bucket_size=bucket)
    elif t.zero_stage == 3:
        zero.update(reduce_bucket_size=bucket, stage3_prefetch_bucket_size=min(50_000_000, bucket))
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch_size * t.grad_accum * world_size,
        # Without ZeRO our AdamW clips, so that a non-finite norm can skip the step (see optim.AdamW).
        "gradient_clipping": t.grad_clip if t.zero_stage > 0 else 0.0,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,  # the trainer logs; silence DeepSpeed's own progress lines
        "wall_clock_breakdown": False,
    }
    if t.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        config["zero_force_ds_cpu_optimizer"] = False  # keep our AdamW (param groups, non-finite guard)
    if precision == "bf16":
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    if t.deepspeed_config:
        user = read_user_config(t.deepspeed_config)
        check_user_config(user, t, world_size, has_mamba=any(isinstance(m, (Mamba1, Mamba2)) for m in model.modules()))
        config = _deep_merge(config, user)
    return config


def read_user_config(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"train.deepspeed_config={path}: file not found")
    try:
        raw = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"train.deepspeed_config={path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"train.deepspeed_config={path}: must hold a JSON object")
    return raw


def check_user_config(user: dict[str, Any], t: TrainConfig, world_size: int, has_mamba: bool) -> None:
    """Refuse user settings that would silently disagree with the run config or break the fp32 SSM rule."""
    owned = {
        "train_micro_batch_size_per_gpu": ("train.micro_batch_size", t.micro_batch_size),
        "gradient_accumulation_steps": ("train.grad_accum", t.grad_accum),
        "train_batch_size": (
            "train.micro_batch_size * train.grad_accum * world size",
            t.micro_batch_size * t.grad_accum * world_size,
        ),
    }
    stage = user.get("zero_optimization", {}).get("stage")
    if stage is not None:
        owned["zero_optimization.stage"] = ("train.zero_stage", t.zero_stage)
    for key, (run_key, expected) in owned.items():
        value = stage if key == "zero_optimization.stage" else user.get(key, expected)
        if value != expected:
            raise ConfigError(
                f"train.deepspeed_config={t.deepspeed_config} sets {key}={value} but {run_key}={expected}; "
                "set it in the run config instead"
            )
    for mode in ("bf16", "fp16"):
        if has_mamba and user.get(mode, {}).get("enabled"):
            raise ConfigError(
                f"train.deepspeed_config={t.deepspeed_config} enables DeepSpeed's {mode} mode, which stores A_log, "
                "D and dt_bias in low precision; use train.precision=bf16 (torch autocast, fp32 parameters)"
            )


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def build_engine(model: nn.Module, optimizer: torch.optim.Optimizer, config: dict[str, Any]):
    """``deepspeed.initialize`` with the model's MoE blocks as ZeRO-3 leaf modules, and the parameters
    Mamba mixers read straight from their submodules registered with the mixer.

    A leaf module's parameters are gathered as one unit when it is entered, so ranks whose tokens
    route to different experts still fetch the same parameters in the same order (no hang); our
    MoE also calls its experts through a method, not ``forward``, which per-module hooks would miss.
    Mamba mixers hand their conv (and Mamba-2's gated-norm, Mamba-1's dt_proj) weights to fused kernels
    without calling those submodules: registered as the mixer's external parameters, ZeRO-3 gathers
    them for the mixer's forward and again for its backward.
    """
    import deepspeed
    from deepspeed.utils import set_z3_leaf_modules

    zero3 = config["zero_optimization"]["stage"] == 3
    if zero3 and any(isinstance(m, MoE) for m in model.modules()):
        set_z3_leaf_modules(model, [MoE])
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    if zero3:
        for module in model.modules():
            if isinstance(module, Mamba1 | Mamba2):
                for param in module.params_read_directly():
                    deepspeed.zero.register_external_parameter(module, param)
    return engine
