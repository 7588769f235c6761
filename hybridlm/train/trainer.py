"""The training loop: set up data, model and engine, run steps, evaluate, checkpoint, and finish a run.

One loop for one process and for N: DeepSpeed (``engine.py``) owns the distribution, this file
owns the order of things. Components do one job each: ``optim`` (param groups, schedules),
``checkpoint`` (consolidated atomic saves, resume), ``metrics`` (bar, jsonl, plots), ``faults``
(signals, non-finite steps, config checks), ``init_from`` (starting from a hybridlm or HF checkpoint),
``lora`` (freezing and LoRA adapters, imported only when ``finetune:`` asks for them).

Fine-tuning is the same loop: ``init_from`` gives the architecture, the weights and the tokenizer;
``finetune:`` adapts the model after those weights are loaded and before the optimizer sees it (only
trainable parameters go to AdamW); instruction data is packed by ``prepare`` with a loss mask, so the
training and validation losses are over response tokens. A LoRA run exports merged weights.
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
from hybridlm.config import (
    ConfigError,
    FinetuneConfig,
    LoRAConfig,
    ModelConfig,
    RunConfig,
    SourceConfig,
    load_run_config,
    validate_run,
)
from hybridlm.data.instruct import check_vocab
from hybridlm.data.loader import PackedLoader, read_manifest
from hybridlm.data.prepare import prepare
from hybridlm.data.tokenizer import load_tokenizer
from hybridlm.flops import flops_per_token, peak_flops
from hybridlm.model.model import CONFIG_FILE, WEIGHTS_FILE, HybridLM
from hybridlm.train import checkpoint as ckpt_io
from hybridlm.train.data import make_loader, task_source
from hybridlm.train.engine import barrier, build_engine, deepspeed_config, init_distributed, resolve_precision
from hybridlm.train.faults import StopRequest, TrainingDiverged, poison_if_nonfinite
from hybridlm.train.graphed_step import GraphedTraining, installed_graph, resolve_cuda_graph
from hybridlm.train.init_from import (
    InitSource,
    config_diff,
    load_init_weights,
    reconcile_model,
    resolve_init_from,
    with_checkpoint_tokenizer,
)
from hybridlm.train.metrics import MetricsLogger, ProgressBar, memory_gb, plot_loss, say, truncate_metrics
from hybridlm.train.optim import AdamW, lr_at, param_groups, set_lr

MODEL_DIR = ckpt_io.MODEL_DIR


def run_train(config_path: str | None, overrides: list[str]) -> dict[str, Any]:
    """Train from a YAML run config plus ``key=value`` overrides; returns the final metrics."""
    return train(load_run_config(config_path, overrides))


def train(cfg: RunConfig) -> dict[str, Any]:
    """Train ``cfg`` to ``train.max_steps`` (or until a signal), leaving checkpoints, metrics, plot and model."""
    source = resolve_init_from(cfg.init_from) if cfg.init_from else None
    resume_from = ckpt_io.resolve_resume(cfg.resume, cfg.out_dir)
    trainer_state = ckpt_io.read_trainer_state(resume_from) if resume_from else {}
    rank, world_size, device = init_distributed()
    ops.set_kernels(cfg.kernels, cfg.reference_ops)
    seed_everything(cfg.seed)
    precision = resolve_precision(cfg.train, device)
    if source is not None:
        cfg, note = with_checkpoint_tokenizer(cfg, source)
        if note:
            say(note, rank)
    # Architecture (and weights) first when starting from a checkpoint: a config that contradicts it
    # fails before the data is prepared.
    model_cfg, init_weights = checkpoint_model(cfg, source, trainer_state) if source else (None, None)
    if task_source(cfg) is not None:  # a synthetic task: token ids are the task's own, no tokenizer
        prepared = tokenizer = None
        model_cfg = model_cfg or cfg.model
    else:
        prepared = _prepare_data(cfg, rank)
        tokenizer = load_tokenizer(prepared)
        if model_cfg is None:
            model_cfg = fit_vocab(cfg.model, len(tokenizer), rank)
        else:
            check_vocab(model_cfg, tokenizer, source.tokenizer_dir or cfg.init_from)
    if resume_from:
        check_resumable(trainer_state, model_cfg, cfg.finetune, resume_from)
    cuda_graph = resolve_cuda_graph(cfg.train, model_cfg, device)
    engine = build_training_engine(cfg, model_cfg, world_size, precision, resume_from, init_weights, device, cuda_graph)
    del init_weights  # the model holds its own copy now
    run = Run(cfg, model_cfg, engine, prepared, tokenizer, rank, world_size, device, precision)
    if resume_from:
        run.restore(resume_from, trainer_state)
    run.start(resume_from, source)
    try:
        return run.finish(run.loop())
    finally:
        run.close()


def checkpoint_model(
    cfg: RunConfig, source: InitSource, trainer_state: dict[str, Any]
) -> tuple[ModelConfig, dict[str, torch.Tensor] | None]:
    """The architecture of ``init_from`` (reconciled with the run config's ``model:``) and its weights; when
    resuming, the architecture the checkpoint recorded and no weights (the checkpoint's replace them)."""
    if trainer_state:
        ckpt_cfg, weights = ModelConfig.from_dict(trainer_state["run_config"]["model"]), None
    else:
        ckpt_cfg, weights = load_init_weights(source)
    model_cfg = reconcile_model(cfg.model, ckpt_cfg, cfg.init_from)
    try:  # the config was validated against its own model: section; check it against the checkpoint's
        validate_run(dataclasses.replace(cfg, model=model_cfg))
    except ConfigError as e:
        raise ConfigError(f"init_from={cfg.init_from}: {e}") from None
    return model_cfg, weights


def build_training_engine(
    cfg: RunConfig,
    model_cfg: ModelConfig,
    world_size: int,
    precision: str,
    resume_from: Path | None,
    init_weights: dict[str, torch.Tensor] | None = None,
    device: torch.device | None = None,
    cuda_graph: bool = False,
):
    """The model, our AdamW over its trainable parameters, and the DeepSpeed engine. On CUDA the AdamW
    step is torch's fused kernel (one launch for all parameters; the bench measures what it gains).
    ``cuda_graph``: the model's training forward and backward replay CUDA graphs (``GraphedTraining``),
    installed after DeepSpeed has placed the parameters, which the graphs then read in place.

    Order: build, load ``init_weights`` (plain names), adapt per ``finetune:`` (LoRA renames the adapted
    layers' weights), then load a resumed checkpoint, which holds the adapted names.
    """
    t = cfg.train
    model = HybridLM(model_cfg)
    if init_weights is not None:
        load_into(model, init_weights, "init_from", Path(cfg.init_from))
    model = adapt_for_finetuning(model, cfg.finetune)
    if resume_from:
        load_into(model, ckpt_io.load_weights(resume_from), "resume", resume_from)
    model.checkpoint_every = {"none": 0, "every": 1}.get(t.activation_checkpointing, t.activation_checkpointing)
    model.loss_chunk_tokens = t.loss_chunk_tokens
    optimizer = AdamW(
        param_groups(model, t.weight_decay),
        guard=t.zero_stage == 0,
        clip=t.grad_clip,
        lr=t.lr,
        betas=t.betas,
        eps=1e-8,
        fused=device is not None and device.type == "cuda",
    )
    engine = build_engine(model, optimizer, deepspeed_config(t, world_size, precision, model))
    if cuda_graph:
        GraphedTraining(model)
    return engine


def adapt_for_finetuning(model: HybridLM, finetune: FinetuneConfig) -> HybridLM:
    """``finetune:`` applied (LoRA adapters, frozen parameters); the model untouched when it asks for neither."""
    if finetune.lora.r == 0 and not finetune.freeze:
        return model
    from hybridlm.train.lora import apply_finetune  # peft: slow to import, and an optional dependency

    return apply_finetune(model, finetune)


def seed_everything(seed: int) -> None:
    """Same seed on every rank: the model is initialised identically everywhere (ZeRO-3 partitions each
    rank's own copy); nothing random happens per rank during training."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _prepare_data(cfg: RunConfig, rank: int) -> Path:
    """Rank 0 prepares (idempotent); the others wait, then find the prepared directory. Instruction data is
    packed into rows of ``train.seq_len`` here (text data ignores it)."""
    if rank == 0:
        prepared = prepare(cfg.data, seq_len=cfg.train.seq_len)
    barrier()
    if rank != 0:
        prepared = prepare(cfg.data, seq_len=cfg.train.seq_len)
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


def check_resumable(trainer_state: dict[str, Any], model_cfg: ModelConfig, finetune: FinetuneConfig, ckpt: Path):
    """Resuming needs the architecture and the ``finetune:`` setup (which parameters exist and train) the
    checkpoint was trained with; name the first key that differs."""
    saved = trainer_state["run_config"]
    differences = (
        *config_diff(saved["model"], model_cfg.to_dict(), "model"),
        *config_diff(saved.get("finetune", {}), dataclasses.asdict(finetune), "finetune"),
    )
    if differences:
        key, (then, now) = differences[0]
        raise ConfigError(f"resume={ckpt}: the checkpoint has {key}={then!r} but this config has {now!r}")


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

    def __init__(self, cfg, model_cfg, engine, prepared, tokenizer, rank, world_size, device, precision):
        self.cfg, self.model_cfg, self.engine = cfg, model_cfg, engine
        self.prepared, self.tokenizer = prepared, tokenizer
        self.manifest = read_manifest(prepared) if prepared is not None else {"kind": "task"}
        self.rank, self.world_size, self.device = rank, world_size, device
        self.precision = precision
        self.out_dir = Path(cfg.out_dir)
        t = cfg.train
        self.loader = make_loader(cfg, model_cfg, prepared, "train", rank, world_size)
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

    def start(self, resume_from: Path | None, source: InitSource | None) -> None:
        """Record the resolved config, drop metrics past the resumed step, and say what is about to run."""
        if self.rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            resolved = {**self.cfg.to_dict(), "model": self.model_cfg.to_dict()}
            (self.out_dir / "config.json").write_text(json.dumps(resolved, indent=2) + "\n")
            truncate_metrics(self.out_dir, self.step)
        t, m = self.cfg.train, self.model_cfg
        kernels = ops.kernel_table(self.device)
        lines = [
            f"model: {_count(self.engine.module.parameters()) / 1e6:.2f}M parameters, layers {m.layers}, "
            f"vocab {m.vocab_size}" + (f" (tokenizer {len(self.tokenizer)})" if self.tokenizer is not None else ""),
            f"engine: DeepSpeed ZeRO-{t.zero_stage}, {self.world_size} rank(s) on {self.device.type}, "
            f"precision {self.precision}, activation checkpointing {t.activation_checkpointing}, "
            f"CUDA graphs {'on' if installed_graph(self.engine.module) else 'off'}",
            f"batch: {t.micro_batch_size} x {t.seq_len} tokens x {t.grad_accum} accum x {self.world_size} ranks "
            f"= {self.tokens_per_step} tokens/step; {self.flops_per_token / 1e6:.1f} MFLOPs/token (train)",
            "kernels: " + ", ".join(f"{op}={impl}" for op, impl in kernels.items()),
            describe_data(self.prepared, self.manifest, task_source(self.cfg)),
        ]
        finetune = self.cfg.finetune
        if source is not None:
            lines.append(f"architecture and tokenizer from init_from={source.describe()}")
        if source is not None or finetune.lora.r > 0 or finetune.freeze:
            lines.append(describe_finetune(finetune, self.engine.module))
        if resume_from:
            lines.append(f"resumed from {resume_from} at step {self.step}")
        elif source is not None:
            lines.append(f"weights from init_from={source.describe()}")
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
            out = engine(batch["input_ids"], doc_ids=batch.get("doc_ids"), labels=batch["labels"])
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
        """Token-weighted validation loss over ``eval_batches`` batches per rank (the same batches every time),
        fewer when one pass over the split takes fewer; for instruction data, over the response tokens."""
        t = self.cfg.train
        val = make_loader(self.cfg, self.model_cfg, self.prepared, "val", self.rank, self.world_size)
        rows = getattr(val, "num_rows", None)  # a synthetic task's split has no end
        one_pass = -(-rows // (t.micro_batch_size * self.world_size)) if rows else t.eval_batches
        self.engine.eval()
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        for _ in range(min(t.eval_batches, one_pass)):
            batch = {k: v.to(self.device) for k, v in val.next_batch().items()}
            out = self.engine(batch["input_ids"], doc_ids=batch.get("doc_ids"), labels=batch["labels"])
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
            self.out_dir, self.step, self.engine, self.model_cfg, state, self.cfg.train.keep_last, self.tokenizer
        )
        say(f"checkpoint {self.last_saved} written in {time.perf_counter() - start:.1f}s", self.rank)
        return self.last_saved

    def close(self) -> None:
        self.stop.restore()
        if self.bar is not None:
            self.bar.close()
        self.metrics.close()

    # ------------------------------------------------------------------------------------------

    def finish(self, result: dict[str, Any]) -> dict[str, Any]:
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
            model_dir = export_model(
                self.last_saved, self.tokenizer, self.out_dir / MODEL_DIR, self.model_cfg, self.cfg.finetune.lora
            )
            final["model_dir"] = str(model_dir)
            plot = plot_loss(self.out_dir)
            final["loss_plot"] = str(plot) if plot else None
            if self.cfg.train.sample_tokens and self.tokenizer is not None:
                final["sample"] = generate_sample(model_dir, self.tokenizer, self.prepared, self.cfg, self.device)
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


def export_model(ckpt: Path, tokenizer, out: Path, model_cfg: ModelConfig, lora: LoRAConfig | None = None) -> Path:
    """``out`` = the checkpoint's weights in save_pretrained format plus the tokenizer files. With LoRA
    (``lora.r > 0``) the adapters are merged: plain HybridLM names, as ``from_pretrained`` and
    ``convert to-hf`` expect."""
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if lora is not None and lora.r > 0:
        from hybridlm.train.lora import merge_lora_weights

        ckpt_io.write_weights(tmp, merge_lora_weights(ckpt_io.load_weights(ckpt), lora), model_cfg)
    else:
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            shutil.copy2(ckpt / name, tmp / name)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def generate_sample(model_dir: Path, tokenizer, prepared: Path, cfg: RunConfig, device: torch.device) -> str:
    """Continue the start of the validation split with the exported model: its first 16 tokens (text data),
    or its first example's prompt, answered greedily up to EOS (instruction data)."""
    model = HybridLM.from_pretrained(model_dir, device=device)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    if read_manifest(prepared)["kind"] == "instruct":
        prompt = first_val_prompt(prepared, cfg.train.seq_len).to(device)
        out = model.generate(prompt, cfg.train.sample_tokens, temperature=0.0, eos_token_id=tokenizer.eos_token_id)
    else:
        prompt = PackedLoader(prepared, "val", min(16, cfg.train.seq_len), 1).next_batch()["input_ids"].to(device)
        out = model.generate(prompt, cfg.train.sample_tokens, temperature=0.8, top_k=50, generator=generator)
    return tokenizer.decode(prompt[0]) + " ⟶ " + tokenizer.decode(out[0, prompt.shape[1] :])


def first_val_prompt(prepared: Path, seq_len: int) -> torch.Tensor:
    """(1, n) tokens of the first validation example up to its first response token (its first label != -100)."""
    row = PackedLoader(prepared, "val", seq_len, 1, shuffle=False).next_batch()
    first_response = int((row["labels"][0] != -100).nonzero()[0])  # the row starts with its first example
    return row["input_ids"][:, :first_response]


def describe_data(prepared: Path | None, manifest: dict[str, Any], task: SourceConfig | None = None) -> str:
    """The start-up line about the data; for instruction data its examples and every overlong decision."""
    if task is not None:
        return f"data: synthetic task {task.task} (n_pairs {task.n_pairs}), generated on the fly from the seed"
    if manifest.get("kind") != "instruct":
        return f"data: {prepared}"
    info, splits = manifest["instruct"], manifest["splits"]
    over = info["overlong"]
    return (
        f"data: {prepared} (instruct: {splits['train']['documents']} train / {splits['val']['documents']} val "
        f"examples in {splits['train']['rows']} + {splits['val']['rows']} rows, chat template {info['chat_template']}, "
        f"{info['response_tokens']} response tokens; longer than seq_len {over['seq_len']}: {over['truncated']} "
        f"truncated, {over['dropped']} dropped (data.overlong={over['policy']}))"
    )


def describe_finetune(finetune: FinetuneConfig, module: torch.nn.Module) -> str:
    """The start-up line about what trains: everything, LoRA adapters, or all but the frozen parameters."""
    params = list(module.parameters())
    trainable = _count(p for p in params if p.requires_grad)
    share = f"{trainable / 1e6:.3f}M of {_count(params) / 1e6:.2f}M parameters train"
    parts = []
    if finetune.lora.r > 0:
        adapted = sum(name.endswith(".lora_A.default.weight") for name, _ in module.named_parameters())
        lora = finetune.lora
        parts.append(f"LoRA r={lora.r} alpha={lora.alpha:g} dropout={lora.dropout:g} on {adapted} modules")
    if finetune.freeze:
        parts.append(f"frozen: {', '.join(finetune.freeze)}")
    return f"finetune: {'; '.join(parts) or 'all parameters (full fine-tuning)'}; {share}"


def _count(params) -> int:
    """Elements of ``params`` (their full size under ZeRO-3, where each rank holds a partition)."""
    return sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in params)


def _number(x: Any) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))
