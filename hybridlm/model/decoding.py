"""Decoders: prefill a prompt, then step one token at a time, each returning the next-token logits.

``EagerDecoder`` runs the model as written, on any device, with a fresh cache per prompt. A decode step
is a few hundred small kernels, and at batch 1 launching them from Python takes far longer than running
them. ``GraphedDecoder`` captures one step as a CUDA graph and replays it: one launch per token. A graph
replays fixed addresses and shapes, so its cache is allocated once for ``batch`` rows of up to
``max_seqlen`` tokens, prefill writes into it, and the step reads the token's position from a device
tensor (``InferenceCache.position``) rather than from Python. ``decode`` is the sampling loop over either.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from hybridlm.model.cache import InferenceCache

if TYPE_CHECKING:
    from hybridlm.config import ModelConfig
    from hybridlm.model.model import HybridLM

WARMUP_STEPS = 2  # eager steps before capture: compile, autotune and allocate outside the graph


class EagerDecoder:
    def __init__(self, model: HybridLM, max_seqlen: int = 0):
        self.model = model
        self.max_seqlen = max_seqlen  # positions each KV cache reserves at prefill (0: the prompt's)
        self.cache = InferenceCache(max_seqlen=max_seqlen)

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Run the prompt (batch, t); returns the logits (batch, vocab) of the token after it."""
        self.cache = InferenceCache(max_seqlen=self.max_seqlen)
        return self.model(input_ids, cache=self.cache, num_last_tokens=1).logits[:, -1]

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (batch,); returns the logits (batch, vocab) of the next."""
        return self.model(tokens[:, None], cache=self.cache).logits[:, -1]

    def require_room(self, batch: int, positions: int) -> None:
        """Any batch and length fit: the KV buffers grow when they must."""


class GraphedDecoder:
    """One-token steps of fixed shape, replayed from a CUDA graph (``capture=False`` runs the same
    fixed-shape step eagerly: what a CPU test can check). The logits a step returns live in a buffer
    the next step overwrites. The graph, its cache and its buffers are held until the decoder is dropped."""

    def __init__(self, model: HybridLM, batch: int, max_seqlen: int, capture: bool = True):
        weight = model.embed_tokens.weight
        if capture and (reason := graph_unsupported(model.cfg, weight.device)):
            raise ValueError(f"cannot capture the decode step as a CUDA graph: {reason}")
        self.model, self.batch, self.max_seqlen = model, batch, max_seqlen
        self.cache = model.allocate_cache(batch, max_seqlen, weight.device, weight.dtype)
        self.cache.position = torch.zeros(1, dtype=torch.long, device=weight.device)
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=weight.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        if capture:
            self._capture()

    def _run_step(self) -> torch.Tensor:
        """The model on ``self.tokens`` at ``self.cache.position``; the Python-side length is left as it was."""
        seqlen = self.cache.seqlen_offset
        self.cache.seqlen_offset = max(seqlen, 1)  # > 0: the layers take their one-token path
        logits = self.model(self.tokens, cache=self.cache).logits[:, -1]
        self.cache.set_length(seqlen)
        return logits

    @torch.no_grad()
    def _capture(self) -> None:
        # The warm-up and captured steps write into the cache (at position 0, into the Mamba states):
        # harmless, since every prefill overwrites both.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                self._run_step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._run_step()

    def require_room(self, batch: int, positions: int) -> None:
        """Raise unless ``batch`` rows of ``positions`` cached tokens fit the captured buffers."""
        if batch != self.batch or positions > self.max_seqlen:
            raise ValueError(
                f"{batch} row(s) of {positions} positions do not fit a decoder captured for batch {self.batch} "
                f"and {self.max_seqlen} positions"
            )

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        self.require_room(*input_ids.shape)
        self.cache.set_length(0)
        return self.model(input_ids, cache=self.cache, num_last_tokens=1).logits[:, -1]

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        seqlen = self.cache.seqlen_offset
        if seqlen >= self.max_seqlen:
            raise ValueError(f"the decoder holds {self.max_seqlen} positions and all are filled")
        self.tokens.copy_(tokens[:, None])
        self.cache.position.fill_(seqlen)
        if self.graph is not None:
            self.graph.replay()
            logits = self.logits
        else:
            logits = self._run_step()
        self.cache.set_length(seqlen + 1)
        return logits


def graph_unsupported(cfg: ModelConfig, device: torch.device) -> str | None:
    """Why the decode step of a model of ``cfg`` on ``device`` cannot be a CUDA graph, or None."""
    if torch.device(device).type != "cuda":
        return "the model is not on a CUDA device"
    if "E" in cfg.layers:  # routing sizes each expert's batch from the data: shapes change every step
        return "MoE layers route a data-dependent number of tokens to each expert"
    return None


@torch.no_grad()
def decode(
    decoder: EagerDecoder | GraphedDecoder,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    sample_fn,
    eos_token_id: int | None = None,
) -> torch.Tensor:
    """Prefill ``input_ids``, then sample up to ``max_new_tokens`` with ``sample_fn(logits) -> tokens``;
    returns prompt + new tokens. Stops early when every row has produced ``eos_token_id``."""
    # the last new token is sampled, never fed back: the cache holds prompt + new - 1 positions at most
    decoder.require_room(input_ids.shape[0], input_ids.shape[1] + max(max_new_tokens - 1, 0))
    tokens = [input_ids]
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    logits = decoder.prefill(input_ids)
    for i in range(max_new_tokens):
        next_token = sample_fn(logits)
        tokens.append(next_token[:, None])
        if eos_token_id is not None:
            done |= next_token == eos_token_id
            if done.all():
                break
        if i + 1 < max_new_tokens:  # the last token's logits are never used
            logits = decoder.step(next_token)
    return torch.cat(tokens, dim=1)
