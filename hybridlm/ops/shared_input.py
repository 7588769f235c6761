"""Several linear layers of one input (attention's q / k / v projections, the gated MLP's gate and up) as one
autograd op whose backward sums the input's gradient inside the GEMMs.

Through autograd each layer's backward returns its own product ``grad_i @ W_i`` and autograd adds them with a
kernel each: at the 500M config and 8x4096 that is 30 additions of (32768, 1024) bf16 tensors a step (24 MLPs, two
per attention layer), ~1.4 ms of pure memory traffic. Here the first product is written and every later one is
added to it by its GEMM's epilogue (``addmm_`` with beta 1), which reads the running sum as it writes: no extra
kernel. Weight and bias gradients are the same products autograd computes.

Under autocast the op casts as autocast would (input, weights and biases to the autocast dtype; products in that
dtype) and hands each weight's gradient back in the weight's own dtype, as autocast's cast does. Summing in the
epilogue rounds the input's gradient once where autograd rounds each product and then the sum: the two agree to
bf16 rounding (``tests/ops/test_shared_input.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def plain_linear(module: nn.Module) -> bool:
    """Whether calling ``module`` is exactly ``F.linear`` of its weight and bias: an ``nn.Linear`` itself (not a
    subclass, as peft's LoRA layers and quantised layers are) with no hooks of its own or global ones (DeepSpeed
    ZeRO-3 gathers a layer's parameters in a forward pre-hook)."""
    if type(module) is not nn.Linear:
        return False
    own = (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks, module._backward_pre_hooks)
    shared = (
        nn.modules.module._global_forward_hooks,
        nn.modules.module._global_forward_pre_hooks,
        nn.modules.module._global_backward_hooks,
        nn.modules.module._global_backward_pre_hooks,
    )
    return not any(own) and not any(shared)


class SharedInputLinears(torch.autograd.Function):
    """``(F.linear(x, w_i, b_i) for each i)``; arguments ``x, n, w_1..w_n, b_1..b_n`` (a bias may be None)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, n: int, *params: torch.Tensor | None):
        weights, biases = params[:n], params[n:]
        device_type = x.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None

        def cast(t: torch.Tensor | None) -> torch.Tensor | None:
            return t.to(dtype) if t is not None and dtype is not None and t.is_floating_point() else t

        x_c, w_c, b_c = cast(x), [cast(w) for w in weights], [cast(b) for b in biases]
        with torch.autocast(device_type, enabled=False):
            outputs = tuple(F.linear(x_c, w, b) for w, b in zip(w_c, b_c, strict=True))
        ctx.save_for_backward(x_c, *w_c)
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None, not zeros to multiply
        ctx.x_dtype = x.dtype
        ctx.param_dtypes = [w.dtype for w in weights], [None if b is None else b.dtype for b in biases]
        return outputs

    @staticmethod
    def backward(ctx, *grads: torch.Tensor | None):
        x_c, *w_c = ctx.saved_tensors
        with torch.autocast(x_c.device.type, enabled=False):  # every tensor is in its compute dtype already
            return SharedInputLinears._grads(ctx, x_c, w_c, grads)

    @staticmethod
    def _grads(ctx, x_c: torch.Tensor, w_c: list[torch.Tensor], grads: tuple[torch.Tensor | None, ...]):
        weight_dtypes, bias_dtypes = ctx.param_dtypes
        rows = x_c.reshape(-1, x_c.shape[-1])
        grad_rows = [None if g is None else g.reshape(-1, g.shape[-1]) for g in grads]
        dx = None
        if ctx.needs_input_grad[0]:
            for g, w in zip(grad_rows, w_c, strict=True):
                if g is None:
                    continue
                if dx is None:
                    dx = torch.mm(g, w)
                else:
                    dx.addmm_(g, w)  # beta = 1: the GEMM's epilogue adds the running sum
            dx = None if dx is None else dx.view(x_c.shape).to(ctx.x_dtype)
        n = len(w_c)
        dweights, dbiases = [None] * n, [None] * n
        for i, g in enumerate(grad_rows):
            if g is None:
                continue
            if ctx.needs_input_grad[2 + i]:
                dweights[i] = torch.mm(g.t(), rows).to(weight_dtypes[i])
            if ctx.needs_input_grad[2 + n + i]:
                dbiases[i] = g.sum(0).to(bias_dtypes[i])
        return dx, None, *dweights, *dbiases


def shared_input_linears(
    x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor | None]
) -> tuple[torch.Tensor, ...]:
    return SharedInputLinears.apply(x, len(weights), *weights, *biases)


def shared_input_linears_ref(
    x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor | None]
) -> tuple[torch.Tensor, ...]:
    return tuple(F.linear(x, w, b) for w, b in zip(weights, biases, strict=True))
