"""Does the memory layout of q, k, v change what SDPA's attention costs? Times causal attention forward and
forward + backward at one shape for three layouts of the same tensors:

- ``bshd views``: (batch, seq, heads, head_dim) tensors transposed to (batch, heads, seq, head_dim) views, as
  ``ops.attention`` passes hybridlm's q / k / v (each from its own projection);
- ``packed qkv``: views into one (batch, seq, 3, heads, head_dim) projection output, as mamba_ssm's MHA passes them;
- ``bhsd contiguous``: (batch, heads, seq, head_dim) contiguous tensors (what a layer would have to copy into).

    python benchmarks/attention_layouts.py configs/hybrid-500m.yaml --shapes 1x32768,8x4096

Prints milliseconds per layer (median of ``triton.testing.do_bench``) and each layout's ratio to the first.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from hybridlm.bench import parse_shapes
from hybridlm.config import load_run_config


def layouts(batch: int, seq: int, heads: int, head_dim: int, device: torch.device) -> dict[str, list[torch.Tensor]]:
    """Three layouts of q, k, v (batch, heads, seq, head_dim) leaves, each requiring grad."""

    def leaf(t: torch.Tensor) -> torch.Tensor:
        return t.detach().requires_grad_()

    bf16 = torch.bfloat16
    bshd = [leaf(torch.randn(batch, seq, heads, head_dim, device=device, dtype=bf16)) for _ in "qkv"]
    packed = leaf(torch.randn(batch, seq, 3, heads, head_dim, device=device, dtype=bf16))
    bhsd = [leaf(torch.randn(batch, heads, seq, head_dim, device=device, dtype=bf16)) for _ in "qkv"]
    return {
        "bshd views": bshd,
        "packed qkv": [packed],
        "bhsd contiguous": bhsd,
    }


def as_bhsd(name: str, leaves: list[torch.Tensor]) -> list[torch.Tensor]:
    if name == "packed qkv":
        return [t.transpose(1, 2) for t in leaves[0].unbind(2)]
    if name == "bshd views":
        return [t.transpose(1, 2) for t in leaves]
    return leaves


def main() -> None:
    import triton.testing

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config")
    p.add_argument("--shapes", default="1x32768,8x4096")
    args = p.parse_args()
    cfg = load_run_config(args.config).model
    device = torch.device("cuda")
    heads, head_dim = cfg.attention.n_heads, cfg.head_dim
    print(f"{'shape':>9}  {'layout':<16} {'fwd ms':>8} {'fwd+bwd ms':>11} {'vs first':>9}  output strides")
    for batch, seq in parse_shapes(args.shapes):
        first = None
        for name, leaves in layouts(batch, seq, heads, head_dim, device).items():
            q, k, v = as_bhsd(name, leaves)
            grad_out = torch.randn_like(q)  # the layout torch gives the output is the kernel's choice

            def fwd(q=q, k=k, v=v):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)

            def fwd_bwd(q=q, k=k, v=v, leaves=leaves, grad_out=grad_out):
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                torch.autograd.grad(out, leaves, grad_out)

            with torch.no_grad():
                t_fwd = triton.testing.do_bench(fwd, warmup=50, rep=300, return_mode="median")
            t_all = triton.testing.do_bench(fwd_bwd, warmup=50, rep=500, return_mode="median")
            first = first or t_all
            strides = tuple(fwd().stride())  # the layout SDPA gives its output, chosen from q's
            print(f"{batch}x{seq:<7} {name:<16} {t_fwd:8.3f} {t_all:11.3f} {first / t_all:8.3f}x  {strides}")


if __name__ == "__main__":
    main()
