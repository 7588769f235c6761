"""Inference: prefill + one-token steps with the cache reproduce the full forward; generate."""

import pytest
import torch

from hybridlm.model import InferenceCache
from hybridlm.model.cache import KVCache, MambaState
from hybridlm.model.model import sample

MODELS = {
    "mamba2_hybrid": {"pattern": "M*-M*E"},
    "mamba1_hybrid": {"pattern": "M*-", "mamba": {"version": 1}},
    "mamba1_inner_norms": {"pattern": "ME", "mamba": {"version": 1, "inner_norms": True}},
    "attention_window": {"pattern": "*-*-", "attention": {"window": 3}},
    "attention_no_rope_partial": {"pattern": "*-", "attention": {"rope": False}},
    "attention_partial_rope": {"pattern": "*-", "attention": {"rope_fraction": 0.5}},
}


@pytest.mark.parametrize("prefill", [1, 3, 6])  # shorter than the conv width, and not a multiple of the chunk
@pytest.mark.parametrize("overrides", MODELS.values(), ids=MODELS.keys())
def test_cached_decoding_reproduces_the_full_forward(tiny_model, overrides, prefill):
    model = tiny_model(**overrides)
    ids = torch.randint(0, 61, (2, 11))
    with torch.no_grad():
        full = model(ids).logits
        cache = InferenceCache()
        steps = [model(ids[:, :prefill], cache=cache).logits]
        for t in range(prefill, ids.shape[1]):
            steps.append(model(ids[:, t : t + 1], cache=cache).logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-4)
    assert cache.seqlen_offset == ids.shape[1]


def test_several_tokens_after_prefill_are_stepped_one_by_one(tiny_model):
    model = tiny_model(pattern="M*-", mamba={"version": 2})
    ids = torch.randint(0, 61, (1, 10))
    with torch.no_grad():
        full = model(ids).logits
        cache = InferenceCache()
        model(ids[:, :4], cache=cache)
        rest = model(ids[:, 4:], cache=cache).logits
    torch.testing.assert_close(rest, full[:, 4:], atol=1e-5, rtol=1e-4)


def test_cache_state_size_is_constant_for_mamba_and_grows_for_attention(tiny_model):
    model = tiny_model(pattern="M*")
    cache = InferenceCache()
    with torch.no_grad():
        model(torch.randint(0, 61, (1, 5)), cache=cache)
        mamba_bytes = cache.layers[0].ssm_state.numel() + cache.layers[0].conv_state.numel()
        for _ in range(3):
            model(torch.randint(0, 61, (1, 1)), cache=cache)
    assert isinstance(cache.layers[0], MambaState) and isinstance(cache.layers[1], KVCache)
    assert cache.layers[0].ssm_state.numel() + cache.layers[0].conv_state.numel() == mamba_bytes
    assert cache.layers[1].keys.shape[1] == 8


@pytest.mark.parametrize("overrides", [MODELS["mamba2_hybrid"], MODELS["mamba1_hybrid"]], ids=["mamba2", "mamba1"])
def test_greedy_generate_equals_argmax_rollout_of_full_forwards(tiny_model, overrides):
    model = tiny_model(**overrides)
    prompt = torch.randint(0, 61, (2, 4))
    out = model.generate(prompt, max_new_tokens=6, temperature=0)
    assert out.dtype == torch.long and out.shape == (2, 10)
    assert torch.equal(out[:, :4], prompt)
    seq = prompt
    with torch.no_grad():
        for _ in range(6):
            next_token = model(seq).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, next_token], dim=1)
    assert torch.equal(out, seq)


def test_generate_stops_at_eos_and_restores_training_mode(tiny_model):
    model = tiny_model(pattern="M*-").train()
    prompt = torch.randint(0, 61, (1, 3))
    first = model.generate(prompt, max_new_tokens=1, temperature=0)[0, -1].item()
    out = model.generate(prompt, max_new_tokens=8, temperature=0, eos_token_id=first)
    assert out.shape == (1, 4) and out[0, -1].item() == first
    assert model.training


def test_generate_with_temperature_is_reproducible_with_a_generator(tiny_model):
    model = tiny_model(pattern="M*-")
    prompt = torch.randint(0, 61, (2, 3))
    a = model.generate(prompt, 5, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(1))
    b = model.generate(prompt, 5, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.dtype == torch.long and (a < 61).all()


def test_sampling_filters():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    gen = torch.Generator().manual_seed(0)
    assert sample(logits, 0.0, 1.0, 0).tolist() == [1]
    assert {sample(logits, 1.0, 1.0, 1, gen).item() for _ in range(20)} == {1}  # top_k=1 is greedy
    top2 = {sample(logits, 1.0, 1.0, 2, gen).item() for _ in range(200)}
    assert top2 == {1, 3}
    # nucleus: p(1)=0.64, p(3)=0.24 -> top_p=0.7 keeps exactly those two
    assert {sample(logits, 1.0, 0.7, 0, gen).item() for _ in range(200)} == {1, 3}


def test_num_last_tokens_gives_the_last_positions_of_the_full_logits(tiny_model):
    model = tiny_model(pattern="M-*-")
    ids = torch.randint(0, model.cfg.vocab_size, (2, 24))

    full = model(ids).logits
    assert torch.allclose(model(ids, num_last_tokens=3).logits, full[:, -3:], atol=1e-6)
    with pytest.raises(ValueError, match="num_last_tokens"):
        model(ids, labels=ids, num_last_tokens=1)


def test_chunked_loss_equals_the_full_loss_and_its_gradients(tiny_model):
    model = tiny_model(pattern="M-*-", tie_embeddings=False).train()
    ids = torch.randint(0, model.cfg.vocab_size, (2, 40))
    labels = ids.clone()
    labels[0, :7] = -100  # ignored positions must count the same way in both

    full = model(ids, labels=labels).loss
    full.backward()
    full_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.loss_chunk_tokens = 16  # 78 targets: chunks of 16, the last one partial
    out = model(ids, labels=labels)
    out.loss.backward()

    assert out.logits is None
    torch.testing.assert_close(out.loss, full, rtol=1e-6, atol=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, full_grads[name], rtol=1e-5, atol=1e-7, msg=name)
