"""No token sees the future, and packed documents never see each other, for every mixer kind."""

import pytest
import torch

from hybridlm.model.packing import doc_ids_from_cu_seqlens, positions_from_doc_ids, seq_idx_from_doc_ids

MIXERS = {
    "attention": {"pattern": "*-"},
    "mamba2": {"pattern": "M-"},
    "mamba1": {"pattern": "M-", "mamba": {"version": 1}},
    "mamba1_inner_norms": {"pattern": "M-", "mamba": {"version": 1, "inner_norms": True}},
    "moe": {"pattern": "ME", "moe": {"shared_d_ff": 16}},
    "hybrid_window": {"pattern": "M*-M*E", "attention": {"window": 3}},
    "hybrid_mamba1_no_rope": {"pattern": "M*-", "mamba": {"version": 1}, "attention": {"rope": False}},
}


@pytest.mark.parametrize("overrides", MIXERS.values(), ids=MIXERS.keys())
def test_changing_a_token_changes_no_earlier_output(tiny_model, overrides):
    model = tiny_model(**overrides)
    ids = torch.randint(0, 61, (2, 14))
    t = 9
    changed = ids.clone()
    changed[:, t] = (ids[:, t] + 1) % 61
    with torch.no_grad():
        before, after = model(ids).logits, model(changed).logits
    torch.testing.assert_close(after[:, :t], before[:, :t], atol=1e-6, rtol=0)
    assert not torch.allclose(after[:, t:], before[:, t:], atol=1e-4)  # the change is visible from t on


# Row 0: three documents, one shorter than the conv width; row 1: ids that are not increasing.
LENGTHS = [[5, 2, 9], [10, 6]]
DOC_IDS = torch.tensor([[0] * 5 + [1] * 2 + [2] * 9, [7] * 10 + [3] * 6])


@pytest.mark.parametrize("overrides", MIXERS.values(), ids=MIXERS.keys())
def test_packed_documents_do_not_see_each_other(tiny_model, overrides):
    model = tiny_model(**overrides)
    ids = torch.randint(0, 61, DOC_IDS.shape)
    with torch.no_grad():
        packed = model(ids, doc_ids=DOC_IDS).logits
        for row, lengths in enumerate(LENGTHS):
            start = 0
            for length in lengths:
                alone = model(ids[row : row + 1, start : start + length]).logits
                torch.testing.assert_close(packed[row : row + 1, start : start + length], alone, atol=2e-5, rtol=1e-4)
                start += length
        # without doc_ids the second document does see the first
        assert not torch.allclose(model(ids).logits[0, 5:7], packed[0, 5:7], atol=1e-4)


def test_doc_id_helpers():
    doc_ids = doc_ids_from_cu_seqlens(torch.tensor([0, 3, 4, 7]))
    assert doc_ids.tolist() == [[0, 0, 0, 1, 2, 2, 2]]
    assert positions_from_doc_ids(doc_ids).tolist() == [[0, 1, 2, 0, 0, 1, 2]]
    assert seq_idx_from_doc_ids(torch.tensor([[4, 4, 1, 1, 9]])).tolist() == [[0, 0, 1, 1, 2]]
