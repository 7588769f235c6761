"""Mamba-1 selective scan (S6), its one-token state update (shared with Mamba-2's step),
references and fused (mamba_ssm) paths."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def selective_scan_ref(
    u: torch.Tensor,  # (batch, d_inner, seqlen)
    delta: torch.Tensor,  # (batch, d_inner, seqlen), before softplus
    A: torch.Tensor,  # (d_inner, d_state)
    B: torch.Tensor,  # (batch, d_state, seqlen)
    C: torch.Tensor,  # (batch, d_state, seqlen)
    D: torch.Tensor | None = None,  # (d_inner,)
    z: torch.Tensor | None = None,  # (batch, d_inner, seqlen)
    delta_bias: torch.Tensor | None = None,  # (d_inner,)
    reset: torch.Tensor | None = None,  # (batch, seqlen) bool: state restarts at this token
    return_last_state: bool = False,
):
    """h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t;  y_t = C_t h_t + D u_t, gated by silu(z)."""
    dtype = u.dtype
    u, delta, B, C = u.float(), delta.float(), B.float(), C.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    delta = F.softplus(delta)
    decay = torch.exp(torch.einsum("bdl,dn->bdln", delta, A.float()))  # (batch, d_inner, seqlen, d_state)
    if reset is not None:
        decay = decay * (~reset)[:, None, :, None]
    write = torch.einsum("bdl,bnl,bdl->bdln", delta, B, u)
    state = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for t in range(u.shape[2]):
        state = decay[:, :, t] * state + write[:, :, t]
        ys.append(torch.einsum("bdn,bn->bd", state, C[:, :, t]))
    y = torch.stack(ys, dim=2)
    if D is not None:
        y = y + u * D.float()[:, None]
    if z is not None:
        y = y * F.silu(z.float())
    y = y.to(dtype)
    return (y, state) if return_last_state else y


def selective_scan_fused(u, delta, A, B, C, D=None, z=None, delta_bias=None, reset=None, return_last_state=False):
    # The fused Mamba-1 kernel cannot restart the state inside a row; the model warns at start-up.
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    return selective_scan_fn(
        u, delta, A, B, C, D, z=z, delta_bias=delta_bias, delta_softplus=True, return_last_state=return_last_state
    )


def selective_state_update_ref(
    state: torch.Tensor,  # (batch, nheads, headdim, d_state) or (batch, d_inner, d_state); updated in place
    x: torch.Tensor,  # (batch, nheads, headdim) or (batch, d_inner)
    dt: torch.Tensor,  # like x, before softplus
    A: torch.Tensor,  # (nheads, headdim, d_state) or (d_inner, d_state)
    B: torch.Tensor,  # (batch, ngroups, d_state) or (batch, d_state)
    C: torch.Tensor,  # like B
    D: torch.Tensor | None = None,  # (nheads, headdim) or (d_inner,)
    z: torch.Tensor | None = None,  # like x
    dt_bias: torch.Tensor | None = None,  # like D
) -> torch.Tensor:
    """One recurrence step for a single token; returns y like x."""
    if state.dim() == 3:  # Mamba-1 layout: one head holding every channel
        x, dt, B, C, z = (t.unsqueeze(1) if t is not None else None for t in (x, dt, B, C, z))
        A, D, dt_bias = (t.unsqueeze(0) if t is not None else None for t in (A, D, dt_bias))
        return selective_state_update_ref(state.unsqueeze(1), x, dt, A, B, C, D, z, dt_bias).squeeze(1)
    nheads, ngroups = state.shape[1], B.shape[1]
    dt = dt.float() + (dt_bias.float() if dt_bias is not None else 0.0)
    dt = F.softplus(dt)
    B = B.float().repeat_interleave(nheads // ngroups, dim=1)  # (batch, nheads, d_state)
    C = C.float().repeat_interleave(nheads // ngroups, dim=1)
    new_state = state.float() * torch.exp(dt[..., None] * A.float()) + (dt * x.float())[..., None] * B[:, :, None]
    state.copy_(new_state)
    y = torch.einsum("bhpn,bhn->bhp", new_state, C)
    if D is not None:
        y = y + x.float() * D.float()
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(x.dtype)


def selective_state_update_fused(state, x, dt, A, B, C, D=None, z=None, dt_bias=None):
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update

    return selective_state_update(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=True)
