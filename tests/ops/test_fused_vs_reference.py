"""Every fused kernel against its PyTorch reference, forward and backward, fp32 and bf16 (GPU only).

Run on a CUDA machine with mamba_ssm and causal_conv1d installed (flash-attn optional)::

    python -m pytest -q -m gpu tests/ops/test_fused_vs_reference.py -s

``test_print_error_table`` prints one line per op x dtype x direction (max abs error, the reference's
magnitude, the tolerance), reusing what the other tests of the session measured. The first run
compiles and autotunes mamba_ssm's Triton kernels, so expect several minutes on an H200 (each
ssd_scan case took 70-120 s, the packed-document model test ~65 s); ``-k table`` alone measures all.

Both paths get the same inputs in the same dtype; the references compute in fp32 internally and
cast their outputs back, so the differences are the fused kernels' own.

Tolerances. Forward: every element satisfies |fused - ref| <= atol + rtol * |ref|. Backward: for
every input gradient g, max|g_fused - g_ref| <= grad_rel * max|g_ref| (gradients of long scans span
orders of magnitude, so they are compared relative to their largest entry).

    family     ops                                                    dtype  atol   rtol   grad_rel
    scan       selective_scan, selective_state_update (both layouts)  fp32   1e-3   1e-3   1e-3
    scan                                                              bf16   5e-2   5e-2   5e-2
    ssd        ssd_scan (mamba_ssm Triton; tl.dot runs fp32 as TF32)  fp32   3e-2   3e-3   5e-3
    ssd                                                               bf16   1e-1   5e-2   5e-2
    conv       causal_conv1d, causal_conv1d_update                    fp32   1e-4   1e-4   1e-4
    conv                                                              bf16   1e-2   1e-2   2e-2
    attention  attention_sdpa, attention_flash (bf16 only)            fp32   1e-4   1e-4   1e-3
    attention                                                         bf16   2e-2   2e-2   3e-2
    ssd        conv_ssd_scan (conv + SSD + gated norm in one op)      as ssd
    same       conv_ssd_scan vs mamba_ssm's combined op (the same     fp32   1e-4   1e-4   1e-4
    kernels    kernels; only summation order and autotuning differ),  bf16   1e-2   1e-2   1e-2
               and vs itself with one of its choices switched off
               (mamba_ssm's gated-norm backward, upstream's
               autotuning lists, fp32 chunk states, mamba_ssm's
               state passing)
    norm       rms_norm, gated_rms_norm, add_rms_norm,                fp32   1e-4   1e-4   1e-4
               swiglu, rotary (torch.compile), cross_entropy,         bf16   2e-2   2e-2   2e-2
               linears (GEMM-epilogue gradient sum)
    model      whole hybrid model: logits / parameter grads           fp32   2e-3   2e-3   1e-2
    model                                                             bf16   1e-1   5e-2   5e-2

The one-token updates (selective_state_update, causal_conv1d_update) are inference kernels without
autograd: forward only, comparing both the output and the state they update in place. The fused
Mamba-1 selective scan cannot restart its state at document boundaries, so no reset is tested there.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from hybridlm import HybridLM, ModelConfig, ops
from hybridlm.model import InferenceCache
from hybridlm.ops.attn import attention_flash, attention_ref, attention_sdpa
from hybridlm.ops.compiled import (
    add_rms_norm_fused,
    cross_entropy_ref,
    rotary_fused,
    rotary_ref,
    swiglu_fused,
    swiglu_ref,
)
from hybridlm.ops.conv import (
    causal_conv1d_fused,
    causal_conv1d_ref,
    causal_conv1d_update_fused,
    causal_conv1d_update_ref,
)
from hybridlm.ops.conv_ssd import MixerKernels, conv_ssd_scan_combined, conv_ssd_scan_fused
from hybridlm.ops.norm import (
    gated_rms_norm_fused,
    gated_rms_norm_ref,
    rms_norm_fused,
    rms_norm_ref,
)
from hybridlm.ops.selective import (
    selective_scan_fused,
    selective_scan_ref,
    selective_state_update_fused,
    selective_state_update_ref,
)
from hybridlm.ops.ssd import ssd_scan_fused, ssd_scan_ref

pytestmark = pytest.mark.gpu

FP32, BF16 = torch.float32, torch.bfloat16
DTYPES = {"fp32": FP32, "bf16": BF16}


@dataclass(frozen=True)
class Tol:
    atol: float
    rtol: float
    grad_rel: float


TOLERANCES: dict[tuple[str, torch.dtype], Tol] = {
    ("scan", FP32): Tol(1e-3, 1e-3, 1e-3),
    ("scan", BF16): Tol(5e-2, 5e-2, 5e-2),
    ("ssd", FP32): Tol(3e-2, 3e-3, 5e-3),
    ("ssd", BF16): Tol(1e-1, 5e-2, 5e-2),
    ("conv", FP32): Tol(1e-4, 1e-4, 1e-4),
    ("conv", BF16): Tol(1e-2, 1e-2, 2e-2),
    ("attention", FP32): Tol(1e-4, 1e-4, 1e-3),
    ("attention", BF16): Tol(2e-2, 2e-2, 3e-2),
    ("norm", FP32): Tol(1e-4, 1e-4, 1e-4),
    ("norm", BF16): Tol(2e-2, 2e-2, 2e-2),
    ("model", FP32): Tol(2e-3, 2e-3, 1e-2),
    ("model", BF16): Tol(1e-1, 5e-2, 5e-2),
    ("same kernels", FP32): Tol(1e-4, 1e-4, 1e-4),
    ("same kernels", BF16): Tol(1e-2, 1e-2, 1e-2),
}


# ------------------------------------------------------------------------------------------------
# Cases: the same inputs through a fused and a reference callable


@dataclass
class Case:
    family: str
    fused: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]]
    ref: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]]
    inputs: dict[str, torch.Tensor]
    grads: tuple[str, ...] = ()  # inputs whose gradients are compared; empty = forward only
    differentiable_outputs: tuple[int, ...] = (0,)  # outputs the backward loss is built from


@dataclass
class Row:
    op: str
    dtype: str
    direction: str
    max_abs_err: float
    ref_max: float
    tolerance: str
    ok: bool
    detail: str = ""

    def line(self) -> str:
        status = "ok" if self.ok else "FAIL"
        return (
            f"{self.op:<28} {self.dtype:<5} {self.direction:<4} {self.max_abs_err:>11.3e} {self.ref_max:>10.3e}  "
            f"{self.tolerance:<24} {status:<4} {self.detail}"
        )


HEADER = f"{'op':<28} {'dtype':<5} {'dir':<4} {'max_abs_err':>11} {'ref_max':>10}  {'tolerance':<24} {'ok':<4} detail"


def cuda(*shape, dtype=FP32, scale=1.0, shift=0.0) -> torch.Tensor:
    return torch.randn(*shape, device="cuda", dtype=FP32).mul(scale).add(shift).to(dtype)


def doc_seq_idx(batch: int, seqlen: int) -> torch.Tensor:
    """Row 0: boundaries mid-chunk; row 1: one document. int32, starting at 0 (what the model passes)."""
    lengths = [seqlen // 4 + 3, seqlen // 2 - 5]
    first = torch.repeat_interleave(torch.arange(3), torch.tensor(lengths + [seqlen - sum(lengths)]))
    rows = [first] + [torch.zeros(seqlen, dtype=torch.long)] * (batch - 1)
    return torch.stack(rows).to(device="cuda", dtype=torch.int32)


def case_selective_scan(dtype):
    b, d, n, seqlen = 2, 128, 16, 256
    return Case(
        "scan",
        lambda **i: selective_scan_fused(**i, return_last_state=True),
        lambda **i: selective_scan_ref(**i, return_last_state=True),
        {
            "u": cuda(b, d, seqlen, dtype=dtype),
            "delta": cuda(b, d, seqlen, dtype=dtype, scale=0.5),
            "A": -torch.arange(1, n + 1, device="cuda", dtype=FP32).repeat(d, 1) * torch.rand(d, 1, device="cuda"),
            "B": cuda(b, n, seqlen, dtype=dtype),
            "C": cuda(b, n, seqlen, dtype=dtype),
            "D": cuda(d),
            "z": cuda(b, d, seqlen, dtype=dtype),
            "delta_bias": torch.empty(d, device="cuda").uniform_(-4.0, -1.0),
        },
        grads=("u", "delta", "A", "B", "C", "D", "z", "delta_bias"),
        differentiable_outputs=(0,),  # the fused kernel gives no gradient for the last state
    )


def _ssd_inputs(dtype, b, seqlen, nheads, headdim, ngroups, dstate):
    return {
        "x": cuda(b, seqlen, nheads, headdim, dtype=dtype),
        "dt": cuda(b, seqlen, nheads, dtype=dtype, scale=0.5),
        "A": -torch.empty(nheads, device="cuda").uniform_(1.0, 16.0),
        "B": cuda(b, seqlen, ngroups, dstate, dtype=dtype),
        "C": cuda(b, seqlen, ngroups, dstate, dtype=dtype),
        "D": cuda(nheads),
        "z": cuda(b, seqlen, nheads, headdim, dtype=dtype),
        "dt_bias": torch.empty(nheads, device="cuda").uniform_(-4.0, -1.0),
    }


def case_ssd_scan_packed(dtype):
    """seq_idx with boundaries inside chunks, an initial state, the final state, ngroups > 1."""
    b, seqlen, nheads, headdim, ngroups, dstate, chunk = 2, 256, 8, 32, 2, 16, 32
    inputs = _ssd_inputs(dtype, b, seqlen, nheads, headdim, ngroups, dstate)
    inputs["initial_states"] = cuda(b, nheads, headdim, dstate, scale=0.5)
    seq_idx = doc_seq_idx(b, seqlen)

    def run(impl):
        return lambda **i: impl(**i, chunk_size=chunk, seq_idx=seq_idx, return_final_states=True)

    return Case(
        "ssd",
        run(ssd_scan_fused),
        run(ssd_scan_ref),
        inputs,
        grads=tuple(inputs),
        differentiable_outputs=(0, 1),
    )


def case_ssd_scan_ragged(dtype):
    """seqlen not a multiple of the chunk (208 = 6.5 chunks; a multiple of 16 so Triton reuses its
    compiled kernels), one group, no documents."""
    b, seqlen, nheads, headdim, ngroups, dstate, chunk = 2, 208, 8, 32, 1, 16, 32
    inputs = _ssd_inputs(dtype, b, seqlen, nheads, headdim, ngroups, dstate)
    return Case(
        "ssd",
        lambda **i: ssd_scan_fused(**i, chunk_size=chunk),
        lambda **i: ssd_scan_ref(**i, chunk_size=chunk),
        inputs,
        grads=tuple(inputs),
    )


def case_state_update_mamba1(dtype):
    b, d, n = 4, 128, 16

    def run(impl):
        def step(state, **i):
            y = impl(state, **i)
            return y, state

        return step

    return Case(
        "scan",
        run(selective_state_update_fused),
        run(selective_state_update_ref),
        {
            "state": cuda(b, d, n, dtype=dtype),
            "x": cuda(b, d, dtype=dtype),
            "dt": cuda(b, d, dtype=dtype, scale=0.5),
            "A": -torch.arange(1, n + 1, device="cuda", dtype=FP32).repeat(d, 1),
            "B": cuda(b, n, dtype=dtype),
            "C": cuda(b, n, dtype=dtype),
            "D": cuda(d),
            "z": cuda(b, d, dtype=dtype),
            "dt_bias": torch.empty(d, device="cuda").uniform_(-4.0, -1.0),
        },
    )


def case_state_update_mamba2(dtype):
    """Per-head scalars broadcast over headdim / d_state with stride 0, as the Mamba-2 layer passes them."""
    b, nheads, headdim, ngroups, n = 4, 8, 64, 2, 64

    def run(impl):
        def step(state, x, dt, A, B, C, D, z, dt_bias):
            y = impl(
                state,
                x,
                dt[..., None].expand(-1, -1, headdim),
                A[:, None, None].expand(-1, headdim, n),
                B,
                C,
                D=D[:, None].expand(-1, headdim),
                z=z,
                dt_bias=dt_bias[:, None].expand(-1, headdim),
            )
            return y, state

        return step

    return Case(
        "scan",
        run(selective_state_update_fused),
        run(selective_state_update_ref),
        {
            "state": cuda(b, nheads, headdim, n, dtype=dtype),
            "x": cuda(b, nheads, headdim, dtype=dtype),
            "dt": cuda(b, nheads, dtype=dtype, scale=0.5),
            "A": -torch.empty(nheads, device="cuda").uniform_(1.0, 16.0),
            "B": cuda(b, ngroups, n, dtype=dtype),
            "C": cuda(b, ngroups, n, dtype=dtype),
            "D": cuda(nheads),
            "z": cuda(b, nheads, headdim, dtype=dtype),
            "dt_bias": torch.empty(nheads, device="cuda").uniform_(-4.0, -1.0),
        },
    )


def _conv_inputs(dtype, b=2, channels=256, seqlen=256, width=4):
    return {
        "x": cuda(b, channels, seqlen, dtype=dtype),
        "weight": cuda(channels, width, dtype=dtype, scale=0.5),
        "bias": cuda(channels, dtype=dtype, scale=0.1),
    }


def case_causal_conv1d_packed(dtype):
    seq_idx = doc_seq_idx(2, 256)
    return Case(
        "conv",
        lambda **i: causal_conv1d_fused(**i, activation="silu", seq_idx=seq_idx),
        lambda **i: causal_conv1d_ref(**i, activation="silu", seq_idx=seq_idx),
        _conv_inputs(dtype),
        grads=("x", "weight", "bias"),
    )


def case_causal_conv1d(dtype):
    return Case(
        "conv",
        lambda **i: causal_conv1d_fused(**i, activation="silu"),
        lambda **i: causal_conv1d_ref(**i, activation="silu"),
        _conv_inputs(dtype),
        grads=("x", "weight", "bias"),
    )


def case_causal_conv1d_update(dtype):
    def run(impl):
        def step(x, conv_state, weight, bias):
            return impl(x, conv_state, weight, bias, "silu"), conv_state

        return step

    b, channels, width = 4, 256, 4
    return Case(
        "conv",
        run(causal_conv1d_update_fused),
        run(causal_conv1d_update_ref),
        {
            "x": cuda(b, channels, dtype=dtype),
            "conv_state": cuda(b, channels, width, dtype=dtype),
            "weight": cuda(channels, width, dtype=dtype, scale=0.5),
            "bias": cuda(channels, dtype=dtype, scale=0.1),
        },
    )


def _attention_case(impl, dtype, tq, tk, window=None, packed=False):
    b, heads, kv_heads, head_dim = 2, 8, 2, 64
    doc_ids = None
    if packed:
        doc_ids = torch.repeat_interleave(torch.arange(3), torch.tensor([70, 100, tq - 170]))
        doc_ids = torch.stack([doc_ids, torch.zeros_like(doc_ids)]).cuda()
    return Case(
        "attention",
        lambda q, k, v: impl(q, k, v, True, window, doc_ids),
        lambda q, k, v: attention_ref(q, k, v, True, window, doc_ids),
        {
            "q": cuda(b, tq, heads, head_dim, dtype=dtype),
            "k": cuda(b, tk, kv_heads, head_dim, dtype=dtype),
            "v": cuda(b, tk, kv_heads, head_dim, dtype=dtype),
        },
        grads=("q", "k", "v"),
    )


def case_rms_norm(dtype):
    return Case(
        "norm",
        lambda **i: rms_norm_fused(**i, eps=1e-5),
        lambda **i: rms_norm_ref(**i, eps=1e-5),
        {"x": cuda(2, 64, 128, dtype=dtype), "weight": cuda(128, dtype=dtype, scale=0.1, shift=1.0)},
        grads=("x", "weight"),
    )


def case_gated_rms_norm(dtype):
    return Case(
        "norm",
        lambda **i: gated_rms_norm_fused(**i, eps=1e-5, group_size=128),
        lambda **i: gated_rms_norm_ref(**i, eps=1e-5, group_size=128),
        {
            "x": cuda(2, 64, 256, dtype=dtype),
            "z": cuda(2, 64, 256, dtype=dtype),
            "weight": cuda(256, dtype=dtype, scale=0.1, shift=1.0),
        },
        grads=("x", "z", "weight"),
    )


def case_add_rms_norm(dtype, first: bool = False):
    """The pre-norm residual step: fp32 running sum, sub-layer output in ``dtype``; ``first``: no sum yet."""
    inputs = {"x": cuda(2, 64, 128, dtype=dtype), "weight": cuda(128, scale=0.1, shift=1.0)}
    if not first:
        inputs["residual"] = cuda(2, 64, 128, scale=4.0)

    def run(impl):
        return lambda **i: impl(i["x"], i.get("residual"), i["weight"], 1e-5)

    def reference(x, residual, weight, eps):
        with ops.reference_kernels():
            return ops.add_rms_norm(x, residual, weight, eps)

    return Case(
        "norm", run(add_rms_norm_fused), run(reference), inputs, grads=tuple(inputs), differentiable_outputs=(0, 1)
    )


def case_conv_ssd_scan(dtype, packed: bool = True, baseline: str | None = None, seqlen: int = 512, fused=None):
    """Mamba-2's conv + SSD + gated norm from in_proj's output; the 500M config's head_dim, d_state and
    chunk (so Triton's autotuning is shared with it), fp32 parameters as under autocast. ``baseline``:
    against mamba_ssm's combined op (``"combined"``: the same kernels, recomputing in backward) or against
    the same op with one of hybridlm's choices switched off (a ``MixerKernels`` field: ``"own_norm_bwd"``,
    hybridlm's gated-norm backward against mamba_ssm's; ``"tuned_launch"``, the wider autotuning lists against
    upstream's; ``"lowp_states"``, chunk states kept in bf16 against fp32; ``"lowp_chunk_states"``, each chunk's
    own state written in bf16 against fp32; ``"compiled_decay_grad"``, the decays'
    gradient summed by one compiled kernel against eagerly; ``"own_state_passing"``, hybridlm's state passing
    against mamba_ssm's; ``"own_bwd_launch"``, hybridlm's backward wrappers against mamba_ssm's; ``"own_conv_bwd"``,
    hybridlm's conv backward against causal_conv1d's, with documents; ``"own_dx"``, hybridlm's x-gradient kernel
    against mamba_ssm's; ``"own_scan_fwd"``, its chunked-scan forward against mamba_ssm's; ``"own_cb_grads"``, its
    kernel for C·Bᵀ's and the in-chunk decays' gradients against mamba_ssm's two; ``"own_chunk_states"``, its kernel for
    each chunk's own state; ``"own_state_grads"``, its kernels for B's and C's
    gradients through the states) instead of the
    reference ops. ``seqlen``: at 9216 (72 chunks) mamba_ssm's backward kernels put a group's four heads in one
    program on a 132-SM GPU (one split: the wrappers' view instead of a sum), at 512 in four. ``fused``: the op
    held to the reference, ``conv_ssd_scan_fused`` unless given (mamba_ssm's combined op, to tell its kernels'
    error from hybridlm's)."""
    b, nheads, headdim, ngroups, dstate, chunk = 2, 4, 64, 1, 128, 128
    d_inner = nheads * headdim
    channels = d_inner + 2 * ngroups * dstate
    inputs = {
        "zxbcdt": cuda(b, seqlen, d_inner + channels + nheads, dtype=dtype),
        "conv_weight": cuda(channels, 4, scale=0.5),
        "conv_bias": cuda(channels, scale=0.1),
        "dt_bias": torch.empty(nheads, device="cuda").uniform_(-4.0, -1.0),
        "A": -torch.empty(nheads, device="cuda").uniform_(1.0, 16.0),
        "D": cuda(nheads),
        "norm_weight": cuda(d_inner, scale=0.1, shift=1.0),
    }
    seq_idx = doc_seq_idx(b, seqlen) if packed else None

    def run(impl):
        return lambda **i: impl(
            **i,
            chunk_size=chunk,
            seq_idx=seq_idx,
            dt_limit=(0.0, float("inf")),
            norm_eps=1e-5,
            headdim=headdim,
            ngroups=ngroups,
        )

    def reference(**i):
        with ops.reference_kernels():
            return ops.conv_ssd_scan(**i)

    if baseline == "combined":
        return Case("same kernels", run(conv_ssd_scan_fused), run(conv_ssd_scan_combined), inputs, grads=tuple(inputs))
    if baseline is not None:
        upstream = functools.partial(conv_ssd_scan_fused, kernels=MixerKernels(**{baseline: False}))
        return Case("same kernels", run(conv_ssd_scan_fused), run(upstream), inputs, grads=tuple(inputs))
    return Case("ssd", run(fused or conv_ssd_scan_fused), run(reference), inputs, grads=tuple(inputs))


def case_swiglu(dtype):
    inputs = {"gate": cuda(2, 64, 512, dtype=dtype, scale=2.0), "up": cuda(2, 64, 512, dtype=dtype)}
    return Case("norm", swiglu_fused, swiglu_ref, inputs, grads=("gate", "up"))


def case_linears(dtype, autocast: bool = False):
    """Three linear layers of one input (q / k / v-like, one without bias); ``autocast``: fp32 weights under bf16
    autocast (the eager training step), else weights in ``dtype``."""
    from hybridlm.ops.shared_input import shared_input_linears, shared_input_linears_ref

    wdt = FP32 if autocast else dtype
    inputs = {"x": cuda(2, 64, 256, dtype=dtype)}
    inputs |= {f"w{i}": cuda(n, 256, dtype=wdt, scale=0.05) for i, n in enumerate((256, 128, 128))}
    inputs |= {"b0": cuda(256, dtype=wdt), "b1": cuda(128, dtype=wdt)}

    def run(impl):
        def fn(x, w0, w1, w2, b0, b1):
            with torch.autocast("cuda", dtype=BF16, enabled=autocast):
                return impl(x, [w0, w1, w2], [b0, b1, None])

        return fn

    return Case(
        "norm", run(shared_input_linears), run(shared_input_linears_ref), inputs, grads=tuple(inputs),
        differentiable_outputs=(0, 1, 2),
    )  # fmt: skip


def case_rotary(dtype):
    """Partial RoPE (half of each head rotated), positions restarting mid-row as in packed rows."""
    positions = torch.cat([torch.arange(40), torch.arange(24)]).repeat(2, 1).cuda()
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, 32, 2, dtype=FP32, device="cuda") / 32))
    inputs = {"x": cuda(2, 64, 4, 64, dtype=dtype)}

    def run(impl):
        return lambda x: impl(x, positions, inv_freq)

    return Case("norm", run(rotary_fused), run(rotary_ref), inputs, grads=("x",))


def case_cross_entropy(dtype, padded_rows: bool = False):
    """A vocabulary spanning two and a bit of the kernel's blocks; ``padded_rows``: a view of the first
    ``vocab`` columns of wider rows (as the chunked loss slices a padded head's output)."""
    from hybridlm.ops.triton_cross_entropy import BLOCK_V, cross_entropy_triton  # imports triton

    vocab = 2 * BLOCK_V + 123
    targets = torch.randint(0, vocab, (256,), device="cuda")
    targets[::7] = -100  # ignored positions
    inputs = {"logits": cuda(256, vocab + (40 if padded_rows else 0), dtype=dtype, scale=3.0)}

    def run(impl):
        return lambda logits: impl(logits[:, :vocab], targets)

    return Case("norm", run(cross_entropy_triton), run(cross_entropy_ref), inputs, grads=("logits",))


FLASH = importlib.util.find_spec("flash_attn") is not None

CASES: dict[str, Callable[[torch.dtype], Case]] = {
    "selective_scan": case_selective_scan,
    "ssd_scan[seq_idx,init,final]": case_ssd_scan_packed,
    "ssd_scan[ragged]": case_ssd_scan_ragged,
    "selective_state_update[m1]": case_state_update_mamba1,
    "selective_state_update[m2]": case_state_update_mamba2,
    "causal_conv1d": case_causal_conv1d,
    "causal_conv1d[seq_idx]": case_causal_conv1d_packed,
    "causal_conv1d_update": case_causal_conv1d_update,
    "sdpa[gqa]": lambda dt: _attention_case(attention_sdpa, dt, 256, 256),
    "sdpa[gqa,window,docs]": lambda dt: _attention_case(attention_sdpa, dt, 256, 256, 32, True),
    "sdpa[tq<tk,window]": lambda dt: _attention_case(attention_sdpa, dt, 16, 256, 64),
    "flash[gqa]": lambda dt: _attention_case(attention_flash, dt, 256, 256),
    "flash[gqa,window,docs]": lambda dt: _attention_case(attention_flash, dt, 256, 256, 32, True),
    "flash[tq<tk,window]": lambda dt: _attention_case(attention_flash, dt, 16, 256, 64),
    "rms_norm": case_rms_norm,
    "gated_rms_norm": case_gated_rms_norm,
    "add_rms_norm": case_add_rms_norm,
    "add_rms_norm[first]": lambda dt: case_add_rms_norm(dt, first=True),
    "conv_ssd_scan[seq_idx]": case_conv_ssd_scan,
    "conv_ssd_scan": lambda dt: case_conv_ssd_scan(dt, packed=False),
    "conv_ssd_scan[vs combined]": lambda dt: case_conv_ssd_scan(dt, baseline="combined"),
    "conv_ssd_scan[seq_idx,vs upstream norm bwd]": lambda dt: case_conv_ssd_scan(dt, baseline="own_norm_bwd"),
    "conv_ssd_scan[seq_idx,vs upstream launch]": lambda dt: case_conv_ssd_scan(dt, baseline="tuned_launch"),
    "conv_ssd_scan[seq_idx,vs fp32 states]": lambda dt: case_conv_ssd_scan(dt, baseline="lowp_states"),
    "conv_ssd_scan[seq_idx,vs fp32 chunk states]": lambda dt: case_conv_ssd_scan(dt, baseline="lowp_chunk_states"),
    "conv_ssd_scan[vs fp32 chunk states]": lambda dt: case_conv_ssd_scan(
        dt, packed=False, baseline="lowp_chunk_states"
    ),
    "conv_ssd_scan[seq_idx,vs eager decay grad]": lambda dt: case_conv_ssd_scan(dt, baseline="compiled_decay_grad"),
    "conv_ssd_scan[seq_idx,vs upstream state passing]": lambda dt: case_conv_ssd_scan(dt, baseline="own_state_passing"),
    "conv_ssd_scan[seq_idx,vs upstream bwd launch]": lambda dt: case_conv_ssd_scan(dt, baseline="own_bwd_launch"),
    "conv_ssd_scan[one split,vs upstream bwd launch]": lambda dt: case_conv_ssd_scan(
        dt, baseline="own_bwd_launch", seqlen=9216
    ),
    "conv_ssd_scan[one split]": lambda dt: case_conv_ssd_scan(dt, seqlen=9216),
    "conv_ssd_scan[one split,mamba_ssm combined]": lambda dt: case_conv_ssd_scan(
        dt, seqlen=9216, fused=conv_ssd_scan_combined
    ),
    "conv_ssd_scan[seq_idx,vs zeroing pre-hooks]": lambda dt: case_conv_ssd_scan(dt, baseline="zero_once"),
    "conv_ssd_scan[seq_idx,vs causal_conv1d bwd]": lambda dt: case_conv_ssd_scan(dt, baseline="own_conv_bwd"),
    "conv_ssd_scan[seq_idx,vs upstream dx]": lambda dt: case_conv_ssd_scan(dt, baseline="own_dx"),
    "conv_ssd_scan[vs upstream dx]": lambda dt: case_conv_ssd_scan(dt, packed=False, baseline="own_dx"),
    "conv_ssd_scan[seq_idx,vs upstream scan fwd]": lambda dt: case_conv_ssd_scan(dt, baseline="own_scan_fwd"),
    "conv_ssd_scan[vs upstream scan fwd]": lambda dt: case_conv_ssd_scan(dt, packed=False, baseline="own_scan_fwd"),
    "conv_ssd_scan[seq_idx,vs upstream cb grads]": lambda dt: case_conv_ssd_scan(dt, baseline="own_cb_grads"),
    "conv_ssd_scan[vs upstream cb grads]": lambda dt: case_conv_ssd_scan(dt, packed=False, baseline="own_cb_grads"),
    "conv_ssd_scan[seq_idx,vs upstream states]": lambda dt: case_conv_ssd_scan(dt, baseline="own_chunk_states"),
    "conv_ssd_scan[vs upstream states]": lambda dt: case_conv_ssd_scan(dt, packed=False, baseline="own_chunk_states"),
    "conv_ssd_scan[seq_idx,vs upstream state grads]": lambda dt: case_conv_ssd_scan(dt, baseline="own_state_grads"),
    "conv_ssd_scan[vs upstream state grads]": lambda dt: case_conv_ssd_scan(
        dt, packed=False, baseline="own_state_grads"
    ),
    "swiglu": case_swiglu,
    "linears": case_linears,
    "linears[autocast]": lambda dt: case_linears(dt, autocast=True),
    "rotary": case_rotary,
    "cross_entropy": case_cross_entropy,
    "cross_entropy[padded rows]": lambda dt: case_cross_entropy(dt, padded_rows=True),
}


# Cases that fail, for a reason stated beside each: they still run (an expected failure that reports its error rows,
# strict=False so a pass shows as XPASS), and the error table marks them instead of failing on them.
KNOWN_FAILURES: dict[tuple[str, torch.dtype], str] = {
    # Failed on the H200 in session 15. Session 16 measured it (`gpu_session.sh knownfail`, then `zeroonce`):
    # forward max abs error 6.7e-2 against atol 0.03 + rtol 3e-3 (reference max 19.2), backward 8.75e-3 of max|g|
    # in dzxbcdt against 5e-3; mamba_ssm's own combined op gives the same errors to four digits at this shape. So
    # the miss is mamba_ssm's kernels' fp32 accuracy over 72 chunks (likely their TF32 dot products, not isolated),
    # not hybridlm's launches; the tolerance, set at 4 chunks, does not hold at 72. Both stay to show the margin.
    ("conv_ssd_scan[one split]", FP32): "fp32 over 72 chunks: forward 6.7e-2 abs, backward 8.75e-3 rel, as mamba_ssm's",
    ("conv_ssd_scan[one split,mamba_ssm combined]", FP32): "mamba_ssm's op misses it by the same margin",
}


def applicable(name: str, dtype: torch.dtype) -> str | None:
    """Why a case cannot run here (None = it can)."""
    if name == "linears[autocast]" and dtype == FP32:
        return "autocast computes in bf16: the bf16 case covers it"
    if name.endswith("fp32 chunk states]") and dtype == FP32:
        return "fp32 inputs write fp32 chunk states either way: the case would compare the path with itself"
    own_kernels = (
        "upstream dx]",
        "upstream scan fwd]",
        "upstream cb grads]",
        "upstream states]",
        "upstream state grads]",
    )
    if name.endswith(own_kernels) and dtype == FP32:
        return "fp32 inputs take mamba_ssm's kernels (ssd_group's launch shapes fit shared memory in 16-bit only)"
    if name.startswith("flash"):
        if not FLASH:
            return "flash_attn not importable"
        if dtype == FP32:
            return "flash-attn runs in half precision only"
    return None


# ------------------------------------------------------------------------------------------------
# Comparison


def _as_tuple(out) -> tuple[torch.Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


def _run(fn, inputs: dict[str, torch.Tensor], grads: tuple[str, ...], outputs: tuple[int, ...], weights: list):
    leaves = {k: v.detach().clone().requires_grad_(k in grads) for k, v in inputs.items()}
    if not grads:  # inference kernels: the state they update in place is one of the outputs
        with torch.no_grad():
            return tuple(o.float() for o in _as_tuple(fn(**leaves))), {}
    outs = _as_tuple(fn(**leaves))
    if not weights:  # the same random cotangents for both paths
        weights.extend(torch.randn(outs[i].shape, device=outs[i].device) for i in outputs)
    loss = sum((outs[i].float() * w).sum() for i, w in zip(outputs, weights, strict=True))
    loss.backward()
    return tuple(o.detach().float() for o in outs), {k: leaves[k].grad.float() for k in grads}


def compare_outputs(op, dtype_name, fused, ref, tol: Tol) -> Row:
    worst_err, worst_ref, ok, detail = 0.0, 0.0, True, ""
    for i, (f, r) in enumerate(zip(fused, ref, strict=True)):
        err = (f - r).abs()
        ok &= bool((err <= tol.atol + tol.rtol * r.abs()).all()) and bool(torch.isfinite(f).all())
        if err.max().item() >= worst_err:
            worst_err, worst_ref = err.max().item(), r.abs().max().item()
            detail = f"output {i}" if len(fused) > 1 else ""
    return Row(op, dtype_name, "fwd", worst_err, worst_ref, f"atol {tol.atol:g} rtol {tol.rtol:g}", ok, detail)


def compare_grads(op, dtype_name, fused: dict, ref: dict, tol: Tol) -> Row:
    worst = (-1.0, 0.0, 0.0, "")  # (relative err, abs err, ref max, name)
    ok = True
    for name in ref:
        err = (fused[name] - ref[name]).abs().max().item()
        scale = ref[name].abs().max().item()
        rel = err / max(scale, 1e-12)
        ok &= err <= tol.grad_rel * scale + 1e-8 and bool(torch.isfinite(fused[name]).all())
        if rel > worst[0]:
            worst = (rel, err, scale, name)
    rel, err, scale, name = worst
    return Row(op, dtype_name, "bwd", err, scale, f"rel {tol.grad_rel:g} of max|g|", ok, f"worst d{name} rel {rel:.2e}")


@functools.cache  # the table test reuses what the parametrized tests measured in this session
def run_case(name: str, dtype: torch.dtype) -> list[Row]:
    torch.manual_seed(0)
    case = CASES[name](dtype)
    dtype_name = "fp32" if dtype == FP32 else "bf16"
    tol = TOLERANCES[(case.family, dtype)]
    weights: list[torch.Tensor] = []
    out_f, grad_f = _run(case.fused, case.inputs, case.grads, case.differentiable_outputs, weights)
    out_r, grad_r = _run(case.ref, case.inputs, case.grads, case.differentiable_outputs, weights)
    rows = [compare_outputs(name, dtype_name, out_f, out_r, tol)]
    if case.grads:
        rows.append(compare_grads(name, dtype_name, grad_f, grad_r, tol))
    return rows


def _failures(rows: list[Row]) -> str:
    return "\n".join([HEADER] + [r.line() for r in rows if not r.ok])


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("name", CASES)
def test_fused_op_matches_reference(name, dtype_name, request):
    reason = applicable(name, DTYPES[dtype_name])
    if reason:
        pytest.skip(reason)
    if known := KNOWN_FAILURES.get((name, DTYPES[dtype_name])):
        request.applymarker(pytest.mark.xfail(reason=known, strict=False))
    rows = run_case(name, DTYPES[dtype_name])
    assert all(r.ok for r in rows), _failures(rows)


# ------------------------------------------------------------------------------------------------
# Whole model


def small_hybrid(version: int, pattern: str = "M*-M*-") -> ModelConfig:
    return ModelConfig.from_dict(
        {
            "vocab_size": 256,
            "d_model": 128,
            "pattern": pattern,
            "mamba": {"version": version, "d_state": 16, "head_dim": 32, "ngroups": 2, "chunk_size": 32},
            "attention": {"n_heads": 4, "n_kv_heads": 2},
        }
    )


@functools.cache
def model_rows(version: int, dtype: torch.dtype) -> list[Row]:
    """Logits and every parameter's gradient, fused kernels vs ``ops.reference_kernels()``."""
    torch.manual_seed(0)
    model = HybridLM(small_hybrid(version)).cuda()
    if dtype != FP32:
        model.cast(dtype)
    ids = torch.randint(0, 256, (2, 128), device="cuda")
    results = []
    for reference in (False, True):
        model.zero_grad(set_to_none=True)
        with ops.reference_kernels() if reference else contextlib.nullcontext():
            out = model(ids, labels=ids)
            out.loss.backward()
        grads = {n: p.grad.float() for n, p in model.named_parameters()}
        results.append(((out.logits.detach().float(),), grads))
    (out_f, grad_f), (out_r, grad_r) = results
    name = f"model[mamba{version}]"
    dtype_name = "fp32" if dtype == FP32 else "bf16"
    tol = TOLERANCES[("model", dtype)]
    return [compare_outputs(name, dtype_name, out_f, out_r, tol), compare_grads(name, dtype_name, grad_f, grad_r, tol)]


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("version", [1, 2])
def test_model_fused_matches_reference(version, dtype_name):
    rows = model_rows(version, DTYPES[dtype_name])
    assert all(r.ok for r in rows), _failures(rows)


@pytest.mark.parametrize("launch", [None, (512, 16, 2, 1)], ids=["default launch", "tiles of 16, one stage"])
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "one document"])
def test_state_passing_matches_mamba_ssm_over_many_chunks(packed, launch):
    """hybridlm's tiled state passing against mamba_ssm's chunk-by-chunk kernels at the 500M config's state size
    (32 heads of 64 x 128) over 300 chunks of 128 (with tiles of 16 the last is partial), with document boundaries
    inside chunks and on a chunk's last position. Both sum in fp32, in different orders."""
    from mamba_ssm.ops.triton.ssd_state_passing import _state_passing_bwd, _state_passing_fwd

    from hybridlm.ops import state_passing

    launch = launch or state_passing.LAUNCH

    batch, nchunks, nheads, dim, chunk = 2, 300, 32, 64 * 128, 128
    seqlen = nchunks * chunk - 50
    states = cuda(batch, nchunks, nheads, dim, scale=0.1)
    dA_last = -torch.rand(batch, nheads, nchunks, device="cuda") * 0.5
    seq_idx = None
    if packed:
        seq_idx = torch.zeros(batch, seqlen, dtype=torch.int32, device="cuda")
        for start in (1000, 5 * chunk - 1, 20_000):
            seq_idx[0, start:] += 1
    dentering = cuda(batch, nchunks, nheads, dim)

    want, _ = _state_passing_fwd(states, dA_last, seq_idx=seq_idx, chunk_size=chunk, out_dtype=FP32)
    got = state_passing.state_passing_fwd(states, dA_last, seq_idx, chunk, out_dtype=FP32, launch=launch)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    want_dstates, want_ddA, _, _ = _state_passing_bwd(
        want, dA_last, dentering, seq_idx=seq_idx, has_initial_states=False, dstates_dtype=FP32, states_dtype=BF16,
        chunk_size=chunk,
    )  # fmt: skip
    dstates, ddA_partial, converted = state_passing.state_passing_bwd(
        got, dA_last, dentering, seq_idx, chunk, dstates_dtype=FP32, entering_dtype=BF16, launch=launch
    )
    torch.testing.assert_close(dstates, want_dstates, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(ddA_partial.sum(-1), want_ddA, atol=1e-3, rtol=1e-4)  # sums over 8192 elements
    assert torch.equal(converted, got.to(BF16))


def test_fused_model_keeps_packed_documents_isolated():
    dtype = FP32  # isolation is exact in any dtype; fp32 keeps the comparison tight
    model = HybridLM(small_hybrid(2)).cuda().eval()
    lengths = [48, 32, 48]  # boundaries inside SSD chunks of 32
    ids = torch.randint(0, 256, (1, sum(lengths)), device="cuda")
    doc_ids = torch.repeat_interleave(torch.arange(3), torch.tensor(lengths)).cuda()[None]
    tol = TOLERANCES[("model", dtype)]
    with torch.no_grad():
        packed = model(ids, doc_ids=doc_ids).logits.float()
        start = 0
        for length in lengths:
            alone = model(ids[:, start : start + length]).logits.float()
            torch.testing.assert_close(packed[:, start : start + length], alone, atol=tol.atol, rtol=tol.rtol)
            start += length
        # the test has teeth: without doc_ids the later documents change
        assert not torch.allclose(model(ids).logits.float()[:, 48:], packed[:, 48:], atol=tol.atol, rtol=tol.rtol)


@pytest.mark.parametrize("version", [1, 2])
def test_fused_cached_decoding_reproduces_the_full_forward(version):
    model = HybridLM(small_hybrid(version)).cuda().eval()
    ids = torch.randint(0, 256, (2, 48), device="cuda")
    tol = TOLERANCES[("model", FP32)]
    with torch.no_grad():
        full = model(ids).logits
        cache = InferenceCache()
        steps = [model(ids[:, :32], cache=cache).logits]
        steps += [model(ids[:, t : t + 1], cache=cache).logits for t in range(32, 48)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=tol.atol, rtol=tol.rtol)


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("version", [1, 2])
def test_graphed_decoding_replays_the_eager_steps(version, dtype_name):
    """The CUDA-graph decoder's logits, token by token, against eager cached steps on the same fused
    kernels (teacher-forced, so a near-tie in bf16 cannot send the two down different paths). Replays
    read the position from the device: a graph with the capture-time position baked in would fail
    (RoPE and the KV slot would stay at position 0). Tolerances: the model family's."""
    dtype = DTYPES[dtype_name]
    torch.manual_seed(0)
    model = HybridLM(small_hybrid(version, pattern="M*-M*-*-")).cuda().eval()
    if dtype != FP32:
        model.cast(dtype)
    ids = torch.randint(0, 256, (3, 40), device="cuda")
    tol = TOLERANCES[("model", dtype)]
    graphed = model.decoder(3, 64, cuda_graph=True)
    assert graphed.graph is not None
    with torch.no_grad():
        for prompt in (24, 9):  # a second, shorter prompt through the same capture
            eager = model.decoder(3, 64, cuda_graph=False)
            got, expected = [graphed.prefill(ids[:, :prompt]).clone()], [eager.prefill(ids[:, :prompt])]
            for t in range(prompt, ids.shape[1]):
                got.append(graphed.step(ids[:, t]).clone())
                expected.append(eager.step(ids[:, t]))
            got_all, expected_all = torch.stack(got).float(), torch.stack(expected).float()
            torch.testing.assert_close(got_all, expected_all, atol=tol.atol, rtol=tol.rtol, msg=f"prompt {prompt}")


def test_dispatch_picks_the_fused_kernels_on_cuda():
    table = ops.kernel_table(torch.device("cuda"))
    assert table["ssd_scan"] == "mamba_ssm" and table["causal_conv1d"] == "causal_conv1d"
    assert table["attention"] == ("flash_attn" if FLASH else "torch SDPA")


# ------------------------------------------------------------------------------------------------
# The table


def test_print_error_table():
    """One line per op x dtype x direction, printed as each is measured; run with -s to see it.
    Fails if any line fails."""
    print(f"\nfused vs reference on {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(HEADER, flush=True)
    rows: list[Row] = []

    def emit(new_rows: list[Row]) -> None:
        rows.extend(new_rows)
        for row in new_rows:
            print(row.line(), flush=True)

    for name in CASES:
        for dtype_name, dtype in DTYPES.items():
            reason = applicable(name, dtype)
            if reason:
                print(f"{name:<28} {dtype_name:<5} skipped: {reason}", flush=True)
                continue
            case_rows = run_case(name, dtype)
            if (name, dtype) in KNOWN_FAILURES:  # printed, not held against the table
                for row in case_rows:
                    print(f"{row.line()}  (known failure)", flush=True)
                continue
            emit(case_rows)
    for version in (1, 2):
        for dtype in DTYPES.values():
            emit(model_rows(version, dtype))
    assert all(r.ok for r in rows), _failures(rows)
