"""Mamba-1 reference scan (naive recurrence, document resets) and the one-token state update in
both layouts (Mamba-1 per channel, Mamba-2 per head) against the full scans."""

import torch
import torch.nn.functional as F

from hybridlm.ops.selective import selective_scan_ref, selective_state_update_ref
from hybridlm.ops.ssd import ssd_scan_ref

BATCH, D_INNER, D_STATE = 2, 6, 4


def mamba1_inputs(seqlen: int, batch: int = BATCH) -> dict[str, torch.Tensor]:
    return {
        "u": torch.randn(batch, D_INNER, seqlen),
        "delta": torch.randn(batch, D_INNER, seqlen),
        "A": -torch.rand(D_INNER, D_STATE) - 0.1,
        "B": torch.randn(batch, D_STATE, seqlen),
        "C": torch.randn(batch, D_STATE, seqlen),
        "D": torch.randn(D_INNER),
        "z": torch.randn(batch, D_INNER, seqlen),
        "delta_bias": torch.randn(D_INNER) * 0.5,
    }


def test_selective_scan_ref_equals_naive_recurrence():
    i = mamba1_inputs(9)
    y, last = selective_scan_ref(**i, return_last_state=True)
    delta = F.softplus(i["delta"] + i["delta_bias"][:, None])
    h = torch.zeros(BATCH, D_INNER, D_STATE)
    for t in range(9):
        h = (
            torch.exp(delta[..., t, None] * i["A"]) * h
            + (delta[..., t] * i["u"][..., t])[..., None] * i["B"][:, None, :, t]
        )
        expected = (h @ i["C"][:, :, t, None])[..., 0] + i["D"] * i["u"][..., t]
        torch.testing.assert_close(y[..., t], expected * F.silu(i["z"][..., t]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(last, h, atol=1e-5, rtol=1e-5)


def test_selective_scan_reset_equals_running_documents_separately():
    lengths = [3, 6, 1, 4]
    i = mamba1_inputs(sum(lengths), batch=1)
    starts = torch.zeros(1, sum(lengths), dtype=torch.bool)
    starts[0, torch.tensor(lengths).cumsum(0)[:-1]] = True
    y, last = selective_scan_ref(**i, reset=starts, return_last_state=True)
    begin = 0
    for length in lengths:
        piece = {k: v[..., begin : begin + length] if v.dim() == 3 else v for k, v in i.items()}
        alone, alone_last = selective_scan_ref(**piece, return_last_state=True)
        torch.testing.assert_close(y[..., begin : begin + length], alone, atol=1e-6, rtol=1e-5)
        begin += length
    torch.testing.assert_close(last, alone_last, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(y, selective_scan_ref(**i), atol=1e-4)  # without resets the documents interact


def test_state_update_steps_equal_the_mamba1_scan():
    seqlen = 7
    i = mamba1_inputs(seqlen)
    y_scan, last = selective_scan_ref(**i, return_last_state=True)
    state = torch.zeros(BATCH, D_INNER, D_STATE)
    for t in range(seqlen):
        y_t = selective_state_update_ref(
            state,
            i["u"][..., t],
            i["delta"][..., t],
            i["A"],
            i["B"][..., t],
            i["C"][..., t],
            D=i["D"],
            z=i["z"][..., t],
            dt_bias=i["delta_bias"],
        )
        torch.testing.assert_close(y_t, y_scan[..., t], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state, last, atol=1e-5, rtol=1e-5)


def test_state_update_steps_equal_the_mamba2_scan():
    batch, seqlen, nheads, headdim, ngroups, d_state = 2, 6, 4, 3, 2, 5
    x = torch.randn(batch, seqlen, nheads, headdim)
    dt = torch.randn(batch, seqlen, nheads)
    A = -torch.rand(nheads) - 0.1
    B, C = torch.randn(2, batch, seqlen, ngroups, d_state)
    D, dt_bias = torch.randn(nheads), torch.randn(nheads)
    z = torch.randn(batch, seqlen, nheads, headdim)
    initial = torch.randn(batch, nheads, headdim, d_state)
    y_scan, final = ssd_scan_ref(
        x, dt, A, B, C, 4, D=D, z=z, dt_bias=dt_bias, initial_states=initial, return_final_states=True
    )
    state = initial.clone()
    for t in range(seqlen):
        # the per-head scalars broadcast over headdim and d_state, as the Mamba-2 layer passes them
        y_t = selective_state_update_ref(
            state,
            x[:, t],
            dt[:, t, :, None].expand(-1, -1, headdim),
            A[:, None, None].expand(-1, headdim, d_state),
            B[:, t],
            C[:, t],
            D=D[:, None].expand(-1, headdim),
            z=z[:, t],
            dt_bias=dt_bias[:, None].expand(-1, headdim),
        )
        torch.testing.assert_close(y_t, y_scan[:, t], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state, final, atol=1e-5, rtol=1e-5)


def test_state_update_keeps_the_state_dtype():
    state = torch.zeros(1, 2, 3, 4, dtype=torch.bfloat16)
    x = torch.randn(1, 2, 3, dtype=torch.bfloat16)
    y = selective_state_update_ref(state, x, x, -torch.ones(2, 3, 4), torch.randn(1, 1, 4), torch.randn(1, 1, 4))
    assert y.dtype == torch.bfloat16 and state.dtype == torch.bfloat16 and state.abs().sum() > 0
