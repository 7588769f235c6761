"""Mixture of experts: the three routers, the load-balancing loss, dropless dispatch, the shared expert."""

import pytest
import torch
import torch.nn.functional as F

from hybridlm.model.moe import MoE, load_balancing_loss

D_MODEL = 32


def moe_layer(tiny_config, **moe) -> MoE:
    return MoE(tiny_config(pattern="E", moe=moe), layer_idx=0)


def routed(tiny_config, **moe):
    layer = moe_layer(tiny_config, **moe)
    torch.nn.init.normal_(layer.router.weight)
    x = torch.randn(20, D_MODEL)
    return layer, x, *layer.router(x)


def test_softmax_router_keeps_the_top_k_probabilities(tiny_config):
    _, x, probs, weights, indices = routed(tiny_config, router="softmax", n_experts=4, top_k=2)
    torch.testing.assert_close(probs.sum(-1), torch.ones(20))
    torch.testing.assert_close(weights, probs.topk(2, dim=-1).values)
    assert (weights.sum(-1) < 1).all()


def test_softmax_norm_router_renormalises_the_top_k(tiny_config):
    _, x, probs, weights, indices = routed(tiny_config, router="softmax_norm", n_experts=4, top_k=2)
    torch.testing.assert_close(weights.sum(-1), torch.ones(20))
    top = probs.topk(2, dim=-1)
    torch.testing.assert_close(weights, top.values / top.values.sum(-1, keepdim=True))
    assert torch.equal(indices, top.indices)


def test_sigmoid_router_picks_within_the_best_groups_and_scales(tiny_config):
    cfg = {"router": "sigmoid", "n_experts": 8, "top_k": 2, "n_groups": 4, "topk_groups": 2, "scale": 2.5}
    layer, x, probs, weights, indices = routed(tiny_config, **cfg)
    torch.testing.assert_close(probs, torch.sigmoid(x @ layer.router.weight.T))
    torch.testing.assert_close(weights.sum(-1), torch.full((20,), 2.5))
    torch.testing.assert_close(weights, probs.gather(1, indices) / probs.gather(1, indices).sum(-1, keepdim=True) * 2.5)
    # a group's score is the sum of its two best experts; experts come only from the two best groups
    group_scores = probs.view(20, 4, 2).sum(-1)
    best_groups = group_scores.topk(2, dim=-1).indices
    for t in range(20):
        assert set((indices[t] // 2).tolist()) <= set(best_groups[t].tolist())
        allowed = torch.cat([torch.arange(2 * g, 2 * g + 2) for g in best_groups[t].tolist()])
        assert set(indices[t].tolist()) == set(allowed[probs[t, allowed].topk(2).indices].tolist())


def test_sigmoid_expert_bias_steers_the_choice_but_not_the_weights(tiny_config):
    layer, x, probs, _, _ = routed(tiny_config, router="sigmoid", n_experts=4, top_k=2)
    layer.router.expert_bias[3] = 100.0
    _, weights, indices = layer.router(x)
    assert (indices == 3).any(-1).all()  # expert 3 is always chosen
    torch.testing.assert_close(weights, probs.gather(1, indices) / probs.gather(1, indices).sum(-1, keepdim=True))
    assert "router.expert_bias" in dict(layer.named_buffers())
    assert "router.expert_bias" not in dict(layer.named_parameters())


def test_aux_loss_is_one_for_uniform_routing_and_larger_when_collapsed():
    n_experts, tokens = 4, 16
    uniform = torch.full((tokens, n_experts), 1 / n_experts)
    balanced = torch.arange(tokens * 2).view(tokens, 2) % n_experts
    torch.testing.assert_close(load_balancing_loss(uniform, balanced, n_experts), torch.tensor(1.0))
    collapsed_probs = F.one_hot(torch.zeros(tokens, dtype=torch.long), n_experts).float()
    collapsed = torch.zeros(tokens, 1, dtype=torch.long)
    torch.testing.assert_close(load_balancing_loss(collapsed_probs, collapsed, n_experts), torch.tensor(4.0))


def test_moe_layer_reports_aux_loss_of_one_for_a_uniform_router(tiny_config):
    layer = moe_layer(tiny_config, n_experts=4, top_k=2)
    torch.nn.init.zeros_(layer.router.weight)
    layer(torch.randn(2, 5, D_MODEL))
    torch.testing.assert_close(layer.aux_loss, torch.tensor(1.0))


@pytest.mark.parametrize("activation", ["swiglu", "relu2", "gelu"])
@pytest.mark.parametrize("router", ["softmax", "softmax_norm", "sigmoid"])
def test_dropless_moe_equals_per_token_weighted_experts(tiny_config, activation, router):
    cfg = tiny_config(pattern="E", mlp={"activation": activation}, moe={"router": router, "shared_d_ff": 16})
    layer = MoE(cfg, 0)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    h = torch.randn(2, 6, D_MODEL)
    out = layer(h)
    x = h.reshape(-1, D_MODEL)
    _, weights, indices = layer.router(x)
    for t in range(x.shape[0]):
        expected = layer.shared_expert(x[t])
        for w, e in zip(weights[t], indices[t], strict=True):
            expected = expected + w * layer.experts.expert(int(e), x[t])
        torch.testing.assert_close(out.reshape(-1, D_MODEL)[t], expected, atol=1e-5, rtol=1e-4)


def test_expert_weight_layout(tiny_config):
    gated = moe_layer(tiny_config, n_experts=4, d_ff=24, shared_d_ff=16)
    assert gated.experts.gate_up_proj.shape == (4, 48, D_MODEL)  # [gate | up]
    assert gated.experts.down_proj.shape == (4, D_MODEL, 24)
    assert gated.shared_expert.gate_proj.weight.shape == (16, D_MODEL)
    plain = MoE(tiny_config(pattern="E", mlp={"activation": "relu2"}, moe={"d_ff": 24}), 0)
    assert plain.experts.up_proj.shape == (4, 24, D_MODEL) and not hasattr(plain.experts, "gate_up_proj")
    assert moe_layer(tiny_config).shared_expert is None


def test_router_receives_gradients(tiny_config):
    layer = moe_layer(tiny_config, router="softmax_norm")
    torch.nn.init.normal_(layer.router.weight)
    for p in layer.experts.parameters():
        torch.nn.init.normal_(p, std=0.3)
    layer(torch.randn(2, 6, D_MODEL)).square().sum().backward()
    assert layer.router.weight.grad.abs().sum() > 0
    assert layer.experts.gate_up_proj.grad.abs().sum() > 0
