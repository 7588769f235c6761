"""Six of mamba_ssm's SSD backward launches, wrapped for the Mamba-2 mixer (``ops/conv_ssd.py``) so that they
return what the mixer sums next instead of summing it themselves, and zero less.

mamba_ssm's wrappers end in reductions that the mixer can skip or fold into a kernel it runs anyway:
- dB and dC (through the chunk states and through the scan) and d(C·Bᵀ) are written per split of a group's
  heads and then summed over the splits. At the 500M config's shapes one program takes all 32 heads of the
  group, so there is one split and the sum is a copy (16.8 MB read and written, ~11 µs each); here one split is
  returned as a view.
- The in-chunk decay gradient comes as partial sums per row tile, summed by the wrapper, and the decay gradient
  through the chunk states as per-step terms, cumulatively summed by the wrapper: both are left to
  ``conv_ssd.decay_grad``, which sums the decay gradient's parts in one compiled kernel.
Five launches a layer fewer. The kernels, their autotuners and their arguments are mamba_ssm's, as its wrappers
pass them (mamba_ssm 2.3).

Given ``Accumulators`` (``MixerKernels.zero_once``), the wrappers also drop the zeroing: mamba_ssm's autotuners
zero each kernel's accumulators (the outputs it adds into atomically) in a pre-hook before every launch, a fill
kernel each, and its dx wrapper allocates one with ``torch.zeros`` and sums it twice. ``Accumulators.zeroed``
carves them all from one buffer zeroed by one fill, and the kernels launch through the same configurations
without the pre-hooks (``_launcher``): seven fills a layer become one, and the dD buffer is summed once.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import torch
import triton

from hybridlm.ops.layout import seq_idx_strides, sum_splits


def _splits(batch: int, nchunks: int, nheads: int, ngroups: int, device: torch.device) -> tuple[int, int]:
    """(heads per program, splits of a group's heads) as mamba_ssm's wrappers choose them: enough programs to
    fill the SMs."""
    per_group = nheads // ngroups
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    per_program = max(min(math.ceil(batch * nchunks * nheads / sms), per_group), 1)
    return per_program, triton.cdiv(per_group, per_program)


def _chunk_strides(t: torch.Tensor) -> tuple[int, ...]:
    """(batch, nheads, nchunks, chunk)-shaped tensors as the kernels take their strides: chunk before head."""
    return t.stride(0), t.stride(2), t.stride(1), t.stride(3)


CHUNK_SCAN = "mamba_ssm.ops.triton.ssd_chunk_scan"
CHUNK_STATE = "mamba_ssm.ops.triton.ssd_chunk_state"
COMBINED = "mamba_ssm.ops.triton.ssd_combined"

# the arguments each kernel's pre-hook zeroes in mamba_ssm 2.3 (tests/ops/test_ssd_bwd.py holds them to the hooks)
ZEROED_BY_PRE_HOOK: dict[str, list[str]] = {
    "_chunk_scan_chunk_state_bwd_dx_kernel": ["ddt_ptr", "dD_ptr"],
    "_chunk_state_bwd_db_kernel": ["ddA_cumsum_ptr"],
    "_chunk_scan_bwd_dc_kernel": ["ddA_cumsum_ptr"],
    "_chunk_cumsum_bwd_kernel": ["dA_ptr", "ddt_bias_ptr"],
}


@cache
def _launcher(module: str, kernel: str, widen: bool = False, zeroed_by_caller: bool = False):
    """``module.kernel``'s autotuner: mamba_ssm's (widened by ``ssd_launch.EXTRA_CONFIGS`` where ``widen``), or,
    when the caller zeroed the accumulators, the same configurations without their zeroing pre-hooks."""
    from hybridlm.ops import ssd_launch

    tuner = getattr(importlib.import_module(module), kernel)
    extra = ssd_launch.EXTRA_CONFIGS.get(kernel, []) if widen else []
    if not zeroed_by_caller:
        return ssd_launch.widened(tuner, extra) if extra else tuner
    return ssd_launch.widened(tuner, extra, reset_to_zero=ZEROED_BY_PRE_HOOK[kernel])


def _dx_shapes(x: torch.Tensor, nchunks: int, chunk_size: int, D: torch.Tensor, deterministic: bool):
    """The dx kernel's ddt and dD buffers' shapes, as mamba_ssm's wrapper allocates them: ddt per step (and per
    column tile, deterministically); dD per row block of the least BLOCK_SIZE_M its list has (32, the constant
    mamba_ssm's wrapper writes; ``ssd_launch``'s additions are no smaller), and per column, tile or neither."""
    from mamba_ssm.ops.triton import ssd_combined

    batch, _, nheads, headdim = x.shape
    tiles = math.ceil(headdim / ssd_combined._CHUNK_SCAN_CHUNK_STATE_BWD_DX_MIN_BLOCK_N)
    configs = ssd_combined._chunk_scan_chunk_state_bwd_dx_kernel.configs
    row_blocks = triton.cdiv(chunk_size, min(config.kwargs["BLOCK_SIZE_M"] for config in configs))
    D_columns = headdim if D.dim() == 2 else tiles if deterministic else 1
    decays = (batch, nheads, nchunks, chunk_size)
    return (*decays, tiles) if deterministic else decays, (row_blocks, batch, nchunks, nheads, D_columns)


@dataclass
class Accumulators:
    """What the backward's kernels add into, zeroed together (``zeroed``): fp32, the tiles' dimension last in
    mamba_ssm's deterministic mode (its kernels then store per tile and the wrappers sum the tiles)."""

    ddt: torch.Tensor  # the dx kernel's dt gradient (batch, nheads, nchunks, chunk[, tiles])
    dD: torch.Tensor  # its D gradient per row block (row blocks, batch, nchunks, nheads, D's columns or tiles)
    ddA_from_B: torch.Tensor  # the dB kernel's decay terms (batch, nheads, nchunks, chunk[, tiles])
    ddA_from_C: torch.Tensor  # the dC kernel's
    dA: torch.Tensor  # the chunk cumsum's A gradient, (nheads,) or per (batch, nchunks, nheads) deterministically
    ddt_bias: torch.Tensor  # and dt_bias's, alike
    deterministic: bool

    @classmethod
    def zeroed(cls, x: torch.Tensor, nchunks: int, chunk_size: int, dstate: int, D: torch.Tensor) -> Accumulators:
        """For the backward of a scan over ``x`` (batch, seqlen, nheads, headdim): one buffer, one fill."""
        from mamba_ssm.ops.triton import ssd_chunk_scan, ssd_chunk_state
        from mamba_ssm.utils.determinism import use_deterministic_mode

        batch, _, nheads, _ = x.shape
        deterministic = use_deterministic_mode()
        decays = (batch, nheads, nchunks, chunk_size)
        per_chunk = (batch, nchunks, nheads) if deterministic else (nheads,)

        def tiled(min_block_n: int) -> tuple[int, ...]:
            return (*decays, math.ceil(dstate / min_block_n)) if deterministic else decays

        shapes = [
            *_dx_shapes(x, nchunks, chunk_size, D, deterministic),
            tiled(ssd_chunk_state._CHUNK_STATE_BWD_DB_MIN_BLOCK_N),
            tiled(ssd_chunk_scan._CHUNK_SCAN_BWD_DC_MIN_BLOCK_N),
            per_chunk,
            per_chunk,
        ]
        # each part starts 128-byte aligned, as a tensor of its own would (the kernels specialise on alignment)
        sizes = [math.prod(shape) for shape in shapes]
        padded = [triton.cdiv(size, 32) * 32 for size in sizes]
        flat = torch.zeros(sum(padded), device=x.device, dtype=torch.float32)
        parts = [part[:size].view(shape) for part, size, shape in zip(flat.split(padded), sizes, shapes, strict=True)]
        return cls(*parts, deterministic=deterministic)


@dataclass
class _StateGradLaunch:
    """What the dB and dC kernels share: the gradient's buffer per split, the decays' terms, the grid."""

    grad: torch.Tensor  # (batch, seqlen, splits, ngroups, dstate) fp32
    ddA: torch.Tensor  # (batch, nheads, nchunks, chunk[, tiles]) fp32: tiles only in deterministic mode
    stride_tile: int
    per_program: int
    deterministic: bool
    grid: Callable[[dict], tuple[int, int, int]]

    def last_strides(self, seq_idx) -> tuple[int, ...]:
        """Both kernels' last stride arguments: seq_idx's, the gradient's, the decays' terms'."""
        return *seq_idx_strides(seq_idx), *self.grad.stride(), *_chunk_strides(self.ddA), self.stride_tile

    def meta(self, seq_idx, headdim: int) -> dict:
        return {
            "HAS_DDA_CS": True,
            "HAS_SEQ_IDX": seq_idx is not None,
            "DETERMINISTIC_REDUCTION": self.deterministic,
            "BLOCK_SIZE_K": max(triton.next_power_of_2(headdim), 16),
        }


def _state_grad_launch(
    dA_cumsum, seqlen: int, ngroups: int, dstate: int, min_block_n: int, zeroed: torch.Tensor | None
) -> _StateGradLaunch:
    """``zeroed``: the decays' terms' buffer from ``Accumulators``, else one the kernel's pre-hook zeroes."""
    from mamba_ssm.utils.determinism import alloc_tile_workspace, use_deterministic_mode

    batch, nheads, nchunks, chunk_size = dA_cumsum.shape
    device = dA_cumsum.device
    deterministic = use_deterministic_mode()
    if zeroed is not None:
        ddA, stride_tile = zeroed, zeroed.stride(-1) if deterministic else 0
    else:
        tiles = math.ceil(dstate / min_block_n)
        ddA, stride_tile = alloc_tile_workspace(
            (batch, nheads, nchunks, chunk_size), tiles, torch.float32, device, deterministic, zero_init=True
        )
    per_program, splits = _splits(batch, nchunks, nheads, ngroups, device)
    grad = torch.empty(batch, seqlen, splits, ngroups, dstate, device=device, dtype=torch.float32)

    def grid(meta):
        blocks = triton.cdiv(chunk_size, meta["BLOCK_SIZE_M"]) * triton.cdiv(dstate, meta["BLOCK_SIZE_N"])
        return blocks, batch * nchunks, splits * ngroups

    return _StateGradLaunch(grad, ddA, stride_tile, per_program, deterministic, grid)


def chunk_state_bwd_db(x, dt, dA_cumsum, dstates, B, ngroups: int, seq_idx=None, acc: Accumulators | None = None):
    """dB through the chunk states, (batch, seqlen, ngroups, dstate) fp32, and their decay-gradient terms per step,
    (batch, nheads, nchunks, chunk) fp32, before the cumulative sum over the chunk that ``_chunk_state_bwd_db``
    takes; without the sum over splits."""
    from mamba_ssm.ops.triton import ssd_chunk_state as upstream
    from mamba_ssm.utils.determinism import finalize_tile_workspace

    batch, seqlen, nheads, headdim = x.shape
    chunk_size, dstate = dt.shape[-1], dstates.shape[-1]
    zeroed = acc.ddA_from_B if acc is not None else None
    launch = _state_grad_launch(dA_cumsum, seqlen, ngroups, dstate, upstream._CHUNK_STATE_BWD_DB_MIN_BLOCK_N, zeroed)
    kernel = _launcher(CHUNK_STATE, "_chunk_state_bwd_db_kernel", zeroed_by_caller=acc is not None)
    with torch.cuda.device(x.device.index):
        kernel[launch.grid](
            x, dstates, B, dt, dA_cumsum, seq_idx, launch.grad, launch.ddA,
            chunk_size, dstate, headdim,
            batch, seqlen, nheads, launch.per_program, ngroups,
            *x.stride(), *dstates.stride(), *B.stride(), *_chunk_strides(dt), *_chunk_strides(dA_cumsum),
            *launch.last_strides(seq_idx), **launch.meta(seq_idx, headdim),
        )  # fmt: skip
    return sum_splits(launch.grad), finalize_tile_workspace(launch.ddA, launch.deterministic)


def chunk_scan_bwd_dC(prev_states, dA_cumsum, dout, C, ngroups: int, seq_idx=None, acc: Accumulators | None = None):
    """dC through the states entering each chunk, (batch, seqlen, ngroups, dstate) fp32, and its decay-gradient
    terms (batch, nheads, nchunks, chunk) fp32: ``_chunk_scan_bwd_dC`` without the sum over splits."""
    from mamba_ssm.ops.triton import ssd_chunk_scan as upstream
    from mamba_ssm.utils.determinism import finalize_tile_workspace

    batch, nchunks, nheads, headdim, dstate = prev_states.shape
    seqlen, chunk_size = dout.shape[1], dA_cumsum.shape[-1]
    zeroed = acc.ddA_from_C if acc is not None else None
    launch = _state_grad_launch(dA_cumsum, seqlen, ngroups, dstate, upstream._CHUNK_SCAN_BWD_DC_MIN_BLOCK_N, zeroed)
    kernel = _launcher(CHUNK_SCAN, "_chunk_scan_bwd_dc_kernel", zeroed_by_caller=acc is not None)
    with torch.cuda.device(dout.device.index):
        kernel[launch.grid](
            dout, prev_states, C, dA_cumsum, seq_idx, launch.grad, launch.ddA,
            chunk_size, dstate, headdim,
            batch, seqlen, nheads, launch.per_program, ngroups,
            *dout.stride(), *prev_states.stride(), *C.stride(), *_chunk_strides(dA_cumsum),
            *launch.last_strides(seq_idx), **launch.meta(seq_idx, headdim),
        )  # fmt: skip
    return sum_splits(launch.grad), finalize_tile_workspace(launch.ddA, launch.deterministic)


def chunk_scan_bwd_dcb(x, dt, dA_cumsum, dout, ngroups: int, seq_idx=None) -> torch.Tensor:
    """d(C·Bᵀ) per chunk, (batch, nchunks, ngroups, chunk, chunk) fp32: ``_chunk_scan_bwd_dcb`` without CB (no
    decay terms) and without the sum over splits."""
    from mamba_ssm.ops.triton import ssd_chunk_scan as upstream

    batch, seqlen, nheads, headdim = x.shape
    _, _, nchunks, chunk_size = dt.shape
    per_program, splits = _splits(batch, nchunks, nheads, ngroups, x.device)
    dcb = torch.empty(batch, nchunks, splits, ngroups, chunk_size, chunk_size, device=x.device, dtype=torch.float32)

    def grid(meta):
        blocks = triton.cdiv(chunk_size, meta["BLOCK_SIZE_M"]) * triton.cdiv(chunk_size, meta["BLOCK_SIZE_N"])
        return blocks, batch * nchunks, splits * ngroups

    with torch.cuda.device(x.device.index):
        upstream._chunk_scan_bwd_dcb_kernel[grid](
            x, dout, None, dt, dA_cumsum, seq_idx, dcb, None,
            chunk_size, headdim,
            batch, seqlen, nheads, per_program, ngroups,
            *x.stride(), *dout.stride(), 0, 0, 0, 0, 0, *_chunk_strides(dt), *_chunk_strides(dA_cumsum),
            *seq_idx_strides(seq_idx), *dcb.stride(), 0, 0, 0, 0, 0,
            HAS_DDA_CS=False, HAS_SEQ_IDX=seq_idx is not None,
            BLOCK_SIZE_K=max(triton.next_power_of_2(headdim), 16),
        )  # fmt: skip
    return sum_splits(dcb)


def chunk_scan_bwd_ddAcs_tiles(x, dt, dA_cumsum, dout, cb) -> torch.Tensor:
    """The in-chunk decay gradient as partial sums per row tile, (batch, nheads, nchunks, tiles, chunk) fp32 (a
    view): ``_chunk_scan_bwd_ddAcs_stable`` before its sum over the tiles."""
    from mamba_ssm.ops.triton import ssd_chunk_scan as upstream

    batch, seqlen, nheads, headdim = x.shape
    _, _, nchunks, chunk_size = dt.shape
    ngroups = cb.shape[2]
    kernel = upstream._chunk_scan_bwd_ddAcs_stable_kernel
    # a tile per row block of the smallest BLOCK_SIZE_M the autotuner may pick (upstream writes 32, its list's least)
    tiles = triton.cdiv(chunk_size, min(config.kwargs["BLOCK_SIZE_M"] for config in kernel.configs))
    ddA = torch.empty(batch, nheads, nchunks, tiles, chunk_size, device=x.device, dtype=torch.float32)

    def grid(meta):
        return triton.cdiv(chunk_size, meta["BLOCK_SIZE_M"]), batch * nchunks, nheads

    with torch.cuda.device(x.device.index):
        kernel[grid](
            x, dout, dt, dA_cumsum, cb, ddA,
            chunk_size, headdim,
            batch, seqlen, nheads // ngroups,
            *x.stride(), *dout.stride(), *_chunk_strides(dt), *_chunk_strides(dA_cumsum), *cb.stride(),
            ddA.stride(0), ddA.stride(2), ddA.stride(1), ddA.stride(3), ddA.stride(4),
            BLOCK_SIZE_K=max(triton.next_power_of_2(headdim), 16),
        )  # fmt: skip
    return ddA[:, :, :, : triton.cdiv(chunk_size, kernel.best_config.kwargs["BLOCK_SIZE_M"])]


def chunk_scan_chunk_state_bwd_dx(
    x, dt, dA_cumsum, B, CB, dout, dstates, D, seq_idx, dx, widen: bool = True, acc: Accumulators | None = None
):
    """dx (written into ``dx``), the dt gradient (batch, nheads, nchunks, chunk) fp32 and D's, as
    ``_chunk_scan_chunk_state_bwd_dx`` returns them (``widen``: through ``ssd_launch``'s wider list), with D's
    row-block partial sums summed by one reduction and its buffer not zeroed twice (a ``torch.zeros`` and the
    pre-hook), or, given ``acc``, not at all."""
    from mamba_ssm.ops.triton import ssd_combined as upstream
    from mamba_ssm.utils.determinism import finalize_tile_workspace, use_deterministic_mode

    batch, seqlen, nheads, headdim = x.shape
    _, _, nchunks, chunk_size = dt.shape
    ngroups, dstate = B.shape[-2:]
    deterministic = use_deterministic_mode()
    if acc is None:  # the pre-hook zeroes them
        shapes = _dx_shapes(x, nchunks, chunk_size, D, deterministic)
        ddt, dD = (torch.empty(shape, device=x.device) for shape in shapes)
    else:
        ddt, dD = acc.ddt, acc.dD
    kernel = _launcher(COMBINED, "_chunk_scan_chunk_state_bwd_dx_kernel", widen, zeroed_by_caller=acc is not None)

    def grid(meta):
        blocks = triton.cdiv(chunk_size, meta["BLOCK_SIZE_M"]) * triton.cdiv(headdim, meta["BLOCK_SIZE_N"])
        return blocks, batch * nchunks, nheads

    with torch.cuda.device(x.device.index):
        kernel[grid](
            x, CB, dout, dt, dA_cumsum, seq_idx, D, B, dstates, dx, ddt, dD,
            chunk_size, headdim, dstate,
            batch, seqlen, nheads // ngroups,
            *x.stride(), *CB.stride()[:3], CB.stride(-1), CB.stride(-2), *dout.stride(),
            *_chunk_strides(dt), *_chunk_strides(dA_cumsum), *seq_idx_strides(seq_idx), D.stride(0),
            *B.stride(), *dstates.stride(), *dx.stride(),
            *_chunk_strides(ddt), ddt.stride(-1) if deterministic else 0,
            dD.stride(1), dD.stride(2), dD.stride(3), dD.stride(0), dD.stride(4),
            True, D.dim() == 2,
            HAS_SEQ_IDX=seq_idx is not None,
            BLOCK_SIZE_DSTATE=max(triton.next_power_of_2(dstate), 16),
            IS_TRITON_22=upstream.TRITON_22,
            DETERMINISTIC_REDUCTION=deterministic,
        )  # fmt: skip
    row_blocks = triton.cdiv(chunk_size, kernel.best_config.kwargs["BLOCK_SIZE_M"])
    dD = dD[:row_blocks].sum(dim=(0, 1, 2))  # (nheads, D's columns or tiles)
    if D.dim() == 1:
        dD = dD[:, 0] if dD.shape[1] == 1 else dD.sum(-1)  # one column: a view, not a second reduction
    return dx, finalize_tile_workspace(ddt, deterministic), dD.to(D.dtype)


def chunk_cumsum_bwd(ddA, ddt_out, dt, A, dt_bias, dt_limit, ddt, acc: Accumulators):
    """``_chunk_cumsum_bwd`` (softplus dt) into ``ddt`` and ``acc``'s zeroed dA and dt_bias buffers: the dt
    gradient, A's and dt_bias's."""
    batch, seqlen, nheads = dt.shape
    _, _, nchunks, chunk_size = ddA.shape
    kernel = _launcher(CHUNK_STATE, "_chunk_cumsum_bwd_kernel", zeroed_by_caller=True)

    def workspace_strides(t: torch.Tensor) -> tuple[int, int, int]:
        return (t.stride(0), t.stride(1), t.stride(2)) if acc.deterministic else (0, 0, t.stride(0))

    def grid(meta):
        return batch, nchunks, triton.cdiv(nheads, meta["BLOCK_SIZE_H"])

    with torch.cuda.device(dt.device.index):
        kernel[grid](
            ddA, ddt_out, dt, A, dt_bias, ddt, acc.dA, acc.ddt_bias,
            batch, seqlen, nheads, chunk_size, dt_limit[0], dt_limit[1],
            *_chunk_strides(ddA), *_chunk_strides(ddt_out), *dt.stride(), A.stride(0), dt_bias.stride(0),
            *ddt.stride(), *workspace_strides(acc.dA), *workspace_strides(acc.ddt_bias),
            True,
            HAS_DT_BIAS=True,
            BLOCK_SIZE_CHUNK=triton.next_power_of_2(chunk_size),
            DETERMINISTIC_REDUCTION=acc.deterministic,
        )  # fmt: skip
    if acc.deterministic:
        return acc.dA.sum(dim=(0, 1)), acc.ddt_bias.sum(dim=(0, 1))
    return acc.dA, acc.ddt_bias
