"""QLoRA's frozen 4-bit base (a bitsandbytes Linear4bit under a PEFT LoRA layer), its products
with the weight dequantized by the C kernel (nf4.c) instead of bitsandbytes' CPU routine.

bitsandbytes computes the base as F.linear(x, dequantize_4bit(W)) in the forward and
grad @ dequantize_4bit(W) in the backward, expanding a nested absmax each time. This is the same
arithmetic — the same dequantized weight bit for bit (tests/test_cpu_quantized.py), the same
products — with the nested absmax expanded once at install (the weight is frozen) and the 4-bit
decode faster: a 1,536 x 576 weight to fp32 on a 2-core Zen 3 EPYC in 0.13 against 0.69 ms alone,
0.61 against 1.16 ms inside a tone QLoRA step (profiled: there the fp32 output, 8x the packed
bytes, is written to memory between the matmuls), ~0.15 s of a ~2.3 s step. Nothing is kept
between the forward and the backward but the 4-bit weight itself: QLoRA's memory is unchanged.
`install` replaces the 4-bit layer's own forward, so a layer under a PEFT adapter (its LoRA term
in a LinearGroup, lora.py) and a frozen one outside the target modules take it alike."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from slmops.train.cpu import compat
from slmops.train.cpu.kernels import Kernels
from slmops.train.cpu.patches import Patches


@dataclass
class FourBitWeight:
    layer: nn.Module  # the bitsandbytes Linear4bit
    packed: torch.Tensor  # uint8, two elements a byte
    absmax: torch.Tensor  # fp32, one a block
    code: torch.Tensor  # the 16 levels, fp32
    blocksize: int
    shape: tuple[int, int]  # (out, in)
    dtype: torch.dtype  # the weight's own dtype (the backward dequantizes to it, as bitsandbytes does)
    compute_dtype: torch.dtype
    kernels: Kernels

    @classmethod
    def of(cls, layer: nn.Module, kernels: Kernels | None) -> "FourBitWeight | None":
        state = compat.four_bit_state(layer) if kernels is not None else None
        return None if state is None else cls(layer, *state, kernels)

    def current(self) -> bool:
        """Still the layer's weight (not replaced or repacked since install)."""
        state = getattr(self.layer.weight, "quant_state", None)
        return (self.layer.weight.data.data_ptr() == self.packed.data_ptr() and state is not None
                and not getattr(state, "packing_format_for_cpu", False))

    def dequantize(self, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
        return self.kernels.dequantize_4bit(self.packed, self.absmax, self.code, self.blocksize, self.shape, dtype, out)

    def backward_matrix(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight an input gradient of `dtype` is multiplied by: dequantized to the weight's own
        dtype, then the gradient's, as bitsandbytes' MatMul4Bit does."""
        return self.dequantize(self.dtype).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's output for `x`, as Linear4bit.forward computes it (input cast to the
        compute dtype, bias too, the output back to the input's dtype)."""
        bias = self.layer.bias
        out = FourBitLinearFunction.apply(x.to(self.compute_dtype), self,
                                          None if bias is None else bias.to(self.compute_dtype))
        return out.to(x.dtype)


@dataclass
class FourBitGroupWeight:
    """The 4-bit weights of layers that read the same input (QLoRA's q, k and v; or one layer
    alone) as the one (sum of outputs, in) matrix a LoRA group's product takes (lora.py),
    dequantized into it afresh for each product and dropped after it, as FourBitLinearFunction
    does for one layer: the group runs one product where it ran one a layer, and still keeps
    nothing but the 4-bit weights between its forward and backward."""

    members: tuple[FourBitWeight, ...]

    @classmethod
    def of(cls, weights: list[FourBitWeight | None]) -> "FourBitGroupWeight | None":
        """None unless every layer is taken and they agree on input size and dtypes, without biases."""
        if not weights or any(w is None or w.layer.bias is not None for w in weights):
            return None
        if len({(w.shape[1], w.dtype, w.compute_dtype) for w in weights}) != 1:
            return None
        return cls(tuple(weights))

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.members[0].compute_dtype

    def current(self) -> bool:
        return all(w.current() for w in self.members)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        rows = [w.shape[0] for w in self.members]
        out = torch.empty(sum(rows), self.members[0].shape[1], dtype=dtype)
        for weight, part in zip(self.members, out.split(rows)):
            weight.dequantize(dtype, part)
        return out

    def backward_matrix(self, dtype: torch.dtype) -> torch.Tensor:
        """As FourBitWeight.backward_matrix: the weights' own dtype first, then the gradient's."""
        return self.dequantize(self.members[0].dtype).to(dtype)


class FourBitLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight: FourBitWeight, bias):
        ctx.weight, ctx.has_bias = weight, bias is not None
        return F.linear(x, weight.dequantize(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad):
        weight = ctx.weight
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ weight.backward_matrix(grad.dtype)
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, None, grad_bias


def install(patches: Patches, weight: FourBitWeight, is_enabled) -> None:
    """The 4-bit layer's forward through FourBitWeight while `is_enabled()` and the weight is still
    the one read."""

    def forward(self, own_forward, x, *args, **kwargs):
        if args or kwargs or not is_enabled() or not weight.current():
            return own_forward(x, *args, **kwargs)
        return weight.forward(x)

    patches.replace_forward(weight.layer, forward)
