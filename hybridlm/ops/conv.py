"""Depthwise causal conv1d (Mamba's short convolution) and its one-token step."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hybridlm.ops.layout import int32_addressable, int32_seq_idx


def causal_conv1d_ref(
    x: torch.Tensor,  # (batch, channels, seqlen)
    weight: torch.Tensor,  # (channels, width)
    bias: torch.Tensor | None = None,
    activation: str | None = "silu",
    seq_idx: torch.Tensor | None = None,  # (batch, seqlen) int, non-decreasing per row
) -> torch.Tensor:
    """Causal depthwise conv; with ``seq_idx`` no tap reaches across a document boundary."""
    width = weight.shape[1]
    seqlen = x.shape[-1]
    xf, wf = x.float(), weight.float()
    if seq_idx is None:
        out = F.conv1d(xf, wf[:, None, :], padding=width - 1, groups=x.shape[1])[..., :seqlen]
    else:
        x_pad = F.pad(xf, (width - 1, 0))
        idx_pad = F.pad(seq_idx, (width - 1, 0), value=-1)
        out = torch.zeros_like(xf)
        for k in range(width):
            same_doc = (idx_pad[:, k : k + seqlen] == seq_idx)[:, None, :]
            out = out + wf[:, k, None] * x_pad[..., k : k + seqlen] * same_doc
    if bias is not None:
        out = out + bias.float()[:, None]
    if activation == "silu":
        out = F.silu(out)
    return out.to(x.dtype)


def causal_conv1d_update_ref(
    x: torch.Tensor,  # (batch, channels): the new token
    conv_state: torch.Tensor,  # (batch, channels, width): the last `width` inputs, updated in place
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = "silu",
) -> torch.Tensor:
    conv_state.copy_(torch.roll(conv_state, shifts=-1, dims=-1))
    conv_state[:, :, -1] = x
    out = (conv_state.float() * weight.float()).sum(-1)
    if bias is not None:
        out = out + bias.float()
    if activation == "silu":
        out = F.silu(out)
    return out.to(x.dtype)


def causal_conv1d_fused(x, weight, bias=None, activation="silu", seq_idx=None):
    from causal_conv1d import causal_conv1d_fn

    if seq_idx is not None:
        # the kernel supports seq_idx only for channel-last memory layout
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
        seq_idx = int32_seq_idx(seq_idx)
    elif x.stride(-1) != 1 and (x.stride(0) % 8 or x.stride(-1) % 8):
        # a channel-last view (a slice of in_proj's output) needs strides that are multiples of 8
        x = x.contiguous()
    x = int32_addressable(x)
    return causal_conv1d_fn(x, weight, bias, seq_idx=seq_idx, activation=activation)


def causal_conv1d_update_fused(x, conv_state, weight, bias=None, activation="silu"):
    from causal_conv1d import causal_conv1d_update

    return causal_conv1d_update(x, conv_state, weight, bias, activation)
