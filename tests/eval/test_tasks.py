"""MQAR and needle generators: determinism, where answers sit, what the prompt holds, resumable loader."""

from __future__ import annotations

import re

import pytest
import torch

from hybridlm.eval.tasks import IGNORE, SNAP_TOKENS, MQARLoader, MQARTask, NeedleTask


def test_mqar_batches_are_a_function_of_seed_and_index():
    task = MQARTask(64, 48, [2, 4, 8], seed=3)
    a, b = task.batch(8, 5), MQARTask(64, 48, [2, 4, 8], seed=3).batch(8, 5)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    assert not torch.equal(a["input_ids"], task.batch(8, 6)["input_ids"])
    assert not torch.equal(a["input_ids"], MQARTask(64, 48, [2, 4, 8], seed=4).batch(8, 5)["input_ids"])
    assert not torch.equal(a["input_ids"], task.batch(8, 5, split="test")["input_ids"])


@pytest.mark.parametrize("seq_len,n_pairs", [(16, 4), (64, 5), (100, 16)])
def test_mqar_labels_sit_only_on_the_values_after_queried_keys(seq_len, n_pairs):
    vocab = 50
    batch = MQARTask(vocab, seq_len, n_pairs, seed=1).batch(16, 0)
    ids, labels = batch["input_ids"], batch["labels"]
    assert ids.shape == labels.shape == (16, seq_len)
    for row_ids, row_labels in zip(ids.tolist(), labels.tolist(), strict=True):
        keys, values = row_ids[0 : 2 * n_pairs : 2], row_ids[1 : 2 * n_pairs : 2]
        assert len(set(keys)) == n_pairs and len(set(values)) == n_pairs
        assert all(1 <= k < vocab // 2 for k in keys) and all(vocab // 2 <= v < vocab for v in values)
        pair = dict(zip(keys, values, strict=True))
        answered = [p for p, label in enumerate(row_labels) if label != IGNORE]
        assert len(answered) == n_pairs
        queried = [row_ids[p - 1] for p in answered]
        assert sorted(queried) == sorted(keys)  # every key asked exactly once
        for p in answered:
            assert p >= 2 * n_pairs + 1  # queries come after the key-value section
            assert row_labels[p] == row_ids[p] == pair[row_ids[p - 1]]  # teacher-forced answer = paired value


def test_mqar_answers_follow_from_the_prompt_alone():
    """Each answer is the value paired earlier with the key just before it; nothing after the key matters."""
    batch = MQARTask(40, 64, 6, seed=2).batch(8, 0)
    for row_ids, row_labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist(), strict=True):
        for p, label in enumerate(row_labels):
            if label == IGNORE:
                continue
            prompt = row_ids[:p]  # what the model sees when predicting position p
            key = prompt[-1]
            first = prompt.index(key)
            assert first < 12 and first % 2 == 0  # the key's first occurrence is its pair
            assert prompt[first + 1] == label


def test_mqar_pairs_mixture_draws_listed_values():
    task = MQARTask(64, 64, [2, 8], seed=0)
    counts = {int((task.batch(4, i)["labels"][0] != IGNORE).sum()) for i in range(20)}
    assert counts == {2, 8}


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"vocab_size": 64, "seq_len": 30, "n_pairs": 8}, "seq_len >= 4 \\* n_pairs = 32"),
        ({"vocab_size": 16, "seq_len": 64, "n_pairs": 8}, "vocab_size=16"),
        ({"vocab_size": 64, "seq_len": 64, "n_pairs": 0}, "n_pairs=0"),
        ({"vocab_size": 64, "seq_len": 64, "n_pairs": 4, "power_a": 0}, "power_a=0"),
    ],
)
def test_mqar_refuses_impossible_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MQARTask(**kwargs)


def test_mqar_loader_resumes_exactly_and_ranks_differ():
    task = MQARTask(64, 32, [2, 4], seed=0)
    loader = MQARLoader(task, 4)
    for _ in range(3):
        loader.next_batch()
    state = loader.state_dict()
    expected = loader.next_batch()
    resumed = MQARLoader(MQARTask(64, 32, [2, 4], seed=0), 4)
    resumed.load_state_dict(state)
    assert torch.equal(resumed.next_batch()["input_ids"], expected["input_ids"])
    rank0, rank1 = MQARLoader(task, 4, 0, 2).next_batch(), MQARLoader(task, 4, 1, 2).next_batch()
    assert not torch.equal(rank0["input_ids"], rank1["input_ids"])
    with pytest.raises(ValueError, match="seed=0"):
        MQARLoader(MQARTask(64, 32, [2, 4], seed=1), 4).load_state_dict(state)


@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
def test_needle_sits_at_the_requested_depth(tokenizer, depth):
    task = NeedleTask(tokenizer, seed=0)
    batch = task.batch(3, 160, depth)
    assert batch["input_ids"].shape == batch["labels"].shape == (3, 160)
    for ids, labels, start, length in zip(
        batch["input_ids"].tolist(),
        batch["labels"].tolist(),
        batch["needle_start"].tolist(),
        batch["needle_len"].tolist(),
        strict=True,
    ):
        needle = tokenizer.decode(ids[start : start + length])
        match = re.fullmatch(r" The secret number of (\w+) is (\d+)\. ", needle)
        assert match is not None
        answer_at = [p for p, label in enumerate(labels) if label != IGNORE]
        assert answer_at == list(range(answer_at[0], 160))  # the answer closes the row
        assert tokenizer.decode(ids[answer_at[0] :]).strip() == match.group(2)
        question_at = max(q for q in range(answer_at[0]) if tokenizer.decode(ids[q : answer_at[0]]).startswith("\n\nQ"))
        question = tokenizer.decode(ids[question_at : answer_at[0]])
        assert f"secret number of {match.group(1)}?" in question and match.group(2) not in question
        wanted = round(depth * (question_at - length))  # depth is relative to the filler alone
        assert wanted - SNAP_TOKENS <= start <= wanted


def test_needle_rows_do_not_depend_on_what_was_asked_before(tokenizer):
    fresh = NeedleTask(tokenizer, seed=5).batch(2, 128, 0.25, index=3)
    used = NeedleTask(tokenizer, seed=5)
    used.batch(1, 2000, 0.9)
    again = used.batch(2, 128, 0.25, index=3)
    assert torch.equal(fresh["input_ids"], again["input_ids"])
    assert not torch.equal(fresh["input_ids"], NeedleTask(tokenizer, seed=6).batch(2, 128, 0.25, 3)["input_ids"])


def test_needle_refuses_a_context_too_short_for_its_sentences(tokenizer):
    with pytest.raises(ValueError, match="context_len=10 is too short"):
        NeedleTask(tokenizer).batch(1, 10, 0.5)
