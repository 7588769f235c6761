"""Inference state: a constant-size conv + SSM state per Mamba layer, a preallocated KV cache per
attention layer. Created by a decoder (``hybridlm.model.decoding``) or by hand for step-by-step decoding.

Prefill stores states through ``InferenceCache.store_kv`` / ``store_mamba``, which write into buffers
already there when they fit: a CUDA graph captured over those buffers keeps seeing the new prompt."""

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
        self.key_buffer, self.value_buffer = _reserve(keys, capacity), _reserve(values, capacity)
        self.reset(keys, values)

    def fits(self, keys: torch.Tensor) -> bool:
        """Whether a prefill of ``keys`` can be written into these buffers as they are."""
        b = self.key_buffer
        return keys.shape[0] == b.shape[0] and keys.shape[1] <= b.shape[1] and keys.shape[2:] == b.shape[2:]

    def reset(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Forget what is cached and hold ``keys`` / ``values`` (a new prefill), in the same buffers."""
        t = keys.shape[1]
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

    def write_at(
        self, position: torch.Tensor, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write one token's ``keys`` / ``values`` (batch, 1, ...) at ``position``, a (1,) int64 tensor on the
        buffers' device, and return the whole buffers: no Python integer decides where or how much, so a
        CUDA graph can replay it. The caller masks keys past ``position``; ``length`` is the caller's to set."""
        self.key_buffer.index_copy_(1, position, keys)
        self.value_buffer.index_copy_(1, position, values)
        return self.key_buffer, self.value_buffer

    def _grow(self, capacity: int) -> None:
        keys, values = self.keys, self.values
        self.key_buffer, self.value_buffer = _reserve(keys, capacity), _reserve(values, capacity)
        self.key_buffer[:, : self.length] = keys
        self.value_buffer[:, : self.length] = values

    def nbytes(self) -> int:
        """Reserved bytes (the whole buffers, filled or not)."""
        return sum(b.numel() * b.element_size() for b in (self.key_buffer, self.value_buffer))


def empty_kv_cache(batch: int, capacity: int, n_kv_heads: int, head_dim: int, device, dtype) -> KVCache:
    """A KV cache with ``capacity`` zeroed positions and none filled: zeros, not garbage, because masked
    keys still meet their values in some attention kernels, and 0 * NaN is NaN."""
    zeros = torch.zeros(batch, 0, n_kv_heads, head_dim, device=device, dtype=dtype)
    kv = KVCache(zeros, zeros, capacity)
    kv.key_buffer.zero_()
    kv.value_buffer.zero_()
    return kv


def _reserve(like: torch.Tensor, capacity: int) -> torch.Tensor:
    """An empty buffer shaped like ``like`` (batch, t, ...) with room for ``max(capacity, t)`` positions."""
    return like.new_empty((like.shape[0], max(capacity, like.shape[1]), *like.shape[2:]))


@dataclass
class InferenceCache:
    """Per-layer state, keyed by sub-layer index; ``seqlen_offset`` counts tokens already seen.
    ``max_seqlen`` is how many positions each attention layer reserves at prefill (0: just the prompt);
    decoding past it still works, by reallocating the KV buffers.

    ``position`` (a (1,) int64 tensor, or None) switches one-token steps to fixed shapes for CUDA graphs:
    the token's position is read from it on the device, attention layers write their keys there with
    ``KVCache.write_at`` and attend over the whole buffer, masked past it."""

    layers: dict[int, MambaState | KVCache] = field(default_factory=dict)
    seqlen_offset: int = 0
    max_seqlen: int = 0
    position: torch.Tensor | None = None

    def store_kv(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Prefill of an attention layer: into its KV buffers when they fit, else new ones."""
        kv = self.layers.get(layer_idx)
        if isinstance(kv, KVCache) and kv.fits(keys):
            kv.reset(keys, values)
        else:
            self.layers[layer_idx] = KVCache(keys, values, capacity=self.max_seqlen)

    def store_mamba(self, layer_idx: int, conv_state: torch.Tensor, ssm_state: torch.Tensor) -> None:
        """Prefill of a Mamba layer: copied into its state tensors when they have the same shapes, else kept."""
        state = self.layers.get(layer_idx)
        same = isinstance(state, MambaState) and all(
            old.shape == new.shape for old, new in ((state.conv_state, conv_state), (state.ssm_state, ssm_state))
        )
        if same:
            state.conv_state.copy_(conv_state)
            state.ssm_state.copy_(ssm_state)
        else:
            self.layers[layer_idx] = MambaState(conv_state, ssm_state)

    def set_length(self, seqlen: int) -> None:
        """Record that ``seqlen`` tokens are cached (after steps that ran without Python, as graph replays)."""
        self.seqlen_offset = seqlen
        for state in self.layers.values():
            if isinstance(state, KVCache):
                state.length = seqlen

    def nbytes(self) -> int:
        """Bytes held, counting the reserved (not only the filled) part of each KV cache."""
        total = 0
        for state in self.layers.values():
            if isinstance(state, KVCache):
                total += state.nbytes()
            else:
                total += sum(t.numel() * t.element_size() for t in (state.conv_state, state.ssm_state))
        return total
