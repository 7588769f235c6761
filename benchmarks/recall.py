"""What each layer pattern buys on recall: train a pure Mamba-2, a 1:7 and a 1:3 hybrid and a pure
transformer on MQAR at the same parameter count and token budget, then measure MQAR accuracy vs
number of key-value pairs and vs sequence length.

    python benchmarks/recall.py --device cuda             # configs/recall/*.yaml as written (one GPU, minutes)
    python benchmarks/recall.py --small                   # CPU-sized variant, a few minutes on 2 cores

Writes to ``--out`` (default ``runs/recall`` or ``runs/recall-small``): ``results.json`` (parameter
counts, training time and loss, the full accuracy grid per model), ``mqar_comparison.png`` (one curve
per model), ``<name>/mqar.png`` (each model's grid), and each trained model under ``<name>/model``,
ready for ``hybridlm eval recall`` and ``hybridlm inspect``. Prints the tables.

Training is a plain loop (AdamW with the trainer's parameter groups and schedule, bf16 autocast on
CUDA) over ``hybridlm.eval.tasks.MQARLoader``. Each batch draws its number of pairs from the
training mixture; evaluation uses the held-out ``test`` split of the same generator. ``--small``
shrinks every config with the same overrides (``SMALL``) and then sets each one's ``mlp.d_ff`` so
that its parameter count matches the pure Mamba-2 model's, as the full configs are set by hand.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from hybridlm.config import ConfigError, RunConfig, load_run_config
from hybridlm.eval.plots import mqar_comparison_figure, plot_mqar, save
from hybridlm.eval.recall import evaluate_mqar, format_grid
from hybridlm.eval.tasks import MQARLoader, MQARTask
from hybridlm.model import HybridLM
from hybridlm.train.optim import lr_at, param_groups

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "recall"
NAMES = ("mamba2", "hybrid-1to7", "hybrid-1to3", "transformer")

FULL = {
    "overrides": [],
    "eval_seq_lens": [128, 256, 512, 1024],
    "eval_pairs": [4, 8, 16, 32, 64, 128],
    "samples": 256,
}
SMALL = {
    "overrides": [
        "model.vocab_size=64",
        "model.d_model=64",
        "model.init_std=0.1",
        "model.mamba.d_state=16",
        "model.mamba.head_dim=16",
        "model.mamba.chunk_size=16",
        "model.attention.n_heads=2",
        "train.seq_len=32",
        "train.micro_batch_size=32",
        "train.max_steps=600",
        "train.warmup_steps=30",
        "train.lr=3e-3",
        "data.sources=[{task: mqar, n_pairs: [2, 4, 8]}]",
    ],
    "eval_seq_lens": [32, 64, 128],
    "eval_pairs": [2, 4, 8, 16],
    "samples": 128,
}


def mlp_layers(run: RunConfig) -> int:
    return run.model.layers.count("-")


def count_parameters(run: RunConfig) -> int:
    with torch.device("meta"):
        return HybridLM(run.model).num_parameters()


def match_d_ff(path: Path, overrides: list[str], target: int) -> RunConfig:
    """Load ``path`` with ``overrides`` and the ``model.mlp.d_ff`` whose parameter count is nearest ``target``
    (the count is linear in d_ff: two probes give the slope)."""
    probe = [load_run_config(path, [*overrides, f"model.mlp.d_ff={d}"]) for d in (64, 128)]
    low, high = (count_parameters(r) for r in probe)
    d_ff = max(8, round(64 + (target - low) * 64 / (high - low)))
    return load_run_config(path, [*overrides, f"model.mlp.d_ff={d_ff}"])


def load_variant(names: list[str], small: bool, extra: list[str]) -> dict[str, RunConfig]:
    """The run configs of ``names``, shrunk and re-matched for ``--small``, then ``extra`` dotted overrides;
    the same token budget for all."""
    overrides = (SMALL if small else FULL)["overrides"] + extra
    target = count_parameters(load_run_config(CONFIG_DIR / f"{NAMES[0]}.yaml", overrides))  # pure Mamba-2
    runs: dict[str, RunConfig] = {}
    for name in names:
        path = CONFIG_DIR / f"{name}.yaml"
        runs[name] = match_d_ff(path, overrides, target) if small else load_run_config(path, overrides)
    budgets = {(t.max_steps, t.micro_batch_size, t.grad_accum, t.seq_len) for t in (r.train for r in runs.values())}
    if len(budgets) != 1:
        raise ConfigError(f"configs/recall: the configs must share the token budget, got {sorted(budgets)}")
    return runs


def train_mqar(model: HybridLM, run: RunConfig, pairs: list[int], device: torch.device, log_every: int) -> dict:
    """Train ``model`` on MQAR for ``run.train.max_steps`` steps; returns loss curve and wall time."""
    t = run.train
    task = MQARTask(run.model.vocab_size, t.seq_len, pairs, seed=run.seed)
    loader = MQARLoader(task, t.micro_batch_size)
    optimizer = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr, betas=t.betas)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    model.train()
    losses, curve, start = [], [], time.perf_counter()
    for step in range(t.max_steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, t)
        loss_sum = 0.0
        for _ in range(t.grad_accum):
            batch = {k: v.to(device) for k, v in loader.next_batch().items()}
            with autocast:
                loss = model(batch["input_ids"], labels=batch["labels"]).loss / t.grad_accum
            loss.backward()
            loss_sum += loss.item()
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss_sum)
        if (step + 1) % log_every == 0 or step + 1 == t.max_steps:
            recent = losses[-log_every:]
            curve.append({"step": step + 1, "loss": sum(recent) / len(recent)})
            elapsed = time.perf_counter() - start
            print(f"  step {step + 1:>6}/{t.max_steps}  loss {curve[-1]['loss']:.4f}  {elapsed:.0f}s", flush=True)
    model.eval()
    tail = losses[-max(1, len(losses) // 10) :]
    return {"seconds": time.perf_counter() - start, "final_loss": sum(tail) / len(tail), "loss_curve": curve}


def slice_table(results: dict, key: str, fixed_key: str, fixed: int, title: str) -> str:
    """Models (rows) × ``key`` values, at ``fixed_key == fixed``."""
    rows = [
        {"model": name, key: r[key], "accuracy": r["accuracy"]}
        for name, m in results["models"].items()
        for r in m["mqar"]["rows"]
        if r[fixed_key] == fixed
    ]
    return format_grid(rows, "model", key, title)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="the CPU-sized variant (overrides in SMALL)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--out", default=None, help="output directory (default runs/recall[-small])")
    parser.add_argument("--models", default=",".join(NAMES), help=f"comma-separated subset of {', '.join(NAMES)}")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="dotted override for every model, after --small's (repeatable), e.g. --set train.max_steps=1000",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--log-every", type=int, default=50)
    args = parser.parse_args(argv)

    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = sorted(set(names) - set(NAMES))
    if unknown:
        parser.error(f"--models: unknown {unknown}; choose from {', '.join(NAMES)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    variant = SMALL if args.small else FULL
    out = Path(args.out or ("runs/recall-small" if args.small else "runs/recall"))
    runs = load_variant(names, args.small, args.set)

    first = next(iter(runs.values())).train
    train_pairs = next(iter(runs.values())).data.sources[0].n_pairs  # the configs' MQAR source decides
    results: dict = {
        "variant": "small" if args.small else "full",
        "device": str(device),
        "tokens_per_model": first.max_steps * first.micro_batch_size * first.grad_accum * first.seq_len,
        "train_pairs": train_pairs,
        "models": {},
    }
    for name, run in runs.items():
        torch.manual_seed(run.seed)
        model = HybridLM(run.model).to(device)
        print(f"{name}: pattern {run.model.layers}, {model.num_parameters():,} parameters, d_ff {run.model.mlp.d_ff}")
        trained = train_mqar(model, run, train_pairs, device, args.log_every)
        rows = evaluate_mqar(
            model, run.model.vocab_size, variant["eval_seq_lens"], variant["eval_pairs"], variant["samples"], seed=1
        )
        vocab = run.model.vocab_size
        mqar = {"vocab_size": vocab, "chance": 1.0 / (vocab - vocab // 2), "rows": rows}
        results["models"][name] = {
            "pattern": run.model.layers,
            "parameters": model.num_parameters(),
            "d_ff": run.model.mlp.d_ff,
            "train_seconds": trained["seconds"],
            "final_loss": trained["final_loss"],
            "loss_curve": trained["loss_curve"],
            "mqar": mqar,
        }
        (out / name).mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out / name / "model")
        plot_mqar(mqar, out / name / "mqar.png")
        print(format_grid(rows, "seq_len", "n_pairs", f"{name}: MQAR accuracy; columns: n_pairs") + "\n")

    seq_len = first.seq_len
    pairs_at = sorted(train_pairs)[len(train_pairs) // 2]
    print(slice_table(results, "n_pairs", "seq_len", seq_len, f"MQAR accuracy at seq_len {seq_len}; columns: n_pairs"))
    print()
    print(slice_table(results, "seq_len", "n_pairs", pairs_at, f"MQAR accuracy at {pairs_at} pairs; columns: seq_len"))
    summary = {n: m["mqar"] for n, m in results["models"].items()}
    save(mqar_comparison_figure(summary, seq_len, pairs_at), out / "mqar_comparison.png")
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {out / 'results.json'} and {out / 'mqar_comparison.png'}")
    for name, m in results["models"].items():
        print(f"{name:>12}: {m['parameters']:,} params, {m['train_seconds']:.0f}s, final loss {m['final_loss']:.3f}")
    return 0 if all(math.isfinite(m["final_loss"]) for m in results["models"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
