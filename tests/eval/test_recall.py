"""Recall scoring, its table, JSON and plots, the checkpoint entry point, and MQAR learnability."""

from __future__ import annotations

import json
import math

import matplotlib.image
import pytest
import torch
from eval_stubs import MQAROracle, NextTokenPeeker, RandomGuesser

from hybridlm.eval.plots import mqar_figure, needle_figure
from hybridlm.eval.recall import (
    evaluate_mqar,
    evaluate_needle,
    evaluate_recall,
    format_recall_table,
    parse_values,
    run_eval_recall,
    write_recall_report,
)
from hybridlm.eval.tasks import MQARLoader, MQARTask
from hybridlm.model import HybridLM

SEQ_LENS, N_PAIRS = (32, 64), (2, 4, 8, 16)  # (32, 16) does not fit: 7 cells


def test_an_oracle_reading_the_prompt_scores_one():
    rows = evaluate_mqar(MQAROracle(64), 64, SEQ_LENS, N_PAIRS, samples=20, batch_size=8)
    fitting = [(32, 2), (32, 4), (32, 8), (64, 2), (64, 4), (64, 8), (64, 16)]
    assert [(r["seq_len"], r["n_pairs"]) for r in rows] == fitting
    assert all(r["accuracy"] == 1.0 and r["exact"] == 1.0 for r in rows)
    assert all(r["sequences"] == 20 and r["queries"] == 20 * r["n_pairs"] for r in rows)


def test_a_random_model_scores_chance():
    vocab = 64
    rows = evaluate_mqar(RandomGuesser(vocab), vocab, (64,), (16,), samples=128, batch_size=32)
    queries = rows[0]["queries"]
    p = 1 / vocab  # a random argmax over the whole vocabulary
    assert abs(rows[0]["accuracy"] - p) < 4 * math.sqrt(p * (1 - p) / queries)
    assert rows[0]["exact"] == 0.0


def test_needle_scores_exact_match_of_the_whole_answer(tokenizer):
    vocab = len(tokenizer)
    depths = (0.0, 0.5, 1.0)
    right = evaluate_needle(NextTokenPeeker(vocab), tokenizer, (96, 128), depths, samples=3, batch_size=2)
    assert [(r["context_len"], r["depth"]) for r in right] == [(n, d) for n in (96, 128) for d in depths]
    assert all(r["accuracy"] == 1.0 and r["samples"] == 3 for r in right)

    class AllButLast(NextTokenPeeker):  # right on every answer token but the last
        def forward(self, input_ids):
            out = super().forward(input_ids)
            out.logits[:, -2] = torch.roll(out.logits[:, -2], 1, dims=-1)
            return out

    wrong = evaluate_needle(AllButLast(vocab), tokenizer, (96,), depths, samples=2, batch_size=2)
    assert all(r["accuracy"] == 0.0 for r in wrong)


def test_table_json_and_plots_have_the_right_axes_and_counts(tokenizer, tmp_path):
    oracle = NextTokenPeeker(len(tokenizer))
    results = evaluate_recall(
        oracle,
        tokenizer,
        mqar_vocab_size=64,
        seq_lens=SEQ_LENS,
        n_pairs=N_PAIRS,
        samples=4,
        needle_lengths=(96, 128),
        depths=(0.0, 0.5, 1.0),
        needle_samples=1,
        batch_size=4,
    )
    table = format_recall_table(results).splitlines()
    assert table[1].split() == ["seq_len", "2", "4", "8", "16"]
    assert table[2].split() == ["32", "1.000", "1.000", "1.000", "-"]  # 16 pairs do not fit in 32 tokens
    assert table[3].split() == ["64", "1.000", "1.000", "1.000", "1.000"]
    assert table[6].split() == ["context_len", "0", "0.5", "1"] and len(table) == 9

    by_pairs, by_len = mqar_figure(results["mqar"]).axes
    assert by_pairs.get_xlabel() == "key-value pairs" and by_len.get_xlabel() == "sequence length"
    assert len(by_pairs.lines) == len(SEQ_LENS) + 1 and len(by_len.lines) == len(N_PAIRS) + 1  # + chance
    assert list(by_pairs.lines[0].get_xdata()) == [2, 4, 8]  # seq_len 32: the cells that fit
    heat = needle_figure(results["needle"]["rows"]).axes[0]
    assert heat.images[0].get_array().shape == (3, 2)  # depths × lengths
    assert heat.get_xlabel() == "context length (tokens)" and heat.get_ylabel() == "needle depth"

    files = write_recall_report(results, tmp_path)
    saved = json.loads((tmp_path / "recall.json").read_text())
    assert len(saved["mqar"]["rows"]) == 7 and len(saved["needle"]["rows"]) == 6
    for key in ("mqar_png", "needle_png"):
        assert matplotlib.image.imread(files[key]).ndim == 3


def test_recall_refuses_bad_requests_before_any_work(tokenizer):
    with pytest.raises(ValueError, match="unknown"):
        evaluate_recall(MQAROracle(64), tasks=("mqar", "haystack"))
    with pytest.raises(ValueError, match="needs a tokenizer"):
        evaluate_recall(MQAROracle(64), tasks=("needle",))

    class Counting(NextTokenPeeker):
        calls = 0

        def forward(self, input_ids):
            Counting.calls += 1
            return super().forward(input_ids)

    with pytest.raises(ValueError, match="context_len=20 is too short"):
        evaluate_recall(Counting(len(tokenizer)), tokenizer, mqar_vocab_size=64, needle_lengths=(128, 20))
    assert Counting.calls == 0
    with pytest.raises(ValueError, match="no \\(seq_len, n_pairs\\)"):
        evaluate_mqar(MQAROracle(64), 64, seq_lens=(8,), n_pairs=(4,))


def test_cli_lists_parse_or_name_the_option():
    assert parse_values("64, 128", int, "--seq-lens") == [64, 128]
    assert parse_values("0,0.5,1", float, "--depths") == [0.0, 0.5, 1.0]
    with pytest.raises(ValueError, match="--seq-lens='64,x'"):
        parse_values("64,x", int, "--seq-lens")


def test_eval_recall_on_a_checkpoint_directory(tiny_config, tokenizer, tmp_path):
    run_dir = tmp_path / "run"
    HybridLM(tiny_config(vocab_size=len(tokenizer))).save_pretrained(run_dir / "model")
    tokenizer.save_pretrained(str(run_dir / "model"))
    out = run_eval_recall(
        str(run_dir),
        str(tmp_path / "out"),
        seq_lens=(16,),
        n_pairs=(2,),
        samples=2,
        needle_lengths=(128,),
        depths=(0.5,),
        needle_samples=1,
        device="cpu",
    )
    assert set(out) == {"mqar", "needle", "files"}  # the tokenizer beside the weights enables the needle
    saved = json.loads((tmp_path / "out" / "recall.json").read_text())
    assert saved["checkpoint"].endswith("model") and saved["mqar"]["vocab_size"] == len(tokenizer)


@pytest.mark.slow
def test_a_tiny_hybrid_learns_mqar_well_above_chance():
    """A few hundred AdamW steps on a 2-mixer hybrid (Mamba-2 + attention): recall well above chance."""
    from hybridlm.config import ModelConfig

    vocab = 32
    cfg = ModelConfig.from_dict(
        {
            "vocab_size": vocab,
            "d_model": 64,
            "pattern": "M*",
            "init_std": 0.1,
            "vocab_pad_multiple": 8,
            "mamba": {"d_state": 16, "head_dim": 16, "chunk_size": 16},
            "attention": {"n_heads": 2},
        }
    )
    torch.manual_seed(0)
    model = HybridLM(cfg)
    loader = MQARLoader(MQARTask(vocab, 32, [2, 4], seed=0), micro_batch_size=32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(300):
        batch = loader.next_batch()
        loss = model(batch["input_ids"], labels=batch["labels"]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    rows = evaluate_mqar(model.eval(), vocab, (32,), (4,), samples=64, batch_size=32)
    chance = MQARTask(vocab, 32, 4).chance
    assert rows[0]["accuracy"] > 5 * chance, rows
