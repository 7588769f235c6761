"""Instruction data (``format: instruct`` sources): parse, render with a chat template, mask, fit, pack.

An example is one JSON object per line of a ``.jsonl`` file (or a record of a ``.json`` array or an HF
dataset), either ``{"prompt": str, "response": str}`` (one user turn, one assistant turn) or
``{"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}``.

Rendering: the conversation goes through a Jinja chat template (``data.chat_template`` when set, else
the tokenizer's own, else ``DEFAULT_CHAT_TEMPLATE``). The text is cut into segments at each assistant
turn: the prompt up to and including the generation prompt, ``render(messages[:i], add_generation_prompt)``,
and the assistant turn itself, the rest of ``render(messages[:i + 1])`` (its end-of-turn markup
included). Each segment is tokenized on its own, so the prompt is tokenized exactly as at inference
time, when the model continues from the generation prompt. The loss mask is 1 on the assistant
segments' tokens (their end-of-turn markup included), 0 elsewhere. A final assistant turn must end
in EOS so the model learns to stop: when the template did not emit one there, it is appended (mask 1).

Length: an example longer than ``train.seq_len`` tokens is truncated at the end (the response side)
or dropped, per ``data.overlong``; a truncation that would leave no response token drops it. Packing
puts whole examples into rows of ``seq_len`` tokens in stream order (next fit), never splitting one.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from transformers import PreTrainedTokenizerBase

from hybridlm.config import ModelConfig, SourceConfig
from hybridlm.data.errors import DataError
from hybridlm.data.sources import decoded_lines, resolve_files, source_name
from hybridlm.data.tokenizer import load_local_tokenizer, tokenizer_hash

ROLES = ("system", "user", "assistant")
SUFFIXES = (".jsonl", ".json")
# The default template: plain-text role markers; every assistant turn ends with the tokenizer's EOS.
#   <|system|>\n{content}\n<|user|>\n{content}\n<|assistant|>\n{content}<eos>
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ '<|assistant|>\\n' + message['content'] + eos_token }}"
    "{% else %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + '\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
# Per-example outcome of fitting to seq_len, stored in the tokenized dataset.
KEPT, TRUNCATED, DROPPED = 0, 1, 2


# ----------------------------------------------------------------------------------------------
# Reading and validating examples


def check_instruct_source(src: SourceConfig, index: int) -> None:
    """Refuse, before any work, an instruct source whose files are not JSON lines / JSON."""
    if src.path is None:
        return
    for path in resolve_files(src, index):
        if path.suffix not in SUFFIXES:
            raise DataError(
                f"{source_name(src, index)}: format: instruct reads {'/'.join(SUFFIXES)} files, not {path.name}"
            )


def iter_examples(src: SourceConfig, index: int) -> Iterator[tuple[str, list[dict[str, str]]]]:
    """``(where, messages)`` for every example of one instruct source; ``where`` is ``file:line``."""
    count = 0
    records = _hf_records(src, index) if src.hf_dataset is not None else _file_records(src, index)
    for where, record in records:
        count += 1
        yield where, parse_example(record, where)
    if count == 0:
        raise DataError(f"{source_name(src, index)}: no examples (empty file)")


def parse_example(record: object, where: str) -> list[dict[str, str]]:
    """The conversation of one record, validated; a one-line error naming ``where`` otherwise."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        return _parse_messages(record["messages"], where)
    if "prompt" in record and "response" in record:
        prompt, response = record["prompt"], record["response"]
        for key, value in (("prompt", prompt), ("response", response)):
            if not isinstance(value, str):
                raise DataError(f"{where}: field {key!r} holds {type(value).__name__}, not text")
        if not response.strip():
            raise DataError(f"{where}: empty response (nothing to learn)")
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    fields = ", ".join(map(str, record)) or "none"
    raise DataError(f"{where}: expected fields 'prompt' and 'response', or 'messages'; fields: {fields}")


def _parse_messages(messages: object, where: str) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{where}: messages[{i}] must be an object with 'role' and 'content'")
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise DataError(f"{where}: messages[{i}].role={role!r} must be one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise DataError(f"{where}: messages[{i}].content holds {type(content).__name__}, not text")
        if role == "assistant" and not content.strip():
            raise DataError(f"{where}: messages[{i}] is an empty assistant response (nothing to learn)")
        out.append({"role": role, "content": content})
    if out[0]["role"] == "assistant":
        raise DataError(f"{where}: messages[0] is an assistant turn; a conversation starts with system or user")
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: no assistant message (nothing to learn)")
    return out


def _file_records(src: SourceConfig, index: int) -> Iterator[tuple[str, object]]:
    for path in resolve_files(src, index):
        if path.suffix == ".json" and path.open("rb").read(64).lstrip().startswith(b"["):
            try:
                records = json.loads("".join(decoded_lines(path)))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
            yield from ((f"{path}: record {i}", r) for i, r in enumerate(records))
            continue
        for lineno, line in enumerate(decoded_lines(path), start=1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{lineno}", json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None


def _hf_records(src: SourceConfig, index: int) -> Iterator[tuple[str, object]]:
    import datasets

    name = source_name(src, index)
    try:
        ds = datasets.load_dataset(src.hf_dataset, src.subset, split=src.split, streaming=True)
    except Exception as e:  # hub, network, builder and split errors all mean "cannot read this source"
        raise DataError(f"{name}: cannot load ({type(e).__name__}: {str(e).strip().splitlines()[0]})") from None
    yield from ((f"{name}: record {i}", dict(r)) for i, r in enumerate(ds))


# ----------------------------------------------------------------------------------------------
# Rendering and tokenizing


def choose_template(tokenizer: PreTrainedTokenizerBase, chat_template: str | None) -> tuple[str, str]:
    """``(template, origin)``: ``data.chat_template`` when set, else the tokenizer's, else the default."""
    if chat_template is not None:
        return chat_template, "data.chat_template"
    if isinstance(tokenizer.chat_template, str) and tokenizer.chat_template:
        return tokenizer.chat_template, "tokenizer"
    return DEFAULT_CHAT_TEMPLATE, "default"


def render_segments(
    messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase, template: str, where: str
) -> list[tuple[str, bool]]:
    """The rendered conversation as ``(text, is_response)`` pieces whose concatenation is the full text."""

    def render(msgs: list[dict[str, str]], generation_prompt: bool) -> str:
        try:
            return tokenizer.apply_chat_template(
                msgs, chat_template=template, tokenize=False, add_generation_prompt=generation_prompt
            )
        except Exception as e:  # jinja2 errors, and templates that raise on a conversation they refuse
            raise DataError(f"{where}: the chat template cannot render this conversation ({e})") from None

    full = render(messages, False)
    pieces, pos = [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt, upto = render(messages[:i], True), render(messages[: i + 1], False)
        if not (len(prompt) >= pos and upto.startswith(prompt) and full.startswith(upto)):
            raise DataError(
                f"{where}: the chat template does not render a conversation's start as a prefix of the whole "
                "(needed to find the assistant tokens); set data.chat_template to one that does"
            )
        pieces += [(full[pos : len(prompt)], False), (full[len(prompt) : len(upto)], True)]
        pos = len(upto)
    pieces.append((full[pos:], False))
    return [p for p in pieces if p[0]]


def encode_example(
    messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase, template: str, where: str
) -> tuple[list[int], list[int]]:
    """Token ids and loss mask (1 = a response token to learn) of one conversation."""
    pieces = render_segments(messages, tokenizer, template, where)
    encodings = tokenizer.backend_tokenizer.encode_batch([text for text, _ in pieces], add_special_tokens=False)
    answers = [k for k, (_, is_response) in enumerate(pieces) if is_response]
    if not answers:
        raise DataError(f"{where}: the chat template renders none of the assistant text")
    final_answer = answers[-1]
    ends_with_answer = messages[-1]["role"] == "assistant"
    ids: list[int] = []
    mask: list[int] = []
    for k, ((_, is_response), enc) in enumerate(zip(pieces, encodings, strict=True)):
        piece = enc.ids
        if k == final_answer and ends_with_answer and tokenizer.eos_token_id not in piece:
            piece = [*piece, tokenizer.eos_token_id]  # a final answer ends in EOS: the model learns to stop
        ids += piece
        mask += [int(is_response)] * len(piece)
    return ids, mask


def fit_length(ids: list[int], mask: list[int], seq_len: int, overlong: str) -> tuple[list[int], list[int], int]:
    """Fit one example into ``seq_len`` tokens: ``(ids, mask, KEPT | TRUNCATED | DROPPED)``."""
    if len(ids) <= seq_len:
        return ids, mask, KEPT
    if overlong == "drop" or not any(mask[:seq_len]):  # a truncation that keeps no response token is a drop
        return [], [], DROPPED
    return ids[:seq_len], mask[:seq_len], TRUNCATED


def encode_batch(batch: dict, tokenizer, template: str, seq_len: int, overlong: str) -> dict:
    """``datasets.map`` function: columns messages (JSON), where -> input_ids, mask, length, status."""
    out: dict[str, list] = {"input_ids": [], "mask": [], "length": [], "status": []}
    for messages, where in zip(batch["messages"], batch["where"], strict=True):
        ids, mask = encode_example(json.loads(messages), tokenizer, template, where)
        ids, mask, status = fit_length(ids, mask, seq_len, overlong)
        out["input_ids"].append(ids)
        out["mask"].append(mask)
        out["length"].append(len(ids))
        out["status"].append(status)
    return out


# ----------------------------------------------------------------------------------------------
# Packing


def pack_rows(lengths: np.ndarray, seq_len: int) -> np.ndarray:
    """Row boundaries over documents in stream order: row r holds documents ``rows[r]:rows[r + 1]``.

    Next fit: a document goes into the current row when it fits, else starts a new row. Every length
    must be at most ``seq_len`` (``fit_length`` saw to that).
    """
    starts, used = [0], 0
    for d, n in enumerate(lengths.tolist()):
        if used + n > seq_len:
            starts.append(d)
            used = 0
        used += n
    if len(lengths):
        starts.append(len(lengths))
    return np.asarray(starts, dtype=np.int64)


# ----------------------------------------------------------------------------------------------
# Checkpoint vocabulary


def check_vocab(
    model_cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, checkpoint: str | Path | None = None
) -> None:
    """Refuse a checkpoint (``init_from``) that cannot read this tokenizer's token ids.

    An error when the tokenizer has more tokens than ``model.vocab_size`` (ids past the embedding), or
    when ``checkpoint`` holds a tokenizer of its own (an exported or HF directory) that differs from
    ``tokenizer``. A model vocabulary larger than the tokenizer is accepted: HF checkpoints pad theirs.
    """
    where = f"init_from={checkpoint}" if checkpoint is not None else "the checkpoint"
    n_tokens = len(tokenizer)
    if n_tokens > model_cfg.vocab_size:
        raise DataError(
            f"{where}: model.vocab_size={model_cfg.vocab_size} but the tokenizer has {n_tokens} tokens; ids "
            f">= {model_cfg.vocab_size} have no embedding: use the checkpoint's own tokenizer (data.tokenizer)"
        )
    if checkpoint is None or not (Path(checkpoint) / "tokenizer.json").is_file():
        return
    own = load_local_tokenizer(checkpoint)
    if tokenizer_hash(own) != tokenizer_hash(tokenizer):
        raise DataError(
            f"{where}: the checkpoint was saved with another tokenizer (hash {tokenizer_hash(own)[:12]}) than "
            f"the data's ({tokenizer_hash(tokenizer)[:12]}); set data.tokenizer={checkpoint}"
        )
