"""Starting a run from a checkpoint (``init_from``): what the path holds, its architecture, tokenizer and weights.

``init_from`` may name

- a hybridlm model directory: ``config.json`` (``{"model": ...}``) + ``model.safetensors``, as written by
  ``save_pretrained``, by a run's final export (``<out_dir>/model``) or by a training checkpoint
  (``<out_dir>/checkpoints/step_N``; a LoRA run's checkpoint holds adapters, merged here on load);
- a run directory: its ``model/`` export, else its latest checkpoint;
- a Hugging Face checkpoint directory (``config.json`` with a ``model_type`` of bamba, nemotron_h, jamba, mamba2,
  mamba, llama or granitemoehybrid, or mamba_ssm's format), converted in memory by
  ``hybridlm.convert.load_hf_as_hybridlm``.

The architecture is the checkpoint's: a run config needs no ``model:`` section. When it has one, every key set
there (a value other than ``ModelConfig``'s default) must agree with the checkpoint, or the run stops naming
the keys that differ; a key left at its default is the checkpoint's. The exceptions are ``RUNTIME_KEYS``,
keys that change no weight (how the SSD scan is chunked, the MoE aux-loss weight, the init scale, and the
RoPE base and attention window, which context-length fine-tuning changes on purpose): those the run config
may set, and its values win.

The tokenizer is the one saved beside the weights (``tokenizer.json``): the data must be tokenized with it, so
``data.tokenizer`` defaults to it (``hybridlm.data.instruct.check_vocab`` refuses another one before training).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hybridlm.config import ConfigError, LoRAConfig, ModelConfig, RunConfig
from hybridlm.data.loader import read_manifest
from hybridlm.data.tokenizer import load_local_tokenizer, tokenizer_hash
from hybridlm.model.model import CONFIG_FILE, WEIGHTS_FILE
from hybridlm.train import checkpoint as ckpt_io

TOKENIZER_FILE = "tokenizer.json"
# Model keys that do not change any weight: a run config may set them to other values than the checkpoint's.
RUNTIME_KEYS = (
    "model.mamba.chunk_size",
    "model.moe.aux_loss_weight",
    "model.init_std",
    "model.attention.rope_theta",
    "model.attention.window",
)


@dataclass(frozen=True)
class InitSource:
    """What ``init_from`` resolved to: a hybridlm directory or a Hugging Face one, and where its tokenizer is."""

    path: Path  # the directory holding the weights
    kind: str  # "hybridlm" or "hf"
    tokenizer_dir: Path | None  # the directory holding tokenizer.json, if any

    def describe(self) -> str:
        return f"{self.path} (Hugging Face checkpoint, converted)" if self.kind == "hf" else str(self.path)


def resolve_init_from(init_from: str) -> InitSource:
    """Find what ``init_from`` names (see the module docstring); a one-line error naming it otherwise.

    Reads only ``config.json`` files, so a bad path or an unsupported HF architecture fails before any work.
    """
    path = Path(init_from)
    for candidate in (path, path / ckpt_io.MODEL_DIR, ckpt_io.latest_checkpoint(path / ckpt_io.CHECKPOINTS)):
        if candidate is not None and _is_hybridlm_dir(candidate):
            return InitSource(candidate, "hybridlm", _tokenizer_dir(candidate))
    if (path / CONFIG_FILE).is_file() and "model" not in _read_json(path / CONFIG_FILE):  # not a run's config.json
        _check_hf(path, init_from)
        return InitSource(path, "hf", _tokenizer_dir(path))
    raise ConfigError(
        f"init_from={init_from}: not a hybridlm model directory, run directory or Hugging Face checkpoint (found no "
        f"{CONFIG_FILE} + {WEIGHTS_FILE}, {ckpt_io.MODEL_DIR}/ or {ckpt_io.CHECKPOINTS}/{ckpt_io.LATEST} there)"
    )


def _is_hybridlm_dir(path: Path) -> bool:
    if not ((path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file()):
        return False
    return isinstance(_read_json(path / CONFIG_FILE).get("model"), dict)


def _read_json(file: Path) -> dict[str, Any]:
    """A JSON object from ``file``; {} when it holds something else (the HF reader reports that properly)."""
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError:
        return {}
    return raw if isinstance(raw, dict) else {}


def _tokenizer_dir(path: Path) -> Path | None:
    return path if (path / TOKENIZER_FILE).is_file() else None


def _check_hf(path: Path, init_from: str) -> None:
    from hybridlm.convert.checkpoint import read_config, source_for
    from hybridlm.convert.common import ConvertError

    try:
        source_for(read_config(path), path)
    except ConvertError as e:
        raise ConfigError(f"init_from={init_from}: {e}") from None


def with_checkpoint_tokenizer(cfg: RunConfig, source: InitSource) -> tuple[RunConfig, str | None]:
    """``cfg`` with ``data.tokenizer`` set to the checkpoint's tokenizer when the user left it unset, and a
    line saying so (None when ``data.tokenizer`` was set).

    When ``data.prepared_dir`` already holds data whose tokenizer, trained there, is the checkpoint's (a model
    continuing on the data it was pretrained on), ``data.tokenizer`` becomes that training spec instead, so
    the prepared directory is found again. Without a tokenizer beside the checkpoint, an unset
    ``data.tokenizer`` would train a new one whose ids mean nothing to the checkpoint: an error.
    """
    if cfg.data.tokenizer is not None:
        return cfg, None
    if source.tokenizer_dir is None:
        raise ConfigError(
            f"init_from={cfg.init_from}: no {TOKENIZER_FILE} beside the checkpoint and data.tokenizer is unset; set "
            "data.tokenizer to the tokenizer the checkpoint was trained with"
        )
    tokenizer: str | dict = str(source.tokenizer_dir)
    note = f"data.tokenizer unset: using the checkpoint's tokenizer, {source.tokenizer_dir / TOKENIZER_FILE}"
    prepared = Path(cfg.data.prepared_dir) if cfg.data.prepared_dir else None
    if prepared is not None and (prepared / "manifest.json").is_file():
        manifest = read_manifest(prepared)
        same = manifest["tokenizer_hash"] == tokenizer_hash(load_local_tokenizer(source.tokenizer_dir))
        if same and isinstance(manifest["tokenizer"], dict):
            tokenizer = manifest["tokenizer"]
            note = f"data.tokenizer unset: data.prepared_dir={prepared} was tokenized with the checkpoint's tokenizer"
    data = dataclasses.replace(cfg.data, tokenizer=tokenizer)
    return dataclasses.replace(cfg, data=data), note


def load_init_weights(source: InitSource) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The checkpoint's architecture and its weights under plain HybridLM names (tied LM head included)."""
    if source.kind == "hf":
        from hybridlm.convert import load_hf_as_hybridlm
        from hybridlm.convert.common import ConvertError

        try:
            model = load_hf_as_hybridlm(source.path)
        except ConvertError as e:
            raise ConfigError(f"init_from={source.path}: {e}") from None
        return model.cfg, model.state_dict()
    cfg = ModelConfig.from_dict(json.loads((source.path / CONFIG_FILE).read_text())["model"])
    state = ckpt_io.load_weights(source.path)
    if any(".lora_A." in name for name in state):  # a LoRA run's checkpoint: fold its adapters in
        from hybridlm.train.lora import merge_lora_weights

        state = merge_lora_weights(state, checkpoint_lora(source.path))
    return cfg, state


def checkpoint_lora(ckpt: Path) -> LoRAConfig:
    """The LoRA settings a training checkpoint was written with (its trainer.json)."""
    if not (ckpt / ckpt_io.TRAINER_FILE).is_file():
        raise ConfigError(f"init_from={ckpt}: holds LoRA adapters but no {ckpt_io.TRAINER_FILE} giving their settings")
    lora = ckpt_io.read_trainer_state(ckpt)["run_config"]["finetune"]["lora"]
    return LoRAConfig(**lora)


def reconcile_model(user: ModelConfig, checkpoint: ModelConfig, init_from: str) -> ModelConfig:
    """The checkpoint's architecture with the run config's ``RUNTIME_KEYS`` applied; an error naming every key
    the run config sets to another value than the checkpoint's (see the module docstring)."""
    ckpt_dict = checkpoint.to_dict()
    set_by_user = dict(config_diff(ModelConfig().to_dict(), user.to_dict(), "model"))
    conflicts, runtime = [], {}
    for key, (_, value) in sorted(set_by_user.items()):
        theirs = _lookup(ckpt_dict, key)
        if key == "model.pattern" and _same_layers(user, checkpoint):
            continue  # the same layers written another way ("(M-*-)x2" vs "M-*-M-*-")
        if value == theirs:
            continue
        if key in RUNTIME_KEYS:
            runtime[key] = value
        else:
            conflicts.append(f"{key}={value!r} (checkpoint: {theirs!r})")
    if conflicts:
        raise ConfigError(
            f"init_from={init_from}: the architecture comes from the checkpoint, but the run config sets "
            f"{', '.join(conflicts)}; remove these keys from model:"
        )
    for key, value in runtime.items():
        _assign(ckpt_dict, key, value)
    return ModelConfig.from_dict(ckpt_dict) if runtime else checkpoint


def _same_layers(a: ModelConfig, b: ModelConfig) -> bool:
    try:
        return a.layers == b.layers
    except ConfigError:
        return False


def config_diff(a: Any, b: Any, prefix: str):
    """``(dotted key, (a's value, b's value))`` for every leaf where two config dicts differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            yield from config_diff(a.get(key), b.get(key), f"{prefix}.{key}")
    elif a != b:
        yield prefix, (a, b)


def _lookup(tree: dict[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split(".")[1:]:
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _assign(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")[1:]
    for part in parents:
        tree = tree[part]
    tree[leaf] = value
