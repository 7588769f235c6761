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
from collections.abc import Callable
from dataclasses import dataclass

import torch

from hybridlm.bench import parse_shapes
from hybridlm.config import load_run_config
from hybridlm.ops import compiled, norm


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


def cases(cfg, tokens: int, device: torch.device) -> list[Case]:
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
    total_us = sum(e.device_time for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
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
    args = p.parse_args(argv)
    run = load_run_config(args.config)
    ((batch, seq_len),) = parse_shapes(args.shape)
    device = torch.device("cuda")
    wanted = set(args.ops.split(",")) if args.ops else None
    print(f"{'op':16s} {'implementation':18s} {'ms/call':>8s} {'current/this':>12s} {'max rel err':>11s}")
    for case in cases(run.model, batch * seq_len, device):
        if wanted and case.op not in wanted:
            continue
        torch.manual_seed(0)
        inputs = case.inputs()
        want = fwd_bwd(case.reference, inputs)
        timings = {}
        for name, fn in case.variants.items():
            for _ in range(3):  # warm-up: compilation, autotuning
                got = fwd_bwd(fn, inputs)
            err = max_rel_error(got, want)
            timings[name] = device_ms(fn, inputs, args.calls)
            current = next(iter(timings.values()))
            print(f"{case.op:16s} {name:18s} {timings[name]:8.3f} {current / timings[name]:11.2f}x {err:11.2e}")


if __name__ == "__main__":
    main()
