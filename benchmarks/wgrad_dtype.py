"""The weight gradients of a config's linear layers under bf16 autocast over fp32 parameters: the bf16 product
then a cast to fp32 (what autograd does for ``F.linear`` under autocast) against one product that writes fp32.

    python benchmarks/wgrad_dtype.py configs/hybrid-500m.yaml --shape 8x4096

Prints kernel ms per product (torch.profiler's device time) for each distinct (in, out) shape and the total a
training step would spend (each shape times the layers that have it).
"""

from __future__ import annotations

import argparse
from collections import Counter

import torch
from own_kernels import kernel_ms  # benchmarks/, this script's directory

from hybridlm.bench import parse_shapes
from hybridlm.config import load_run_config


def linear_shapes(model) -> Counter:
    """(in_features, out_features) of every weight matrix the step multiplies, with its count."""
    d, layers = model.d_model, model.layers
    m, att, d_ff = model.mamba, model.attention, model.d_ff
    conv_channels = model.d_inner + 2 * m.ngroups * m.d_state
    head_dim = att.head_dim or d // att.n_heads
    kv = (att.n_kv_heads or att.n_heads) * head_dim
    shapes: Counter = Counter()
    shapes[(d, model.d_inner + conv_channels + model.mamba_n_heads)] += layers.count("M")
    shapes[(model.d_inner, d)] += layers.count("M")
    shapes[(d, att.n_heads * head_dim)] += 2 * layers.count("*")  # q and o
    shapes[(d, kv)] += 2 * layers.count("*")  # k and v
    shapes[(d, d_ff)] += 2 * layers.count("-")  # gate and up
    shapes[(d_ff, d)] += layers.count("-")
    shapes[(d, model.padded_vocab_size)] += 1
    return shapes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("--shape", default="8x4096")
    args = ap.parse_args()
    model = load_run_config(args.config).model
    ((batch, seqlen),) = parse_shapes(args.shape)
    tokens = batch * seqlen
    totals = Counter()
    print(f"{'in x out':>12s} {'count':>5s} {'bf16 + cast':>11s} {'fp32 out':>9s} {'ratio':>6s} {'max rel diff':>12s}")
    for (fan_in, fan_out), count in sorted(linear_shapes(model).items()):
        x = torch.randn(tokens, fan_in, device="cuda", dtype=torch.bfloat16)
        dy = torch.randn(tokens, fan_out, device="cuda", dtype=torch.bfloat16)
        cast = kernel_ms(lambda dy=dy, x=x: torch.mm(dy.t(), x).float())
        direct = kernel_ms(lambda dy=dy, x=x: torch.mm(dy.t(), x, out_dtype=torch.float32))
        exact = torch.mm(dy.t().double(), x.double())
        err_cast = ((torch.mm(dy.t(), x).double() - exact).abs().max() / exact.abs().max()).item()
        err_direct = (torch.mm(dy.t(), x, out_dtype=torch.float32).double() - exact).abs().max() / exact.abs().max()
        print(f"{fan_in:>5d} x {fan_out:<5d} {count:5d} {cast:11.3f} {direct:9.3f} {cast / direct:5.2f}x "
              f"{err_cast:.1e} / {err_direct.item():.1e}", flush=True)  # fmt: skip
        totals["cast"] += cast * count
        totals["direct"] += direct * count
    print(f"a step's weight gradients: bf16 + cast {totals['cast']:.2f} ms, fp32 out {totals['direct']:.2f} ms")


if __name__ == "__main__":
    main()
