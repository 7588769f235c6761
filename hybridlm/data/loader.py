"""Packed, resumable, rank-sharded batches from a prepared dataset directory.

The prepared split is one flat token stream (documents back to back, each ending in EOS). Rows
are ``seq_len``-token windows taken every ``seq_len - 1`` tokens, so consecutive windows share one
token: the model shifts labels inside, and this way every token of the stream after the first is
a prediction target exactly once and no document is ever dropped. The last window of a split is
padded (EOS id, label -100, doc id -1).

Instruction data (manifest ``kind: instruct``) was packed when prepared: row ``r`` holds whole
examples ``rows[r]:rows[r + 1]``, padded to ``seq_len`` (EOS id, label -100, doc id -1), and the
labels are -100 wherever the loss mask is 0 (prompt tokens). Its ``seq_len`` is the prepared one.

Order: the train split visits rows in a fresh seeded permutation each epoch; the val split in
stream order every time (``shuffle`` overrides either). Row ``q`` of the endless global sequence goes to rank
``(q // micro_batch_size) % world_size``, so ranks never share a row within an epoch and all
ranks advance in step. The whole position is one integer (rows consumed, summed over ranks).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from hybridlm.data.errors import DataError

SPLITS = ("train", "val")
PAD_DOC_ID = -1


def read_manifest(prepared_dir: str | Path) -> dict:
    """The ``manifest.json`` of a prepared dir; a clear error when the dir is missing or incomplete."""
    path = Path(prepared_dir) / "manifest.json"
    if not path.is_file():
        raise DataError(f"{prepared_dir}: not a prepared dataset (no manifest.json); run `hybridlm prepare` first")
    return json.loads(path.read_text())


class PackedLoader:
    """Endless iterator of packed batches for one rank, with an exact-resume state dict."""

    def __init__(
        self,
        prepared_dir: str | Path,
        split: str,
        seq_len: int,
        micro_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool | None = None,
    ):
        if split not in SPLITS:
            raise DataError(f"split={split!r} must be one of {', '.join(SPLITS)}")
        if seq_len < 2:
            raise DataError(f"seq_len={seq_len} must be at least 2 (one input and one target)")
        if not 0 <= rank < world_size:
            raise DataError(f"rank={rank} must be in [0, world_size={world_size})")
        manifest = read_manifest(prepared_dir)
        info = manifest["splits"][split]
        if info["tokens"] == 0:
            raise DataError(f"{prepared_dir}: the {split} split is empty (data.val_fraction or corpus too small)")
        self.prepared_dir = Path(prepared_dir)
        self.split, self.seq_len, self.micro_batch_size = split, seq_len, micro_batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle = split == "train" if shuffle is None else shuffle
        self.pad_id = manifest["eos_id"]
        self.tokens = np.memmap(self.prepared_dir / info["tokens_file"], dtype=manifest["dtype"], mode="r")
        self.doc_offsets = np.load(self.prepared_dir / info["offsets_file"])  # (n_docs + 1,) int64
        self.stride = seq_len - 1
        self.num_rows = max(1, -(-(len(self.tokens) - 1) // self.stride))
        self.loss_mask = self.row_docs = None
        if manifest.get("kind") == "instruct":
            if seq_len != manifest["seq_len"]:
                raise DataError(
                    f"{prepared_dir}: instruction data was packed into rows of {manifest['seq_len']} tokens, not "
                    f"seq_len={seq_len}; prepare it with seq_len={seq_len} (train.seq_len)"
                )
            self.loss_mask = np.memmap(self.prepared_dir / info["mask_file"], dtype=np.uint8, mode="r")
            self.row_docs = np.load(self.prepared_dir / info["rows_file"])  # (n_rows + 1,) int64
            self.num_rows = len(self.row_docs) - 1
        self.rows_consumed = 0  # global position: rows handed out to all ranks together
        self._perm_epoch, self._perm = -1, np.arange(self.num_rows)

    @property
    def tokens_per_batch(self) -> int:
        """Tokens in one ``input_ids`` batch of this rank (micro_batch_size * seq_len)."""
        return self.micro_batch_size * self.seq_len

    @property
    def split_documents(self) -> int:
        """Documents longer than ``seq_len``: packing spreads them over several rows, never drops them."""
        return int((np.diff(self.doc_offsets) > self.seq_len).sum())

    @property
    def epoch(self) -> float:
        """Fractional number of passes over the split made so far (all ranks together)."""
        return self.rows_consumed / self.num_rows

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def next_batch(self) -> dict[str, torch.Tensor]:
        """The next batch of this rank: ``input_ids``, ``labels`` and ``doc_ids``, each (B, T) int64."""
        start = self.rows_consumed + self.rank * self.micro_batch_size
        rows = [self._row(self._row_index(q)) for q in range(start, start + self.micro_batch_size)]
        self.rows_consumed += self.micro_batch_size * self.world_size
        input_ids, labels, doc_ids = (torch.from_numpy(np.stack(x)) for x in zip(*rows, strict=True))
        return {"input_ids": input_ids, "labels": labels, "doc_ids": doc_ids}

    def state_dict(self) -> dict:
        """Position in the stream plus what must match on resume."""
        return {
            "split": self.split,
            "seq_len": self.seq_len,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "num_rows": self.num_rows,
            "rows_consumed": self.rows_consumed,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where ``state`` was taken; refuses a state from a different stream."""
        for key in ("split", "seq_len", "seed", "shuffle", "num_rows"):
            if state[key] != getattr(self, key):
                raise DataError(
                    f"loader state has {key}={state[key]!r} but this loader has {getattr(self, key)!r} "
                    f"({self.prepared_dir}); resume with the same data and train.seq_len"
                )
        self.rows_consumed = int(state["rows_consumed"])

    def _row_index(self, q: int) -> int:
        """Row at position ``q`` of the endless sequence: epoch ``q // num_rows``, reshuffled per epoch."""
        epoch, i = divmod(q, self.num_rows)
        if not self.shuffle:
            return i
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)
            self._perm_epoch = epoch
        return int(self._perm[i])

    def _row(self, row: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self.row_docs is not None:
            return self._packed_row(row)
        begin = row * self.stride
        window = np.asarray(self.tokens[begin : begin + self.seq_len], dtype=np.int64)
        doc_ids = np.searchsorted(self.doc_offsets, np.arange(begin, begin + len(window)), side="right") - 1
        labels = window.copy()
        if len(window) < self.seq_len:  # the padded tail of the split
            pad = self.seq_len - len(window)
            window = np.concatenate([window, np.full(pad, self.pad_id, dtype=np.int64)])
            labels = np.concatenate([labels, np.full(pad, -100, dtype=np.int64)])
            doc_ids = np.concatenate([doc_ids, np.full(pad, PAD_DOC_ID, dtype=np.int64)])
        return window, labels, doc_ids.astype(np.int64)

    def _packed_row(self, row: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Whole instruction examples, labels only where the loss mask is 1, padded to ``seq_len``."""
        first, last = self.row_docs[row], self.row_docs[row + 1]
        begin, end = self.doc_offsets[first], self.doc_offsets[last]
        pad = self.seq_len - (end - begin)
        tokens = np.asarray(self.tokens[begin:end], dtype=np.int64)
        labels = np.where(self.loss_mask[begin:end] == 1, tokens, -100)
        doc_ids = np.repeat(np.arange(first, last, dtype=np.int64), np.diff(self.doc_offsets[first : last + 1]))
        return (
            np.concatenate([tokens, np.full(pad, self.pad_id, dtype=np.int64)]),
            np.concatenate([labels, np.full(pad, -100, dtype=np.int64)]),
            np.concatenate([doc_ids, np.full(pad, PAD_DOC_ID, dtype=np.int64)]),
        )
