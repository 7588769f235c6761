"""``ops/ssd_launch.py``: wider autotuning lists for two of mamba_ssm's SSD kernels, bound into copies of their
wrappers so that mamba_ssm's own module (and the anchor model that runs it) is untouched. On the CPU a small
module written here stands in for mamba_ssm's (an autotuned kernel with a pre-hook that zeroes an accumulator,
and a wrapper that launches it by its global name); the kernel runs under Triton's interpreter (``conftest.py``
turns it on without a GPU; triton >= 3.9, as ``test_triton_interpreted.py``). The GPU tests hold the real
wrappers to upstream's (``conv_ssd_scan[seq_idx,vs upstream launch]``)."""

from __future__ import annotations

import importlib
import os
import textwrap

import pytest
import torch

from hybridlm.ops import ssd_launch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("a GPU is here: the GPU tests run the real wrappers", allow_module_level=True)
triton = pytest.importorskip("triton")
if tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 9):
    pytest.skip(f"triton {triton.__version__}'s interpreter fails under numpy 2.4", allow_module_level=True)

FAKE_MODULE = """
import torch
import triton
import triton.language as tl


def zero_total(nargs):
    nargs["total_ptr"].zero_()


@triton.autotune(
    configs=[triton.Config({"BLOCK": 16}, pre_hook=zero_total), triton.Config({"BLOCK": 32}, pre_hook=zero_total)],
    key=["n"],
)
@triton.jit
def _plus_one_kernel(x_ptr, out_ptr, total_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    tl.store(out_ptr + offs, x + 1, mask=offs < n)
    tl.atomic_add(total_ptr, tl.sum(x, axis=0))


def plus_one(x, total=None):
    out = torch.empty_like(x)
    total = torch.full((1,), 123.0) if total is None else total  # the pre-hook must zero it
    _plus_one_kernel[lambda meta: (triton.cdiv(x.numel(), meta["BLOCK"]),)](x, out, total, x.numel())
    return out, total, _plus_one_kernel.best_config
"""


@pytest.fixture
def fake(tmp_path, monkeypatch):
    name = f"fake_ssd_{abs(hash(tmp_path))}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(FAKE_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module(name)
    monkeypatch.setitem(ssd_launch.EXTRA_CONFIGS, "_plus_one_kernel", [({"BLOCK": 64}, 4, 2), ({"BLOCK": 8}, 2, 3)])
    ssd_launch.tuned_wrapper.cache_clear()
    yield module
    ssd_launch.tuned_wrapper.cache_clear()


@pytest.fixture
def last_config_fastest(monkeypatch):
    """Autotuning without a GPU timer: every config runs, each measured faster than the one before it."""
    timings = iter(range(1000, 0, -1))

    def bench(kernel_call, quantiles):
        kernel_call()
        t = float(next(timings))
        return [t, t, t]

    monkeypatch.setattr(triton.runtime.autotuner.Autotuner, "do_bench", property(lambda self: bench))


def test_widened_keeps_upstream_configs_then_adds_the_extras_with_their_pre_hook(fake):
    upstream = fake._plus_one_kernel
    wide = ssd_launch.widened(upstream, ssd_launch.EXTRA_CONFIGS["_plus_one_kernel"])
    assert [c.kwargs["BLOCK"] for c in wide.configs] == [16, 32, 64, 8]
    assert [(c.num_warps, c.num_stages) for c in wide.configs[2:]] == [(4, 2), (2, 3)]
    assert all(c.pre_hook is fake.zero_total for c in wide.configs)
    assert wide.fn is upstream.fn and wide.keys == upstream.keys == ["n"]
    assert [c.kwargs["BLOCK"] for c in upstream.configs] == [16, 32]  # upstream's list is not extended


def test_tuned_wrapper_launches_the_widened_kernel_and_leaves_the_module_alone(fake, last_config_fastest):
    tuned = ssd_launch.tuned_wrapper(fake.__name__, "plus_one", "_plus_one_kernel")
    x = torch.arange(100, dtype=torch.float32)
    out, total, best = tuned(x)
    torch.testing.assert_close(out, x + 1)
    assert total.item() == x.sum().item()  # the extra configs kept the pre-hook that zeroes the accumulator
    assert best.kwargs["BLOCK"] == 8 and best.num_stages == 3  # the last extra, measured fastest, was picked
    assert fake.plus_one.__globals__["_plus_one_kernel"] is fake._plus_one_kernel
    assert len(fake._plus_one_kernel.configs) == 2
    _, _, upstream_best = fake.plus_one(x)  # the module's own wrapper still autotunes over upstream's two
    assert upstream_best.kwargs["BLOCK"] in (16, 32)
    assert tuned.__defaults__ == fake.plus_one.__defaults__ and tuned.__name__ == "plus_one"
    assert ssd_launch.tuned_wrapper(fake.__name__, "plus_one", "_plus_one_kernel") is tuned  # built once
