"""The cost model: FLOPs per token for every sub-layer kind, and inference-state bytes.

This is the one FLOPs model of the project: MFU in training logs, ``hybridlm info`` and
``hybridlm bench`` all read it, so every system is measured with the same yardstick.

Conventions (per token, forward pass; training = 3x forward, backward being twice the forward):
- a matmul of an (m x k) by (k x n) costs 2·m·k·n; linear layers therefore cost 2 · in · out;
- attention scores and values cost 2 · 2 · n_heads · head_dim · keys, where ``keys`` is the mean number
  of keys a causal query sees, (T + 1) / 2, or the sliding window when shorter;
- the Mamba-2 SSD scan (chunk length Q) costs the intra-chunk dual form, 2 · n_heads · (Q + 1) / 2 · (d_state
  + head_dim), plus writing and reading the state, 2 · 2 · d_inner · d_state;
- the Mamba-1 selective scan costs 6 · d_inner · d_state (discretise, update, read out);
- the depthwise conv costs 2 · channels · d_conv; norms, activations and the embedding lookup are ignored;
- MoE costs the router plus top_k experts (and the shared expert) per token;
- the LM head costs 2 · d_model · padded_vocab.
"""

from __future__ import annotations

import torch

from hybridlm.config import ModelConfig
from hybridlm.pattern import SUBLAYER_KINDS

# Dense bf16 tensor-core peak (no sparsity), by substring of the device name.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "H800": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


def sublayer_forward_flops(cfg: ModelConfig, kind: str, seq_len: int) -> float:
    """Forward FLOPs per token of one sub-layer of ``kind`` ('M', '*', '-', 'E') at ``seq_len``."""
    d = cfg.d_model
    if kind == "M":
        m = cfg.mamba
        conv = 2 * cfg.conv_channels * m.d_conv
        if m.version == 2:
            in_proj = 2 * d * (cfg.d_inner + cfg.conv_channels + cfg.mamba_n_heads)
            q = min(m.chunk_size, seq_len)
            scan = 2 * cfg.mamba_n_heads * (q + 1) / 2 * (m.d_state + m.head_dim) + 4 * cfg.d_inner * m.d_state
            return in_proj + conv + scan + 2 * cfg.d_inner * d
        in_proj = 2 * d * 2 * cfg.d_inner
        x_proj = 2 * cfg.d_inner * (cfg.dt_rank + 2 * m.d_state) + 2 * cfg.dt_rank * cfg.d_inner
        return in_proj + conv + x_proj + 6 * cfg.d_inner * m.d_state + 2 * cfg.d_inner * d
    if kind == "*":
        a = cfg.attention
        hd = cfg.head_dim
        proj = 2 * d * hd * (2 * a.n_heads + 2 * cfg.n_kv_heads)
        keys = (seq_len + 1) / 2 if a.window is None else min(a.window, (seq_len + 1) / 2)
        return proj + 4 * a.n_heads * hd * keys
    if kind == "-":
        return _ffn_flops(cfg, cfg.d_ff)
    if kind == "E":
        e = cfg.moe
        shared = _ffn_flops(cfg, e.shared_d_ff) if e.shared_d_ff else 0
        return 2 * d * e.n_experts + e.top_k * _ffn_flops(cfg, cfg.expert_d_ff) + shared
    raise ValueError(f"unknown sub-layer kind {kind!r}")


def _ffn_flops(cfg: ModelConfig, d_ff: int) -> float:
    matrices = 3 if cfg.mlp.activation == "swiglu" else 2
    return 2 * matrices * cfg.d_model * d_ff


def flops_per_token(cfg: ModelConfig, seq_len: int) -> dict[str, float]:
    """Training FLOPs per token (forward + backward = 3x forward) by sub-layer kind, the LM head, and 'total'."""
    out = {kind: 0.0 for kind in SUBLAYER_KINDS.values()}
    for ch in cfg.layers:
        out[SUBLAYER_KINDS[ch]] += 3 * sublayer_forward_flops(cfg, ch, seq_len)
    out["lm_head"] = 3 * 2 * cfg.d_model * cfg.padded_vocab_size
    out["total"] = sum(out.values())
    return out


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of a CUDA device, or None when unknown (CPU): MFU is then not reported."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def inference_state_bytes(cfg: ModelConfig, seq_len: int, bytes_per_value: int = 2) -> dict[str, int]:
    """Bytes of inference state per sequence after ``seq_len`` tokens: the attention KV cache grows with
    the length (capped by a sliding window); each Mamba layer holds a constant conv + SSM state."""
    n_attn, n_mamba = cfg.layers.count("*"), cfg.layers.count("M")
    window = cfg.attention.window
    cached = seq_len if window is None else min(seq_len, window)
    kv = 2 * n_attn * cfg.n_kv_heads * cfg.head_dim * cached
    ssm = n_mamba * (cfg.conv_channels * cfg.mamba.d_conv + cfg.d_inner * cfg.mamba.d_state)
    return {"kv_cache": kv * bytes_per_value, "ssm_state": ssm * bytes_per_value}
