"""``hybridlm prepare``: sources -> tokenizer -> packed token shards, a document index and a manifest.

Layout of a prepared directory::

    manifest.json                      sources, tokenizer hash, token counts, dtype, split seed, ...
    tokenizer.json, tokenizer_config.json   (save_pretrained: AutoTokenizer loads the directory)
    {train,val}.bin                    flat token stream, uint16 or uint32, every document ending in EOS
    {train,val}_offsets.npy            int64 (n_docs + 1,): document d is tokens[offsets[d]:offsets[d+1]]
    {train,val}_sources.npy            int32 (n_docs,): index into data.sources of each document
    {train,val}_mask.bin, {train,val}_rows.npy   instruct data only: uint8 loss mask per token (1 = a
                                       response token), int64 (n_rows + 1,) documents of each packed row

Instruction data (``format: instruct`` sources, see ``hybridlm.data.instruct``) is packed at prepare
time into rows of ``seq_len`` tokens, so its directory also depends on ``seq_len``, ``data.overlong``
and the chat template. One data section holds one kind of source: text or instruct.

The directory is built under a hidden temporary name and renamed into place as the last step,
so a directory with a manifest is always complete. Its name is a hash of the data section, the
source files (path, size, mtime) and the tokenizer: the same config finds the existing directory
and does nothing; a changed config or tokenizer gets a new one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import datasets
import numpy as np
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerFast

from hybridlm.config import DataConfig, SourceConfig, load_run_config
from hybridlm.data.errors import DataError
from hybridlm.data.instruct import (
    DEFAULT_CHAT_TEMPLATE,
    DROPPED,
    TRUNCATED,
    check_instruct_source,
    choose_template,
    encode_batch,
    iter_examples,
    pack_rows,
)
from hybridlm.data.loader import read_manifest
from hybridlm.data.sources import check_source, default_sources, iter_documents, resolve_files, source_name
from hybridlm.data.tokenizer import load_local_tokenizer, tokenizer_hash, tokenizer_spec, train_bpe

FORMAT_VERSION = 1
DTYPE_MAX_VOCAB = {"uint16": 1 << 16, "uint32": 1 << 32}
TINY_CORPUS_BYTES = 8 << 20  # below this, one process tokenizes faster than a pool starts
TRAIN_TEXT_LIMIT = 1 << 30  # characters of corpus a BPE is trained on (its statistics settle long before)
LENGTH_THRESHOLDS = [1 << k for k in range(6, 17)]  # 64 ... 65536 tokens
log = logging.getLogger("hybridlm.data")


def prepare(
    data_cfg: DataConfig, root: Path = Path("data/prepared"), dtype: str | None = None, seq_len: int | None = None
) -> Path:
    """Prepare (or find already prepared) the dataset of ``data_cfg``; returns its absolute directory.

    ``dtype`` (default: ``data.token_dtype``) is the token dtype of the shards: ``auto`` (uint16
    when the vocab fits, else uint32), ``uint16`` or ``uint32``. ``seq_len`` (the run's
    ``train.seq_len``) is required by instruct sources, packed into rows of that length here;
    text sources ignore it.
    """
    dtype = dtype or data_cfg.token_dtype
    sources = data_cfg.sources or default_sources()
    instruct = _is_instruct(sources, seq_len)
    for i, src in enumerate(sources):
        check_source(src, i)
        if instruct:
            check_instruct_source(src, i)
    spec = tokenizer_spec(data_cfg.tokenizer)
    local_tok = load_local_tokenizer(spec) if isinstance(spec, str) else None
    if local_tok is not None:
        token_dtype(len(local_tok), dtype)  # refuse a vocab the dtype cannot hold before reading data
    tokenizer_id = tokenizer_hash(local_tok) if local_tok is not None else json.dumps(spec, sort_keys=True)
    packing = _instruct_identity(data_cfg, local_tok, seq_len) if instruct else None
    config_hash = _config_hash(data_cfg, sources, tokenizer_id, dtype, packing)
    out = (Path(data_cfg.prepared_dir) if data_cfg.prepared_dir else Path(root) / config_hash[:16]).resolve()
    if (out / "manifest.json").is_file():
        _check_existing(out, config_hash, tokenizer_id, spec)
        return out
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(
            f"{out}: exists and is not a prepared dataset (no manifest.json); remove it or set "
            "data.prepared_dir elsewhere"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        identity = {"config_hash": config_hash, "tokenizer_id": tokenizer_id}
        _build(tmp, data_cfg, sources, spec, local_tok, dtype, identity, seq_len if instruct else None)
        try:
            os.rename(tmp, out)
        except OSError:
            if not (out / "manifest.json").is_file():  # not a concurrent run that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def run_prepare(config_path: str | None, overrides: list[str]) -> Path:
    """CLI entry: load the run config (only its ``data:`` section matters) and prepare it."""
    cfg = load_run_config(config_path, overrides)
    return prepare(cfg.data, seq_len=cfg.train.seq_len)


def token_dtype(vocab_size: int, dtype: str = "auto") -> str:
    """The shard dtype for a vocabulary; an error when ``dtype`` cannot hold every token id."""
    if dtype == "auto":
        return "uint16" if vocab_size <= DTYPE_MAX_VOCAB["uint16"] else "uint32"
    if dtype not in DTYPE_MAX_VOCAB:
        raise DataError(f"token dtype {dtype!r} must be one of auto, {', '.join(DTYPE_MAX_VOCAB)}")
    if vocab_size > DTYPE_MAX_VOCAB[dtype]:
        raise DataError(
            f"tokenizer vocab size {vocab_size} does not fit token dtype {dtype} (at most {DTYPE_MAX_VOCAB[dtype]} ids)"
        )
    return dtype


def verify_tokenizer(prepared_dir: str | Path, tokenizer: str | Path | PreTrainedTokenizerFast) -> None:
    """Refuse a prepared dir whose tokens came from another tokenizer than ``tokenizer`` (a path or object)."""
    tok = load_local_tokenizer(tokenizer) if isinstance(tokenizer, str | Path) else tokenizer
    manifest = read_manifest(prepared_dir)
    if tokenizer_hash(tok) != manifest["tokenizer_hash"]:
        raise DataError(
            f"{prepared_dir} was tokenized with another tokenizer (hash {manifest['tokenizer_hash'][:12]}) than "
            f"this run's ({tokenizer_hash(tok)[:12]}); prepare the data again with the run's tokenizer"
        )


# ----------------------------------------------------------------------------------------------
# Identity of a prepared directory


def _is_instruct(sources: list[SourceConfig], seq_len: int | None) -> bool:
    """Whether the sources are instruction data; refuses a mix, and instruct data without ``seq_len``."""
    formats = {s.format for s in sources}
    if len(formats) > 1:
        raise DataError(
            "data.sources mixes format: text and format: instruct; one data section holds one kind "
            "(instruct examples are packed whole with a loss mask, text is a token stream)"
        )
    if formats != {"instruct"}:
        return False
    if seq_len is None or seq_len < 2:
        raise DataError(
            f"instruct sources are packed into rows of train.seq_len tokens when prepared: seq_len={seq_len} "
            "(pass prepare(..., seq_len=cfg.train.seq_len))"
        )
    return True


def _instruct_identity(data_cfg: DataConfig, local_tok, seq_len: int) -> dict:
    """What else shapes prepared instruct data: row length, overlong policy, the chat template's text."""
    if local_tok is not None:
        template = choose_template(local_tok, data_cfg.chat_template)[0]
    else:
        template = data_cfg.chat_template or DEFAULT_CHAT_TEMPLATE
    return {"seq_len": seq_len, "overlong": data_cfg.overlong, "chat_template": template}


def _config_hash(
    data_cfg: DataConfig, sources: list[SourceConfig], tokenizer_id: str, dtype: str, packing: dict | None = None
) -> str:
    section = {
        "sources": [_source_identity(s, i) for i, s in enumerate(sources)],
        "tokenizer": tokenizer_id,
        "val_fraction": data_cfg.val_fraction,
        "split_seed": data_cfg.split_seed,
        "dtype": dtype,
        "format": FORMAT_VERSION,
    }
    if packing is not None:  # only instruct data: text directories keep their hash
        section["instruct"] = packing
    return hashlib.sha256(json.dumps(section, sort_keys=True).encode()).hexdigest()


def _source_identity(src: SourceConfig, index: int) -> dict:
    """The source's config plus a fingerprint of its files, so an edited file means new shards."""
    ident = dataclasses.asdict(src)
    if src.path is not None:
        ident["files"] = [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in resolve_files(src, index)]
    return ident


def _check_existing(out: Path, config_hash: str, tokenizer_id: str, spec: str | dict) -> None:
    manifest = read_manifest(out)
    if manifest["config_hash"] == config_hash:
        return
    if manifest["tokenizer_id"] != tokenizer_id:
        raise DataError(
            f"{out} was prepared with tokenizer {manifest['tokenizer']!r} (hash {manifest['tokenizer_hash'][:12]}), "
            f"not this run's data.tokenizer={spec!r}; remove it or set data.prepared_dir elsewhere"
        )
    raise DataError(
        f"{out} was prepared from another data config or changed source files; remove it or set "
        "data.prepared_dir elsewhere"
    )


# ----------------------------------------------------------------------------------------------
# Building


def _build(tmp: Path, data_cfg, sources, spec, local_tok, dtype: str, identity: dict, seq_len: int | None) -> None:
    """Write a prepared directory into ``tmp``; ``seq_len`` is set for instruct data (packed into rows)."""
    cache = tmp / "cache"
    instruct = seq_len is not None
    docs = read_examples(sources, cache) if instruct else read_documents(sources, cache)
    if local_tok is None:
        texts = (batch["text"] for batch in _limited_batches(docs, TRAIN_TEXT_LIMIT))
        tok = train_bpe((t for batch in texts for t in batch), spec["train"]["vocab_size"])
    else:
        tok = local_tok
    if instruct:
        template, template_origin = choose_template(tok, data_cfg.chat_template)
        tok.chat_template = template  # saved with the tokenizer: inference renders prompts as training did
    tok.save_pretrained(str(tmp))
    dtype = token_dtype(len(tok), dtype)
    if instruct:
        tokenized = tokenize_examples(docs, tok, template, seq_len, data_cfg.overlong, data_cfg.num_proc, cache)
    else:
        tokenized = tokenize_documents(docs, tok, data_cfg.num_proc, cache)
    lengths = np.asarray(tokenized.data.column("length").to_numpy(), dtype=np.int64)
    doc_sources = np.asarray(tokenized.data.column("source").to_numpy(), dtype=np.int32)
    all_tokens = _write_flat(tokenized, int(lengths.sum()), dtype, cache / "all.bin")
    all_mask = _write_flat(tokenized, int(lengths.sum()), "uint8", cache / "mask.bin", "mask") if instruct else None
    all_offsets = np.concatenate([[0], np.cumsum(lengths)])
    status = np.asarray(tokenized.data.column("status").to_numpy()) if instruct else np.zeros(len(lengths))
    usable = status != DROPPED  # dropped examples (zero tokens) are in neither split
    _check_sources_usable(sources, doc_sources, usable, seq_len)

    kept = np.flatnonzero(usable)
    is_val = np.zeros(len(lengths), dtype=bool)
    is_val[kept[_val_mask(doc_sources[kept], len(sources), data_cfg.val_fraction, data_cfg.split_seed)]] = True
    train_order, mixture = _mixture_order(
        doc_sources, lengths, usable & ~is_val, [s.weight for s in sources], data_cfg.split_seed
    )
    val_order = np.flatnonzero(is_val)
    splits = {}
    for split, order in (("train", train_order), ("val", val_order)):
        _write_split(tmp, split, order, all_tokens, all_offsets, doc_sources, dtype, all_mask)
        split_lengths = lengths[order]
        splits[split] = {
            "tokens_file": f"{split}.bin",
            "offsets_file": f"{split}_offsets.npy",
            "sources_file": f"{split}_sources.npy",
            "documents": len(order),
            "tokens": int(split_lengths.sum()),
            "max_document_tokens": int(split_lengths.max(initial=0)),
            # Documents longer than a row are split across rows (never dropped): how many, per row length.
            "documents_longer_than": {str(t): int((split_lengths > t).sum()) for t in LENGTH_THRESHOLDS},
        }
        if instruct:
            splits[split].update(_pack_split(tmp, split, split_lengths, seq_len))
    del all_tokens, all_mask
    shutil.rmtree(cache)

    for i, src in enumerate(sources):
        mixture[i].update(name=source_name(src, i), val_documents=int((is_val & (doc_sources == i)).sum()))
    manifest = {
        "format": FORMAT_VERSION,
        "kind": "instruct" if instruct else "text",
        **identity,
        "data": {**dataclasses.asdict(data_cfg), "sources": [dataclasses.asdict(s) for s in sources]},
        "sources": mixture,
        "tokenizer": spec,
        "tokenizer_hash": tokenizer_hash(tok),
        "vocab_size": len(tok),
        "eos_token": tok.eos_token,
        "eos_id": tok.eos_token_id,
        "dtype": dtype,
        "split_seed": data_cfg.split_seed,
        "val_fraction": data_cfg.val_fraction,
        "documents": int(usable.sum()),
        "tokens": int(lengths.sum()),
        "splits": splits,
    }
    if instruct:
        manifest["seq_len"] = seq_len
        manifest["instruct"] = _instruct_report(splits, status, template_origin, data_cfg.overlong, seq_len)
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")  # last: marks it complete


def _check_sources_usable(sources, doc_sources: np.ndarray, usable: np.ndarray, seq_len: int | None) -> None:
    for i, src in enumerate(sources):
        if not (usable & (doc_sources == i)).any():
            raise DataError(
                f"{source_name(src, i)}: every example is longer than train.seq_len={seq_len} and was dropped "
                "(data.overlong); raise train.seq_len or use data.overlong: truncate"
            )


def _pack_split(tmp: Path, split: str, lengths: np.ndarray, seq_len: int) -> dict:
    """Pack one instruct split's examples into rows (written as ``{split}_rows.npy``); manifest fields."""
    rows = pack_rows(lengths, seq_len)
    np.save(tmp / f"{split}_rows.npy", rows)
    n_rows = len(rows) - 1
    mask = np.memmap(tmp / f"{split}_mask.bin", dtype=np.uint8, mode="r") if lengths.sum() else np.zeros(0)
    return {
        "mask_file": f"{split}_mask.bin",
        "rows_file": f"{split}_rows.npy",
        "rows": n_rows,
        "response_tokens": int(mask.sum(dtype=np.int64)),
        "fill": float(lengths.sum() / (n_rows * seq_len)) if n_rows else 0.0,  # share of row slots not padding
    }


def _instruct_report(splits: dict, status: np.ndarray, template_origin: str, overlong: str, seq_len: int) -> dict:
    """The manifest's ``instruct`` section; logs a warning when examples were truncated or dropped."""
    truncated, dropped = int((status == TRUNCATED).sum()), int((status == DROPPED).sum())
    if truncated or dropped:
        log.warning(
            "%d of %d instruction examples are longer than train.seq_len=%d: %d truncated on the response side, "
            "%d dropped (data.overlong=%s)",
            truncated + dropped,
            len(status),
            seq_len,
            truncated,
            dropped,
            overlong,
        )
    return {
        "chat_template": template_origin,  # data.chat_template, tokenizer or default
        "examples": len(status),
        "response_tokens": sum(s["response_tokens"] for s in splits.values()),
        "overlong": {"policy": overlong, "seq_len": seq_len, "truncated": truncated, "dropped": dropped},
    }


def _generate(sources: tuple[SourceConfig, ...]):
    # A tuple, not a list: datasets would split a list in gen_kwargs into shards (and renumber them).
    for i, src in enumerate(sources):
        for text in iter_documents(src, i):
            yield {"text": text, "source": i}


def _generate_examples(sources: tuple[SourceConfig, ...]):
    for i, src in enumerate(sources):
        for where, messages in iter_examples(src, i):
            # text: what a BPE trained on this data sees; messages: the conversation, rendered later
            text = "\n".join(m["content"] for m in messages)
            yield {"text": text, "messages": json.dumps(messages, ensure_ascii=False), "where": where, "source": i}


def read_documents(sources: list[SourceConfig], cache: Path) -> datasets.Dataset:
    """All documents as an on-disk arrow dataset (columns text, source), in source order."""
    features = datasets.Features({"text": datasets.Value("string"), "source": datasets.Value("int32")})
    return _from_generator(_generate, features, sources, cache)


def read_examples(sources: list[SourceConfig], cache: Path) -> datasets.Dataset:
    """All instruction examples, validated, as an arrow dataset (columns text, messages, where, source)."""
    string = datasets.Value("string")
    features = datasets.Features(
        {"text": string, "messages": string, "where": string, "source": datasets.Value("int32")}
    )
    return _from_generator(_generate_examples, features, sources, cache)


def _from_generator(generate, features: datasets.Features, sources: list[SourceConfig], cache: Path):
    with _quiet_datasets():
        try:
            return datasets.Dataset.from_generator(
                generate, features=features, gen_kwargs={"sources": tuple(sources)}, cache_dir=str(cache)
            )
        except datasets.exceptions.DatasetGenerationError as e:
            if isinstance(e.__cause__, DataError):  # our own one-line error, raised while reading
                raise e.__cause__ from None
            raise


def _limited_batches(docs: datasets.Dataset, max_chars: int):
    seen = 0
    for batch in docs.iter(batch_size=1000):
        yield batch
        seen += sum(map(len, batch["text"]))
        if seen >= max_chars:
            return


def _encode(batch: dict, tokenizer, eos_id: int) -> dict:
    ids = [e.ids + [eos_id] for e in tokenizer.encode_batch(batch["text"], add_special_tokens=False)]
    return {"input_ids": ids, "length": [len(x) for x in ids]}


def tokenize_documents(docs: datasets.Dataset, tok, num_proc: int, cache: Path) -> datasets.Dataset:
    """Token ids of every document (EOS appended) with ``datasets.map``; a tqdm bar shows tokens/s."""
    features = datasets.Features(
        {
            "source": datasets.Value("int32"),
            "input_ids": datasets.Sequence(datasets.Value("uint32")),
            "length": datasets.Value("int64"),
        }
    )
    fn_kwargs = {"tokenizer": tok.backend_tokenizer, "eos_id": tok.eos_token_id}
    return _map_tokens(docs, _encode, fn_kwargs, features, ["text"], num_proc, cache)


def tokenize_examples(
    docs: datasets.Dataset, tok, template: str, seq_len: int, overlong: str, num_proc: int, cache: Path
) -> datasets.Dataset:
    """Token ids, loss mask, length and fit status (``instruct.KEPT/TRUNCATED/DROPPED``) of every example."""
    features = datasets.Features(
        {
            "source": datasets.Value("int32"),
            "input_ids": datasets.Sequence(datasets.Value("uint32")),
            "mask": datasets.Sequence(datasets.Value("uint8")),
            "length": datasets.Value("int64"),
            "status": datasets.Value("int8"),
        }
    )
    fn_kwargs = {"tokenizer": tok, "template": template, "seq_len": seq_len, "overlong": overlong}
    return _map_tokens(docs, encode_batch, fn_kwargs, features, ["text", "messages", "where"], num_proc, cache)


def _map_tokens(docs, fn, fn_kwargs: dict, features, remove_columns: list[str], num_proc: int, cache: Path):
    corpus_bytes = docs.data.column("text").nbytes
    procs = 1 if corpus_bytes < TINY_CORPUS_BYTES else (num_proc or os.cpu_count() or 1)
    if procs > 1:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the map workers are the parallelism
    # Chunks so the bar advances (datasets.map reports only examples/s, and only per call).
    n_chunks = max(1, min(100, len(docs) // 20_000))
    parts = []
    with _quiet_datasets(), tqdm(desc="tokenize", unit="tok", unit_scale=True) as bar:
        for k in range(n_chunks):
            chunk = docs.shard(n_chunks, k, contiguous=True)
            part = chunk.map(
                fn,
                batched=True,
                num_proc=min(procs, len(chunk)) if procs > 1 else None,
                remove_columns=remove_columns,
                features=features,
                fn_kwargs=fn_kwargs,
                cache_file_name=str(cache / f"tokens-{k:03d}.arrow"),
                new_fingerprint=f"hybridlm-tokens-{k}",
            )
            parts.append(part)
            bar.update(int(np.asarray(part.data.column("length").to_numpy()).sum()))
            bar.set_postfix(docs=f"{sum(map(len, parts))}/{len(docs)}")
    return datasets.concatenate_datasets(parts)


def _write_flat(
    tokenized: datasets.Dataset, n_tokens: int, dtype: str, path: Path, column: str = "input_ids"
) -> np.ndarray:
    """All documents' tokens (or per-token ``column``) back to back, in corpus order (read by the split writer)."""
    out = np.memmap(path, dtype=dtype, mode="w+", shape=(max(n_tokens, 1),))
    pos = 0
    for chunk in tokenized.data.column(column).chunks:
        values = chunk.flatten().to_numpy()
        out[pos : pos + len(values)] = values
        pos += len(values)
    out.flush()
    return out


def _val_mask(doc_sources: np.ndarray, n_sources: int, val_fraction: float, seed: int) -> np.ndarray:
    """Held-out documents, drawn per source (so val mirrors every source) and seeded.

    Each source keeps at least one training document; with ``val_fraction > 0`` at least one
    document overall is held out when the corpus has two or more.
    """
    is_val = np.zeros(len(doc_sources), dtype=bool)
    if val_fraction <= 0:
        return is_val
    rng = np.random.default_rng(seed)
    for i in range(n_sources):
        idx = np.flatnonzero(doc_sources == i)
        n_val = min(round(len(idx) * val_fraction), len(idx) - 1)
        is_val[rng.choice(idx, size=max(n_val, 0), replace=False)] = True
    if not is_val.any():
        counts = np.bincount(doc_sources, minlength=n_sources)
        if counts.max() >= 2:
            is_val[rng.choice(np.flatnonzero(doc_sources == counts.argmax()))] = True
    return is_val


def _mixture_order(
    doc_sources: np.ndarray, lengths: np.ndarray, is_train: np.ndarray, weights: list[float], seed: int
) -> tuple[np.ndarray, list[dict]]:
    """Training documents in stream order, resampled so each source's token share is its weight share.

    The stream keeps the corpus's total training tokens; source ``i`` fills ``w_i / sum(w)`` of it
    with whole copies of its documents plus a seeded random subset for the fractional part.
    """
    total = int(lengths[is_train].sum())
    weight_sum = sum(weights)
    order, report = [], []
    for i, weight in enumerate(weights):
        idx = np.flatnonzero(is_train & (doc_sources == i))
        source_tokens = int(lengths[idx].sum())
        repeats = weight / weight_sum * total / source_tokens
        whole = int(repeats)
        perm = np.random.default_rng([seed, i]).permutation(idx)
        cum = np.cumsum(lengths[perm])
        want = (repeats - whole) * source_tokens
        k = int(np.searchsorted(cum, want))  # documents whose running total stays below want
        if k < len(cum) and cum[k] - want < want - (cum[k - 1] if k else 0):
            k += 1
        picked = [idx] * whole + [np.sort(perm[:k])]
        order.extend(picked)
        stream_tokens = int(sum(lengths[p].sum() for p in picked))
        report.append(
            {
                "weight": weight,
                "documents": int((doc_sources == i).sum()),
                "train_documents": len(idx),
                "train_tokens": source_tokens,
                "stream_tokens": stream_tokens,
                "stream_share": stream_tokens / max(total, 1),
                "repeats": repeats,
            }
        )
    return np.concatenate(order).astype(np.int64), report


def _write_split(
    tmp: Path, split: str, order: np.ndarray, all_tokens, all_offsets, doc_sources, dtype, all_mask=None
) -> None:
    lengths = all_offsets[order + 1] - all_offsets[order]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    _gather_runs(tmp / f"{split}.bin", order, all_tokens, all_offsets, dtype, int(offsets[-1]))
    if all_mask is not None:
        _gather_runs(tmp / f"{split}_mask.bin", order, all_mask, all_offsets, "uint8", int(offsets[-1]))
    np.save(tmp / f"{split}_offsets.npy", offsets)
    np.save(tmp / f"{split}_sources.npy", doc_sources[order].astype(np.int32))


def _gather_runs(path: Path, order: np.ndarray, values, all_offsets, dtype: str, n: int) -> None:
    """Write the per-token ``values`` of the documents in ``order``, back to back, to ``path``."""
    out = np.memmap(path, dtype=dtype, mode="w+", shape=(max(n, 1),))
    # Copy runs of consecutive documents in one slice each: the order is mostly long runs.
    breaks = np.flatnonzero(np.diff(order) != 1) + 1
    pos = 0
    for run in np.split(order, breaks) if len(order) else []:
        a, b = all_offsets[run[0]], all_offsets[run[-1] + 1]
        out[pos : pos + b - a] = values[a:b]
        pos += b - a
    out.flush()
    del out
    if n == 0:  # np.memmap cannot map an empty file; keep the split's file truly empty
        path.write_bytes(b"")


@contextlib.contextmanager
def _quiet_datasets():
    """Silence datasets' own progress bars inside a block (ours reports tokens/s instead)."""
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()
