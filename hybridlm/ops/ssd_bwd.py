"""Four of mamba_ssm's SSD backward launches, wrapped for the Mamba-2 mixer (``ops/conv_ssd.py``) so that they
return what the mixer sums next instead of summing it themselves.

mamba_ssm's wrappers end in reductions that the mixer can skip or fold into a kernel it runs anyway:
- dB and dC (through the chunk states and through the scan) and d(C·Bᵀ) are written per split of a group's
  heads and then summed over the splits. At the 500M config's shapes one program takes all 32 heads of the
  group, so there is one split and the sum is a copy (16.8 MB read and written, ~11 µs each); here one split is
  returned as a view.
- The in-chunk decay gradient comes as partial sums per row tile, summed by the wrapper, and the decay gradient
  through the chunk states as per-step terms, cumulatively summed by the wrapper: both are left to
  ``conv_ssd.decay_grad``, which sums the decay gradient's parts in one compiled kernel.
Five launches a layer fewer. The kernels, their autotuners (and pre-hooks) and their arguments are mamba_ssm's,
as its wrappers pass them (mamba_ssm 2.3).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton


def _splits(batch: int, nchunks: int, nheads: int, ngroups: int, device: torch.device) -> tuple[int, int]:
    """(heads per program, splits of a group's heads) as mamba_ssm's wrappers choose them: enough programs to
    fill the SMs."""
    per_group = nheads // ngroups
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    per_program = max(min(math.ceil(batch * nchunks * nheads / sms), per_group), 1)
    return per_program, triton.cdiv(per_group, per_program)


def _sum_splits(t: torch.Tensor) -> torch.Tensor:
    return t.squeeze(2) if t.shape[2] == 1 else t.sum(2)


def _seq_idx_strides(seq_idx: torch.Tensor | None) -> tuple[int, int]:
    return (seq_idx.stride(0), seq_idx.stride(1)) if seq_idx is not None else (0, 0)


def _chunk_strides(t: torch.Tensor) -> tuple[int, ...]:
    """(batch, nheads, nchunks, chunk)-shaped tensors as the kernels take their strides: chunk before head."""
    return t.stride(0), t.stride(2), t.stride(1), t.stride(3)


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
        return *_seq_idx_strides(seq_idx), *self.grad.stride(), *_chunk_strides(self.ddA), self.stride_tile

    def meta(self, seq_idx, headdim: int) -> dict:
        return {
            "HAS_DDA_CS": True,
            "HAS_SEQ_IDX": seq_idx is not None,
            "DETERMINISTIC_REDUCTION": self.deterministic,
            "BLOCK_SIZE_K": max(triton.next_power_of_2(headdim), 16),
        }


def _state_grad_launch(dA_cumsum, seqlen: int, ngroups: int, dstate: int, min_block_n: int) -> _StateGradLaunch:
    from mamba_ssm.utils.determinism import alloc_tile_workspace, use_deterministic_mode

    batch, nheads, nchunks, chunk_size = dA_cumsum.shape
    device = dA_cumsum.device
    deterministic = use_deterministic_mode()
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


def chunk_state_bwd_db(x, dt, dA_cumsum, dstates, B, ngroups: int, seq_idx=None):
    """dB through the chunk states, (batch, seqlen, ngroups, dstate) fp32, and their decay-gradient terms per step,
    (batch, nheads, nchunks, chunk) fp32, before the cumulative sum over the chunk that ``_chunk_state_bwd_db``
    takes; without the sum over splits."""
    from mamba_ssm.ops.triton import ssd_chunk_state as upstream
    from mamba_ssm.utils.determinism import finalize_tile_workspace

    batch, seqlen, nheads, headdim = x.shape
    chunk_size, dstate = dt.shape[-1], dstates.shape[-1]
    launch = _state_grad_launch(dA_cumsum, seqlen, ngroups, dstate, upstream._CHUNK_STATE_BWD_DB_MIN_BLOCK_N)
    with torch.cuda.device(x.device.index):
        upstream._chunk_state_bwd_db_kernel[launch.grid](
            x, dstates, B, dt, dA_cumsum, seq_idx, launch.grad, launch.ddA,
            chunk_size, dstate, headdim,
            batch, seqlen, nheads, launch.per_program, ngroups,
            *x.stride(), *dstates.stride(), *B.stride(), *_chunk_strides(dt), *_chunk_strides(dA_cumsum),
            *launch.last_strides(seq_idx), **launch.meta(seq_idx, headdim),
        )  # fmt: skip
    return _sum_splits(launch.grad), finalize_tile_workspace(launch.ddA, launch.deterministic)


def chunk_scan_bwd_dC(prev_states, dA_cumsum, dout, C, ngroups: int, seq_idx=None):
    """dC through the states entering each chunk, (batch, seqlen, ngroups, dstate) fp32, and its decay-gradient
    terms (batch, nheads, nchunks, chunk) fp32: ``_chunk_scan_bwd_dC`` without the sum over splits."""
    from mamba_ssm.ops.triton import ssd_chunk_scan as upstream
    from mamba_ssm.utils.determinism import finalize_tile_workspace

    batch, nchunks, nheads, headdim, dstate = prev_states.shape
    seqlen, chunk_size = dout.shape[1], dA_cumsum.shape[-1]
    launch = _state_grad_launch(dA_cumsum, seqlen, ngroups, dstate, upstream._CHUNK_SCAN_BWD_DC_MIN_BLOCK_N)
    with torch.cuda.device(dout.device.index):
        upstream._chunk_scan_bwd_dc_kernel[launch.grid](
            dout, prev_states, C, dA_cumsum, seq_idx, launch.grad, launch.ddA,
            chunk_size, dstate, headdim,
            batch, seqlen, nheads, launch.per_program, ngroups,
            *dout.stride(), *prev_states.stride(), *C.stride(), *_chunk_strides(dA_cumsum),
            *launch.last_strides(seq_idx), **launch.meta(seq_idx, headdim),
        )  # fmt: skip
    return _sum_splits(launch.grad), finalize_tile_workspace(launch.ddA, launch.deterministic)


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
            *_seq_idx_strides(seq_idx), *dcb.stride(), 0, 0, 0, 0, 0,
            HAS_DDA_CS=False, HAS_SEQ_IDX=seq_idx is not None,
            BLOCK_SIZE_K=max(triton.next_power_of_2(headdim), 16),
        )  # fmt: skip
    return _sum_splits(dcb)


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
