"""Two of mamba_ssm's SSD kernel wrappers with wider autotuning lists than upstream's.

mamba_ssm's autotuners choose among configurations written for the A100. ``benchmarks/ssd_configs.py`` ran each
SSD kernel of ``ops/conv_ssd.py`` over every block-size set of its list at num_warps 4 / 8 and num_stages 2 / 3 /
4 on an H200 (500M config, 8x4096, chunk 128, head_dim 64, d_state 128; at c43f2ba, when the op still kept its
chunk states in fp32): two kernels gained, both from fewer pipeline stages (their loops are a few iterations
long), and every other upstream pick was within 3% of the best:

    _chunk_scan_fwd_kernel                 upstream pick 0.357 ms   M=64,N=64,K=32 4 warps 2 stages 0.324 ms
    _chunk_scan_chunk_state_bwd_dx_kernel  upstream pick 0.461 ms   M=32,N=64,K=32 4 warps 2 stages 0.407 ms

The wrappers here are mamba_ssm's own functions, their kernel (a module global they look up when called) bound to
an autotuner over upstream's configurations plus those measured winners, so the autotuner still picks per GPU
and can only do as well or better; mamba_ssm's module and its callers (the anchor model of ``hybridlm bench``)
are untouched. The configurations keep upstream's pre-hooks (accumulators zeroed before each launch).
"""

from __future__ import annotations

import copy
import importlib
import types
from collections.abc import Callable
from functools import cache

# kernel -> (block sizes, num_warps, num_stages) added to upstream's list: the best three of the sweep
EXTRA_CONFIGS: dict[str, list[tuple[dict[str, int], int, int]]] = {
    "_chunk_scan_fwd_kernel": [
        ({"BLOCK_SIZE_M": 64, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 32}, 4, 2),
        ({"BLOCK_SIZE_M": 64, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 32}, 4, 3),
        ({"BLOCK_SIZE_M": 128, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 32}, 8, 3),
    ],
    "_chunk_scan_chunk_state_bwd_dx_kernel": [
        ({"BLOCK_SIZE_M": 32, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 32}, 4, 2),
        ({"BLOCK_SIZE_M": 32, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 32}, 4, 3),
        ({"BLOCK_SIZE_M": 64, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 32}, 4, 2),
    ],
}


def widened(tuner, extra: list[tuple[dict[str, int], int, int]], reset_to_zero: list[str] | None = None):
    """A new autotuner over ``tuner``'s kernel: its configurations, then ``extra`` with the same pre-hook.

    With ``reset_to_zero`` (argument names), no configuration keeps a pre-hook: the caller zeroes those arguments
    before the launch, and the autotuner zeroes them again only after its trial launches (the first call of a
    shape), which leave them holding sums."""
    import triton

    hook = tuner.configs[0].pre_hook if reset_to_zero is None else None
    configs = [*tuner.configs] if reset_to_zero is None else [_without_pre_hook(c) for c in tuner.configs]
    added = [triton.Config(dict(kw), num_warps=warps, num_stages=stages, pre_hook=hook) for kw, warps, stages in extra]
    return triton.autotune(configs=[*configs, *added], key=tuner.keys, reset_to_zero=reset_to_zero)(tuner.fn)


def _without_pre_hook(config):
    config = copy.copy(config)
    config.pre_hook = None
    return config


@cache
def tuned_wrapper(module: str, wrapper: str, kernel: str) -> Callable:
    """The function ``module.wrapper`` launching ``kernel`` (a global of ``module``) widened by
    ``EXTRA_CONFIGS[kernel]``; ``module`` itself is left as it was."""
    mod = importlib.import_module(module)
    fn = getattr(mod, wrapper)
    namespace = {**fn.__globals__, kernel: widened(getattr(mod, kernel), EXTRA_CONFIGS[kernel])}
    rebound = types.FunctionType(fn.__code__, namespace, fn.__name__, fn.__defaults__, fn.__closure__)
    rebound.__kwdefaults__ = fn.__kwdefaults__
    return rebound


def chunk_scan_fwd() -> Callable:
    return tuned_wrapper("mamba_ssm.ops.triton.ssd_chunk_scan", "_chunk_scan_fwd", "_chunk_scan_fwd_kernel")


def chunk_scan_chunk_state_bwd_dx() -> Callable:
    return tuned_wrapper(
        "mamba_ssm.ops.triton.ssd_combined", "_chunk_scan_chunk_state_bwd_dx", "_chunk_scan_chunk_state_bwd_dx_kernel"
    )
