"""PackedLoader: round trip, rank disjointness, determinism, exact resume, epochs, padding."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hybridlm.data import DataError, PackedLoader, load_tokenizer, read_manifest


def epoch_rows(loader: PackedLoader) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The rows of one epoch of a single-rank loader, as (input_ids, labels, doc_ids) arrays."""
    rows = []
    while len(rows) < loader.num_rows:
        batch = loader.next_batch()
        rows += list(zip(*(batch[k].numpy() for k in ("input_ids", "labels", "doc_ids")), strict=True))
    return rows[: loader.num_rows]


def row_keys(batch) -> list[tuple]:
    return [(tuple(d), tuple(t)) for d, t in zip(batch["doc_ids"].tolist(), batch["input_ids"].tolist(), strict=True)]


def stream_documents(prepared_dir, split: str, seq_len: int) -> list[str]:
    """Rebuild the token stream from an unshuffled epoch (rows share one token) and decode each document."""
    loader = PackedLoader(prepared_dir, split, seq_len, micro_batch_size=3, shuffle=False)
    tokens, doc_ids = [], []
    for k, (ids, labels, docs) in enumerate(epoch_rows(loader)):
        keep = labels != -100
        start = 0 if k == 0 else 1
        tokens += ids[keep][start:].tolist()
        doc_ids += docs[keep][start:].tolist()
    tok = load_tokenizer(prepared_dir)
    eos = tok.eos_token_id
    documents = []
    for doc in dict.fromkeys(doc_ids):  # in stream order
        ids = [t for t, d in zip(tokens, doc_ids, strict=True) if d == doc]
        assert ids[-1] == eos and eos not in ids[:-1], "EOS ends every document and only there"
        documents.append(tok.decode(ids[:-1]))
    return documents


def test_round_trip_text_to_shards_to_loader_gives_original_documents(prepared):
    prepared_dir, docs = prepared
    train = stream_documents(prepared_dir, "train", seq_len=32)
    val = stream_documents(prepared_dir, "val", seq_len=32)
    assert len(val) == 20
    assert sorted(train + val) == sorted(docs)
    assert train == [d for d in docs if d not in set(val)]  # corpus order is kept inside a split


def test_every_token_after_the_first_is_a_target_once_per_epoch(prepared):
    prepared_dir, _ = prepared
    loader = PackedLoader(prepared_dir, "train", seq_len=32, micro_batch_size=4)
    targets = sum(int((labels[1:] != -100).sum()) for _, labels, _ in epoch_rows(loader))
    assert targets == read_manifest(prepared_dir)["splits"]["train"]["tokens"] - 1


def test_two_ranks_read_disjoint_rows_that_interleave_the_single_rank_order(prepared):
    prepared_dir, _ = prepared
    single = PackedLoader(prepared_dir, "train", 32, micro_batch_size=4, seed=3)
    ranks = [PackedLoader(prepared_dir, "train", 32, micro_batch_size=2, rank=r, world_size=2, seed=3) for r in (0, 1)]
    again = PackedLoader(prepared_dir, "train", 32, micro_batch_size=2, rank=1, world_size=2, seed=3)
    seen = [set(), set()]
    for _ in range(single.num_rows // 4):  # within the first epoch
        b0, b1 = ranks[0].next_batch(), ranks[1].next_batch()
        assert row_keys(b0) + row_keys(b1) == row_keys(single.next_batch())
        assert row_keys(again.next_batch()) == row_keys(b1)  # deterministic
        seen[0].update(row_keys(b0))
        seen[1].update(row_keys(b1))
    assert seen[0] and not seen[0] & seen[1]


def test_seed_changes_the_order(prepared):
    prepared_dir, _ = prepared
    a = PackedLoader(prepared_dir, "train", 32, 4, seed=0).next_batch()
    b = PackedLoader(prepared_dir, "train", 32, 4, seed=1).next_batch()
    assert not (a["input_ids"] == b["input_ids"]).all()


@pytest.mark.parametrize("world_size", [1, 2])
def test_resume_from_state_dict_continues_exactly(prepared, world_size):
    prepared_dir, _ = prepared
    make = lambda: PackedLoader(prepared_dir, "train", 32, 5, rank=world_size - 1, world_size=world_size, seed=7)  # noqa: E731
    loader = make()
    steps = loader.num_rows // (5 * world_size)  # so the continuation crosses an epoch boundary
    for _ in range(steps):
        loader.next_batch()
    state = json.loads(json.dumps(loader.state_dict()))  # survives a checkpoint as plain JSON
    expected = [loader.next_batch() for _ in range(4)]
    resumed = make()
    resumed.load_state_dict(state)
    for want in expected:
        got = resumed.next_batch()
        for key in ("input_ids", "labels", "doc_ids"):
            assert (got[key] == want[key]).all()


def test_state_from_another_stream_is_refused(prepared):
    prepared_dir, _ = prepared
    state = PackedLoader(prepared_dir, "train", 32, 4).state_dict()
    with pytest.raises(DataError, match="seq_len"):
        PackedLoader(prepared_dir, "train", 64, 4).load_state_dict(state)


def test_epochs_reshuffle_deterministically(prepared):
    prepared_dir, _ = prepared
    loader = PackedLoader(prepared_dir, "train", 32, 1, seed=0)
    first = [row_keys({"doc_ids": d[None], "input_ids": t[None]})[0] for t, _, d in epoch_rows(loader)]
    second = [row_keys({"doc_ids": d[None], "input_ids": t[None]})[0] for t, _, d in epoch_rows(loader)]
    assert first != second and sorted(first) == sorted(second)


def test_val_iterates_in_the_same_order_every_epoch(prepared):
    prepared_dir, _ = prepared
    loader = PackedLoader(prepared_dir, "val", 32, 1)
    first, second = epoch_rows(loader), epoch_rows(loader)
    assert all((a[0] == b[0]).all() for a, b in zip(first, second, strict=True))


def test_batch_shapes_and_padded_tail(prepared):
    prepared_dir, _ = prepared
    loader = PackedLoader(prepared_dir, "val", 32, 2)
    batch = loader.next_batch()
    assert {k: tuple(v.shape) for k, v in batch.items()} == {k: (2, 32) for k in ("input_ids", "labels", "doc_ids")}
    assert loader.tokens_per_batch == 64
    last_ids, last_labels, last_docs = epoch_rows(PackedLoader(prepared_dir, "val", 32, 1))[-1]
    pad = last_labels == -100
    assert pad.any() and (last_docs[pad] == -1).all() and (last_docs[~pad] >= 0).all()
    assert (last_ids[pad] == read_manifest(prepared_dir)["eos_id"]).all()


def test_long_documents_are_counted_and_kept(prepared):
    prepared_dir, _ = prepared
    manifest = read_manifest(prepared_dir)
    offsets = np.load(prepared_dir / "train_offsets.npy")
    loader = PackedLoader(prepared_dir, "train", 64, 4)
    assert loader.split_documents == int((np.diff(offsets) > 64).sum()) > 0
    assert manifest["splits"]["train"]["documents_longer_than"]["64"] == loader.split_documents


def test_bad_loader_arguments_are_refused(prepared, tmp_path):
    prepared_dir, _ = prepared
    with pytest.raises(DataError, match="split='test'"):
        PackedLoader(prepared_dir, "test", 32, 4)
    with pytest.raises(DataError, match="rank=2"):
        PackedLoader(prepared_dir, "train", 32, 4, rank=2, world_size=2)
    with pytest.raises(DataError, match="no manifest.json"):
        PackedLoader(tmp_path, "train", 32, 4)
