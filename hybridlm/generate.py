"""Text in, text out: load a checkpoint and its tokenizer, sample a continuation."""

from __future__ import annotations

from pathlib import Path

import torch

from hybridlm.model import HybridLM
from hybridlm.model.model import CONFIG_FILE, WEIGHTS_FILE


def resolve_model_dir(path: str | Path) -> Path:
    """A save_pretrained directory, or a run / checkpoint directory holding one under ``model/``."""
    path = Path(path)
    for candidate in (path, path / "model"):  # a run dir has a config.json of its own: look for the weights too
        if (candidate / CONFIG_FILE).is_file() and (candidate / WEIGHTS_FILE).is_file():
            return candidate
    raise FileNotFoundError(
        f"{path}: no {CONFIG_FILE} + {WEIGHTS_FILE} here or in {path / 'model'}; not a hybridlm checkpoint"
    )


def load_tokenizer_from(model_dir: Path):
    """The tokenizer saved beside the weights (tokenizer.json), as a transformers fast tokenizer."""
    from transformers import PreTrainedTokenizerFast

    for candidate in (model_dir, model_dir.parent):
        if (candidate / "tokenizer.json").is_file():
            return PreTrainedTokenizerFast.from_pretrained(str(candidate))
    raise FileNotFoundError(f"{model_dir}: no tokenizer.json beside the checkpoint")


def generate_text(
    checkpoint: str | Path,
    prompt: str,
    max_new_tokens: int = 64,
    temperature: float = 0.8,
    top_p: float = 0.95,
    top_k: int = 0,
    seed: int = 0,
) -> str:
    model_dir = resolve_model_dir(checkpoint)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = HybridLM.from_pretrained(model_dir, device=device)
    tokenizer = load_tokenizer_from(model_dir)
    input_ids = torch.tensor([tokenizer.encode(prompt)], device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    out = model.generate(input_ids, max_new_tokens, temperature, top_p, top_k, tokenizer.eos_token_id, generator)
    return tokenizer.decode(out[0].tolist())
