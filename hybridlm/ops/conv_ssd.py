"""Mamba-2's mixer between its projections (causal conv + SiLU, SSD scan, gated RMSNorm) as one autograd op
over mamba_ssm's and causal_conv1d's kernels, keeping the forward's intermediates for the backward.

mamba_ssm's ``mamba_split_conv1d_scan_combined`` runs the same kernels but saves only in_proj's output and the
scan's output: its backward runs the conv again, and the chunked scan's cumulative decays, chunk states,
state passing and C·Bᵀ products, before the backward kernels proper. This op keeps them (the conv's output, the
states entering each chunk, C·Bᵀ per chunk, the cumulative decays: for the 500M config at 8x4096 and chunk 128,
440 MB a layer with fp32 states, ~300 MB with bf16 ones, beside in_proj's 290 MB output) and its backward starts
at the backward kernels. The kernels are the combined op's, so outputs and gradients match it up to summation
order and the states' dtype (``tests/ops/test_fused_vs_reference.py`` holds them to each other and to the
reference ops).

Several choices differ from the combined op, each measured on its own (``MixerKernels``; a field set False runs
what came before, the baseline that ``benchmarks/op_variants.py`` and the GPU tests compare with):
- the gated norm's backward is hybridlm's own Triton kernel (``ops/gated_norm_bwd.py``: the same arithmetic as
  mamba_ssm's, 1.45x faster at the 500M config's shapes);
- the chunked scan's forward and its dx backward launch through wider autotuning lists (``ops/ssd_launch.py``);
- the states entering each chunk are kept in the input's dtype (bf16 under autocast), the dtype the forward scan
  reads them in; the combined op recomputes them in fp32 for its backward, where they enter only the decays'
  gradient (the sum of each state times its gradient); each chunk's own state, from a zero state, is written in
  it too before the state passing reads it once, summing in fp32 (2% of the op's time at 32k tokens);
- the decays' gradient is summed from its parts by one compiled kernel (``decay_grad``), where the combined op
  launches six (two flips, a cumulative sum, three additions);
- the state passing across chunks is hybridlm's own pair of Triton kernels (``ops/state_passing.py``: tiles of
  chunks combined by an associative scan, where mamba_ssm's walk the chunks one by one, latency-bound on long
  sequences);
- six of the backward's launches go through wrappers of hybridlm's (``ops/ssd_bwd.py``) that return the
  decays' gradient terms unsummed (``decay_grad`` sums them with the rest), skip mamba_ssm's sums over a
  single split of the heads (copies of dB, dC and d(C·Bᵀ)) and zero the kernels' accumulators with one fill
  where mamba_ssm's pre-hooks launch one each;
- with packed documents the conv's backward is hybridlm's own Triton kernel (``ops/conv_bwd.py``: a sliding window
  over the tokens; causal_conv1d's takes 45% longer when it has to respect document boundaries).
- with 16-bit inputs of the shapes run on the GPU (``ssd_group.launches``) the chunked scan's forward and its x
  gradient are hybridlm's own Triton kernels (``ops/ssd_group.py``: mamba_ssm's arithmetic, each program walking
  a run of a group's heads with the rows of C or B and C·Bᵀ they share held, 1.10x and 1.17x faster at the 500M
  config's shapes), and so is one kernel for C·Bᵀ's gradient and the in-chunk decays' (from one dy · xᵀ a head,
  where mamba_ssm runs two: 1.09x);
- with the same inputs three chunk-state products (each chunk's own state, and B's and C's gradients through the
  states with their decay terms) are hybridlm's own Triton kernels (``ops/ssd_states.py``: mamba_ssm's arithmetic,
  a program holding B's or C's rows across a run of heads; 1.29x, 1.64x and 1.75x).

CUDA only (Triton and CUDA kernels); ``hybridlm.ops`` decides when it runs. ``conv_ssd_scan_combined``, mamba_ssm's
own op, stays beside it as the baseline the GPU tests and ``benchmarks/op_variants.py`` compare it with.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.amp import custom_bwd, custom_fwd

from hybridlm.ops.compiled import compiled
from hybridlm.ops.layout import int32_seq_idx


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    """(batch, seqlen, channels) as causal_conv1d's channel-last (batch, channels, seqlen) view; it needs the
    row stride to be a multiple of 8, else the slice is copied."""
    if t.stride(1) % 8:
        t = t.contiguous()
    return t.transpose(1, 2)


@dataclass(frozen=True)
class MixerKernels:
    own_norm_bwd: bool = True  # ops/gated_norm_bwd.py, else mamba_ssm's _layer_norm_bwd
    tuned_launch: bool = True  # ops/ssd_launch.py's wider autotuning lists, else mamba_ssm's
    lowp_states: bool = True  # chunk states kept in the input's dtype, else fp32
    # each chunk's own state (from a zero state, read once by the state passing) written in the input's dtype, else
    # fp32; summed in fp32 either way
    lowp_chunk_states: bool = True
    compiled_decay_grad: bool = True  # decay_grad by torch.compile, else eagerly (six kernels)
    own_state_passing: bool = True  # ops/state_passing.py's tiled scans, else mamba_ssm's chunk-by-chunk kernels
    own_bwd_launch: bool = True  # ops/ssd_bwd.py: no sums over one split, the decays' partial sums left to decay_grad
    zero_once: bool = True  # with own_bwd_launch: the kernels' accumulators zeroed by one fill, not one pre-hook each
    own_conv_bwd: bool = True  # with packed documents: ops/conv_bwd.py's conv backward, else causal_conv1d's
    own_dx: bool = True  # with own_bwd_launch, where ssd_group.launches: its x-gradient kernel, else mamba_ssm's
    own_scan_fwd: bool = True  # where ops/ssd_group.launches: its chunked-scan forward, else mamba_ssm's
    # with own_bwd_launch, where ssd_group.launches: its one kernel for C·Bᵀ's and the in-chunk decays' gradients,
    # else mamba_ssm's two
    own_cb_grads: bool = True
    # where ssd_group.launches: ops/ssd_states.py's kernel for each chunk's own state, else mamba_ssm's _chunk_state_fwd
    own_chunk_states: bool = True
    # with own_bwd_launch, where ssd_group.launches: ops/ssd_states.py's kernels for B's and C's gradients through the
    # states, else mamba_ssm's (through ops/ssd_bwd.py's launches)
    own_state_grads: bool = True


_default_kernels = MixerKernels()  # what conv_ssd_scan_fused runs when not told; mixer_kernels changes it


@contextmanager
def mixer_kernels(**fields: bool) -> Iterator[None]:
    """Within the block, ``conv_ssd_scan_fused`` runs with these ``MixerKernels`` fields set where its caller does
    not pass ``kernels`` (the model's path): ``hybridlm bench --ablate`` turns one off beside the defaults, in one
    process."""
    global _default_kernels
    saved = _default_kernels
    _default_kernels = dataclasses.replace(saved, **fields)
    try:
        yield
    finally:
        _default_kernels = saved


class ConvSSDScan(torch.autograd.Function):
    @staticmethod
    @custom_fwd(device_type="cuda")
    def forward(
        ctx,
        zxbcdt,  # (batch, seqlen, d_inner + conv_channels + nheads)
        conv_weight,  # (conv_channels, width)
        conv_bias,
        dt_bias,  # (nheads,)
        A,  # (nheads,)
        D,  # (nheads,)
        norm_weight,  # (d_inner,)
        seq_idx,  # (batch, seqlen) int32 or None
        chunk_size: int,
        dt_limit: tuple[float, float],
        norm_eps: float,
        headdim: int,
        ngroups: int,
        kernels: MixerKernels,
    ):
        from causal_conv1d.cpp_functions import causal_conv1d_fwd_function
        from mamba_ssm.ops.triton.layernorm_gated import _layer_norm_fwd
        from mamba_ssm.ops.triton.ssd_bmm import _bmm_chunk_fwd
        from mamba_ssm.ops.triton.ssd_chunk_scan import _chunk_scan_fwd
        from mamba_ssm.ops.triton.ssd_chunk_state import _chunk_cumsum_fwd, _chunk_state_fwd
        from mamba_ssm.ops.triton.ssd_state_passing import _state_passing_fwd

        from hybridlm.ops import ssd_group, ssd_launch, ssd_states, state_passing

        chunk_scan_fwd = ssd_launch.chunk_scan_fwd() if kernels.tuned_launch else _chunk_scan_fwd

        batch, seqlen, _ = zxbcdt.shape
        nheads, d_inner = A.shape[0], norm_weight.shape[0]
        z, xBC, dt = zxbcdt.split([d_inner, conv_weight.shape[0], nheads], dim=-1)
        xBC_conv = causal_conv1d_fwd_function(
            _channels_last(xBC), conv_weight, conv_bias, seq_idx, None, None, True
        ).transpose(1, 2)  # (batch, seqlen, conv_channels), contiguous
        x, B, C = _split_xbc(xBC_conv, nheads, headdim, ngroups)
        own_tiles = ssd_group.launches(x, B.shape[-1], chunk_size)

        dA_cumsum, dt_act = _chunk_cumsum_fwd(dt, A, chunk_size, dt_bias=dt_bias, dt_softplus=True, dt_limit=dt_limit)
        if kernels.own_chunk_states and own_tiles:
            chunk_states_dtype = B.dtype if kernels.lowp_chunk_states else torch.float32
            chunk_states = ssd_states.chunk_state_fwd(B, x, dt_act, dA_cumsum, seq_idx, chunk_states_dtype)
        else:
            chunk_states = _chunk_state_fwd(
                B, x, dt_act, dA_cumsum, seq_idx=seq_idx, states_in_fp32=not kernels.lowp_chunk_states
            )
        # passed along in fp32, stored in x's dtype (the scan casts them to C's dtype as it loads them) or fp32
        states_dtype = x.dtype if kernels.lowp_states else torch.float32
        if kernels.own_state_passing:
            states = state_passing.state_passing_fwd(
                chunk_states.flatten(-2), dA_cumsum[..., -1], seq_idx, chunk_size, out_dtype=states_dtype
            )
        else:
            states, _ = _state_passing_fwd(
                chunk_states.flatten(-2), dA_cumsum[..., -1], seq_idx=seq_idx, chunk_size=chunk_size,
                out_dtype=states_dtype,
            )  # fmt: skip
        states = states.unflatten(-1, chunk_states.shape[-2:])
        CB = _bmm_chunk_fwd(C, B, chunk_size, seq_idx=seq_idx, output_dtype=torch.float32)
        if kernels.own_scan_fwd and own_tiles:  # y includes D x
            y = ssd_group.chunk_scan_fwd(CB, x, dt_act, dA_cumsum, C, states, D, seq_idx)
        else:
            y, _ = chunk_scan_fwd(CB, x, dt_act, dA_cumsum, C, states, D=D, seq_idx=seq_idx)

        out, _, rstd = _layer_norm_fwd(
            y.view(-1, d_inner),
            norm_weight,
            None,
            norm_eps,
            z.view(-1, d_inner),
            group_size=d_inner // ngroups,
            norm_before_gate=False,
            is_rms_norm=True,
        )
        ctx.save_for_backward(
            zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm_weight, seq_idx,
            xBC_conv, dt_act, dA_cumsum, states, CB, y, rstd,
        )  # fmt: skip
        ctx.config = (chunk_size, dt_limit, norm_eps, headdim, ngroups, kernels)
        return out.view(batch, seqlen, d_inner)

    @staticmethod
    @custom_bwd(device_type="cuda")
    def backward(ctx, dout):
        from causal_conv1d.cpp_functions import causal_conv1d_bwd_function
        from mamba_ssm.ops.triton.layernorm_gated import _layer_norm_bwd
        from mamba_ssm.ops.triton.ssd_bmm import _bmm_chunk_bwd
        from mamba_ssm.ops.triton.ssd_chunk_scan import _chunk_scan_bwd_dC, _chunk_scan_bwd_dstates
        from mamba_ssm.ops.triton.ssd_chunk_state import _chunk_cumsum_bwd, _chunk_state_bwd_db
        from mamba_ssm.ops.triton.ssd_combined import _chunk_scan_chunk_state_bwd_dx
        from mamba_ssm.ops.triton.ssd_state_passing import _state_passing_bwd

        from hybridlm.ops import conv_bwd, ssd_bwd, ssd_group, ssd_launch, ssd_states, state_passing
        from hybridlm.ops.gated_norm_bwd import gated_rms_norm_bwd

        (
            zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm_weight, seq_idx,
            xBC_conv, dt_act, dA_cumsum, states, CB, y, rstd,
        ) = ctx.saved_tensors  # fmt: skip
        chunk_size, dt_limit, norm_eps, headdim, ngroups, kernels = ctx.config
        bwd_dx = ssd_launch.chunk_scan_chunk_state_bwd_dx() if kernels.tuned_launch else _chunk_scan_chunk_state_bwd_dx
        nheads, d_inner = A.shape[0], norm_weight.shape[0]
        z, xBC, dt = zxbcdt.split([d_inner, conv_weight.shape[0], nheads], dim=-1)
        x, B, C = _split_xbc(xBC_conv, nheads, headdim, ngroups)
        own_tiles = ssd_group.launches(x, B.shape[-1], chunk_size)

        # every input gradient is written into one buffer shaped like zxbcdt (in_proj's backward reads it whole)
        dzxbcdt = torch.empty_like(zxbcdt)
        dz, dxBC_in, ddt_raw = dzxbcdt.split([d_inner, conv_weight.shape[0], nheads], dim=-1)
        dxBC = torch.empty_like(xBC_conv)  # the gradient at the conv's output
        dx, dB, dC = _split_xbc(dxBC, nheads, headdim, ngroups)

        # (rows, d_inner) views; the norm's backward writes dz into dzxbcdt through its view
        dout_rows, y_rows, z_rows, dz_rows = (t.view(-1, d_inner) for t in (dout.contiguous(), y, z, dz))
        if kernels.own_norm_bwd:
            dy, _, dnorm_weight = gated_rms_norm_bwd(
                dout_rows, y_rows, z_rows, norm_weight, rstd, d_inner // ngroups, dz=dz_rows
            )
        else:
            dy, dnorm_weight, _, _ = _layer_norm_bwd(
                dout_rows, y_rows, norm_weight, None, norm_eps, None, rstd, z_rows,
                group_size=d_inner // ngroups, norm_before_gate=False, is_rms_norm=True, dz=dz_rows,
            )  # fmt: skip
        dy = dy.view_as(x)

        # The SSD backward: the states entering each chunk get their gradient first, then x, B, C and the decays.
        dstates = _chunk_scan_bwd_dstates(C, dA_cumsum, dy, seq_idx=seq_idx, dtype=states.dtype)
        if kernels.own_state_passing:
            dstates, ddA_chunk_last, states_lowp = state_passing.state_passing_bwd(
                states.flatten(-2), dA_cumsum[..., -1], dstates.flatten(-2), seq_idx, chunk_size,
                dstates_dtype=x.dtype, entering_dtype=x.dtype,
            )  # fmt: skip
        else:
            dstates, ddA_chunk_last, _, states_lowp = _state_passing_bwd(
                states.flatten(-2), dA_cumsum[..., -1], dstates.flatten(-2), seq_idx=seq_idx,
                has_initial_states=False, dstates_dtype=x.dtype, states_dtype=x.dtype, chunk_size=chunk_size,
            )  # fmt: skip
            ddA_chunk_last = ddA_chunk_last[..., None]
        dstates, states_lowp = dstates.view_as(states), states_lowp.view_as(states)
        acc = None
        if kernels.own_bwd_launch:  # the decays' parts come unsummed: decay_grad sums them
            if kernels.zero_once:
                acc = ssd_bwd.Accumulators.zeroed(x, dA_cumsum.shape[2], chunk_size, B.shape[-1], D)
            if kernels.own_dx and own_tiles:
                dx, ddt_act, dD = ssd_group.chunk_scan_chunk_state_bwd_dx(
                    x, dt_act, dA_cumsum, B, CB, dy, dstates, D, seq_idx, dx
                )
            else:
                dx, ddt_act, dD = ssd_bwd.chunk_scan_chunk_state_bwd_dx(
                    x, dt_act, dA_cumsum, B, CB, dy, dstates, D, seq_idx, dx, widen=kernels.tuned_launch, acc=acc
                )
            if kernels.own_state_grads and own_tiles:
                dB_states, ddA_from_B = ssd_states.chunk_state_bwd_db(x, dt_act, dA_cumsum, dstates, B, seq_idx)
                dC_states, ddA_from_C = ssd_states.chunk_scan_bwd_dC(states_lowp, dA_cumsum, dy, C, seq_idx)
            else:
                dB_states, ddA_from_B = ssd_bwd.chunk_state_bwd_db(
                    x, dt_act, dA_cumsum, dstates, B, ngroups, seq_idx, acc
                )
                dC_states, ddA_from_C = ssd_bwd.chunk_scan_bwd_dC(states_lowp, dA_cumsum, dy, C, ngroups, seq_idx, acc)
        else:
            dx, ddt_act, dD = bwd_dx(x, dt_act, dA_cumsum, B, CB, dy, dstates, D=D, seq_idx=seq_idx, dx=dx)
            dB_states, ddA_from_B = _chunk_state_bwd_db(
                x, dt_act, dA_cumsum, dstates, seq_idx=seq_idx, B=B, ngroups=ngroups
            )
            dC_states, ddA_from_C = _chunk_scan_bwd_dC(
                states_lowp, dA_cumsum, dy, seq_idx=seq_idx, C=C, ngroups=ngroups
            )
        dCB, ddA_in_chunk = _cb_grads(x, dt_act, dA_cumsum, dy, CB, ngroups, seq_idx, kernels, own_tiles)
        _bmm_chunk_bwd(C, dCB, residual=dB_states, out=dB)
        _bmm_chunk_bwd(B, dCB.transpose(-1, -2), residual=dC_states, out=dC)
        sum_parts = compiled(decay_grad) if kernels.compiled_decay_grad else decay_grad
        ddA = sum_parts(ddA_in_chunk, ddA_from_B, ddA_from_C, ddA_chunk_last, not kernels.own_bwd_launch)
        if acc is not None:
            dA, ddt_bias = ssd_bwd.chunk_cumsum_bwd(ddA, ddt_act, dt, A, dt_bias, dt_limit, ddt_raw, acc)
        else:
            _, dA, ddt_bias = _chunk_cumsum_bwd(
                ddA, ddt_act, dt, A, dt_bias=dt_bias, dt_softplus=True, dt_limit=dt_limit, ddt=ddt_raw
            )

        # causal_conv1d's backward takes 45% longer with documents (seq_idx), hybridlm's does not; without them the
        # two kernels are level and the op measured 2% slower with hybridlm's (ops/conv_bwd.py has the times)
        if kernels.own_conv_bwd and seq_idx is not None:  # any row stride: x's gradient goes into dzxbcdt
            _, dconv_weight, dconv_bias = conv_bwd.causal_conv1d_silu_bwd(
                xBC, conv_weight, conv_bias, dxBC, seq_idx, dx=dxBC_in
            )
        else:  # into dzxbcdt where the slice's stride allows it
            dxBC_target = torch.empty_like(xBC_conv) if dxBC_in.stride(1) % 8 else dxBC_in
            _, dconv_weight, dconv_bias, _ = causal_conv1d_bwd_function(
                _channels_last(xBC), conv_weight, conv_bias, dxBC.transpose(1, 2), seq_idx, None, None,
                dxBC_target.transpose(1, 2), False, True,
            )  # fmt: skip
            if dxBC_target is not dxBC_in:
                dxBC_in.copy_(dxBC_target)
        return (dzxbcdt, dconv_weight, dconv_bias, ddt_bias, dA, dD, dnorm_weight) + (None,) * 7


def _cb_grads(x, dt_act, dA_cumsum, dy, CB, ngroups: int, seq_idx, kernels: MixerKernels, own_tiles: bool):
    """C·Bᵀ's gradient and the in-chunk part of the decays' (partial sums over row tiles): from ssd_group's one
    kernel where ``own_tiles`` (``ssd_group.launches``), or mamba_ssm's two. The latter part has a kernel of its
    own: summing per-step terms instead (an identity, tests/ops/test_ssd_ref.py) cancels large terms: A's and
    dt_bias's gradients came out 80-240x further from the reference, and slower (README, Performance)."""
    from mamba_ssm.ops.triton.ssd_chunk_scan import _chunk_scan_bwd_dcb, _chunk_scan_bwd_ddAcs_stable

    from hybridlm.ops import ssd_bwd, ssd_group

    if kernels.own_bwd_launch and kernels.own_cb_grads and own_tiles:
        return ssd_group.chunk_scan_bwd_cb_grads(x, dt_act, dA_cumsum, dy, CB, seq_idx)
    if kernels.own_bwd_launch:
        dCB = ssd_bwd.chunk_scan_bwd_dcb(x, dt_act, dA_cumsum, dy, ngroups, seq_idx)
        return dCB, ssd_bwd.chunk_scan_bwd_ddAcs_tiles(x, dt_act, dA_cumsum, dy, CB)
    dCB = _chunk_scan_bwd_dcb(x, dt_act, dA_cumsum, dy, seq_idx=seq_idx, ngroups=ngroups)
    return dCB, _chunk_scan_bwd_ddAcs_stable(x, dt_act, dA_cumsum, dy, CB)[..., None, :]


def decay_grad(
    in_chunk: torch.Tensor,
    from_B: torch.Tensor,
    from_C: torch.Tensor,
    from_chunk_end: torch.Tensor,
    from_B_summed: bool = False,
) -> torch.Tensor:
    """The gradient of the cumulative log decays ``dA_cumsum`` (batch, nheads, nchunks, chunk) from its parts:
    the in-chunk scan's (``in_chunk``, (batch, nheads, nchunks, tiles, chunk): partial sums over row tiles), the
    cumulative sum over the chunk of the chunk states' terms through B (``from_B``; already summed where
    ``from_B_summed``), and the reverse cumulative sum over the chunk of the terms through C and, at the chunk's
    last step, through the state leaving the chunk (``from_chunk_end``, (batch, nheads, nchunks, parts): partial
    sums): a step's gradient collects the terms through C of that step and every later one of its chunk, and
    those through B of that step and every earlier one."""
    from_C = torch.cat([from_C[..., :-1], (from_C[..., -1] + from_chunk_end.sum(-1))[..., None]], dim=-1)
    from_B = from_B if from_B_summed else from_B.cumsum(-1)
    return in_chunk.sum(-2) + from_B + from_C.flip(-1).cumsum(-1).flip(-1)


def _split_xbc(xBC: torch.Tensor, nheads: int, headdim: int, ngroups: int):
    """The conv output's x (batch, seqlen, nheads, headdim), B and C (batch, seqlen, ngroups, d_state), as views."""
    d_state = (xBC.shape[-1] - nheads * headdim) // ngroups // 2
    x, B, C = xBC.split([nheads * headdim, ngroups * d_state, ngroups * d_state], dim=-1)
    return x.unflatten(-1, (nheads, headdim)), B.unflatten(-1, (ngroups, d_state)), C.unflatten(-1, (ngroups, d_state))


def conv_ssd_scan_fused(
    zxbcdt,
    conv_weight,
    conv_bias,
    dt_bias,
    A,
    D,
    chunk_size,
    seq_idx,
    dt_limit,
    norm_weight,
    norm_eps,
    headdim,
    ngroups,
    kernels: MixerKernels | None = None,
) -> torch.Tensor:
    """``ops.conv_ssd_scan``'s fused path: (batch, seqlen, d_inner), the gated norm's output. ``kernels``
    switches hybridlm's choices off one by one (``benchmarks/op_variants.py`` compares them); None: the defaults,
    or those ``mixer_kernels`` set."""
    kernels = kernels or _default_kernels
    seq_idx = int32_seq_idx(seq_idx)
    return ConvSSDScan.apply(
        zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm_weight, seq_idx,
        chunk_size, tuple(dt_limit), norm_eps, headdim, ngroups, kernels,
    )  # fmt: skip


def conv_ssd_scan_combined(
    zxbcdt,
    conv_weight,
    conv_bias,
    dt_bias,
    A,
    D,
    chunk_size,
    seq_idx,
    dt_limit,
    norm_weight,
    norm_eps,
    headdim,
    ngroups,
):
    """mamba_ssm's ``mamba_split_conv1d_scan_combined`` without its output projection (the layer applies
    ``out_proj`` as a module, so LoRA and ZeRO-3 see it). It keeps only ``zxbcdt`` and the scan output for
    backward, recomputing the conv and the scan's chunk states, and writes every gradient into one buffer shaped
    like ``zxbcdt``. The fused path was this until ``conv_ssd_scan_fused`` above (the same kernels, nothing
    recomputed); kept as the baseline that op_variants and the GPU tests compare it with."""
    from mamba_ssm.ops.triton.ssd_combined import mamba_split_conv1d_scan_combined

    seq_idx = int32_seq_idx(seq_idx)
    return mamba_split_conv1d_scan_combined(
        zxbcdt,
        conv_weight,
        conv_bias,
        dt_bias,
        A,
        D,
        chunk_size,
        seq_idx=seq_idx,
        dt_limit=dt_limit,
        activation="silu",
        rmsnorm_weight=norm_weight,
        rmsnorm_eps=norm_eps,
        headdim=headdim,
        ngroups=ngroups,
        norm_before_gate=False,
    )
