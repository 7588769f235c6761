"""hybridlm's own Triton kernels against the kernels they replace, one call each at a config's shapes, over
their launch shapes: the evidence for the defaults in ``hybridlm/ops/gated_norm_bwd.py``,
``hybridlm/ops/triton_cross_entropy.py``, ``hybridlm/ops/state_passing.py``, ``hybridlm/ops/conv_bwd.py``,
``hybridlm/ops/ssd_group.py`` and ``hybridlm/ops/ssd_states.py``.

    python benchmarks/own_kernels.py configs/hybrid-500m.yaml --shape 8x4096 [--kernels KERNELS] [--quick]

KERNELS: a comma list of norm, loss, state, conv, scan, dx, cb, states, stategrads (default norm,loss).

Prints kernel time per call (torch.profiler's device time, as op_variants.py) and, per kernel, the ratio of the
upstream kernel's time to each variant's; every variant's outputs are checked against the upstream kernel's
(largest difference relative to the upstream's largest magnitude). ``--quick`` times only the defaults ("heads
None": the heads a program that ``ssd_group.launch_heads`` picks for the shape).
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Callable

import torch
from profile_step import kernel_events  # benchmarks/, this script's directory

from hybridlm.bench import parse_shapes
from hybridlm.config import load_run_config
from hybridlm.ops import (
    compiled,
    conv_bwd,
    gated_norm_bwd,
    ssd_bwd,
    ssd_group,
    ssd_launch,
    ssd_states,
    state_passing,
    triton_cross_entropy,
)


def kernel_ms(fn: Callable, calls: int = 20) -> float:
    for _ in range(3):  # compilation, autotuning
        fn()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return sum(e.device_time for e in kernel_events(prof.events())) / 1000 / calls


def rel_err(got, want) -> float:
    return max(
        ((g.float() - w.float()).abs().max() / w.float().abs().max()).item() for g, w in zip(got, want, strict=True)
    )


def report(kernel: str, variants: dict[str, Callable], compared: Callable = tuple) -> None:
    """The first variant is the upstream kernel: the baseline for ratios and outputs (``compared``: what of a
    variant's outputs is compared, untimed)."""
    baseline_ms, baseline_out = None, None
    for name, fn in variants.items():
        try:
            out = compared(fn())
            ms = kernel_ms(fn)
        except Exception as e:  # one launch shape failing (out of resources, say) must not hide the others
            print(f"{kernel:6s} {name:34s} failed: {type(e).__name__}: {str(e)[:120]}")
            continue
        if baseline_ms is None:  # copied: the variants write into the same given buffer (dz)
            baseline_ms, baseline_out = ms, [t.clone() for t in out]
        err = rel_err(out, baseline_out)
        print(f"{kernel:6s} {name:34s} {ms:8.3f} ms {baseline_ms / ms:6.2f}x  err {err:.1e}", flush=True)


def norm_variants(tokens: int, d_inner: int, zxbcdt_width: int, quick: bool) -> dict[str, Callable]:
    from mamba_ssm.ops.triton.layernorm_gated import _layer_norm_bwd, _layer_norm_fwd

    dev, bf16 = "cuda", torch.bfloat16
    y = torch.randn(tokens, d_inner, device=dev, dtype=bf16)
    z = torch.randn(tokens, zxbcdt_width, device=dev, dtype=bf16)[:, :d_inner]
    weight = torch.rand(d_inner, device=dev) + 0.5
    dout = torch.randn(tokens, d_inner, device=dev, dtype=bf16)
    _, _, rstd = _layer_norm_fwd(y, weight, None, 1e-5, z, group_size=d_inner, norm_before_gate=False, is_rms_norm=True)
    dz = torch.empty_like(z)

    def upstream():
        dy, dw, _, dz_ = _layer_norm_bwd(
            dout, y, weight, None, 1e-5, None, rstd, z, group_size=d_inner, norm_before_gate=False, is_rms_norm=True,
            dz=dz,
        )  # fmt: skip
        return dy, dz_, dw

    variants = {"mamba_ssm _layer_norm_bwd": upstream}
    defaults = (
        gated_norm_bwd.PROGRAMS_PER_SM, gated_norm_bwd.BLOCK_M, gated_norm_bwd.NUM_WARPS, gated_norm_bwd.STAGES
    )  # fmt: skip
    shapes = [defaults] if quick else itertools.product((2, 8), (1, 2, 4), (4, 8), (3, 4, 5))
    for per_sm, block_m, warps, stages in shapes:
        name = f"ours {per_sm}/SM rows {block_m} warps {warps} stages {stages}"
        variants[name] = lambda p=per_sm, m=block_m, w=warps, st=stages: gated_norm_bwd.gated_rms_norm_bwd(
            dout, y, z, weight, rstd, d_inner, dz=dz, programs_per_sm=p, block_m=m, num_warps=w, stages=st
        )
    return variants


def loss_variants(tokens: int, vocab: int, quick: bool) -> dict[str, Callable]:
    dev = "cuda"
    logits = (torch.randn(tokens, vocab, device=dev) * 3).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), device=dev)

    def fwd_bwd(fn):
        def run():
            loss = fn(logits, targets)
            (grad,) = torch.autograd.grad(loss, logits)
            return loss.detach(), grad

        return run

    def ours(block, warps):
        def run():
            triton_cross_entropy.BLOCK_V, triton_cross_entropy.NUM_WARPS = block, warps
            try:
                return fwd_bwd(triton_cross_entropy.cross_entropy_triton)()
            finally:
                triton_cross_entropy.BLOCK_V, triton_cross_entropy.NUM_WARPS = defaults

        return run

    defaults = (triton_cross_entropy.BLOCK_V, triton_cross_entropy.NUM_WARPS)
    variants = {"torch.compile (fwd + bwd)": fwd_bwd(compiled.cross_entropy_fused)}
    shapes = [defaults] if quick else itertools.product((1024, 2048, 4096, 8192), (4, 8, 16))
    for block, warps in shapes:
        variants[f"ours block {block} warps {warps}"] = ours(block, warps)
    return variants


def state_passing_variants(
    batch: int, seqlen: int, nheads: int, dim: int, chunk: int, quick: bool
) -> tuple[dict[str, Callable], dict[str, Callable]]:
    """Forward and backward of the state passing across chunks as ``ops/conv_ssd.py`` calls them (bf16 states,
    fp32 decays, one document per row), mamba_ssm's and ours over (state elements per program, chunks per tile,
    warps). The backward's decay gradient is compared summed over its partial sums."""
    from mamba_ssm.ops.triton.ssd_state_passing import _state_passing_bwd, _state_passing_fwd

    dev, bf16 = "cuda", torch.bfloat16
    nchunks = -(-seqlen // chunk)
    own = torch.randn(batch, nchunks, nheads, dim, device=dev) * 0.1  # fp32, as _chunk_state_fwd writes them
    dA_last = -torch.rand(batch, nheads, nchunks, device=dev)
    dentering = torch.randn(batch, nchunks, nheads, dim, device=dev, dtype=bf16)
    entering, _ = _state_passing_fwd(own, dA_last, out_dtype=bf16)

    def upstream_bwd():
        dstates, ddA, _, _ = _state_passing_bwd(
            entering, dA_last, dentering, has_initial_states=False, dstates_dtype=bf16, states_dtype=bf16
        )
        return dstates, ddA

    fwd = {"mamba_ssm _state_passing_fwd": lambda: (_state_passing_fwd(own, dA_last, out_dtype=bf16)[0],)}
    bwd = {"mamba_ssm _state_passing_bwd": upstream_bwd}
    every = itertools.product((256, 512, 1024), (4, 8, 16), (1, 2), (1, 2, 3))
    # over 256 elements of each tile a thread, registers spill
    every = [launch for launch in every if launch[0] * launch[1] <= 256 * 32 * launch[2]]

    def name(launch):
        return "ours dim {} chunks {} warps {} stages {}".format(*launch)

    for launch in [state_passing.LAUNCH] if quick else every:
        fwd[name(launch)] = lambda k=launch: (state_passing.state_passing_fwd(own, dA_last, out_dtype=bf16, launch=k),)
    for launch in [state_passing.LAUNCH] if quick else every:

        def ours_bwd(k=launch):
            dstates, ddA_partial, _ = state_passing.state_passing_bwd(
                entering, dA_last, dentering, dstates_dtype=bf16, entering_dtype=bf16, launch=k
            )
            return dstates, ddA_partial.sum(-1)

        bwd[name(launch)] = ours_bwd
    return fwd, bwd


def conv_variants(
    batch: int, seqlen: int, channels: int, zxbcdt_width: int, packed: bool, quick: bool
) -> dict[str, Callable]:
    """The conv + SiLU backward as ``ops/conv_ssd.py`` calls it: x a slice of in_proj's bf16 output, the gradient
    written into a slice of its gradient, fp32 weight and bias; ``packed``: documents of 1000 tokens in each row
    (``seq_idx``), else one."""
    from causal_conv1d.cpp_functions import causal_conv1d_bwd_function

    dev, bf16 = "cuda", torch.bfloat16
    zxbcdt = torch.randn(batch, seqlen, zxbcdt_width, device=dev, dtype=bf16)
    x = zxbcdt[..., :channels]
    weight = torch.randn(channels, conv_bwd.WIDTH, device=dev) * 0.5
    bias = torch.randn(channels, device=dev) * 0.1
    dout = torch.randn(batch, seqlen, channels, device=dev, dtype=bf16)
    seq_idx = (torch.arange(seqlen, device=dev) // 1000).to(torch.int32).expand(batch, seqlen).contiguous()
    seq_idx = seq_idx if packed else None
    dx = torch.empty_like(zxbcdt)[..., :channels]

    def upstream():
        _, dw, db, _ = causal_conv1d_bwd_function(
            x.transpose(1, 2), weight, bias, dout.transpose(1, 2), seq_idx, None, None, dx.transpose(1, 2), False, True
        )
        return dx, dw, db

    variants = {"causal_conv1d bwd": upstream}
    defaults = (conv_bwd.SPAN, conv_bwd.BLOCK_C, conv_bwd.NUM_WARPS, conv_bwd.STAGES)
    shapes = [defaults] if quick else itertools.product((64, 128), (128, 256), (2, 4), (2,))
    for span, block_c, warps, stages in shapes:  # 1 warp and 512 channels were slower in earlier sweeps (conv_bwd.py)
        variants[f"ours span {span} channels {block_c} warps {warps} stages {stages}"] = (
            lambda s=span, c=block_c, w=warps, st=stages: conv_bwd.causal_conv1d_silu_bwd(
                x, weight, bias, dout, seq_idx, dx=dx, span=s, block_c=c, num_warps=w, stages=st
            )
        )
    return variants


def ssd_variants(
    kernel: str, batch: int, seqlen: int, nheads: int, headdim: int, dstate: int, chunk: int, conv_channels: int,
    packed: bool, quick: bool,
) -> dict[str, Callable]:  # fmt: skip
    """``ops/ssd_group.py``'s kernels as ``ops/conv_ssd.py`` calls them, against mamba_ssm's through the launches
    the mixer used before (``ops/ssd_launch.py``'s wider autotuning lists), over (rows, heads per program, warps,
    stages): ``kernel`` "scan", the chunked scan's forward; "dx", its x gradient; "cb", C·Bᵀ's gradient with the
    in-chunk decays' (mamba_ssm's two kernels as the mixer launched them); ``ops/ssd_states.py``'s over (d_state
    columns or rows, heads, warps, stages): "csfwd", each chunk's own state (bf16); "db" and "dc", B's and C's
    gradients through the states (mamba_ssm's through the mixer's launches, ``ops/ssd_bwd.py``). x, B, C and dx
    slices of the conv's (bf16) output and its gradient, dy and the chunk states (or their gradient) bf16, C·Bᵀ
    and the decays fp32, one group; ``packed``: documents of 1000 tokens (``seq_idx``)."""
    dev, bf16 = "cuda", torch.bfloat16
    nchunks = -(-seqlen // chunk)
    d_inner = nheads * headdim
    xBC = torch.randn(batch, seqlen, conv_channels, device=dev, dtype=bf16)
    x = xBC[..., :d_inner].unflatten(-1, (nheads, headdim))
    B = xBC[..., d_inner : d_inner + dstate].unflatten(-1, (1, dstate))
    C = xBC[..., d_inner + dstate : d_inner + 2 * dstate].unflatten(-1, (1, dstate))
    dy = torch.randn(batch, seqlen, nheads, headdim, device=dev, dtype=bf16)
    dt = torch.rand(batch, nheads, nchunks, chunk, device=dev) * 0.1
    dA_cumsum = (-dt * torch.rand(nheads, device=dev)[:, None, None] * 8).cumsum(-1)
    CB = torch.randn(batch, nchunks, 1, chunk, chunk, device=dev)
    states = torch.randn(batch, nchunks, nheads, headdim, dstate, device=dev, dtype=bf16)  # or their gradient
    D = torch.randn(nheads, device=dev)
    seq_idx = (torch.arange(seqlen, device=dev) // 1000).to(torch.int32).expand(batch, seqlen).contiguous()
    seq_idx = seq_idx if packed else None
    dx = torch.empty_like(xBC)[..., :d_inner].unflatten(-1, (nheads, headdim))
    # the scan's forward and x gradient; the dx kernel's first sweeps (6128fec, 3c28159): rows 64 and 4 warps slower,
    # rows 128 at 3 stages ran out of shared memory until dy was loaded once
    group_defaults = (ssd_group.BLOCK_M, None, ssd_group.NUM_WARPS, ssd_group.STAGES)
    group_sweep = [(64, 32, 8, 3), *itertools.product((128,), (8, 16, 32), (8,), (2, 3))]
    axis = "rows"  # the launch's first number: a chunk's rows a program, or d_state's columns

    if kernel == "csfwd":
        from mamba_ssm.ops.triton.ssd_chunk_state import _chunk_state_fwd

        variants = {
            "mamba_ssm _chunk_state_fwd": lambda: (
                _chunk_state_fwd(B, x, dt, dA_cumsum, seq_idx=seq_idx, states_in_fp32=False),
            )
        }

        def ours(block_n, heads, warps, stages):
            return lambda: (
                ssd_states.chunk_state_fwd(
                    B, x, dt, dA_cumsum, seq_idx, bf16, block_n=block_n, heads=heads, num_warps=warps, stages=stages
                ),
            )

        axis = "columns"
        defaults = (ssd_states.STATE_BLOCK_N, None, ssd_states.STATE_NUM_WARPS, ssd_states.STATE_STAGES)
        sweep = itertools.product((64, 128), (4, 8, 32), (4, 8), (2, 3))
    elif kernel in ("db", "dc"):
        if kernel == "db":
            variants = {"mamba_ssm dB (mixer's launch)": lambda: ssd_bwd.chunk_state_bwd_db(
                x, dt, dA_cumsum, states, B, 1, seq_idx
            )}  # fmt: skip

            def ours(block_m, heads, warps, stages):
                return lambda: ssd_states.chunk_state_bwd_db(
                    x, dt, dA_cumsum, states, B, seq_idx, block_m=block_m, heads=heads, num_warps=warps, stages=stages
                )
        else:
            variants = {"mamba_ssm dC (mixer's launch)": lambda: ssd_bwd.chunk_scan_bwd_dC(
                states, dA_cumsum, dy, C, 1, seq_idx
            )}  # fmt: skip

            def ours(block_m, heads, warps, stages):
                return lambda: ssd_states.chunk_scan_bwd_dC(
                    states, dA_cumsum, dy, C, seq_idx, block_m=block_m, heads=heads, num_warps=warps, stages=stages
                )

        defaults = (ssd_states.GRAD_BLOCK_M, None, ssd_states.GRAD_NUM_WARPS, ssd_states.GRAD_STAGES)
        sweep = itertools.product((32, 64, 128), (8, 32), (4, 8), (2, 3))
    elif kernel == "scan":
        upstream_fwd = ssd_launch.chunk_scan_fwd()

        def upstream():
            return upstream_fwd(CB, x, dt, dA_cumsum, C, states, D=D, seq_idx=seq_idx)[:1]

        def ours(block_m, heads, warps, stages):
            return lambda: (
                ssd_group.chunk_scan_fwd(
                    CB, x, dt, dA_cumsum, C, states, D, seq_idx, block_m=block_m, heads=heads, num_warps=warps,
                    stages=stages,
                ),
            )  # fmt: skip

        variants = {"mamba_ssm scan fwd (wider list)": upstream}
        defaults, sweep = group_defaults, group_sweep
    elif kernel == "cb":

        def upstream():
            dcb = ssd_bwd.chunk_scan_bwd_dcb(x, dt, dA_cumsum, dy, 1, seq_idx)
            return dcb, ssd_bwd.chunk_scan_bwd_ddAcs_tiles(x, dt, dA_cumsum, dy, CB)

        def ours(block_m, heads, warps, stages):
            return lambda: ssd_group.chunk_scan_bwd_cb_grads(
                x, dt, dA_cumsum, dy, CB, seq_idx, block_m=block_m, heads=heads, num_warps=warps, stages=stages
            )

        variants = {"mamba_ssm dcb + ddAcs (its lists)": upstream}
        defaults = (ssd_group.CB_BLOCK_M, None, ssd_group.CB_NUM_WARPS, ssd_group.CB_STAGES)
        sweep = [
            *itertools.product((32, 64), (32,), (4, 8), (2, 3)), (16, 32, 4, 2), (32, 16, 4, 2), (32, 32, 2, 2),
        ]  # fmt: skip
    else:

        def upstream():
            return ssd_bwd.chunk_scan_chunk_state_bwd_dx(x, dt, dA_cumsum, B, CB, dy, states, D, seq_idx, dx)

        def ours(block_m, heads, warps, stages):
            return lambda: ssd_group.chunk_scan_chunk_state_bwd_dx(
                x, dt, dA_cumsum, B, CB, dy, states, D, seq_idx, dx, block_m=block_m, heads=heads, num_warps=warps,
                stages=stages,
            )  # fmt: skip

        variants = {"mamba_ssm dx (wider list)": upstream}
        defaults, sweep = group_defaults, group_sweep

    # heads None: launch_heads' choice for the shape
    for shape in [defaults] if quick else sweep:
        block, heads, warps, stages = shape
        variants[f"ours {axis} {block} heads {heads} warps {warps} stages {stages}"] = ours(*shape)
    return variants


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("config")
    p.add_argument("--shape", default="8x4096")
    p.add_argument("--kernels", default="norm,loss")
    p.add_argument("--quick", action="store_true", help="only the default launch shapes")
    args = p.parse_args(argv)
    cfg = load_run_config(args.config).model
    ((batch, seqlen),) = parse_shapes(args.shape)
    tokens = batch * seqlen
    d_inner = cfg.d_inner
    width = d_inner + cfg.conv_channels + cfg.mamba_n_heads  # in_proj's output: z, xBC, dt
    kernels = args.kernels.split(",")
    if "norm" in kernels:
        report("norm", norm_variants(tokens, d_inner, width, args.quick))
    if "loss" in kernels:
        report("loss", loss_variants(tokens, cfg.vocab_size, args.quick))
    if "state" in kernels:
        dim = cfg.mamba.head_dim * cfg.mamba.d_state
        fwd, bwd = state_passing_variants(batch, seqlen, cfg.mamba_n_heads, dim, cfg.mamba.chunk_size, args.quick)
        report("spfwd", fwd)
        report("spbwd", bwd)
    if "conv" in kernels:
        for packed in (True, False):
            kernel = "conv" if packed else "conv1"  # documents packed, one document a row
            report(kernel, conv_variants(batch, seqlen, cfg.conv_channels, width, packed, args.quick))
    chosen = {"states": ("csfwd",), "stategrads": ("db", "dc")}
    for kernel in ("scan", "dx", "cb", "csfwd", "db", "dc"):
        if kernel not in kernels and not any(kernel in chosen.get(k, ()) for k in kernels):
            continue
        m = cfg.mamba
        # the in-chunk decay gradient comes per row block: compared summed
        compared = (lambda out: (out[0], out[1].sum(-2))) if kernel == "cb" else tuple
        for packed in (False, True):  # with documents, the defaults only
            variants = ssd_variants(
                kernel, batch, seqlen, cfg.mamba_n_heads, m.head_dim, m.d_state, m.chunk_size, cfg.conv_channels,
                packed, args.quick or packed,
            )  # fmt: skip
            report(kernel + ("docs" if packed else ""), variants, compared)


if __name__ == "__main__":
    main()
