"""Consolidated, atomic training checkpoints that any ZeRO stage and any number of ranks can resume from.

Layout of ``<out_dir>/checkpoints``::

    step_00000100/
        config.json, model.safetensors  full fp32 weights in HybridLM.save_pretrained format
                                        (``HybridLM.from_pretrained`` and ``init_from`` read it)
        tokenizer.json, ...             the run's tokenizer (save_pretrained), so the directory is self-contained
        optimizer.safetensors           full AdamW moments of the trainable parameters: exp_avg.<param>,
                                        exp_avg_sq.<param>
        trainer.json                    step, AdamW step count, tokens seen, loader position, run config
        rng_rank00000.json ...          each rank's python / numpy / torch RNG states
    latest                              name of the newest complete checkpoint

A LoRA run's checkpoints keep the adapted model's parameter names (``<module>.base_layer.weight``,
``<module>.lora_A.default.weight``, ...): a resumed run builds the model, adds the adapters, then loads.
Its final export (``<out_dir>/model``) holds the merged weights under plain names; ``init_from`` merges
a checkpoint's adapters itself (``hybridlm.train.init_from``). Frozen parameters have no moments.

Weights and moments are gathered from whatever ZeRO partitioning the run uses, so the files do
not depend on it; a resumed run partitions them again its own way. Gathering goes through rank 0's
host memory: fine at the sizes this project trains (a 500M model needs ~6 GB there).

A checkpoint is written into a hidden temporary directory, every file fsynced, then renamed into
place, and only then does ``latest`` move (write-and-rename too). A crash at any point leaves the
previous checkpoint and ``latest`` untouched.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import PreTrainedTokenizerBase

from hybridlm.config import ConfigError, ModelConfig
from hybridlm.model.model import CONFIG_FILE, WEIGHTS_FILE
from hybridlm.train.engine import barrier
from hybridlm.train.optim import set_lr

CHECKPOINTS = "checkpoints"
MODEL_DIR = "model"  # beside checkpoints/ in a run directory: the final export
LATEST = "latest"
TRAINER_FILE = "trainer.json"
OPTIMIZER_FILE = "optimizer.safetensors"
MOMENTS = ("exp_avg", "exp_avg_sq")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


# ----------------------------------------------------------------------------------------------
# Gathering and restoring engine state


def gather_state(engine) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], int]:
    """Full fp32 weights, AdamW moments and AdamW step count. Collective: every rank must call it;
    only rank 0 gets the tensors (on CPU), the others empty dicts."""
    from deepspeed.utils import safe_get_full_optimizer_state

    module, stage = engine.module, engine.zero_optimization_stage()
    keep = torch.distributed.get_rank() == 0
    base = engine.basic_optimizer
    stepped = bool(base.state)  # AdamW creates its state at the first applied step
    if stepped:
        _link_optimizer_fragments(engine)
    weights: dict[str, torch.Tensor] = {}
    moments: dict[str, torch.Tensor] = {}
    for name, p in module.named_parameters():
        full = _full_weight(p, stage)
        if keep:
            weights[name] = full.float().cpu().clone()
        if not p.requires_grad:
            continue  # frozen (fine-tuning): not in the optimizer
        for key in MOMENTS:
            if not stepped:
                value = torch.zeros(p.ds_shape if hasattr(p, "ds_shape") else p.shape)
            elif stage > 0:
                value = safe_get_full_optimizer_state(p, key)
            else:
                value = base.state[p][key] if p in base.state else torch.zeros_like(p)
            if keep:
                moments[f"{key}.{name}"] = value.float().cpu().clone()
    if keep:
        persistent = module.state_dict().keys()
        weights.update({n: b.detach().cpu().clone() for n, b in module.named_buffers() if n in persistent})
    adam_step = int(next(iter(base.state.values()))["step"]) if stepped else 0
    return weights, moments, adam_step


def _full_weight(p: torch.nn.Parameter, stage: int) -> torch.Tensor:
    """The full fp32 value of one parameter (collective under ZeRO-3). A frozen parameter is in no optimizer
    partition: ZeRO 1/2 keep it whole on every rank, ZeRO-3 gathers it like a forward pass does."""
    from deepspeed.utils import safe_get_full_fp32_param

    if stage == 0 or (stage < 3 and not p.requires_grad):
        return p.detach()
    if p.requires_grad:
        return safe_get_full_fp32_param(p)
    from deepspeed.runtime.zero.partition_parameters import GatheredParameters

    with GatheredParameters([p]):
        return p.detach().clone()


def restore_optimizer(engine, ckpt: Path, adam_step: int, seq_len: int) -> None:
    """Load the AdamW moments and step count of ``ckpt`` into a freshly initialised engine (collective).

    ZeRO keeps AdamW state on flat per-rank partitions that exist only after a first step, so one
    step is first taken on a zero loss at learning rate 0: AdamW then leaves every parameter bit for
    bit as it was and creates zero moments, which are overwritten from the full tensors.
    """
    from deepspeed.utils import safe_set_full_optimizer_state

    base = engine.basic_optimizer
    trainable = [(name, p) for name, p in engine.module.named_parameters() if p.requires_grad]
    with safe_open(ckpt / OPTIMIZER_FILE, "pt") as f:
        if engine.zero_optimization_stage() == 0:
            for name, p in trainable:
                base.state[p] = {
                    "step": torch.tensor(float(adam_step)),
                    **{key: f.get_tensor(f"{key}.{name}").to(p.device) for key in MOMENTS},
                }
            return
        _prime_optimizer_state(engine, seq_len)
        _link_optimizer_fragments(engine)
        for name, p in trainable:
            for key in MOMENTS:
                safe_set_full_optimizer_state(p, f.get_tensor(f"{key}.{name}").to(engine.device), key)
    for state in base.state.values():
        state["step"].fill_(adam_step)


def _prime_optimizer_state(engine, seq_len: int) -> None:
    set_lr(engine.optimizer, 0.0)
    input_ids = torch.zeros(1, seq_len, dtype=torch.long, device=engine.device)
    for _ in range(engine.gradient_accumulation_steps()):
        engine.backward(engine(input_ids, labels=input_ids).loss * 0.0)
        engine.step()
    if not engine.basic_optimizer.state:
        raise RuntimeError("could not initialise the optimizer state to resume into (the priming step was skipped)")


def _link_optimizer_fragments(engine) -> None:
    """Make every ZeRO-1/2 parameter see its AdamW state (DeepSpeed 0.19 workaround).

    DeepSpeed links parameters to their optimizer-state fragments once, right after the first
    param group's first update, when the other groups (our no-decay group) have no state yet;
    their fragments stay empty and ``safe_get_full_optimizer_state`` fails for them. Linking again
    once every group has state fixes that; ZeRO-0 and ZeRO-3 have no such link.
    """
    zero = engine.optimizer
    if hasattr(zero, "_hp_optimizer_states_linked"):
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()


def load_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    """The fp32 weights of a checkpoint (or of any save_pretrained dir), tied LM head restored."""
    cfg = json.loads((ckpt / CONFIG_FILE).read_text())["model"]
    with safe_open(ckpt / WEIGHTS_FILE, "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
    if cfg.get("tie_embeddings", True) and "lm_head.weight" not in state:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    return state


# ----------------------------------------------------------------------------------------------
# RNG


def capture_rng() -> dict[str, Any]:
    """This process's RNG states as JSON-able values."""
    np_state = np.random.get_state(legacy=False)
    np_state["state"]["key"] = np_state["state"]["key"].tolist()
    out = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": np_state,
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state().tolist()
    return out


def restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = dict(state["numpy"])
    np_state["state"] = {**np_state["state"], "key": np.array(np_state["state"]["key"], dtype=np.uint32)}
    np.random.set_state(np_state)
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def rng_file(rank: int) -> str:
    return f"rng_rank{rank:05d}.json"


# ----------------------------------------------------------------------------------------------
# Writing


def save_checkpoint(
    out_dir: Path,
    step: int,
    engine,
    model_cfg: ModelConfig,
    trainer_state: dict[str, Any],
    keep_last: int,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> Path:
    """Write ``checkpoints/step_<step>`` atomically (with ``tokenizer``'s files when given), move ``latest``
    to it and prune to ``keep_last``. Collective: every rank calls it. Returns the checkpoint directory."""
    rank = torch.distributed.get_rank()
    root = Path(out_dir) / CHECKPOINTS
    final = root / step_dir_name(step)
    tmp = root / f".tmp_{final.name}"
    weights, moments, adam_step = gather_state(engine)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # debris of an interrupted save
        tmp.mkdir(parents=True)
    barrier()
    _write_json(tmp / rng_file(rank), capture_rng())
    barrier()
    if rank == 0:
        write_weights(tmp, weights, model_cfg)
        save_file(moments, tmp / OPTIMIZER_FILE, metadata={"format": "pt"})
        _fsync(tmp / OPTIMIZER_FILE)
        _write_json(tmp / TRAINER_FILE, {**trainer_state, "step": step, "adam_step": adam_step})
        if tokenizer is not None:
            for written in tokenizer.save_pretrained(str(tmp)):
                _fsync(Path(written))
        _fsync(tmp)
        _publish(tmp, final)
        prune(root, keep_last)
    barrier()
    return final


def write_weights(directory: Path, weights: dict[str, torch.Tensor], model_cfg: ModelConfig) -> None:
    """config.json + model.safetensors exactly as ``HybridLM.save_pretrained`` writes them (fsynced)."""
    state = {k: v.contiguous() for k, v in weights.items()}
    if model_cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, directory / WEIGHTS_FILE, metadata={"format": "pt"})
    _fsync(directory / WEIGHTS_FILE)
    _write_json(directory / CONFIG_FILE, {"model": model_cfg.to_dict()})


def _publish(tmp: Path, final: Path) -> None:
    """Rename the finished temporary directory into place, then point ``latest`` at it."""
    root = final.parent
    stale = root / f".old_{final.name}"
    if final.exists():  # saving a step again (a resumed run): keep the old copy until the new one is in place
        shutil.rmtree(stale, ignore_errors=True)
        os.rename(final, stale)
    os.rename(tmp, final)
    _fsync(root)
    pointer = root / f".{LATEST}.tmp"
    pointer.write_text(final.name + "\n")
    _fsync(pointer)
    os.replace(pointer, root / LATEST)
    _fsync(root)
    shutil.rmtree(stale, ignore_errors=True)


def prune(root: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints (never the one ``latest`` names)."""
    latest = latest_checkpoint(root)
    complete = sorted(p for p in root.glob("step_*") if (p / TRAINER_FILE).is_file())
    for old in complete[: max(0, len(complete) - keep_last)]:
        if old != latest:
            shutil.rmtree(old, ignore_errors=True)


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1) + "\n")
    _fsync(path)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------
# Finding and reading


def latest_checkpoint(root: Path) -> Path | None:
    """The checkpoint ``root/latest`` names, if it is complete."""
    pointer = Path(root) / LATEST
    if not pointer.is_file():
        return None
    ckpt = Path(root) / pointer.read_text().strip()
    return ckpt if (ckpt / TRAINER_FILE).is_file() else None


def resolve_resume(resume: str | None, out_dir: str | Path) -> Path | None:
    """Checkpoint to resume from: ``auto`` = out_dir's latest (None on a fresh run), else a path to a
    checkpoint directory or to a checkpoints directory holding ``latest``."""
    if resume is None:
        return None
    if resume == "auto":
        return latest_checkpoint(Path(out_dir) / CHECKPOINTS)
    path = Path(resume)
    if (path / TRAINER_FILE).is_file():
        return path
    found = latest_checkpoint(path) or latest_checkpoint(path / CHECKPOINTS)
    if found is None:
        raise ConfigError(f"resume={resume}: not a checkpoint (no {TRAINER_FILE}) nor a directory with '{LATEST}'")
    return found


def read_trainer_state(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / TRAINER_FILE).read_text())


def read_rng(ckpt: Path, rank: int) -> dict[str, Any] | None:
    """This rank's RNG states, or None when the checkpoint was written by fewer ranks."""
    path = ckpt / rng_file(rank)
    return json.loads(path.read_text()) if path.is_file() else None
