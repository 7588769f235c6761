"""Recall evaluation: MQAR accuracy by sequence length × number of pairs, needle exact match by
context length × depth; a printed table, ``recall.json`` and PNG plots. ``hybridlm eval recall``.

Scoring is teacher-forced: one forward pass per batch, and an answer token counts as right when the
argmax of the logits one position before it is that token. For a multi-token needle answer, the row
counts when all its answer tokens are right, which is exactly when greedy decoding would emit the
answer.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from hybridlm.eval.tasks import IGNORE, MQARTask, NeedleTask

DEFAULT_SEQ_LENS = (64, 128, 256, 512)
DEFAULT_N_PAIRS = (4, 8, 16, 32, 64)
DEFAULT_NEEDLE_LENGTHS = (256, 512, 1024, 2048)
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
TASKS = ("mqar", "needle")


@torch.no_grad()
def answer_hits(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(correct, scored), each (batch, seqlen - 1) bool: whether the prediction for each labelled
    token is right, and which positions carry a label."""
    logits = model(input_ids).logits
    target = labels[:, 1:]
    scored = target != IGNORE
    return (logits[:, :-1].argmax(dim=-1) == target) & scored, scored


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters(), torch.empty(0)).device


def evaluate_mqar(
    model: nn.Module,
    vocab_size: int,
    seq_lens: Sequence[int] = DEFAULT_SEQ_LENS,
    n_pairs: Sequence[int] = DEFAULT_N_PAIRS,
    samples: int = 64,
    batch_size: int = 16,
    seed: int = 0,
) -> list[dict]:
    """One row per (seq_len, n_pairs) that fits (4 * n_pairs <= seq_len, enough distinct tokens):
    ``accuracy`` over queries, ``exact`` over sequences (every query right), counts."""
    device = _device(model)
    tasks = []
    for seq_len in seq_lens:
        for n in n_pairs:
            try:
                tasks.append(MQARTask(vocab_size, seq_len, n, seed))
            except ValueError:
                continue  # this cell does not fit: the table shows it as empty
    if not tasks:
        raise ValueError(
            f"mqar: no (seq_len, n_pairs) in seq_lens={list(seq_lens)} x n_pairs={list(n_pairs)} fits "
            f"(needs 4 * n_pairs <= seq_len and n_pairs < vocab_size / 2 = {vocab_size // 2})"
        )
    rows = []
    for task in tasks:
        seq_len, n = task.seq_len, task.pairs_choices[0]
        correct = scored = exact = done = 0
        for index in range(-(-samples // batch_size)):
            batch = task.batch(min(batch_size, samples - done), index, split="test")
            hits, mask = answer_hits(model, batch["input_ids"].to(device), batch["labels"].to(device))
            correct += int(hits.sum())
            scored += int(mask.sum())
            exact += int((hits.sum(1) == mask.sum(1)).sum())
            done += len(hits)
        rows.append(
            {
                "seq_len": seq_len,
                "n_pairs": n,
                "accuracy": correct / scored,
                "exact": exact / done,
                "queries": scored,
                "sequences": done,
            }
        )
    return rows


def evaluate_needle(
    model: nn.Module,
    tokenizer,
    lengths: Sequence[int] = DEFAULT_NEEDLE_LENGTHS,
    depths: Sequence[float] = DEFAULT_DEPTHS,
    samples: int = 8,
    batch_size: int = 4,
    seed: int = 0,
    corpus_dir: str | Path | None = None,
) -> list[dict]:
    """One row per (context_len, depth): ``accuracy`` = share of rows whose answer is exactly right."""
    device = _device(model)
    task = NeedleTask(tokenizer, seed) if corpus_dir is None else NeedleTask(tokenizer, seed, corpus_dir)
    sizes = [min(batch_size, samples - start) for start in range(0, samples, batch_size)]
    # every row is built before the model runs, so a context too short fails before any work
    cells = {
        (length, depth): [task.batch(size, length, depth, index) for index, size in enumerate(sizes)]
        for length in lengths
        for depth in depths
    }
    rows = []
    for (length, depth), batches in cells.items():
        exact = 0
        for batch in batches:
            hits, mask = answer_hits(model, batch["input_ids"].to(device), batch["labels"].to(device))
            exact += int((hits.sum(1) == mask.sum(1)).sum())
        rows.append({"context_len": length, "depth": depth, "accuracy": exact / samples, "samples": samples})
    return rows


def evaluate_recall(
    model: nn.Module,
    tokenizer=None,
    tasks: Sequence[str] = TASKS,
    mqar_vocab_size: int | None = None,
    seq_lens: Sequence[int] = DEFAULT_SEQ_LENS,
    n_pairs: Sequence[int] = DEFAULT_N_PAIRS,
    samples: int = 64,
    needle_lengths: Sequence[int] = DEFAULT_NEEDLE_LENGTHS,
    depths: Sequence[float] = DEFAULT_DEPTHS,
    needle_samples: int = 8,
    batch_size: int = 8,
    seed: int = 0,
) -> dict:
    """Both recall tasks on ``model`` (MQAR over ``mqar_vocab_size``, default the model's vocabulary;
    needle needs ``tokenizer``). Returns ``{"mqar": {...}, "needle": {...}}`` for the tasks run.
    Memory: one batch's logits, ``batch_size`` × length × vocabulary floats."""
    unknown = set(tasks) - set(TASKS)
    if unknown:
        raise ValueError(f"recall tasks={sorted(unknown)} unknown; choose from {', '.join(TASKS)}")
    if "needle" in tasks and tokenizer is None:
        raise ValueError("recall task 'needle' needs a tokenizer (tokenizer.json beside the checkpoint)")
    was_training = model.training
    model.eval()
    results: dict = {}
    if "needle" in tasks:  # first: its rows are checked before any evaluation (MQAR skips cells that do not fit)
        rows = evaluate_needle(model, tokenizer, needle_lengths, depths, needle_samples, batch_size, seed)
        results["needle"] = {"rows": rows}
    if "mqar" in tasks:
        vocab = mqar_vocab_size or model.cfg.vocab_size
        rows = evaluate_mqar(model, vocab, seq_lens, n_pairs, samples, batch_size, seed)
        results["mqar"] = {"vocab_size": vocab, "chance": 1.0 / (vocab - vocab // 2), "rows": rows}
    model.train(was_training)
    return {key: results[key] for key in TASKS if key in results}


def _axis(rows: list[dict], key: str) -> list:
    """The distinct values of ``key``: sorted when numbers, in order of appearance otherwise (names)."""
    values = list(dict.fromkeys(r[key] for r in rows))
    return sorted(values) if all(isinstance(v, int | float) for v in values) else values


def grid(rows: list[dict], row_key: str, col_key: str, value_key: str = "accuracy") -> tuple[list, list, dict]:
    """Row and column values and ``{(row, col): value}`` of a long-format result list."""
    cells = {(r[row_key], r[col_key]): r[value_key] for r in rows}
    return _axis(rows, row_key), _axis(rows, col_key), cells


def _label(value) -> str:
    return f"{value:g}" if isinstance(value, int | float) else str(value)


def format_grid(rows: list[dict], row_key: str, col_key: str, title: str, value_key: str = "accuracy") -> str:
    """A text table: one line per ``row_key`` value, one column per ``col_key`` value, '-' where absent."""
    row_vals, col_vals, cells = grid(rows, row_key, col_key, value_key)
    first = max(12, *(len(_label(v)) + 1 for v in row_vals)) if row_vals else 12
    width = max(7, *(len(_label(c)) + 1 for c in col_vals)) if col_vals else 7
    lines = [title, f"{row_key:>{first}}" + "".join(f"{_label(c):>{width}}" for c in col_vals)]
    for rv in row_vals:
        cells_text = (f"{cells[(rv, c)]:.3f}" if (rv, c) in cells else "-" for c in col_vals)
        lines.append(f"{_label(rv):>{first}}" + "".join(f"{t:>{width}}" for t in cells_text))
    return "\n".join(lines)


def format_recall_table(results: dict) -> str:
    """The tables ``hybridlm eval recall`` prints."""
    parts = []
    if "mqar" in results:
        m = results["mqar"]
        title = f"MQAR accuracy (vocab {m['vocab_size']}, chance {m['chance']:.4f}); columns: n_pairs"
        parts.append(format_grid(m["rows"], "seq_len", "n_pairs", title))
    if "needle" in results:
        title = "needle exact match; columns: depth (0 = start of the context, 1 = end)"
        parts.append(format_grid(results["needle"]["rows"], "context_len", "depth", title))
    return "\n\n".join(parts)


def write_recall_report(results: dict, out_dir: str | Path, extra: dict | None = None) -> dict[str, str]:
    """``recall.json``, ``mqar.png`` and ``needle.png`` (for the tasks present) in ``out_dir``; returns their paths."""
    from hybridlm.eval.plots import plot_mqar, plot_needle

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": str(out / "recall.json")}
    (out / "recall.json").write_text(json.dumps({**(extra or {}), **results}, indent=2) + "\n")
    if results.get("mqar", {}).get("rows"):
        files["mqar_png"] = str(plot_mqar(results["mqar"], out / "mqar.png"))
    if results.get("needle", {}).get("rows"):
        files["needle_png"] = str(plot_needle(results["needle"]["rows"], out / "needle.png"))
    return files


def parse_values(text: str, kind: type, option: str) -> list:
    """A comma-separated CLI list (``"64,128"``) as numbers of ``kind``; a one-line error naming ``option``."""
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{option}={text!r}: expected comma-separated {kind.__name__} values") from None
    if not values:
        raise ValueError(f"{option}={text!r}: no values")
    return values


def run_eval_recall(
    checkpoint: str,
    out_dir: str,
    tasks: Sequence[str] | None = None,
    device: str | None = None,
    **options,
) -> dict:
    """``hybridlm eval recall``: load ``checkpoint`` (a save_pretrained dir or a run dir with ``model/``),
    evaluate, print the tables, write JSON and PNGs to ``out_dir``. ``tasks=None`` runs MQAR, and the
    needle too when a tokenizer sits beside the checkpoint. ``options`` go to ``evaluate_recall``."""
    from hybridlm.generate import load_tokenizer_from, resolve_model_dir
    from hybridlm.model import HybridLM

    model_dir = resolve_model_dir(checkpoint)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = HybridLM.from_pretrained(model_dir, device=device)
    try:
        tokenizer = load_tokenizer_from(model_dir)
    except FileNotFoundError:
        if tasks is not None and "needle" in tasks:
            raise
        tokenizer = None
    if tasks is None:
        tasks = TASKS if tokenizer is not None else ("mqar",)
    results = evaluate_recall(model, tokenizer, tasks, **options)
    print(format_recall_table(results))
    files = write_recall_report(results, out_dir, {"checkpoint": str(model_dir), "options": options})
    for path in files.values():
        print(f"wrote {path}")
    return {**results, "files": files}
