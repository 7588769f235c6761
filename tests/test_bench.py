"""The bench's bookkeeping: FLOPs per token, tokens counted, the table, jsonl rows, OOM and skipped systems.
Timings are measured but never asserted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from hybridlm import bench
from hybridlm.config import ModelConfig

# d_model 64, one Mamba-2 block and one attention block, each followed by a SwiGLU MLP of 128.
BENCH_MODEL = {
    "vocab_size": 100,  # padded to 128
    "d_model": 64,
    "pattern": "M-*-",
    "mamba": {"version": 2, "d_state": 16, "d_conv": 4, "expand": 2, "head_dim": 16, "ngroups": 1, "chunk_size": 16},
    "attention": {"n_heads": 4},
    "mlp": {"d_ff": 128, "activation": "swiglu"},
}
SEQ = 32


def _hand_forward_flops() -> dict[str, float]:
    """Forward FLOPs per token at SEQ, written out from the conventions in hybridlm/flops.py."""
    d, d_inner, n_heads, d_state, head_dim, d_conv, q = 64, 128, 8, 16, 16, 4, 16
    conv_channels = d_inner + 2 * d_state  # x, B, C
    mamba = (
        2 * d * (d_inner + conv_channels + n_heads)  # in_proj: z, xBC, dt
        + 2 * conv_channels * d_conv  # depthwise conv
        + 2 * n_heads * (q + 1) / 2 * (d_state + head_dim)  # intra-chunk dual form
        + 2 * 2 * d_inner * d_state  # state write + read
        + 2 * d_inner * d  # out_proj
    )
    attn_heads, attn_head_dim = 4, 16
    attention = 2 * d * attn_head_dim * 4 * attn_heads + 2 * 2 * attn_heads * attn_head_dim * (SEQ + 1) / 2
    mlp = 2 * 3 * d * 128
    lm_head = 2 * d * 128
    return {"M": mamba, "*": attention, "-": mlp, "lm_head": lm_head}


def _config_file(tmp_path: Path) -> str:
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump({"model": BENCH_MODEL}))
    return str(path)


def _row(system: str, batch: int, seq: int, tokens_per_s: float | None, status: str = "ok") -> dict:
    return {
        "system": system,
        "mode": "train",
        "batch": batch,
        "seq_len": seq,
        "status": status,
        "tokens_per_s": tokens_per_s,
        "mfu": None,
        "peak_memory_bytes": None,
    }


def test_flops_per_token_of_a_known_config_match_a_hand_count():
    cfg = ModelConfig.from_dict(BENCH_MODEL)
    f = _hand_forward_flops()
    hybrid = 3 * (f["M"] + f["*"] + 2 * f["-"] + f["lm_head"])
    transformer = 3 * (2 * f["*"] + 2 * f["-"] + f["lm_head"])  # '*-*-': same d_model, blocks and d_ff
    for name in ("hybridlm", "mamba_ssm", "hf-bamba"):
        assert bench.system_flops_per_token(bench.SYSTEMS[name], cfg, SEQ) == pytest.approx(hybrid, rel=1e-12)
    for name in ("hybridlm-transformer", "hf-llama"):
        assert bench.system_flops_per_token(bench.SYSTEMS[name], cfg, SEQ) == pytest.approx(transformer, rel=1e-12)


def test_transformer_twin_keeps_width_blocks_and_mlp():
    cfg = ModelConfig.from_dict(BENCH_MODEL)
    tcfg = bench.transformer_config(cfg)
    assert tcfg.layers == "*-*-"
    assert (tcfg.d_model, tcfg.d_ff, tcfg.padded_vocab_size) == (cfg.d_model, cfg.d_ff, cfg.padded_vocab_size)


def test_tokens_per_step_are_batch_times_seq_and_rate_is_the_median_step():
    out = bench.summarize_steps([1.0, 4.0, 2.0], batch=3, seq_len=32, flops=10.0, peak=1000.0)
    assert out["tokens_per_step"] == 96
    assert out["tokens_per_s"] == pytest.approx(96 / 2.0)
    assert out["mfu"] == pytest.approx(10.0 * 48 / 1000.0)
    assert bench.summarize_steps([1.0], 1, 8, 10.0, None)["mfu"] is None  # CPU: no peak, no MFU


def test_warmup_steps_run_but_are_not_timed():
    calls = []

    def loss_fn(model, input_ids):
        calls.append(input_ids.shape)
        return model(input_ids.float()).sum()

    seconds = bench.time_training_steps(
        torch.nn.Linear(4, 1), loss_fn, torch.ones(2, 4), warmup=2, steps=3, device=torch.device("cpu")
    )
    assert len(calls) == 5 and len(seconds) == 3


def test_table_has_a_header_one_line_per_row_and_ratio_from_the_rows():
    rows = [
        _row("hybridlm", 8, 64, 3000.0),
        _row("mamba_ssm", 8, 64, 1500.0),
        _row("hybridlm", 2, 128, 1000.0),
        _row("mamba_ssm", 2, 128, 4000.0),
        _row("hf-bamba", 8, 64, None, status="OOM"),
        _row("hybridlm", 1, 256, 1296.6),
        _row("mamba_ssm", 1, 256, 1000.0),
    ]
    lines = bench.format_table(rows).splitlines()
    assert lines[0].split() == ["system", "mode", "batch", "x", "seq", "tokens/s", "MFU", "peak", "mem", "GiB"] + [
        "hybridlm/this"
    ]
    cells = [line.split() for line in lines[1:]]
    assert [(c[0], c[2]) for c in cells] == [(r["system"], f"{r['batch']}x{r['seq_len']}") for r in rows]
    assert [c[-1] for c in cells] == ["1.000", "2.000", "1.000", "0.250", "-", "1.000", "1.297"]
    assert cells[4][3] == "OOM"


def test_jsonl_rows_carry_every_field(tmp_path, capsys):
    out = tmp_path / "results" / "bench.jsonl"
    config = _config_file(tmp_path)
    rows = bench.run_bench(
        config, ["seed=1"], [(2, SEQ)], ["hybridlm", "hybridlm-transformer"], 0, 1, False, out, device="cpu"
    )
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["system"] for r in written] == ["hybridlm", "hybridlm-transformer"] == [r["system"] for r in rows]
    fields = {"time", "device", "torch", "mamba_ssm", "transformers", "git_commit", "config", "overrides", "warmup"}
    fields |= {"steps", "system", "mode", "batch", "seq_len", "tokens_per_step", "tokens_per_s", "mfu", "status"}
    fields |= {"peak_memory_bytes", "flops_per_token"}
    for r in written:
        assert fields <= set(r), fields - set(r)
        assert (r["device"], r["config"], r["overrides"], r["steps"]) == ("CPU", config, ["seed=1"], 1)
        assert r["tokens_per_step"] == 2 * SEQ and r["status"] == "ok" and r["tokens_per_s"] > 0
    assert "hybridlm-transformer  train" in capsys.readouterr().out
    bench.run_bench(config, [], [(1, SEQ)], ["hybridlm"], 0, 1, False, out, device="cpu")
    assert len(out.read_text().splitlines()) == 3  # appended, not overwritten


def test_out_of_memory_is_an_oom_row_not_a_crash(tmp_path, monkeypatch, capsys):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(bench, "time_training_steps", out_of_memory)
    out = tmp_path / "bench.jsonl"
    rows = bench.run_bench(_config_file(tmp_path), [], [(2, SEQ)], ["hybridlm"], 0, 1, False, out, device="cpu")
    assert [(r["status"], r["tokens_per_s"]) for r in rows] == [("OOM", None)]
    assert json.loads(out.read_text())["status"] == "OOM"
    assert capsys.readouterr().out.splitlines()[-1].split()[3] == "OOM"


def test_unimportable_system_is_skipped_with_a_note(tmp_path, monkeypatch, capsys):
    ghost = bench.System("ghost", "hybrid", "no_such_package_for_hybridlm_bench", bench.HybridLM, bench._hybridlm_loss)
    monkeypatch.setitem(bench.SYSTEMS, "ghost", ghost)
    out = tmp_path / "bench.jsonl"
    rows = bench.run_bench(
        _config_file(tmp_path), [], [(1, SEQ)], ["ghost", "hybridlm"], 0, 1, False, out, device="cpu"
    )
    assert [r["system"] for r in rows] == ["hybridlm"]
    assert "note: skipping ghost: no_such_package_for_hybridlm_bench is not importable" in capsys.readouterr().out


def test_longest_sequence_doubles_until_out_of_memory(monkeypatch):
    def fake_measure(system, cfg, batch, seq_len, warmup, steps, device, memory_saving):
        assert memory_saving  # the search measures what fits with checkpointing and the chunked loss
        status = "OOM" if seq_len > 256 else "ok"
        return {"system": system.name, "mode": "train", "batch": batch, "seq_len": seq_len, "status": status}

    monkeypatch.setattr(bench, "measure_training", fake_measure)
    cfg = ModelConfig.from_dict(BENCH_MODEL)
    row = bench.longest_sequence(bench.SYSTEMS["hybridlm"], cfg, 32, torch.device("cpu"))
    assert (row["mode"], row["batch"], row["seq_len"]) == ("longest", 1, 256)
    assert bench.longest_sequence(bench.SYSTEMS["hybridlm"], cfg, 512, torch.device("cpu")) is None


@pytest.mark.parametrize(
    "shapes, systems, match",
    [
        ([(2, 24)], ["hybridlm"], "multiple of model.mamba.chunk_size=16"),
        ([(2, SEQ)], ["nope"], "unknown nope"),
    ],
)
def test_bad_arguments_fail_before_any_work(tmp_path, shapes, systems, match):
    out = tmp_path / "bench.jsonl"
    with pytest.raises(ValueError, match=match):
        bench.run_bench(_config_file(tmp_path), [], shapes, systems, 0, 1, False, out, device="cpu")
    assert not out.exists()


def test_parse_shapes():
    assert bench.parse_shapes("8x4096, 2x16384") == [(8, 4096), (2, 16384)]
    with pytest.raises(ValueError, match="'8x' is not BATCHxSEQ"):
        bench.parse_shapes("8x")


def test_decode_rows_count_generated_tokens_at_batch_1_and_16(tmp_path):
    out = tmp_path / "bench.jsonl"
    systems = ["hybridlm", "hybridlm-transformer", "hf-llama"]
    config = _config_file(tmp_path)
    rows = bench.run_bench(
        config, [], [(1, SEQ)], systems, 0, 1, True, out, decode_prompt=8, decode_tokens=32, device="cpu"
    )
    decode = [r for r in rows if r["mode"] == "decode"]
    shapes = [(r["system"], r["batch"], r["seq_len"], r["tokens_per_step"]) for r in decode]
    assert shapes == [(s, b, 8, b * 32) for s in ("hybridlm", "hybridlm-transformer") for b in bench.DECODE_BATCHES]
    # the rate counts the 31 tokens after the first, over the time they added to the prefill: enough tokens that
    # their time stands above the timer's noise on a busy CPU (12 once came out "untimed" beside another test run)
    for r in decode:
        assert r["status"] == "ok" and r["cuda_graph"] is False  # no graphs on CPU
        assert r["tokens_per_s"] == pytest.approx(r["batch"] / (r["ms_per_step"] / 1e3))
        assert 0 < r["tokens_per_s_with_prefill"] * r["prefill_s"] < r["batch"] * 32


def test_decode_needs_two_new_tokens_to_time_a_step(tmp_path):
    out = tmp_path / "bench.jsonl"
    with pytest.raises(ValueError, match="--decode-tokens=1 must be >= 2"):
        bench.run_bench(_config_file(tmp_path), [], [], ["hybridlm"], 0, 1, True, out, decode_tokens=1, device="cpu")
    assert not out.exists()


def test_ablation_turns_each_lever_off_while_it_is_measured(monkeypatch):
    seen = []

    def fake_measure(
        system, cfg, batch, seq_len, warmup, steps, device, fused_optimizer=True, cuda_graph=True, cast_once=True
    ):
        seen.append((set(ops_dispatch._reference_ops), fused_optimizer, cuda_graph, cast_once))
        return {"system": system.name, "mode": "train", "batch": batch, "seq_len": seq_len, "status": "ok"}

    from hybridlm.ops import dispatch as ops_dispatch

    monkeypatch.setattr(bench, "measure_training", fake_measure)
    monkeypatch.setattr(bench, "training_graph_unsupported", lambda cfg, device, stage: None)  # as on a GPU
    rows = list(bench.ablation_rows(ModelConfig.from_dict(BENCH_MODEL), [(2, SEQ)], 0, 1, torch.device("cpu")))
    harness = [(set(), False, True, True), (set(), True, False, True), (set(), True, True, False)]
    assert seen == [({lever}, True, True, True) for lever in bench.LEVERS] + harness
    levers = [*bench.LEVERS, "fused_adamw", "cuda_graph", "cast_once"]
    assert [r["system"] for r in rows] == [f"hybridlm -{lever}" for lever in levers]
    assert [r["without"] for r in rows] == levers
    assert not ops_dispatch._reference_ops  # restored afterwards


def test_ablate_names_levers_and_skips_the_graph_where_there_is_none(monkeypatch):
    assert bench.parse_ablate(None) == ()
    assert bench.parse_ablate("all") == bench.ABLATIONS
    assert bench.parse_ablate("cuda_graph, swiglu") == ("cuda_graph", "swiglu")
    with pytest.raises(ValueError, match="--ablate: unknown lever graphs"):
        bench.parse_ablate("graphs")
    monkeypatch.setattr(bench, "measure_training", lambda *a, **k: {"status": "ok"})
    cfg = ModelConfig.from_dict(BENCH_MODEL)
    levers = ("cuda_graph", "swiglu", "cast_once")
    rows = list(bench.ablation_rows(cfg, [(2, SEQ)], 0, 1, torch.device("cpu"), levers))
    assert [r["without"] for r in rows] == ["swiglu"]  # on CPU the step has no graph to turn off


def test_ablate_turns_a_mixer_choice_off_for_its_rows_only(monkeypatch):
    from hybridlm.ops import conv_ssd

    seen = []

    def fake_measure(system, cfg, batch, seq_len, warmup, steps, device, **harness):
        seen.append(conv_ssd._default_kernels)
        return {"system": system.name, "status": "ok"}

    monkeypatch.setattr(bench, "measure_training", fake_measure)
    assert bench.parse_ablate("own_conv_bwd,swiglu") == ("own_conv_bwd", "swiglu")
    assert "own_conv_bwd" not in bench.parse_ablate("all")  # "all": the ops and the step's levers
    cfg = ModelConfig.from_dict(BENCH_MODEL)
    rows = list(bench.ablation_rows(cfg, [(2, SEQ)], 0, 1, torch.device("cpu"), ("own_conv_bwd", "swiglu")))
    assert [r["system"] for r in rows] == ["hybridlm -own_conv_bwd", "hybridlm -swiglu"]
    assert seen == [conv_ssd.MixerKernels(own_conv_bwd=False), conv_ssd.MixerKernels()]
    assert conv_ssd._default_kernels == conv_ssd.MixerKernels()  # restored afterwards


def test_mamba_ssm_anchor_is_not_run_where_its_int32_offsets_overflow():
    cfg = ModelConfig.from_dict(BENCH_MODEL)  # in_proj width 2*128 + 2*16 + 8 = 296
    anchor = bench.SYSTEMS["mamba_ssm"]
    assert bench.int32_fault(anchor, cfg, 1, 32) is None
    assert "2**31" in bench.int32_fault(anchor, cfg, 1, 2**31 // 296 + 1)
    assert bench.int32_fault(bench.SYSTEMS["hybridlm"], cfg, 1, 2**31) is None  # hybridlm copies such slices
    row = bench.measure_decode(anchor, cfg, 16, 2**31 // 296, 4, torch.device("cpu"))
    assert row["status"] == "skipped" and "2**31" in row["note"]


def test_memory_saving_mode_checkpoints_and_chunks_the_loss():
    model = bench.SYSTEMS["hybridlm"].build(ModelConfig.from_dict(BENCH_MODEL))
    assert bench.save_memory(model)
    assert (model.checkpoint_every, model.loss_chunk_tokens) == (1, bench.LOSS_CHUNK_TOKENS)
    assert not bench.save_memory(torch.nn.Linear(2, 2))  # a model with neither


def test_shapes_none_means_decode_only():
    assert bench.parse_shapes("none") == []
    assert bench.parse_shapes("8x4096, 1x32768") == [(8, 4096), (1, 32768)]


def test_a_named_commit_wins_over_the_checkouts(monkeypatch):
    monkeypatch.delenv("HYBRIDLM_GIT_COMMIT", raising=False)
    here = bench.git_commit()
    monkeypatch.setenv("HYBRIDLM_GIT_COMMIT", "abc123")
    assert bench.git_commit() == "abc123" != here
