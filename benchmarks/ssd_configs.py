"""mamba_ssm's SSD kernels at a config's shapes over launch configurations beyond the ones their autotuners try:
does the chunked scan leave time on the table on this GPU?

    python benchmarks/ssd_configs.py configs/hybrid-500m.yaml --shape 8x4096 [--kernels a,b] [--jobs 12]

Each kernel of ``ops/conv_ssd.py``'s forward and backward is launched through mamba_ssm's own wrapper, with the
wrapper's kernel (an autotuner) swapped for one holding a single candidate configuration: every block-size set
of the upstream list, and num_warps 4 / 8 with num_stages 2 / 3 / 4 for each (pre-hooks that zero accumulators
kept). ``--jobs`` processes compile the candidates first (Triton's cache is on disk, so the timing pass finds
them built); then one process screens them with ``triton.testing.do_bench`` and times the upstream autotuner's
pick and the best three candidates with torch.profiler's kernel time, checking the candidates' outputs against
the upstream pick's. Prints per kernel the upstream pick, the best candidate, and the time a step would save.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import subprocess
import sys
from collections.abc import Callable

import torch
import triton
from own_kernels import kernel_ms, rel_err  # benchmarks/, this script's directory

from hybridlm.bench import parse_shapes
from hybridlm.config import load_run_config

# (mamba_ssm module, kernel): the order of ops/conv_ssd.py's forward, then its backward
KERNELS = [
    ("ssd_chunk_state", "_chunk_cumsum_fwd_kernel"),
    ("ssd_chunk_state", "_chunk_state_fwd_kernel"),
    ("ssd_state_passing", "_state_passing_fwd_kernel"),
    ("ssd_bmm", "_bmm_chunk_fwd_kernel"),
    ("ssd_chunk_scan", "_chunk_scan_fwd_kernel"),
    ("ssd_chunk_scan", "_chunk_scan_bwd_dstates_kernel"),
    ("ssd_state_passing", "_state_passing_bwd_kernel"),
    ("ssd_combined", "_chunk_scan_chunk_state_bwd_dx_kernel"),
    ("ssd_chunk_state", "_chunk_state_bwd_db_kernel"),
    ("ssd_chunk_scan", "_chunk_scan_bwd_dc_kernel"),
    ("ssd_chunk_scan", "_chunk_scan_bwd_dcb_kernel"),
    ("ssd_bmm", "_bmm_chunk_bwd_kernel"),
    ("ssd_chunk_scan", "_chunk_scan_bwd_ddAcs_stable_kernel"),
    ("ssd_chunk_state", "_chunk_cumsum_bwd_kernel"),
]


def module(name: str):
    return importlib.import_module(f"mamba_ssm.ops.triton.{name}")


def candidates(tuner) -> list[triton.Config]:
    """The upstream configs, then each of their block-size sets at num_warps 4 / 8 and num_stages 2 / 3 / 4."""
    hook = tuner.configs[0].pre_hook
    blocks = []
    for c in tuner.configs:
        if c.kwargs not in blocks:
            blocks.append(dict(c.kwargs))
    out = list(tuner.configs)
    seen = {(tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages) for c in out}
    for kw, warps, stages in itertools.product(blocks, (4, 8), (2, 3, 4)):
        key = (tuple(sorted(kw.items())), warps, stages)
        if key not in seen:
            seen.add(key)
            out.append(triton.Config(kw, num_warps=warps, num_stages=stages, pre_hook=hook))
    return out


def describe(c: triton.Config) -> str:
    blocks = ",".join(f"{k.removeprefix('BLOCK_SIZE_')}={v}" for k, v in c.kwargs.items())
    return f"{blocks} w{c.num_warps} s{c.num_stages}"


def build_calls(model, batch: int, seqlen: int) -> dict[str, Callable]:
    """Each kernel's wrapper called as ops/conv_ssd.py calls it, on the forward's real intermediates."""
    from mamba_ssm.ops.triton.ssd_bmm import _bmm_chunk_bwd, _bmm_chunk_fwd
    from mamba_ssm.ops.triton.ssd_chunk_scan import (
        _chunk_scan_bwd_dC,
        _chunk_scan_bwd_dcb,
        _chunk_scan_bwd_ddAcs_stable,
        _chunk_scan_bwd_dstates,
        _chunk_scan_fwd,
    )
    from mamba_ssm.ops.triton.ssd_chunk_state import (
        _chunk_cumsum_bwd,
        _chunk_cumsum_fwd,
        _chunk_state_bwd_db,
        _chunk_state_fwd,
    )
    from mamba_ssm.ops.triton.ssd_combined import _chunk_scan_chunk_state_bwd_dx
    from mamba_ssm.ops.triton.ssd_state_passing import _state_passing_bwd, _state_passing_fwd

    m = model.mamba
    nheads, headdim, ngroups, dstate, chunk = model.mamba_n_heads, m.head_dim, m.ngroups, m.d_state, m.chunk_size
    dev, bf16 = "cuda", torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)

    def rand(*shape, dtype=bf16, scale=1.0):
        return (torch.randn(*shape, device=dev, generator=g) * scale).to(dtype)

    x = rand(batch, seqlen, nheads, headdim)
    B, C = rand(batch, seqlen, ngroups, dstate), rand(batch, seqlen, ngroups, dstate)
    dt = rand(batch, seqlen, nheads, scale=0.5)
    A = -torch.rand(nheads, device=dev, generator=g) * 8 - 1
    dt_bias, D = rand(nheads, dtype=torch.float32, scale=0.5), rand(nheads, dtype=torch.float32)
    dt_limit = (0.0, float("inf"))
    dy = rand(batch, seqlen, nheads, headdim)

    dA_cumsum, dt_act = _chunk_cumsum_fwd(dt, A, chunk, dt_bias=dt_bias, dt_softplus=True, dt_limit=dt_limit)
    chunk_states = _chunk_state_fwd(B, x, dt_act, dA_cumsum, states_in_fp32=True)
    # stored in x's dtype, as conv_ssd stores them (its sweep at c43f2ba ran before, with fp32 states)
    states, _ = _state_passing_fwd(chunk_states.flatten(-2), dA_cumsum[..., -1], chunk_size=chunk, out_dtype=x.dtype)
    states = states.unflatten(-1, chunk_states.shape[-2:])
    CB = _bmm_chunk_fwd(C, B, chunk, output_dtype=torch.float32)
    dstates = _chunk_scan_bwd_dstates(C, dA_cumsum, dy, dtype=states.dtype)
    dstates_p, _, _, states_lowp = _state_passing_bwd(
        states.flatten(-2), dA_cumsum[..., -1], dstates.flatten(-2), has_initial_states=False,
        dstates_dtype=x.dtype, states_dtype=x.dtype, chunk_size=chunk,
    )  # fmt: skip
    dstates_p, states_lowp = dstates_p.view_as(states), states_lowp.view_as(states)
    dCB = _chunk_scan_bwd_dcb(x, dt_act, dA_cumsum, dy, ngroups=ngroups).to(CB.dtype)
    ddA = torch.randn_like(dA_cumsum)
    ddt_act = torch.randn_like(dt_act)
    dB = torch.empty_like(B)
    return {
        "_chunk_cumsum_fwd_kernel": lambda: _chunk_cumsum_fwd(
            dt, A, chunk, dt_bias=dt_bias, dt_softplus=True, dt_limit=dt_limit
        ),
        "_chunk_state_fwd_kernel": lambda: (_chunk_state_fwd(B, x, dt_act, dA_cumsum, states_in_fp32=True),),
        "_state_passing_fwd_kernel": lambda: _state_passing_fwd(
            chunk_states.flatten(-2), dA_cumsum[..., -1], chunk_size=chunk, out_dtype=x.dtype
        )[:1],
        "_bmm_chunk_fwd_kernel": lambda: (_bmm_chunk_fwd(C, B, chunk, output_dtype=torch.float32),),
        "_chunk_scan_fwd_kernel": lambda: _chunk_scan_fwd(CB, x, dt_act, dA_cumsum, C, states, D=D)[:1],
        "_chunk_scan_bwd_dstates_kernel": lambda: (_chunk_scan_bwd_dstates(C, dA_cumsum, dy, dtype=states.dtype),),
        "_state_passing_bwd_kernel": lambda: _state_passing_bwd(
            states.flatten(-2),
            dA_cumsum[..., -1],
            dstates.flatten(-2),
            has_initial_states=False,
            dstates_dtype=x.dtype,
            states_dtype=x.dtype,
            chunk_size=chunk,
        )[:2],  # fmt: skip
        "_chunk_scan_chunk_state_bwd_dx_kernel": lambda: _chunk_scan_chunk_state_bwd_dx(
            x, dt_act, dA_cumsum, B, CB, dy, dstates_p, D=D
        ),
        "_chunk_state_bwd_db_kernel": lambda: _chunk_state_bwd_db(
            x, dt_act, dA_cumsum, dstates_p, B=B, ngroups=ngroups
        ),
        "_chunk_scan_bwd_dc_kernel": lambda: _chunk_scan_bwd_dC(states_lowp, dA_cumsum, dy, C=C, ngroups=ngroups),
        "_chunk_scan_bwd_dcb_kernel": lambda: (_chunk_scan_bwd_dcb(x, dt_act, dA_cumsum, dy, ngroups=ngroups),),
        "_bmm_chunk_bwd_kernel": lambda: (_bmm_chunk_bwd(C, dCB, out=dB),),
        "_chunk_scan_bwd_ddAcs_stable_kernel": lambda: (_chunk_scan_bwd_ddAcs_stable(x, dt_act, dA_cumsum, dy, CB),),
        "_chunk_cumsum_bwd_kernel": lambda: _chunk_cumsum_bwd(
            ddA, ddt_act, dt, A, dt_bias=dt_bias, dt_softplus=True, dt_limit=dt_limit
        ),
    }


def with_kernel(mod, name: str, kernel, fn: Callable):
    """Run ``fn`` with ``mod.name`` bound to ``kernel`` (the wrappers look their kernel up at call time)."""
    saved = getattr(mod, name)
    setattr(mod, name, kernel)
    try:
        return fn()
    finally:
        setattr(mod, name, saved)


def single(tuner, config: triton.Config):
    return triton.autotune(configs=[config], key=tuner.keys)(tuner.fn)


def tune(mod, name: str, call: Callable) -> tuple:
    """Screen every candidate of one kernel, then time the best three and the upstream pick precisely."""
    tuner = getattr(mod, name)
    want = call()  # the upstream autotuner picks its config on this call
    picked, base_ms = tuner.best_config, kernel_ms(call)
    screened = []
    for c in candidates(tuner):
        try:
            ms = with_kernel(mod, name, single(tuner, c), lambda: triton.testing.do_bench(call, warmup=5, rep=30))
            screened.append((ms, c))
        except Exception as e:  # out of resources (shared memory, registers)
            print(f"  {name} {describe(c)}: {type(e).__name__}", flush=True)
    best = None
    for _, c in sorted(screened, key=lambda t: t[0])[:3]:
        kernel = single(tuner, c)
        got = with_kernel(mod, name, kernel, call)
        ms = with_kernel(mod, name, kernel, lambda: kernel_ms(call))
        err = rel_err(got, want)
        print(f"  {name:40s} {describe(c):28s} {ms:7.3f} ms  err {err:.1e}", flush=True)
        if best is None or ms < best[0]:
            best = (ms, c, err)
    print(f"{name:40s} upstream {describe(picked):28s} {base_ms:7.3f} ms  best {describe(best[1]):28s} "
          f"{best[0]:7.3f} ms  {base_ms / best[0]:5.2f}x", flush=True)  # fmt: skip
    return (name, describe(picked), base_ms, *best)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("--shape", default="8x4096")
    ap.add_argument("--kernels", default="", help="comma list of kernel names (default: all)")
    ap.add_argument("--jobs", type=int, default=1, help="processes compiling the candidates before timing")
    ap.add_argument("--part", default="", help="i/n: compile every n-th candidate from the i-th, time nothing")
    args = ap.parse_args()
    cfg = load_run_config(args.config)
    ((batch, seqlen),) = parse_shapes(args.shape)
    names = [n for n in args.kernels.split(",") if n] or [k for _, k in KERNELS]
    kernels = [(mod, k) for mod, k in KERNELS if k in names]

    if args.jobs > 1 and not args.part:
        argv = [sys.executable, *sys.argv]
        procs = [subprocess.Popen([*argv, "--part", f"{i}/{args.jobs}"]) for i in range(args.jobs)]
        failed = sum(p.wait() != 0 for p in procs)
        print(f"compiled in {args.jobs} processes ({failed} failed)", flush=True)

    calls = build_calls(cfg.model, batch, seqlen)
    if args.part:
        part, parts = map(int, args.part.split("/"))
        index = 0
        for mod_name, name in kernels:
            mod = module(mod_name)
            for c in candidates(getattr(mod, name)):
                if index % parts == part:
                    try:
                        with_kernel(mod, name, single(getattr(mod, name), c), calls[name])
                    except Exception:  # out of resources: the timing pass reports it
                        pass
                index += 1
        torch.cuda.synchronize()
        return

    rows = [tune(module(mod_name), name, calls[name]) for mod_name, name in kernels]
    layers = cfg.model.layers.count("M")
    print(
        f"\n{'kernel':40s} {'upstream pick':28s} {'ms':>7s} {'best candidate':28s} {'ms':>7s} {'ratio':>6s} {'err':>8s}"
    )
    for name, picked, base_ms, ms, c, err in rows:
        print(f"{name:40s} {picked:28s} {base_ms:7.3f} {describe(c):28s} {ms:7.3f} {base_ms / ms:5.2f}x {err:8.1e}")
    saved = sum(max(base - ms, 0.0) for _, _, base, ms, _, _ in rows)
    print(f"per layer: upstream {sum(r[2] for r in rows):.3f} ms, best {sum(min(r[2], r[3]) for r in rows):.3f} ms; "
          f"x{layers} Mamba layers: {saved * layers:.2f} ms a step saved")  # fmt: skip


if __name__ == "__main__":
    main()
