"""Linear layers sharing an input as one op (``ops/shared_input.py``): values and gradients against autograd through
``F.linear``, autocast's dtypes, and when the model falls back to calling the layers as modules."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hybridlm import ops
from hybridlm.ops import dispatch
from hybridlm.ops.shared_input import SharedInputLinears, plain_linear, shared_input_linears, shared_input_linears_ref


def _params(dtype=torch.float32, bias=(True, False, True)):
    torch.manual_seed(0)
    weights = [torch.randn(n, 24, dtype=dtype) * 0.2 for n in (16, 8, 8)]
    biases = [torch.randn(w.shape[0], dtype=dtype) if b else None for w, b in zip(weights, bias, strict=True)]
    return weights, biases


def _grads(impl, x, weights, biases, cotangents, autocast=False, used=(0, 1, 2)):
    leaves = [t.detach().clone().requires_grad_() for t in (x, *weights, *(b for b in biases if b is not None))]
    x_l, w_l, b_iter = leaves[0], leaves[1 : 1 + len(weights)], iter(leaves[1 + len(weights) :])
    b_l = [None if b is None else next(b_iter) for b in biases]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        outs = impl(x_l, w_l, b_l)
    loss = sum((outs[i].float() * cotangents[i]).sum() for i in used)
    loss.backward()
    return [o.detach() for o in outs], [t.grad for t in leaves]


def test_matches_autograd_in_fp32():
    weights, biases = _params()
    x = torch.randn(3, 5, 24)
    cot = [torch.randn(3, 5, w.shape[0]) for w in weights]
    out_f, grad_f = _grads(shared_input_linears, x, weights, biases, cot)
    out_r, grad_r = _grads(shared_input_linears_ref, x, weights, biases, cot)
    for f, r in zip(out_f + grad_f, out_r + grad_r, strict=True):
        torch.testing.assert_close(f, r, rtol=1e-5, atol=1e-6)


def test_an_unused_output_adds_nothing_to_the_input_gradient():
    weights, biases = _params()
    x = torch.randn(2, 7, 24)
    cot = [torch.randn(2, 7, w.shape[0]) for w in weights]
    _, grad_f = _grads(shared_input_linears, x, weights, biases, cot, used=(0, 2))
    _, grad_r = _grads(shared_input_linears_ref, x, weights, biases, cot, used=(0, 2))
    torch.testing.assert_close(grad_f[0], grad_r[0], rtol=1e-5, atol=1e-6)
    assert grad_f[2] is None and grad_r[2] is None  # the second layer's weight got no gradient in either


def test_autocast_casts_as_autocast_does():
    """fp32 parameters under bf16 autocast: bf16 outputs, fp32 gradients of the parameters and the input, and the
    values autograd through autocast gives, to bf16 rounding."""
    weights, biases = _params()
    x = torch.randn(4, 6, 24)
    cot = [torch.randn(4, 6, w.shape[0]) for w in weights]
    out_f, grad_f = _grads(shared_input_linears, x, weights, biases, cot, autocast=True)
    out_r, grad_r = _grads(shared_input_linears_ref, x, weights, biases, cot, autocast=True)
    assert [o.dtype for o in out_f] == [torch.bfloat16] * 3
    assert [g.dtype for g in grad_f] == [torch.float32] * len(grad_f)
    for o_f, o_r in zip(out_f, out_r, strict=True):  # the same casts and products (CPU kernels may round the bias
        torch.testing.assert_close(o_f, o_r, rtol=1e-2, atol=1e-2)  # in differently inside or outside autocast)
    for g_f, g_r in zip(grad_f[1:], grad_r[1:], strict=True):  # weight and bias gradients: the same products
        torch.testing.assert_close(g_f, g_r, rtol=1e-2, atol=1e-2)
    scale = grad_r[0].abs().max()
    assert (grad_f[0] - grad_r[0]).abs().max() <= 2e-2 * scale


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(24, 16), nn.Linear(24, 8, bias=False)

    def forward(self, x):
        return ops.linears(x, (self.a, self.b))


def test_plain_linears_are_fused_and_others_called_as_modules(monkeypatch):
    monkeypatch.setattr(dispatch, "_decide", lambda op, device: "fused")  # what CUDA would choose
    model, x = _Model(), torch.randn(2, 3, 24, requires_grad=True)
    outs = model(x)
    assert [o.grad_fn.name() for o in outs] == ["SharedInputLinearsBackward"] * 2
    torch.testing.assert_close(outs[1], model.b(x))

    seen = []
    handle = model.b.register_forward_hook(lambda m, args, out: seen.append(m))
    outs = model(x)
    assert seen == [model.b]  # a hooked layer is called, so its hook runs (ZeRO-3 gathers weights in one)
    assert all(o.grad_fn.name() != "SharedInputLinearsBackward" for o in outs)
    handle.remove()

    class Adapted(nn.Linear):  # what a LoRA wrapper or a quantised layer looks like to the check: not nn.Linear
        pass

    assert plain_linear(model.a) and not plain_linear(Adapted(24, 8))
    handle = nn.modules.module.register_module_forward_pre_hook(lambda m, args: None)
    try:
        assert not plain_linear(model.a)  # a global hook sees every module called
    finally:
        handle.remove()


def test_reference_when_dispatch_says_so():
    model, x = _Model(), torch.randn(2, 3, 24)
    assert dispatch.choose("linears", x.device) == "reference"  # CPU
    assert all(o.grad_fn is None or o.grad_fn.name() != "SharedInputLinearsBackward" for o in model(x))


@pytest.mark.parametrize("needs", [(True, False), (False, True)], ids=["input only", "weights only"])
def test_gradients_only_where_asked(needs):
    weights, biases = _params()
    x = torch.randn(2, 3, 24, requires_grad=needs[0])
    ws = [w.requires_grad_(needs[1]) for w in weights]
    outs = SharedInputLinears.apply(x, 3, *ws, *biases)
    sum(o.sum() for o in outs).backward()
    assert (x.grad is not None) == needs[0]
    assert all((w.grad is not None) == needs[1] for w in ws)
