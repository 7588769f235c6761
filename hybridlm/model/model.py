"""HybridLM: token embedding, the sub-layers of the layer pattern, final norm and LM head;
``generate`` with a constant-size Mamba state and a KV cache; safetensors save/load."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.checkpoint import checkpoint

from hybridlm import ops
from hybridlm.config import ModelConfig
from hybridlm.model.attention import Attention
from hybridlm.model.block import Block, LayerContext
from hybridlm.model.cache import InferenceCache, empty_kv_cache
from hybridlm.model.decoding import EagerDecoder, GraphedDecoder, decode, graph_unsupported
from hybridlm.model.mamba1 import Mamba1
from hybridlm.model.mamba2 import Mamba2
from hybridlm.model.moe import MoE
from hybridlm.model.norm import RMSNorm
from hybridlm.model.packing import doc_starts, positions_from_doc_ids, seq_idx_from_doc_ids

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
# Parameters the Mamba authors require in fp32 whatever the compute dtype.
FP32_PARAM_SUFFIXES = ("A_log", "D", "dt_bias", "dt_proj.bias")
# Buffers updated by small increments outside SGD (the sigmoid router's load-balancing bias).
FP32_BUFFER_SUFFIXES = ("expert_bias",)
OUTPUT_PROJECTIONS = ("o_proj", "out_proj", "down_proj")


@dataclass
class LMOutput:
    logits: torch.Tensor | None  # (batch, seqlen, vocab_size); None when the loss was computed in chunks
    loss: torch.Tensor | None = None  # mean next-token cross-entropy over labels != -100
    aux_loss: torch.Tensor | None = None  # MoE load-balancing loss summed over MoE layers (unweighted)


class HybridLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.padded_vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(kind, cfg, i) for i, kind in enumerate(cfg.layers))
        self.norm_f = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.padded_vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.checkpoint_every = 0  # activation checkpointing: every k-th sub-layer (0 = off), set by the trainer
        self.loss_chunk_tokens = 0  # > 0: loss over chunks of this many tokens, never all logits at once
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        std = self.cfg.init_std
        out_std = std / math.sqrt(len(self.layers))  # one residual add per sub-layer
        for name, p in self.named_parameters():
            if p.dim() < 2 or "dt_proj" in name or "conv1d" in name or name.endswith(FP32_PARAM_SUFFIXES):
                continue  # norms, biases, SSM parameters (Mamba-1's A_log is 2-D) and convs keep their own init
            writes_residual = any(part in OUTPUT_PROJECTIONS for part in name.split("."))
            nn.init.normal_(p, std=out_std if writes_residual else std)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear) and module.bias is not None and not name.endswith("dt_proj"):
                nn.init.zeros_(module.bias)

    def forward(
        self,
        input_ids: torch.Tensor,  # (batch, seqlen)
        doc_ids: torch.Tensor | None = None,  # (batch, seqlen): packed documents never see each other
        labels: torch.Tensor | None = None,  # (batch, seqlen), aligned with input_ids; shifted here
        cache: InferenceCache | None = None,
        num_last_tokens: int = 0,  # > 0: logits of the last positions only (prefill needs one, not (B, T, V))
    ) -> LMOutput:
        if num_last_tokens and labels is not None:
            raise ValueError("num_last_tokens drops the logits the loss needs: pass labels or num_last_tokens")
        if cache is not None and cache.seqlen_offset > 0 and input_ids.shape[1] > 1:
            # Mamba layers step one token at a time once a cache holds state
            steps = [self(input_ids[:, t : t + 1], cache=cache).logits for t in range(input_ids.shape[1])]
            return LMOutput(torch.cat(steps, dim=1))
        ctx = self._context(input_ids, doc_ids, cache)
        hidden, residual = self.embed_tokens(input_ids), None
        for i, block in enumerate(self.layers):
            if self.checkpoint_every and self.training and i % self.checkpoint_every == 0:
                hidden, residual = checkpoint(block, hidden, residual, ctx, use_reentrant=False)
            else:
                hidden, residual = block(hidden, residual, ctx)
        if cache is not None:
            cache.seqlen_offset += input_ids.shape[1]
        aux = [b.mixer.aux_loss for b in self.layers if isinstance(b.mixer, MoE)]
        aux_loss = torch.stack(aux).sum() if aux else None
        h, _ = self.norm_f(hidden, residual, prenorm=True)
        if labels is not None and self.loss_chunk_tokens:
            loss = chunked_cross_entropy(h, self.lm_head, labels, self.cfg.vocab_size, self.loss_chunk_tokens)
            return LMOutput(None, loss, aux_loss)
        if num_last_tokens:
            h = h[:, -num_last_tokens:]
        logits = self.lm_head(h)[..., : self.cfg.vocab_size]
        loss = None
        if labels is not None:
            targets = next_token_targets(labels)
            loss = ops.cross_entropy(logits.flatten(0, 1), targets) / (targets != -100).sum().clamp_min(1)
        return LMOutput(logits, loss, aux_loss)

    def _context(self, input_ids, doc_ids, cache) -> LayerContext:
        if doc_ids is None:
            offset = cache.seqlen_offset if cache is not None else 0
            if offset and cache.position is not None:  # a fixed-shape step (CUDA graph): position on the device
                return LayerContext(positions=cache.position, cache=cache)
            positions = torch.arange(offset, offset + input_ids.shape[1], device=input_ids.device)
            return LayerContext(positions=positions, cache=cache)
        return LayerContext(
            positions=positions_from_doc_ids(doc_ids),
            doc_ids=doc_ids,
            seq_idx=seq_idx_from_doc_ids(doc_ids),
            reset=doc_starts(doc_ids),
            cache=cache,
        )

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        eos_token_id: int | None = None,
        generator: torch.Generator | None = None,
        cuda_graph: bool | None = None,
        decoder: EagerDecoder | GraphedDecoder | None = None,
    ) -> torch.Tensor:
        """Prefill the prompt, then decode one token at a time; returns prompt + new tokens.
        ``temperature=0`` is greedy. Stops early when every row has produced ``eos_token_id``.
        ``cuda_graph``: replay each step from a CUDA graph (None: whenever the model supports it, see
        ``decoding.graph_unsupported``). Pass a ``decoder`` from ``self.decoder`` to reuse one capture."""
        was_training = self.training
        self.eval()
        if decoder is None:
            decoder = self.decoder(input_ids.shape[0], input_ids.shape[1] + max_new_tokens, cuda_graph)
        out = decode(
            decoder, input_ids, max_new_tokens, lambda x: sample(x, temperature, top_p, top_k, generator), eos_token_id
        )
        self.train(was_training)
        return out

    def decoder(self, batch: int, max_seqlen: int, cuda_graph: bool | None = None) -> EagerDecoder | GraphedDecoder:
        """A decoder for prompts of ``batch`` rows and up to ``max_seqlen`` tokens in all (prompt + new).
        ``cuda_graph=True`` raises where the step cannot be captured; None captures where it can."""
        if cuda_graph is None:
            cuda_graph = graph_unsupported(self.cfg, self.embed_tokens.weight.device) is None
        if cuda_graph:
            return GraphedDecoder(self, batch, max_seqlen)
        return EagerDecoder(self, max_seqlen)

    def allocate_cache(self, batch: int, max_seqlen: int, device, dtype: torch.dtype) -> InferenceCache:
        """A cache with every layer's state allocated up front: KV buffers of ``max_seqlen`` positions,
        zeroed Mamba states. Prefill writes into them (``InferenceCache.store_kv`` / ``store_mamba``)."""
        cache = InferenceCache(max_seqlen=max_seqlen)
        for block in self.layers:
            mixer = block.mixer
            if isinstance(mixer, Attention):
                kv = empty_kv_cache(batch, max_seqlen, mixer.n_kv_heads, mixer.head_dim, device, dtype)
                cache.layers[mixer.layer_idx] = kv
            elif isinstance(mixer, (Mamba1, Mamba2)):
                cache.layers[mixer.layer_idx] = mixer.empty_state(batch, device, dtype)
        return cache

    def cast(self, dtype: torch.dtype) -> HybridLM:
        """Cast to ``dtype`` except the SSM parameters that must stay fp32."""
        self.to(dtype)
        for name, p in self.named_parameters():
            if name.endswith(FP32_PARAM_SUFFIXES):
                p.data = p.data.float()
        for name, b in self.named_buffers():
            if name.endswith(FP32_BUFFER_SUFFIXES):
                b.data = b.data.float()
        return self

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def save_pretrained(self, out_dir: str | Path) -> None:
        """Write config.json and model.safetensors (tied weights stored once)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.contiguous() for k, v in self.state_dict().items()}
        if self.cfg.tie_embeddings:
            state.pop("lm_head.weight")
        save_file(state, out / WEIGHTS_FILE, metadata={"format": "pt"})
        (out / CONFIG_FILE).write_text(json.dumps({"model": self.cfg.to_dict()}, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> HybridLM:
        """Load a ``save_pretrained`` directory (safetensors only: nothing is unpickled)."""
        path = Path(path)
        for f in (CONFIG_FILE, WEIGHTS_FILE):
            if not (path / f).is_file():
                raise FileNotFoundError(f"{path / f} not found: not a hybridlm checkpoint directory")
        cfg = ModelConfig.from_dict(json.loads((path / CONFIG_FILE).read_text())["model"])
        model = cls(cfg)
        state = load_file(path / WEIGHTS_FILE, device=str(device))
        if cfg.tie_embeddings:
            state["lm_head.weight"] = state["embed_tokens.weight"]
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{path / WEIGHTS_FILE}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
        dtypes = {v.dtype for k, v in state.items() if not k.endswith(FP32_PARAM_SUFFIXES + FP32_BUFFER_SUFFIXES)}
        model.to(device)
        if dtypes and dtypes != {torch.float32}:
            model.cast(dtypes.pop())
        return model


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """(batch * seqlen,) targets for every position's logits: the next label, and -100 (ignored) after a row's
    last token. Scoring all positions keeps the logits' flatten a view: slicing off the last position
    instead copied the (tokens, vocab) logits forward and backward (7.7 ms of a 280 ms step at 8x4096)."""
    return F.pad(labels[:, 1:], (0, 1), value=-100).flatten()


def chunked_cross_entropy(
    h: torch.Tensor,  # (batch, seqlen, d_model), after the final norm
    head: nn.Module,  # the LM head, called as a module so ZeRO-3 gathers it and LoRA applies
    labels: torch.Tensor,  # (batch, seqlen), aligned with the inputs; shifted here
    vocab_size: int,
    chunk_tokens: int,
) -> torch.Tensor:
    """Mean next-token cross-entropy computed ``chunk_tokens`` positions at a time. Each chunk's logits are
    recomputed in backward rather than stored, so the fp32 (tokens, vocab) matrix never exists whole:
    a 131k-token sequence with a 50k vocabulary would need 26 GB for it."""
    hidden = h.flatten(0, 1)
    targets = next_token_targets(labels)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_tokens):
        chunk = slice(start, start + chunk_tokens)
        total = total + checkpoint(
            _summed_cross_entropy, hidden[chunk], head, targets[chunk], vocab_size, use_reentrant=False
        )
    return total / (targets != -100).sum().clamp_min(1)


def _summed_cross_entropy(hidden, head: nn.Module, targets, vocab_size: int) -> torch.Tensor:
    return ops.cross_entropy(head(hidden)[:, :vocab_size], targets)


def sample(
    logits: torch.Tensor, temperature: float, top_p: float, top_k: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Next token per row from (batch, vocab) logits: greedy at temperature 0, else top-k / nucleus sampling."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop = cum - torch.softmax(sorted_logits, dim=-1) > top_p  # keep the smallest set reaching top_p
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
