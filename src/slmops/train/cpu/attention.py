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
is registered through transformers' AttentionInterface under NAME (compat.py), and finds
its state (on or off, the caches one forward shares) on the attention module: nothing here
is process-wide but that registration.

Llama-style attention modules (q/k/v/o projections, rotary position embedding, nothing
else: Llama, SmolLM2, Qwen2, Mistral) go one step further (`install_modules`): their
forward runs RotaryAttentionFunction, which also applies the rotary embedding and the
head reshapes inside the function — from the projections' (B, T, heads * D) outputs to
o_proj's input — instead of a dozen recorded ops (rotate_half's slices, negation and
concatenation, the transposes) and their backward nodes.

Padding-free batches (packing.py's Packing) of such modules: short ones run the fused function in the
padded layout (PADDED_ATTENTION: bf16); longer ones, and short ones where the products are fp32
(FP32_ALONE), run each sequence's causal attention alone (`_alone_packed`) with no
mask — all of them in one PackedAttentionFunction (a C kernel: bf16 on AMX tiles or AVX512-BF16
dot products, fp32 on AVX2 + FMA) where the CPU has the model's dtype's kernel, else through SDPA's
flash kernel sequence by sequence — so attention does no work on padding or above the diagonal, and
keeps O(T) memory for the backward."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slmops.train.cpu import compat
from slmops.train.cpu.kernels import Kernels
from slmops.train.cpu import packing as batch_packing
from slmops.train.cpu.packing import Packing
from slmops.train.cpu.patches import Patches

NAME = "slmops_cpu_training"


def _bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for (B, H, ., .) tensors as one bmm over B * H: torch.matmul on 4-D operands adds
    expand and reshape ops (and their dispatch) to each of the six products per layer."""
    return torch.bmm(a.flatten(0, 1), b.flatten(0, 1)).view(*a.shape[:2], a.shape[2], b.shape[3])


class AttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bias, scale: float):
        # Autocast off inside: under bf16 autocast bmm would round the scores to bf16 and the
        # backward (which autocast does not reach) would meet bf16 probabilities with fp32 operands
        with torch.autocast(q.device.type, enabled=False):
            return AttentionFunction._forward(ctx, q, k, v, bias, scale)

    @staticmethod
    def _forward(ctx, q, k, v, bias, scale: float):
        batch, heads, length, dim = q.shape
        kv_heads = k.shape[1]
        group = heads // kv_heads
        # (B, Hkv, group*T, D): the query heads of one key/value head, stacked along T
        compute = q.dtype if q.dtype in (torch.float32, torch.float64) else torch.float32
        qf = q.to(compute).reshape(batch, kv_heads, group * length, dim)
        kf, vf = k.to(compute), v.to(compute)
        scores = _bmm(qf, kf.transpose(-1, -2)).mul_(scale)
        if bias is not None:
            scores.add_(bias.to(compute))
        probs = torch.softmax(scores, dim=-1)
        out = _bmm(probs, vf).view(batch, heads, length, -1)
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
        d_v = _bmm(probs.transpose(-1, -2), d_out)
        d_probs = _bmm(d_out, vf.transpose(-1, -2))
        d_scores = compat.softmax_backward(d_probs, probs, -1).mul_(ctx.scale)
        d_q = _bmm(d_scores, kf).view(batch, heads, length, dim)
        d_k = _bmm(d_scores.transpose(-1, -2), qf)
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


class AttentionState:
    """One fast path's attention state, shared by the attention modules of its model (each
    points at it): whether the path is on, and the caches one forward shares across layers."""

    def __init__(self):
        self.enabled = True
        self.bias = _Bias()
        self.rope = _Rope()


def attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, **kwargs):
    """Registered as NAME in transformers' AttentionInterface: short training batches of a
    model whose fast path is on run AttentionFunction; everything else transformers' SDPA."""
    state: AttentionState | None = getattr(module, "_slmops_attention", None)
    length = query.shape[2]
    plain = (
        state is None
        or not state.enabled
        or not torch.is_grad_enabled()
        or dropout > 0
        or length > batch_packing.SHORT_ATTENTION_MAX_LEN
        or key.shape[2] != length
        or query.shape[1] % key.shape[1] != 0
        or (is_causal is False)
        or (attention_mask is not None and (attention_mask.dtype != torch.bool or attention_mask.shape[1] != 1))
        or any(kwargs.get(name) is not None for name in ("softcap", "position_bias", "s_aux", "sinks"))
    )
    if plain or not getattr(module, "is_causal", True) and attention_mask is None:
        return compat.sdpa_attention_forward()(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                               is_causal=is_causal, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    bias = state.bias.get(attention_mask, length, query.shape[1] // key.shape[1], query.device)
    return AttentionFunction.apply(query, key, value, bias, scale), None


def _swap_halves_add(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """out += x with the two halves of its last dimension swapped (rotate_half's permutation)."""
    half = x.shape[-1] // 2
    out[..., :half].add_(x[..., half:])
    out[..., half:].add_(x[..., :half])
    return out


def _rope(x: torch.Tensor, cos: torch.Tensor, sin_swapped: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, given sin_swapped = (sin, -sin) on the two halves:
    rotate_half(x) * sin = swap(x * sin_swapped), swap exchanging the halves. The transpose
    (for the backward) is _rope(g, cos, -sin_swapped): swap is its own inverse."""
    return _swap_halves_add(x * cos, x * sin_swapped)


def _dense(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, T, heads, D) x, possibly permuted in memory, as a contiguous (B, T, heads * D) in dtype: one copy."""
    return torch.empty(x.shape, dtype=dtype, device=x.device).copy_(x).view(*x.shape[:2], -1)


class RotaryAttentionFunction(torch.autograd.Function):
    """softmax(rope(q) rope(k)^T * scale + bias) v from q (B, T, H*D), k and v (B, T, Hkv*D),
    returned as (B, T, H*D) in q's dtype, computed in fp32. cos and sin_swapped (B, T, D) fp32
    are shared by all layers (see _Rope); the scale is folded into q's rotation."""

    @staticmethod
    def forward(ctx, q, k, v, cos, sin_swapped, bias, scale: float, heads: int, kv_heads: int, kernels: Kernels | None = None):
        with torch.autocast(q.device.type, enabled=False):  # full fine-tuning runs under bf16 autocast: keep fp32 here
            return RotaryAttentionFunction._forward(ctx, q, k, v, cos, sin_swapped, bias, scale, heads, kv_heads, kernels)

    @staticmethod
    def _forward(ctx, q, k, v, cos, sin_swapped, bias, scale, heads, kv_heads, kernels):
        batch, length = q.shape[:2]
        dim = cos.shape[-1]
        group = heads // kv_heads
        compute = cos.dtype  # fp32 (fp64 in tests)
        # the C kernels rotate, transpose and convert in one pass each (cpu_kernels.c)
        kernels = kernels if (kernels is not None and compute == torch.float32 and cos.is_contiguous() and sin_swapped.is_contiguous()
                              and all(Kernels.rows_strided(t) and t.dtype == q.dtype for t in (q, k, v))) else None
        # rope(q) * scale as (B, Hkv, group*T, D): the query heads of one key/value head stacked along T
        if kernels is not None:
            q_stack = kernels.rope_heads_first(q, cos, sin_swapped, heads, scale).view(batch, kv_heads, group * length, dim)
            k_rot = kernels.rope_heads_first(k, cos, sin_swapped, kv_heads)  # (B, Hkv, T, D)
            v_heads = kernels.rope_heads_first(v, None, None, kv_heads)
        else:
            cos4, sin4 = cos[:, :, None, :], sin_swapped[:, :, None, :]  # broadcast over heads
            q_rot = _rope(q.view(batch, length, heads, dim).to(compute), cos4 * scale, sin4 * scale)
            q_stack = q_rot.view(batch, length, kv_heads, group, dim).permute(0, 2, 3, 1, 4).reshape(batch, kv_heads, group * length, dim)
            k_rot = _rope(k.view(batch, length, kv_heads, dim).to(compute), cos4, sin4).transpose(1, 2)  # (B, Hkv, T, D) view
            v_heads = torch.empty(batch, kv_heads, length, dim, dtype=compute, device=v.device).copy_(v.view(batch, length, kv_heads, dim).transpose(1, 2))
        scores = _bmm(q_stack, k_rot.transpose(-1, -2))
        if bias is not None:
            scores.add_(bias.to(compute))
        probs = torch.softmax(scores, dim=-1)
        out = _bmm(probs, v_heads)  # (B, Hkv, group*T, D)
        ctx.save_for_backward(q_stack, k_rot, v_heads, probs, cos, sin_swapped)
        ctx.scale, ctx.dims, ctx.dtype, ctx.kernels = scale, (batch, length, heads, kv_heads, dim), q.dtype, kernels
        if kernels is not None:
            return kernels.rope_tokens_first(out.view(batch, heads, length, dim), None, None, q.dtype)
        result = torch.empty(batch, length, kv_heads, group, dim, dtype=q.dtype, device=q.device)
        result.copy_(out.view(batch, kv_heads, group, length, dim).permute(0, 3, 1, 2, 4))
        return result.view(batch, length, heads * dim)

    @staticmethod
    def backward(ctx, grad):
        with torch.autocast(grad.device.type, enabled=False):
            return RotaryAttentionFunction._backward(ctx, grad)

    @staticmethod
    def _backward(ctx, grad):
        q_stack, k_rot, v_heads, probs, cos, sin_swapped = ctx.saved_tensors
        batch, length, heads, kv_heads, dim = ctx.dims
        group = heads // kv_heads
        kernels, dtype = ctx.kernels, ctx.dtype
        if kernels is not None and not (Kernels.rows_strided(grad) and grad.dtype == dtype):
            grad = grad.contiguous().to(dtype)
        if kernels is not None:
            d_out = kernels.rope_heads_first(grad, None, None, heads).view(batch, kv_heads, group * length, dim)
        else:
            d_out = torch.empty(batch, kv_heads, group, length, dim, dtype=probs.dtype, device=grad.device)
            d_out.copy_(grad.view(batch, length, kv_heads, group, dim).permute(0, 2, 3, 1, 4))
            d_out = d_out.view(batch, kv_heads, group * length, dim)
        d_v = _bmm(probs.transpose(-1, -2), d_out)  # (B, Hkv, T, D)
        d_scores = compat.softmax_backward(_bmm(d_out, v_heads.transpose(-1, -2)), probs, -1)
        d_q_stack = _bmm(d_scores, k_rot)  # (B, Hkv, group*T, D)
        d_k_rot = _bmm(d_scores.transpose(-1, -2), q_stack)  # (B, Hkv, T, D)
        # back through the rotations (and q's scale), into (B, T, heads * D)
        if kernels is not None:
            d_q = kernels.rope_tokens_first(d_q_stack.view(batch, heads, length, dim), cos, sin_swapped, dtype, ctx.scale)
            d_k = kernels.rope_tokens_first(d_k_rot, cos, sin_swapped, dtype)
            d_v = kernels.rope_tokens_first(d_v, None, None, dtype)
            return d_q, d_k, d_v, None, None, None, None, None, None, None
        cos4, sin4 = cos[:, :, None, :], sin_swapped[:, :, None, :]
        d_q = d_q_stack.view(batch, kv_heads, group, length, dim).permute(0, 3, 1, 2, 4).reshape(batch, length, heads, dim)
        d_q = _rope(d_q, cos4 * ctx.scale, -sin4 * ctx.scale)
        d_k = _rope(d_k_rot.transpose(1, 2), cos4, -sin4)
        d_v = d_v.transpose(1, 2)
        return _dense(d_q, dtype), _dense(d_k, dtype), _dense(d_v, dtype), None, None, None, None, None, None, None


class _Rope:
    """cos and sin_swapped (see _rope) in fp32 for one forward's position embeddings, shared by
    all layers (they receive the same tensors)."""

    def __init__(self):
        self.key: torch.Tensor | None = None
        self.value: tuple[torch.Tensor, torch.Tensor] | None = None

    def get(self, cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin_swapped) in `dtype` (default fp32, fp64 for fp64 embeddings)."""
        compute = dtype or (torch.float64 if cos.dtype == torch.float64 else torch.float32)
        if cos is not self.key or self.value[0].dtype != compute:
            sin_swapped = sin.to(compute, copy=True)
            sin_swapped[..., sin.shape[-1] // 2 :].neg_()
            self.key, self.value = cos, (cos.to(compute), sin_swapped)
        return self.value


_CACHE_ARGS = ("cache", "past_key_values", "past_key_value")


def _module_forward(module, own_forward, hidden_states, position_embeddings=None, attention_mask=None, *args, **kwargs):
    """A Llama-style attention module's forward on RotaryAttentionFunction, where it applies."""
    state: AttentionState = module._slmops_attention
    packing: Packing | None = kwargs.pop("slmops_packing", None)
    alone = packing is not None and packing.alone
    # a short packed batch on the fused function uses its own padded-layout mask; transformers' (1, 1, N, N)
    # one is for the fallback
    mask = None if alone else packing.mask if packing is not None else attention_mask
    length = packing.length if packing is not None else (hidden_states.shape[1] if hidden_states.dim() == 3 else 0)
    plain = (
        args
        or not state.enabled
        or not torch.is_grad_enabled()
        or position_embeddings is None
        or any(kwargs.get(name) is not None for name in _CACHE_ARGS)
        or (module.training and module.attention_dropout > 0)
        or not (0 < length <= batch_packing.SHORT_ATTENTION_MAX_LEN or alone)
        or (mask is not None and (mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1))
    )
    if plain:  # a packed batch is right here too: its block mask keeps its sequences apart
        if alone:  # (transformers was handed packing.skip_mask and built none)
            attention_mask = packing.block_mask
        return own_forward(hidden_states, position_embeddings, attention_mask, *args, **kwargs)
    if alone:
        return _alone_packed(module, hidden_states, position_embeddings, packing, state.rope, module._slmops_kernels), None
    return _fused(module, hidden_states, position_embeddings, mask, length, module._slmops_kernels, state.rope, state.bias,
                  packing), None


def _fused(module, hidden_states, position_embeddings, mask, length: int, kernels: Kernels | None, rope: _Rope, biases: _Bias,
           packing: Packing | None = None) -> torch.Tensor:
    """o_proj(attention) of a Llama-style module on RotaryAttentionFunction."""
    q, k, v = module.q_proj(hidden_states), module.k_proj(hidden_states), module.v_proj(hidden_states)
    if packing is not None:
        q, k, v = packing.pad(q), packing.pad(k), packing.pad(v)
        position_embeddings = packing.padded_rope(*position_embeddings)
    cos, sin_swapped = rope.get(*position_embeddings)
    heads, kv_heads = q.shape[-1] // module.head_dim, k.shape[-1] // module.head_dim
    bias = biases.get(mask, length, heads // kv_heads, hidden_states.device)
    out = RotaryAttentionFunction.apply(q, k, v, cos, sin_swapped, bias, module.scaling, heads, kv_heads, kernels)
    return module.o_proj(packing.pack(out) if packing is not None else out)


def _alone_packed(module, hidden_states: torch.Tensor, position_embeddings, packing: Packing, rope: _Rope,
                  kernels: Kernels | None = None) -> torch.Tensor:
    """o_proj(attention) of a Llama-style module on a packed batch whose sequences attend alone
    (Packing.alone: longer than the fused function takes, or short under FP32_ALONE): hidden_states
    (1, rows, F) and position embeddings (1, rows, D) are in the packed layout already, so q, k and v are rotated there, and each example's causal attention
    runs alone, with no mask: all sequences in one call of PackedAttentionFunction where the CPU
    has the kernel for the projections' dtype (bf16: AMX tiles or AVX512-BF16, head size a multiple
    of 32; fp32: AVX2 + FMA, a multiple of 16), else one SDPA call (flash on a CPU) per sequence
    with is_causal. The rows past the real tokens attend nothing (zeros: no loss reads
    them). In the projections' dtype, as the model's own SDPA forward computes it."""
    rows, dim = hidden_states.shape[1], module.head_dim
    q = module.q_proj(hidden_states).view(rows, -1, dim)
    k = module.k_proj(hidden_states).view(rows, -1, dim)
    v = module.v_proj(hidden_states).view(rows, -1, dim)
    if kernels is not None and q.dtype in (torch.bfloat16, torch.float32):  # one C pass each way (RopeRowsFunction)
        cos, sin_swapped = (t[0] for t in rope.get(*position_embeddings))  # (rows, D) fp32
        q, k = RopeRowsFunction.apply(q, cos, sin_swapped, kernels), RopeRowsFunction.apply(k, cos, sin_swapped, kernels)
    else:
        cos, sin_swapped = (t[0, :, None, :] for t in rope.get(*position_embeddings, q.dtype))  # (rows, 1, D): shared by the heads
        q, k = _rope(q, cos, sin_swapped), _rope(k, cos, sin_swapped)
    heads, kv_heads = q.shape[1], k.shape[1]
    if kernels is not None and (kernels.packed_attention or kernels.packed_attention_f32):
        tokens = packing.tokens
        q_real, k_real, v_real = q[:tokens], k[:tokens], v[:tokens].contiguous()  # (v: a view of the projection's output)
        if kernels.packed_attention_takes(q_real, k_real, v_real):
            if packing.prefix:
                out = SharedPrefixAttentionFunction.apply(q_real, k_real, v_real, packing.offsets, packing.prefix, module.scaling,
                                                          kernels)
            else:
                out = PackedAttentionFunction.apply(q_real, k_real, v_real, packing.offsets, module.scaling, kernels)
            if rows > tokens:  # (a copy, which o_proj keeps for its backward beside the kernel's own: only where rows round up)
                out = torch.cat([out, q.new_zeros(rows - tokens, heads, dim)])
            return module.o_proj(out.view(1, rows, heads * dim))
    # split, not slicing: its backward concatenates the pieces instead of adding full-size zeros per piece
    sizes = packing.lengths  # the real tokens; the rows after them are left out
    outputs = []
    prefix_k, prefix_v = k[: packing.prefix], v[: packing.prefix]
    pieces = zip(q[: packing.tokens].split(sizes), k[: packing.tokens].split(sizes), v[: packing.tokens].split(sizes))
    for i, (q_i, k_i, v_i) in enumerate(pieces):
        mask = None
        if packing.prefix and i > 0:  # the shared prefix's keys first, all seen; then its own, causally
            k_i, v_i = torch.cat([prefix_k, k_i]), torch.cat([prefix_v, v_i])
            mask = torch.arange(len(k_i), device=q.device)[None] <= packing.prefix + torch.arange(len(q_i), device=q.device)[:, None]
        out = F.scaled_dot_product_attention(q_i.transpose(0, 1)[None], k_i.transpose(0, 1)[None], v_i.transpose(0, 1)[None],
                                             attn_mask=mask, is_causal=mask is None, scale=module.scaling, enable_gqa=heads != kv_heads)
        outputs.append(out[0].transpose(0, 1))  # (1, heads, L, D) -> (L, heads, D)
    outputs.append(q.new_zeros(rows - packing.tokens, heads, dim))
    return module.o_proj(torch.cat(outputs).view(1, rows, heads * dim))


class RopeRowsFunction(torch.autograd.Function):
    """_rope on a packed batch's q or k (rows, heads, D), with cos and sin_swapped (rows, D) fp32,
    in one pass of the C kernel each way (kernels.rope_rows) instead of four PyTorch ops and
    their backward: ~36 ms a layer forward and backward for q on the long-document shape."""

    @staticmethod
    def forward(ctx, x, cos, sin_swapped, kernels: Kernels):
        ctx.save_for_backward(cos, sin_swapped)
        ctx.kernels = kernels
        return kernels.rope_rows(x, cos, sin_swapped)

    @staticmethod
    def backward(ctx, grad):
        cos, sin_swapped = ctx.saved_tensors
        return ctx.kernels.rope_rows(grad.contiguous(), cos, sin_swapped, inverse=True), None, None, None


class PackedAttentionFunction(torch.autograd.Function):
    """The causal attention of every sequence of a packed batch, each on its own, in one C call
    (packed_attention.c in bf16, packed_attention_f32.c in fp32): q (N, H, D), k and v (N, Hkv, D),
    sequence s in rows offsets[s] .. offsets[s + 1]; returns (N, H, D). It replaces one SDPA call
    per sequence, whose CPU flash backward ran at ~130 GFLOP/s on 2 cores in bf16 (AMX Xeon) and
    35-60 in fp32 (Zen 3 EPYC). `python benchmarks/packed_attention.py`: bf16 on the AMX Xeon, forward
    and backward 3.3-3.9x faster on the long-document shape, 4.2-5.0x on the 1B Llama's; without the
    tiles (AVX512-BF16 dot products, against SDPA with oneDNN held to AVX512-BF16 as on an AMD EPYC)
    1.9x and 2.1x; fp32 on an AVX2-only Zen 3 EPYC, 1.7-2.4x and 1.6-2.3x.
    Saves q, k, v, the output and each row's log-sum-exp, as flash attention does."""

    @staticmethod
    def forward(ctx, q, k, v, offsets: torch.Tensor, scale: float, kernels: Kernels):
        out, lse = kernels.packed_attention_forward(q, k, v, offsets, scale)
        ctx.save_for_backward(q, k, v, out, lse, offsets)
        ctx.scale, ctx.kernels = scale, kernels
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse, offsets = ctx.saved_tensors
        grad = grad.to(q.dtype).contiguous()
        return (*ctx.kernels.packed_attention_backward(grad, q, k, v, out, lse, offsets, ctx.scale), None, None, None)


def _stack_heads(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(N, H, ...) rows of query heads -> (Hkv, group * N, ...) fp32: the query heads of one key/value
    head stacked along the rows (head h = g * group + i belongs to key/value head g)."""
    rows, heads = x.shape[:2]
    group = heads // kv_heads
    return x.float().reshape(rows, kv_heads, group, -1).permute(1, 2, 0, 3).reshape(kv_heads, group * rows, -1)


def _unstack_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """_stack_heads' inverse: (Hkv, group * N, F) -> (N, H, F)."""
    kv_heads, stacked, features = x.shape
    rows = stacked // (heads // kv_heads)
    return x.view(kv_heads, heads // kv_heads, rows, features).permute(2, 0, 1, 3).reshape(rows, heads, features)


class SharedPrefixAttentionFunction(torch.autograd.Function):
    """PackedAttentionFunction for a batch packed with a shared prefix (Packing.prefix): sequence 0
    (rows offsets[0] .. offsets[1]) is the first example whole, its first `prefix` rows the prefix every
    example shares; the sequences after it are the other examples' own tokens, which attend to those
    prefix rows too, and the prefix's keys and values gather every example's gradient.

    The fp32 kernel does it all itself: each later sequence's keys are the prefix's, then its own
    (packed_attention_f32.c). With the bf16 kernel, which attends each sequence to itself only, the
    prefix's part is added here: the kernel computes each sequence's causal attention to itself, with
    each row's log-sum-exp; the later sequences' attention to the prefix is one dense product (each of
    their rows sees every prefix key), and the two parts merge by their log-sum-exps, as flash
    attention merges key blocks. The backward is then the kernel's with the merged output and
    log-sum-exp (exact for its own keys, as for one key block of flash attention's backward), plus
    the prefix part's, in fp32. (The merge in PyTorch operators cost ~2 ms a layer, forward and
    backward, on the tone batch's shape: ~6% of a LoRA step in fp32, where the kernel's own prefix
    costs nothing measurable.)"""

    @staticmethod
    def forward(ctx, q, k, v, offsets: torch.Tensor, prefix: int, scale: float, kernels: Kernels):
        ctx.prefix, ctx.scale, ctx.kernels = prefix, scale, kernels
        if kernels.takes_shared_prefix(q):  # the kernel's keys include the prefix's: nothing to merge
            out, lse = kernels.packed_attention_forward(q, k, v, offsets, scale, prefix)
            ctx.save_for_backward(q, k, v, out, lse, offsets)
            return out
        heads, kv_heads = q.shape[1], k.shape[1]
        out, lse = kernels.packed_attention_forward(q, k, v, offsets, scale)
        start = int(offsets[1])
        scores = torch.bmm(_stack_heads(q[start:], kv_heads), _stack_heads(k[:prefix], kv_heads).transpose(1, 2)).mul_(scale)
        lse_prefix = torch.logsumexp(scores, -1)  # (Hkv, group * Ns)
        out_prefix = torch.bmm(scores.sub_(lse_prefix[..., None]).exp_(), _stack_heads(v[:prefix], kv_heads))
        lse_own = _stack_heads(lse[start:, :, None], kv_heads)[..., 0]
        merged_lse = torch.logaddexp(lse_own, lse_prefix)
        merged = (_stack_heads(out[start:], kv_heads).mul_((lse_own - merged_lse).exp_()[..., None])
                  .add_(out_prefix.mul_((lse_prefix - merged_lse).exp_()[..., None])))
        out[start:] = _unstack_heads(merged, heads).to(out.dtype)
        lse[start:] = _unstack_heads(merged_lse[..., None], heads)[..., 0]
        ctx.save_for_backward(q, k, v, out, lse, offsets)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse, offsets = ctx.saved_tensors
        prefix, scale = ctx.prefix, ctx.scale
        heads, kv_heads = q.shape[1], k.shape[1]
        grad = grad.to(q.dtype).contiguous()
        if ctx.kernels.takes_shared_prefix(q):
            return (*ctx.kernels.packed_attention_backward(grad, q, k, v, out, lse, offsets, scale, prefix), None, None, None, None)
        d_q, d_k, d_v = ctx.kernels.packed_attention_backward(grad, q, k, v, out, lse, offsets, scale)
        start = int(offsets[1])
        q_s, k_p, v_p = _stack_heads(q[start:], kv_heads), _stack_heads(k[:prefix], kv_heads), _stack_heads(v[:prefix], kv_heads)
        d_out = _stack_heads(grad[start:], kv_heads)
        # P = exp(scores - merged lse); dS = P (dP - rowsum(dO * O)), as the kernel computes it for its keys
        probs = torch.bmm(q_s, k_p.transpose(1, 2)).mul_(scale).sub_(_stack_heads(lse[start:, :, None], kv_heads)).exp_()
        row_dot = (d_out * _stack_heads(out[start:], kv_heads)).sum(-1, keepdim=True)
        d_scores = torch.bmm(d_out, v_p.transpose(1, 2)).sub_(row_dot).mul_(probs)
        d_q[start:] += _unstack_heads(torch.bmm(d_scores, k_p).mul_(scale), heads).to(d_q.dtype)
        d_k[:prefix] += torch.bmm(d_scores.transpose(1, 2), q_s).mul_(scale).transpose(0, 1).to(d_k.dtype)
        d_v[:prefix] += torch.bmm(probs.transpose(1, 2), d_out).transpose(0, 1).to(d_v.dtype)
        return d_q, d_k, d_v, None, None, None, None


def _looks_llama_style(module: nn.Module) -> bool:
    names = ("q_proj", "k_proj", "v_proj", "o_proj")
    return (all(isinstance(getattr(module, n, None), nn.Module) for n in names)
            and all(isinstance(getattr(module, a, None), (int, float)) for a in ("head_dim", "scaling", "attention_dropout"))
            and getattr(module, "is_causal", False) is True
            and not any(hasattr(module, a) for a in ("q_norm", "k_norm", "sinks", "rotary_fn"))
            and getattr(getattr(module, "config", None), "attn_logit_softcapping", None) is None)


@torch.no_grad()
def matches(module: nn.Module) -> bool:
    """True when `module` is a Llama-style attention whose own forward agrees with
    RotaryAttentionFunction on a random input (to the module dtype's precision)."""
    if not _looks_llama_style(module):
        return False
    weight = module.q_proj.weight if isinstance(getattr(module.q_proj, "weight", None), torch.Tensor) else None
    hidden = getattr(module.q_proj, "in_features", None)
    dtype = compat.compute_dtype(module.q_proj)  # (QLoRA's 4-bit q_proj: its compute dtype)
    if weight is None or not isinstance(hidden, int) or dtype is None:
        return False
    generator = torch.Generator().manual_seed(0)
    batch, length, dim = 2, 6, module.head_dim
    x = torch.randn(batch, length, hidden, generator=generator).to(weight.device, dtype)
    angles = torch.randn(batch, length, dim // 2, generator=generator) * 3
    cos = torch.cat([angles.cos()] * 2, -1).to(weight.device, dtype)
    sin = torch.cat([angles.sin()] * 2, -1).to(weight.device, dtype)
    mask = torch.ones(length, length, dtype=torch.bool, device=weight.device).tril_().expand(batch, 1, length, length)
    was_training = module.training
    module.eval()
    try:
        expected = module(x, (cos, sin), mask)[0]  # called before install_modules: the module's own forward
        ours = _fused(module, x, (cos, sin), mask, length, None, _Rope(), _Bias())
    except Exception:
        return False
    finally:
        module.train(was_training)
    if expected.shape != ours.shape:
        return False
    # Mean, not max: a bf16 module's own path rounds q, k and the rotation to bf16 (measured on
    # SmolLM2: max differences up to 4% of the largest output, mean 0.4-1%); a different
    # function (extra norms, soft-capping, another rotation) is off by the output's own size.
    error = float((expected.float() - ours.float()).abs().mean())
    return error <= 2e-2 * max(float(expected.float().abs().mean()), 1e-6)


def install_modules(patches: Patches, model, state: AttentionState, kernels: Kernels | None = None) -> list[nn.Module]:
    """Route the model's Llama-style attention modules through RotaryAttentionFunction (while
    `state.enabled`; on the C kernels where given); returns them. Call after install(): their
    fallback is the model's attention implementation, which install() made this module's."""
    installed = []
    for module in model.modules():
        if _looks_llama_style(module) and matches(module):
            patches.set_attr(module, "_slmops_kernels", kernels)
            patches.set_attr(module, "_slmops_attention", state)
            patches.replace_forward(module, _module_forward)
            installed.append(module)
    return installed


def install(patches: Patches, model, state: AttentionState) -> str | None:
    """Point `model` (and its sub-configs) at this attention, and its attention modules at
    `state`; returns the implementation it replaced, or None (nothing done) when the model
    does not use SDPA."""
    previous = compat.attention_implementation(model)
    if previous != "sdpa":
        return None
    compat.register_attention(NAME, attention_forward)
    for config in compat.model_configs(model):
        old = config._attn_implementation
        config._attn_implementation = NAME
        patches.on_undo(lambda config=config, old=old: setattr(config, "_attn_implementation", old))
    for module in model.modules():  # transformers' attention modules (LlamaAttention, Phi3Attention, ...)
        if type(module).__name__.endswith("Attention") and hasattr(module, "config"):
            patches.set_attr(module, "_slmops_attention", state)
    return previous
