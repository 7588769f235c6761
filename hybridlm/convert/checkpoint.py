"""Checkpoint directories on both sides: read a hybridlm or HF directory, write the other.

Export goes through the HF model's own ``save_pretrained`` (its on-disk layout, sharding and
weight-name conversions); import reads ``config.json`` and the safetensors files directly, so
each tensor keeps the dtype it was stored in. Nothing is unpickled: a ``pytorch_model.bin`` is
read only with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer
from transformers import CONFIG_MAPPING, AutoModelForCausalLM, GenerationConfig

from hybridlm.convert import mamba_ssm
from hybridlm.convert.common import ConvertError
from hybridlm.convert.targets import TARGETS, select_target
from hybridlm.model import HybridLM
from hybridlm.model.model import CONFIG_FILE, WEIGHTS_FILE

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)
MAX_SHARD_SIZE = "5GB"
SUPPORTED = ", ".join(sorted(TARGETS)) + " (and mamba_ssm's MambaLMHeadModel format)"


# ----------------------------------------------------------------------------------------------
# hybridlm -> HF


def export_to_hf(
    checkpoint: str | Path, out_dir: str | Path, arch: str | None = None, max_shard_size: str = MAX_SHARD_SIZE
) -> Path:
    """Convert a hybridlm checkpoint (a ``save_pretrained`` dir, or a run checkpoint holding one in
    ``model/``) to a transformers directory that ``AutoModelForCausalLM.from_pretrained`` loads.
    ``arch`` picks the target; by default the most specific one that can express the model."""
    src = resolve_hybridlm_dir(checkpoint)
    out = Path(out_dir)
    if out.resolve() == src.resolve():
        raise ConvertError(f"{out}: the output directory must differ from the checkpoint it converts")
    model = HybridLM.from_pretrained(src)
    target = select_target(model.cfg, arch)
    config, state = target.to_hf(model)
    tokenizer_dir = next((d for d in (src, src.parent) if (d / "tokenizer.json").is_file()), src)
    for name, token_id in special_token_ids(tokenizer_dir).items():
        setattr(config, name, token_id)
    out.mkdir(parents=True, exist_ok=True)
    save_hf_model(config, state, out, generation_config(config, model.cfg.vocab_size), max_shard_size)
    copy_tokenizer(tokenizer_dir, out)
    (out / "README.md").write_text(model_card(model, target, Path(checkpoint).resolve().name))
    return out


def resolve_hybridlm_dir(checkpoint: str | Path) -> Path:
    path = Path(checkpoint)
    for candidate in (path, path / "model"):
        if (candidate / CONFIG_FILE).is_file() and (candidate / WEIGHTS_FILE).is_file():
            return candidate
    raise ConvertError(f"{path}: not a hybridlm checkpoint (no {CONFIG_FILE} + {WEIGHTS_FILE} here or in model/)")


def save_hf_model(
    config: Any, state: dict[str, torch.Tensor], out: Path, generation: Any, max_shard_size: str = MAX_SHARD_SIZE
) -> None:
    """Instantiate the HF model on the meta device, hand it our tensors (no copy, dtypes kept) and
    let its ``save_pretrained`` write the checkpoint."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ConvertError(
            f"{config.model_type}: mapping incomplete: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    if config.tie_word_embeddings:
        model.tie_weights()
    model.generation_config = generation
    model.save_pretrained(out, max_shard_size=max_shard_size)


def generation_config(config: Any, vocab_size: int) -> GenerationConfig:
    """Token ids from the config; the padding rows of the vocabulary (ids >= the true vocabulary
    size, which hybridlm never emits) are suppressed so HF generation picks the same tokens."""
    padding_ids = list(range(vocab_size, config.vocab_size))
    return GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        suppress_tokens=padding_ids or None,
    )


def special_token_ids(tokenizer_dir: Path) -> dict[str, int]:
    """bos/eos/pad token ids named in tokenizer_config.json (or special_tokens_map.json)."""
    vocab_file = tokenizer_dir / "tokenizer.json"
    if not vocab_file.is_file():
        return {}
    tokenizer = Tokenizer.from_file(str(vocab_file))
    names: dict[str, Any] = {}
    for meta in ("special_tokens_map.json", "tokenizer_config.json"):  # later files win
        if (tokenizer_dir / meta).is_file():
            names.update(json.loads((tokenizer_dir / meta).read_text()))
    ids = {}
    for kind in ("bos", "eos", "pad"):
        token = names.get(f"{kind}_token")
        token = token.get("content") if isinstance(token, dict) else token
        token_id = tokenizer.token_to_id(token) if isinstance(token, str) else None
        if token_id is not None:
            ids[f"{kind}_token_id"] = token_id
    return ids


def copy_tokenizer(src: Path, out: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)


def model_card(model: HybridLM, target: ModuleType, name: str) -> str:
    """README.md: what the model is, how to load it, and which HF module holds each sub-layer."""
    cfg = model.cfg
    table = target.weight_table(cfg, list(model.state_dict()))
    kinds = {"M": f"Mamba-{cfg.mamba.version}", "*": "attention", "-": "MLP", "E": "MoE"}
    rows = []
    for j, kind in enumerate(cfg.layers):
        names = [p.theirs for p in table if any(k.startswith(f"layers.{j}.mixer.") for k in p.ours)]
        rows.append(f"| {j} | {kinds[kind]} | `{_module_of(names)}` |")
    dtype = str(model.embed_tokens.weight.dtype).removeprefix("torch.")
    vocab = f"{cfg.vocab_size}"
    if cfg.padded_vocab_size != cfg.vocab_size:
        vocab += f" (embedding padded to {cfg.padded_vocab_size}; the padding ids are suppressed in generation_config)"
    return "\n".join(
        [
            "---",
            "library_name: transformers",
            f"tags: [hybridlm, {target.MODEL_TYPE}]",
            "---",
            f"# {name}",
            "",
            f"A hybridlm model converted to transformers' `{target.MODEL_TYPE}` architecture "
            "(loads with `AutoModelForCausalLM.from_pretrained`, no `trust_remote_code`).",
            "",
            "```python",
            "from transformers import AutoModelForCausalLM",
            'model = AutoModelForCausalLM.from_pretrained("path/to/this/dir")',
            "```",
            "",
            "| | |",
            "|---|---|",
            f"| parameters | {model.num_parameters():,} |",
            f"| d_model | {cfg.d_model} |",
            f"| vocabulary | {vocab} |",
            f"| dtype | {dtype} |",
            f"| hybridlm pattern | `{cfg.layers}` |",
            "",
            "## Layers",
            "",
            "| sub-layer | kind | HF module |",
            "|---|---|---|",
            *rows,
            "",
        ]
    )


def _module_of(names: list[str]) -> str:
    """The HF module holding these tensors: their common prefix, or ``layers.i.{a, b}`` when a
    sub-layer is spread over sibling modules (GraniteMoeHybrid's MoE and shared MLP)."""
    parts = [n.split(".")[:-1] for n in names]  # drop the tensor names
    common: list[str] = []
    for group in zip(*parts, strict=False):
        if len(set(group)) != 1:
            break
        common.append(group[0])
    prefix = ".".join(common)
    if common and common[-1].isdigit():
        return prefix + ".{" + ", ".join(sorted({p[len(common)] for p in parts})) + "}"
    return prefix


# ----------------------------------------------------------------------------------------------
# HF -> hybridlm


def import_from_hf(hf_dir: str | Path, out_dir: str | Path) -> Path:
    """Convert an HF (or mamba_ssm) checkpoint directory to a hybridlm ``save_pretrained`` directory."""
    path = Path(hf_dir)
    model = load_hf_as_hybridlm(path)
    out = Path(out_dir)
    model.save_pretrained(out)
    copy_tokenizer(path, out)
    return out


def load_hf_as_hybridlm(hf_dir: str | Path) -> HybridLM:
    """An HF (or mamba_ssm) checkpoint directory as a HybridLM, converted in memory."""
    path = Path(hf_dir)
    raw = read_config(path)
    source, config = source_for(raw, path)
    cfg, state = source.from_hf(config, read_state_dict(path))
    return build_model(cfg, state)


def read_config(path: Path) -> dict[str, Any]:
    file = path / "config.json"
    if not file.is_file():
        raise ConvertError(f"{file} not found: not a Hugging Face checkpoint directory")
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ConvertError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ConvertError(f"{file}: must hold a JSON object")
    return raw


def source_for(raw: dict[str, Any], path: Path) -> tuple[ModuleType, Any]:
    """The architecture module for a config.json and the config object its ``from_hf`` takes."""
    model_type = raw.get("model_type")
    if model_type is None and mamba_ssm.is_mamba_ssm_config(raw):
        return mamba_ssm, raw
    if model_type is None and isinstance(raw.get("model"), dict):
        raise ConvertError(f"{path}: a hybridlm checkpoint, not an HF one (load it with HybridLM.from_pretrained)")
    if model_type not in TARGETS:
        raise ConvertError(f"{path / 'config.json'}: unsupported model_type {model_type!r}; supported: {SUPPORTED}")
    return TARGETS[model_type], CONFIG_MAPPING[model_type].from_pretrained(path)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory: (sharded) safetensors, else (sharded) pytorch_model.bin
    loaded with ``weights_only=True``."""
    for index_name, single, loader in (
        ("model.safetensors.index.json", "model.safetensors", load_file),
        ("pytorch_model.bin.index.json", "pytorch_model.bin", _load_bin),
    ):
        if (path / index_name).is_file():
            weight_map = json.loads((path / index_name).read_text())["weight_map"]
            state: dict[str, torch.Tensor] = {}
            for shard in dict.fromkeys(weight_map.values()):
                state.update(loader(path / shard))
            return state
        if (path / single).is_file():
            return loader(path / single)
    raise ConvertError(f"{path}: no model.safetensors(.index.json) or pytorch_model.bin(.index.json) found")


def _load_bin(file: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses anything but tensors and plain containers
        raise ConvertError(f"{file}: cannot be read as a plain tensor state dict ({e})") from None
    if not isinstance(state, dict):
        raise ConvertError(f"{file}: holds a {type(state).__name__}, not a state dict")
    return state


def build_model(cfg: Any, state: dict[str, torch.Tensor]) -> HybridLM:
    """A HybridLM holding ``state``, in the dtype the checkpoint's embedding was stored in
    (the SSM parameters in fp32, as ``HybridLM.cast`` keeps them)."""
    dtype = state["embed_tokens.weight"].dtype
    model = HybridLM(cfg)
    if dtype != torch.float32:
        model.cast(dtype)
    if cfg.tie_embeddings:
        state = {**state, "lm_head.weight": state["embed_tokens.weight"]}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConvertError(
            f"converted weights do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return model
