"""The training loop: set up data, model and engine, run steps, evaluate, checkpoint, and finish a run.

One loop for one process and for N: DeepSpeed (``engine.py``) owns the distribution, this file
owns the order of things. Components do one job each: ``optim`` (param groups, schedules),
``checkpoint`` (consolidated atomic saves, resume), ``metrics`` (bar, jsonl, plots), ``faults``
(signals, non-finite steps, config checks).
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hybridlm import ops
from hybridlm.config import ConfigError, ModelConfig, RunConfig, load_run_config
from hybridlm.data.loader import PackedLoader
from hybridlm.data.prepare import prepare
from hybridlm.data.tokenizer import load_tokenizer
from hybridlm.flops import flops_per_token, peak_flops
from hybridlm.model.model import CONFIG_FILE, WEIGHTS_FILE, HybridLM
from hybridlm.train import checkpoint as ckpt_io
from hybridlm.train.engine import barrier, build_engine, deepspeed_config, init_distributed, resolve_precision
from hybridlm.train.faults import StopRequest, TrainingDiverged, check_train_config, poison_if_nonfinite
from hybridlm.train.metrics import MetricsLogger, ProgressBar, memory_gb, plot_loss, say, truncate_metrics
from hybridlm.train.optim import AdamW, lr_at, param_groups, set_lr

MODEL_DIR = "model"


def run_train(config_path: str | None, overrides: list[str]) -> dict[str, Any]:
    """Train from a YAML run config plus ``key=value`` overrides; returns the final metrics."""
    return train(load_run_config(config_path, overrides))


def train(cfg: RunConfig) -> dict[str, Any]:
    """Train ``cfg`` to ``train.max_steps`` (or until a signal), leaving checkpoints, metrics, plot and model."""
    check_train_config(cfg)
    rank, world_size, device = init_distributed()
    ops.set_kernels(cfg.kernels)
    seed_everything(cfg.seed)
    precision = resolve_precision(cfg.train, device)
    prepared = _prepare_data(cfg, rank)
    tokenizer = load_tokenizer(prepared)
    model_cfg = fit_vocab(cfg.model, len(tokenizer), rank)
    resume_from = ckpt_io.resolve_resume(cfg.resume, cfg.out_dir)
    trainer_state = ckpt_io.read_trainer_state(resume_from) if resume_from else {}
    if resume_from:
        check_same_model(trainer_state, model_cfg, resume_from)
    engine = build_training_engine(cfg, model_cfg, world_size, precision, resume_from)
    run = Run(cfg, model_cfg, engine, prepared, rank, world_size, device, precision)
    if resume_from:
        run.restore(resume_from, trainer_state)
    run.start(resume_from, tokenizer)
    try:
        return run.finish(run.loop(), tokenizer)
    finally:
        run.close()


def build_training_engine(cfg: RunConfig, model_cfg: ModelConfig, world_size: int, precision: str, resume_from):
    """The model (weights from the checkpoint or ``init_from`` if given), our AdamW, and the DeepSpeed engine."""
    t = cfg.train
    model = HybridLM(model_cfg)
    if resume_from or cfg.init_from:
        source = resume_from or Path(cfg.init_from)
        load_into(model, ckpt_io.load_weights(source), "resume" if resume_from else "init_from", source)
    model.checkpoint_every = {"none": 0, "every": 1}.get(t.activation_checkpointing, t.activation_checkpointing)
    optimizer = AdamW(
        param_groups(model, t.weight_decay), guard=t.zero_stage == 0, clip=t.grad_clip, lr=t.lr, betas=t.betas, eps=1e-8
    )
    return build_engine(model, optimizer, deepspeed_config(t, world_size, precision, model))


def seed_everything(seed: int) -> None:
    """Same seed on every rank: the model is initialised identically everywhere (ZeRO-3 partitions each
    rank's own copy); nothing random happens per rank during training."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _prepare_data(cfg: RunConfig, rank: int) -> Path:
    """Rank 0 prepares (idempotent); the others wait, then find the prepared directory."""
    if rank == 0:
        prepared = prepare(cfg.data)
    barrier()
    if rank != 0:
        prepared = prepare(cfg.data)
    return prepared


def fit_vocab(model_cfg: ModelConfig, tokenizer_vocab: int, rank: int = 0) -> ModelConfig:
    """``model.vocab_size`` raised to the tokenizer's vocabulary when smaller (it may be larger: padding)."""
    if model_cfg.vocab_size >= tokenizer_vocab:
        return model_cfg
    say(
        f"model.vocab_size={model_cfg.vocab_size} < tokenizer vocabulary {tokenizer_vocab}: using {tokenizer_vocab}",
        rank,
    )
    return dataclasses.replace(model_cfg, vocab_size=tokenizer_vocab)


def check_same_model(trainer_state: dict[str, Any], model_cfg: ModelConfig, ckpt: Path) -> None:
    """Resuming needs the architecture the checkpoint was trained with; name the first key that differs."""
    first = next(_diff(trainer_state["run_config"]["model"], model_cfg.to_dict(), "model"), None)
    if first is not None:
        key, (saved, now) = first
        raise ConfigError(f"resume={ckpt}: the checkpoint has {key}={saved!r} but this config has {now!r}")


def _diff(a: Any, b: Any, prefix: str):
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            yield from _diff(a.get(key), b.get(key), f"{prefix}.{key}")
    elif a != b:
        yield prefix, (a, b)


def load_into(model: HybridLM, state: dict[str, torch.Tensor], what: str, source: Path) -> None:
    """Load weights strictly; a mismatch names the config key to look at."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ConfigError(
            f"{what}={source}: weights do not match model.pattern/architecture "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    for name, tensor in state.items():
        if tensor.shape != own[name].shape:
            raise ConfigError(
                f"{what}={source}: {name} has shape {list(tensor.shape)} there but {list(own[name].shape)} in this "
                "model; check model.d_model / vocab_size / mamba / attention keys"
            )
    model.load_state_dict(state)


class Run:
    """State of one training run on one rank, and the steps of its loop."""

    def __init__(self, cfg, model_cfg, engine, prepared, rank, world_size, device, precision):
        self.cfg, self.model_cfg, self.engine = cfg, model_cfg, engine
        self.prepared, self.rank, self.world_size, self.device = prepared, rank, world_size, device
        self.precision = precision
        self.out_dir = Path(cfg.out_dir)
        t = cfg.train
        self.loader = PackedLoader(prepared, "train", t.seq_len, t.micro_batch_size, rank, world_size, cfg.seed)
        self.tokens_per_step = t.micro_batch_size * t.grad_accum * world_size * t.seq_len
        self.flops_per_token = flops_per_token(model_cfg, t.seq_len)["total"]
        self.peak = peak_flops(device)
        self.step = self.tokens_seen = self.skipped_total = 0
        self.last_saved: Path | None = None
        self.last_loss: float | None = None
        self.metrics = MetricsLogger(self.out_dir, rank == 0, cfg.to_dict())
        self.stop = StopRequest()
        self.bar: ProgressBar | None = None

    def restore(self, ckpt: Path, trainer_state: dict[str, Any]) -> None:
        """Continue from ``ckpt``: optimizer state, step counters, data position and this rank's RNG."""
        ckpt_io.restore_optimizer(self.engine, ckpt, trainer_state["adam_step"], self.cfg.train.seq_len)
        self.loader.load_state_dict(trainer_state["loader"])
        self.step, self.tokens_seen = trainer_state["step"], trainer_state["tokens_seen"]
        self.skipped_total = trainer_state["skipped_steps"]
        rng = ckpt_io.read_rng(ckpt, self.rank)
        if rng is not None:  # None: the checkpoint was written by fewer ranks
            ckpt_io.restore_rng(rng)

    def start(self, resume_from: Path | None, tokenizer) -> None:
        """Record the resolved config, drop metrics past the resumed step, and say what is about to run."""
        if self.rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            resolved = {**self.cfg.to_dict(), "model": self.model_cfg.to_dict()}
            (self.out_dir / "config.json").write_text(json.dumps(resolved, indent=2) + "\n")
            truncate_metrics(self.out_dir, self.step)
        t, m = self.cfg.train, self.model_cfg
        n_params = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in self.engine.module.parameters())
        kernels = ops.kernel_table(self.device)
        lines = [
            f"model: {n_params / 1e6:.2f}M parameters, layers {m.layers}, "
            f"vocab {m.vocab_size} (tokenizer {len(tokenizer)})",
            f"engine: DeepSpeed ZeRO-{t.zero_stage}, {self.world_size} rank(s) on {self.device.type}, "
            f"precision {self.precision}, activation checkpointing {t.activation_checkpointing}",
            f"batch: {t.micro_batch_size} x {t.seq_len} tokens x {t.grad_accum} accum x {self.world_size} ranks "
            f"= {self.tokens_per_step} tokens/step; {self.flops_per_token / 1e6:.1f} MFLOPs/token (train)",
            "kernels: " + ", ".join(f"{op}={impl}" for op, impl in kernels.items()),
            f"data: {self.prepared}",
        ]
        if resume_from:
            lines.append(f"resumed from {resume_from} at step {self.step}")
        elif self.cfg.init_from:
            lines.append(f"weights from init_from={self.cfg.init_from}")
        for line in lines:
            say(line, self.rank)

    # ------------------------------------------------------------------------------------------

    def loop(self) -> dict[str, Any]:
        """Steps until ``max_steps`` or a stop signal; returns ``{"stopped": signal name or None}``."""
        t = self.cfg.train
        self.bar = ProgressBar(self.rank == 0, t.max_steps, self.step)
        window, bad_in_a_row = Window(), 0
        while self.step < t.max_steps:
            if self.stop.requested(self.world_size):
                return {"stopped": self.stop.signal_name}
            lr = lr_at(self.step, t)
            set_lr(self.engine.optimizer, lr)
            loss, aux = self.train_step()
            self.step += 1
            self.tokens_seen += self.tokens_per_step
            if self.engine.was_step_applied():
                bad_in_a_row = 0
                window.add(loss, aux)
            else:
                bad_in_a_row += 1
                self.skipped(window, bad_in_a_row)
            record = None
            if self.step % t.log_every == 0 or self.step == t.max_steps:
                record, window = self.log_record(window, lr), Window()
            self.evaluate_and_save_when_due(window)
            self.bar.update(1, record)
        return {"stopped": None}

    def skipped(self, window: Window, bad_in_a_row: int) -> None:
        """Count a step the engine refused (non-finite loss or gradient); give up after max_bad_steps in a row."""
        self.skipped_total += 1
        window.skipped += 1
        say(f"step {self.step}: non-finite loss or gradient, update skipped ({bad_in_a_row} in a row)", self.rank)
        limit = self.cfg.train.max_bad_steps
        if bad_in_a_row >= limit:
            raise TrainingDiverged(
                f"{bad_in_a_row} steps in a row had a non-finite loss or gradient (train.max_bad_steps={limit}); "
                f"stopping at step {self.step}. Lower train.lr, raise train.warmup_steps or check the data; resume "
                f"from {self.last_saved or 'the last checkpoint'} with resume=auto"
            )

    def evaluate_and_save_when_due(self, window: Window) -> None:
        t = self.cfg.train
        paused = time.perf_counter()
        if t.eval_every and self.step % t.eval_every == 0 and self.step != t.max_steps:  # the end evaluates anyway
            self.evaluate_and_log()
        if t.save_every and self.step % t.save_every == 0:
            self.save()
        window.start += time.perf_counter() - paused  # tokens/s counts training time only

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One optimizer step over ``grad_accum`` micro-batches; returns the mean LM loss and MoE aux loss."""
        engine, t = self.engine, self.cfg.train
        aux_weight = self.model_cfg.moe.aux_loss_weight
        loss_sum = torch.zeros((), device=self.device)
        aux_sum = None
        for _ in range(t.grad_accum):
            batch = {k: v.to(self.device, non_blocking=True) for k, v in self.loader.next_batch().items()}
            out = engine(batch["input_ids"], doc_ids=batch["doc_ids"], labels=batch["labels"])
            total = out.loss if out.aux_loss is None else out.loss + aux_weight * out.aux_loss
            engine.backward(poison_if_nonfinite(total))  # DeepSpeed divides by grad_accum
            engine.step()  # applies the update on the last micro-batch only
            loss_sum += out.loss.detach().float()
            if out.aux_loss is not None:
                aux_sum = out.aux_loss.detach().float() + (0 if aux_sum is None else aux_sum)
        n = t.grad_accum
        return loss_sum / n, None if aux_sum is None else aux_sum / n

    def log_record(self, window: Window, lr: float) -> dict[str, Any]:
        """Reduce the window's numbers over ranks and write one metrics record (collective)."""
        elapsed = window.elapsed()
        stats = torch.tensor(
            [window.loss_sum, window.aux_sum, float(window.count)], dtype=torch.float64, device=self.device
        )
        if self.world_size > 1:
            torch.distributed.all_reduce(stats)
        loss_sum, aux_sum, count = stats.tolist()
        tokens_per_second = (window.count + window.skipped) * self.tokens_per_step / max(elapsed, 1e-9)
        grad_norm = self.engine.get_global_grad_norm()
        record: dict[str, Any] = {
            "step": self.step,
            "loss": loss_sum / count if count else None,
            "lr": lr,
            "grad_norm": _number(grad_norm),
            "tokens": self.tokens_seen,
            "tokens_per_second": tokens_per_second,
            "mfu": tokens_per_second * self.flops_per_token / (self.peak * self.world_size) if self.peak else None,
            "memory_gb": memory_gb(self.device),
            "skipped_steps": self.skipped_total,
        }
        if window.has_aux:
            record["aux_loss"] = aux_sum / count if count else None
        self.metrics.log(record)
        if record["loss"] is not None:
            self.last_loss = record["loss"]
        return record

    @torch.no_grad()
    def evaluate(self) -> float:
        """Token-weighted validation loss over ``eval_batches`` batches per rank (the same batches every time)."""
        t = self.cfg.train
        val = PackedLoader(
            self.prepared, "val", t.seq_len, t.micro_batch_size, self.rank, self.world_size, self.cfg.seed
        )
        self.engine.eval()
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        for _ in range(t.eval_batches):
            batch = {k: v.to(self.device) for k, v in val.next_batch().items()}
            out = self.engine(batch["input_ids"], doc_ids=batch["doc_ids"], labels=batch["labels"])
            n = (batch["labels"][:, 1:] != -100).sum()
            sums += torch.stack([out.loss.double() * n, n.double()])
        self.engine.train()
        if self.world_size > 1:
            torch.distributed.all_reduce(sums)
        return (sums[0] / sums[1]).item()

    def evaluate_and_log(self) -> dict[str, float]:
        val_loss = self.evaluate()
        record = {"step": self.step, "val_loss": val_loss, "val_ppl": _perplexity(val_loss)}
        self.metrics.log(record)
        say(f"step {self.step}: val loss {val_loss:.4f}, perplexity {record['val_ppl']:.2f}", self.rank)
        return record

    def save(self) -> Path:
        state = {
            "tokens_seen": self.tokens_seen,
            "skipped_steps": self.skipped_total,
            "loader": self.loader.state_dict(),
            "world_size": self.world_size,
            "zero_stage": self.cfg.train.zero_stage,
            "run_config": {**self.cfg.to_dict(), "model": self.model_cfg.to_dict()},
        }
        start = time.perf_counter()
        self.last_saved = ckpt_io.save_checkpoint(
            self.out_dir, self.step, self.engine, self.model_cfg, state, self.cfg.train.keep_last
        )
        say(f"checkpoint {self.last_saved} written in {time.perf_counter() - start:.1f}s", self.rank)
        return self.last_saved

    def close(self) -> None:
        self.stop.restore()
        if self.bar is not None:
            self.bar.close()
        self.metrics.close()

    # ------------------------------------------------------------------------------------------

    def finish(self, result: dict[str, Any], tokenizer) -> dict[str, Any]:
        """Final checkpoint, validation, consolidated model export, loss plot and a generated sample."""
        final = {"step": self.step, "loss": self.last_loss, "tokens": self.tokens_seen, **result}
        final["skipped_steps"] = self.skipped_total
        if self.last_saved is None or self.last_saved.name != ckpt_io.step_dir_name(self.step):
            self.save()
        final["checkpoint"] = str(self.last_saved)
        if result["stopped"]:
            say(
                f"stopped by {result['stopped']} at step {self.step}; checkpoint {self.last_saved} "
                "(continue with resume=auto)",
                self.rank,
            )
            return final
        final.update(self.evaluate_and_log())
        if self.rank == 0:
            final["model_dir"] = str(export_model(self.last_saved, tokenizer, self.out_dir / MODEL_DIR))
            plot = plot_loss(self.out_dir)
            final["loss_plot"] = str(plot) if plot else None
            if self.cfg.train.sample_tokens:
                final["sample"] = generate_sample(
                    self.out_dir / MODEL_DIR, tokenizer, self.prepared, self.cfg, self.device
                )
                say(f"sample:\n{final['sample']}", self.rank)
            say(
                f"done: step {self.step}, val perplexity {final['val_ppl']:.2f}, model in {final['model_dir']}",
                self.rank,
            )
        barrier()
        return final


class Window:
    """Sums over the steps since the last log line (skipped steps excluded from the losses)."""

    def __init__(self):
        self.loss_sum = self.aux_sum = 0.0
        self.count = self.skipped = 0
        self.has_aux = False
        self.start = time.perf_counter()
        self._pending: list[tuple[torch.Tensor, torch.Tensor | None]] = []

    def add(self, loss: torch.Tensor, aux: torch.Tensor | None) -> None:
        self._pending.append((loss, aux))  # read on the host only at log time: no sync per step
        self.count += 1
        self.has_aux = aux is not None

    def elapsed(self) -> float:
        """Seconds since the window opened; materialises the pending losses (a device sync)."""
        for loss, aux in self._pending:
            self.loss_sum += loss.item()
            self.aux_sum += aux.item() if aux is not None else 0.0
        self._pending.clear()
        return time.perf_counter() - self.start


def export_model(ckpt: Path, tokenizer, out: Path) -> Path:
    """``out`` = the checkpoint's weights in save_pretrained format plus the tokenizer files."""
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        shutil.copy2(ckpt / name, tmp / name)
    tokenizer.save_pretrained(str(tmp))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def generate_sample(model_dir: Path, tokenizer, prepared: Path, cfg: RunConfig, device: torch.device) -> str:
    """Continue the first tokens of the validation split with the exported model."""
    model = HybridLM.from_pretrained(model_dir, device=device)
    val = PackedLoader(prepared, "val", min(16, cfg.train.seq_len), 1)
    prompt = val.next_batch()["input_ids"].to(device)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    out = model.generate(prompt, cfg.train.sample_tokens, temperature=0.8, top_k=50, generator=generator)
    return tokenizer.decode(prompt[0]) + " ⟶ " + tokenizer.decode(out[0, prompt.shape[1] :])


def _number(x: Any) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))
