"""inspect: the signals equal a hand-written recurrence, streaming equals the full state, attention
top-k equals the explicit map, and the report files parse."""

from __future__ import annotations

import json

import matplotlib.image
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from hybridlm.eval.inspect import inspect_model, run_inspect, write_inspect_report
from hybridlm.model.cache import InferenceCache

T = 23  # not a multiple of the SSD chunk (4) nor of the inspect chunks below


@pytest.fixture
def ids():
    return torch.randint(0, 61, (2, T), generator=torch.Generator().manual_seed(1))


def mixer_input(model, ids):
    """What the first (and only) mixer of a one-layer model sees: the normed embedding."""
    return model.layers[0].norm(model.embed_tokens(ids))


def causal_conv_silu(x, weight, bias):
    """Depthwise causal conv written out: out_t = sum_k w_k x_{t - (width-1) + k}."""
    width = weight.shape[-1]
    padded = F.pad(x, (0, 0, width - 1, 0))  # (batch, width - 1 + seqlen, channels)
    out = sum(padded[:, k : k + x.shape[1]] * weight[:, 0, k] for k in range(width)) + bias
    return F.silu(out)


@torch.no_grad()
def test_mamba2_signals_equal_a_hand_written_recurrence(tiny_model, ids):
    model = tiny_model(pattern="M")
    mixer = model.layers[0].mixer
    signals = inspect_model(model, ids)["mamba"][0]

    H, P, G, N = mixer.nheads, mixer.headdim, mixer.ngroups, mixer.d_state
    _, xBC, dt = mixer.in_proj(mixer_input(model, ids)).split([mixer.d_inner, mixer.conv_channels, H], dim=-1)
    xBC = causal_conv_silu(xBC, mixer.conv1d.weight, mixer.conv1d.bias)
    x, B, _ = xBC.split([mixer.d_inner, G * N, G * N], dim=-1)
    delta = F.softplus(dt + mixer.dt_bias)  # (batch, T, H)
    A = -torch.exp(mixer.A_log)
    torch.testing.assert_close(signals["delta"], delta)
    torch.testing.assert_close(signals["decay"], torch.exp(delta * A))

    state = torch.zeros(2, H, P, N)
    for t in range(T):
        for h in range(H):
            x_h = x[:, t, h * P : (h + 1) * P]  # (batch, P)
            g = h // (H // G)
            B_g = B[:, t, g * N : (g + 1) * N]  # (batch, N)
            write = delta[:, t, h, None, None] * x_h[:, :, None] * B_g[:, None, :]
            state[:, h] = torch.exp(delta[:, t, h] * A[h])[:, None, None] * state[:, h] + write
            torch.testing.assert_close(signals["write"][:, t, h], write.flatten(1).norm(dim=1))
        torch.testing.assert_close(signals["state_norm"][:, t], state.flatten(2).norm(dim=-1))

    cache = InferenceCache()
    model(ids, cache=cache)  # the layer's own final state, from its SSD scan
    torch.testing.assert_close(state, cache.layers[0].ssm_state, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_mamba1_signals_equal_a_hand_written_recurrence(tiny_model, ids):
    model = tiny_model(pattern="M", mamba={"version": 1})
    mixer = model.layers[0].mixer
    signals = inspect_model(model, ids, keep_states=True)["mamba"][0]
    assert {k: tuple(v.shape) for k, v in signals.items()} == {
        "delta": (2, T, 1),
        "decay": (2, T, 1),
        "write": (2, T, 1),
        "state_norm": (2, T, 1),
        "states": (2, T, mixer.d_inner, mixer.d_state),
    }
    x, _ = mixer.in_proj(mixer_input(model, ids)).chunk(2, dim=-1)
    u = causal_conv_silu(x, mixer.conv1d.weight, mixer.conv1d.bias)
    dt, B, _ = mixer.x_proj(u).split([mixer.dt_rank, mixer.d_state, mixer.d_state], dim=-1)
    delta = F.softplus(mixer.dt_proj(dt))  # (batch, T, d_inner), dt_proj's bias is the Δ bias
    A = -torch.exp(mixer.A_log)
    state = torch.zeros(2, mixer.d_inner, mixer.d_state)
    for t in range(T):
        decay = torch.exp(delta[:, t, :, None] * A)
        state = decay * state + (delta[:, t] * u[:, t])[:, :, None] * B[:, t, None, :]
        torch.testing.assert_close(signals["decay"][:, t, 0], decay.mean(dim=(1, 2)))
        torch.testing.assert_close(signals["state_norm"][:, t, 0], state.flatten(1).norm(dim=1))
    torch.testing.assert_close(signals["delta"][..., 0], delta.mean(-1))
    cache = InferenceCache()
    model(ids, cache=cache)
    torch.testing.assert_close(signals["states"][:, -1], cache.layers[0].ssm_state, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("version", [1, 2])
def test_streamed_statistics_match_the_full_states_and_any_chunking(tiny_model, ids, version):
    model = tiny_model(pattern="M*-M", mamba={"version": version})
    full = inspect_model(model, ids, keep_states=True, chunk_size=1000)
    streamed = inspect_model(model, ids, keep_states=False, chunk_size=3)
    assert set(streamed["mamba"]) == {0, 3} and set(streamed["attention"]) == {1}
    for i, signals in full["mamba"].items():
        assert "states" not in streamed["mamba"][i]  # nothing of size seqlen × state is kept
        states = signals["states"]
        per_head = states.flatten(3) if version == 2 else states.flatten(2)[:, :, None]
        torch.testing.assert_close(signals["state_norm"], per_head.norm(dim=-1))
        for key, value in streamed["mamba"][i].items():
            torch.testing.assert_close(value, signals[key], rtol=1e-6, atol=1e-7)
    for key, value in streamed["attention"][1].items():
        torch.testing.assert_close(value, full["attention"][1][key])


@torch.no_grad()
@pytest.mark.parametrize("window", [None, 5])
def test_attention_topk_is_the_argmax_of_the_explicit_map(tiny_model, ids, window):
    model = tiny_model(pattern="*", attention={"window": window, "rope_fraction": 0.5})
    attn = model.layers[0].mixer
    top = inspect_model(model, ids, top_k=3, chunk_size=4)["attention"][0]

    h = mixer_input(model, ids)
    positions = torch.arange(T)
    q = attn.rotary(attn.q_proj(h).unflatten(-1, (attn.n_heads, attn.head_dim)), positions)
    k = attn.rotary(attn.k_proj(h).unflatten(-1, (attn.n_kv_heads, attn.head_dim)), positions)
    v = attn.v_proj(h).unflatten(-1, (attn.n_kv_heads, attn.head_dim))
    rep = attn.n_heads // attn.n_kv_heads
    k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / attn.head_dim**0.5
    query, key = torch.arange(T)[:, None], torch.arange(T)[None, :]
    allowed = (key <= query) & (query - key < (window or T))
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)  # (batch, heads, T, T)
    # the explicit map is the layer's: it reproduces the mixer's output
    out = attn.o_proj(torch.einsum("bhqk,bkhd->bqhd", probs, v).flatten(-2))
    torch.testing.assert_close(out, attn(h, positions), rtol=1e-4, atol=1e-5)

    mean = probs.mean(dim=1)  # (batch, T, T)
    torch.testing.assert_close(top["topk_index"][..., 0], mean.argmax(dim=-1))
    torch.testing.assert_close(top["topk_weight"][..., 0], mean.max(dim=-1).values)
    assert (top["topk_weight"][..., 0] >= top["topk_weight"][..., 1]).all()
    # position 0 sees one token and position 1 two: the rest of their top-3 is marked missing
    assert top["topk_index"][:, 0].tolist() == [[0, -1, -1]] * 2 and (top["topk_index"][:, 1, 2] == -1).all()
    if window:
        valid = top["topk_index"] >= 0
        distance = torch.arange(T)[None, :, None] - top["topk_index"]
        assert (distance[valid] < window).all() and (distance[valid] >= 0).all()


def test_report_files_parse_and_run_inspect_keeps_states_on_request(tiny_config, tokenizer, tmp_path):
    from hybridlm.model import HybridLM

    model = HybridLM(tiny_config(vocab_size=len(tokenizer), pattern="M*-M")).eval()
    model.save_pretrained(tmp_path / "ckpt")
    tokenizer.save_pretrained(str(tmp_path / "ckpt"))
    text = "Return the number of items in a container."
    n_tokens = len(tokenizer.encode(text))
    out = run_inspect(str(tmp_path / "ckpt"), text, str(tmp_path / "out"), top_k=2, keep_states=True, device="cpu")

    report = json.loads((tmp_path / "out" / "inspect.json").read_text())
    assert len(report["tokens"]) == n_tokens and "".join(report["tokens"]) == text
    assert [m["layer"] for m in report["mamba"]] == [0, 3] and [a["layer"] for a in report["attention"]] == [1]
    heads = model.cfg.mamba_n_heads
    assert all(len(m["decay"]) == n_tokens and len(m["decay"][0]) == heads for m in report["mamba"])
    assert len(report["attention"][0]["topk_index"][0]) == 2
    for key in ("mamba_png", "attention_png"):
        assert matplotlib.image.imread(out["files"][key]).ndim == 3
    states = load_file(out["files"]["states"])
    assert states["layers.0.ssm_states"].shape == (n_tokens, heads, 16, 8)


def test_write_inspect_report_without_attention_layers(tiny_model, ids, tmp_path):
    model = tiny_model(pattern="M-")
    signals = inspect_model(model, ids[:1])
    files = write_inspect_report(model, signals, [str(i) for i in ids[0].tolist()], tmp_path)
    assert set(files) == {"json", "mamba_png"}
    assert json.loads((tmp_path / "inspect.json").read_text())["attention"] == []
