"""SwiGLU (silu(gate) * up) as one fused CPU kernel, forward and backward.

A Llama-family MLP is down_proj(silu(gate_proj(x)) * up_proj(x)). Between its matrix
products, PyTorch runs silu and a multiply forward and silu's backward plus two multiplies
and an add backward, each a pass over a (tokens, intermediate) tensor, 2.7x the hidden
size. The fused kernels (kernels.c) do each direction in one pass: 1.5x faster forward
and ~2.5x backward at 400 x 1536 bf16 on 2 cores; the results agree with PyTorch's to
bf16 precision (PyTorch rounds silu's output before the multiply, the kernel does not).

When the three projections are plain frozen linears (LoRA without adapters on the MLP),
the whole MLP runs as one autograd node (FrozenMLPFunction): input gradient only, the
gate and up paths' gradients summed in place. QLoRA's frozen 4-bit projections do the same
(FrozenFourBitMLPFunction): each weight dequantized by the C kernel where its product needs it,
in the forward and again in the backward, so nothing but the 4-bit weights stays between them.

A module is taken over only when it has gate/up/down projections and its own forward gives
exactly down(silu(gate(x)) * up(x)) on a random input (`matches`), so MLPs with another
activation (GELU in Gemma) or extra terms keep their own forward. Used only where the
kernels compiled: without them PyTorch's own ops are as fast as a Python re-implementation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slmops.train.cpu import compat
from slmops.train.cpu.kernels import Kernels, PackedWeight
from slmops.train.cpu.patches import Patches
from slmops.train.cpu.quantized import FourBitWeight

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, kernels: Kernels) -> torch.Tensor:
        gate, up = gate.contiguous(), up.contiguous()
        ctx.kernels = kernels
        ctx.save_for_backward(gate, up)
        return kernels.swiglu_forward(gate, up)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        d_gate, d_up = ctx.kernels.swiglu_backward(grad.contiguous(), gate, up)
        return d_gate, d_up, None


class FrozenMLPFunction(torch.autograd.Function):
    """down(silu(gate(x)) * up(x)) with frozen, bias-free linear weights, as one autograd node:
    only the input's gradient is computed, the two input-gradient products summed in place
    (autograd's separate nodes ran each product after a transpose op and added the gate and
    up paths' gradients in another pass). Saves gate(x) and up(x), as the SwiGLU node did."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, kernels: Kernels,
                packed: tuple[PackedWeight, PackedWeight, PackedWeight] | None = None):
        rows = x.reshape(-1, x.shape[-1]).to(w_gate.dtype)
        if packed is not None and kernels.amx_linear_pays(rows.shape[0]):  # the weights packed for AMX (FastPath): the forward's products on them
            gate, up = kernels.amx_linear(rows, packed[0]), kernels.amx_linear(rows, packed[1])
            out = kernels.amx_linear(kernels.swiglu_forward(gate, up), packed[2])
        else:
            gate, up = F.linear(rows, w_gate), F.linear(rows, w_up)
            out = F.linear(kernels.swiglu_forward(gate, up), w_down)
        ctx.kernels, ctx.shape, ctx.x_dtype = kernels, x.shape, x.dtype
        ctx.save_for_backward(gate, up, w_gate, w_up, w_down)
        return out.view(*x.shape[:-1], out.shape[-1]).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up, w_gate, w_up, w_down = ctx.saved_tensors
        rows = grad.reshape(-1, grad.shape[-1]).to(w_down.dtype).contiguous()
        d_gate, d_up = ctx.kernels.swiglu_backward(rows @ w_down, gate, up)
        dx = (d_gate @ w_gate).addmm_(d_up, w_up)
        return dx.view(ctx.shape).to(ctx.x_dtype), None, None, None, None, None


class FrozenFourBitMLPFunction(torch.autograd.Function):
    """FrozenMLPFunction over bitsandbytes 4-bit projections (QLoRA without adapters on the MLP):
    the products in the layers' compute dtype, as Linear4bit computes them (its input cast to it,
    the output back to the input's dtype), each weight dequantized just before its product (into
    the path's ProductBuffer), in the backward to the weight's own dtype first, as bitsandbytes' backward
    does (FourBitWeight). Without it such an MLP ran as three 4-bit layers with silu and the
    multiplies between them as separate autograd nodes."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, gate_w: FourBitWeight, up_w: FourBitWeight, down_w: FourBitWeight, kernels: Kernels):
        dtype = gate_w.compute_dtype
        rows = x.reshape(-1, x.shape[-1]).to(dtype)
        gate, up = F.linear(rows, gate_w.product_matrix(dtype)), F.linear(rows, up_w.product_matrix(dtype))
        out = F.linear(kernels.swiglu_forward(gate, up), down_w.product_matrix(dtype))
        ctx.weights, ctx.kernels, ctx.shape, ctx.x_dtype = (gate_w, up_w, down_w), kernels, x.shape, x.dtype
        ctx.save_for_backward(gate, up)
        return out.view(*x.shape[:-1], out.shape[-1]).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        gate_w, up_w, down_w = ctx.weights
        rows = grad.reshape(-1, grad.shape[-1]).to(gate.dtype).contiguous()
        d_gate, d_up = ctx.kernels.swiglu_backward(rows @ down_w.backward_matrix(gate.dtype), gate, up)
        dx = (d_gate @ gate_w.backward_matrix(gate.dtype)).addmm_(d_up, up_w.backward_matrix(gate.dtype))
        return dx.view(ctx.shape).to(ctx.x_dtype), None, None, None, None


def _four_bit_weights(module: nn.Module, four_bit: dict[nn.Module, FourBitWeight]) -> tuple[FourBitWeight, ...] | None:
    """(gate, up, down) as the C dequantization's 4-bit weights when the three projections are
    bias-free bitsandbytes 4-bit layers it took (QLoRA with no adapter on the MLP), still holding
    the weights it read, all of one compute dtype; else None."""
    parts = [getattr(module, name) for name in PROJECTIONS]
    weights = tuple(four_bit.get(p) for p in parts)
    if any(w is None or p.bias is not None or not w.current() for p, w in zip(parts, weights)):
        return None
    return weights if len({w.compute_dtype for w in weights}) == 1 else None


def _frozen_weights(module: nn.Module) -> tuple[torch.Tensor, ...] | None:
    """(gate, up, down) weights when the three projections are plain bias-free nn.Linear with
    frozen weights of one dtype (LoRA with no adapter on the MLP); else None. (Under autocast the
    modules run: their products' dtype is autocast's choice.)"""
    parts = [getattr(module, name) for name in PROJECTIONS]
    if not all(type(p) is nn.Linear and p.bias is None and not p.weight.requires_grad for p in parts):
        return None
    weights = tuple(p.weight for p in parts)
    return weights if len({w.dtype for w in weights}) == 1 else None


def swiglu(gate: torch.Tensor, up: torch.Tensor, kernels: Kernels | None) -> torch.Tensor:
    if kernels is not None and kernels.supports(gate, up) and gate.shape == up.shape:
        return SwiGLUFunction.apply(gate, up, kernels)
    return F.silu(gate) * up


@torch.no_grad()
def matches(module: nn.Module) -> bool:
    """True when `module` computes down(silu(gate(x)) * up(x))."""
    parts = [getattr(module, name, None) for name in PROJECTIONS]
    if not all(isinstance(p, nn.Module) for p in parts) or not hasattr(module, "act_fn"):
        return False
    weight = next((p for p in module.parameters() if p.is_floating_point()), None)
    any_weight = next(module.parameters(), None)
    hidden = getattr(parts[0], "in_features", None)
    if any_weight is None or not isinstance(hidden, int):
        return False
    # all-quantized projections (QLoRA's 4-bit MLP: uint8 storage) are probed in their compute dtype
    dtype = weight.dtype if weight is not None else compat.compute_dtype(parts[0])
    if dtype is None:
        return False
    probe = torch.randn(3, hidden, generator=torch.Generator().manual_seed(0)).to(any_weight.device, dtype)
    gate_proj, up_proj, down_proj = parts
    was_training = module.training
    module.eval()  # no LoRA dropout in the probe: it would differ between the two and use the RNG
    try:
        expected = module(probe)
        ours = down_proj(F.silu(gate_proj(probe)) * up_proj(probe))
    except Exception:
        return False
    finally:
        module.train(was_training)
    return expected.shape == ours.shape and torch.equal(expected, ours)


def install(patches: Patches, module: nn.Module, is_enabled, kernels: Kernels,
            four_bit: dict[nn.Module, FourBitWeight] | None = None) -> None:
    """Route `module`'s forward through the fused SwiGLU while `is_enabled()`. `four_bit`: the
    4-bit layers the fast path dequantizes in C (quantized.py), by layer."""

    def forward(self, own_forward, x, *args, **kwargs):
        if args or kwargs or not is_enabled():
            return own_forward(x, *args, **kwargs)
        autocast = torch.is_autocast_enabled(x.device.type)
        weights = _frozen_weights(self)
        if weights is not None and kernels.supports(*weights) and not autocast:
            return FrozenMLPFunction.apply(x, *weights, kernels, getattr(self, "_slmops_packed", None))
        quantized = _four_bit_weights(self, four_bit) if four_bit and not autocast else None
        if quantized is not None:  # (compute dtype fp32 or bf16: FourBitWeight.of takes no other)
            return FrozenFourBitMLPFunction.apply(x, *quantized, kernels)
        rows = x.reshape(-1, x.shape[-1])  # 2-D: the three linears run as plain products (no reshapes around each)
        out = self.down_proj(swiglu(self.gate_proj(rows), self.up_proj(rows), kernels))
        return out.view(*x.shape[:-1], out.shape[-1])

    patches.replace_forward(module, forward)
