"""The backward of Mamba-2's gated RMSNorm, ``rms_norm(y * silu(z)) * weight`` per group of channels, as one
Triton kernel over tiles of rows.

mamba_ssm's ``_layer_norm_bwd`` launches one program per SM, each walking its ~250 rows one at a time: one
8-warp program per SM cannot keep enough loads in flight, and at the 500M config's (32768, 2048) it ran at ~40%
of the H200's memory bandwidth (7.6 ms a step over 21 layers, ``benchmarks/profile_step.py``). This kernel reads
and writes the same tensors, in fp32 arithmetic as mamba_ssm's, with the row loop software-pipelined (the next
rows' loads in flight while one is computed; tiles of ``BLOCK_M`` rows, one by default). Gradients match
mamba_ssm's to summation order (the GPU tests hold them to the reference ops and to mamba_ssm's kernel).

CUDA only; imported by the fused paths that use it (``hybridlm.ops.conv_ssd``), never by the CPU reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# The launch shape, from benchmarks/own_kernels.py at the 500M config's (32768, 2048) on an H200: with the row
# loop software-pipelined four tiles deep, 2 programs per SM of 4 warps took 0.177 ms (mamba_ssm's 0.341); without
# pipelining the best was 0.234-0.245 (one row per iteration, 8 warps, 2-16 programs per SM): each row's loads
# waited for the row before. Tiles of 4 or 8 rows unpipelined were slower (0.27-0.52 ms at 8 warps, up to 6 ms at
# 4 warps: spilled registers).
PROGRAMS_PER_SM = 2  # each program's partial weight gradient is summed after the kernel
BLOCK_M = 1  # rows per tile
NUM_WARPS = 4
STAGES = 4  # tiles of rows loaded ahead of the one computed


@triton.jit
def _gated_rms_norm_bwd_kernel(
    DOUT, Y, Z, W, RSTD,  # inputs: (M, N) rows with their own row strides; W (N,); RSTD (ngroups * M,)
    DY, DZ, DW_PARTIAL,  # outputs: DY, DZ (M, N) rows; DW_PARTIAL (programs, N) fp32
    M, GROUP_N,
    stride_dout, stride_y, stride_z, stride_dy, stride_dz,
    rows_per_program,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    STAGES: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    group = tl.program_id(1)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < GROUP_N
    col_offset = group * GROUP_N + cols
    w = tl.load(W + col_offset, mask=col_mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    # rows_per_program is a multiple of BLOCK_M: programs never share a row
    for block_start in tl.range(0, rows_per_program, BLOCK_M, num_stages=STAGES):  # STAGES > 1: loads run ahead
        rows = pid * rows_per_program + block_start + tl.arange(0, BLOCK_M)
        row_mask = rows < M
        mask = row_mask[:, None] & col_mask[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        dout = tl.load(DOUT + rows64 * stride_dout + col_offset[None, :], mask=mask, other=0.0).to(tl.float32)
        y = tl.load(Y + rows64 * stride_y + col_offset[None, :], mask=mask, other=0.0).to(tl.float32)
        z = tl.load(Z + rows64 * stride_z + col_offset[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + group * M + rows, mask=row_mask, other=0.0)[:, None]

        z_sigmoid = tl.sigmoid(z)
        gated = y * z * z_sigmoid
        xhat = gated * rstd
        wdout = w[None, :] * dout
        c1 = tl.sum(xhat * wdout, axis=1)[:, None] / GROUP_N
        dgated = (wdout - xhat * c1) * rstd
        dw += tl.sum(dout * xhat, axis=0)
        dz = dgated * y * z_sigmoid * (1 + z * (1 - z_sigmoid))
        dy = dgated * z * z_sigmoid
        tl.store(DZ + rows64 * stride_dz + col_offset[None, :], dz.to(DZ.dtype.element_ty), mask=mask)
        tl.store(DY + rows64 * stride_dy + col_offset[None, :], dy.to(DY.dtype.element_ty), mask=mask)
    tl.store(DW_PARTIAL + pid * (GROUP_N * tl.num_programs(1)) + col_offset, dw, mask=col_mask)


def gated_rms_norm_bwd(
    dout: torch.Tensor,
    y: torch.Tensor,
    z: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    group_size: int,
    dz: torch.Tensor | None = None,
    programs_per_sm: int = PROGRAMS_PER_SM,
    block_m: int = BLOCK_M,
    num_warps: int = NUM_WARPS,
    stages: int = STAGES,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``rms_norm(y * silu(z)) * weight`` (gate before the norm, groups of ``group_size``
    channels) from the output's gradient ``dout``, given the forward's ``rstd`` laid out as mamba_ssm's forward
    writes it (``(ngroups * rows,)``, group-major). ``dout``, ``y``, ``z`` are (rows, channels) with unit column
    stride and any row stride; ``dz``, when given, is a view the kernel writes into (a slice of in_proj's
    gradient, say). ``programs_per_sm``, ``block_m`` (rows per tile), ``num_warps`` and ``stages`` (the row
    loop's software pipelining: tiles loaded ahead of the one computed) are the launch's shape
    (``benchmarks/own_kernels.py`` sweeps them). Returns ``(dy, dz, dweight)``."""
    rows, channels = y.shape
    if channels % group_size:
        raise ValueError(f"gated_rms_norm_bwd: {channels} channels is not a multiple of group_size {group_size}")
    for name, t in (("dout", dout), ("y", y), ("z", z)) + ((("dz", dz),) if dz is not None else ()):
        if t.shape != (rows, channels) or t.stride(-1) != 1:
            raise ValueError(f"gated_rms_norm_bwd: {name} {tuple(t.shape)} must be ({rows}, {channels}), unit stride")
    ngroups = channels // group_size
    dy = torch.empty_like(y)
    dz = torch.empty_like(z) if dz is None else dz
    if rows == 0:
        return dy, dz, torch.zeros_like(weight)
    block_n = triton.next_power_of_2(group_size)
    sm_count = torch.cuda.get_device_properties(y.device).multi_processor_count if y.is_cuda else 1
    programs = max(1, min(triton.cdiv(rows, block_m), sm_count * programs_per_sm // ngroups))
    rows_per_program = triton.cdiv(triton.cdiv(rows, programs), block_m) * block_m
    programs = triton.cdiv(rows, rows_per_program)
    dw_partial = torch.empty((programs, channels), dtype=torch.float32, device=y.device)
    _gated_rms_norm_bwd_kernel[(programs, ngroups)](
        dout, y, z, weight, rstd, dy, dz, dw_partial,
        rows, group_size,
        dout.stride(0), y.stride(0), z.stride(0), dy.stride(0), dz.stride(0),
        rows_per_program,
        BLOCK_M=block_m, BLOCK_N=block_n, STAGES=stages, num_warps=num_warps,
    )  # fmt: skip
    return dy, dz, dw_partial.sum(0).to(weight.dtype)
