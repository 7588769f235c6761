"""Typed run configuration: YAML + dotted overrides, parsed and validated here and nowhere else.

A run config has sections ``model:``, ``data:`` and ``train:`` plus a few top-level keys. Every
key is checked before any tensor is allocated: unknown keys (with a "did you mean"), wrong
types, and the shape constraints the layers and the fused kernels need. Errors are one line
that names the dotted key and the offending value. Past loading, code trusts the config.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from hybridlm.pattern import PatternError, expand_pattern, jamba_pattern


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names the key and the value."""


# ----------------------------------------------------------------------------------------------
# Model


@dataclass
class MambaConfig:
    version: Literal[1, 2] = 2
    d_state: int = 128
    d_conv: int = 4
    expand: int = 2
    head_dim: int = 64  # Mamba-2 only
    ngroups: int = 1  # Mamba-2 only: B/C groups; the gated norm normalises per group
    chunk_size: int = 256  # Mamba-2 only: SSD chunk length
    dt_rank: int | None = None  # Mamba-1 only; None = ceil(d_model / 16)
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    dt_limit: tuple[float, float] = (0.0, math.inf)
    A_init_range: tuple[float, float] = (1.0, 16.0)
    conv_bias: bool = True
    proj_bias: bool = False
    inner_norms: bool = False  # Mamba-1 only: RMSNorm on dt, B, C after x_proj (Jamba)


@dataclass
class AttentionConfig:
    n_heads: int = 8
    n_kv_heads: int | None = None  # None = n_heads (MHA)
    head_dim: int | None = None  # None = d_model // n_heads
    rope: bool = True
    rope_theta: float = 10000.0
    rope_fraction: float = 1.0  # fraction of each head's dims that RoPE rotates
    window: int | None = None  # sliding window (tokens); None = full causal
    bias: bool = False  # bias on q/k/v/o projections


@dataclass
class MLPConfig:
    d_ff: int = 0  # 0 = 4 * d_model for non-gated, 8/3 * d_model rounded to 64 for SwiGLU
    activation: Literal["swiglu", "relu2", "gelu"] = "swiglu"
    bias: bool = False


@dataclass
class MoEConfig:
    n_experts: int = 8
    top_k: int = 2
    d_ff: int | None = None  # None = mlp.d_ff
    router: Literal["softmax", "softmax_norm", "sigmoid"] = "softmax_norm"
    n_groups: int = 1
    topk_groups: int = 1
    scale: float = 1.0
    shared_d_ff: int = 0
    aux_loss_weight: float = 0.01


@dataclass
class JambaLayout:
    """Jamba-style layout: ``n_layers`` decoder layers, each a mixer followed by an FFN."""

    n_layers: int
    attn_period: int
    attn_offset: int = 0
    moe_period: int = 0
    moe_offset: int = 0


@dataclass
class ModelConfig:
    vocab_size: int = 256
    d_model: int = 256
    pattern: str | JambaLayout = "M-M-M-*-"
    tie_embeddings: bool = True
    vocab_pad_multiple: int = 64
    norm_eps: float = 1e-5
    init_std: float = 0.02
    mamba: MambaConfig = field(default_factory=MambaConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    mlp: MLPConfig = field(default_factory=MLPConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)

    # Derived quantities, named once so layers, FLOPs model and converters agree.
    @property
    def layers(self) -> str:
        """The canonical expanded pattern, one character per sub-layer."""
        if isinstance(self.pattern, JambaLayout):
            p = self.pattern
            return jamba_pattern(p.n_layers, p.attn_period, p.attn_offset, p.moe_period, p.moe_offset)
        return expand_pattern(self.pattern)

    @property
    def padded_vocab_size(self) -> int:
        m = self.vocab_pad_multiple
        return (self.vocab_size + m - 1) // m * m

    @property
    def d_inner(self) -> int:
        return self.mamba.expand * self.d_model

    @property
    def mamba_n_heads(self) -> int:
        return self.d_inner // self.mamba.head_dim

    @property
    def dt_rank(self) -> int:
        return self.mamba.dt_rank or math.ceil(self.d_model / 16)

    @property
    def conv_channels(self) -> int:
        """Channels the depthwise conv sees: x only for Mamba-1, x + B + C for Mamba-2."""
        if self.mamba.version == 1:
            return self.d_inner
        return self.d_inner + 2 * self.mamba.ngroups * self.mamba.d_state

    @property
    def head_dim(self) -> int:
        return self.attention.head_dim or self.d_model // self.attention.n_heads

    @property
    def n_kv_heads(self) -> int:
        return self.attention.n_kv_heads or self.attention.n_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.attention.rope_fraction) if self.attention.rope else 0

    @property
    def d_ff(self) -> int:
        if self.mlp.d_ff:
            return self.mlp.d_ff
        if self.mlp.activation == "swiglu":
            return (int(8 * self.d_model / 3) + 63) // 64 * 64
        return 4 * self.d_model

    @property
    def expert_d_ff(self) -> int:
        return self.moe.d_ff or self.d_ff

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Build and validate from the ``model:`` section of a run config."""
        cfg = _build(cls, d, "model")
        validate_model(cfg)
        return cfg

    @classmethod
    def from_yaml(cls, path: str | Path) -> ModelConfig:
        """Load the ``model:`` section of a YAML run config (or a YAML holding only model keys)."""
        raw = _read_yaml(path)
        return cls.from_dict(raw.get("model", raw) if isinstance(raw, dict) else raw)

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)


def validate_model(cfg: ModelConfig) -> None:
    """Cross-field checks for the model; each failure names the key and the value."""
    try:
        layers = cfg.layers
    except PatternError as e:
        raise ConfigError(f"model.pattern: {e}") from None
    _positive(cfg, "model", ["vocab_size", "d_model", "vocab_pad_multiple"])
    if "M" in layers:
        m = cfg.mamba
        _positive(m, "model.mamba", ["d_state", "d_conv", "expand"])
        if m.version == 2:
            if cfg.d_inner % m.head_dim:
                raise ConfigError(
                    f"model.mamba.head_dim={m.head_dim} does not divide d_inner = expand * d_model = {cfg.d_inner}"
                )
            if m.head_dim % 8:
                raise ConfigError(f"model.mamba.head_dim={m.head_dim} must be a multiple of 8 (fused SSD kernels)")
            if cfg.mamba_n_heads % m.ngroups:
                raise ConfigError(
                    f"model.mamba.ngroups={m.ngroups} must divide the number of Mamba-2 heads "
                    f"(d_inner / head_dim = {cfg.mamba_n_heads})"
                )
            if m.chunk_size <= 0 or m.chunk_size & (m.chunk_size - 1):
                raise ConfigError(f"model.mamba.chunk_size={m.chunk_size} must be a power of two")
        if cfg.conv_channels % 8:
            what = "d_inner" if m.version == 1 else "d_inner + 2*ngroups*d_state"
            raise ConfigError(
                f"model.mamba: conv channels {what} = {cfg.conv_channels} must be a multiple of 8 "
                "(causal-conv1d kernel)"
            )
        if m.inner_norms and m.version != 1:
            raise ConfigError("model.mamba.inner_norms=true applies to Mamba-1 only (model.mamba.version=1)")
        if m.dt_limit[0] < 0 or m.dt_limit[0] >= m.dt_limit[1]:
            raise ConfigError(f"model.mamba.dt_limit={list(m.dt_limit)} must satisfy 0 <= low < high")
    if "*" in layers:
        a = cfg.attention
        _positive(a, "model.attention", ["n_heads"])
        if a.head_dim is None and cfg.d_model % a.n_heads:
            raise ConfigError(f"model.d_model={cfg.d_model} is not divisible by model.attention.n_heads={a.n_heads}")
        if a.n_heads % cfg.n_kv_heads:
            raise ConfigError(
                f"model.attention.n_kv_heads={cfg.n_kv_heads} must divide model.attention.n_heads={a.n_heads}"
            )
        if not 0.0 < a.rope_fraction <= 1.0:
            raise ConfigError(f"model.attention.rope_fraction={a.rope_fraction} must be in (0, 1]")
        if a.rope and cfg.rotary_dim % 2:
            raise ConfigError(
                f"model.attention.rope_fraction={a.rope_fraction} rotates {cfg.rotary_dim} dims of "
                f"head_dim={cfg.head_dim}; the rotated part must be even"
            )
        if a.window is not None and a.window <= 0:
            raise ConfigError(f"model.attention.window={a.window} must be positive (or null for full)")
    if "E" in layers:
        e = cfg.moe
        _positive(e, "model.moe", ["n_experts", "top_k", "n_groups", "topk_groups"])
        if e.top_k > e.n_experts:
            raise ConfigError(f"model.moe.top_k={e.top_k} exceeds model.moe.n_experts={e.n_experts}")
        if e.n_experts % e.n_groups or e.topk_groups > e.n_groups:
            raise ConfigError(
                f"model.moe.n_groups={e.n_groups} must divide n_experts={e.n_experts} "
                f"and be >= topk_groups={e.topk_groups}"
            )
        if e.router != "sigmoid" and (e.n_groups != 1 or e.topk_groups != 1):
            raise ConfigError(f"model.moe.n_groups/topk_groups apply to router=sigmoid, not {e.router!r}")


# ----------------------------------------------------------------------------------------------
# Data


@dataclass
class SourceConfig:
    path: str | None = None  # file, directory or glob
    hf_dataset: str | None = None  # a name datasets.load_dataset accepts
    subset: str | None = None
    split: str = "train"
    text_field: str = "text"
    weight: float = 1.0
    task: Literal["mqar"] | None = None  # synthetic task instead of text (see hybridlm.eval)
    format: Literal["text", "instruct"] = "text"  # instruct: JSONL of {prompt, response} or {messages}
    n_pairs: int | list[int] = field(default_factory=lambda: [4, 8, 16, 32, 64])  # task mqar: key-value pairs
    power_a: float = 0.01  # task mqar: power-law exponent of the gaps between queries (Zoology)


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=list)  # empty = the embedded default corpus
    tokenizer: str | dict | None = None  # path, or {train: {vocab_size: N}}; None = train a small BPE
    prepared_dir: str | None = None  # None = data/prepared/<hash of this section>
    val_fraction: float = 0.02
    num_proc: int = 0  # tokenizer processes; 0 = all cores
    split_seed: int = 0
    token_dtype: Literal["auto", "uint16", "uint32"] = "auto"  # shard dtype; auto = uint16 when the vocab fits
    overlong: Literal["truncate", "drop"] = "truncate"  # instruct examples longer than train.seq_len
    chat_template: str | None = None  # Jinja template for {messages}; None = the tokenizer's, else the default


# ----------------------------------------------------------------------------------------------
# Training


@dataclass
class TrainConfig:
    max_steps: int = 200
    micro_batch_size: int = 8
    grad_accum: int = 1
    seq_len: int = 256
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    schedule: Literal["cosine", "linear", "wsd"] = "cosine"
    decay_fraction: float = 0.2  # wsd: share of steps spent decaying
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    save_every: int = 0  # 0 = only at the end
    keep_last: int = 2
    eval_every: int = 0  # 0 = only at the end
    eval_batches: int = 8
    log_every: int = 10
    zero_stage: Literal[0, 1, 2, 3] = 0
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto = bf16 autocast on GPU, fp32 on CPU
    activation_checkpointing: Literal["none", "every"] | int = "none"  # int k = every k-th layer
    offload_optimizer: bool = False
    deepspeed_config: str | None = None  # a DeepSpeed JSON whose keys override the generated one
    max_bad_steps: int = 5  # NaN/inf steps in a row before stopping
    sample_tokens: int = 64  # tokens generated at the end as a sample (0 = none)
    loss_chunk_tokens: int = 0  # > 0: cross-entropy over chunks of this many tokens (long sequences, big vocab)
    # replay each micro-batch's forward and backward from CUDA graphs (auto: on CUDA, without MoE or ZeRO-3)
    cuda_graph: Literal["auto"] | bool = "auto"


@dataclass
class LoRAConfig:
    r: int = 0  # rank; 0 = LoRA off
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "in_proj", "out_proj"]
    )


@dataclass
class FinetuneConfig:
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    freeze: list[str] = field(default_factory=list)  # regexes over parameter names to keep frozen


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    out_dir: str = "runs/default"
    seed: int = 0
    resume: str | None = None  # "auto" (latest in out_dir) or a checkpoint path
    init_from: str | None = None  # a hybridlm or HF checkpoint to start from
    kernels: Literal["auto", "reference"] = "auto"
    # ops that run unfused even where a fused kernel exists (one performance lever off, or debugging)
    reference_ops: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)


def validate_run(cfg: RunConfig) -> None:
    validate_model(cfg.model)
    t = cfg.train
    _positive(t, "train", ["max_steps", "micro_batch_size", "grad_accum", "seq_len"])
    if t.lr <= 0:
        raise ConfigError(f"train.lr={t.lr} must be positive")
    _validate_train(t)
    if t.cuda_graph is True and (t.zero_stage == 3 or "E" in cfg.model.layers):
        raise ConfigError(
            "train.cuda_graph=true replays fixed buffers and shapes: not with train.zero_stage=3 (it re-gathers "
            "parameters every step) or MoE layers in model.pattern (routing gives data-dependent shapes)"
        )
    if not 0.0 <= cfg.data.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction={cfg.data.val_fraction} must be in [0, 1)")
    for i, s in enumerate(cfg.data.sources):
        if sum(x is not None for x in (s.path, s.hf_dataset, s.task)) != 1:
            raise ConfigError(f"data.sources[{i}] needs exactly one of path, hf_dataset or task")
        if s.weight <= 0:
            raise ConfigError(f"data.sources[{i}].weight={s.weight} must be positive")
        if s.task is not None:
            _validate_task_source(cfg, i, s)
    for i, pattern in enumerate(cfg.finetune.freeze):
        try:
            re.compile(pattern)
        except re.error as e:
            raise ConfigError(f"finetune.freeze[{i}]={pattern!r} is not a valid regex ({e})") from None
    if cfg.finetune.lora.r < 0:
        raise ConfigError(f"finetune.lora.r={cfg.finetune.lora.r} must be >= 0")
    from hybridlm.ops.dispatch import OPS

    unknown = [op for op in cfg.reference_ops if op not in OPS]
    if unknown:
        raise ConfigError(f"reference_ops: unknown op {', '.join(map(repr, unknown))} (ops: {', '.join(OPS)})")
    m = cfg.model
    # with init_from the architecture comes from the checkpoint; the trainer checks seq_len against it
    if cfg.init_from is None and "M" in m.layers and m.mamba.version == 2 and t.seq_len % m.mamba.chunk_size:
        raise ConfigError(
            f"train.seq_len={t.seq_len} must be a multiple of model.mamba.chunk_size={m.mamba.chunk_size} "
            "(SSD chunked scan)"
        )


def _validate_train(t: TrainConfig) -> None:
    """Ranges of the ``train:`` keys the loop needs (``init_from`` is checked by ``train.init_from``)."""
    rules = [
        ("train.warmup_steps", t.warmup_steps, t.warmup_steps >= 0, "must be >= 0"),
        ("train.min_lr_ratio", t.min_lr_ratio, 0.0 <= t.min_lr_ratio <= 1.0, "must be in [0, 1]"),
        ("train.decay_fraction", t.decay_fraction, 0.0 < t.decay_fraction <= 1.0, "must be in (0, 1]"),
        ("train.weight_decay", t.weight_decay, t.weight_decay >= 0, "must be >= 0"),
        ("train.betas", list(t.betas), all(0.0 <= b < 1.0 for b in t.betas), "must both be in [0, 1)"),
        ("train.grad_clip", t.grad_clip, t.grad_clip >= 0, "must be >= 0 (0 = no clipping)"),
        ("train.save_every", t.save_every, t.save_every >= 0, "must be >= 0 (0 = only at the end)"),
        ("train.eval_every", t.eval_every, t.eval_every >= 0, "must be >= 0 (0 = only at the end)"),
        ("train.keep_last", t.keep_last, t.keep_last >= 1, "must be >= 1"),
        ("train.eval_batches", t.eval_batches, t.eval_batches >= 1, "must be >= 1"),
        ("train.log_every", t.log_every, t.log_every >= 1, "must be >= 1"),
        ("train.max_bad_steps", t.max_bad_steps, t.max_bad_steps >= 1, "must be >= 1"),
        ("train.sample_tokens", t.sample_tokens, t.sample_tokens >= 0, "must be >= 0"),
        ("train.loss_chunk_tokens", t.loss_chunk_tokens, t.loss_chunk_tokens >= 0, "must be >= 0 (0 = off)"),
        ("train.seq_len", t.seq_len, t.seq_len >= 2, "must be >= 2 (an input and a target)"),
    ]
    for key, value, ok, why in rules:
        if not ok:
            raise ConfigError(f"{key}={value} {why}")
    ac = t.activation_checkpointing
    if isinstance(ac, int) and ac < 1:
        raise ConfigError(f"train.activation_checkpointing={ac} must be 'none', 'every' or a layer period >= 1")
    if t.offload_optimizer and t.zero_stage == 0:
        raise ConfigError("train.offload_optimizer=true needs train.zero_stage >= 1 (ZeRO holds the offloaded state)")


def _validate_task_source(cfg: RunConfig, i: int, source: SourceConfig) -> None:
    from hybridlm.eval.tasks import check_mqar

    if len(cfg.data.sources) > 1:
        raise ConfigError(f"data.sources[{i}].task={source.task!r} must be the only source (it is not text to mix)")
    pairs = [source.n_pairs] if isinstance(source.n_pairs, int) else source.n_pairs
    try:
        check_mqar(cfg.model.vocab_size, cfg.train.seq_len, pairs, source.power_a)
    except ValueError as e:
        raise ConfigError(f"data.sources[{i}] (task {source.task}, model.vocab_size, train.seq_len): {e}") from None


def load_run_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Load a run config from YAML (or defaults when ``path`` is None), apply ``a.b=value`` overrides."""
    raw = _read_yaml(path) if path is not None else {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a run config must be a mapping of sections, got {type(raw).__name__}")
    for item in overrides:
        apply_override(raw, item)
    cfg = _build(RunConfig, raw, "")
    validate_run(cfg)
    return cfg


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set ``a.b.c=value`` in a nested dict; the value is parsed as YAML (numbers, bools, lists)."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} must look like key=value (e.g. model.d_model=512)")
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {part!r} is not a section")
    node[leaf] = yaml.safe_load(value) if value else None


# ----------------------------------------------------------------------------------------------
# Generic dataclass building with type checks


def _read_yaml(path: str | Path) -> Any:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        return yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if isinstance(raw, cls):
        return raw
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {prefix + '.' if prefix else ''}{close[0]}?" if close else ""
            raise ConfigError(f"unknown key {dotted}{hint}")
        kwargs[key] = _coerce(hints[key], value, dotted)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = {}
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, key)
            except ConfigError as e:
                errors[arg] = str(e)
        # a mapping meant for a nested section: its own error (e.g. an unknown key) says most
        section = next((a for a in errors if dataclasses.is_dataclass(a)), None)
        if isinstance(value, dict) and section is not None:
            raise ConfigError(errors[section])
        if len(errors) == 1:
            raise ConfigError(next(iter(errors.values())))
        raise ConfigError(f"{key}={value!r} has the wrong type ({_tname(tp)})")
    if origin is Literal:
        if value in args and not (isinstance(value, bool) and not any(isinstance(a, bool) for a in args)):
            return value
        raise ConfigError(f"{key}={value!r} must be one of {', '.join(repr(a) for a in args)}")
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}={value!r} must be a list")
        return [_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}={value!r} must be a list of {len(args)} values")
        return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True)))
    if tp is float:
        if isinstance(value, str):  # YAML reads "inf" and "3e-4" (no dot) as strings
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is dict:
        if isinstance(value, dict):
            return value
    elif isinstance(value, tp):
        return value
    raise ConfigError(f"{key}={value!r} must be of type {_tname(tp)}")


def _tname(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _positive(obj: Any, prefix: str, names: list[str]) -> None:
    for name in names:
        value = getattr(obj, name)
        if value <= 0:
            raise ConfigError(f"{prefix}.{name}={value} must be positive")


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    if isinstance(obj, float) and math.isinf(obj):
        return "inf"
    return obj
