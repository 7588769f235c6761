"""What each layer does with each token: ``hybridlm inspect`` and ``inspect_model``.

Per Mamba layer and token (the recurrence h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t ⊗ x_t):
- ``delta``: the step Δ_t = softplus(dt + dt_bias), per head (Mamba-2) or the mean over channels (Mamba-1);
- ``decay``: exp(Δ_t A), how much of the state survives the token (per head; Mamba-1: mean over
  channels and state dimensions);
- ``write``: ‖Δ_t B_t ⊗ x_t‖, how much the token writes into the state;
- ``state_norm``: ‖h_t‖ after the token;
- ``states`` (only with ``keep_states``): h_t itself, (batch, seqlen, nheads, headdim, d_state) for
  Mamba-2 and (batch, seqlen, d_inner, d_state) for Mamba-1.
Per attention layer: ``topk_index`` / ``topk_weight``, the earlier tokens each position attends to
most (attention probabilities averaged over heads), (batch, seqlen, k); index -1 where a position has
fewer than k tokens to look at.

The layers stay as they are: forward hooks catch each mixer's input during one forward pass, and the
signals are recomputed from the layer's parameters in fp32 with plain PyTorch (the reference path).
Memory stays bounded on long texts: the recurrence and the attention rows are processed
``chunk_size`` tokens at a time and only per-token statistics are kept, unless ``keep_states``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hybridlm import ops
from hybridlm.model.attention import Attention
from hybridlm.model.mamba1 import Mamba1
from hybridlm.model.mamba2 import Mamba2
from hybridlm.ops.attn import attention_mask

MAMBA_SIGNALS = ("delta", "decay", "write", "state_norm")


def _linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    bias = layer.bias.float() if layer.bias is not None else None
    return F.linear(x, layer.weight.float(), bias)


def _conv(layer: Mamba1 | Mamba2, x: torch.Tensor) -> torch.Tensor:
    """The layer's causal depthwise conv + SiLU on (batch, seqlen, channels)."""
    bias = layer.conv1d.bias.float() if layer.conv1d.bias is not None else None
    return ops.causal_conv1d(x.transpose(1, 2), layer.conv1d.weight[:, 0, :].float(), bias, "silu").transpose(1, 2)


def mamba2_signals(layer: Mamba2, h: torch.Tensor, chunk_size: int = 256, keep_states: bool = False) -> dict:
    """Selectivity signals of a Mamba-2 mixer for its input ``h`` (batch, seqlen, d_model)."""
    nheads, headdim, ngroups, d_state = layer.nheads, layer.headdim, layer.ngroups, layer.d_state
    _, xBC, dt = _linear(layer.in_proj, h.float()).split([layer.d_inner, layer.conv_channels, nheads], dim=-1)
    x, B, _ = _conv(layer, xBC).split([layer.d_inner, ngroups * d_state, ngroups * d_state], dim=-1)
    x = x.unflatten(-1, (nheads, headdim))  # (batch, seqlen, nheads, headdim)
    B = B.unflatten(-1, (ngroups, d_state)).repeat_interleave(nheads // ngroups, dim=2)  # (..., nheads, d_state)
    delta = F.softplus(dt + layer.dt_bias.float()).clamp(*layer.dt_limit)  # (batch, seqlen, nheads)
    decay = torch.exp(delta * -torch.exp(layer.A_log.float()))
    dx = delta[..., None] * x

    def chunks():
        for s in range(0, h.shape[1], chunk_size):
            e = s + chunk_size
            yield decay[:, s:e, :, None, None], torch.einsum("bthp,bthn->bthpn", dx[:, s:e], B[:, s:e])

    state = h.new_zeros(h.shape[0], nheads, headdim, d_state, dtype=torch.float32)
    state_norm, states = _scan(chunks(), state, keep_states)
    out = {
        "delta": delta,
        "decay": decay,
        "write": delta * x.norm(dim=-1) * B.norm(dim=-1),  # ‖Δ x ⊗ B‖ = Δ ‖x‖ ‖B‖
        "state_norm": state_norm,
    }
    if keep_states:
        out["states"] = states
    return out


def mamba1_signals(layer: Mamba1, h: torch.Tensor, chunk_size: int = 256, keep_states: bool = False) -> dict:
    """Selectivity signals of a Mamba-1 mixer for its input ``h``; per-channel quantities are
    reported as one "head" (the mean over channels), so every output is (batch, seqlen, 1)."""
    x, _ = _linear(layer.in_proj, h.float()).chunk(2, dim=-1)
    u = _conv(layer, x)  # (batch, seqlen, d_inner)
    # the layer's own Δ, B (x_proj, optional inner norms, dt_proj), in the layer's dtype
    dt, B, _ = layer._dt_B_C(u.to(layer.x_proj.weight.dtype))
    delta = F.softplus(dt.float() + layer.dt_proj.bias.float())  # (batch, seqlen, d_inner)
    A = -torch.exp(layer.A_log.float())  # (d_inner, d_state)
    du, B = delta * u, B.float()
    decay_mean = []

    def chunks():
        for s in range(0, h.shape[1], chunk_size):
            e = s + chunk_size
            decay = torch.exp(delta[:, s:e, :, None] * A)  # (batch, chunk, d_inner, d_state)
            decay_mean.append(decay.mean(dim=(-2, -1)))
            yield decay[:, :, None], (du[:, s:e, :, None] * B[:, s:e, None, :])[:, :, None]

    state = h.new_zeros(h.shape[0], 1, layer.d_inner, layer.d_state, dtype=torch.float32)
    state_norm, states = _scan(chunks(), state, keep_states)
    out = {
        "delta": delta.mean(dim=-1, keepdim=True),
        "decay": torch.cat(decay_mean, dim=1)[..., None],
        "write": (du.norm(dim=-1) * B.norm(dim=-1))[..., None],
        "state_norm": state_norm,
    }
    if keep_states:
        out["states"] = states[:, :, 0]
    return out


def _scan(chunks, state: torch.Tensor, keep_states: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run h_t = decay_t * h_{t-1} + write_t over (decay, write) chunks of shape (batch, chunk, heads, p, n)
    (decay broadcastable); returns ‖h_t‖ per head (batch, seqlen, heads) and, if asked, every h_t."""
    norms, kept = [], []
    for decay, write in chunks:
        chunk_states = []
        for t in range(write.shape[1]):
            state = decay[:, t] * state + write[:, t]
            chunk_states.append(state)
        chunk_states = torch.stack(chunk_states, dim=1)  # (batch, chunk, heads, p, n)
        norms.append(chunk_states.flatten(-2).norm(dim=-1))
        if keep_states:
            kept.append(chunk_states)
    return torch.cat(norms, dim=1), torch.cat(kept, dim=1) if keep_states else None


def attention_topk(
    layer: Attention, h: torch.Tensor, positions: torch.Tensor, top_k: int = 4, chunk_size: int = 256
) -> dict:
    """The ``top_k`` keys each query of an attention mixer weighs most (head-mean probability),
    computed ``chunk_size`` queries at a time so the (T × T) map never exists whole."""
    h = h.float()
    q = _linear(layer.q_proj, h).unflatten(-1, (layer.n_heads, layer.head_dim))
    k = _linear(layer.k_proj, h).unflatten(-1, (layer.n_kv_heads, layer.head_dim))
    if layer.rotary is not None:
        q, k = layer.rotary(q, positions), layer.rotary(k, positions)
    k = k.repeat_interleave(layer.n_heads // layer.n_kv_heads, dim=2)
    seqlen = h.shape[1]
    indices, weights = [], []
    for s in range(0, seqlen, chunk_size):
        e = min(s + chunk_size, seqlen)
        scores = torch.einsum("bqhd,bkhd->bhqk", q[:, s:e], k[:, :e]) * layer.head_dim**-0.5
        allowed = attention_mask(e - s, e, h.device, window=layer.window)[0, 0]  # (chunk, e)
        probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1).mean(dim=1)  # (batch, chunk, e)
        weight, index = probs.topk(min(top_k, e), dim=-1)
        missing = ~allowed.expand_as(probs).gather(-1, index)
        pad = top_k - index.shape[-1]
        indices.append(F.pad(index.masked_fill(missing, -1), (0, pad), value=-1))
        weights.append(F.pad(weight.masked_fill(missing, 0.0), (0, pad)))
    return {"topk_index": torch.cat(indices, dim=1), "topk_weight": torch.cat(weights, dim=1)}


@torch.no_grad()
def inspect_model(
    model: nn.Module, input_ids: torch.Tensor, keep_states: bool = False, top_k: int = 4, chunk_size: int = 256
) -> dict:
    """One forward pass over ``input_ids`` (batch, seqlen) with hooks on every mixer; returns
    ``{"mamba": {layer_index: {delta, decay, write, state_norm[, states]}}, "attention":
    {layer_index: {topk_index, topk_weight}}}``, tensors on the model's device, (batch, seqlen, ...)."""
    if top_k < 1 or chunk_size < 1:
        raise ValueError(f"inspect top_k={top_k} and chunk_size={chunk_size} must be positive")
    signals: dict = {"mamba": {}, "attention": {}}

    def hook(index: int):
        def capture(mixer: nn.Module, args: tuple, output) -> None:
            if isinstance(mixer, Mamba2):
                signals["mamba"][index] = mamba2_signals(mixer, args[0], chunk_size, keep_states)
            elif isinstance(mixer, Mamba1):
                signals["mamba"][index] = mamba1_signals(mixer, args[0], chunk_size, keep_states)
            else:
                signals["attention"][index] = attention_topk(mixer, args[0], args[1], top_k, chunk_size)

        return capture

    handles = [
        block.mixer.register_forward_hook(hook(i))
        for i, block in enumerate(model.layers)
        if isinstance(block.mixer, Mamba1 | Mamba2 | Attention)
    ]
    try:
        model(input_ids)
    finally:
        for handle in handles:
            handle.remove()
    return signals


# ----------------------------------------------------------------------------------------------
# Report: JSON, heat maps, a printed summary


def _layer_name(model: nn.Module, index: int) -> str:
    mixer = model.layers[index].mixer
    kind = {Mamba2: "mamba2", Mamba1: "mamba1"}.get(type(mixer), "attention")
    return f"{index} {kind}"


def _rounded(t: torch.Tensor) -> list:
    return np.round(t.detach().float().cpu().numpy(), 6).tolist()


def inspect_report(model: nn.Module, signals: dict, tokens: list[str]) -> dict:
    """The JSON document of one inspected row (batch index 0)."""
    return {
        "tokens": tokens,
        "mamba": [
            {"layer": i, "name": _layer_name(model, i), **{k: _rounded(s[k][0]) for k in MAMBA_SIGNALS}}
            for i, s in signals["mamba"].items()
        ],
        "attention": [
            {
                "layer": i,
                "name": _layer_name(model, i),
                "topk_index": s["topk_index"][0].tolist(),
                "topk_weight": _rounded(s["topk_weight"][0]),
            }
            for i, s in signals["attention"].items()
        ],
    }


def format_inspect_summary(model: nn.Module, signals: dict, tokens: list[str]) -> str:
    """Per Mamba layer: mean Δ and decay, the tokens that wrote most, the final state norm; per
    attention layer: how far back the most-attended token lies on average."""
    lines = []
    for i, s in signals["mamba"].items():
        write = s["write"][0].mean(dim=-1)
        top = write.topk(min(3, len(write))).indices.tolist()
        lines.append(
            f"layer {_layer_name(model, i):<14} mean Δ {s['delta'][0].mean():.4f}  "
            f"mean decay {s['decay'][0].mean():.4f}  final ‖h‖ {s['state_norm'][0, -1].mean():.3f}  "
            "wrote most: " + ", ".join(f"{tokens[t]!r}@{t}" for t in top)
        )
    for i, s in signals["attention"].items():
        first = s["topk_index"][0, :, 0].float()
        lookback = (torch.arange(len(first), device=first.device) - first).mean()
        lines.append(f"layer {_layer_name(model, i):<14} mean distance to the most-attended token {lookback:.1f}")
    return "\n".join(lines)


def write_inspect_report(model: nn.Module, signals: dict, tokens: list[str], out_dir: str | Path) -> dict[str, str]:
    """``inspect.json``, ``mamba_signals.png`` (layers × tokens) and ``attention_topk.png`` in ``out_dir``."""
    from hybridlm.eval.plots import attention_topk_figure, save, token_heatmap_figure

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": str(out / "inspect.json")}
    (out / "inspect.json").write_text(json.dumps(inspect_report(model, signals, tokens)) + "\n")
    if signals["mamba"]:
        names = [_layer_name(model, i) for i in signals["mamba"]]

        def stack(key: str, log: bool = False) -> np.ndarray:
            rows = torch.stack([s[key][0].mean(dim=-1) for s in signals["mamba"].values()]).float().cpu()
            return (rows.clamp_min(1e-12).log10() if log else rows).numpy()

        maps = {
            "Δ (head mean)": stack("delta"),
            "decay exp(ΔA) (head mean)": stack("decay"),
            "log10 write ‖Δ B⊗x‖": stack("write", log=True),
            "log10 state norm ‖h‖": stack("state_norm", log=True),
        }
        files["mamba_png"] = str(save(token_heatmap_figure(maps, names, tokens), out / "mamba_signals.png"))
    if signals["attention"]:
        topk = {
            _layer_name(model, i): (s["topk_index"][0].cpu().numpy(), s["topk_weight"][0].float().cpu().numpy())
            for i, s in signals["attention"].items()
        }
        files["attention_png"] = str(save(attention_topk_figure(topk), out / "attention_topk.png"))
    return files


def run_inspect(
    checkpoint: str,
    text: str,
    out_dir: str,
    top_k: int = 4,
    chunk_size: int = 256,
    keep_states: bool = False,
    device: str | None = None,
) -> dict:
    """``hybridlm inspect``: tokenize ``text`` with the checkpoint's tokenizer, inspect, print a summary,
    write JSON + PNGs (and ``states.safetensors`` with ``keep_states``) to ``out_dir``.
    Returns ``{"tokens", "signals", "files"}``."""
    from hybridlm.generate import load_tokenizer_from, resolve_model_dir
    from hybridlm.model import HybridLM

    if not text:
        raise ValueError("inspect: --text is empty")
    model_dir = resolve_model_dir(checkpoint)
    tokenizer = load_tokenizer_from(model_dir)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = HybridLM.from_pretrained(model_dir, device=device).eval()
    ids = tokenizer.encode(text)
    tokens = [tokenizer.decode([i]) for i in ids]
    signals = inspect_model(model, torch.tensor([ids], device=device), keep_states, top_k, chunk_size)
    print(format_inspect_summary(model, signals, tokens))
    files = write_inspect_report(model, signals, tokens, out_dir)
    if keep_states:
        from safetensors.torch import save_file

        states = {f"layers.{i}.ssm_states": s["states"][0].contiguous().cpu() for i, s in signals["mamba"].items()}
        save_file(states, Path(out_dir) / "states.safetensors")
        files["states"] = str(Path(out_dir) / "states.safetensors")
    for path in files.values():
        print(f"wrote {path}")
    return {"tokens": tokens, "signals": signals, "files": files}
