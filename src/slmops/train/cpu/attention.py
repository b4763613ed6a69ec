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

Padding-free batches (Packing) of such modules: short ones run the fused function in the
padded layout (PADDED_ATTENTION: bf16); longer ones, and short ones where the products are fp32
(FP32_ALONE), run each sequence's causal attention alone (`_alone_packed`) with no
mask — all of them in one PackedAttentionFunction (a C kernel: bf16 on AMX tiles or AVX512-BF16
dot products, fp32 on AVX2 + FMA) where the CPU has the model's dtype's kernel, else through SDPA's
flash kernel sequence by sequence — so attention does no work on padding or above the diagonal, and
keeps O(T) memory for the backward."""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import nn

from slmops.data.batching import right_padded
from slmops.train.cpu import compat
from slmops.train.cpu.kernels import Kernels
from slmops.train.cpu.patches import Patches

NAME = "slmops_cpu_training"
SHORT_ATTENTION_MAX_LEN = 192  # tokens: probabilities kept for the backward are B*H*T*T floats


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
        or length > SHORT_ATTENTION_MAX_LEN
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


@dataclass(frozen=True)
class PackingPolicy:
    """When a short batch (up to SHORT_ATTENTION_MAX_LEN tokens) trains padding-free, and how.
    Long batches always pack; their attention always runs per sequence in the packed layout.

    row_multiple: packed rows are rounded up to this.
    pack_below: pack a short batch when its packed rows are fewer than this fraction of B * T.
    short_alone: a short packed batch's attention also runs per sequence in the packed layout
    (the packed attention kernel), instead of going back to the padded layout for the fused
    function around each layer's attention.
    share_prefix: a batch whose examples all begin with the same SHARED_PREFIX_MIN or more tokens
    that no loss reads (a chat template's system prompt, an instruction template) packs that
    prefix once (Packing.prefix), whatever its padding; its attention runs per sequence."""

    row_multiple: int
    pack_below: float
    short_alone: bool
    share_prefix: bool = False

    def unshared(self) -> PackingPolicy:
        """This policy with every example packed whole."""
        return dataclasses.replace(self, share_prefix=False)

    def describe(self) -> str:
        shared = "; a prefix all of a batch's examples share (no loss on it) computed once" if self.share_prefix else ""
        if self.short_alone:
            return ("every batch with padding, and all batches over %d tokens, each sequence's attention alone" % SHORT_ATTENTION_MAX_LEN
                    + shared)
        return f"short ones where padding is over {100 * (1 - self.pack_below):.0f}%, all batches over {SHORT_ATTENTION_MAX_LEN} tokens" + shared


# Measured with bf16 products on AMX (SmolLM2-135M, tone data, batch 8 x ~49 tokens, 6% padding):
# oneDNN's AMX matmuls run 15-23% slower per row at 370 or 376 rows than at 384, so rows are
# rounded to 16; the scatter and gather around each layer's fused attention cost ~4% of a step,
# and packing measured 0.98x, so short batches with less than 10% padding stay padded.
PADDED_ATTENTION = PackingPolicy(row_multiple=16, pack_below=0.9, short_alone=False)
# fp32 products (CPUs without fast bf16), where the fp32 packed attention kernel is built: a row
# of the step costs ~6x what it does on AMX, MKL's fp32 products show no preference for any row
# count (368-400 rows, 2026-12-06, Zen 3), and a short batch's attention runs per sequence in the
# kernel, so no scatter or gather around it. Every batch with padding packs, to exactly its
# real tokens. On the tone data (6.7% padding), alternating steps in one process on the Zen 3
# EPYC: LoRA 1.04x, full fine-tuning 1.05x against PADDED_ATTENTION (which gave 1.015x there
# with every batch packed).
# Batches whose examples share a prefix compute it once (share_prefix): on the tone data, with the chat
# template's 24-token system prompt in 47-token examples, ~45% fewer rows for every projection.
FP32_ALONE = PackingPolicy(row_multiple=1, pack_below=1.0, short_alone=True, share_prefix=True)
# PADDED_ATTENTION with shared prefixes: not yet measured where the products are bf16 (AMX, AVX512-BF16),
# so not any machine's policy; `python benchmarks/packing_policy.py --policies
# PADDED_ATTENTION_SHARED_PREFIX,PADDED_ATTENTION` measures it there.
PADDED_ATTENTION_SHARED_PREFIX = dataclasses.replace(PADDED_ATTENTION, share_prefix=True)
# Shared prefixes are computed once from this many tokens: below it the rows saved are few (a chat
# template's "<|im_start|>user" alone is 2-3 tokens).
SHARED_PREFIX_MIN = 4


def shareable_prefix(input_ids: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor) -> int:
    """How many leading tokens every example of a right-padded (B, T) batch has in common and no
    loss reads: position t predicts labels[:, t + 1], so positions 0 .. P-1 need labels 1 .. P
    ignored; each example keeps at least one token of its own. 0 for a single example."""
    from slmops.data.tokenize import IGNORE

    if input_ids.shape[0] < 2:
        return 0
    agree = ((input_ids == input_ids[:1]) & valid).all(0)  # columns where every example has the same real token
    common = int(agree.int().cumprod(0).sum())
    labelled = (labels[:, 1:] != IGNORE).any(0)  # column t: does any example's position t carry a loss
    first_loss = int(labelled.int().argmax()) if bool(labelled.any()) else labels.shape[1]
    return max(0, min(common, first_loss, int(valid.sum(1).min()) - 1))


def _rounded_rows(tokens: int, multiple: int) -> int:
    return -(-tokens // multiple) * multiple


class Packing:
    """A right-padded (B, T) batch packed to its N real tokens, (1, rows), for padding-free
    training: every token-wise op (projections, MLP, norms) runs on `rows` rows instead of
    B * T, and only attention, inside the fused function, sees the padded layout again (so no
    example attends to another). Passed to the attention modules as the `slmops_packing`
    keyword, which transformers hands down to every decoder layer.

    `rows` is N rounded up to the policy's row_multiple. The extra rows repeat the first token; they carry
    no loss and no attention reads them, so they get exactly zero gradient and change nothing.

    With a shared `prefix` (P > 0: every example begins with the same P tokens, none of which a loss
    reads), those tokens are packed once: the first example whole, then each other example from
    its token P on (its own positions, P and up). Each of those attends to the first example's first
    P rows as to its own prefix (SharedPrefixAttentionFunction), and the prefix's keys and values
    gather the gradients of every example: the same loss and gradients as B separate copies, with
    (B - 1) * P rows fewer through every layer. Such a batch's attention always runs per sequence
    (`alone`). With dropout, the prefix's rows draw one mask for all the examples."""

    def __init__(self, attention_mask: torch.Tensor, policy: PackingPolicy = PADDED_ATTENTION, prefix: int = 0):
        valid = attention_mask.bool()
        self.batch, self.length = valid.shape
        self.policy = policy
        self.prefix = prefix
        kept = valid.clone()
        kept[1:, :prefix] = False  # the other examples' copies of the shared prefix
        self.index = kept.reshape(-1).nonzero().squeeze(1)  # (N,) flat positions in the (B * T) padded layout
        self.tokens = len(self.index)
        self.rows = _rounded_rows(self.tokens, policy.row_multiple)
        self.rows_index = torch.cat([self.index, self.index[:1].expand(self.rows - self.tokens)])
        self.lengths = kept.sum(1).tolist()  # each example's packed tokens, in packed order
        self._valid = valid
        # the rows the loss reads, where the last layer's MLP need not run on the rest (last_layer.py;
        # set by loss._packed), else None
        self.loss_rows: torch.Tensor | None = None
        self._rope_key: torch.Tensor | None = None
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None

    @cached_property
    def mask(self) -> torch.Tensor:
        """(B, 1, T, T) bool, causal over each example's real keys: the fused function's mask
        (short batches; long ones need none)."""
        causal = torch.ones(self.length, self.length, dtype=torch.bool, device=self._valid.device).tril_()
        return causal[None, None] & self._valid[:, None, None, :]

    @cached_property
    def skip_mask(self) -> torch.Tensor:
        """The stand-in for transformers' mask of a batch whose sequences attend alone, passed as the
        decoder's attention_mask (loss._packed): transformers returns a 4D mask as it is given, so it skips building the
        (1, 1, rows, rows) one that only a layer falling back to the model's own attention would
        read (1.8% of a codes step, ~150 MB at 12k tokens); such a layer reads `block_mask`
        instead (_module_forward). Expanded from one element: no memory."""
        return torch.ones(1, 1, 1, 1, dtype=torch.bool, device=self.index.device).expand(1, 1, self.rows, self.rows)

    @cached_property
    def block_mask(self) -> torch.Tensor:
        """(1, 1, rows, rows) bool, as transformers builds it from the packed position ids: each
        token sees its own example's tokens up to itself (and the shared prefix's rows, which come
        first), each extra row only itself."""
        device = self.index.device
        sequence = torch.cat([torch.arange(self.batch, device=device).repeat_interleave(torch.tensor(self.lengths, device=device)),
                              torch.arange(self.batch, self.batch + self.rows - self.tokens, device=device)])
        causal = torch.ones(self.rows, self.rows, dtype=torch.bool, device=device).tril_()
        seen = sequence[:, None] == sequence[None, :]
        if self.prefix:
            seen |= (sequence < self.batch)[:, None] & (torch.arange(self.rows, device=device) < self.prefix)[None, :]
        return (causal & seen)[None, None]

    @cached_property
    def offsets(self) -> torch.Tensor:
        """(B + 1,) int64: example i's tokens are packed rows offsets[i] .. offsets[i + 1]."""
        return torch.tensor([0, *itertools.accumulate(self.lengths)], dtype=torch.int64)

    @property
    def long(self) -> bool:
        """Longer than the fused function takes."""
        return self.length > SHORT_ATTENTION_MAX_LEN

    @property
    def alone(self) -> bool:
        """Each sequence's attention runs alone in the packed layout (_alone_packed): a long batch,
        a batch with a shared prefix, or any batch under a policy with short_alone."""
        return self.long or self.policy.short_alone or self.prefix > 0

    @staticmethod
    def of(attention_mask: torch.Tensor, only_if_it_pays: bool = True, policy: PackingPolicy = PADDED_ATTENTION,
           input_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> Packing | None:
        """The packing of a right-padded batch (with only_if_it_pays, a long one, one with
        enough padding to remove: the policy's pack_below, or one with a prefix to share), else
        None. Given input_ids and labels, a policy with share_prefix packs a shareable prefix
        (shareable_prefix) of SHARED_PREFIX_MIN tokens or more once."""
        if attention_mask.dim() != 2:
            return None
        valid = attention_mask.bool()
        lengths = valid.sum(1, keepdim=True)
        if not right_padded(valid) or int(lengths.min()) == 0:
            return None  # left padding or holes: positions would differ from the padded forward's
        prefix = shareable_prefix(input_ids, labels, valid) if policy.share_prefix and input_ids is not None else 0
        if prefix >= SHARED_PREFIX_MIN:
            return Packing(attention_mask, policy, prefix)
        if (only_if_it_pays and valid.shape[1] <= SHORT_ATTENTION_MAX_LEN
                and _rounded_rows(int(lengths.sum()), policy.row_multiple) >= policy.pack_below * valid.numel()):
            return None  # short, and little padding to remove
        return Packing(attention_mask, policy)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, ...) -> (1, rows, ...): the real tokens in order, then the extra rows."""
        return x.reshape(self.batch * self.length, *x.shape[2:]).index_select(0, self.rows_index)[None]

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """(1, rows, F) -> (B, T, F): the real tokens in place, zeros at the padding (differentiable)."""
        if self.prefix:
            raise ValueError("a batch packed with a shared prefix has no padded layout (its attention runs per sequence)")
        flat = x.new_zeros(self.batch * self.length, x.shape[-1]).index_copy(0, self.index, x[0, : self.tokens])
        return flat.view(self.batch, self.length, -1)

    def position_ids(self) -> torch.Tensor:
        positions = torch.arange(self.length, device=self.index.device).expand(self.batch, -1)
        return self.pack(positions)

    def padded_rope(self, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The packed batch's position embeddings (1, rows, D) in the padded layout; the same
        tensors for every layer of one forward (so the fp32 conversion is shared too)."""
        if cos is not self._rope_key:
            with torch.no_grad():
                self._rope_key, self._rope = cos, (self.pad(cos), self.pad(sin))
        return self._rope


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
        or not (0 < length <= SHORT_ATTENTION_MAX_LEN or alone)
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
