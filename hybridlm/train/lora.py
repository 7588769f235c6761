"""Parameter-efficient fine-tuning: freezing by name pattern, LoRA adapters through ``peft``, merging.

``apply_finetune`` adapts a plain ``HybridLM`` in place (``peft.inject_adapter_in_model``: the model
keeps its class and forward signature). Adapted layers become ``peft`` LoRA layers whose parameters are
``<module>.base_layer.weight``, ``<module>.lora_A.default.weight`` and ``<module>.lora_B.default.weight``.
``merge_lora`` folds the adapters back in and restores the base parameter names; ``merge_lora_weights``
does the same on a gathered state dict (what a ZeRO checkpoint holds).

LoRA works on the fused kernel path because the layers it may target are *called* as modules
(``self.in_proj(h)``, ``self.x_proj(x)``, ``self.out_proj(y)``, ...), so the adapter's forward runs
whatever kernel follows; the layers that share an input (q / k / v, gate / up) go through
``ops.linears``, which calls them as modules as soon as one of them is not a plain ``nn.Linear``.
Two layers are read by their weight instead and are refused: ``conv1d`` (its weight goes to the
causal-conv kernel) and Mamba-1's ``dt_proj`` (its weight goes to ``F.linear`` and its bias into the
scan as the Δ bias). So is an LM head tied to the embedding
(the embedding would see the base weight only).
"""

from __future__ import annotations

import logging
import re

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn

from hybridlm.config import ConfigError, FinetuneConfig, LoRAConfig
from hybridlm.model import HybridLM

log = logging.getLogger("hybridlm.train")
ADAPTER_NAME = "default"  # peft's name for the one adapter
# Layers whose weight tensor the mixer reads directly: an adapter wrapped around them would be bypassed.
READ_BY_WEIGHT = {
    "conv1d": "its weight is passed to the causal-conv kernel",
    "dt_proj": "Mamba-1 passes its weight to F.linear and its bias to the scan",
}


def apply_finetune(model: HybridLM, finetune_cfg: FinetuneConfig) -> HybridLM:
    """Set up ``model`` for fine-tuning per ``finetune:``; returns the same object.

    With ``lora.r > 0`` LoRA adapters are injected into ``lora.target_modules`` and only adapter
    parameters train; then every parameter whose name matches a ``freeze`` regex (``re.search``) is
    frozen. With ``r = 0`` and no ``freeze``, nothing changes (full fine-tuning).
    """
    lora = finetune_cfg.lora
    if lora.r > 0:
        targets = lora_targets(model, lora.target_modules)
        config = LoraConfig(
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets, bias="none"
        )
        inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)  # freezes all but the adapters
    freeze(model, finetune_cfg.freeze)
    return model


def lora_targets(model: HybridLM, target_modules: list[str]) -> list[str]:
    """Full module names the LoRA ``target_modules`` select (a name matches itself or ``*.name``).

    Refuses a selected module that is not ``nn.Linear``, a layer read by its weight (``READ_BY_WEIGHT``)
    and an LM head tied to the embedding, naming the module; and a list that selects nothing. A name
    that this model lacks (``in_proj`` in a Llama) is skipped with a warning, so one list serves many
    architectures.
    """
    modules = dict(model.named_modules())
    linear_names = sorted({n.rsplit(".", 1)[-1] for n, m in modules.items() if isinstance(m, nn.Linear)})
    selected: set[str] = set()
    for target in target_modules:
        matched = [n for n in modules if n and (n == target or n.endswith("." + target))]
        if not matched:
            log.warning("finetune.lora.target_modules: %r matches no module of this model (skipped)", target)
        for name in matched:
            leaf = name.rsplit(".", 1)[-1]
            if leaf in READ_BY_WEIGHT:
                raise ConfigError(
                    f"finetune.lora.target_modules: {target!r} selects {name}, which LoRA cannot adapt: "
                    f"{READ_BY_WEIGHT[leaf]}, so an adapter would be bypassed"
                )
            if name == "lm_head" and model.cfg.tie_embeddings:
                raise ConfigError(
                    f"finetune.lora.target_modules: {target!r} selects lm_head, tied to embed_tokens "
                    "(model.tie_embeddings=true): the embedding would not see the adapter"
                )
            if not isinstance(modules[name], nn.Linear):
                raise ConfigError(
                    f"finetune.lora.target_modules: {target!r} selects {name}, a {type(modules[name]).__name__}; "
                    f"LoRA adapts linear layers: {', '.join(linear_names)}"
                )
        selected.update(matched)
    if not selected:
        raise ConfigError(
            f"finetune.lora.target_modules={list(target_modules)} matches no module of this model; its linear "
            f"layers: {', '.join(linear_names)}"
        )
    return sorted(selected)


def freeze(model: nn.Module, patterns: list[str]) -> None:
    """Freeze every parameter whose name matches one of ``patterns`` (``re.search``)."""
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]  # tied weights under both names
    for i, pattern in enumerate(patterns):
        matched = [n for n in names if re.search(pattern, n)]
        if not matched:
            raise ConfigError(
                f"finetune.freeze[{i}]={pattern!r} matches no parameter name (names look like {names[0]!r}, "
                f"{names[len(names) // 2]!r})"
            )
        for name in matched:
            model.get_parameter(name).requires_grad_(False)
    if patterns and not any(p.requires_grad for p in model.parameters()):
        raise ConfigError(f"finetune.freeze={patterns!r} freezes every parameter: nothing left to train")


def merge_lora(model: HybridLM) -> HybridLM:
    """Fold the LoRA adapters into their base weights, in place; returns the model as a plain HybridLM.

    Parameter names are the base model's again (``save_pretrained`` and ``convert to-hf`` take it as
    is) and every parameter is trainable, as in a freshly built model. Deep-copy first to keep the
    adapted model. A model without adapters is returned unchanged.
    """
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge(safe_merge=True)  # safe: refuses to produce NaNs
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.get_base_layer())
    model.__dict__.pop("peft_config", None)  # set by inject_adapter_in_model
    model.requires_grad_(True)
    return model


def merge_lora_weights(weights: dict[str, torch.Tensor], lora_cfg: LoRAConfig) -> dict[str, torch.Tensor]:
    """``merge_lora`` on a full state dict of an adapted model (e.g. gathered from ZeRO): base names,
    ``W + (alpha / r) * B @ A`` for every adapted weight; other entries pass through."""
    scaling = lora_cfg.alpha / lora_cfg.r
    merged = {}
    for name, value in weights.items():
        if f".lora_A.{ADAPTER_NAME}." in name or f".lora_B.{ADAPTER_NAME}." in name:
            continue
        if ".base_layer." not in name:
            merged[name] = value
            continue
        module, _, leaf = name.partition(".base_layer.")
        if leaf == "weight":
            a = weights[f"{module}.lora_A.{ADAPTER_NAME}.weight"].float()  # (r, in)
            b = weights[f"{module}.lora_B.{ADAPTER_NAME}.weight"].float()  # (out, r)
            value = (value.float() + scaling * (b @ a)).to(value.dtype)
        merged[f"{module}.{leaf}"] = value
    return merged
