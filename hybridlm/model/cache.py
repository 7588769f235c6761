"""Inference state: a constant-size conv + SSM state per Mamba layer, a preallocated KV cache per
attention layer. Created by ``HybridLM.generate`` (or by hand for step-by-step decoding)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class MambaState:
    conv_state: torch.Tensor  # (batch, conv_channels, d_conv): the last d_conv conv inputs
    ssm_state: torch.Tensor  # (batch, nheads, headdim, d_state) for Mamba-2, (batch, d_inner, d_state) for Mamba-1


class KVCache:
    """Keys/values of one attention layer in buffers of shape (batch, capacity, n_kv_heads, head_dim).

    Appending writes in place, so a decode step copies only its own token, not the whole cache as
    ``torch.cat`` would. When a buffer is full it is reallocated once to twice its capacity (or to what
    the append needs). ``keys`` / ``values`` are views of the filled part. The in-place writes make it an
    inference-only structure: do not backpropagate through several appends.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, capacity: int = 0):
        """Start from the prefill ``keys`` / ``values`` (batch, t, n_kv_heads, head_dim), reserving
        ``max(capacity, t)`` positions."""
        t = keys.shape[1]
        self.key_buffer, self.value_buffer = _reserve(keys, capacity), _reserve(values, capacity)
        self.key_buffer[:, :t] = keys
        self.value_buffer[:, :t] = values
        self.length = t

    @property
    def capacity(self) -> int:
        return self.key_buffer.shape[1]

    @property
    def keys(self) -> torch.Tensor:  # (batch, length, n_kv_heads, head_dim), a view of the buffer
        return self.key_buffer[:, : self.length]

    @property
    def values(self) -> torch.Tensor:
        return self.value_buffer[:, : self.length]

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``t`` new positions after the filled ones; returns all filled keys and values."""
        end = self.length + keys.shape[1]
        if end > self.capacity:
            self._grow(max(end, 2 * self.capacity))
        self.key_buffer[:, self.length : end] = keys
        self.value_buffer[:, self.length : end] = values
        self.length = end
        return self.keys, self.values

    def _grow(self, capacity: int) -> None:
        keys, values = self.keys, self.values
        self.key_buffer, self.value_buffer = _reserve(keys, capacity), _reserve(values, capacity)
        self.key_buffer[:, : self.length] = keys
        self.value_buffer[:, : self.length] = values

    def nbytes(self) -> int:
        """Reserved bytes (the whole buffers, filled or not)."""
        return sum(b.numel() * b.element_size() for b in (self.key_buffer, self.value_buffer))


def _reserve(like: torch.Tensor, capacity: int) -> torch.Tensor:
    """An empty buffer shaped like ``like`` (batch, t, ...) with room for ``max(capacity, t)`` positions."""
    return like.new_empty((like.shape[0], max(capacity, like.shape[1]), *like.shape[2:]))


@dataclass
class InferenceCache:
    """Per-layer state, keyed by sub-layer index; ``seqlen_offset`` counts tokens already seen.
    ``max_seqlen`` is how many positions each attention layer reserves at prefill (0: just the prompt);
    decoding past it still works, by reallocating the KV buffers."""

    layers: dict[int, MambaState | KVCache] = field(default_factory=dict)
    seqlen_offset: int = 0
    max_seqlen: int = 0

    def nbytes(self) -> int:
        """Bytes held, counting the reserved (not only the filled) part of each KV cache."""
        total = 0
        for state in self.layers.values():
            if isinstance(state, KVCache):
                total += state.nbytes()
            else:
                total += sum(t.numel() * t.element_size() for t in (state.conv_state, state.ssm_state))
        return total
