"""Every private API of another library the CPU fast path touches, in one place, with the
versions it is known to work with.

The fast path reads PEFT's LoRA layer internals (active adapter, A/B, scaling, dropout,
merged/disabled/DoRA/bias state), registers an attention function through transformers'
AttentionInterface and masking interface and switches `config._attn_implementation`, calls
`torch._softmax_backward_data`, and (for QLoRA) sets a bitsandbytes layer attribute. A
release may change any of these without notice, so the path runs only on the versions
listed in KNOWN; on others it stays off, says why, and training runs the libraries' own
forwards (`--cpu_fast_path on` tries anyway; the start-up check against the plain forward
still guards it). Bump KNOWN after the fast-path tests pass on a new release."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

import torch
from torch import nn

# package -> (lowest known, first unknown): the release series the fast path's tests ran on
# (constraints.txt pins the exact versions CI uses)
KNOWN = {
    "torch": ("2.13", "2.14"),
    "transformers": ("5.24", "5.25"),
    "peft": ("0.21", "0.22"),
}
# bitsandbytes only matters for QLoRA and is checked where a 4-bit layer is found
KNOWN_BITSANDBYTES = ("0.50", "0.51")


def _version_key(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split("+")[0].split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
        if not piece.isdigit():  # 2.14.0rc1, 5.25.0.dev0: the numeric prefix only
            break
    return tuple(parts)


def installed_version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def in_range(found: str, bounds: tuple[str, str]) -> bool:
    low, high = bounds
    return _version_key(low) <= _version_key(found) < _version_key(high)


def unknown_versions() -> list[str]:
    """'transformers 5.30.0 (known: >=5.20, <5.25)' for each library outside KNOWN."""
    problems = []
    for package, bounds in KNOWN.items():
        found = installed_version(package)
        if found is None or not in_range(found, bounds):
            problems.append(f"{package} {found or 'not installed'} (known: >={bounds[0]}, <{bounds[1]})")
    return problems


# ---- PEFT --------------------------------------------------------------------------------
def lora_linear_type() -> type:
    """PEFT's LoRA layer over a plain nn.Linear."""
    from peft.tuners.lora.layer import Linear

    return Linear


def _bitsandbytes_known() -> bool:
    found = installed_version("bitsandbytes")
    return found is not None and in_range(found, KNOWN_BITSANDBYTES)


def lora_4bit_types() -> tuple[type, ...]:
    """PEFT's LoRA layers over bitsandbytes' 4-bit linears, where bitsandbytes is installed
    at a known version (else none: those layers keep PEFT's forward)."""
    if not _bitsandbytes_known():
        return ()
    try:
        from peft.tuners.lora.bnb import Linear4bit
    except ImportError:
        return ()
    return (Linear4bit,)


def four_bit_linear_type() -> type | None:
    """bitsandbytes' 4-bit linear (QLoRA's frozen base, with or without an adapter on it), where
    bitsandbytes is installed at a known version; else None."""
    if not _bitsandbytes_known():
        return None
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return None
    return Linear4bit


def compute_dtype(layer: nn.Module) -> torch.dtype | None:
    """The dtype a linear layer computes in: its weight's, or, for a bitsandbytes 4-bit layer
    (bare or under a PEFT adapter), whose weight holds packed bytes, the compute dtype it casts its
    input to. None when neither is known. (Probes of a module's own forward are made in it.)"""
    base = getattr(layer, "base_layer", layer)
    weight = getattr(base, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.is_floating_point():
        return weight.dtype
    dtype = getattr(base, "compute_dtype", None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None


def base_layer(module: nn.Module, lora_type: type) -> nn.Module:
    return module.base_layer if isinstance(module, lora_type) else module


def plain_lora_adapter(module: nn.Module) -> str | None:
    """The name of the one plain LoRA adapter PEFT's layer `module` runs now; None when its
    state is one this path does not cover (disabled, merged, several active, DoRA, a bias)."""
    if module.disable_adapters or module.merged:
        return None
    active = module.active_adapters
    if len(active) != 1 or active[0] not in module.lora_A:
        return None
    name = active[0]
    if module.use_dora.get(name, False) or getattr(module, "lora_bias", {}).get(name, False):
        return None
    if module.lora_B[name].bias is not None or module.lora_A[name].bias is not None:
        return None
    return name


def lora_parts(module: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """(A (r, in), B (out, r), scaling, dropout p while training) of adapter `name`."""
    dropout = module.lora_dropout[name]
    p = dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
    return module.lora_A[name].weight, module.lora_B[name].weight, module.scaling[name], p


# ---- transformers --------------------------------------------------------------------------
def sdpa_attention_forward():
    """transformers' own SDPA attention function (the fallback of ours)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward as forward

    return forward


def register_attention(name: str, forward) -> None:
    """Make `name` usable as `config._attn_implementation`, with SDPA's mask. Registering is
    idempotent; the name stays registered (it does nothing for a model that does not name it)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, forward)
    AttentionMaskInterface.register(name, sdpa_mask)


def attention_implementation(model) -> str | None:
    return getattr(model.config, "_attn_implementation", None)


def model_configs(model) -> list:
    """The model's config and its sub-configs (each attention module reads its own)."""
    seen, configs = set(), []
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and id(config) not in seen and hasattr(config, "_attn_implementation"):
            seen.add(id(config))
            configs.append(config)
    return configs


# ---- torch ---------------------------------------------------------------------------------
def softmax_backward(grad: torch.Tensor, probs: torch.Tensor, dim: int) -> torch.Tensor:
    """The gradient of softmax at its output `probs`: one fused op instead of four."""
    return torch._softmax_backward_data(grad, probs, dim, probs.dtype)


# ---- bitsandbytes ---------------------------------------------------------------------------
def keep_4bit_layers_differentiable(model) -> None:
    """bitsandbytes (0.50) repacks a 4-bit layer's weights for its fast CPU inference kernel
    the first time the layer runs in eval mode without gradients, and that kernel has no
    backward: every later training step would silently lose the gradient through the layer.
    Evaluation during training runs in eval mode, so switch the repacking off."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def four_bit_state(layer: nn.Module):
    """A bitsandbytes Linear4bit's quantized weight as plain tensors, for the fast path's own
    dequantization (quantized.py): (packed uint8, absmax fp32 with a nested absmax expanded once,
    the 16 levels fp32, blocksize, (out, in), the weight's dtype, the compute dtype); None when the
    layer is something else or in a form that path does not take (eval-mode CPU repacking,
    another orientation, a blocksize not a multiple of 16, an odd element count). Reads
    QuantState's fields and calls bitsandbytes.functional.dequantize_blockwise (0.50)."""
    weight = getattr(layer, "weight", None)
    state = getattr(weight, "quant_state", None)
    if state is None or getattr(state, "packing_format_for_cpu", False) or state.quant_type not in ("nf4", "fp4"):
        return None
    shape = tuple(state.shape)
    if len(shape) != 2 or shape != (layer.out_features, layer.in_features) or state.blocksize % 16 or (shape[0] * shape[1]) % 2:
        return None
    compute = getattr(layer, "compute_dtype", None)
    if compute not in (torch.float32, torch.bfloat16) or state.dtype not in (torch.float32, torch.bfloat16):
        return None
    from bitsandbytes.functional import dequantize_blockwise

    with torch.no_grad():
        if state.nested:  # as bitsandbytes' dequantize_4bit expands it, every call
            absmax = dequantize_blockwise(state.absmax, state.state2)
            absmax += state.offset
        else:
            absmax = state.absmax
        code = state.code.float().contiguous()
    packed = weight.data.view(torch.uint8).reshape(-1)
    return packed, absmax.float().contiguous(), code, int(state.blocksize), shape, state.dtype, compute
