"""hybridlm's own Triton kernels against the kernels they replace, one call each at a config's shapes, over
their launch shapes: the evidence for the defaults in ``hybridlm/ops/gated_norm_bwd.py``,
``hybridlm/ops/triton_cross_entropy.py``, ``hybridlm/ops/state_passing.py``, ``hybridlm/ops/conv_bwd.py`` and
``hybridlm/ops/ssd_dx.py``.

    python benchmarks/own_kernels.py configs/hybrid-500m.yaml --shape 8x4096 [--kernels norm,loss,conv,dx] [--quick]

Prints kernel time per call (torch.profiler's device time, as op_variants.py) and, per kernel, the ratio of the
upstream kernel's time to each variant's; every variant's outputs are checked against the upstream kernel's
(largest difference relative to the upstream's largest magnitude). ``--quick`` times only the defaults.
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Callable

import torch
from profile_step import kernel_events  # benchmarks/, this script's directory

from hybridlm.bench import parse_shapes
from hybridlm.config import load_run_config
from hybridlm.ops import compiled, conv_bwd, gated_norm_bwd, ssd_bwd, ssd_dx, state_passing, triton_cross_entropy


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


def report(kernel: str, variants: dict[str, Callable]) -> None:
    """The first variant is the upstream kernel: the baseline for ratios and outputs."""
    baseline_ms, baseline_out = None, None
    for name, fn in variants.items():
        try:
            out = fn()
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


def dx_variants(
    batch: int,
    seqlen: int,
    nheads: int,
    headdim: int,
    dstate: int,
    chunk: int,
    conv_channels: int,
    packed: bool,
    quick: bool,
) -> dict[str, Callable]:
    """The SSD backward's x gradient as ``ops/conv_ssd.py`` calls it: x, B and dx slices of the conv's (bf16)
    output and its gradient, dy and the chunk states' gradient bf16, C·Bᵀ and the decays fp32, one group;
    mamba_ssm's kernel through ``ops/ssd_bwd.py``'s launch (the wider autotuning list) against ours over (rows,
    heads per program, warps, stages). ``packed``: documents of 1000 tokens (``seq_idx``)."""
    dev, bf16 = "cuda", torch.bfloat16
    nchunks = -(-seqlen // chunk)
    xBC = torch.randn(batch, seqlen, conv_channels, device=dev, dtype=bf16)
    x = xBC[..., : nheads * headdim].unflatten(-1, (nheads, headdim))
    B = xBC[..., nheads * headdim : nheads * headdim + dstate].unflatten(-1, (1, dstate))
    dy = torch.randn(batch, seqlen, nheads, headdim, device=dev, dtype=bf16)
    dt = torch.rand(batch, nheads, nchunks, chunk, device=dev) * 0.1
    dA_cumsum = (-dt * torch.rand(nheads, device=dev)[:, None, None] * 8).cumsum(-1)
    CB = torch.randn(batch, nchunks, 1, chunk, chunk, device=dev)
    dstates = torch.randn(batch, nchunks, nheads, headdim, dstate, device=dev, dtype=bf16)
    D = torch.randn(nheads, device=dev)
    seq_idx = (torch.arange(seqlen, device=dev) // 1000).to(torch.int32).expand(batch, seqlen).contiguous()
    seq_idx = seq_idx if packed else None
    dx = torch.empty_like(xBC)[..., : nheads * headdim].unflatten(-1, (nheads, headdim))

    variants = {
        "mamba_ssm dx (wider list)": lambda: ssd_bwd.chunk_scan_chunk_state_bwd_dx(
            x, dt, dA_cumsum, B, CB, dy, dstates, D, seq_idx, dx
        )
    }
    defaults = (ssd_dx.BLOCK_M, ssd_dx.HEADS, ssd_dx.NUM_WARPS, ssd_dx.STAGES)
    # rows 128 at 3 stages needed 233 KB of shared memory before dy was loaded once; 4 warps were slower
    shapes = [defaults] if quick else [(64, 32, 8, 3), *itertools.product((128,), (8, 16, 32), (8,), (2, 3))]
    for block_m, heads, warps, stages in shapes:
        variants[f"ours rows {block_m} heads {heads} warps {warps} stages {stages}"] = (
            lambda m=block_m, h=heads, w=warps, st=stages: ssd_dx.chunk_scan_chunk_state_bwd_dx(
                x, dt, dA_cumsum, B, CB, dy, dstates, D, seq_idx, dx, block_m=m, heads=h, num_warps=w, stages=st
            )
        )
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
    if "dx" in kernels:
        m = cfg.mamba
        for packed in (False, True):
            kernel = "dxdocs" if packed else "dx"
            variants = dx_variants(
                batch,
                seqlen,
                cfg.mamba_n_heads,
                m.head_dim,
                m.d_state,
                m.chunk_size,
                cfg.conv_channels,
                packed,
                args.quick or packed,
            )
            report(kernel, variants)


if __name__ == "__main__":
    main()
