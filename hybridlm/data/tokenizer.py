"""Tokenizers for the data pipeline: load a local one, or train a byte-level BPE on the corpus.

Whatever its origin, the tokenizer is saved next to the shards with ``save_pretrained``, so a
prepared directory is also a directory ``transformers.AutoTokenizer`` loads. Every document ends
with the tokenizer's EOS token.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from hybridlm.data.errors import DataError

EOS_TOKEN = "<|endoftext|>"
DEFAULT_VOCAB_SIZE = 2048
MIN_VOCAB_SIZE = 257  # 256 byte symbols + EOS
# EOS names to look for when a bare tokenizer.json carries no tokenizer_config.json.
_EOS_CANDIDATES = (EOS_TOKEN, "</s>", "<|end_of_text|>", "<eos>", "<|eot_id|>", "[SEP]")


def tokenizer_spec(tokenizer: str | dict | None) -> str | dict:
    """Normalise ``data.tokenizer``: a path (str) or ``{"train": {"vocab_size": N}}``."""
    if tokenizer is None:
        return {"train": {"vocab_size": DEFAULT_VOCAB_SIZE}}
    if isinstance(tokenizer, str):
        return tokenizer
    train = tokenizer.get("train")
    if set(tokenizer) != {"train"} or not isinstance(train, dict) or set(train) - {"vocab_size"}:
        raise DataError(f"data.tokenizer={tokenizer!r} must be a path or {{train: {{vocab_size: N}}}}")
    vocab_size = train.get("vocab_size", DEFAULT_VOCAB_SIZE)
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < MIN_VOCAB_SIZE:
        raise DataError(
            f"data.tokenizer.train.vocab_size={vocab_size!r} must be an integer >= {MIN_VOCAB_SIZE} (256 bytes + EOS)"
        )
    return {"train": {"vocab_size": vocab_size}}


def load_local_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """A tokenizer from a directory ``AutoTokenizer`` loads, or from a ``tokenizer.json`` file."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"data.tokenizer={str(path)!r}: no such file or directory")
    try:
        if p.is_dir():
            tok = AutoTokenizer.from_pretrained(str(p))
        else:
            tok = PreTrainedTokenizerFast(tokenizer_file=str(p))
    except Exception as e:  # transformers raises many types for a malformed tokenizer
        raise DataError(f"data.tokenizer={str(path)!r}: cannot load ({type(e).__name__}: {_first_line(e)})") from e
    if getattr(tok, "backend_tokenizer", None) is None:
        raise DataError(f"data.tokenizer={str(path)!r}: needs a fast tokenizer (a tokenizer.json)")
    if tok.eos_token is None:
        vocab = tok.get_vocab()
        found = next((t for t in _EOS_CANDIDATES if t in vocab), None)
        if found is None:
            raise DataError(f"data.tokenizer={str(path)!r}: has no EOS token (set eos_token in tokenizer_config.json)")
        tok.eos_token = found
    return tok


def train_bpe(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on ``texts``; any byte string round-trips through encode/decode."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, clean_up_tokenization_spaces=False)


def tokenizer_hash(tok: PreTrainedTokenizerFast) -> str:
    """SHA-256 of the serialised tokenizer (vocab, merges, normaliser, special tokens) and its EOS."""
    content = tok.backend_tokenizer.to_str() + "\0" + str(tok.eos_token)
    return hashlib.sha256(content.encode()).hexdigest()


def load_tokenizer(prepared_dir: str | Path) -> PreTrainedTokenizerFast:
    """The tokenizer a prepared directory was made with."""
    path = Path(prepared_dir)
    if not (path / "tokenizer.json").is_file():
        raise DataError(f"{prepared_dir}: no tokenizer.json; not a prepared dataset directory")
    return load_local_tokenizer(path)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0]
