"""GPU time of each implementation of an op, forward + backward, at a config's shapes: the evidence for
which kernel ``hybridlm.ops.dispatch`` should pick.

    python benchmarks/op_variants.py configs/hybrid-500m.yaml --shape 8x4096

For every op and implementation it prints the kernels' time per call (torch.profiler's device time, so the
host's launch cost is left out: the training step replays CUDA graphs), the ratio of the op's current fused
path to it, and the largest difference of its outputs and input gradients from the fp32 reference (relative to
the reference's largest magnitude). Inputs have the dtypes the model hands the op under bf16 autocast.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from profile_step import kernel_events  # benchmarks/, this script's directory
from ssd_matmul import ssd_scan_matmul

from hybridlm import ops
from hybridlm.bench import parse_shapes
from hybridlm.config import load_run_config
from hybridlm.model.mamba2 import inverse_softplus, sample_dt
from hybridlm.ops import compiled, dispatch, norm
from hybridlm.ops.conv_ssd import MixerKernels, conv_ssd_scan_combined, conv_ssd_scan_fused


@dataclass
class Case:
    op: str
    inputs: Callable[[], list[torch.Tensor]]  # fresh leaves: the differentiable ones require grad
    variants: dict[str, Callable]  # name -> fn(*inputs) -> tensor or tuple; the first is the current path
    reference: Callable


def _leaf(shape, dtype, device, grad=True, scale=1.0) -> torch.Tensor:
    return (torch.randn(shape, device=device, dtype=torch.float32) * scale).to(dtype).requires_grad_(grad)


def _mamba_ssm_add_rms_norm(x, residual, weight, eps):
    """What hybridlm used before torch.compile's kernels measured faster (kept here as the comparison)."""
    from mamba_ssm.ops.triton.layer_norm import rms_norm_fn

    return rms_norm_fn(x, weight, None, residual=residual, eps=eps, prenorm=True)


_compiled_gated_rms_norm = torch.compile(norm.gated_rms_norm_ref)  # measured no faster than mamba_ssm's


def _conv_scan_norm(scan: Callable) -> Callable:
    """``ops.conv_ssd_scan``'s unfused chain (conv, split, scan, gated norm) around another SSD implementation:
    ``scan(x, dt, A, B, C, chunk_size, D, dt_bias, dt_limit, seq_idx)`` with x (batch, seqlen, nheads, headdim),
    B and C (batch, seqlen, ngroups, d_state), dt before its bias and softplus; returns y (D x included) before
    the gate."""

    def run(zxbcdt, conv_w, conv_b, dt_bias, A, D, chunk_size, seq_idx, dt_limit, norm_w, eps, p, g):
        d_inner, nheads = norm_w.shape[0], A.shape[0]
        n = (conv_w.shape[0] - d_inner) // g // 2
        z, xBC, dt = zxbcdt.split([d_inner, conv_w.shape[0], nheads], dim=-1)
        xBC = ops.causal_conv1d(xBC.transpose(1, 2), conv_w, conv_b, "silu", seq_idx).transpose(1, 2)
        x, B, C = xBC.split([d_inner, g * n, g * n], dim=-1)
        x, B, C = x.unflatten(-1, (nheads, p)), B.unflatten(-1, (g, n)), C.unflatten(-1, (g, n))
        y = scan(x, dt, A, B, C, chunk_size, D, dt_bias, dt_limit, seq_idx)
        return norm.gated_rms_norm_fused(y.flatten(-2), z, norm_w, eps, d_inner // g)

    return run


def _fla_scan(x, dt, A, B, C, chunk_size, D, dt_bias, dt_limit, seq_idx):
    """Mamba-2's SSD as flash-linear-attention's simple GLA (one scalar decay per head and step): q = C,
    k = B (repeated over the heads of a group), v = x * dt, log decay dt * A (fla picks its own chunk size)."""
    from fla.ops.simple_gla import chunk_simple_gla

    dt = F.softplus(dt.float() + dt_bias).clamp(*dt_limit)
    v = (x * dt[..., None]).to(x.dtype)
    B, C = (t.repeat_interleave(x.shape[2] // t.shape[2], dim=2) for t in (B, C))
    y, _ = chunk_simple_gla(C, B, v, g=dt * A, scale=1.0)
    return (y + x * D[:, None]).to(x.dtype)


_compiled_ssd_scan_matmul = torch.compile(ssd_scan_matmul)


def _matmul_scan(x, dt, A, B, C, chunk_size, D, dt_bias, dt_limit, seq_idx):
    """``ssd_matmul.ssd_scan_matmul`` (cuBLAS products, Inductor's kernels between them)."""
    return _compiled_ssd_scan_matmul(x, dt, A, B, C, chunk_size, D, dt_bias=dt_bias, dt_limit=dt_limit, seq_idx=seq_idx)


def _sdpa(backend):
    """Causal attention through one of torch SDPA's backends (the dispatcher lets torch choose)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def run(q, k, v):
        with sdpa_kernel(getattr(SDPBackend, backend)):
            return ops.attention(q, k, v)

    return run


def _gate_up_two_gemms(x, w_gate, w_up):
    with torch.autocast("cuda", torch.bfloat16):  # fp32 weights cast per call, as in training
        return compiled.swiglu_fused(F.linear(x, w_gate), F.linear(x, w_up))


def _gate_up_one_gemm(x, w_gate, w_up):
    """The gated MLP's two input projections as one GEMM over the concatenated weights."""
    with torch.autocast("cuda", torch.bfloat16):
        gate, up = F.linear(x, torch.cat([w_gate, w_up])).chunk(2, dim=-1)
        return compiled.swiglu_fused(gate, up)


def _mlp_eager_gemms(x, w_gate, w_up, w_down):
    """The gated MLP as the model runs it in the graphed step (bf16 weights, cast once): cuBLAS's GEMMs, the
    SwiGLU compiled between them."""
    return F.linear(compiled.swiglu_fused(F.linear(x, w_gate), F.linear(x, w_up)), w_down)


@functools.cache
def _mlp_max_autotune():
    """The whole gated MLP through Inductor's max-autotune: it times Triton GEMM templates against cuBLAS per
    shape and may fuse the SwiGLU into a GEMM's epilogue."""

    def mlp(x, w_gate, w_up, w_down):
        return F.linear(compiled.swiglu_ref(F.linear(x, w_gate), F.linear(x, w_up)), w_down)

    return torch.compile(mlp, mode="max-autotune-no-cudagraphs")


def cases(cfg, batch: int, seq_len: int, device: torch.device) -> list[Case]:
    tokens = batch * seq_len
    d, d_inner, eps = cfg.d_model, cfg.d_inner, cfg.norm_eps
    group = d_inner // cfg.mamba.ngroups
    bf16, fp32 = torch.bfloat16, torch.float32

    def add_inputs():
        return [_leaf((tokens, d), bf16, device), _leaf((tokens, d), fp32, device), _leaf(d, fp32, device)]

    def gated_inputs():
        y, z = (_leaf((tokens, d_inner), bf16, device) for _ in range(2))
        return [y, z, _leaf(d_inner, fp32, device)]

    def rotary_inputs():
        return [_leaf((tokens, cfg.attention.n_heads, cfg.head_dim), bf16, device)]

    m, nheads, channels = cfg.mamba, cfg.mamba_n_heads, cfg.conv_channels

    def ssd_inputs():  # in_proj's output and the mixer's parameters, as the model initialises them
        dt_bias = inverse_softplus(sample_dt(nheads, m.dt_min, m.dt_max, m.dt_init_floor)).to(device)
        A_log = torch.log(torch.empty(nheads, device=device).uniform_(*m.A_init_range))
        return [
            _leaf((batch, seq_len, d_inner + channels + nheads), bf16, device),
            _leaf((channels, m.d_conv), fp32, device, scale=0.5),
            _leaf(channels, fp32, device, scale=0.1),
            dt_bias.requires_grad_(),
            A_log.requires_grad_(),
            torch.ones(nheads, device=device, requires_grad=True),
            torch.ones(d_inner, device=device, requires_grad=True),
        ]

    def ssd(chunk_size, fn=ops.conv_ssd_scan):
        def run(zxbcdt, conv_w, conv_b, dt_bias, A_log, D, norm_w):
            A = -torch.exp(A_log)
            return fn(
                zxbcdt, conv_w, conv_b, dt_bias, A, D, chunk_size, None, m.dt_limit, norm_w, eps, m.head_dim, m.ngroups
            )

        return run

    def ssd_unfused(*inputs):
        with dispatch.reference_ops("conv_ssd_scan"):
            return ssd(m.chunk_size)(*inputs)

    def ssd_reference(zxbcdt, *params):
        with dispatch.reference_kernels():
            return ssd(m.chunk_size)(zxbcdt.float(), *params)

    def without(field: str):  # the kept-intermediates op with one of hybridlm's choices switched off
        return ssd(m.chunk_size, functools.partial(conv_ssd_scan_fused, kernels=MixerKernels(**{field: False})))

    ssd_variants = {
        f"kept chunk {m.chunk_size}": ssd(m.chunk_size),
        f"kept upstream norm bwd {m.chunk_size}": without("own_norm_bwd"),
        f"kept upstream launch {m.chunk_size}": without("tuned_launch"),
        f"kept fp32 states {m.chunk_size}": without("lowp_states"),
        f"kept fp32 chunk states {m.chunk_size}": without("lowp_chunk_states"),
        f"kept eager decay grad {m.chunk_size}": without("compiled_decay_grad"),
        f"kept upstream state passing {m.chunk_size}": without("own_state_passing"),
        f"kept upstream bwd launch {m.chunk_size}": without("own_bwd_launch"),
        f"kept zeroing pre-hooks {m.chunk_size}": without("zero_once"),
        f"kept chunk {m.chunk_size // 2}": ssd(m.chunk_size // 2),
        f"combined chunk {m.chunk_size}": ssd(m.chunk_size, conv_ssd_scan_combined),
        f"combined chunk {m.chunk_size // 2}": ssd(m.chunk_size // 2, conv_ssd_scan_combined),
        "conv + scan + norm": ssd_unfused,
    }
    for chunk in (64, 128, 256):
        ssd_variants[f"matmul scan {chunk}"] = ssd(chunk, _conv_scan_norm(_matmul_scan))
    if dispatch.available("fla"):
        ssd_variants["fla simple_gla"] = ssd(64, _conv_scan_norm(_fla_scan))

    def attention_inputs():
        return [_leaf((batch, seq_len, cfg.attention.n_heads, cfg.head_dim), bf16, device) for _ in "qkv"]

    def mlp_inputs():
        return [_leaf((tokens, d), bf16, device), *(_leaf((cfg.mlp.d_ff, d), fp32, device, scale=0.03) for _ in "gu")]

    def mlp3_inputs():  # bf16 weights, as the graphed step casts them once
        d_ff = cfg.mlp.d_ff
        return [_leaf((tokens, d), bf16, device)] + [
            _leaf(shape, bf16, device, scale=0.03) for shape in ((d_ff, d), (d_ff, d), (d, d_ff))
        ]

    targets = torch.randint(0, cfg.vocab_size, (tokens,), device=device)

    def logits_inputs():  # the lm head's output under autocast
        return [_leaf((tokens, cfg.vocab_size), bf16, device, scale=3.0)]

    positions = torch.arange(tokens, device=device) % 4096
    inv_freq = 1.0 / (cfg.attention.rope_theta ** (torch.arange(0, cfg.rotary_dim, 2, device=device) / cfg.rotary_dim))

    return [
        Case(
            "rotary",
            rotary_inputs,
            {
                "torch.compile": lambda x: compiled.rotary_fused(x[None], positions, inv_freq),
                "eager": lambda x: compiled.rotary_ref(x[None], positions, inv_freq),
            },
            lambda x: compiled.rotary_ref(x[None].float(), positions, inv_freq),
        ),
        Case(
            "add_rms_norm",
            add_inputs,
            {
                "torch.compile": lambda x, r, w: compiled.add_rms_norm_fused(x, r, w, eps),
                "mamba_ssm triton": lambda x, r, w: _mamba_ssm_add_rms_norm(x, r, w, eps),
                "eager": lambda x, r, w: compiled.add_rms_norm_ref(x, r, w, eps),
            },
            lambda x, r, w: compiled.add_rms_norm_ref(x.float(), r, w, eps),
        ),
        Case(
            "gated_rms_norm",
            gated_inputs,
            {
                "mamba_ssm triton": lambda x, z, w: norm.gated_rms_norm_fused(x, z, w, eps, group),
                "torch.compile": lambda x, z, w: _compiled_gated_rms_norm(x, z, w, eps, group),
                "eager": lambda x, z, w: norm.gated_rms_norm_ref(x, z, w, eps, group),
            },
            lambda x, z, w: norm.gated_rms_norm_ref(x.float(), z.float(), w, eps, group),
        ),
        Case("conv_ssd_scan", ssd_inputs, ssd_variants, ssd_reference),
        Case(
            "attention",
            attention_inputs,
            {
                "sdpa (torch picks)": ops.attention,
                "sdpa cuDNN": _sdpa("CUDNN_ATTENTION"),
                "sdpa flash": _sdpa("FLASH_ATTENTION"),
                "sdpa mem-efficient": _sdpa("EFFICIENT_ATTENTION"),
            },
            # fp32 through the memory-efficient kernel: the explicit reference would hold seq_len² scores
            lambda q, k, v: _sdpa("EFFICIENT_ATTENTION")(q.float(), k.float(), v.float()),
        ),
        Case(
            "cross_entropy",
            logits_inputs,
            {
                "triton (hybridlm)": lambda logits: ops.cross_entropy(logits, targets),
                "torch.compile": lambda logits: compiled.cross_entropy_fused(logits, targets),
            },
            lambda logits: compiled.cross_entropy_ref(logits, targets),
        ),
        Case(
            "gate_up",
            mlp_inputs,
            {
                "two GEMMs": _gate_up_two_gemms,
                "one GEMM": _gate_up_one_gemm,
            },
            lambda x, wg, wu: compiled.swiglu_ref(F.linear(x.float(), wg.float()), F.linear(x.float(), wu.float())),
        ),
        Case(
            "mlp",
            mlp3_inputs,
            {
                "cuBLAS GEMMs, compiled SwiGLU": _mlp_eager_gemms,
                "max-autotune (whole MLP)": lambda *a: _mlp_max_autotune()(*a),
            },
            lambda x, wg, wu, wd: F.linear(
                compiled.swiglu_ref(F.linear(x.float(), wg.float()), F.linear(x.float(), wu.float())), wd.float()
            ),
        ),
    ]


def _outputs(result) -> tuple[torch.Tensor, ...]:
    return result if isinstance(result, tuple) else (result,)


def fwd_bwd(fn: Callable, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    outs = _outputs(fn(*inputs))
    grads = torch.autograd.grad(outs, inputs, [torch.ones_like(o) for o in outs])
    return [o.detach() for o in outs] + list(grads)


def device_ms(fn: Callable, inputs: list[torch.Tensor], calls: int) -> float:
    """Kernel time per forward + backward, from the profiler (the host's time is not counted)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fwd_bwd(fn, inputs)
        torch.cuda.synchronize()
    total_us = sum(e.device_time for e in kernel_events(prof.events()))
    return total_us / 1000 / calls


def max_rel_error(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    return max(
        ((g.float() - w.float()).abs().max() / w.float().abs().max()).item() for g, w in zip(got, want, strict=True)
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("config")
    p.add_argument("--shape", default="8x4096", help="batch x seqlen: the tokens each call sees")
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--ops", default=None, help="comma list of ops (default: all)")
    p.add_argument("--variants", default=None, help="comma list: only implementations whose name contains one")
    p.add_argument("--each-error", action="store_true", help="also each output's and input gradient's error")
    args = p.parse_args(argv)
    run = load_run_config(args.config)
    ((batch, seq_len),) = parse_shapes(args.shape)
    device = torch.device("cuda")
    all_cases = cases(run.model, batch, seq_len, device)  # closures: no tensor is made yet
    names = [case.op for case in all_cases]
    wanted = {op.strip() for op in args.ops.split(",")} if args.ops else set(names)
    if unknown := sorted(wanted - set(names)):
        p.error(f"--ops: unknown op {', '.join(unknown)} (ops: {', '.join(names)})")
    print(f"{'op':16s} {'implementation':18s} {'ms/call':>8s} {'current/this':>12s} {'max rel err':>11s}")
    for case in all_cases:
        if case.op not in wanted:
            continue
        torch.manual_seed(0)
        inputs = case.inputs()
        want = fwd_bwd(case.reference, inputs)
        timings = {}
        for name, fn in case.variants.items():
            if args.variants and not any(v.strip() in name for v in args.variants.split(",")):
                continue
            try:
                for _ in range(3):  # warm-up: compilation, autotuning
                    got = fwd_bwd(fn, inputs)
            except Exception as e:  # one implementation failing must not hide the others' timings
                print(f"{case.op:16s} {name:18s} failed: {type(e).__name__}: {str(e)[:160]}")
                continue
            err = max_rel_error(got, want)
            timings[name] = device_ms(fn, inputs, args.calls)
            current = next(iter(timings.values()))
            print(f"{case.op:16s} {name:18s} {timings[name]:8.3f} {current / timings[name]:11.2f}x {err:11.2e}")
            if args.each_error:  # outputs, then the gradient of each input in order
                print("    " + " ".join(f"{max_rel_error([g], [w]):.2e}" for g, w in zip(got, want, strict=True)))


if __name__ == "__main__":
    main()
