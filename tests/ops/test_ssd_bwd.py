"""hybridlm's launches of six of mamba_ssm's SSD backward kernels (``ops/ssd_bwd.py``) against mamba_ssm's own
wrappers of the same kernels, on the CPU under Triton's interpreter.

mamba_ssm does not install without CUDA, but its Triton kernels and their wrappers are Python: they are imported
here straight from its wheel beside the checkout (``../shared/gpu/wheels``, where CI has it), without the
package's ``__init__`` and its CUDA extensions; without the wheel the module is skipped. The same kernels with the
same arguments give the same numbers, so the outputs must be equal: dB, dC and d(C·Bᵀ) with the heads in one split
(returned as a view) and in four (summed), and the decays' terms that hybridlm leaves unsummed, once summed as
mamba_ssm sums them; with the accumulators zeroed by the caller and the kernels launched without their zeroing
pre-hooks, too. Every ``torch.empty`` is NaN-filled meanwhile, so a buffer read before it is zeroed or written
shows. The GPU tests hold the whole mixer with these launches to the one with mamba_ssm's wrappers.

hybridlm's own kernels for two of those steps (``ops/ssd_group.py``: the chunked scan's forward and its x gradient)
are held here to mamba_ssm's kernels on the same inputs, to fp32 rounding (the same arithmetic, summed in another
order).
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import os
import sys
import types
from pathlib import Path

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("a GPU is here: the GPU tests run these kernels compiled", allow_module_level=True)
triton = pytest.importorskip("triton")
if tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 9):
    pytest.skip(f"triton {triton.__version__}'s interpreter fails under numpy 2.4", allow_module_level=True)
pytest.importorskip("einops")  # mamba_ssm's kernel modules import it

WHEELS = Path(__file__).resolve().parents[3] / "shared" / "gpu" / "wheels"


@pytest.fixture
def upstream(monkeypatch):
    """mamba_ssm's SSD kernel modules from its wheel, on a CPU standing in for a GPU of ``sms`` SMs (set by the
    test through ``upstream.sms``); sys.modules is restored afterwards."""
    wheel = next(iter(sorted(WHEELS.glob("mamba_ssm-*.whl"))), None)
    if wheel is None:
        pytest.skip(f"no mamba_ssm wheel in {WHEELS}")
    from hybridlm.ops import ssd_bwd

    ssd_bwd._launcher.cache_clear()  # its autotuners belong to the mamba_ssm modules imported last time
    before = set(sys.modules)
    package = types.ModuleType("mamba_ssm")
    package.__path__ = [f"{wheel}/mamba_ssm"]  # zipimport reads the modules from the wheel
    monkeypatch.setitem(sys.modules, "mamba_ssm", package)
    stand_in = types.SimpleNamespace(sms=132)
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda device: types.SimpleNamespace(multi_processor_count=stand_in.sms)
    )
    monkeypatch.setattr(torch.cuda, "device", lambda index: contextlib.nullcontext())
    # autotuning without timing: the interpreter's "benchmarks" would run every configuration (minutes); any pick
    # serves, as both wrappers launch through the same autotuner
    timings = itertools.count()
    monkeypatch.setattr(
        triton.runtime.autotuner.Autotuner,
        "do_bench",
        property(lambda self: lambda call, quantiles: [next(timings)] * 3),
    )
    stand_in.scan = importlib.import_module("mamba_ssm.ops.triton.ssd_chunk_scan")
    stand_in.state = importlib.import_module("mamba_ssm.ops.triton.ssd_chunk_state")
    stand_in.combined = importlib.import_module("mamba_ssm.ops.triton.ssd_combined")
    yield stand_in
    for name in set(sys.modules) - before:
        if name.startswith("mamba_ssm"):
            del sys.modules[name]
    ssd_bwd._launcher.cache_clear()


@pytest.fixture
def nan_empty(monkeypatch):
    """``torch.empty`` and ``torch.empty_like`` fill floating-point tensors with NaN."""

    def filled(allocate):
        def allocate_nan(*args, **kwargs):
            t = allocate(*args, **kwargs)
            return t.fill_(float("nan")) if t.is_floating_point() else t

        return allocate_nan

    monkeypatch.setattr(torch, "empty", filled(torch.empty))
    monkeypatch.setattr(torch, "empty_like", filled(torch.empty_like))


@pytest.mark.parametrize("zero_once", [False, True], ids=["zeroed by pre-hooks", "zeroed once"])
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic sums", "deterministic sums"])
@pytest.mark.parametrize("sms", [132, 1], ids=["four splits of the heads", "one split"])
@pytest.mark.parametrize("packed", [False, True], ids=["one document", "packed documents"])
def test_wrappers_give_what_mamba_ssm_wrappers_give(
    upstream, nan_empty, monkeypatch, sms, packed, deterministic, zero_once
):
    """``deterministic``: mamba_ssm's deterministic mode (read at each call), where the decays' terms are summed
    over tiles of a workspace instead of by atomic adds. ``zero_once``: the wrappers get ``Accumulators``."""
    from hybridlm.ops import ssd_bwd

    monkeypatch.setenv("MAMBA_DETERMINISTIC", "1" if deterministic else "0")

    upstream.sms = sms  # 2 rows x 4 chunks x 4 heads: one head per program on 132 SMs, all four on one SM
    torch.manual_seed(0)
    batch, seqlen, nheads, headdim, ngroups, dstate, chunk = 2, 64, 4, 16, 1, 16, 16
    nchunks = seqlen // chunk
    x, dy = torch.randn(batch, seqlen, nheads, headdim), torch.randn(batch, seqlen, nheads, headdim)
    B, C = torch.randn(batch, seqlen, ngroups, dstate), torch.randn(batch, seqlen, ngroups, dstate)
    dt = torch.rand(batch, nheads, nchunks, chunk) * 0.5
    dA_cumsum = (-torch.rand(batch, nheads, nchunks, chunk) * 0.1).cumsum(-1)
    dstates, states = (torch.randn(batch, nchunks, nheads, headdim, dstate) for _ in range(2))
    CB = torch.randn(batch, nchunks, ngroups, chunk, chunk)
    seq_idx = None
    if packed:  # a boundary inside the third chunk of row 0
        seq_idx = torch.zeros(batch, seqlen, dtype=torch.int32)
        seq_idx[0, 37:] = 1

    D, A, dt_bias = torch.randn(nheads), -torch.rand(nheads), torch.randn(nheads)
    dt_raw, dt_limit = torch.randn(batch, seqlen, nheads), (0.0, float("inf"))
    dx_up, ddt_up, dD_up = upstream.combined._chunk_scan_chunk_state_bwd_dx(
        x, dt, dA_cumsum, B, CB, dy, dstates, D=D, seq_idx=seq_idx
    )
    dB_up, from_B_up = upstream.state._chunk_state_bwd_db(x, dt, dA_cumsum, dstates, seq_idx=seq_idx, B=B, ngroups=1)
    dC_up, from_C_up = upstream.scan._chunk_scan_bwd_dC(states, dA_cumsum, dy, seq_idx=seq_idx, C=C, ngroups=1)
    dcb_up = upstream.scan._chunk_scan_bwd_dcb(x, dt, dA_cumsum, dy, seq_idx=seq_idx, ngroups=1)
    in_chunk_up = upstream.scan._chunk_scan_bwd_ddAcs_stable(x, dt, dA_cumsum, dy, CB)
    ddt_raw_up, dA_up, ddt_bias_up = upstream.state._chunk_cumsum_bwd(
        in_chunk_up, ddt_up, dt_raw, A, dt_bias=dt_bias, dt_softplus=True, dt_limit=dt_limit
    )

    # twice: a shape's first launch autotunes, and the autotuner re-zeroes the accumulators after its trials;
    # every later launch relies on the caller's zeroing alone
    for _ in range(2):
        acc = ssd_bwd.Accumulators.zeroed(x, nchunks, chunk, dstate, D) if zero_once else None
        dx, ddt, dD = ssd_bwd.chunk_scan_chunk_state_bwd_dx(
            x, dt, dA_cumsum, B, CB, dy, dstates, D, seq_idx, torch.empty_like(x), widen=False, acc=acc
        )
        assert torch.equal(dx, dx_up) and torch.equal(ddt, ddt_up) and torch.equal(dD, dD_up)

        dB, from_B = ssd_bwd.chunk_state_bwd_db(x, dt, dA_cumsum, dstates, B, ngroups, seq_idx, acc)
        assert torch.equal(dB, dB_up) and torch.equal(from_B.cumsum(-1), from_B_up)

        dC, from_C = ssd_bwd.chunk_scan_bwd_dC(states, dA_cumsum, dy, C, ngroups, seq_idx, acc)
        assert torch.equal(dC, dC_up) and torch.equal(from_C, from_C_up)

        dcb = ssd_bwd.chunk_scan_bwd_dcb(x, dt, dA_cumsum, dy, ngroups, seq_idx)
        assert torch.equal(dcb, dcb_up)
        assert dB.shape == dB_up.shape and dcb.shape == (batch, nchunks, ngroups, chunk, chunk)

        in_chunk = ssd_bwd.chunk_scan_bwd_ddAcs_tiles(x, dt, dA_cumsum, dy, CB)
        assert torch.equal(in_chunk.sum(-2), in_chunk_up)

        if zero_once:  # the dt, A and dt_bias gradients (without accumulators, the mixer calls mamba_ssm's wrapper)
            ddt_raw = torch.empty_like(dt_raw)
            dA, ddt_bias = ssd_bwd.chunk_cumsum_bwd(in_chunk_up, ddt_up, dt_raw, A, dt_bias, dt_limit, ddt_raw, acc)
            assert torch.equal(ddt_raw, ddt_raw_up) and torch.equal(dA, dA_up)
            assert torch.equal(ddt_bias, ddt_bias_up)


def test_pre_hooks_zero_what_hybridlm_zeroes_instead(upstream):
    """Each kernel that ``ssd_bwd`` launches without mamba_ssm's pre-hooks: the arguments its hooks zero are the
    ones ``Accumulators`` zeroes."""
    from hybridlm.ops import ssd_bwd

    for kernel, zeroed in ssd_bwd.ZEROED_BY_PRE_HOOK.items():
        module = next(m for m in (upstream.scan, upstream.state, upstream.combined) if hasattr(m, kernel))
        tuner = getattr(module, kernel)
        for config in tuner.configs:
            args = {name: torch.ones(2) for name in tuner.arg_names}
            config.pre_hook(args)
            assert sorted(name for name, t in args.items() if not t.any()) == sorted(zeroed), kernel


def scan_inputs(D_per_column: bool, packed: bool, chunk: int = 32, dstate: int = 16) -> types.SimpleNamespace:
    """fp32 inputs of the chunked scan's kernels: two groups of two heads (head_dim 16, d_state 16 or ``dstate``),
    two rows of 88 steps in chunks of 32 (the last cut short by the sequence's end), or of ``chunk``; ``packed``: a
    document boundary inside a chunk and one on a chunk's first step (64). ``states`` serves as the states entering
    each chunk or as the gradient of those leaving it."""
    torch.manual_seed(0)
    batch, seqlen, nheads, headdim, ngroups = 2, 88, 4, 16, 2
    nchunks = -(-seqlen // chunk)
    dt = torch.rand(batch, nheads, nchunks, chunk) * 0.5
    dt[:, :, -1, seqlen % chunk :] = 0  # past the sequence's end, as the chunked cumsum leaves them
    seq_idx = None
    if packed:
        seq_idx = torch.zeros(batch, seqlen, dtype=torch.int32)
        seq_idx[0, 45:] = 1
        seq_idx[1, 64:] = 1
    return types.SimpleNamespace(
        x=torch.randn(batch, seqlen, nheads, headdim),
        dy=torch.randn(batch, seqlen, nheads, headdim),
        B=torch.randn(batch, seqlen, ngroups, dstate),
        C=torch.randn(batch, seqlen, ngroups, dstate),
        dt=dt,
        dA_cumsum=(-dt * torch.rand(nheads)[:, None, None]).cumsum(-1),
        states=torch.randn(batch, nchunks, nheads, headdim, dstate),
        CB=torch.randn(batch, nchunks, ngroups, chunk, chunk),
        D=torch.randn(nheads, headdim) if D_per_column else torch.randn(nheads),
        seq_idx=seq_idx,
    )


@pytest.mark.parametrize("rows", [16, 32], ids=["two row blocks a chunk", "one row block a chunk"])
@pytest.mark.parametrize("heads", [1, 2], ids=["a head a program", "two heads a program"])
@pytest.mark.parametrize("D_per_column", [False, True], ids=["D per head", "D per column"])
@pytest.mark.parametrize("packed", [False, True], ids=["one document", "packed documents"])
def test_own_dx_kernel_gives_what_mamba_ssm_dx_kernel_gives(upstream, nan_empty, packed, D_per_column, heads, rows):
    """``ops/ssd_group.py``'s kernel against mamba_ssm's ``_chunk_scan_chunk_state_bwd_dx``: the same arithmetic
    summed in another order (fp32, so to rounding). With one row block a chunk, the kernel reads dy once for both
    of its uses."""
    from hybridlm.ops import ssd_group

    i = scan_inputs(D_per_column, packed)
    args = (i.x, i.dt, i.dA_cumsum, i.B, i.CB, i.dy, i.states)
    want = upstream.combined._chunk_scan_chunk_state_bwd_dx(*args, D=i.D, seq_idx=i.seq_idx)
    dx = torch.empty_like(i.x)
    got = ssd_group.chunk_scan_chunk_state_bwd_dx(
        *args, i.D, i.seq_idx, dx, block_m=rows, heads=heads, num_warps=4, stages=2
    )
    assert got[0] is dx
    for name, g, w in zip(("dx", "ddt", "dD"), got, want, strict=True):
        assert g.shape == w.shape, name
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5 * w.abs().max().item(), msg=name)


@pytest.mark.parametrize("rows", [16, 32], ids=["two row blocks a chunk", "one row block a chunk"])
@pytest.mark.parametrize("heads", [1, 2], ids=["a head a program", "two heads a program"])
@pytest.mark.parametrize("D_per_column", [False, True], ids=["D per head", "D per column"])
@pytest.mark.parametrize("packed", [False, True], ids=["one document", "packed documents"])
def test_own_scan_forward_gives_what_mamba_ssm_scan_forward_gives(
    upstream, nan_empty, packed, D_per_column, heads, rows
):
    """``ops/ssd_group.py``'s chunked-scan forward against mamba_ssm's ``_chunk_scan_fwd`` (without z), as the dx
    kernel's test; with documents the state entering a chunk reaches only the steps of its document (none, where
    one starts on the chunk's first step)."""
    from hybridlm.ops import ssd_group

    i = scan_inputs(D_per_column, packed)
    args = (i.CB, i.x, i.dt, i.dA_cumsum, i.C, i.states)
    want, _ = upstream.scan._chunk_scan_fwd(*args, D=i.D, seq_idx=i.seq_idx)
    got = ssd_group.chunk_scan_fwd(*args, i.D, i.seq_idx, block_m=rows, heads=heads, num_warps=4, stages=2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_own_kernels_take_only_the_scans_they_were_run_at():
    """``ssd_group.launches``: 16-bit inputs of head_dim 32 or 64, d_state up to 128 and chunks of 32 to 128 steps;
    fp32, the ModelConfig's default chunk of 256, head_dim 128 or 24, d_state 256 go to mamba_ssm's kernels (their
    tiles would overflow shared memory, or tl.arange needs a power of two)."""
    from hybridlm.ops import ssd_group

    def x(headdim, dtype=torch.bfloat16):
        return torch.empty(1, 4, 2, headdim, dtype=dtype)

    assert ssd_group.launches(x(64), 128, 128) and ssd_group.launches(x(32), 16, 32)
    assert not ssd_group.launches(x(64, torch.float32), 128, 128)
    assert not ssd_group.launches(x(64), 128, 256)
    assert not ssd_group.launches(x(128), 128, 128) and not ssd_group.launches(x(24), 128, 128)
    assert not ssd_group.launches(x(64), 256, 128)


@pytest.mark.parametrize("per_group, asked, want", [(32, 32, 32), (48, 32, 24), (4, 8, 4), (7, 4, 1)])
def test_heads_a_program_divide_a_groups_heads(per_group, asked, want):
    """A program's heads share one group's C and B: the run is the most heads up to the launch's that divide the
    group's, so any head count launches (48 heads a group at 32 a program would leave a run straddling groups)."""
    from hybridlm.ops import ssd_group

    assert ssd_group._heads_per_program(asked, 2 * per_group, 2) == want


@pytest.mark.parametrize(
    "other_programs, want",
    [(256, 32), (99, 32), (98, 16), (64, 16), (32, 8), (1, 1)],
    ids=["1x32768", "three quarters of the SMs", "just under", "2x4096", "1x4096", "tiny"],
)
def test_default_heads_cover_three_quarters_of_the_sms(other_programs, want):
    """Without ``heads`` a launch takes the most heads up to its default whose grid covers three quarters of 132 SMs
    (99 programs): at the 500M config's 2x4096 (64 chunks, one row block) runs of 16 of the group's 32 heads, 128
    programs; at 1x32768 (256 chunks) all 32; with too few chunks to cover them at any run, one head a program.
    Asked for, a number of heads is kept (capped to divide the group's)."""
    from hybridlm.ops import ssd_group

    assert ssd_group._filling_heads(32, 32, 1, other_programs, sms=132) == want
    # runs divide a group's 24 heads: 16 does not; 12 makes 4 runs over both groups, 256 programs
    assert ssd_group._filling_heads(16, 48, 2, 64, sms=132) == 12
    assert ssd_group.launch_heads(32, 32, 32, 1, 1, torch.device("cpu")) == 32


@pytest.mark.parametrize(
    "rows,chunk",
    [(32, 32), (16, 32), (16, 64)],
    ids=["one row block a chunk", "two row blocks (16 and 32 columns)", "four row blocks (16, 32, 64, 64 columns)"],
)
@pytest.mark.parametrize("heads", [1, 2], ids=["two splits of a group's heads", "one split"])
@pytest.mark.parametrize("packed", [False, True], ids=["one document", "packed documents"])
def test_own_cb_grads_kernel_gives_what_mamba_ssm_two_kernels_give(upstream, nan_empty, packed, heads, rows, chunk):
    """``ops/ssd_group.py``'s one kernel for C·Bᵀ's gradient and the in-chunk decay gradient against mamba_ssm's
    ``_chunk_scan_bwd_dcb`` and ``_chunk_scan_bwd_ddAcs_stable``: the same products, summed in another order. The
    decay gradient comes per row block (the mixer's ``decay_grad`` sums them), its step 0 zero; C·Bᵀ's gradient is
    zero above the diagonal and, with documents, between steps of different documents. A row block takes only the
    columns up to its last row (rounded up to a power of two), and writes zeros past them."""
    from hybridlm.ops import ssd_group

    i = scan_inputs(False, packed, chunk)
    want_dcb = upstream.scan._chunk_scan_bwd_dcb(i.x, i.dt, i.dA_cumsum, i.dy, seq_idx=i.seq_idx, ngroups=2)
    want_dda = upstream.scan._chunk_scan_bwd_ddAcs_stable(i.x, i.dt, i.dA_cumsum, i.dy, i.CB)
    dcb, dda = ssd_group.chunk_scan_bwd_cb_grads(
        i.x, i.dt, i.dA_cumsum, i.dy, i.CB, i.seq_idx, block_m=rows, heads=heads, num_warps=4, stages=2
    )
    assert dcb.shape == want_dcb.shape and dda.shape == (*want_dda.shape[:3], chunk // rows, chunk)
    torch.testing.assert_close(dcb, want_dcb, rtol=1e-5, atol=1e-5 * want_dcb.abs().max().item())
    torch.testing.assert_close(dda.sum(-2), want_dda, rtol=1e-5, atol=1e-5 * want_dda.abs().max().item())
    assert not dda[..., 0].any() and not dcb.triu(1).any()
    if packed:  # row 0's documents meet at step 45: its steps from 45 on against its earlier ones
        first, step = divmod(45, chunk)
        assert not dcb[0, first, :, step:, :step].any() and dcb[0, first, :, step:, step:].any()


@pytest.mark.parametrize("block_n", [16, 32], ids=["two programs across d_state", "one across d_state"])
@pytest.mark.parametrize("heads", [1, 2], ids=["a head a program", "two heads a program"])
@pytest.mark.parametrize("packed", [False, True], ids=["one document", "packed documents"])
def test_own_chunk_state_kernel_gives_what_mamba_ssm_state_kernel_gives(upstream, nan_empty, packed, heads, block_n):
    """``ops/ssd_states.py``'s chunk states against mamba_ssm's ``_chunk_state_fwd``: the same products (fp32, so
    to rounding). With documents a chunk's own state holds only its last step's document."""
    from hybridlm.ops import ssd_states

    i = scan_inputs(False, packed, dstate=32)
    launch = {"block_n": block_n, "heads": heads, "num_warps": 4, "stages": 2}
    want = upstream.state._chunk_state_fwd(i.B, i.x, i.dt, i.dA_cumsum, seq_idx=i.seq_idx)
    states = ssd_states.chunk_state_fwd(i.B, i.x, i.dt, i.dA_cumsum, i.seq_idx, **launch)
    torch.testing.assert_close(states, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    if packed:  # row 0's chunk 1 (steps 32-63) ends in the document that starts at step 45: 32-44 leave no trace
        x = i.x.clone()
        x[0, 32:45] = 0
        again = ssd_states.chunk_state_fwd(i.B, x, i.dt, i.dA_cumsum, i.seq_idx, **launch)
        assert torch.equal(again[0, 1], states[0, 1]) and states[0, 1].any()


@pytest.mark.parametrize("rows", [16, 32], ids=["two row blocks a chunk", "one row block a chunk"])
@pytest.mark.parametrize("heads", [1, 2], ids=["two splits of a group's heads", "one split"])
@pytest.mark.parametrize("packed", [False, True], ids=["one document", "packed documents"])
def test_own_state_grad_kernels_give_what_mamba_ssm_kernels_give(upstream, nan_empty, packed, heads, rows):
    """``ops/ssd_states.py``'s B and C gradients through the states against mamba_ssm's ``_chunk_state_bwd_db``
    and ``_chunk_scan_bwd_dC``: the gradients summed over a group's heads, and each head's decay-gradient terms
    (B's compared after the cumulative sum over the chunk that mamba_ssm takes; its step 0 zero)."""
    from hybridlm.ops import ssd_states

    i = scan_inputs(False, packed, dstate=32)
    launch = {"block_m": rows, "heads": heads, "num_warps": 4, "stages": 2}
    want_dB, want_ddA = upstream.state._chunk_state_bwd_db(
        i.x, i.dt, i.dA_cumsum, i.states, seq_idx=i.seq_idx, B=i.B, ngroups=2
    )
    dB, ddA = ssd_states.chunk_state_bwd_db(i.x, i.dt, i.dA_cumsum, i.states, i.B, i.seq_idx, **launch)
    torch.testing.assert_close(dB, want_dB, rtol=1e-5, atol=1e-5 * want_dB.abs().max().item())
    torch.testing.assert_close(ddA.cumsum(-1), want_ddA, rtol=1e-5, atol=1e-5 * want_ddA.abs().max().item())
    assert not ddA[..., 0].any()
    want_dC, want_ddA = upstream.scan._chunk_scan_bwd_dC(
        i.states, i.dA_cumsum, i.dy, seq_idx=i.seq_idx, C=i.C, ngroups=2
    )
    dC, ddA = ssd_states.chunk_scan_bwd_dC(i.states, i.dA_cumsum, i.dy, i.C, i.seq_idx, **launch)
    torch.testing.assert_close(dC, want_dC, rtol=1e-5, atol=1e-5 * want_dC.abs().max().item())
    torch.testing.assert_close(ddA, want_ddA, rtol=1e-5, atol=1e-5 * want_ddA.abs().max().item())
