"""The attention sub-layer: (partial) RoPE, no positional encoding, sliding window, GQA."""

import torch

from hybridlm import HybridLM
from hybridlm.model.attention import Rotary

HEAD_DIM = 8  # tiny config: d_model 32 / 4 heads


def test_partial_rope_rotates_only_the_first_fraction(tiny_model):
    model = tiny_model(pattern="*", attention={"rope_fraction": 0.5})
    rotary = model.layers[0].mixer.rotary
    assert rotary.dim == HEAD_DIM // 2
    x = torch.randn(1, 6, 4, HEAD_DIM)
    out = rotary(x, torch.arange(6))
    assert torch.equal(out[..., HEAD_DIM // 2 :], x[..., HEAD_DIM // 2 :])  # the second half passes through
    torch.testing.assert_close(out[:, 0], x[:, 0])  # position 0 is the identity
    assert not torch.allclose(out[:, 1:, :, : HEAD_DIM // 2], x[:, 1:, :, : HEAD_DIM // 2])
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1))  # a rotation


def test_rope_scores_depend_only_on_relative_position():
    rotary = Rotary(HEAD_DIM, theta=10000.0)
    q, k = torch.randn(1, 1, 1, HEAD_DIM), torch.randn(1, 1, 1, HEAD_DIM)

    def score(m, n):
        return (rotary(q, torch.tensor([m])) * rotary(k, torch.tensor([n]))).sum()

    torch.testing.assert_close(score(5, 2), score(12, 9))
    assert not torch.allclose(score(5, 2), score(5, 4))


def test_without_rope_attention_is_blind_to_the_order_of_the_past(tiny_model):
    ids = torch.randint(0, 61, (1, 8))
    permuted = torch.cat([ids[:, :7].flip(1), ids[:, 7:]], dim=1)
    no_rope = tiny_model(pattern="*-", attention={"rope": False})  # one layer: exactly order-blind
    assert no_rope.layers[0].mixer.rotary is None
    with torch.no_grad():
        torch.testing.assert_close(no_rope(permuted).logits[:, -1], no_rope(ids).logits[:, -1], atol=1e-5, rtol=1e-4)
        rope = tiny_model(pattern="*-")
        assert not torch.allclose(rope(permuted).logits[:, -1], rope(ids).logits[:, -1], atol=1e-4)


def test_sliding_window_hides_keys_older_than_the_window(tiny_model):
    ids = torch.randint(0, 61, (1, 10))
    changed = ids.clone()
    changed[0, 0] = (ids[0, 0] + 1) % 61
    windowed = tiny_model(pattern="*-", attention={"window": 3})  # one attention layer: receptive field 3
    with torch.no_grad():
        a, b = windowed(ids).logits, windowed(changed).logits
        torch.testing.assert_close(a[:, 3:], b[:, 3:], atol=1e-6, rtol=0)
        assert not torch.allclose(a[:, 2], b[:, 2], atol=1e-4)
        full = tiny_model(pattern="*-")
        assert not torch.allclose(full(ids).logits[:, 9], full(changed).logits[:, 9], atol=1e-4)


def test_gqa_equals_mha_with_shared_key_value_heads(tiny_config):
    gqa = HybridLM(tiny_config(pattern="*-", attention={"n_heads": 4, "n_kv_heads": 2})).eval()
    mha = HybridLM(tiny_config(pattern="*-", attention={"n_heads": 4, "n_kv_heads": None})).eval()
    assert gqa.layers[0].mixer.k_proj.weight.shape == (2 * HEAD_DIM, 32)
    state = gqa.state_dict()
    for name in ("layers.0.mixer.k_proj.weight", "layers.0.mixer.v_proj.weight"):
        # each kv head serves two query heads: repeat it in place
        state[name] = state[name].unflatten(0, (2, HEAD_DIM)).repeat_interleave(2, dim=0).flatten(0, 1)
    mha.load_state_dict(state)
    ids = torch.randint(0, 61, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(gqa(ids).logits, mha(ids).logits, atol=1e-5, rtol=1e-4)


def test_rope_positions_restart_in_each_packed_document(tiny_model):
    model = tiny_model(pattern="*-")
    ids = torch.randint(0, 61, (1, 4))
    doubled = torch.cat([ids, ids], dim=1)
    doc_ids = torch.tensor([[0] * 4 + [1] * 4])
    with torch.no_grad():
        out = model(doubled, doc_ids=doc_ids).logits
    torch.testing.assert_close(out[:, 4:], out[:, :4], atol=1e-5, rtol=1e-4)
