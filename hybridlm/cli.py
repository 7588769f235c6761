"""The ``hybridlm`` command: thin subcommands that parse arguments, call the package, print."""

from __future__ import annotations

import argparse
import logging
import sys

import torch

from hybridlm.config import ConfigError, ModelConfig, RunConfig, load_run_config
from hybridlm.flops import flops_per_token, inference_state_bytes
from hybridlm.pattern import SUBLAYER_KINDS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hybridlm", description="Train hybrid Mamba-Transformer language models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="layer table, parameters, FLOPs, inference state and kernels of a config")
    p.add_argument("config", nargs="?", help="run config YAML (default: built-in defaults)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.d_model=512")
    p.set_defaults(func=_info)

    p = sub.add_parser("prepare", help="tokenize the data section of a run config into packed shards")
    p.add_argument("config", nargs="?")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=_prepare)

    p = sub.add_parser("train", help="train (same as python train.py CONFIG ...)")
    p.add_argument("config", nargs="?")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=_train)

    p = sub.add_parser("generate", help="sample text from a checkpoint")
    p.add_argument("checkpoint", help="a save_pretrained directory or a run directory")
    p.add_argument("--prompt", default="The")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_generate)

    p = sub.add_parser("eval", help="evaluate a checkpoint")
    ev = p.add_subparsers(dest="suite", required=True)
    e = ev.add_parser("recall", help="MQAR and needle-in-a-haystack recall by context length, pairs and depth")
    e.add_argument("checkpoint")
    e.add_argument("--out", default=None, help="output directory (default: CHECKPOINT/recall)")
    e.add_argument("--tasks", default=None, help="mqar,needle (default: mqar, plus needle with a tokenizer)")
    e.add_argument("--seq-lens", default="64,128,256,512")
    e.add_argument("--n-pairs", default="4,8,16,32,64")
    e.add_argument("--samples", type=int, default=64)
    e.add_argument("--mqar-vocab", type=int, default=None, help="MQAR vocabulary (default: the model's)")
    e.add_argument("--needle-lengths", default="256,512,1024,2048")
    e.add_argument("--depths", default="0,0.25,0.5,0.75,1")
    e.add_argument("--needle-samples", type=int, default=8)
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--device", default=None)
    e.set_defaults(func=_eval_recall)

    p = sub.add_parser("inspect", help="per-token SSM selectivity, state and attention of a checkpoint on a text")
    p.add_argument("checkpoint")
    text = p.add_mutually_exclusive_group(required=True)
    text.add_argument("--text")
    text.add_argument("--text-file")
    p.add_argument("--out", default=None, help="output directory (default: CHECKPOINT/inspect)")
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--chunk-size", type=int, default=256, help="tokens per streamed chunk (bounds memory)")
    p.add_argument("--keep-states", action="store_true", help="also write every per-token SSM state")
    p.add_argument("--device", default=None)
    p.set_defaults(func=_inspect)

    p = sub.add_parser("bench", help="training / decode throughput against mamba_ssm, HF Bamba / Llama, a transformer")
    p.add_argument("config", nargs="?")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--shapes", default="8x4096,2x16384,1x32768", help="batch x seq list")
    p.add_argument("--systems", default=None, help="comma list (default: every importable system)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--decode", action="store_true", help="also time generation after a long prompt")
    p.add_argument("--decode-prompt", type=int, default=32768)
    p.add_argument("--decode-tokens", type=int, default=256)
    p.add_argument("--longest", action="store_true", help="search the longest single sequence that trains (GPU)")
    p.add_argument(
        "--ablate",
        nargs="?",
        const="all",
        metavar="LEVERS",
        help="also hybridlm with each lever off in turn: all (no value) or a comma list, e.g. cuda_graph,swiglu, "
        "or the Mamba-2 mixer's own choices by name (MixerKernels' fields, e.g. own_conv_bwd)",
    )
    p.add_argument("--out", default="benchmarks/results/bench.jsonl")
    p.set_defaults(func=_bench)

    p = sub.add_parser("convert", help="convert to / from Hugging Face transformers formats")
    conv = p.add_subparsers(dest="direction", required=True)
    c = conv.add_parser("to-hf", help="export a hybridlm checkpoint as a native transformers model")
    c.add_argument("checkpoint")
    c.add_argument("out")
    c.add_argument("--arch", default=None, help="bamba, nemotron_h, granitemoehybrid, jamba, mamba2, mamba, llama")
    c.set_defaults(func=_to_hf)
    c = conv.add_parser("from-hf", help="import a transformers (or mamba_ssm) checkpoint")
    c.add_argument("hf_dir")
    c.add_argument("out")
    c.set_defaults(func=_from_hf)

    args = parser.parse_args(argv)
    if getattr(args, "config", None) and "=" in args.config:  # no config file, only overrides
        args.overrides, args.config = [args.config, *args.overrides], None
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args) or 0
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _info(args: argparse.Namespace) -> None:
    run = load_run_config(args.config, args.overrides)
    print(format_info(run))


def format_info(run: RunConfig) -> str:
    """The text ``hybridlm info`` prints."""
    from hybridlm import ops
    from hybridlm.model import HybridLM

    cfg, seq_len = run.model, run.train.seq_len
    with torch.device("meta"):
        model = HybridLM(cfg)
    lines = [f"pattern ({len(cfg.layers)} sub-layers): {cfg.layers}", ""]
    lines.append(f"{'idx':>4}  {'kind':<10} {'params':>12}")
    by_kind = {kind: 0 for kind in SUBLAYER_KINDS.values()}
    for i, block in enumerate(model.layers):
        n = sum(p.numel() for p in block.parameters())
        kind = _kind_name(cfg, block.kind)
        by_kind[SUBLAYER_KINDS[block.kind]] += n
        lines.append(f"{i:>4}  {kind:<10} {n:>12,}")
    embed = model.embed_tokens.weight.numel()
    head = 0 if cfg.tie_embeddings else model.lm_head.weight.numel()
    total = model.num_parameters()
    lines += ["", "parameters by kind:"]
    for kind, n in by_kind.items():
        if n:
            lines.append(f"  {kind:<12} {n:>14,}")
    lines.append(f"  {'embedding':<12} {embed:>14,}" + ("  (tied with lm_head)" if cfg.tie_embeddings else ""))
    if head:
        lines.append(f"  {'lm_head':<12} {head:>14,}")
    lines.append(f"  {'total':<12} {total:>14,}")

    flops = flops_per_token(cfg, seq_len)
    lines += ["", f"training FLOPs per token at seq_len {seq_len} (forward + backward):"]
    for kind, f in flops.items():
        if f:
            lines.append(f"  {kind:<12} {f / 1e9:>12.4g} GFLOP")
    state = inference_state_bytes(cfg, seq_len)
    lines += [
        "",
        f"inference state per sequence at {seq_len} tokens (bf16):",
        f"  KV cache   {state['kv_cache'] / 2**20:>10.2f} MiB  (grows with length)",
        f"  SSM state  {state['ssm_state'] / 2**20:>10.2f} MiB  (constant)",
    ]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    lines += ["", f"kernels on this machine ({device.type}):"]
    for op, impl in ops.kernel_table(device).items():
        lines.append(f"  {op:<22} {impl}")
    return "\n".join(lines)


def _kind_name(cfg: ModelConfig, ch: str) -> str:
    return f"mamba{cfg.mamba.version}" if ch == "M" else SUBLAYER_KINDS[ch]


def _prepare(args: argparse.Namespace) -> None:
    from hybridlm.data.prepare import run_prepare

    print(run_prepare(args.config, args.overrides))


def _train(args: argparse.Namespace) -> int:
    from hybridlm.train import TrainingDiverged, run_train

    try:
        run_train(args.config, args.overrides)
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def _generate(args: argparse.Namespace) -> None:
    from hybridlm.generate import generate_text

    print(
        generate_text(
            args.checkpoint, args.prompt, args.max_new_tokens, args.temperature, args.top_p, args.top_k, args.seed
        )
    )


def _eval_recall(args: argparse.Namespace) -> None:
    from pathlib import Path

    from hybridlm.eval.recall import parse_values, run_eval_recall

    run_eval_recall(
        args.checkpoint,
        args.out or str(Path(args.checkpoint) / "recall"),
        tasks=args.tasks.split(",") if args.tasks else None,
        device=args.device,
        mqar_vocab_size=args.mqar_vocab,
        seq_lens=parse_values(args.seq_lens, int, "--seq-lens"),
        n_pairs=parse_values(args.n_pairs, int, "--n-pairs"),
        samples=args.samples,
        needle_lengths=parse_values(args.needle_lengths, int, "--needle-lengths"),
        depths=parse_values(args.depths, float, "--depths"),
        needle_samples=args.needle_samples,
        batch_size=args.batch_size,
        seed=args.seed,
    )


def _inspect(args: argparse.Namespace) -> None:
    from pathlib import Path

    from hybridlm.eval.inspect import run_inspect

    text = args.text if args.text is not None else Path(args.text_file).read_text()
    run_inspect(
        args.checkpoint,
        text,
        args.out or str(Path(args.checkpoint) / "inspect"),
        top_k=args.top_k,
        chunk_size=args.chunk_size,
        keep_states=args.keep_states,
        device=args.device,
    )


def _bench(args: argparse.Namespace) -> None:
    from pathlib import Path

    from hybridlm.bench import parse_ablate, parse_shapes, run_bench

    run_bench(
        args.config,
        args.overrides,
        parse_shapes(args.shapes),
        args.systems.split(",") if args.systems else None,
        args.warmup,
        args.steps,
        args.decode,
        Path(args.out),
        longest=args.longest,
        ablate=parse_ablate(args.ablate),
        decode_prompt=args.decode_prompt,
        decode_tokens=args.decode_tokens,
    )


def _to_hf(args: argparse.Namespace) -> None:
    from hybridlm.convert import export_to_hf

    print(export_to_hf(args.checkpoint, args.out, args.arch))


def _from_hf(args: argparse.Namespace) -> None:
    from hybridlm.convert import import_from_hf

    print(import_from_hf(args.hf_dir, args.out))


if __name__ == "__main__":
    sys.exit(main())
