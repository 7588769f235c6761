"""The preallocated KV cache: in-place appends equal concatenation, growth past the reservation,
and decoding with it gives the same tokens as an unreserved cache and the full forward."""

import pytest
import torch

from hybridlm.model import InferenceCache
from hybridlm.model.cache import KVCache


def kv(batch: int, t: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(batch, t, 2, 8, dtype=dtype), torch.randn(batch, t, 2, 8, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("capacity", [0, 5, 64])  # no reservation, one that runs out, one that never does
def test_appends_equal_concatenation(capacity, dtype):
    keys, values = kv(3, 3, dtype)
    cache = KVCache(keys, values, capacity=capacity)
    for t in [1, 2, 4, 1, 7, 1]:
        new_keys, new_values = kv(3, t, dtype)
        keys, values = torch.cat([keys, new_keys], dim=1), torch.cat([values, new_values], dim=1)
        got_keys, got_values = cache.append(new_keys, new_values)
        assert torch.equal(got_keys, keys) and torch.equal(got_values, values)
        assert torch.equal(cache.keys, keys) and torch.equal(cache.values, values)
        assert cache.length == keys.shape[1] <= cache.capacity
        assert got_keys.dtype == dtype
        # the returned keys are a view of the cache's storage, not a fresh copy
        assert got_keys.data_ptr() == cache.key_buffer.data_ptr()
    if capacity >= cache.length:  # a large enough reservation is kept as it is
        assert cache.capacity == capacity


def test_appends_within_the_reservation_never_reallocate():
    cache = KVCache(*kv(2, 4), capacity=10)
    buffers = cache.key_buffer.data_ptr(), cache.value_buffer.data_ptr()
    for _ in range(6):
        cache.append(*kv(2, 1))
    assert (cache.key_buffer.data_ptr(), cache.value_buffer.data_ptr()) == buffers
    assert cache.length == cache.capacity == 10
    cache.append(*kv(2, 1))  # full: one reallocation, doubling
    assert cache.capacity == 20 and cache.key_buffer.data_ptr() != buffers[0]
    cache.append(*kv(2, 30))  # needs more than doubling gives (41 > 40): exactly what is needed
    assert cache.capacity == cache.length == 41


def test_nbytes_counts_the_reserved_positions(tiny_model):
    model = tiny_model(pattern="M*")
    cache = InferenceCache(max_seqlen=100)
    with torch.no_grad():
        model(torch.randint(0, 61, (2, 4)), cache=cache)
    mamba, attn = cache.layers[0], cache.layers[1]
    assert attn.capacity == 100 and attn.keys.shape[1] == 4
    kv_bytes = 2 * 2 * 100 * model.cfg.n_kv_heads * model.cfg.head_dim * 4  # keys + values, batch 2, fp32
    mamba_bytes = (mamba.conv_state.numel() + mamba.ssm_state.numel()) * 4
    assert cache.nbytes() == kv_bytes + mamba_bytes


def step_by_step_greedy(model, prompt: torch.Tensor, new_tokens: int, cache: InferenceCache) -> torch.Tensor:
    seq = prompt
    with torch.no_grad():
        logits = model(prompt, cache=cache).logits[:, -1]
        for _ in range(new_tokens):
            next_token = logits.argmax(-1, keepdim=True)
            seq = torch.cat([seq, next_token], dim=1)
            logits = model(next_token, cache=cache).logits[:, -1]
    return seq


@pytest.mark.parametrize("overrides", [{"pattern": "M*-*-"}, {"pattern": "*-M*", "attention": {"window": 3}}])
def test_generate_with_reservation_equals_unreserved_stepping_and_full_forward(tiny_model, monkeypatch, overrides):
    model = tiny_model(**overrides)
    prompt = torch.randint(0, 61, (2, 5))
    reference = step_by_step_greedy(model, prompt, 12, InferenceCache())  # grows by doubling

    grows = []
    original_grow = KVCache._grow
    monkeypatch.setattr(
        KVCache, "_grow", lambda self, capacity: grows.append(capacity) or original_grow(self, capacity)
    )
    out = model.generate(prompt, max_new_tokens=12, temperature=0)
    assert grows == []  # generate reserved every position it needs
    assert torch.equal(out, reference)
    with torch.no_grad():
        full_argmax = model(out).logits[:, prompt.shape[1] - 1 : -1].argmax(-1)
    assert torch.equal(out[:, prompt.shape[1] :], full_argmax)


def test_a_too_small_reservation_grows_and_still_matches_the_full_forward(tiny_model):
    model = tiny_model(pattern="M*-*-")
    ids = torch.randint(0, 61, (2, 16))
    cache = InferenceCache(max_seqlen=7)
    with torch.no_grad():
        full = model(ids).logits
        steps = [model(ids[:, :5], cache=cache).logits]
        assert cache.layers[1].capacity == 7
        steps += [model(ids[:, t : t + 1], cache=cache).logits for t in range(5, ids.shape[1])]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-4)
    for layer in (1, 3):
        assert cache.layers[layer].length == 16 and cache.layers[layer].capacity >= 16
