"""PNG figures of the recall results and of ``inspect``'s per-token signals.

Built on ``matplotlib.figure.Figure`` (no pyplot, so no GUI backend and no global state): each
``*_figure`` function returns a Figure that tests can read, ``save`` writes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from hybridlm.eval.recall import grid


def save(fig: Figure, path: str | Path) -> Path:
    fig.savefig(path, dpi=120)
    return Path(path)


def _log2_x(ax, values: Sequence[int]) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(values), [str(v) for v in values])
    ax.minorticks_off()


def mqar_figure(mqar: dict) -> Figure:
    """Left: accuracy vs number of pairs, a line per sequence length; right: accuracy vs sequence
    length, a line per number of pairs. ``mqar`` is ``evaluate_recall(...)["mqar"]``."""
    lens, pairs, cells = grid(mqar["rows"], "seq_len", "n_pairs")
    fig = Figure(figsize=(11, 4), layout="constrained")
    by_pairs, by_len = fig.subplots(1, 2)
    for seq_len in lens:
        xs = [n for n in pairs if (seq_len, n) in cells]
        by_pairs.plot(xs, [cells[(seq_len, n)] for n in xs], marker="o", label=f"seq_len {seq_len}")
    for n in pairs:
        xs = [t for t in lens if (t, n) in cells]
        by_len.plot(xs, [cells[(t, n)] for t in xs], marker="o", label=f"{n} pairs")
    for ax, xlabel, ticks in ((by_pairs, "key-value pairs", pairs), (by_len, "sequence length", lens)):
        ax.axhline(mqar["chance"], color="grey", linestyle="--", linewidth=1, label="chance")
        _log2_x(ax, ticks)
        ax.set(xlabel=xlabel, ylabel="MQAR accuracy", ylim=(-0.02, 1.02))
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(f"MQAR (vocab {mqar['vocab_size']})")
    return fig


def mqar_comparison_figure(by_model: dict[str, dict], seq_len: int, n_pairs: int) -> Figure:
    """One line per model. Left: accuracy vs pairs at ``seq_len``; right: accuracy vs sequence length
    at ``n_pairs``. ``by_model`` maps a name to its ``evaluate_recall(...)["mqar"]``."""
    fig = Figure(figsize=(11, 4), layout="constrained")
    by_pairs, by_len = fig.subplots(1, 2)
    all_pairs, all_lens = set(), set()
    for name, mqar in by_model.items():
        lens, pairs, cells = grid(mqar["rows"], "seq_len", "n_pairs")
        xs = [n for n in pairs if (seq_len, n) in cells]
        by_pairs.plot(xs, [cells[(seq_len, n)] for n in xs], marker="o", label=name)
        ts = [t for t in lens if (t, n_pairs) in cells]
        by_len.plot(ts, [cells[(t, n_pairs)] for t in ts], marker="o", label=name)
        all_pairs |= set(xs)
        all_lens |= set(ts)
    chance = next(iter(by_model.values()))["chance"]
    panels = (
        (by_pairs, f"key-value pairs (seq_len {seq_len})", all_pairs),
        (by_len, f"sequence length ({n_pairs} pairs)", all_lens),
    )
    for ax, xlabel, ticks in panels:
        ax.axhline(chance, color="grey", linestyle="--", linewidth=1, label="chance")
        _log2_x(ax, sorted(ticks))
        ax.set(xlabel=xlabel, ylabel="MQAR accuracy", ylim=(-0.02, 1.02))
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return fig


def needle_figure(rows: list[dict]) -> Figure:
    """Heat map of needle exact match: depth (rows) × context length (columns), values written in."""
    lengths, depths, cells = grid(rows, "context_len", "depth")
    acc = np.array([[cells.get((n, d), np.nan) for n in lengths] for d in depths])
    fig = Figure(figsize=(1.2 * len(lengths) + 2, 0.6 * len(depths) + 1.5), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(acc, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
    ax.set(xlabel="context length (tokens)", ylabel="needle depth", title="needle in a haystack: exact match")
    for i, j in np.ndindex(acc.shape):
        if not np.isnan(acc[i, j]):
            ax.text(j, i, f"{acc[i, j]:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(image, ax=ax)
    return fig


def plot_mqar(mqar: dict, path: str | Path) -> Path:
    return save(mqar_figure(mqar), path)


def plot_needle(rows: list[dict], path: str | Path) -> Path:
    return save(needle_figure(rows), path)


def token_heatmap_figure(maps: dict[str, np.ndarray], layer_names: list[str], tokens: list[str]) -> Figure:
    """One panel per signal: layers (rows) × tokens (columns). ``maps`` values are (layers, tokens);
    token labels are drawn when there are few enough to read."""
    n_tokens = next(iter(maps.values())).shape[1]
    height = 1.2 + (0.35 * len(layer_names) + (1.4 if n_tokens <= 160 else 0.9)) * len(maps)
    fig = Figure(figsize=(min(4 + 0.18 * n_tokens, 30), height), layout="constrained")
    axes = np.atleast_1d(fig.subplots(len(maps), 1, squeeze=False)[:, 0])
    for ax, (name, values) in zip(axes, maps.items(), strict=True):
        image = ax.imshow(values, aspect="auto", interpolation="nearest", cmap="viridis")
        ax.set_yticks(range(len(layer_names)), layer_names, fontsize=7)
        ax.set_title(name, fontsize=9)
        if n_tokens <= 160:
            ax.set_xticks(range(n_tokens), tokens, rotation=90, fontsize=6)
        else:
            ax.set_xlabel("token position")
        fig.colorbar(image, ax=ax, pad=0.01)
    return fig


def attention_topk_figure(topk: dict[str, tuple[np.ndarray, np.ndarray]]) -> Figure:
    """One panel per attention layer: for each query position (x), the key positions (y) it attends
    to most, shaded by head-mean attention weight. ``topk`` maps a layer name to (index, weight),
    each (tokens, k); index -1 marks a missing key."""
    fig = Figure(figsize=(5 * len(topk), 4.5), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(topk), squeeze=False)[0])
    for ax, (name, (index, weight)) in zip(axes, topk.items(), strict=True):
        query = np.broadcast_to(np.arange(index.shape[0])[:, None], index.shape)
        keep = index >= 0
        points = ax.scatter(query[keep], index[keep], c=weight[keep], s=6, cmap="magma_r", vmin=0, vmax=1)
        ax.plot([0, index.shape[0]], [0, index.shape[0]], color="grey", linewidth=0.5)
        ax.set(xlabel="query position", ylabel="attended key position", title=name)
        fig.colorbar(points, ax=ax, label="attention weight")
    return fig
