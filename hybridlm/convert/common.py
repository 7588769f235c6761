"""What every architecture mapping shares: the weight table, pattern helpers, vocabulary and the
hybridlm settings an HF config has no field for.

A weight table is a list of ``Param`` entries, each naming one HF tensor and the hybridlm
tensor(s) it is made of. The same table converts in both directions (litgpt / torchtitan style):
``to_hf_state`` concatenates, ``from_hf_state`` splits by the shapes our model expects.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import torch

from hybridlm.config import ConfigError, ModelConfig
from hybridlm.model import HybridLM
from hybridlm.pattern import FFN_CHARS, MIXER_CHARS

# config.json key that carries the full hybridlm model config inside an exported HF config
HYBRIDLM_KEY = "hybridlm_config"
# HF config keys that never describe the architecture (ignored when comparing configs)
NON_ARCH_KEYS = {
    HYBRIDLM_KEY,
    "architectures",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "dtype",
    "torch_dtype",
    "transformers_version",
    "_name_or_path",
    "use_cache",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
}


class ConvertError(ValueError):
    """A model or checkpoint that cannot be converted; the message says what does not fit."""


@dataclass(frozen=True)
class Param:
    """One HF tensor ``theirs``, the concatenation of our tensors ``ours`` along ``dim``."""

    ours: tuple[str, ...]
    theirs: str
    dim: int = 0


def rename(ours: str, theirs: str) -> Param:
    return Param((ours,), theirs)


def same_names(keys: list[str], our_prefix: str, hf_prefix: str) -> list[Param]:
    """Every key under ``our_prefix``, renamed to the same suffix under ``hf_prefix``."""
    return [rename(k, hf_prefix + k[len(our_prefix) :]) for k in keys if k.startswith(our_prefix)]


def head_params(cfg: ModelConfig, hf_head: str, can_tie: bool) -> list[Param]:
    """The LM head entry: absent when tied (the target ties it), a copy when the target cannot tie."""
    return [] if cfg.tie_embeddings and can_tie else [rename("lm_head.weight", hf_head)]


def reference_state(cfg: ModelConfig) -> dict[str, torch.Size]:
    """Parameter and buffer shapes of a hybridlm model for ``cfg`` (built on the meta device: no memory)."""
    with torch.device("meta"):
        model = HybridLM(cfg)
    return {k: v.shape for k, v in model.state_dict().items()}


def export_state(model, hf_config, weight_table) -> tuple[Any, dict[str, torch.Tensor]]:
    """(HF config, HF state dict) of ``model`` from an architecture's ``hf_config`` and ``weight_table``."""
    state = model.state_dict()
    config = hf_config(model.cfg, model.embed_tokens.weight.dtype)
    return config, to_hf_state(weight_table(model.cfg, list(state)), state)


def to_hf_state(table: list[Param], state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict -> HF names, fusing where the table says so."""
    out = {}
    for p in table:
        parts = [state[k] for k in p.ours]
        out[p.theirs] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=p.dim)
    return out


def from_hf_state(
    table: list[Param],
    hf_state: dict[str, torch.Tensor],
    shapes: dict[str, torch.Size],
    ignore: tuple[str, ...] = (),
) -> dict[str, torch.Tensor]:
    """HF state dict -> our names, splitting fused tensors by the shapes our model expects.

    Every HF tensor must be used: a leftover one means the config and the weights disagree.
    Keys matching a regex in ``ignore`` (e.g. a tied head stored anyway) may be left over."""
    remaining = dict(hf_state)
    out = {}
    for p in table:
        if p.theirs not in remaining:
            raise ConvertError(f"checkpoint has no tensor {p.theirs!r} (needed for {', '.join(p.ours)})")
        tensor = remaining.pop(p.theirs)
        sizes = [shapes[k][p.dim] for k in p.ours]
        if len(p.ours) > 1:
            if tensor.shape[p.dim] != sum(sizes):
                raise ConvertError(f"{p.theirs}: shape {tuple(tensor.shape)} does not split into {p.ours}")
            parts = torch.split(tensor, sizes, dim=p.dim)
        else:
            parts = (tensor,)
        for key, part in zip(p.ours, parts, strict=True):
            if part.shape != shapes[key]:
                raise ConvertError(
                    f"{p.theirs}: shape {tuple(part.shape)} does not match {tuple(shapes[key])} "
                    f"that the config implies for {key}"
                )
            out[key] = part.contiguous()
    leftover = [k for k in remaining if not any(re.search(pattern, k) for pattern in ignore)]
    if leftover:
        raise ConvertError(f"checkpoint tensors the config does not account for: {sorted(leftover)[:8]}")
    return out


# ----------------------------------------------------------------------------------------------
# Layer patterns


def decoder_layers(layers: str) -> list[tuple[str, str]] | None:
    """Split a canonical pattern into (mixer, FFN) decoder layers, or None when it is not of that form."""
    if len(layers) % 2:
        return None
    pairs = [(layers[i], layers[i + 1]) for i in range(0, len(layers), 2)]
    if all(m in MIXER_CHARS and f in FFN_CHARS for m, f in pairs):
        return pairs
    return None


def periodic(flags: list[bool]) -> tuple[int, int] | None:
    """The smallest (period, offset) with ``flags[i] == (i % period == offset)``, or None.
    No flag set gives (len + 1, len): an offset no index reaches."""
    n = len(flags)
    if not any(flags):
        return n + 1, n
    for period in range(1, n + 1):
        for offset in range(period):
            if all(f == (i % period == offset) for i, f in enumerate(flags)):
                return period, offset
    return None


def describe_pattern(layers: str) -> str:
    """A short readable form of a canonical pattern for error messages."""
    return layers if len(layers) <= 48 else layers[:45] + "..."


# ----------------------------------------------------------------------------------------------
# Vocabulary and hybridlm-only settings


def pad_multiple_for(vocab_size: int) -> int:
    """The largest power of two up to 64 dividing ``vocab_size``: our padded vocabulary then equals
    the HF one, so no rows are added on import."""
    m = 64
    while vocab_size % m:
        m //= 2
    return m


def common_hf_kwargs(cfg: ModelConfig, dtype: torch.dtype) -> dict[str, Any]:
    """Config fields every target shares. The HF vocabulary is our padded one (all rows exported,
    so the round trip is exact); generation suppresses the padding ids (see ``generation_config``)."""
    return {
        "vocab_size": cfg.padded_vocab_size,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
        "dtype": str(dtype).removeprefix("torch."),
        HYBRIDLM_KEY: cfg.to_dict(),
    }


def arch_dict(hf_config: Any) -> dict[str, Any]:
    """The architecture fields of an HF config as plain JSON values (for comparing two configs)."""
    raw = json.loads(json.dumps(hf_config.to_dict(), default=str))
    return {k: v for k, v in raw.items() if k not in NON_ARCH_KEYS}


def stored_config(hf_config: Any, derived: ModelConfig, to_hf_config) -> ModelConfig:
    """The hybridlm config an export stored in ``hf_config``, if it still describes exactly this HF
    config (same architecture fields when exported again); else ``derived``, read from HF fields.

    The stored one restores what HF has no field for (the true vocabulary size, initialisation
    ranges, the pattern as written) so hybridlm -> HF -> hybridlm gives back the same config."""
    raw = getattr(hf_config, HYBRIDLM_KEY, None)
    if not isinstance(raw, dict):
        return derived
    try:
        stored = ModelConfig.from_dict(raw)
    except ConfigError:
        return derived
    same_shape = (stored.layers, stored.padded_vocab_size, stored.tie_embeddings)
    if same_shape != (derived.layers, derived.padded_vocab_size, derived.tie_embeddings):
        return derived
    theirs, ours = arch_dict(hf_config), arch_dict(to_hf_config(stored))
    if any(theirs.get(k, v) != v for k, v in ours.items()):
        return derived
    return stored


def build_config(d: dict[str, Any], source: str) -> ModelConfig:
    """Validate a model config derived from an HF config; a failure names the HF source."""
    try:
        return ModelConfig.from_dict(d)
    except ConfigError as e:
        raise ConvertError(f"{source}: the model it describes is not a valid hybridlm model ({e})") from None


def default_rope(hf_config: Any, source: str, partial_default: float = 1.0) -> tuple[float, float]:
    """(theta, fraction rotated) of a default-type RoPE; other RoPE types cannot be expressed."""
    params = getattr(hf_config, "rope_parameters", None) or {}
    kind = params.get("rope_type", "default")
    if kind != "default":
        raise ConvertError(f"{source}: rope_parameters.rope_type={kind!r}; only 'default' RoPE is supported")
    return float(params.get("rope_theta", 10000.0)), float(params.get("partial_rotary_factor", partial_default))


def require(condition: bool, message: str, reasons: list[str]) -> None:
    """Collect ``message`` when ``condition`` fails (for can_express)."""
    if not condition:
        reasons.append(message)


def require_attention(layers: str, arch: str, reasons: list[str]) -> None:
    """transformers' hybrid caches ask an attention layer for the sequence length: a hybrid without
    one loads but cannot generate (transformers 5.24)."""
    require("*" in layers, f"transformers' {arch} cannot generate without an attention layer", reasons)


def head_dim_of(hf_config: Any) -> int:
    return getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
