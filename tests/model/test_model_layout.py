"""What the model is made of: parameter names (the HF-mappable layout), vocab padding,
initialisation, and what forward returns (loss with -100 ignored, aux loss kept apart)."""

import math

import pytest
import torch
import torch.nn.functional as F

from hybridlm import HybridLM

D_MODEL, VOCAB = 32, 61


def test_blocks_follow_the_pattern(tiny_model):
    model = tiny_model(pattern="(M*-E)x2")
    kinds = [type(b.mixer).__name__ for b in model.layers]
    assert kinds == ["Mamba2", "Attention", "MLP", "MoE"] * 2
    assert type(tiny_model(pattern="M", mamba={"version": 1}).layers[0].mixer).__name__ == "Mamba1"


def test_parameter_names_follow_the_documented_layout(tiny_model):
    model = tiny_model(pattern="M*-E", tie_embeddings=False, moe={"router": "sigmoid", "shared_d_ff": 16})
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    d_inner, nheads, conv_channels = 64, 4, 64 + 2 * 2 * 8
    expected = {
        "embed_tokens.weight": (64, D_MODEL),
        "layers.0.norm.weight": (D_MODEL,),
        "layers.0.mixer.in_proj.weight": (d_inner + conv_channels + nheads, D_MODEL),  # [z | xBC | dt]
        "layers.0.mixer.conv1d.weight": (conv_channels, 1, 4),
        "layers.0.mixer.conv1d.bias": (conv_channels,),
        "layers.0.mixer.A_log": (nheads,),
        "layers.0.mixer.D": (nheads,),
        "layers.0.mixer.dt_bias": (nheads,),
        "layers.0.mixer.norm.weight": (d_inner,),
        "layers.0.mixer.out_proj.weight": (D_MODEL, d_inner),
        "layers.1.mixer.q_proj.weight": (32, D_MODEL),
        "layers.1.mixer.k_proj.weight": (16, D_MODEL),
        "layers.1.mixer.v_proj.weight": (16, D_MODEL),
        "layers.1.mixer.o_proj.weight": (D_MODEL, 32),
        "layers.2.mixer.gate_proj.weight": (48, D_MODEL),
        "layers.2.mixer.up_proj.weight": (48, D_MODEL),
        "layers.2.mixer.down_proj.weight": (D_MODEL, 48),
        "layers.3.mixer.router.weight": (4, D_MODEL),
        "layers.3.mixer.router.expert_bias": (4,),
        "layers.3.mixer.experts.gate_up_proj": (4, 48, D_MODEL),
        "layers.3.mixer.experts.down_proj": (4, D_MODEL, 24),
        "layers.3.mixer.shared_expert.gate_proj.weight": (16, D_MODEL),
        "layers.3.mixer.shared_expert.down_proj.weight": (D_MODEL, 16),
        "norm_f.weight": (D_MODEL,),
        "lm_head.weight": (64, D_MODEL),
    }
    for name, shape in expected.items():
        assert shapes.get(name) == shape, name
    assert not any("rotary" in name or "inv_freq" in name for name in shapes)  # RoPE tables are not weights


def test_mamba1_parameter_names(tiny_model):
    model = tiny_model(pattern="M", mamba={"version": 1, "inner_norms": True})
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    d_inner, d_state, dt_rank = 64, 8, 2
    expected = {
        "layers.0.mixer.in_proj.weight": (2 * d_inner, D_MODEL),  # [x | z]
        "layers.0.mixer.conv1d.weight": (d_inner, 1, 4),
        "layers.0.mixer.x_proj.weight": (dt_rank + 2 * d_state, d_inner),  # [dt | B | C]
        "layers.0.mixer.dt_proj.weight": (d_inner, dt_rank),
        "layers.0.mixer.dt_proj.bias": (d_inner,),
        "layers.0.mixer.A_log": (d_inner, d_state),
        "layers.0.mixer.D": (d_inner,),
        "layers.0.mixer.dt_layernorm.weight": (dt_rank,),
        "layers.0.mixer.b_layernorm.weight": (d_state,),
        "layers.0.mixer.c_layernorm.weight": (d_state,),
        "layers.0.mixer.out_proj.weight": (D_MODEL, d_inner),
    }
    for name, shape in expected.items():
        assert shapes.get(name) == shape, name
    assert "lm_head.weight" not in shapes  # tied: one parameter, named embed_tokens.weight


def test_tied_embeddings_share_one_tensor(tiny_model):
    tied, untied = tiny_model(tie_embeddings=True), tiny_model(tie_embeddings=False)
    assert tied.lm_head.weight is tied.embed_tokens.weight
    assert untied.lm_head.weight is not untied.embed_tokens.weight
    assert untied.num_parameters() - tied.num_parameters() == 64 * D_MODEL


@pytest.mark.parametrize("multiple, padded", [(64, 64), (128, 128), (8, 64), (1, 61)])
def test_vocab_is_padded_but_logits_have_vocab_size_columns(tiny_model, multiple, padded):
    model = tiny_model(vocab_pad_multiple=multiple)
    assert model.embed_tokens.weight.shape[0] == padded and model.lm_head.weight.shape[0] == padded
    with torch.no_grad():
        assert model(torch.randint(0, VOCAB, (2, 5))).logits.shape == (2, 5, VOCAB)


def test_ssm_initialisation(tiny_config):
    cfg = tiny_config(pattern="M", mamba={"version": 1, "dt_min": 0.01, "dt_max": 0.05})
    mamba1 = HybridLM(cfg).layers[0].mixer
    # S4D-real: A = -(1..d_state) for every channel, untouched by the model-wide weight init
    torch.testing.assert_close(mamba1.A_log, torch.log(torch.arange(1, 9.0)).expand(64, 8))
    dt = F.softplus(mamba1.dt_proj.bias)
    assert dt.min() >= 0.01 * 0.999 and dt.max() <= 0.05 * 1.001
    assert torch.equal(mamba1.D, torch.ones(64))

    mamba2 = HybridLM(tiny_config(pattern="M", mamba={"A_init_range": [2.0, 4.0]})).layers[0].mixer
    A = torch.exp(mamba2.A_log)
    assert A.min() >= 2.0 * 0.999 and A.max() <= 4.0 * 1.001
    dt = F.softplus(mamba2.dt_bias)
    assert dt.min() >= 0.001 * 0.999 and dt.max() <= 0.1 * 1.001
    assert torch.equal(mamba2.D, torch.ones(4))


def test_output_projections_get_depth_scaled_init(tiny_config):
    model = HybridLM(tiny_config(pattern="(*-)x8", mlp={"d_ff": 512}))
    std = model.cfg.init_std
    assert abs(model.layers[0].mixer.q_proj.weight.std().item() - std) < 0.1 * std
    assert abs(model.layers[1].mixer.down_proj.weight.std().item() - std / math.sqrt(16)) < 0.1 * std / 4


def test_loss_is_shifted_and_ignores_minus_100(tiny_model):
    model = tiny_model(pattern="M*-")
    ids = torch.randint(0, VOCAB, (2, 9))
    labels = ids.clone()
    labels[0, :4] = -100
    labels[1, 6] = -100
    out = model(ids, labels=labels)
    keep = labels[:, 1:] != -100
    expected = F.cross_entropy(out.logits[:, :-1][keep], labels[:, 1:][keep])
    torch.testing.assert_close(out.loss, expected)
    assert out.aux_loss is None
    # the ignored positions truly do not count: changing their label changes nothing
    labels[0, 2] = -100
    torch.testing.assert_close(model(ids, labels=labels).loss, out.loss)


def test_aux_loss_is_reported_apart_from_the_lm_loss(tiny_model):
    model = tiny_model(pattern="ME-E")
    ids = torch.randint(0, VOCAB, (2, 6))
    out = model(ids, labels=ids)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()))
    layers = [b.mixer for b in model.layers if type(b.mixer).__name__ == "MoE"]
    torch.testing.assert_close(out.aux_loss, layers[0].aux_loss + layers[1].aux_loss)
    assert out.aux_loss.item() >= 2.0 * 0.99  # each layer's loss is at least ~1 (1 = perfectly balanced)


def test_backward_reaches_every_parameter(tiny_model):
    model = tiny_model(pattern="M*-E", tie_embeddings=False, moe={"top_k": 4})
    ids = torch.randint(0, VOCAB, (2, 8))
    out = model(ids, labels=ids)
    (out.loss + 0.01 * out.aux_loss).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_projections_into_the_residual_start_smaller_by_sqrt_of_the_sublayers(tiny_model):
    torch.manual_seed(0)
    model = tiny_model(pattern="M-*-E", d_model=64, init_std=0.02)
    stds = {n: p.std().item() for n, p in model.named_parameters() if p.dim() >= 2 and "conv1d" not in n}
    scaled = 0.02 / len(model.layers) ** 0.5
    for name, std in stds.items():
        writes_residual = name.endswith(("out_proj.weight", "o_proj.weight", "down_proj.weight", "down_proj"))
        assert std == pytest.approx(scaled if writes_residual else 0.02, rel=0.15), name
