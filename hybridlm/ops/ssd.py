"""Mamba-2 state-space duality (SSD): the chunked scan, reference and fused (mamba_ssm) paths.

Within a chunk the scan is a masked matrix product (the "dual" attention-like form); across
chunks a short recurrence passes the state. With ``seq_idx`` every term that would connect two
different documents is masked out, so packed documents restart from a zero state.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from hybridlm.ops.layout import int32_addressable, int32_seq_idx


def segsum(x: torch.Tensor) -> torch.Tensor:
    """out[..., i, j] = sum(x[..., j+1 : i+1]) for i >= j, -inf above the diagonal (stable form)."""
    T = x.size(-1)
    x = x[..., None].expand(*x.shape, T)  # (..., T, T) with [i, j] = x_i
    strictly_lower = torch.tril(torch.ones(T, T, dtype=torch.bool, device=x.device), diagonal=-1)
    sums = torch.cumsum(x.masked_fill(~strictly_lower, 0), dim=-2)
    lower = torch.tril(torch.ones(T, T, dtype=torch.bool, device=x.device))
    return sums.masked_fill(~lower, -math.inf)


def ssd_scan_ref(
    x: torch.Tensor,  # (batch, seqlen, nheads, headdim)
    dt: torch.Tensor,  # (batch, seqlen, nheads), before softplus
    A: torch.Tensor,  # (nheads,), negative
    B: torch.Tensor,  # (batch, seqlen, ngroups, d_state)
    C: torch.Tensor,  # (batch, seqlen, ngroups, d_state)
    chunk_size: int,
    D: torch.Tensor | None = None,  # (nheads,) or (nheads, headdim)
    z: torch.Tensor | None = None,  # (batch, seqlen, nheads, headdim)
    dt_bias: torch.Tensor | None = None,  # (nheads,)
    dt_limit: tuple[float, float] = (0.0, math.inf),
    seq_idx: torch.Tensor | None = None,  # (batch, seqlen) int, non-decreasing per row
    initial_states: torch.Tensor | None = None,  # (batch, nheads, headdim, d_state)
    return_final_states: bool = False,
):
    """y_t = C_t h_t + D x_t with h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t x_t, computed chunk by chunk."""
    batch, seqlen, nheads, headdim = x.shape
    dtype = x.dtype
    xf, Bf, Cf = x.float(), B.float(), C.float()
    dt = dt.float() + (dt_bias.float() if dt_bias is not None else 0.0)
    dt = F.softplus(dt).clamp(dt_limit[0], dt_limit[1])
    pad = (-seqlen) % chunk_size  # padded steps have dt = 0: they neither decay nor write the state
    if pad:
        xf, Bf, Cf = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (xf, Bf, Cf))
        dt = F.pad(dt, (0, 0, 0, pad))
    if seq_idx is None:
        seq_idx = torch.zeros(batch, seqlen, dtype=torch.long, device=x.device)
    seq_idx = F.pad(seq_idx, (0, pad), mode="replicate") if pad else seq_idx
    heads_per_group = nheads // B.shape[2]
    Bf = Bf.repeat_interleave(heads_per_group, dim=2)
    Cf = Cf.repeat_interleave(heads_per_group, dim=2)

    def chunked(t):  # (batch, L, ...) -> (batch, chunks, chunk_size, ...)
        return t.unflatten(1, (-1, chunk_size))

    xc, Bc, Cc, dtc, seqc = chunked(xf), chunked(Bf), chunked(Cf), chunked(dt), chunked(seq_idx)
    xdt = xc * dtc[..., None]  # (batch, chunks, q, nheads, headdim)
    dA = (dtc * A.float()).permute(0, 3, 1, 2)  # (batch, nheads, chunks, q)
    dA_cumsum = torch.cumsum(dA, dim=-1)

    # 1. within each chunk: the masked "attention" form
    same_doc = seqc[..., :, None] == seqc[..., None, :]  # (batch, chunks, q, q)
    L = torch.exp(segsum(dA)) * same_doc[:, None]
    y_diag = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", Cc, Bc, L, xdt)

    # 2. the state each chunk writes by its last token
    seq_last = seqc[..., -1]  # (batch, chunks)
    decay_to_end = torch.exp(dA_cumsum[..., -1:] - dA_cumsum) * (seqc == seq_last[..., None])[:, None]
    chunk_states = torch.einsum("bclhn,bhcl,bclhp->bchpn", Bc, decay_to_end, xdt)

    # 3. pass states across chunks; a state survives only into the same document
    seq_before = torch.cat([seq_idx[:, :1], seq_last[:, :-1]], dim=1)  # doc of the incoming state
    carries = (seq_before == seq_last).float()  # (batch, chunks)
    chunk_decay = torch.exp(dA_cumsum[..., -1]) * carries[:, None]  # (batch, nheads, chunks)
    incoming, state = state_passing_ref(chunk_states, chunk_decay, initial_states)

    # 4. the incoming state's contribution to each position
    decay_from_start = torch.exp(dA_cumsum) * (seqc == seq_before[..., None])[:, None]
    y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", Cc, incoming, decay_from_start)

    y = (y_diag + y_off).flatten(1, 2)[:, :seqlen]
    if D is not None:
        Df = D.float() if D.dim() == 2 else D.float()[:, None]
        y = y + x.float() * Df
    if z is not None:
        y = y * F.silu(z.float())
    y = y.to(dtype)
    return (y, state) if return_final_states else y


def state_passing_ref(
    states: torch.Tensor,  # (batch, chunks, nheads, ...): the state each chunk writes from a zero state
    chunk_decay: torch.Tensor,  # (batch, nheads, chunks): each chunk's decay of the state it receives
    initial_state: torch.Tensor | None = None,  # (batch, nheads, ...)
) -> tuple[torch.Tensor, torch.Tensor]:
    """The states entering each chunk (the first is ``initial_state`` or zero) and the state leaving the last:
    entering_{c+1} = chunk_decay_c * entering_c + states_c, one chunk after another, in fp32 or wider."""
    dtype = torch.promote_types(states.dtype, torch.float32)
    state = initial_state.to(dtype) if initial_state is not None else states.new_zeros(states[:, 0].shape, dtype=dtype)
    entering = []
    for c in range(states.shape[1]):
        entering.append(state)
        decay = chunk_decay[:, :, c].to(dtype).reshape(*chunk_decay.shape[:2], *[1] * (states.dim() - 3))
        state = state * decay + states[:, c].to(dtype)
    return torch.stack(entering, dim=1), state


def ssd_scan_fused(
    x,
    dt,
    A,
    B,
    C,
    chunk_size,
    D=None,
    z=None,
    dt_bias=None,
    dt_limit=(0.0, math.inf),
    seq_idx=None,
    initial_states=None,
    return_final_states=False,
):
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    seq_idx = int32_seq_idx(seq_idx)
    x, dt, B, C, z = (int32_addressable(t) for t in (x, dt, B, C, z))
    return mamba_chunk_scan_combined(
        x,
        dt,
        A,
        B,
        C,
        chunk_size,
        D=D,
        z=z,
        dt_bias=dt_bias,
        initial_states=initial_states,
        seq_idx=seq_idx,
        dt_softplus=True,
        dt_limit=dt_limit,
        return_final_states=return_final_states,
    )
