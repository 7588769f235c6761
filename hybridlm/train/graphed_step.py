"""A HybridLM's training forward and backward replayed from two CUDA graphs.

At a few thousand tokens per micro-batch a training step is bound by the host, not the GPU: Python
issues ~1,500 kernels per step (many through Triton's launcher and autotuner) and the GPU waits for
them. Captured once, the forward is one graph launch and the backward another; the optimizer step
stays eager (fused AdamW is a few launches) so the learning rate, clipping and DeepSpeed's gradient
hooks work as before.

``GraphedTraining`` installs itself as ``model.forward``. A call that trains (``model.training``, grad
enabled, ``labels`` given, no cache) with the batch shape it captured replays; every other call
(evaluation, generation, another shape) runs the model eagerly. The loss it returns is wired into
autograd through ``_Replay``: ``loss.backward()`` (or DeepSpeed's ``engine.backward``) replays the
backward graph and hands the parameter gradients to autograd, which accumulates them into ``.grad``
as for any other op, so gradient accumulation and ZeRO-1/2 reduction hooks see ordinary gradients.

A graph replays fixed addresses: parameters must keep their storage (ZeRO-3 re-gathers them, so it
is refused), the batch is copied into static input buffers, and the activations of one micro-batch
live in the graph's memory until its backward has run: a second training forward before the first's
backward is an error, not a silent overwrite.

Under autocast the step casts the linear layers' weights itself (``cast_once``). Autocast casts each fp32
weight to bf16 as a layer uses it and each weight's gradient back to fp32 in the backward, a kernel per weight
each way (~128 of each for the 500M config, of ~2,360 launches a step), and the handoff then copies every fp32
gradient out of its static buffer. Instead the captured forward casts them all with one multi-tensor copy
before the model runs (the layers find bf16 weights, which autocast leaves alone), the captured backward ends
at those bf16 copies, and the handoff copies every gradient out with one multi-tensor copy per dtype (casting
those back to fp32) into new tensors, which ``.grad`` takes without another copy. The same roundings as
autocast's, so the same numbers.
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING

import torch

from hybridlm import ops
from hybridlm.config import ConfigError, TrainConfig
from hybridlm.model.decoding import graph_unsupported
from hybridlm.model.model import LMOutput

if TYPE_CHECKING:
    from collections.abc import Iterator

    from hybridlm.config import ModelConfig
    from hybridlm.model.model import HybridLM

log = logging.getLogger("hybridlm.train")

WARMUP_STEPS = 3  # eager forward + backward before capture: compile, autotune, allocate outside the graph


def training_graph_unsupported(cfg: ModelConfig, device: torch.device, zero_stage: int) -> str | None:
    """Why training steps of a ``cfg`` model on ``device`` under ZeRO ``zero_stage`` cannot be replayed
    from CUDA graphs, or None."""
    if reason := graph_unsupported(cfg, device):
        return reason
    if zero_stage == 3:
        return "ZeRO-3 gathers each layer's parameters into new buffers on every step"
    return None


def cast_once_names(model: torch.nn.Module, trainable: dict[str, torch.Tensor], dtype: torch.dtype | None) -> list[str]:
    """The names in ``trainable`` that ``CapturedLoss`` casts to the autocast ``dtype`` once per step: fp32
    weights of ``nn.Linear`` layers, used by that layer alone. Tied weights (the embedding reads its table in
    fp32), parameters a block hands to kernels itself (``params_read_directly``) and biases (Mamba-1's dt bias
    is read in fp32) keep autocast's casting, or none."""
    if dtype is None:
        return []
    names_of: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(p), []).append(name)
    read_directly = {
        id(p) for m in model.modules() if hasattr(m, "params_read_directly") for p in m.params_read_directly()
    }
    linear_weights = {id(m.weight) for m in model.modules() if type(m) is torch.nn.Linear}
    chosen = []
    for name, p in trainable.items():
        key = id(model.get_parameter(name))
        if key in linear_weights and key not in read_directly and len(names_of[key]) == 1 and p.dtype == torch.float32:
            chosen.append(name)
    return chosen


def resolve_cuda_graph(t: TrainConfig, cfg: ModelConfig, device: torch.device) -> bool:
    """``train.cuda_graph``: ``auto`` captures wherever it can; ``true`` where it cannot is an error."""
    reason = training_graph_unsupported(cfg, device, t.zero_stage)
    if t.cuda_graph is True and reason:
        raise ConfigError(f"train.cuda_graph=true, but training steps cannot be CUDA graphs here: {reason}")
    return t.cuda_graph is not False and reason is None


class CapturedLoss:
    """The training loss of ``model`` for one batch shape, with its forward and backward captured as
    CUDA graphs over static input, loss and gradient buffers. ``capture=False`` runs the same
    procedure eagerly on every call (what a CPU test can check). ``cast_once``: cast the linear layers' weights
    for autocast together (``cast_once_names``), else one by one as autocast does."""

    def __init__(
        self, model: HybridLM, batch: dict[str, torch.Tensor | None], capture: bool = True, cast_once: bool = True
    ):
        self.model = model
        trained = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in trained]
        # The graphs differentiate with respect to aliases of the parameters (same storage, fresh autograd
        # leaves): autograd's accumulation nodes of the parameters themselves may be held by others (ZeRO-2
        # hooks) on another stream, and a captured backward must not synchronise with it.
        self.leaves = {name: p.detach().requires_grad_() for name, p in trained}
        self.inputs = {k: None if v is None else v.clone() for k, v in batch.items()}
        # The autocast of the first call is baked into the graph; later calls must run under the same one.
        self.device_type = batch["input_ids"].device.type
        self.autocast_dtype = _autocast_dtype(self.device_type)
        self.cast_names = cast_once_names(model, self.leaves, self.autocast_dtype) if cast_once else []
        self.grad_loss = torch.ones((), device=batch["input_ids"].device)
        self.differentiated: list[torch.Tensor] = []  # what the backward differentiates with respect to
        self.loss: torch.Tensor | None = None
        self.grads: tuple[torch.Tensor | None, ...] = ()
        self.awaiting_backward = False
        self.graphs: tuple[torch.cuda.CUDAGraph, torch.cuda.CUDAGraph] | None = None
        if capture:
            self._capture()

    def matches(self, batch: dict[str, torch.Tensor | None]) -> bool:
        """Whether ``batch`` fits the static buffers and runs under the captured autocast."""
        if _autocast_dtype(self.device_type) != self.autocast_dtype or batch.keys() != self.inputs.keys():
            return False
        for key, static in self.inputs.items():
            value = batch[key]
            if (value is None) != (static is None):
                return False
            if value is not None and (value.shape != static.shape or value.dtype != static.dtype):
                return False
        return True

    def _loss(self) -> torch.Tensor:
        # Autocast's weight cache would keep the casts of the first capture's weights: off, every
        # replay casts the current weights.
        enabled = self.autocast_dtype is not None
        autocast = torch.autocast(
            self.device_type, dtype=self.autocast_dtype or torch.bfloat16, enabled=enabled, cache_enabled=False
        )
        params = dict(self.leaves)
        if self.cast_names:
            # autograd leaves of their own: the backward stops at them, and ``backward`` casts their gradients
            cast = [torch.empty_like(self.leaves[name], dtype=self.autocast_dtype) for name in self.cast_names]
            torch._foreach_copy_(cast, [self.leaves[name].detach() for name in self.cast_names])
            params.update((name, c.requires_grad_()) for name, c in zip(self.cast_names, cast, strict=True))
        self.differentiated = list(params.values())
        with autocast, _as_written(self.model):
            return torch.func.functional_call(self.model, params, kwargs=self.inputs).loss

    def _grads(self) -> tuple[torch.Tensor | None, ...]:
        return torch.autograd.grad(self.loss, self.differentiated, self.grad_loss, allow_unused=True)

    def _capture(self) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                self.loss = self._loss()
                self._grads()
        torch.cuda.current_stream().wait_stream(side)
        # Drop the last warm-up graph: alive, its leaves' accumulation nodes (made on the side stream) would
        # be reused by the capture, which would then wait on the side stream.
        self.loss = None
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # the warm-up's blocks belong to the side stream: give them back
        pool = torch.cuda.graph_pool_handle()
        forward, backward = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with torch.cuda.graph(forward, pool=pool):
            self.loss = self._loss()
        with torch.cuda.graph(backward, pool=pool):
            self.grads = self._grads()
        self.loss = self.loss.detach()  # keep the loss buffer, drop the autograd graph it no longer needs
        self.graphs = (forward, backward)

    def forward(self, batch: dict[str, torch.Tensor | None]) -> torch.Tensor:
        """Copy ``batch`` into the static inputs and run (replay) the forward; returns the loss."""
        if self.awaiting_backward:
            raise RuntimeError(
                "a second training forward before the previous one's backward: the CUDA-graphed step keeps one "
                "micro-batch's activations (run backward first, or set train.cuda_graph=false)"
            )
        for key, static in self.inputs.items():
            if static is not None:
                static.copy_(batch[key])
        if self.graphs is None:
            with torch.enable_grad():
                self.loss = self._loss()
        else:
            self.graphs[0].replay()
        self.awaiting_backward = True
        return self.loss.detach().clone()  # the next replay overwrites the static loss

    def backward(self, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """Run (replay) the backward for the last forward with ``grad_loss`` as d(output)/d(loss); returns
        the gradient of every trainable parameter (None where unused) in the parameter's dtype, as new tensors."""
        if not self.awaiting_backward:
            raise RuntimeError("backward of the CUDA-graphed step without a forward")
        self.grad_loss.copy_(grad_loss)
        if self.graphs is None:
            grads = self._grads()
            if not self.grads:
                self.grads = tuple(None if g is None else torch.empty_like(g) for g in grads)
            for static, g in zip(self.grads, grads, strict=True):
                if static is not None:
                    static.copy_(g)
        else:
            self.graphs[1].replay()
        self.awaiting_backward = False
        # Copied out of the static buffers, which the next replay overwrites, into new tensors that .grad can
        # keep (or autograd adds into .grad): one multi-tensor copy per dtype, casting the bf16 gradients of the
        # weights cast once, where autograd would clone each buffer on its own.
        grads: list[torch.Tensor | None] = [None] * len(self.grads)
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, g in enumerate(self.grads):
            if g is not None:
                by_dtype.setdefault(g.dtype, []).append(i)
        for index in by_dtype.values():
            copies = [torch.empty_like(self.grads[i], dtype=self.params[i].dtype) for i in index]
            torch._foreach_copy_(copies, [self.grads[i] for i in index])
            for i, g in zip(index, copies, strict=True):
                grads[i] = g
        return tuple(grads)


class _Replay(torch.autograd.Function):
    """Connects the captured loss to autograd: its inputs are the parameters, its backward their gradients."""

    @staticmethod
    def forward(ctx, captured: CapturedLoss, batch: dict, *params: torch.Tensor) -> torch.Tensor:
        ctx.captured = captured
        return captured.forward(batch)

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        return (None, None, *ctx.captured.backward(grad_loss))


class GraphedTraining:
    """Replaces ``model.forward``: training calls of the first shape seen replay CUDA graphs (captured on
    that call), the rest run eagerly. ``remove`` restores the model's own forward and frees the graphs."""

    def __init__(self, model: HybridLM, capture: bool = True, cast_once: bool = True):
        self.model = model
        self.eager_forward = model.forward
        self.capture = capture
        self.cast_once = cast_once
        self.captured: CapturedLoss | None = None
        model.forward = self.forward

    def replays(self, batch: dict[str, torch.Tensor | None], cache, num_last_tokens: int) -> bool:
        """Whether this call can use (or create) the captured step."""
        if not (self.model.training and torch.is_grad_enabled()) or cache is not None or num_last_tokens:
            return False
        if batch["labels"] is None:
            return False
        if batch["doc_ids"] is not None and ops.syncs_host_on_packed_rows(batch["input_ids"].device):
            return False
        return self.captured is None or self.captured.matches(batch)

    def forward(self, input_ids, doc_ids=None, labels=None, cache=None, num_last_tokens: int = 0) -> LMOutput:
        batch = {"input_ids": input_ids, "doc_ids": doc_ids, "labels": labels}
        if not self.replays(batch, cache, num_last_tokens):
            return self.eager_forward(input_ids, doc_ids, labels, cache, num_last_tokens)
        if self.captured is None:
            what = "captured" if self.capture else "run eagerly (capture=False)"
            log.info("training step of batch %s: forward and backward %s as CUDA graphs", tuple(input_ids.shape), what)
            self.captured = CapturedLoss(self.model, batch, self.capture, self.cast_once)
        params = self.captured.params
        return LMOutput(None, _Replay.apply(self.captured, batch, *params))

    def remove(self) -> None:
        with contextlib.suppress(AttributeError):
            del self.model.forward  # the instance attribute: the class's forward shows again
        self.captured = None


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


@contextlib.contextmanager
def _as_written(model: torch.nn.Module) -> Iterator[None]:
    """``model`` with its class's forward while the step is warmed up, captured or run eagerly."""
    installed = model.__dict__.pop("forward", None)
    try:
        yield
    finally:
        if installed is not None:
            model.forward = installed


def installed_graph(model: torch.nn.Module) -> GraphedTraining | None:
    """The ``GraphedTraining`` installed on ``model``, if any."""
    owner = getattr(model.forward, "__self__", None)
    return owner if isinstance(owner, GraphedTraining) else None
