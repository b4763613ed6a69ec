"""Full fine-tuning's linear layers on bf16 copies of their fp32 weights, kept in step with them.

Under bf16 autocast each trainable nn.Linear casts its fp32 weight to a fresh bf16 tensor in
every forward, and its backward casts the bf16 weight gradient to a fresh fp32 tensor, which the
engine then makes the weight's .grad (emptied again by zero_grad(set_to_none=True)): every step,
new tensors the size of all the linear weights, twice (SmolLM2-135M: 214 MB in bf16 and 428 MB
in fp32), their pages faulted in again and again. Profiled on the tone workload (AVX512-BF16
code path, full fine-tuning), those casts were most of the 24% of a step aten::copy_ took.

Here each such weight has one bf16 copy for the life of the fast path, written in place from the
fp32 weight when it may have changed (after any optimizer's step, or when the weight's version
counter or storage moved: a checkpoint loaded into it), and the layer's product reads it: the
same rounding as autocast's cast, so the same numbers. The backward adds the bf16 weight
gradient into the weight's fp32 .grad in place (bf16 to fp32 is exact: the same sum the engine
makes), or, when .grad is None, copies it into an fp32 buffer kept for that weight and makes that
the .grad: no new tensor, no page faulted, in either direction.

The engine never sees that gradient, so a hook on the weight would not run: only weights with no
hooks are taken, only plain (not sharded) Parameters; and the output head when its weight is the
input embedding's, whose rows embedding.py's post-accumulate hook adds: the engine still runs the
weight's accumulation node (with no gradient of its own) after both backwards, so the hook then
finds the .grad the head's copy wrote. Gradients are read after backward() by
everything in slmops that reads them (clipping, the sum over processes, the optimizer);
torch.autograd.grad on such a weight would see none, which is why this is the fast path's (its
switch: --cpu_fast_path off) and applies only under bf16 autocast."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from slmops.train.cpu.patches import Patches


class _OptimizerSteps:
    """How many optimizer steps this process has taken (any torch.optim optimizer), counted by a
    global post-step hook while at least one path holds it: fused AdamW updates weights without
    moving their version counters, so the count is what tells a copy it is stale."""

    def __init__(self):
        self.count = 0
        self._holders = 0
        self._handle = None

    def hold(self) -> None:
        if self._holders == 0:
            self._handle = register_optimizer_step_post_hook(self._after_step)
        self._holders += 1

    def release(self) -> None:
        self._holders -= 1
        if self._holders == 0 and self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _after_step(self, optimizer, args, kwargs) -> None:
        self.count += 1


OPTIMIZER_STEPS = _OptimizerSteps()


class Bf16Copy:
    """One trainable fp32 weight's bf16 copy and fp32 gradient buffer."""

    def __init__(self, weight: nn.Parameter):
        self.weight = weight
        self.bf16: torch.Tensor | None = None  # made at the first forward under bf16 autocast (none in an fp32 run)
        self.grad_buffer: torch.Tensor | None = None  # made at the first backward
        self._seen: tuple | None = None  # (optimizer steps, version, storage) when last written

    def current(self) -> torch.Tensor:
        """The bf16 copy, rewritten first if the weight may have changed since."""
        seen = (OPTIMIZER_STEPS.count, self.weight._version, self.weight.data_ptr())
        if self.bf16 is None or self.bf16.shape != self.weight.shape:
            self.bf16, self._seen = torch.empty_like(self.weight, dtype=torch.bfloat16, memory_format=torch.contiguous_format), None
        if seen != self._seen:
            with torch.no_grad():
                self.bf16.copy_(self.weight)
            self._seen = seen
        return self.bf16

    def accumulate(self, grad: torch.Tensor) -> None:
        """Add a bf16 weight gradient into the weight's fp32 .grad, in place."""
        weight = self.weight
        with torch.no_grad():
            if weight.grad is None:
                if self.grad_buffer is None or self.grad_buffer.shape != weight.shape:
                    self.grad_buffer = torch.empty_like(weight, memory_format=torch.contiguous_format)
                self.grad_buffer.copy_(grad)
                weight.grad = self.grad_buffer
            else:
                weight.grad.add_(grad)


class Bf16LinearFunction(torch.autograd.Function):
    """F.linear as autocast runs it in bf16, on the kept copy; the weight's gradient added into
    its .grad by the copy rather than handed to the engine."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, copy: Bf16Copy) -> torch.Tensor:
        w = copy.current()
        x16 = x.to(torch.bfloat16)
        b16 = None if bias is None else bias.to(torch.bfloat16)
        ctx.copy, ctx.x_dtype = copy, x.dtype
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x16, w)  # (w's version guards against a rewrite before this backward)
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x16, w, b16)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x16, w = ctx.saved_tensors
        rows = grad.to(torch.bfloat16).reshape(-1, grad.shape[-1])
        grad_x = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (rows @ w).view(*x16.shape[:-1], w.shape[1]).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            ctx.copy.accumulate(rows.t() @ x16.reshape(-1, x16.shape[-1]))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = rows.sum(0).float()
        return grad_x, None, grad_b, None


def candidates(model: nn.Module, rows_hooked: torch.Tensor | None = None) -> list[nn.Linear]:
    """The plain nn.Linear layers whose fp32 weight trains and is a plain Parameter, used by no
    other module and with no hooks; and the output head, also when its weight is the input
    embedding's whose rows embedding.py's hook adds (`rows_hooked`: see the module docstring)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    uses: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            uses[id(p)] = uses.get(id(p), 0) + 1
    taken = []
    for module in model.modules():
        if type(module) is not nn.Linear:
            continue
        w = module.weight
        if not w.requires_grad or w.dtype != torch.float32 or type(w) is not nn.Parameter or type(w.data) is not torch.Tensor \
                or w.device.type != "cpu":
            continue
        tied_rows = module is head and rows_hooked is not None and w is rows_hooked
        if not tied_rows and (uses.get(id(w), 0) != 1 or w._backward_hooks or getattr(w, "_post_accumulate_grad_hooks", None)):
            continue
        taken.append(module)
    return taken


def install(patches: Patches, modules: list[nn.Linear], is_enabled) -> int:
    """Route each module's forward through its bf16 copy while `is_enabled()` and bf16 autocast
    is on (anything else: the module's own forward). Returns the bytes the copies hold once
    made (at their first forward under bf16 autocast)."""
    if not modules:
        return 0
    OPTIMIZER_STEPS.hold()
    patches.on_undo(OPTIMIZER_STEPS.release)
    held = 0
    for module in modules:
        copy = Bf16Copy(module.weight)
        held += module.weight.numel() * 2

        def forward(self, own_forward, x, *args, copy=copy, **kwargs):
            device = x.device.type
            if (args or kwargs or not is_enabled() or not torch.is_autocast_enabled(device)
                    or torch.get_autocast_dtype(device) != torch.bfloat16 or self.weight is not copy.weight):
                return own_forward(x, *args, **kwargs)
            return Bf16LinearFunction.apply(x, self.weight, self.bias, copy)

        patches.replace_forward(module, forward)
    return held
