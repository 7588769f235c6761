"""Data pipeline throughput on the embedded default corpus: tokenization tokens/s and loader batches/s.

    python benchmarks/data_throughput.py [--num-proc N] [--out benchmarks/results/data_throughput.jsonl]

Prepares the default corpus into a fresh temporary directory (BPE training + tokenization +
shard writing, timed as a whole), re-times tokenization alone with the trained tokenizer, then
times ``PackedLoader.next_batch`` for a few batch shapes. A script, not a test: numbers depend on
the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from hybridlm.config import DataConfig
from hybridlm.data import PackedLoader, load_tokenizer, read_manifest
from hybridlm.data.prepare import prepare, read_documents, tokenize_documents
from hybridlm.data.sources import default_sources

LOADER_SHAPES = [(256, 8), (1024, 8), (2048, 32)]  # (seq_len, micro_batch_size)


def bench_loader(prepared: Path, seq_len: int, batch: int, seconds: float = 2.0) -> dict:
    loader = PackedLoader(prepared, "train", seq_len, batch)
    loader.next_batch()  # first touch of the memory map
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        loader.next_batch()
        n += 1
    elapsed = time.perf_counter() - start
    return {
        "seq_len": seq_len,
        "micro_batch_size": batch,
        "batches_per_s": n / elapsed,
        "tokens_per_s": n * loader.tokens_per_batch / elapsed,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-proc", type=int, default=0, help="tokenizer processes (0 = all cores)")
    ap.add_argument("--out", type=Path, default=None, help="append the result as one JSON line here")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        prepared = prepare(DataConfig(num_proc=args.num_proc), root=Path(tmp))
        prepare_s = time.perf_counter() - start
        manifest = read_manifest(prepared)

        docs = read_documents(default_sources(), Path(tmp) / "cache")
        start = time.perf_counter()
        tokenize_documents(docs, load_tokenizer(prepared), args.num_proc, Path(tmp) / "cache")
        tokenize_s = time.perf_counter() - start

        result = {
            "benchmark": "data_throughput",
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "documents": manifest["documents"],
            "tokens": manifest["tokens"],
            "vocab_size": manifest["vocab_size"],
            "prepare_s": prepare_s,
            "tokenize_tokens_per_s": manifest["tokens"] / tokenize_s,
            "loader": [bench_loader(prepared, s, b) for s, b in LOADER_SHAPES],
        }

    print(f"default corpus: {result['documents']} documents, {result['tokens']} tokens, vocab {result['vocab_size']}")
    print(f"prepare (train BPE + tokenize + write): {prepare_s:.2f} s")
    print(f"tokenization: {result['tokenize_tokens_per_s'] / 1e6:.2f} M tokens/s")
    print(f"{'seq_len':>8} {'batch':>6} {'batches/s':>10} {'M tokens/s':>11}")
    for r in result["loader"]:
        print(
            f"{r['seq_len']:>8} {r['micro_batch_size']:>6} {r['batches_per_s']:>10.1f} {r['tokens_per_s'] / 1e6:>11.2f}"
        )
    if args.out:
        with args.out.open("a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
