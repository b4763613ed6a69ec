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


class ProductBuffer:
    """The memory a path's 4-bit products dequantize their weight into, one buffer per dtype,
    reused by every product (forward and backward, every layer). Each dequantized weight lives
    only until its product has run, and a step runs one product at a time, so one buffer of the
    largest weight serves them all. A fresh tensor for each product instead made glibc's heap
    grow: small tensors a step keeps (activations saved for the backward) landed in the freed
    weights' space and the next weight went to fresh memory (+0.9 GB resident on the 1B
    benchmark shape, 2026-12-06)."""

    def __init__(self):
        self._flat: dict[torch.dtype, torch.Tensor] = {}

    def take(self, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
        """A contiguous (rows, cols) tensor of `dtype` over the buffer, its contents undefined: valid
        until the next take."""
        elements = shape[0] * shape[1]
        flat = self._flat.get(dtype)
        if flat is None or flat.numel() < elements:
            flat = self._flat[dtype] = torch.empty(elements, dtype=dtype)
        return flat[:elements].view(shape)


def _product_space(buffer: ProductBuffer | None, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """Where one product's weight is dequantized: the path's buffer, else a fresh tensor."""
    return buffer.take(shape, dtype) if buffer is not None else torch.empty(shape, dtype=dtype)


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
    buffer: ProductBuffer | None = None  # where products dequantize (shared by a path's weights); None: fresh tensors

    @classmethod
    def of(cls, layer: nn.Module, kernels: Kernels | None, buffer: ProductBuffer | None = None) -> "FourBitWeight | None":
        state = compat.four_bit_state(layer) if kernels is not None else None
        return None if state is None else cls(layer, *state, kernels, buffer)

    def current(self) -> bool:
        """Still the layer's weight (not replaced or repacked since install)."""
        state = getattr(self.layer.weight, "quant_state", None)
        return (self.layer.weight.data.data_ptr() == self.packed.data_ptr() and state is not None
                and not getattr(state, "packing_format_for_cpu", False))

    def dequantize(self, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
        """The weight as a fresh tensor of `dtype` (or written into `out`)."""
        return self.kernels.dequantize_4bit(self.packed, self.absmax, self.code, self.blocksize, self.shape, dtype, out)

    def product_matrix(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight for one product, in the path's buffer where it has one: to be used before
        the next product's dequantization."""
        return self.dequantize(dtype, _product_space(self.buffer, self.shape, dtype))

    def backward_matrix(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight an input gradient of `dtype` is multiplied by: dequantized to the weight's own
        dtype, then the gradient's, as bitsandbytes' MatMul4Bit does (product_matrix's lifetime)."""
        return self.product_matrix(self.dtype).to(dtype)

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
    dequantized into the path's ProductBuffer afresh for each product, as FourBitLinearFunction
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

    def product_matrix(self, dtype: torch.dtype) -> torch.Tensor:
        """The members' weights stacked for one product (FourBitWeight.product_matrix's lifetime)."""
        rows = [w.shape[0] for w in self.members]
        shape = (sum(rows), self.members[0].shape[1])
        out = _product_space(self.members[0].buffer, shape, dtype)
        for weight, part in zip(self.members, out.split(rows)):
            weight.dequantize(dtype, part)
        return out

    def backward_matrix(self, dtype: torch.dtype) -> torch.Tensor:
        """As FourBitWeight.backward_matrix: the weights' own dtype first, then the gradient's."""
        return self.product_matrix(self.members[0].dtype).to(dtype)


class FourBitLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight: FourBitWeight, bias):
        ctx.weight, ctx.has_bias = weight, bias is not None
        return F.linear(x, weight.product_matrix(x.dtype), bias)

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
