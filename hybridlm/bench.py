"""``hybridlm bench``: training and decode throughput of hybridlm against the anchors, one table.

Every system is built with the same dimensions from one run config and measured in the same process:
``hybridlm`` (our hybrid, fused ops on CUDA), ``hybridlm-transformer`` (our ``*-`` pattern with the same
d_model, number of blocks and d_ff), and, when importable, ``mamba_ssm`` (``MambaLMHeadModel`` with
attention layers), ``hf-bamba`` (``BambaForCausalLM``) and ``hf-llama`` (``LlamaForCausalLM``).
Same dtype policy for all (bf16 autocast over fp32 parameters on CUDA, fp32 on CPU) and the same
optimizer (AdamW, fused on CUDA). MFU uses ``hybridlm.flops`` for every system: the hybrid config's
FLOPs per token for hybrid systems, the transformer config's for transformer systems.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import importlib.metadata
import json
import os
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hybridlm import ops
from hybridlm.config import ModelConfig, load_run_config, validate_model
from hybridlm.flops import flops_per_token, peak_flops
from hybridlm.model import HybridLM
from hybridlm.model.decoding import GraphedDecoder, graph_unsupported
from hybridlm.model.model import next_token_targets
from hybridlm.ops.conv_ssd import MixerKernels, mixer_kernels
from hybridlm.ops.dispatch import available
from hybridlm.train.graphed_step import GraphedTraining, training_graph_unsupported

DEFAULT_SHAPES = [(8, 4096), (2, 16384), (1, 32768)]  # (batch, seq_len)
DEFAULT_OUT = Path("benchmarks/results/bench.jsonl")
DECODE_BATCHES = (1, 16)
REFERENCE_SYSTEM = "hybridlm"  # the ratio column is this system's tokens/s over each row's
# The doubling search stops here (twice the 131072-token target), bounding its time: attention is O(T^2)
LONGEST_LIMIT = 1 << 18
# Fused ops that ``--ablate`` turns off one at a time (each runs its unfused reference composition)
LEVERS = ("conv_ssd_scan", "add_rms_norm", "swiglu", "rotary", "cross_entropy", "linears")
# The step's own levers: ``measure_training``'s arguments that turn each off
HARNESS_LEVERS_OFF = {
    "fused_adamw": {"fused_optimizer": False},
    "cuda_graph": {"cuda_graph": False},
    "cast_once": {"cast_once": False},
}
ABLATIONS = (*LEVERS, *HARNESS_LEVERS_OFF)  # what --ablate all turns off, one at a time
# The fused Mamba-2 mixer's own choices (``MixerKernels``), each also a lever --ablate takes by name
MIXER_LEVERS = tuple(f.name for f in dataclasses.fields(MixerKernels))
LOSS_CHUNK_TOKENS = 8192  # the chunked cross-entropy of the memory-saving mode


@dataclass(frozen=True)
class System:
    """One benchmarked model: how to build it and how to get its training loss."""

    name: str
    family: str  # "hybrid" or "transformer": which config's FLOPs per token it is measured against
    package: str | None  # a package it needs beyond hybridlm (None: always available)
    build: Callable[[ModelConfig], nn.Module]  # takes the hybrid config
    loss: Callable[[nn.Module, torch.Tensor], torch.Tensor]  # (model, input_ids) -> mean next-token loss


# ----------------------------------------------------------------------------------------------
# Systems


def transformer_config(cfg: ModelConfig) -> ModelConfig:
    """The same-size pure transformer: one attention + MLP block per block of the hybrid, same widths."""
    n_blocks = len(cfg.layers) // 2
    tcfg = dataclasses.replace(cfg, pattern="*-" * n_blocks)
    validate_model(tcfg)
    return tcfg


def _hybridlm_loss(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids, labels=input_ids).loss


def _hf_loss(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=input_ids, labels=input_ids).loss


def _logits_loss(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """mamba_ssm's model returns logits only; the loss is the same shifted cross-entropy, over a view of the
    logits as hybridlm's (slicing off the last position would copy them)."""
    logits = model(input_ids).logits  # (batch, seqlen, padded_vocab)
    return F.cross_entropy(logits.flatten(0, 1).float(), next_token_targets(input_ids))


def mamba_ssm_rotary_dim(cfg: ModelConfig) -> int:
    """mamba_ssm applies RoPE through flash_attn's rotary kernel; without flash_attn its attention runs with
    no RoPE, which makes the anchor do slightly less work than hybridlm (a conservative comparison)."""
    return cfg.rotary_dim if available("flash_attn") else 0  # dispatch's check: a broken install counts as absent


def int32_fault(system: System, cfg: ModelConfig, batch: int, seq_len: int) -> str | None:
    """Why ``system`` cannot run ``batch`` x ``seq_len`` without faulting, or None. mamba_ssm's model hands
    slices of its in_proj output to Triton kernels that compute offsets in int32; past 2**31 elements they
    read out of bounds, an illegal memory access that would end the whole benchmark process."""
    if system.name != "mamba_ssm":
        return None
    m = cfg.mamba
    width = 2 * cfg.d_inner + 2 * m.ngroups * m.d_state + cfg.mamba_n_heads
    if batch * seq_len * width >= 2**31:
        return f"not run: its in_proj output ({batch}x{seq_len}x{width}) passes 2**31 elements (int32 offsets)"
    return None


def system_note(system: System, cfg: ModelConfig) -> str | None:
    """How an anchor differs from the config it was built from, recorded with its rows."""
    if system.name == "mamba_ssm" and "*" in cfg.layers and cfg.rotary_dim and not mamba_ssm_rotary_dim(cfg):
        return "attention without RoPE (flash_attn not importable)"
    return None


def _build_mamba_ssm(cfg: ModelConfig) -> nn.Module:
    from hybridlm.convert import mamba_ssm
    from hybridlm.ops.mamba_ssm_model import mamba_lm_head_model

    return mamba_lm_head_model(mamba_ssm.raw_config(cfg, rotary_dim=mamba_ssm_rotary_dim(cfg)))


def _build_hf_bamba(cfg: ModelConfig) -> nn.Module:
    from transformers import BambaForCausalLM

    from hybridlm.convert import bamba

    return BambaForCausalLM(bamba.hf_config(cfg))


def _build_hf_llama(cfg: ModelConfig) -> nn.Module:
    from transformers import LlamaForCausalLM

    from hybridlm.convert import llama

    return LlamaForCausalLM(llama.hf_config(transformer_config(cfg)))


SYSTEMS = {
    s.name: s
    for s in (
        System("hybridlm", "hybrid", None, HybridLM, _hybridlm_loss),
        System("hybridlm-transformer", "transformer", None, lambda c: HybridLM(transformer_config(c)), _hybridlm_loss),
        System("mamba_ssm", "hybrid", "mamba_ssm", _build_mamba_ssm, _logits_loss),
        System("hf-bamba", "hybrid", "transformers", _build_hf_bamba, _hf_loss),
        System("hf-llama", "transformer", "transformers", _build_hf_llama, _hf_loss),
    )
}


def unavailable_reason(system: System, cfg: ModelConfig, device: torch.device) -> str | None:
    """Why ``system`` cannot be benchmarked for ``cfg`` on ``device`` (missing package, unexpressible
    pattern, needs CUDA), or None when it can."""
    if system.package is not None and not available(system.package):
        return f"{system.package} is not importable"
    if system.name == "mamba_ssm":
        if device.type != "cuda":
            return "mamba_ssm's model runs on CUDA only"
        from hybridlm.convert import mamba_ssm

        return mamba_ssm.can_express(cfg)
    if system.name == "hf-bamba":
        from hybridlm.convert import bamba

        return bamba.can_express(cfg)
    if system.name == "hf-llama":
        from hybridlm.convert import llama

        return llama.can_express(transformer_config(cfg))
    return None


def system_flops_per_token(system: System, cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token of ``system``: the one FLOPs model, applied to the config of its family."""
    family_cfg = cfg if system.family == "hybrid" else transformer_config(cfg)
    return flops_per_token(family_cfg, seq_len)["total"]


# ----------------------------------------------------------------------------------------------
# Measurement


def summarize_steps(step_seconds: list[float], batch: int, seq_len: int, flops: float, peak: float | None) -> dict:
    """tokens/s from the median timed step (tokens per step = batch x seq_len) and MFU against ``peak``."""
    tokens_per_step = batch * seq_len
    tokens_per_second = tokens_per_step / statistics.median(step_seconds)
    mfu = flops * tokens_per_second / peak if peak else None
    return {"tokens_per_step": tokens_per_step, "tokens_per_s": tokens_per_second, "mfu": mfu}


def _autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def time_training_steps(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor],
    input_ids: torch.Tensor,
    warmup: int,
    steps: int,
    device: torch.device,
    fused_optimizer: bool = True,
) -> list[float]:
    """Seconds of each timed training step (forward, backward, AdamW step), after ``warmup`` untimed ones.
    AdamW is torch's fused kernel on CUDA unless ``fused_optimizer`` is off (then its multi-tensor loop)."""
    fused = fused_optimizer and device.type == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused, foreach=not fused)
    model.train()
    seconds = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        else:
            t0 = time.perf_counter()
        with _autocast(device):
            loss = loss_fn(model, input_ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            end.record()
            end.synchronize()
            elapsed = start.elapsed_time(end) / 1000
        else:
            elapsed = time.perf_counter() - t0
        if i >= warmup:
            seconds.append(elapsed)
    return seconds


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_bytes(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def save_memory(model: nn.Module) -> bool:
    """Turn on what a system has for long sequences: activation checkpointing of every layer and, for
    hybridlm, the chunked cross-entropy. False when the system has neither (mamba_ssm's model)."""
    if isinstance(model, HybridLM):
        model.checkpoint_every, model.loss_chunk_tokens = 1, LOSS_CHUNK_TOKENS
        return True
    if getattr(model, "supports_gradient_checkpointing", False):  # transformers models
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return True
    return False


def measure_training(
    system: System,
    cfg: ModelConfig,
    batch: int,
    seq_len: int,
    warmup: int,
    steps: int,
    device: torch.device,
    memory_saving: bool = False,
    fused_optimizer: bool = True,
    cuda_graph: bool = True,
    cast_once: bool = True,
) -> dict:
    """One training measurement of ``system`` at ``batch`` x ``seq_len``; out of memory gives status "OOM".
    ``memory_saving``: with activation checkpointing (and chunked loss) where the system has them.
    ``cuda_graph``: hybridlm models replay forward and backward from CUDA graphs where the trainer would
    (``train.cuda_graph: auto``); never in memory-saving mode, where steps are long and GPU-bound. ``cast_once``:
    the graphed step casts the linear weights for autocast all at once (``graphed_step.cast_once_names``)."""
    row: dict[str, Any] = {"system": system.name, "mode": "train", "batch": batch, "seq_len": seq_len}
    row["flops_per_token"] = system_flops_per_token(system, cfg, seq_len)
    row["note"] = system_note(system, cfg)
    row["cuda_graph"] = False
    if fault := int32_fault(system, cfg, batch, seq_len):
        row.update(status="skipped", tokens_per_step=batch * seq_len, tokens_per_s=None, mfu=None, note=fault)
        return {**row, "peak_memory_bytes": None, "memory_saving": memory_saving}
    _release(device)
    _reset_peak(device)
    model = None
    try:
        torch.manual_seed(0)
        model = system.build(cfg).to(device)
        row["memory_saving"] = save_memory(model) if memory_saving else False
        row["cuda_graph"] = uses_training_graph(model, device, cuda_graph and not memory_saving)
        if row["cuda_graph"]:
            GraphedTraining(model, cast_once=cast_once)
        input_ids = torch.randint(0, cfg.vocab_size, (batch, seq_len), device=device)
        seconds = time_training_steps(model, system.loss, input_ids, warmup, steps, device, fused_optimizer)
    except torch.OutOfMemoryError:
        row.update(status="OOM", tokens_per_step=batch * seq_len, tokens_per_s=None, mfu=None)
        row.setdefault("memory_saving", memory_saving)
    else:
        row.update(status="ok", **summarize_steps(seconds, batch, seq_len, row["flops_per_token"], peak_flops(device)))
    row["peak_memory_bytes"] = _peak_bytes(device)
    del model
    _release(device)
    return row


def uses_training_graph(model: nn.Module, device: torch.device, wanted: bool) -> bool:
    """Whether ``model``'s training step replays CUDA graphs: hybridlm models, where the trainer would."""
    return wanted and isinstance(model, HybridLM) and training_graph_unsupported(model.cfg, device, 0) is None


def longest_sequence(
    system: System, cfg: ModelConfig, start: int, device: torch.device, limit: int = LONGEST_LIMIT
) -> dict | None:
    """Double the sequence length (batch 1, one warm-up and one timed step, memory-saving mode) from
    ``start`` until out of memory or ``limit``; the row of the longest that trained (mode "longest"), or
    None if ``start`` did not."""
    best, seq_len = None, start
    while seq_len <= limit:
        row = measure_training(system, cfg, 1, seq_len, warmup=1, steps=1, device=device, memory_saving=True)
        print(f"longest search: {system.name} 1x{seq_len}: {row['status']}", flush=True)
        if row["status"] != "ok":
            break
        best, seq_len = row, seq_len * 2
    if best is not None:
        best["mode"] = "longest"
        best["reached_limit"] = seq_len > limit  # True: it might fit longer still
    return best


def ablation_rows(
    cfg: ModelConfig,
    shapes: list[tuple[int, int]],
    warmup: int,
    steps: int,
    device: torch.device,
    levers: tuple[str, ...] = ABLATIONS,
) -> Iterator[dict]:
    """hybridlm with each of ``levers`` off in turn (system "hybridlm -LEVER"), yielded as measured: the
    ratio column then reads as what that one lever gains. A fused op off runs its reference composition;
    ``fused_adamw`` off is the multi-tensor AdamW; ``cuda_graph`` off (where the step has graphs) launches
    every kernel of the step from Python; ``cast_once`` off leaves the graphed step's weight casts to autocast."""
    system = SYSTEMS[REFERENCE_SYSTEM]
    for lever in levers:
        if lever in ("cuda_graph", "cast_once") and training_graph_unsupported(cfg, device, 0) is not None:
            continue
        for batch, seq_len in shapes:
            if lever in LEVERS:
                with ops.reference_ops(lever):
                    row = measure_training(system, cfg, batch, seq_len, warmup, steps, device)
            elif lever in MIXER_LEVERS:
                with mixer_kernels(**{lever: False}):
                    row = measure_training(system, cfg, batch, seq_len, warmup, steps, device)
            else:
                row = measure_training(system, cfg, batch, seq_len, warmup, steps, device, **HARNESS_LEVERS_OFF[lever])
            yield {**row, "system": f"{REFERENCE_SYSTEM} -{lever}", "without": lever}


def parse_ablate(text: str | None) -> tuple[str, ...]:
    """``--ablate``: nothing (None), every lever of ``ABLATIONS`` ("all") or a comma-separated list of those and
    ``MIXER_LEVERS``."""
    if text is None:
        return ()
    if text.strip().lower() == "all":
        return ABLATIONS
    levers = tuple(t.strip() for t in text.split(",") if t.strip())
    unknown = [t for t in levers if t not in ABLATIONS + MIXER_LEVERS]
    if unknown or not levers:
        named = ", ".join(unknown) or repr(text)
        choices = ", ".join(ABLATIONS + MIXER_LEVERS)
        raise ValueError(f"--ablate: unknown lever {named} (choose from all or {choices})")
    return levers


def _decode_model(system: System, cfg: ModelConfig, device: torch.device) -> nn.Module:
    model = system.build(cfg).to(device).eval()
    if device.type == "cuda":  # inference weights in bf16; HybridLM.cast keeps the SSM parameters fp32
        model = model.cast(torch.bfloat16) if isinstance(model, HybridLM) else model.to(torch.bfloat16)
    return model


def _generator(model: nn.Module, batch: int, max_seqlen: int, cuda_graph: bool | None) -> tuple[Callable, bool]:
    """(``generate(prompt, new_tokens)``, greedy; whether it replays a CUDA graph). Each system keeps its
    graph across calls, as mamba_ssm's own ``generate(cg=True)`` does (its graph cache lives on the model)."""
    if isinstance(model, HybridLM):
        decoder = model.decoder(batch, max_seqlen, cuda_graph)
        generate = functools.partial(model.generate, temperature=0.0, decoder=decoder)
        return generate, isinstance(decoder, GraphedDecoder)

    def generate(prompt: torch.Tensor, n: int) -> None:
        model.generate(input_ids=prompt, max_length=prompt.shape[1] + n, cg=True, top_k=1)

    return generate, True


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_decode(
    system: System,
    cfg: ModelConfig,
    batch: int,
    prompt_len: int,
    new_tokens: int,
    device: torch.device,
    cuda_graph: bool | None = None,
) -> dict:
    """Greedy generation after a ``prompt_len`` prompt. After one untimed warm-up generation (graph
    capture, autotuning), the same prompt generates 1 token (time t1: the prefill) and ``new_tokens``
    tokens (tN). ``tokens_per_s`` = batch * (new_tokens - 1) / (tN - t1): the decode steps alone, where the
    KV cache or the constant Mamba state decide; ``tokens_per_s_with_prefill`` = batch * new_tokens / tN.
    ``cuda_graph`` (hybridlm systems): None = capture where possible; mamba_ssm always uses its graphs."""
    row: dict[str, Any] = {"system": system.name, "mode": "decode", "batch": batch, "seq_len": prompt_len}
    row.update(new_tokens=new_tokens, flops_per_token=None, mfu=None, tokens_per_step=batch * new_tokens)
    row.update(timing="decode steps only: batch*(N-1)/(t(N)-t(1))", note=system_note(system, cfg))
    if fault := int32_fault(system, cfg, batch, prompt_len):
        return {**row, "status": "skipped", "tokens_per_s": None, "peak_memory_bytes": None, "note": fault}
    _release(device)
    _reset_peak(device)
    model = generate = None
    try:
        torch.manual_seed(0)
        model = _decode_model(system, cfg, device)
        generate, row["cuda_graph"] = _generator(model, batch, prompt_len + new_tokens, cuda_graph)
        prompt = torch.randint(0, cfg.vocab_size, (batch, prompt_len), device=device)
        generate(prompt, new_tokens)
        seconds = {}
        for n in (1, new_tokens):
            _synchronize(device)
            t0 = time.perf_counter()
            generate(prompt, n)
            _synchronize(device)
            seconds[n] = time.perf_counter() - t0
    except torch.OutOfMemoryError:
        row.update(status="OOM", tokens_per_s=None)
    else:
        decode_s = seconds[new_tokens] - seconds[1]
        row.update(
            status="ok" if decode_s > 0 else "untimed: prefill noise exceeded the decode time",
            tokens_per_s=batch * (new_tokens - 1) / decode_s if decode_s > 0 else None,
            ms_per_step=1e3 * decode_s / (new_tokens - 1),
            prefill_s=seconds[1],
            tokens_per_s_with_prefill=batch * new_tokens / seconds[new_tokens],
        )
    row["peak_memory_bytes"] = _peak_bytes(device)
    del model, generate
    _release(device)
    return row


# ----------------------------------------------------------------------------------------------
# Report


def _fmt_tokens(row: dict) -> str:
    return f"{row['tokens_per_s']:,.0f}" if row["status"] == "ok" else row["status"]


def _shape(row: dict) -> str:
    shape = f"{row['batch']}x{row['seq_len']}"
    return shape + f"+{row['new_tokens']}" if row["mode"] == "decode" else shape


def _shape_key(row: dict) -> tuple:
    return row["mode"], row["batch"], row["seq_len"], row.get("new_tokens")


def ratio_to_reference(row: dict, rows: list[dict]) -> float | None:
    """hybridlm's tokens/s over ``row``'s at the same mode and shape (None when either is missing or OOM)."""
    ref = next((r for r in rows if r["system"] == REFERENCE_SYSTEM and _shape_key(r) == _shape_key(row)), None)
    if ref is None or ref["status"] != "ok" or row["status"] != "ok":
        return None
    return ref["tokens_per_s"] / row["tokens_per_s"]


TABLE_HEADER = ("system", "mode", "batch x seq", "tokens/s", "MFU", "peak mem GiB", f"{REFERENCE_SYSTEM}/this")


def format_table(rows: list[dict]) -> str:
    """One plain-text table, one line per row; ``longest`` rows show the longest sequence that trained."""
    lines = [TABLE_HEADER]
    for r in rows:
        ratio = ratio_to_reference(r, rows)
        mem = r["peak_memory_bytes"]
        lines.append(
            (
                r["system"],
                r["mode"],
                _shape(r),
                _fmt_tokens(r),
                "-" if r["mfu"] is None else f"{r['mfu']:.3f}",
                "-" if mem is None else f"{mem / 2**30:.2f}",
                "-" if ratio is None else f"{ratio:.3f}",  # two digits would show 1.297 as the 1.30 of a target
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(TABLE_HEADER))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in lines)


def git_commit() -> str | None:
    """HEAD of the repository holding this package, with "+dirty" when tracked files differ from it (the
    numbers then belong to uncommitted code), or None outside a git checkout. ``HYBRIDLM_GIT_COMMIT`` wins:
    a copy of the working tree on another machine may carry a stale ``.git``, so the caller names the commit."""
    if named := os.environ.get("HYBRIDLM_GIT_COMMIT"):
        return named
    try:
        head, status = (
            subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10)
            for args in (["rev-parse", "HEAD"], ["status", "--porcelain", "--untracked-files=no"])
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+dirty" if status.stdout.strip() else "")


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: torch.device) -> dict:
    """Fields every jsonl row carries: time, device name, package versions, git commit."""
    return {
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        "torch": torch.__version__,
        "mamba_ssm": _version("mamba_ssm"),
        "transformers": _version("transformers"),
        "git_commit": git_commit(),
    }


def append_jsonl(rows: list[dict], out_jsonl: Path) -> None:
    out_jsonl.parent.mkdir(parents=True, exist_ok=True)
    with out_jsonl.open("a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


# ----------------------------------------------------------------------------------------------
# Entry point


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """``"8x4096,2x16384"`` -> [(8, 4096), (2, 16384)]; ``"none"`` -> [] (decode only); a malformed item
    raises a one-line ValueError."""
    if text.strip().lower() == "none":
        return []
    shapes = []
    for item in text.split(","):
        parts = item.strip().lower().split("x")
        if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"--shapes: {item.strip()!r} is not BATCHxSEQ with positive integers, e.g. 8x4096")
        shapes.append((int(parts[0]), int(parts[1])))
    return shapes


def _check_inputs(cfg: ModelConfig, shapes: list[tuple[int, int]], systems: list[str] | None, warmup: int, steps: int):
    unknown = [s for s in systems or [] if s not in SYSTEMS]
    if unknown:
        raise ValueError(f"--systems: unknown {', '.join(unknown)} (choose from {', '.join(SYSTEMS)})")
    if warmup < 0 or steps < 1:
        raise ValueError(f"--warmup={warmup} must be >= 0 and --steps={steps} >= 1")
    chunk = cfg.mamba.chunk_size if "M" in cfg.layers and cfg.mamba.version == 2 else 1
    for batch, seq_len in shapes:
        if seq_len < 2 or seq_len % chunk:
            raise ValueError(
                f"--shapes: {batch}x{seq_len}: seq must be >= 2 and a multiple of model.mamba.chunk_size={chunk}"
            )


def run_bench(
    config_path: str | None,
    overrides: list[str],
    shapes: list[tuple[int, int]],
    systems: list[str] | None,
    warmup: int,
    steps: int,
    decode: bool,
    out_jsonl: Path = DEFAULT_OUT,
    *,
    longest: bool = False,
    ablate: tuple[str, ...] = (),
    decode_prompt: int = 32768,
    decode_tokens: int = 256,
    device: str | None = None,
) -> list[dict]:
    """Benchmark ``systems`` (None: all available) at each (batch, seq_len) of ``shapes``; print one table,
    append the rows to ``out_jsonl`` and return them. Systems that cannot run here are skipped with a note.

    ``longest`` (CUDA only) adds the longest batch-1 sequence each system trains, by doubling; ``ablate``
    adds hybridlm with each lever it names off in turn (``ABLATIONS``; with ``cuda_graph`` and ``decode``
    where the step can be captured, also decoding without CUDA graphs); ``decode`` adds generation of
    ``decode_tokens`` (>= 2) after a ``decode_prompt``-token prompt at batch 1 and 16."""
    run = load_run_config(config_path, overrides)
    cfg = run.model
    _check_inputs(cfg, shapes, systems, warmup, steps)
    if decode and (decode_tokens < 2 or decode_prompt < 1):
        raise ValueError(
            f"--decode-tokens={decode_tokens} must be >= 2 (the decode rate is t(N) - t(1)) "
            f"and --decode-prompt={decode_prompt} >= 1"
        )
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ops.set_kernels(run.kernels, run.reference_ops)

    chosen = []
    for name in systems or list(SYSTEMS):
        reason = unavailable_reason(SYSTEMS[name], cfg, dev)
        if reason:
            print(f"note: skipping {name}: {reason}")
        else:
            chosen.append(SYSTEMS[name])

    env = environment(dev)
    context = {"config": config_path, "overrides": list(overrides), "warmup": warmup, "steps": steps}
    rows: list[dict] = []

    def record(row: dict) -> None:  # each row is kept as soon as it is measured: a killed run loses none
        rows.append(row)
        append_jsonl([{**env, **context, **row}], Path(out_jsonl))
        print("measured: " + format_table([row]).splitlines()[1], flush=True)

    for system in chosen:
        for batch, seq_len in shapes:
            record(measure_training(system, cfg, batch, seq_len, warmup, steps, dev))
        if longest:
            if dev.type != "cuda":
                print(f"note: no longest-sequence search for {system.name}: it needs a GPU")
            elif (row := longest_sequence(system, cfg, max(s for _, s in shapes), dev)) is not None:
                record(row)
    if ablate:
        for row in ablation_rows(cfg, shapes, warmup, steps, dev, ablate):
            record(row)
    if decode:
        for system in chosen:
            if system.name not in ("hybridlm", "hybridlm-transformer", "mamba_ssm"):
                continue
            for batch in DECODE_BATCHES:
                record(measure_decode(system, cfg, batch, decode_prompt, decode_tokens, dev))
        if "cuda_graph" in ablate and graph_unsupported(cfg, dev) is None:
            for batch in DECODE_BATCHES:  # the CUDA-graph lever: the same decoding, each step launched eagerly
                row = measure_decode(SYSTEMS[REFERENCE_SYSTEM], cfg, batch, decode_prompt, decode_tokens, dev, False)
                record({**row, "system": f"{REFERENCE_SYSTEM} -cuda_graph", "without": "cuda_graph"})

    print(format_table(rows))
    return rows
