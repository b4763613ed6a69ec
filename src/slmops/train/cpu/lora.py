"""LoRA layers on the CPU fast path: groups of linear layers that read the same input run
as one autograd function (LinearGroupFunction), around PEFT's own modules.

Profiling a bf16 LoRA step of SmolLM2-135M on 2 cores with AMX (batch 8, ~48 tokens):
each decoder layer spends ~6 ms in matrix products and ~20 ms in total. The rest is
hundreds of small ops: PEFT's dropout masks (`bernoulli_`, a separate mask for q, k and
v over the same input), the mask multiplies (bf16 x bool takes a slow path), dtype casts
between the bf16 base and fp32 adapters, and one autograd node for each. Here:

- Linear layers that read the same input (q/k/v) form a group: their frozen base weights
  are stored as one concatenated matrix (the modules' own weights become views of it, so no
  memory is added) and the group runs as one autograd function: one base matmul forward and
  one backward, each member's LoRA term alongside.
- LoRA dropout stays what it is — a fresh Bernoulli(p) mask per adapter, per element, per
  step, scaled by 1 / (1 - p) — but it is drawn as the positions of the dropped elements
  (geometric gaps between them, exact for any p), about p * n numbers instead of n, from
  torch's generator (so gradient checkpointing replays it and a checkpoint resumes it).
  Zeroing those positions replaces the full-size mask multiply, forward and backward.
- The adapters compute in the activations' dtype (bf16 on the fast path) from their fp32
  master weights; their gradients are returned in fp32.

PEFT's modules, state dicts and saved adapters are untouched; a member whose adapter state
this path does not cover at call time (DoRA, several active adapters, merged or disabled
adapters, LoRA bias; compat.plain_lora_adapter) makes its group fall back to PEFT's forward."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from slmops.train.cpu import compat
from slmops.train.cpu import kernels as kernels_module
from slmops.train.cpu.patches import Patches
from slmops.train.cpu.quantized import FourBitGroupWeight

log = logging.getLogger("slmops")

def drop_positions(numel: int, p: float, device: torch.device | None = None,
                   kernels: kernels_module.Kernels | None = None) -> torch.Tensor:
    """Flat indices of the elements an i.i.d. Bernoulli(p) dropout zeroes, in increasing
    order. For small p, drawn as geometric gaps between drops (about p * numel draws
    instead of numel); the positions of successes in a Bernoulli sequence have exactly
    these gaps, so the distribution is that of `torch.nn.Dropout`. The uniforms are float32
    (as the dense draw's are): each gap's probabilities move by at most their resolution,
    2^-24. Every draw comes from torch's generator, so gradient checkpointing's replay and a
    resumed run see the same masks: with the C kernels, one 62-bit seed from it, from which
    the kernel computes the uniforms (splitmix64), the gaps and their running sum in one
    pass; without, torch.rand's uniforms."""
    if p <= 0:
        return torch.empty(0, dtype=torch.int64, device=device)
    if p > 0.25:  # few gaps to skip: plain per-element draws are cheaper
        return (torch.rand(numel, device=device) < p).nonzero().squeeze(1)
    log_keep = math.log1p(-p)
    on_cpu = device is None or torch.device(device).type == "cpu"
    seed = int(torch.randint(0, 2**62, ())) if kernels is not None and on_cpu else None
    chunks, end, first = [], -1, 0
    while end < numel - 1:
        expected = (numel - 1 - end) * p
        count = int(expected + 8 * math.sqrt(expected) + 32)
        if seed is not None:
            positions, more = kernels.drop_positions(seed, first, count, log_keep, end, numel)
            chunks.append(positions)
            if not more:  # all below numel already
                return torch.cat(chunks) if len(chunks) > 1 else positions
            end, first = int(positions[-1]), first + count
            continue
        # U in (0, 1]; floor(log U / log(1 - p)) ~ Geometric(p) on {0, 1, ...}: kept elements before the next drop
        uniform = torch.rand(count, device=device, dtype=torch.float32)
        gaps = (1.0 - uniform).log_().div_(log_keep).floor_().to(torch.int64).add_(1)
        positions = gaps.cumsum_(0).add_(end)
        chunks.append(positions)
        end = int(positions[-1])
    positions = torch.cat(chunks) if len(chunks) > 1 else chunks[0]
    return positions[: int(torch.searchsorted(positions, numel))]


@dataclass(frozen=True)
class _Spec:
    sizes: tuple[int, ...]  # output features per member
    members: tuple[int, ...]  # for each adapter, the index of its member in the group
    scales: tuple[float, ...]  # for each adapter, its LoRA scaling / (1 - p)
    rank: int  # rank of every adapter (a group's adapters share it)
    dropout: float  # p of every adapter this call (0 when not training)
    kernels: kernels_module.Kernels | None = None  # fused dropout copies / masked sums, where built
    packed_weight: kernels_module.PackedWeight | None = None  # the group's frozen base weight in AMX's layout, where packed


class LinearGroupFunction(torch.autograd.Function):
    """y_i = x W_i^T + b_i + s_i * dropout_p(x) A_i^T B_i^T for each member i of a group,
    with W the members' frozen weights concatenated (None: LoRA terms only, the base
    computed outside; a FourBitGroupWeight: QLoRA's 4-bit weights, dequantized for each product
    and not saved) and A_i, B_i fp32 master weights. Only the adapters' gradients and the
    input's are computed. The k adapters of a group are stacked: one draw of dropped
    positions over (k, n, in), one matmul for all A_i on the input itself with the dropped
    elements' terms taken back out by a C kernel (without the kernels: a batched matmul on
    k masked copies), one block-diagonal matmul for all B_i added onto the base output in
    place."""

    @staticmethod
    def forward(ctx, x, weight, bias, spec: _Spec, *lora):
        shape = x.shape
        four_bit = weight if isinstance(weight, FourBitGroupWeight) else None
        if four_bit is not None:
            weight = None  # (nothing of it saved for the backward: it dequantizes again there)
            dtype = four_bit.compute_dtype
        else:
            dtype = weight.dtype if weight is not None else x.dtype
        x2 = x.reshape(-1, shape[-1]).to(dtype).contiguous()
        n, total, k, r = x2.shape[0], sum(spec.sizes), len(spec.members), spec.rank
        offsets = [0]
        for size in spec.sizes:
            offsets.append(offsets[-1] + size)
        if spec.packed_weight is not None and x2.dtype == torch.bfloat16 and spec.kernels.amx_linear_pays(n):
            out = spec.kernels.amx_linear(x2, spec.packed_weight)
            if bias is not None:
                out.add_(bias)
        elif weight is not None:
            out = F.linear(x2, weight, bias)
        elif four_bit is not None:
            out = F.linear(x2, four_bit.product_matrix(dtype), bias)
        else:  # the LoRA terms only (the base computed outside)
            out = x2.new_zeros(n, total) if not k else None
        ctx.spec, ctx.offsets, ctx.shape, ctx.x_dtype, ctx.four_bit, ctx.dtype = spec, offsets, shape, x.dtype, four_bit, dtype
        if not k:
            ctx.save_for_backward(weight)
            outs = out.view(*shape[:-1], total)
            return tuple(outs.split(spec.sizes, -1)) if len(spec.sizes) > 1 else outs
        a_t = None  # A stacked and transposed, (in, k*r), for the dropout kernels
        if spec.kernels is not None and dtype == torch.bfloat16 and all(
                t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous() for t in lora):
            # the scales go into B: out += h (s B^T), and backward d_pre = g (s B^T)^T with no pass of their own
            a2, a_t, b_block = spec.kernels.lora_operands(lora[:k], lora[k:], list(spec.scales), [offsets[m] for m in spec.members],
                                                          total)
            a = a2.view(k, r, -1)  # (k, r, in)
            b_scaled = True
        else:
            b_scaled = False
            a = torch.stack(lora[:k]).to(dtype)
            if spec.members == tuple(range(len(spec.sizes))):  # one adapter per member, in order (q, k, v): B^T blocks on the diagonal
                b_block = lora[k].to(dtype).t() if k == 1 else torch.block_diag(*[b.t() for b in lora[k:]]).to(dtype)
            else:  # (k*r, total): adapter j's B^T in its rank rows and its member's columns
                b_block = x2.new_zeros(k * r, total)
                for j, member in enumerate(spec.members):
                    b_block[j * r : (j + 1) * r, offsets[member] : offsets[member + 1]] = lora[k + j].t()
        # one number when the adapters share their scale (the usual case): no per-call tensor
        scales = spec.scales[0] if len(set(spec.scales)) == 1 else torch.tensor(spec.scales, dtype=dtype).repeat_interleave(r)
        dropped = drop_positions(k * x2.numel(), spec.dropout, x2.device, spec.kernels) if spec.dropout > 0 else None
        # With the C kernels, the adapters' products run on x itself and the kernels take the dropped
        # elements' terms out (a_t saved then: the backward takes the same branch); without them,
        # products on k masked copies of x.
        products = _Products(spec.kernels, dtype, x2.shape, k * r)
        if dropped is None or (spec.kernels is not None and spec.kernels.supports(x2)):
            a2 = a.view(k * r, -1)
            h = products.mm(x2, a2.t())  # (n, k*r)
            if dropped is None:
                a_t = None
            else:  # take the dropped elements' terms back out
                a_t = a2.t().contiguous() if a_t is None else a_t
                spec.kernels.lora_drop_h(h, x2, a_t, dropped, k)
        else:
            h = torch.bmm(_dropped_copies(x2, k, dropped), a.transpose(1, 2)).transpose(0, 1).reshape(n, k * r)
        if not b_scaled:
            h.mul_(scales)
        out = products.add_mm(out, h, b_block)
        ctx.dropped, ctx.scales, ctx.b_scaled = dropped, scales, b_scaled
        ctx.save_for_backward(weight, x2, a, h, b_block, a_t)
        outs = out.view(*shape[:-1], total)
        return tuple(outs.split(spec.sizes, -1)) if len(spec.sizes) > 1 else outs

    @staticmethod
    def backward(ctx, *grads):
        spec, offsets = ctx.spec, ctx.offsets
        k, r = len(spec.members), spec.rank
        saved = ctx.saved_tensors  # unpack once: gradient checkpointing allows only one
        weight = saved[0]
        n = math.prod(ctx.shape[:-1])
        dtype = ctx.dtype
        like = next(g for g in grads if g is not None)
        parts = [g if g is not None else like.new_zeros(*ctx.shape[:-1], size) for g, size in zip(grads, spec.sizes)]
        g = (torch.cat(parts, -1) if len(parts) > 1 else parts[0]).reshape(n, offsets[-1]).to(dtype)
        need_x = ctx.needs_input_grad[0]
        dx = None
        if need_x and weight is not None:
            dx = g @ weight
        elif need_x and ctx.four_bit is not None:
            dx = g @ ctx.four_bit.backward_matrix(dtype)
        if not k:
            return (dx.view(ctx.shape).to(ctx.x_dtype) if dx is not None else None, None, None, None)
        _, x2, a, h, b_block, a_t = saved
        products = _Products(spec.kernels, dtype, x2.shape, k * r)
        d_pre = products.mm(g, b_block.t())  # (n, k*r): gradient of dropout(x) A^T, per adapter
        if ctx.b_scaled:  # h was left unscaled: the scales go into B's gradient (exact, as they went into B)
            if isinstance(ctx.scales, float):
                db_block = products.small_t_mm(h, g, ctx.scales)
            else:
                db_block = products.small_t_mm(h, g)
                db_block.mul_(torch.tensor(spec.scales, dtype=torch.float32).repeat_interleave(r)[:, None])
        else:
            d_pre.mul_(ctx.scales)
            db_block = products.small_t_mm(h, g)  # (k*r, total)
        db = [db_block[j * r : (j + 1) * r, offsets[m] : offsets[m + 1]].t() for j, m in enumerate(spec.members)]
        dropped, d_in = ctx.dropped, None
        if dropped is None or a_t is not None:  # without dropout, or (as in forward) the C kernels' branch
            if dropped is None:
                da = products.small_t_mm(d_pre, x2).view(k, r, -1)
            else:  # products on x itself, minus the dropped elements' terms
                da_t = products.big_t_mm(x2, d_pre)  # (in, k*r) fp32
                spec.kernels.lora_drop_da(da_t, x2, d_pre, dropped, k)
                da = spec.kernels.transpose(da_t).view(k, r, -1)  # (see below)
            if need_x:  # a itself, not a_t.t(): oneDNN is several times slower on the transposed (k*r, in) operand
                dx = products.add_mm(dx, d_pre, a.view(k * r, -1))
                if dropped is not None:
                    spec.kernels.lora_drop_dx(dx, d_pre, a_t, dropped, k)
        else:
            d_pre3 = d_pre.view(n, k, r).transpose(0, 1)  # (k, n, r)
            da = torch.bmm(d_pre3.transpose(1, 2), _dropped_copies(x2, k, dropped))
            if need_x:
                d_in3 = torch.bmm(d_pre3, a)  # (k, n, in)
                d_in3.view(-1).index_fill_(0, dropped, 0)
                d_in = d_in3.sum(0) if k > 1 else d_in3[0]
        if d_in is not None:
            dx = d_in if dx is None else dx.add_(d_in)
        if dx is not None:
            dx = dx.view(ctx.shape).to(ctx.x_dtype)
        # Contiguous fp32 gradients: autograd keeps them as the parameters' .grad as they are, where a
        # transposed one it would copy again (one op and one allocation per adapter matrix).
        as_grad = dict(dtype=torch.float32, memory_format=torch.contiguous_format)
        return (dx, None, None, None, *[d.to(**as_grad) for d in da.unbind(0)], *[d.to(**as_grad) for d in db])


class _Products:
    """The adapters' products of one group call, each with one side of size k*r (the stacked rank):
    on AMX tiles where the C kernels have them (bf16, even sizes), else torch's matmul.

    oneDNN takes 60-250 us a call on these shapes (400 x 576 x 48, 48 x 400 x 960...), mostly
    per-call setup and blocking made for large products, and a LoRA step makes six per group
    (A and B forward, the input gradient through B and A, the two weight gradients); numbers
    in docs/finetune.md."""

    def __init__(self, kernels: kernels_module.Kernels | None, dtype: torch.dtype, x_shape: torch.Size, stacked_rank: int):
        rows, features = x_shape
        usable = kernels is not None and kernels.amx and dtype == torch.bfloat16 and features % 2 == 0 and stacked_rank % 2 == 0
        self.kernels = kernels if usable else None
        self.rows_even = rows % 2 == 0  # the weight gradients' inner size

    def mm(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """a @ b in a's dtype."""
        return self.kernels.amx_matmul(a, b) if self.kernels is not None else a @ b

    def add_mm(self, out: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """out + a @ b, in place into `out` (a contiguous matrix); a @ b when out is None."""
        if out is None:
            return self.mm(a, b)
        if self.kernels is not None:
            return self.kernels.amx_matmul(a, b, out=out, accumulate=True)
        return out.addmm_(a, b)

    def small_t_mm(self, small: torch.Tensor, big: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
        """alpha small^T @ big over their n rows, (k*r, features): fp32 on AMX, else the inputs' dtype."""
        if self.kernels is not None and self.rows_even:
            return self.kernels.amx_matmul(small.t(), big, alpha=alpha, fp32=True)
        product = small.t() @ big
        return product.mul_(alpha) if alpha != 1.0 else product

    def big_t_mm(self, big: torch.Tensor, small: torch.Tensor) -> torch.Tensor:
        """big^T @ small over their n rows, (features, k*r), fp32."""
        if self.kernels is not None and self.rows_even:  # computed as small^T @ big, stored transposed
            return self.kernels.amx_matmul(small.t(), big, transposed=True)
        return (big.t() @ small).float()


def _dropped_copies(x2: torch.Tensor, k: int, dropped: torch.Tensor) -> torch.Tensor:
    """k copies of x2 stacked, (k, n, in), with the flat `dropped` positions zeroed."""
    copies = x2.new_empty(k, *x2.shape).copy_(x2)  # always a copy: the input itself must stay intact
    return copies.view(-1).index_fill_(0, dropped, 0).view(k, *x2.shape)


class LinearGroup:
    """Linear layers that read the same input, run as one LinearGroupFunction.

    With `fuse_base`, the members' frozen base weights (bf16 or fp32 nn.Linear) become
    views of one concatenated matrix (undone by the patches: each gets its own copy back).
    With `four_bit` (QLoRA's 4-bit bases, taken by the path's C dequantization), the members'
    weights are dequantized into one matrix for each product (FourBitGroupWeight). Otherwise (a
    single LoRA layer over a base this path cannot fuse, e.g. GPT-2's Conv1D) the base runs as
    itself and only the LoRA term goes through the function."""

    def __init__(self, patches: Patches, members: list[nn.Module], lora_type: type, fuse_base: bool, path,
                 four_bit: FourBitGroupWeight | None = None):
        self.members = members
        self.lora_type = lora_type
        self.path = path  # the FastPath: whether it is on, its kernels
        self.fuse_base = fuse_base
        self.four_bit = four_bit
        self.bases = [compat.base_layer(m, lora_type) for m in members]
        whole = fuse_base or four_bit is not None
        self.sizes = tuple(base.out_features for base in self.bases) if whole else (members[0].out_features,)
        self.weight = self.bias = None
        if fuse_base:
            with torch.no_grad():
                self.weight = torch.cat([base.weight for base in self.bases], 0)
                start = 0
                for base, size in zip(self.bases, self.sizes):
                    base.weight.data = self.weight[start : start + size]
                    start += size
                if any(base.bias is not None for base in self.bases):
                    self.bias = torch.cat([base.bias if base.bias is not None else self.weight.new_zeros(size)
                                           for base, size in zip(self.bases, self.sizes)])
                    start = 0
                    for base, size in zip(self.bases, self.sizes):
                        if base.bias is not None:
                            base.bias.data = self.bias[start : start + size]
                        start += size
            patches.on_undo(self._separate_weights)
        self._pending: dict[int, torch.Tensor] = {}
        self._pending_input: torch.Tensor | None = None
        self.packed: kernels_module.PackedWeight | None = None  # set by FastPath where it packs weights for AMX
        for index, member in enumerate(members):
            patches.replace_forward(member, self._member_forward(index))

    def _member_forward(self, index: int):
        group = self

        def forward(module, own_forward, x, *args, **kwargs):
            if args or kwargs or not group.path.enabled:
                return own_forward(x, *args, **kwargs)
            if group._pending_input is x and index in group._pending:
                return group._pending.pop(index)
            outputs = group.run(x)
            if outputs is None:
                return own_forward(x)
            group._pending = {i: out for i, out in enumerate(outputs) if i != index}
            group._pending_input = x if group._pending else None
            return outputs[index]

        return forward

    def run(self, x: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
        """The members' outputs for `x`; None when an adapter's state is not covered (or
        the group's adapters differ in rank or dropout), so PEFT's forwards run instead."""
        members, scales, a_weights, b_weights, ranks, dropouts = [], [], [], [], set(), set()
        for index, member in enumerate(self.members):
            if not isinstance(member, self.lora_type):
                continue
            name = compat.plain_lora_adapter(member)
            if name is None:
                return None
            a, b, scaling, p = compat.lora_parts(member, name)
            members.append(index)
            scales.append(scaling / (1.0 - p))
            a_weights.append(a)
            b_weights.append(b)
            ranks.add(a.shape[0])
            dropouts.add(p)
        if len(ranks) > 1 or len(dropouts) > 1:
            return None
        spec = _Spec(self.sizes, tuple(members), tuple(scales), ranks.pop() if ranks else 0, dropouts.pop() if dropouts else 0.0,
                     self.path.kernels, self.packed)
        if self.fuse_base:
            out = LinearGroupFunction.apply(x, self.weight, self.bias, spec, *a_weights, *b_weights)
            return out if isinstance(out, tuple) else (out,)
        if self.four_bit is not None:
            # (Linear4bit computes in its compute dtype and returns the input's: here they are one)
            if not self.four_bit.current() or x.dtype != self.four_bit.compute_dtype:
                return None
            out = LinearGroupFunction.apply(x, self.four_bit, None, spec, *a_weights, *b_weights)
            return out if isinstance(out, tuple) else (out,)
        base = self.bases[0](x)  # (a 4-bit base: its own forward is quantized.py's where the path took it)
        return (base + LinearGroupFunction.apply(x, None, None, spec, *a_weights, *b_weights).to(base.dtype),)

    def _separate_weights(self) -> None:
        """Independent weights again (saving shared storage would fail)."""
        with torch.no_grad():
            for base in self.bases:
                base.weight.data = base.weight.data.clone()
                if base.bias is not None:
                    base.bias.data = base.bias.data.clone()
        self._pending, self._pending_input, self.packed = {}, None, None
