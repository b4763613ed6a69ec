"""RMSNorm as one autograd function, on a frozen weight (adapters) or a trainable one (full
fine-tuning).

Llama-family norms compute in fp32 for a bf16 model: cast up, square, mean, add, rsqrt,
multiply, cast down, multiply by the weight. Autograd records each of those as its own node
and keeps fp32 copies for the backward; on a CPU at short sequence lengths those small ops
cost more than the matrix products around them. Here the forward saves only the input and
the per-row 1/rms, and the backward is the closed form, computed in fp32. With the fused
CPU kernels (kernels.py) each direction is one pass over memory (3x faster forward,
~8x backward than the PyTorch ops at 400 x 576 bf16); without them the PyTorch version
below does the same arithmetic in the same order as Llama's norm, bit for bit.

A module is taken over only when its own forward gives the same output as the PyTorch
version on a random input (`matches`), so a norm that differs (Gemma's 1 + weight, a
learned bias) keeps its own forward. A trainable weight's gradient (the sum over rows of
grad * x_hat) comes out of the same backward pass; since it is a few hundred numbers beside
millions, the model-wide start-up check would not see it wrong, so `install` checks it on
each such norm against the module's own autograd first."""

from __future__ import annotations

import logging

import torch
from torch import nn

from slmops.train.cpu.kernels import Kernels
from slmops.train.cpu.patches import Patches

log = logging.getLogger(__name__)


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, kernels: Kernels | None = None) -> torch.Tensor:
        ctx.kernels = kernels if kernels is not None and kernels.supports(x, weight) else None
        if ctx.kernels is not None:
            y, inv_rms = ctx.kernels.rmsnorm_forward(x, weight, eps)
        else:
            x32 = x.float()
            inv_rms = torch.rsqrt(x32.square().mean(-1, keepdim=True).add_(eps))
            y = weight * (x32 * inv_rms).to(x.dtype)
        ctx.save_for_backward(x, inv_rms, weight)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, inv_rms, weight = ctx.saved_tensors
        wants_weight = ctx.needs_input_grad[1]
        if ctx.kernels is not None and grad.dtype == x.dtype:
            if wants_weight:
                dx, dw = ctx.kernels.rmsnorm_backward_with_weight(grad.contiguous(), x, weight, inv_rms)
                return dx, dw.to(weight.dtype), None, None
            return ctx.kernels.rmsnorm_backward(grad.contiguous(), x, weight, inv_rms), None, None, None
        g = (grad * weight).float()
        x_hat = x.float() * inv_rms  # (not in place: an fp32 x's .float() is x itself, the saved input)
        dw = None
        if wants_weight:  # y = weight * x_hat in x's dtype: the weight's gradient sums grad * that over the rows
            dw = (grad.float() * x_hat.to(x.dtype).float()).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        # d/dx of x * r(x): r * (g - x_hat * mean(g * x_hat))
        dot = (g * x_hat).mean(-1, keepdim=True)
        dx = g.sub_(x_hat.mul_(dot)).mul_(inv_rms)
        return dx.to(x.dtype), dw, None, None


def _eps(module: nn.Module) -> float | None:
    for name in ("variance_epsilon", "eps"):
        value = getattr(module, name, None)
        if isinstance(value, float):
            return value
    return None


@torch.no_grad()
def matches(module: nn.Module) -> bool:
    """True when `module` is an RMSNorm this function reproduces exactly."""
    weight = getattr(module, "weight", None)
    eps = _eps(module)
    if not type(module).__name__.endswith("RMSNorm") or not isinstance(weight, torch.Tensor) or weight.ndim != 1 or eps is None:
        return False
    if len(list(module.parameters())) != 1:
        return False
    probe = torch.randn(3, weight.shape[0], generator=torch.Generator().manual_seed(0)).to(weight.device, weight.dtype) * 3
    try:
        expected = module(probe)
    except Exception:
        return False
    return expected.dtype == probe.dtype and torch.equal(expected, RMSNormFunction.apply(probe, weight, eps))


def weight_gradient_agrees(module: nn.Module, kernels: Kernels | None) -> bool:
    """RMSNormFunction's input and weight gradients (on `kernels`, or the PyTorch version) are
    the module's own autograd's, within its dtype's precision, on a random batch."""
    weight, eps = module.weight, _eps(module)
    generator = torch.Generator().manual_seed(0)
    # enough rows that the kernels split them between threads and blocks
    probe = (torch.randn(64, weight.shape[0], generator=generator) * 3).to(weight.device, weight.dtype)
    grad = torch.randn(probe.shape, generator=generator).to(probe.dtype)
    got, want = [], []
    with torch.enable_grad():
        for run, out in ((lambda x: RMSNormFunction.apply(x, weight, eps, kernels), got), (module, want)):
            x = probe.clone().requires_grad_()
            dw, dx = torch.autograd.grad(run(x), (weight, x), grad)
            out.extend((dx.double(), dw.double()))
    tolerance = 1e-4 if weight.dtype == torch.float32 else 3e-2
    return all(torch.allclose(a, b, rtol=tolerance, atol=tolerance * float(b.abs().max())) for a, b in zip(got, want))


def install(patches: Patches, module: nn.Module, is_enabled, kernels: Kernels | None, checked: dict | None = None) -> None:
    """Route `module`'s forward through RMSNormFunction while `is_enabled()`; a trainable weight on
    the kernels only where their gradients agree with the module's own (else the PyTorch version).
    `checked` (a dict kept across a model's norms) holds each check's answer by norm class, dtype,
    width and eps: norms alike in those compute the same function, so one check answers for all."""
    eps = _eps(module)
    if kernels is not None and module.weight.requires_grad:
        key = (type(module), module.weight.dtype, module.weight.shape[0], eps)
        checked = {} if checked is None else checked
        if key not in checked:
            checked[key] = weight_gradient_agrees(module, kernels)
            if not checked[key]:
                log.warning("fused RMSNorm kernel off for %s: its weight gradient disagrees with the module's own autograd",
                            type(module).__name__)
        if not checked[key]:
            kernels = None

    def forward(self, own_forward, hidden_states, *args, **kwargs):
        if args or kwargs or not is_enabled():
            return own_forward(hidden_states, *args, **kwargs)
        return RMSNormFunction.apply(hidden_states, self.weight, eps, kernels)

    patches.replace_forward(module, forward)
