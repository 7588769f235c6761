"""Attention: the explicit reference's masking semantics, and the SDPA path against the reference."""

import pytest
import torch

from hybridlm.ops.attn import attention_ref, attention_sdpa, doc_cu_seqlens

BATCH, HEADS, KV_HEADS, HEAD_DIM = 2, 4, 2, 8


def qkv(tq: int, tk: int, kv_heads: int = KV_HEADS):
    return (
        torch.randn(BATCH, tq, HEADS, HEAD_DIM),
        torch.randn(BATCH, tk, kv_heads, HEAD_DIM),
        torch.randn(BATCH, tk, kv_heads, HEAD_DIM),
    )


DOC_IDS = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2, 2, 2], [5, 5, 5, 5, 5, 5, 7, 7, 7, 7]])


@pytest.mark.parametrize(
    "tq, tk, kv_heads, window, doc_ids, scale",
    [
        (10, 10, HEADS, None, None, None),  # MHA
        (10, 10, KV_HEADS, None, None, None),  # GQA
        (10, 10, 1, 3, None, None),  # MQA + sliding window
        (10, 10, KV_HEADS, None, DOC_IDS, None),  # packed documents
        (10, 10, KV_HEADS, 2, DOC_IDS, 0.1),  # both, and an explicit scale
        (3, 10, KV_HEADS, None, None, None),  # queries at the end of a longer key sequence (chunked prefill)
        (3, 10, KV_HEADS, 4, None, None),
        (1, 10, KV_HEADS, None, None, None),  # one-token decode
        (1, 10, KV_HEADS, 4, None, None),
    ],
)
def test_sdpa_equals_reference(tq, tk, kv_heads, window, doc_ids, scale):
    q, k, v = qkv(tq, tk, kv_heads)
    ref = attention_ref(q, k, v, True, window, doc_ids, scale)
    out = attention_sdpa(q, k, v, True, window, doc_ids, scale)
    assert out.shape == (BATCH, tq, HEADS, HEAD_DIM)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


def test_reference_gqa_equals_mha_with_repeated_kv():
    q, k, v = qkv(6, 6)
    rep = HEADS // KV_HEADS
    mha = attention_ref(q, k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2))
    torch.testing.assert_close(attention_ref(q, k, v), mha)


def test_reference_queries_see_only_allowed_keys():
    q, k, v = qkv(10, 10)
    base = attention_ref(q, k, v, window=3, doc_ids=DOC_IDS)
    for t in range(10):
        k2, v2 = k.clone(), v.clone()
        k2[:, t] += 5.0
        v2[:, t] += 5.0
        out = attention_ref(q, k2, v2, window=3, doc_ids=DOC_IDS)
        for b in range(BATCH):
            for s in range(10):
                visible = t <= s and s - t < 3 and DOC_IDS[b, t] == DOC_IDS[b, s]
                changed = not torch.allclose(out[b, s], base[b, s], atol=1e-6)
                assert changed == visible, (b, s, t)


def test_decode_query_matches_the_last_row_of_full_attention():
    q, k, v = qkv(10, 10)
    full = attention_ref(q, k, v, window=4)
    last = attention_sdpa(q[:, -1:], k, v, window=4)
    torch.testing.assert_close(last, full[:, -1:], atol=1e-5, rtol=1e-4)


def test_doc_cu_seqlens_counts_documents_across_rows():
    cu_seqlens, max_len = doc_cu_seqlens(DOC_IDS)
    assert cu_seqlens.tolist() == [0, 3, 7, 10, 16, 20]
    assert cu_seqlens.dtype == torch.int32 and max_len == 6


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("impl", [attention_ref, attention_sdpa], ids=["reference", "sdpa"])
def test_query_start_in_a_fixed_buffer_equals_the_filled_prefix(impl, window):
    """A decode query at position p of a 12-slot KV buffer (slots past p hold stale values) attends like the
    same query at the end of keys 0..p."""
    q, k, v = qkv(1, 12)
    k[:, 8:], v[:, 8:] = 1e4, 1e4  # stale slots must be masked, not averaged in
    for p in [0, 4, 7]:
        got = impl(q, k, v, True, window, None, None, torch.tensor([p]))
        torch.testing.assert_close(got, attention_ref(q, k[:, : p + 1], v[:, : p + 1], True, window))
