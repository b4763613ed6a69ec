"""Attention for short training batches on a CPU, as one autograd function.

At the lengths most fine-tuning data has (tens of tokens), attention's arithmetic is tiny
and its cost is op count: SDPA's math kernel upcasts q, k and v, repeats the key/value
heads for grouped-query attention, masks, checks for fully masked rows, and autograd
records each step; its flash kernel is slower still at these sizes. This function computes
the same softmax(q k^T * scale + mask) v in fp32 with a handful of batched matmuls:
query heads that share a key/value head are stacked so K and V are never repeated, and
the backward is the closed form (one fused softmax backward).

It holds the attention probabilities for the backward (like the math kernel), so it only
takes batches up to SHORT_ATTENTION_MAX_LEN tokens; longer ones, inference, attention
dropout and extras (soft-capping, position bias, sinks) go to transformers' SDPA path. It
is registered through transformers' AttentionInterface under NAME."""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "slmops_cpu_training"
SHORT_ATTENTION_MAX_LEN = 192  # tokens: probabilities kept for the backward are B*H*T*T floats


class AttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bias, scale: float):
        batch, heads, length, dim = q.shape
        kv_heads = k.shape[1]
        group = heads // kv_heads
        # (B, Hkv, group*T, D): the query heads of one key/value head, stacked along T
        compute = q.dtype if q.dtype in (torch.float32, torch.float64) else torch.float32
        qf = q.to(compute).reshape(batch, kv_heads, group * length, dim)
        kf, vf = k.to(compute), v.to(compute)
        scores = torch.matmul(qf, kf.transpose(-1, -2)).mul_(scale)
        if bias is not None:
            scores.add_(bias.to(compute))
        probs = torch.softmax(scores, dim=-1)
        out = torch.matmul(probs, vf).view(batch, heads, length, -1)
        ctx.scale, ctx.shape, ctx.dtype = scale, q.shape, q.dtype
        ctx.save_for_backward(qf, kf, vf, probs)
        # (B, T, H, D) as transformers' attention functions return it
        return torch.empty(batch, length, heads, out.shape[-1], dtype=q.dtype, device=q.device).copy_(out.transpose(1, 2))

    @staticmethod
    def backward(ctx, grad_out):
        qf, kf, vf, probs = ctx.saved_tensors
        batch, heads, length, dim = ctx.shape
        kv_heads = kf.shape[1]
        d_out = grad_out.transpose(1, 2).to(vf.dtype).reshape(batch, kv_heads, -1, vf.shape[-1])
        d_v = torch.matmul(probs.transpose(-1, -2), d_out)
        d_probs = torch.matmul(d_out, vf.transpose(-1, -2))
        d_scores = torch._softmax_backward_data(d_probs, probs, -1, probs.dtype).mul_(ctx.scale)
        d_q = torch.matmul(d_scores, kf).view(batch, heads, length, dim)
        d_k = torch.matmul(d_scores.transpose(-1, -2), qf)
        return d_q.to(ctx.dtype), d_k.to(ctx.dtype), d_v.to(ctx.dtype), None, None


class _Bias:
    """The additive fp32 bias for a boolean mask, built once per forward and shared by all
    layers (they receive the same mask tensor)."""

    def __init__(self):
        self.mask: torch.Tensor | None = None
        self.group = 0
        self.bias: torch.Tensor | None = None

    def get(self, mask: torch.Tensor | None, length: int, group: int, device) -> torch.Tensor:
        if mask is None:  # transformers skipped the mask: plain causal
            mask = torch.ones(length, length, dtype=torch.bool, device=device).tril_().view(1, 1, length, length)
        elif mask is self.mask and group == self.group:
            return self.bias
        # finite, so a fully masked (padding) row gives finite garbage instead of NaN; it carries no loss
        bias = torch.zeros(mask.shape, dtype=torch.float32, device=device).masked_fill_(~mask, torch.finfo(torch.float32).min)
        bias = bias.repeat(1, 1, group, 1) if group > 1 else bias  # rows follow the stacked query heads
        self.mask, self.group, self.bias = mask, group, bias
        return bias


_bias = _Bias()
_enabled = [True]


def attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, **kwargs):
    length = query.shape[2]
    plain = (
        not _enabled[0]
        or not torch.is_grad_enabled()
        or dropout > 0
        or length > SHORT_ATTENTION_MAX_LEN
        or key.shape[2] != length
        or query.shape[1] % key.shape[1] != 0
        or (is_causal is False)
        or (attention_mask is not None and (attention_mask.dtype != torch.bool or attention_mask.shape[1] != 1))
        or any(kwargs.get(name) is not None for name in ("softcap", "position_bias", "s_aux", "sinks"))
    )
    if plain or not getattr(module, "is_causal", True) and attention_mask is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    bias = _bias.get(attention_mask, length, query.shape[1] // key.shape[1], query.device)
    return AttentionFunction.apply(query, key, value, bias, scale), None


def install(model) -> str | None:
    """Point `model` (and its sub-configs) at this attention; returns the implementation it
    replaced, or None when the model does not use SDPA."""
    config = model.config
    previous = getattr(config, "_attn_implementation", None)
    if previous != "sdpa":
        return None
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    _set_implementation(model, NAME)
    return previous


def uninstall(model, previous: str) -> None:
    _set_implementation(model, previous)
    _bias.__init__()


def set_enabled(enabled: bool) -> None:
    _enabled[0] = enabled


def _set_implementation(model, name: str) -> None:
    seen = set()
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and id(config) not in seen and hasattr(config, "_attn_implementation"):
            seen.add(id(config))
            config._attn_implementation = name
