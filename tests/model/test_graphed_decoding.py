"""The fixed-shape decode step that CUDA graphs replay, run eagerly (``capture=False``): it must give the
logits of the ordinary cached step, reuse its buffers across prompts without leaking the previous one,
and refuse what it cannot hold. The captured graph itself is checked on a GPU in
tests/ops/test_fused_vs_reference.py."""

import pytest
import torch

from hybridlm.model.cache import KVCache, MambaState
from hybridlm.model.decoding import EagerDecoder, GraphedDecoder

MODELS = {
    "mamba2_hybrid_moe": {"pattern": "M*-M*E"},
    "mamba1_hybrid": {"pattern": "M*-", "mamba": {"version": 1}},
    "attention_window": {"pattern": "*-*-", "attention": {"window": 3}},
    "attention_partial_rope_gqa": {"pattern": "*-M", "attention": {"rope_fraction": 0.5, "n_kv_heads": 1}},
}


def rollout(decoder, prompt: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """Logits after the prompt and after each greedy token (copied: a graphed step reuses its buffer)."""
    logits = [decoder.prefill(prompt).clone()]
    for _ in range(steps):
        logits.append(decoder.step(logits[-1].argmax(-1)).clone())
    return logits


@pytest.mark.parametrize("overrides", MODELS.values(), ids=MODELS.keys())
def test_fixed_shape_steps_give_the_logits_of_the_cached_steps(tiny_model, overrides):
    model = tiny_model(**overrides)
    prompt = torch.randint(0, 61, (2, 5))
    with torch.no_grad():
        expected = rollout(EagerDecoder(model), prompt, 6)
        got = rollout(GraphedDecoder(model, batch=2, max_seqlen=12, capture=False), prompt, 6)
    for step, (a, b) in enumerate(zip(got, expected, strict=True)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=f"step {step}")


def test_a_second_prompt_reuses_the_buffers_and_forgets_the_first(tiny_model):
    model = tiny_model(pattern="M*-M*-")
    decoder = GraphedDecoder(model, batch=1, max_seqlen=16, capture=False)
    buffers = {i: s.key_buffer if isinstance(s, KVCache) else s.ssm_state for i, s in decoder.cache.layers.items()}
    with torch.no_grad():
        rollout(decoder, torch.randint(0, 61, (1, 9)), 5)  # fills 14 positions
        second = torch.randint(0, 61, (1, 3))
        got = rollout(decoder, second, 4)
        expected = rollout(EagerDecoder(model), second, 4)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    for i, state in decoder.cache.layers.items():  # the same tensors a captured graph would hold
        assert (state.key_buffer if isinstance(state, KVCache) else state.ssm_state) is buffers[i]
    assert decoder.cache.seqlen_offset == 3 + 4
    assert all(s.length == 7 for s in decoder.cache.layers.values() if isinstance(s, KVCache))


def test_allocated_cache_has_every_layer_at_full_size(tiny_model):
    model = tiny_model(pattern="M*-M", attention={"n_kv_heads": 1})
    cache = model.allocate_cache(3, 20, "cpu", torch.float32)
    assert sorted(cache.layers) == [0, 1, 3]  # the MLP holds nothing
    kv = cache.layers[1]
    assert isinstance(kv, KVCache) and kv.capacity == 20 and kv.length == 0
    assert kv.key_buffer.shape == (3, 20, 1, model.cfg.head_dim) and not kv.key_buffer.any()
    assert isinstance(cache.layers[0], MambaState) and not cache.layers[0].ssm_state.any()


def test_graphed_generate_equals_eager_generate(tiny_model):
    model = tiny_model(pattern="M*-")
    prompt = torch.randint(0, 61, (2, 4))
    eager = model.generate(prompt, 6, temperature=0, cuda_graph=False)
    fixed = model.generate(prompt, 6, temperature=0, decoder=GraphedDecoder(model, 2, 10, capture=False))
    assert torch.equal(fixed, eager)


def test_what_the_decoder_cannot_hold_is_refused(tiny_model):
    model = tiny_model(pattern="M*-")
    decoder = GraphedDecoder(model, batch=2, max_seqlen=6, capture=False)
    with pytest.raises(ValueError, match="1 row.* of 3 positions do not fit .* batch 2 and 6 positions"):
        decoder.prefill(torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="2 row.* of 7 positions do not fit"):
        decoder.prefill(torch.zeros(2, 7, dtype=torch.long))
    with torch.no_grad():
        logits = decoder.prefill(torch.zeros(2, 4, dtype=torch.long))
        logits = decoder.step(logits.argmax(-1))
        decoder.step(logits.argmax(-1))  # position 5, the last one
        with pytest.raises(ValueError, match="6 positions and all are filled"):
            decoder.step(logits.argmax(-1))


def test_generate_checks_the_decoders_room_before_any_work(tiny_model):
    model = tiny_model(pattern="M*-")
    decoder = GraphedDecoder(model, batch=1, max_seqlen=8, capture=False)
    prompt = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="of 9 positions do not fit"):
        model.generate(prompt, max_new_tokens=6, decoder=decoder)  # 4 + 6 - 1 positions
    assert decoder.cache.seqlen_offset == 0  # nothing was prefilled
    assert model.generate(prompt, max_new_tokens=5, decoder=decoder).shape == (1, 9)  # 4 + 5 - 1 = 8 fits


def test_capture_needs_cuda_and_no_moe(tiny_model):
    with pytest.raises(ValueError, match="not on a CUDA device"):
        tiny_model(pattern="M*-").generate(torch.zeros(1, 2, dtype=torch.long), 2, cuda_graph=True)
    # where no graph is possible, the default decodes eagerly
    assert isinstance(tiny_model(pattern="M*-").decoder(1, 8), EagerDecoder)


def test_kv_write_at_a_device_position_fills_that_slot_only():
    keys, values = torch.randn(2, 3, 1, 4), torch.randn(2, 3, 1, 4)
    cache = KVCache(keys, values, capacity=8)
    new_k, new_v = torch.randn(2, 1, 1, 4), torch.randn(2, 1, 1, 4)
    all_k, all_v = cache.write_at(torch.tensor([5]), new_k, new_v)
    assert all_k.shape[1] == 8 and all_k.data_ptr() == cache.key_buffer.data_ptr()
    assert torch.equal(all_k[:, 5], new_k[:, 0]) and torch.equal(all_v[:, 5], new_v[:, 0])
    assert torch.equal(all_k[:, :3], keys)
