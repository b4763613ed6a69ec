"""RMSNorm on a frozen weight as one autograd function.

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
learned bias) keeps its own forward."""

from __future__ import annotations

import torch
from torch import nn

from slmops.train.cpu.kernels import Kernels
from slmops.train.cpu.patches import Patches


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
        if ctx.kernels is not None and grad.dtype == x.dtype:
            return ctx.kernels.rmsnorm_backward(grad.contiguous(), x, weight, inv_rms), None, None, None
        g = (grad * weight).float()
        x_hat = x.float().mul_(inv_rms)
        # d/dx of x * r(x): r * (g - x_hat * mean(g * x_hat))
        dot = (g * x_hat).mean(-1, keepdim=True)
        dx = g.sub_(x_hat.mul_(dot)).mul_(inv_rms)
        return dx.to(x.dtype), None, None, None


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
    if weight.requires_grad or len(list(module.parameters())) != 1:
        return False
    probe = torch.randn(3, weight.shape[0], generator=torch.Generator().manual_seed(0)).to(weight.device, weight.dtype) * 3
    try:
        expected = module(probe)
    except Exception:
        return False
    return expected.dtype == probe.dtype and torch.equal(expected, RMSNormFunction.apply(probe, weight, eps))


def install(patches: Patches, module: nn.Module, is_enabled, kernels: Kernels | None) -> None:
    """Route `module`'s forward through RMSNormFunction while `is_enabled()`."""
    eps = _eps(module)

    def forward(self, own_forward, hidden_states, *args, **kwargs):
        if args or kwargs or not is_enabled():
            return own_forward(hidden_states, *args, **kwargs)
        return RMSNormFunction.apply(hidden_states, self.weight, eps, kernels)

    patches.replace_forward(module, forward)
