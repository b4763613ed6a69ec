"""A faster training path for plain LoRA layers on the CPU, around PEFT's own modules.

Profiling one bf16 LoRA step of SmolLM2-135M on a 2-core CPU showed most of the time
outside the model's matrix products: PEFT draws each dropout mask with `bernoulli_` in
fp32 (13-16 % of the step; q, k and v each draw their own), casts the bf16 activations to
fp32 for the adapter and the result back, and scales a full-width tensor. This path keeps
the same computation — y = W x + B A (dropout_p(x)) * alpha / r, with a fresh Bernoulli
mask per layer and per step — and computes it more cheaply:

- masks come from NumPy's PCG64 generator as 16-bit integers compared with a threshold
  (keep probability 1 - p to within 2^-16), about 5-9x faster than torch's `bernoulli_`;
  the generator is seeded from the run's seed and its state goes into every checkpoint,
  so a resumed run draws the same masks;
- the 1 / (1 - p) dropout scale is folded into the adapter scale and applied to the
  rank-r intermediate instead of the full-width input;
- the adapter runs in the activations' dtype (bf16 on the fast path), its fp32 master
  weights cast on the fly, so no full-width tensor changes dtype.

PEFT's modules, state dicts and saved adapters are untouched; layers this path does not
cover (DoRA, several active adapters, merged or disabled adapters, 4-bit bases) keep
PEFT's forward."""

from __future__ import annotations

import types

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class FastLoraPath:
    def __init__(self, model: nn.Module, seed: int):
        self.rng = np.random.default_rng(seed)
        self.layers: list[nn.Module] = []
        from peft.tuners.lora.layer import Linear as LoraLinear

        for module in model.modules():
            if type(module) is LoraLinear and not module.use_dora.get(module.active_adapters[0], False):
                module._slmops_peft_forward = module.forward
                module.forward = types.MethodType(_make_forward(self), module)
                self.layers.append(module)

    def keep_mask(self, shape: torch.Size, p: float) -> torch.Tensor:
        """Bernoulli(1 - p) as a bool tensor of `shape`."""
        threshold = int(round(p * 65536))
        draws = self.rng.integers(0, 65536, size=tuple(shape), dtype=np.uint16)
        return torch.from_numpy(draws >= threshold)

    def state_dict(self) -> dict:
        return {"bit_generator": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["bit_generator"]

    def remove(self) -> None:
        for module in self.layers:
            module.forward = module._slmops_peft_forward
            del module._slmops_peft_forward
        self.layers = []


def _make_forward(path: FastLoraPath):
    def forward(self, x: torch.Tensor, *args, **kwargs):
        adapters = self.active_adapters
        if args or kwargs or self.disable_adapters or self.merged or len(adapters) != 1 or adapters[0] not in self.lora_A:
            return self._slmops_peft_forward(x, *args, **kwargs)
        name = adapters[0]
        result = self.base_layer(x)
        dtype = result.dtype
        scale = self.scaling[name]
        dropout = self.lora_dropout[name]
        p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
        if self.training and p > 0:
            x = x * path.keep_mask(x.shape, p).to(x.device)
            scale = scale / (1.0 - p)
        hidden = F.linear(x.to(dtype), self.lora_A[name].weight.to(dtype))  # (..., r)
        return result + F.linear(hidden * scale, self.lora_B[name].weight.to(dtype))

    return forward
