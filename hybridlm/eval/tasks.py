"""Synthetic recall tasks, generated on the fly from a seed: nothing is downloaded.

- ``MQARTask``: multi-query associative recall in the form of Zoology (Arora et al., 2023). The
  vocabulary is split into key tokens ``[1, vocab/2)`` and value tokens ``[vocab/2, vocab)``. A row
  opens with ``n_pairs`` key-value pairs (distinct keys, distinct values), then every key is queried
  once, in random order, at a random even offset of the rest of the row (gaps drawn from Zoology's
  power law, which favours short gaps); the token after a query key is its value, and the other
  positions hold random value tokens (never keys, so each key occurs only in its pair and its query).
- ``NeedleTask``: needle in a haystack. A sentence "The secret number of <word> is <digits>." sits
  at a chosen relative depth of filler text from the embedded default corpus; the row ends with a
  question about the word and the answer's tokens.

Both return rows in the model's convention: ``labels`` aligned with ``input_ids`` (the model shifts
them), -100 everywhere except the answer positions, where the label is the answer token and the
input holds that same token (teacher forcing). An answer is therefore predicted from the tokens
before it only, and a row of length T is scored in one forward pass. Every batch is a pure
function of (seed, split, index): a loader resumes by remembering one integer.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from hybridlm.data.sources import DEFAULT_CORPUS_DIR, read_txt

IGNORE = -100
SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
DEFAULT_POWER_A = 0.01  # Zoology's default: p(gap) ∝ gap^(a - 1)
SNAP_TOKENS = 8  # the needle moves back at most this many tokens to start at a word boundary
FILLER_STARTS = 20_000  # needle filler starts at one of the first this many corpus tokens


class MQARTask:
    """Multi-query associative recall rows of ``seq_len`` tokens over ``vocab_size`` tokens.

    ``n_pairs`` may be a list: each batch then draws one of its values (seeded), so one task can
    train on a mixture of difficulties at a fixed sequence length.
    """

    def __init__(
        self,
        vocab_size: int,
        seq_len: int,
        n_pairs: int | Sequence[int],
        seed: int = 0,
        power_a: float = DEFAULT_POWER_A,
    ):
        self.pairs_choices = [n_pairs] if isinstance(n_pairs, int) else [int(n) for n in n_pairs]
        self.vocab_size, self.seq_len, self.seed, self.power_a = vocab_size, seq_len, seed, power_a
        self.key_range = (1, vocab_size // 2)  # token 0 is never a key: Zoology's layout
        self.value_range = (vocab_size // 2, vocab_size)
        check_mqar(vocab_size, seq_len, self.pairs_choices, power_a)

    @property
    def chance(self) -> float:
        """Accuracy of a uniform guess among the value tokens."""
        return 1.0 / (self.value_range[1] - self.value_range[0])

    def batch(self, batch_size: int, index: int, split: str = "train") -> dict[str, torch.Tensor]:
        """Batch ``index`` of ``split``: ``input_ids`` and ``labels``, each (batch_size, seq_len) int64."""
        rng = np.random.default_rng([self.seed, SPLIT_IDS[split], index])
        n_pairs = self.pairs_choices[rng.integers(len(self.pairs_choices))]
        return mqar_rows(rng, batch_size, self.seq_len, n_pairs, self.vocab_size, self.power_a)


def check_mqar(vocab_size: int, seq_len: int, pairs_choices: list[int], power_a: float) -> None:
    if vocab_size < 4:
        raise ValueError(f"mqar vocab_size={vocab_size} must be at least 4 (keys and values)")
    n_keys, n_values = vocab_size // 2 - 1, vocab_size - vocab_size // 2
    for n in pairs_choices:
        if n < 1:
            raise ValueError(f"mqar n_pairs={n} must be at least 1")
        if n > min(n_keys, n_values):
            raise ValueError(
                f"mqar n_pairs={n} exceeds the {min(n_keys, n_values)} distinct keys/values of vocab_size={vocab_size}"
            )
        if 4 * n > seq_len:
            raise ValueError(f"mqar n_pairs={n} needs seq_len >= 4 * n_pairs = {4 * n}, got seq_len={seq_len}")
    if power_a <= 0:
        raise ValueError(f"mqar power_a={power_a} must be positive")


def mqar_rows(
    rng: np.random.Generator, batch_size: int, seq_len: int, n_pairs: int, vocab_size: int, power_a: float
) -> dict[str, torch.Tensor]:
    """``batch_size`` MQAR rows (see the module docstring for the layout)."""
    half = vocab_size // 2
    keys = 1 + _distinct(rng, batch_size, half - 1, n_pairs)  # (batch, n_pairs)
    values = half + _distinct(rng, batch_size, vocab_size - half, n_pairs)
    context = 2 * n_pairs
    slots = (seq_len - context) // 2  # query slots: even offsets of the rest of the row
    log_p = (power_a - 1) * np.log(np.arange(1, slots + 1))
    # Gumbel top-k draws n_pairs distinct slots with probabilities ∝ p, in sequential-sampling order
    gumbel = -np.log(-np.log(rng.random((batch_size, slots))))
    gaps = np.argsort(-(log_p + gumbel), axis=1)[:, :n_pairs]  # (batch, n_pairs): slot of key i's query

    # filler: random value tokens. Never keys, so a key occurs only in its pair and its query (Zoology
    # draws filler from the whole vocabulary, which with a small vocabulary repeats keys and makes
    # the lookup ambiguous)
    input_ids = rng.integers(half, vocab_size, size=(batch_size, seq_len))
    labels = np.full((batch_size, seq_len), IGNORE, dtype=np.int64)
    rows = np.arange(batch_size)[:, None]
    input_ids[:, 0:context:2], input_ids[:, 1:context:2] = keys, values
    query_pos = context + 2 * gaps
    input_ids[rows, query_pos] = keys
    input_ids[rows, query_pos + 1] = values
    labels[rows, query_pos + 1] = values
    return {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels)}


def _distinct(rng: np.random.Generator, batch_size: int, n: int, k: int) -> np.ndarray:
    """(batch_size, k) samples without replacement from ``range(n)``, one draw per row."""
    return np.argsort(rng.random((batch_size, n)), axis=1)[:, :k]


class MQARLoader:
    """Endless MQAR batches for one rank with the interface of ``PackedLoader``
    (``next_batch``, ``state_dict``, ``load_state_dict``): ranks take interleaved batch indices."""

    def __init__(self, task: MQARTask, micro_batch_size: int, rank: int = 0, world_size: int = 1, split: str = "train"):
        if split not in SPLIT_IDS:
            raise ValueError(f"split={split!r} must be one of {', '.join(SPLIT_IDS)}")
        self.task, self.micro_batch_size, self.split = task, micro_batch_size, split
        self.rank, self.world_size = rank, world_size
        self.seq_len = task.seq_len
        self.batches_consumed = 0  # global position: batches handed out to all ranks together

    @property
    def tokens_per_batch(self) -> int:
        return self.micro_batch_size * self.seq_len

    def next_batch(self) -> dict[str, torch.Tensor]:
        """The next batch of this rank: ``input_ids`` and ``labels`` (no ``doc_ids``: one example per row)."""
        index = self.batches_consumed + self.rank
        self.batches_consumed += self.world_size
        return self.task.batch(self.micro_batch_size, index, self.split)

    def state_dict(self) -> dict:
        t = self.task
        return {
            "task": "mqar",
            "vocab_size": t.vocab_size,
            "seq_len": t.seq_len,
            "n_pairs": t.pairs_choices,
            "seed": t.seed,
            "power_a": t.power_a,
            "split": self.split,
            "micro_batch_size": self.micro_batch_size,
            "batches_consumed": self.batches_consumed,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue where ``state`` was taken; refuses a state of a different task stream."""
        own = self.state_dict()
        for key in ("task", "vocab_size", "seq_len", "n_pairs", "seed", "power_a", "split", "micro_batch_size"):
            if state.get(key) != own[key]:
                raise ValueError(f"loader state has {key}={state.get(key)!r} but this MQAR loader has {own[key]!r}")
        self.batches_consumed = int(state["batches_consumed"])


# ----------------------------------------------------------------------------------------------
# Needle in a haystack

NEEDLE_WORDS = (
    "amber", "anchor", "badger", "bamboo", "beacon", "cactus", "canyon", "cobalt", "comet", "copper",
    "cricket", "dolphin", "ember", "falcon", "fennel", "glacier", "granite", "harbor", "hazel", "heron",
    "indigo", "jasmine", "juniper", "kettle", "lantern", "lemon", "magnet", "maple", "meadow", "nickel",
    "orchid", "otter", "pebble", "pepper", "quartz", "raven", "saffron", "salmon", "tulip", "walnut",
)  # fmt: skip


class NeedleTask:
    """Needle-in-a-haystack rows for a tokenizer, filler from ``corpus_dir`` (default: the embedded corpus).

    A row is exactly ``context_len`` tokens: filler, with the needle inserted after
    ``round(depth * filler_len)`` filler tokens (moved back to the start of a word, by at most
    ``SNAP_TOKENS``), then the question, then the answer tokens.
    """

    def __init__(self, tokenizer, seed: int = 0, corpus_dir: str | Path = DEFAULT_CORPUS_DIR):
        self.tokenizer, self.seed, self.corpus_dir = tokenizer, seed, Path(corpus_dir)
        self._files = sorted(self.corpus_dir.glob("*.txt"))
        if not self._files:
            raise ValueError(f"needle corpus_dir={str(corpus_dir)!r} holds no .txt files")
        self._pool: list[int] = []  # filler tokens, grown a file at a time as longer rows are asked for
        self._next_file = 0

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _filler(self, rng: np.random.Generator, n_tokens: int) -> list[int]:
        """``n_tokens`` consecutive corpus tokens from a start among the first ``FILLER_STARTS``. The pool
        grows a file at a time, only as far as needed; the start does not depend on how far it has grown,
        so a row is the same whatever was asked before it."""
        while len(self._pool) < FILLER_STARTS + n_tokens and self._next_file < len(self._files):
            docs = list(read_txt(self._files[self._next_file]))
            self._pool += self._encode("\n\n".join(docs) + "\n\n")
            self._next_file += 1
        if len(self._pool) < n_tokens:
            have = len(self._pool)
            raise ValueError(f"needle: the corpus in {self.corpus_dir} has {have} tokens, fewer than {n_tokens}")
        start = int(rng.integers(0, min(FILLER_STARTS, len(self._pool) - n_tokens + 1)))
        return self._pool[start : start + n_tokens]

    def row(self, context_len: int, depth: float, index: int) -> tuple[list[int], list[int], int, int]:
        """Token ids of one row, its labels, where the needle starts and how many tokens it has."""
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"needle depth={depth} must be in [0, 1]")
        rng = np.random.default_rng([self.seed, context_len, round(depth * 1_000_000), index])
        word = NEEDLE_WORDS[rng.integers(len(NEEDLE_WORDS))]
        number = int(rng.integers(10_000, 100_000))
        needle = self._encode(f" The secret number of {word} is {number}. ")
        question = self._encode(f"\n\nQuestion: what is the secret number of {word}? Answer: the secret number is")
        answer = self._encode(f" {number}")
        filler_len = context_len - len(needle) - len(question) - len(answer)
        if filler_len < 0:
            need = context_len - filler_len
            raise ValueError(f"needle context_len={context_len} is too short: needle and question take {need} tokens")
        filler = self._filler(rng, filler_len)
        at = self._word_start(filler, round(depth * filler_len))
        prompt = filler[:at] + needle + filler[at:] + question
        labels = [IGNORE] * len(prompt) + answer
        return prompt + answer, labels, at, len(needle)

    def _word_start(self, filler: list[int], at: int) -> int:
        """The nearest filler position at or before ``at`` (at most 8 back) that starts a word, so the
        needle does not split one."""
        for pos in range(at, max(at - SNAP_TOKENS, 0) - 1, -1):
            if pos in (0, len(filler)) or self.tokenizer.decode(filler[pos : pos + 1])[:1].isspace():
                return pos
        return at

    def batch(self, batch_size: int, context_len: int, depth: float, index: int = 0) -> dict[str, torch.Tensor]:
        """Rows ``index * batch_size`` onwards: ``input_ids``, ``labels`` (batch, context_len); ``needle_start``,
        ``needle_len`` (batch,)."""
        rows = [self.row(context_len, depth, index * batch_size + i) for i in range(batch_size)]
        ids, labels, starts, lengths = zip(*rows, strict=True)
        return {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "needle_start": torch.tensor(starts, dtype=torch.long),
            "needle_len": torch.tensor(lengths, dtype=torch.long),
        }
