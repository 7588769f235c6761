"""Where a training step's GPU time goes: torch.profiler over a few steps of one bench system.

    python benchmarks/profile_step.py configs/hybrid-500m.yaml --system hybridlm --shape 8x4096 --out prof/

Prints device time per kernel category (GEMM, SSD scan, conv, norms, attention, loss, optimizer, element-wise,
copies/casts) and the top kernels, both as milliseconds per step; writes the full kernel table and a Chrome trace
under ``--out``. Builds the system exactly as ``hybridlm bench`` does (same dtype policy and optimizer).

``--graph`` profiles the step the bench times for hybridlm: forward and backward replayed from CUDA graphs
(``--no-cast-once``: with autocast casting each weight itself); without it the step runs eagerly, each kernel
launched from Python. The gap between wall and kernel time is then the host's (eager) or the GPU's own, between
one kernel and the next (graphed).

``--decode`` profiles one generated token instead (hybridlm systems, bf16 weights, after a prompt of the shape's
length): when the wall time per step is far above the kernels' time, the step is bound by launches from Python.

``--host`` asks where the host's time goes instead: the time to issue the steps (before synchronising) against the
wall time (equal: the GPU waits on Python), then cProfile over the steps, its self time summed by package (triton,
mamba_ssm, torch, hybridlm, ...; "built-in" holds C++ calls, including the final synchronise) and the top
functions; the stats go to ``--out`` as a ``.pstats`` file. cProfile slows Python down, so read the shares, not
the absolute times.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import re
import time
from collections import defaultdict
from pathlib import Path

import torch

from hybridlm import ops
from hybridlm.bench import SYSTEMS, _autocast, _decode_model, parse_shapes, uses_training_graph
from hybridlm.config import load_run_config
from hybridlm.model import HybridLM, InferenceCache
from hybridlm.train.graphed_step import GraphedTraining

# First matching pattern wins; matched against the lower-cased kernel name.
CATEGORIES = [
    ("optimizer", r"adam|multi_tensor"),
    ("attention", r"flash|fmha|attention|sdpa"),
    ("ssd scan", r"chunk_scan|chunk_state|state_passing|bmm_chunk|chunk_cumsum|ssd"),
    ("selective scan", r"selective_scan|selective_state"),
    ("conv1d", r"conv1d|causal_conv"),
    ("norm", r"layer_norm|rms|_norm_|rsqrt|pow_sum"),  # the last two: Inductor's add + RMSNorm kernels
    ("rotary", r"_cos_|_sin_"),  # Inductor's rotary kernels (their names also hold "cat")
    ("loss", r"log_softmax|nll_loss|cross_entropy|softmax"),
    ("gemm", r"gemm|nvjet|cutlass|sm90_xmma|matmul|ampere|hopper|cublas"),
    ("copy/cast", r"copy|cast|to_copy|cat|fill"),
    ("element-wise", r"elementwise|vectorized|unrolled|pointwise|triton_poi"),
    ("reduce", r"reduce|sum|triton_red"),
]


PACKAGES = {"triton", "mamba_ssm", "causal_conv1d", "flash_attn", "einops", "deepspeed", "transformers", "torch"}
PACKAGES |= {"hybridlm", "benchmarks"}


def package_of(filename: str) -> str:
    """The package a profiled function belongs to: the outermost known package directory in its path (counted
    from the last site-packages, if any: mamba_ssm/ops/triton/ is mamba_ssm's), "built-in" for C functions
    (cProfile's "~"), else "other"."""
    if filename == "~":
        return "built-in"
    parts = Path(filename).parts
    for marker in ("site-packages", "dist-packages"):
        if marker in parts:
            parts = parts[len(parts) - parts[::-1].index(marker) :]
    return next((part for part in parts if part in PACKAGES), "other")


def host_profile(step, steps: int, synchronize, out: Path, name: str, top: int) -> None:
    """Print host (issue) vs wall time per step, then cProfile's self time per package and top functions."""
    start = time.perf_counter()
    for _ in range(steps):
        step()
    issued_ms = (time.perf_counter() - start) * 1000 / steps
    synchronize()
    wall_ms = (time.perf_counter() - start) * 1000 / steps
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        step()
    synchronize()
    profiler.disable()
    stats = pstats.Stats(profiler)
    stats.dump_stats(str(out / f"{name}.host.pstats"))
    by_package: dict[str, float] = defaultdict(float)
    for (filename, _, _), (_, _, self_s, _, _) in stats.stats.items():
        by_package[package_of(filename)] += self_s * 1000 / steps
    total = sum(by_package.values())
    print(f"\n{name}: issuing a step takes {issued_ms:.1f} ms of host time, the step {wall_ms:.1f} ms of wall time")
    print(f"under cProfile, {total:.1f} ms of Python per step; self time by package:")
    for package, ms in sorted(by_package.items(), key=lambda kv: -kv[1]):
        print(f"  {package:14s} {ms:8.1f} ms  {ms / total:6.1%}")
    print(f"top {top} functions by self time (ms per step, calls per step):")
    rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:top]
    for (filename, line, function), (_, calls, self_s, cum_s, _) in rows:
        where = function if filename == "~" else f"{Path(filename).name}:{line}({function})"
        print(f"  {self_s * 1000 / steps:8.2f} self {cum_s * 1000 / steps:8.2f} cum {calls / steps:7g}x  {where[:90]}")


def category(kernel: str) -> str:
    name = kernel.lower()
    return next((cat for cat, pattern in CATEGORIES if re.search(pattern, name)), "other")


def train_step(
    system, run, batch: int, seq_len: int, device: torch.device, graph: bool = False, cast_once: bool = True
):
    model = system.build(run.model).to(device)
    if uses_training_graph(model, device, graph):
        GraphedTraining(model, cast_once=cast_once)
    elif graph:
        raise SystemExit(f"--graph: {system.name} on {device} has no graphed training step")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    input_ids = torch.randint(0, run.model.vocab_size, (batch, seq_len), device=device)

    def step() -> None:
        with _autocast(device):
            loss = system.loss(model, input_ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def decode_step(system, run, batch: int, prompt_len: int, args, device):
    model = _decode_model(system, run.model, device)
    if not isinstance(model, HybridLM):
        raise SystemExit(f"--decode profiles hybridlm systems only, not {system.name}")
    cache = InferenceCache(max_seqlen=prompt_len + 2 * (args.warmup + args.steps) + 1)
    prompt = torch.randint(0, run.model.vocab_size, (batch, prompt_len), device=device)
    with torch.no_grad():
        token = model(prompt, cache=cache, num_last_tokens=1).logits[:, -1:].argmax(-1)

    @torch.no_grad()
    def step() -> None:
        nonlocal token
        token = model(token, cache=cache).logits[:, -1:].argmax(-1)

    return step


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--system", default="hybridlm", choices=list(SYSTEMS))
    p.add_argument("--shape", default="8x4096")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--out", default="prof")
    p.add_argument("--decode", action="store_true", help="profile one decode step after a prompt of the shape")
    p.add_argument("--graph", action="store_true", help="replay forward and backward from CUDA graphs, as the bench")
    p.add_argument("--no-cast-once", action="store_true", help="with --graph: autocast casts each weight as it is used")
    p.add_argument("--host", action="store_true", help="profile the host's Python instead of the kernels")
    p.add_argument("--ops", action="store_true", help="also the top torch ops by kernel time, with their input shapes")
    p.add_argument("--launches", action="store_true", help="also which op, called from where, launches most kernels")
    p.add_argument("--device", default="cuda", help="cpu only to smoke-test this script: there are no kernels")
    args = p.parse_args(argv)

    run = load_run_config(args.config, args.overrides)
    ops.set_kernels(run.kernels, run.reference_ops)
    ((batch, seq_len),) = parse_shapes(args.shape)
    system = SYSTEMS[args.system]
    device = torch.device(args.device)
    step = (
        decode_step(system, run, batch, seq_len, args, device)
        if args.decode
        else train_step(system, run, batch, seq_len, device, args.graph, not args.no_cast_once)
    )

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    synchronize()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.host:
        host_profile(step, args.steps, synchronize, out, f"{args.system}-{args.shape}", args.top)
        return
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    synchronize()
    wall_ms = (time.perf_counter() - start) * 1000 / args.steps
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(args.steps):
            step()
        synchronize()

    prof.export_chrome_trace(str(out / f"{args.system}-{args.shape}.trace.json"))
    kernels: dict[str, float] = defaultdict(float)  # kernel name -> device ms per step
    counts: dict[str, int] = defaultdict(int)
    for event in kernel_events(prof.events()):
        kernels[event.name] += event.device_time / 1000 / args.steps
        counts[event.name] += 1
    by_category: dict[str, float] = defaultdict(float)
    for name, ms in kernels.items():
        by_category[category(name)] += ms
    total = sum(kernels.values())
    top = sorted(kernels.items(), key=lambda kv: -kv[1])
    with (out / f"{args.system}-{args.shape}.kernels.tsv").open("w") as f:
        f.write("ms_per_step\tcalls_per_step\tcategory\tkernel\n")
        for name, ms in top:
            f.write(f"{ms:.3f}\t{counts[name] / args.steps:g}\t{category(name)}\t{name}\n")
    launches = sum(counts.values()) / args.steps
    mode = "decode step" if args.decode else "graphed training step" if args.graph else "training step"
    print(f"\n{args.system} {args.shape} {mode}: wall {wall_ms:.1f} ms, kernels {total:.1f} ms, {launches:g} launches")
    for name, ms in top[: args.top]:
        print(f"  {ms:8.2f} ms {counts[name] / args.steps:5g}x  {category(name):13s} {name[:110]}")
    print("category        ms/step   share")
    for cat, ms in sorted(by_category.items(), key=lambda kv: -kv[1]):
        print(f"{cat:14s} {ms:8.1f}  {ms / total:6.1%}")
    if args.ops:
        op_table(step, synchronize, args.top)
    if args.launches:
        launch_table(step, synchronize, args.top)


def kernel_events(events) -> list:
    """The profiler's device events that are kernels (or copies, memsets). With CPU activity recorded, a
    ``record_function`` range (the optimizer's step) also appears on the device timeline, spanning the kernels
    it launched: counting it would count those kernels twice. torch's own tables skip it too."""
    return [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA and not e.is_user_annotation]


def op_table(step, synchronize, top: int) -> None:
    """Which torch op, with which input shapes, launched the kernels: the way to tell one layer's copy from
    another's (a separate pass: recording shapes slows the host down)."""
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA],
        record_shapes=True,
    ) as prof:
        step()
        synchronize()
    averages = prof.key_averages(group_by_input_shape=True)
    rows = sorted((e for e in averages if e.self_device_time_total > 0), key=lambda e: -e.self_device_time_total)
    print("\n    ms  calls  op (input shapes)")
    for e in rows[:top]:
        print(f"{e.self_device_time_total / 1000:6.2f} {e.count:6d}  {e.key} {e.input_shapes}")


def launch_table(step, synchronize, top: int) -> None:
    """Which torch op, called from which line of Python, launched the most kernels (memsets and fills
    included): the step's small launches, each of which costs its gap between kernels even in a CUDA graph, by
    origin. Profile the eager step (no ``--graph``): a graph's replay hides its kernels' callers. Triton kernels
    launched from Python count under the autograd function they ran in (``ConvSSDScanBackward``: the mixer's
    backward kernels); the kernel table has them by name."""
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA], with_stack=True
    ) as prof:
        step()
        synchronize()
    launches: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0, 0.0])
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CPU or not event.kernels:
            continue
        # torch's own frames skipped; the autograd engine runs backward ops from C++, with no Python stack
        caller = next((frame for frame in event.stack if "site-packages/torch/" not in frame), "(no Python caller)")
        row = launches[(event.name, caller)]
        row[0] += len(event.kernels)
        row[1] += sum(kernel.duration for kernel in event.kernels) / 1000
    print("\nlaunches      ms  op  <- first caller outside torch")
    for (name, caller), (count, ms) in sorted(launches.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"{count:8d} {ms:7.2f}  {name}  <- {caller[:110]}")


if __name__ == "__main__":
    main()
