"""The CPU fast path as one object: it installs every piece on a model (recording each change
in one Patches registry), verifies itself against the model's own forward on a real batch,
and removes everything again — as a context manager, so removal happens however the run ends.

    with FastPath.install(model) as path:   # or FastPath.disabled("why") when it is off
        ... path.verify(model, loss_fn, batch) ...   # removes itself and says why on disagreement
        train

`decide(...)` says whether a run takes the path at all (method, device, library versions,
--cpu_fast_path) and, when not, why — for the log line."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from slmops.machine import available_memory
from slmops.train.cpu import allocator, attention, bf16_copies, compat, embedding, last_layer, mlp, norm, packing
from slmops.train.cpu import quantized as quantized_module
from slmops.train.cpu import kernels as kernels_module
from slmops.train.cpu.lora import LinearGroup
from slmops.train.cpu.patches import Patches

log = logging.getLogger("slmops")

# Children of one module that read the same input, in the order models call them.
# (gate_proj + up_proj is not grouped: measured on AMX, one (n, 576) x (576, 3072) product
# forward and backward is slower than two of half the width.)
SHARED_INPUT_GROUPS = (("q_proj", "k_proj", "v_proj"),)

# agrees(): how much further from fp32 (or from the model's own bf16 forward) a bf16 gradient computed
# another way (a shared prefix once) may be than the reference way's: at most this many times its
# 1 - cosine. bf16's noise depends on the model (1 - cosine 0.0016 on SmolLM2's tone examples, 0.025 on
# a tiny random model), so the bound is relative. On SmolLM2 (LoRA, QLoRA, full; AVX512-BF16) a right
# sharing measured 0.5-1.6x the reference's, a prefix whose keys lose half their gradient 12x.
SHARED_DISTANCE_RATIO = 2.0
VERIFY_GRADIENT_ELEMENTS = 20_000_000  # at most this many gradient elements kept per side by `verify`


def decide(mode: str, method_takes_it: bool, method_name: str, device: torch.device) -> str | None:
    """None when the run should install the fast path; else the reason it is off."""
    if mode == "off":
        return "--cpu_fast_path off"
    if device.type != "cpu":
        return f"training on {device.type}"
    if not method_takes_it:
        return f"--method {method_name} does not take it (its adapters run PEFT's own forward)"
    unknown = compat.unknown_versions()
    if unknown and mode == "auto":
        return f"library versions it was not tested with: {'; '.join(unknown)} (--cpu_fast_path on tries it anyway)"
    return None


def _packable(weight: torch.Tensor) -> bool:
    return (weight.dtype == torch.bfloat16 and weight.device.type == "cpu" and weight.is_contiguous() and not weight.requires_grad
            and weight.shape[1] % 2 == 0)


def _fusable(module: nn.Module, lora_type: type) -> bool:
    """A frozen plain nn.Linear, bare or as the base of a PEFT LoRA layer."""
    base = compat.base_layer(module, lora_type)
    return type(base) is nn.Linear and not base.weight.requires_grad and (base.bias is None or not base.bias.requires_grad)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a, b, dim=0)) if b.norm() > 0 and a.norm() > 0 else float(torch.equal(a, b))


def _no_further(candidate: tuple[float, torch.Tensor], reference: tuple[float, torch.Tensor],
                center: tuple[float, torch.Tensor]) -> bool:
    """`candidate` (loss, gradients) is no further from `center` than `reference` is, within
    SHARED_DISTANCE_RATIO: in loss (or within 2% of it, verify()'s bf16 tolerance: a probe's few
    labelled tokens move by that much) and in the gradient's 1 - cosine (or 1e-4: two near-exact
    gradients pass)."""
    loss_error, reference_error = abs(candidate[0] - center[0]), abs(reference[0] - center[0])
    distance, reference_distance = 1 - _cosine(candidate[1], center[1]), 1 - _cosine(reference[1], center[1])
    return (loss_error <= max(SHARED_DISTANCE_RATIO * reference_error, 2e-2 * max(1.0, abs(center[0])))
            and distance <= SHARED_DISTANCE_RATIO * max(reference_distance, 1e-4))


def _agree(a: tuple[float, torch.Tensor], b: tuple[float, torch.Tensor], loss_rtol: float, min_cosine: float) -> bool:
    return abs(a[0] - b[0]) <= loss_rtol * max(1.0, abs(b[0])) and _cosine(a[1], b[1]) > min_cosine


def _packed_attention_products(kernels: kernels_module.Kernels | None) -> str:
    """Where long packed batches' attention runs, for describe(): the C kernels this CPU has, by the
    dtype the model trains in (each sequence in SDPA otherwise)."""
    if kernels is None:
        return ""
    where = []
    if kernels.packed_attention:
        where.append("bf16 on AMX tiles" if kernels.amx else "bf16 on AVX512-BF16")
    if kernels.packed_attention_f32:
        where.append("fp32 on AVX2")
    return f", in one C kernel: {', '.join(where)}" if where else ""


class FastPath:
    """The groups, fused norms, MLPs and attention on a model (PEFT LoRA/QLoRA; for full
    fine-tuning the parts without a trainable matrix apply: SwiGLU, attention, packing, the
    RMSNorms with their trainable weights, the tied embedding's gradient as rows, and the
    linears' kept bf16 copies)."""

    def __init__(self, model: nn.Module | None, off_reason: str | None = None):
        self.model = model
        self.off_reason = off_reason
        self.patches = Patches()
        self.groups: list[LinearGroup] = []
        self.norms: list[nn.Module] = []
        self.mlps: list[nn.Module] = []
        self.four_bit_layers = 0  # bitsandbytes 4-bit layers on the C dequantization (quantized.py)
        self.embedding_rows = False  # the tied, trainable input embedding's gradient as rows (embedding.py)
        self.bf16_copies: list[nn.Module] = []  # full fine-tuning's linears on kept bf16 weights (bf16_copies.py)
        self.bf16_copy_bytes = 0
        self.attention_modules: list[nn.Module] = []
        self.replaced_attention: str | None = None
        self.packed_bytes = 0
        self.packs_sequences = False
        self.last_layer_on_loss_rows = False  # last_layer.py
        self.keeps_freed_blocks = False
        self.kernels: kernels_module.Kernels | None = None
        self._attention = attention.AttentionState()

    @classmethod
    def disabled(cls, reason: str) -> "FastPath":
        """A path that is off (and says why): installs nothing, `active` is False."""
        return cls(None, reason)

    @classmethod
    def install(cls, model: nn.Module, micro_batch_tokens: int | None = None) -> "FastPath":
        """Install the path on `model`. `micro_batch_tokens`, the tokens a typical training
        micro-batch holds (where known), decides whether packing the base weights for the AMX
        forward pays: over kernels.AMX_LINEAR_MAX_ROWS those products take oneDNN anyway."""
        path = cls(model)
        try:
            path._install(micro_batch_tokens)
        except BaseException:
            path.patches.undo()
            raise
        return path

    def _install(self, micro_batch_tokens: int | None) -> None:
        model, patches = self.model, self.patches
        lora_type = compat.lora_linear_type()
        self.kernels = kernels_module.get()
        self.keeps_freed_blocks = allocator.keep_freed_blocks()  # (process-wide, for good: allocator.py)
        # QLoRA's 4-bit layers, under an adapter or frozen alone: their products on the C dequantization
        four_bit_type = compat.four_bit_linear_type()
        four_bit, buffer = {}, quantized_module.ProductBuffer()
        for module in model.modules():
            weight = quantized_module.FourBitWeight.of(module, self.kernels, buffer) if type(module) is four_bit_type else None
            if weight is not None:
                quantized_module.install(patches, weight, lambda: self.enabled)
                four_bit[module] = weight
        self.four_bit_layers = len(four_bit)
        quantized = compat.lora_4bit_types()

        def four_bit_group(members: list) -> quantized_module.FourBitGroupWeight | None:
            if not all(type(m) in quantized for m in members):
                return None
            return quantized_module.FourBitGroupWeight.of([four_bit.get(m.base_layer) for m in members])

        grouped: set[int] = set()
        for parent in model.modules():
            for names in SHARED_INPUT_GROUPS:
                members = [getattr(parent, name, None) for name in names]
                if not all(isinstance(m, nn.Module) for m in members):
                    continue
                if all(_fusable(m, lora_type) for m in members):
                    bases = [compat.base_layer(m, lora_type) for m in members]
                    if len({(b.in_features, b.weight.dtype, b.weight.device) for b in bases}) != 1:
                        continue
                    self.groups.append(LinearGroup(patches, members, lora_type, True, self))
                elif (weight := four_bit_group(members)) is not None:  # QLoRA's q, k, v: one product on their 4-bit weights
                    self.groups.append(LinearGroup(patches, members, type(members[0]), False, self, weight))
                else:
                    continue
                grouped.update(id(m) for m in members)
        for module in model.modules():
            if type(module) is lora_type and id(module) not in grouped:
                self.groups.append(LinearGroup(patches, [module], lora_type, _fusable(module, lora_type), self))
            elif type(module) in quantized and id(module) not in grouped:
                # QLoRA: the base on the C dequantization inside the group's function where the path took it,
                # else as bitsandbytes' layer, the LoRA term here
                self.groups.append(LinearGroup(patches, [module], type(module), False, self, four_bit_group([module])))
        norms_checked: dict = {}  # (norm.install: one gradient check per kind of trainable norm)
        for module in model.modules():
            if norm.matches(module):
                norm.install(patches, module, lambda: self.enabled, self.kernels, norms_checked)
                self.norms.append(module)
            elif self.kernels is not None and mlp.matches(module):
                mlp.install(patches, module, lambda: self.enabled, self.kernels, four_bit)
                self.mlps.append(module)
        tied = embedding.tied_trainable_embedding(model)
        if tied is not None:
            embedding.install(patches, tied, lambda: self.enabled)
            self.embedding_rows = True
        if not self.groups and not four_bit:  # full fine-tuning (an adapter's own layers are the groups')
            self.bf16_copies = bf16_copies.candidates(model, tied.weight if tied is not None else None)
            self.bf16_copy_bytes = bf16_copies.install(patches, self.bf16_copies, lambda: self.enabled)
        self.packed_bytes = self._pack_frozen_weights(micro_batch_tokens)
        self.replaced_attention = attention.install(patches, model, self._attention)
        if self.replaced_attention:
            self.attention_modules = attention.install_modules(patches, model, self._attention, self.kernels)
        # Padding-free batches (loss.packed_loss) need every decoder layer's attention on the fused function.
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
        layers = getattr(decoder, "layers", None)
        self.packs_sequences = bool(self.attention_modules) and isinstance(layers, nn.ModuleList) and \
            len(self.attention_modules) == len(layers)
        # a packed batch's loss rows reach the layers with its packing: the last layer's MLP can run on those only
        self.last_layer_on_loss_rows = self.packs_sequences and last_layer.install(patches, model, lambda: self.enabled)
        if not len(patches):
            self.off_reason = "nothing in this model it knows how to take over"

    def _pack_frozen_weights(self, micro_batch_tokens: int | None) -> int:
        """Pack the frozen bf16 base weights of the groups and MLPs once for the AMX forward
        products of short micro-batches (kernels.amx_linear, ~1.35x oneDNN's linear there; longer
        ones and the backward keep oneDNN: kernels.AMX_LINEAR_MAX_ROWS), where the CPU has AMX, a
        typical micro-batch (micro_batch_tokens, where known) is short enough to use
        them, and the copies (one more of the base's linear weights) fit in a quarter of the
        memory available now. Returns the bytes packed."""
        kernels = self.kernels
        if kernels is None or not kernels.amx:
            return 0
        groups = [g for g in self.groups if g.weight is not None and _packable(g.weight)]
        mlps = {m: w for m in self.mlps if (w := mlp._frozen_weights(m)) is not None and all(_packable(t) for t in w)}
        needed = sum(g.weight.numel() * 2 for g in groups) + sum(t.numel() * 2 for w in mlps.values() for t in w)
        if needed and micro_batch_tokens is not None and not kernels.amx_linear_pays(micro_batch_tokens):
            # (a 1B model's copies are ~2 GB that would only raise the peak memory)
            log.info("AMX weight packing skipped: micro-batches of ~%d tokens take oneDNN's products (the AMX forward pays up to "
                     "%d), and %d MB of copies would go unused", micro_batch_tokens, kernels_module.AMX_LINEAR_MAX_ROWS, needed >> 20)
            return 0
        available = available_memory()
        if not needed or available is None or needed > available // 4:
            if needed:
                log.info("AMX weight packing skipped: %d MB of packed weights, %s MB of memory available", needed >> 20,
                         "unknown" if available is None else available >> 20)
            return 0
        for group in groups:
            group.packed = kernels.pack_weight(group.weight)
        for module, weights in mlps.items():
            self.patches.set_attr(module, "_slmops_packed", tuple(kernels.pack_weight(w) for w in weights))
        return needed

    # ---- state ---------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        """Installed and not removed (by `verify`'s disagreement, or at the end)."""
        return self.model is not None and len(self.patches) > 0

    @property
    def enabled(self) -> bool:
        return self._attention.enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self._attention.enabled = value  # the groups, norms and MLPs read it through the path too

    @property
    def lora_layers(self) -> int:
        return sum(isinstance(m, g.lora_type) for g in self.groups for m in g.members)

    def packing_policy(self, compute_dtype: torch.dtype) -> packing.PackingPolicy:
        """How padding-free batches (loss.packed_loss) train on this path, for a model computing in
        `compute_dtype` (its weights', or autocast's): where the packed attention kernel of that
        dtype takes every attention module's heads, FP32_ALONE for fp32 products and
        PADDED_ATTENTION_SHARED_PREFIX for bf16 ones on AVX512-BF16 dot products (no AMX tiles);
        else PADDED_ATTENTION (packing.py gives the measurements behind each)."""
        kernel = self.kernels is not None and bool(self.attention_modules) and \
            all(self.kernels.packed_attention_for(compute_dtype, m.head_dim) for m in self.attention_modules)
        if kernel and compute_dtype == torch.float32:
            return packing.FP32_ALONE
        if kernel and compute_dtype == torch.bfloat16 and not self.kernels.amx:
            return packing.PADDED_ATTENTION_SHARED_PREFIX
        return packing.PADDED_ATTENTION

    def describe(self) -> str:
        if not self.active:
            return f"off: {self.off_reason}" if self.off_reason else "off"
        parts = []
        if self.lora_layers:
            fused = [g for g in self.groups if (g.fuse_base or g.four_bit is not None) and len(g.members) > 1]
            parts += [f"{self.lora_layers} LoRA layers", f"{len(fused)} shared-input groups with one fused matmul"]
        if self.norms:
            parts.append(f"{len(self.norms)} fused RMSNorms")
        if self.mlps:
            parts.append(f"{len(self.mlps)} fused SwiGLUs")
        if self.lora_layers:
            parts.append("sparse dropout draws")
        if self.embedding_rows:
            parts.append("the tied embedding's gradient added as rows")
        if self.bf16_copies:
            parts.append(f"{len(self.bf16_copies)} trainable linears on kept bf16 copies of their weights under bf16 autocast "
                         f"({self.bf16_copy_bytes / 2**20:.0f} MB)")
        if self.replaced_attention:
            rotary = f" ({len(self.attention_modules)} with the rotary embedding inside)" if self.attention_modules else ""
            parts.append(f"short-batch attention in {attention.NAME}{rotary}")
        if self.packs_sequences:
            alone = "each sequence's causal attention alone" + _packed_attention_products(self.kernels)
            parts.append(f"padding-free batches (which ones: the loss line; {alone})")
        if self.last_layer_on_loss_rows:
            parts.append("the last layer's MLP on a packed batch's labelled rows only")
        if self.packed_bytes:
            parts.append(f"AMX forward products on packed base weights ({self.packed_bytes / 2**20:.2f} MB)")
        if self.kernels is not None and self.kernels.amx and self.lora_layers:
            parts.append("LoRA products on AMX in bf16")
        if self.four_bit_layers:
            parts.append(f"{self.four_bit_layers} 4-bit base weights dequantized in C")
        parts.append("C kernels" if self.kernels is not None else "PyTorch ops only (C kernels unavailable)")
        if self.keeps_freed_blocks:
            parts.append("large blocks kept by malloc between steps")
        if compat.unknown_versions():
            parts.append("on untested library versions (--cpu_fast_path on)")
        return ", ".join(parts)

    def verify(self, model: nn.Module, loss_fn, batch: dict[str, torch.Tensor]) -> bool:
        """Loss and trainable gradients of one batch (dropout off) with this path and with the
        model's own (PEFT's) forward agree; otherwise remove the path and say so.

        In bf16 both sides round, and on long sequences the model's own bf16 forward (bf16
        SDPA, among others) can be the less accurate of the two: the first comparison then
        fails on noise, not on a wrong function. So a disagreement is arbitrated against the
        same forward in fp32 (weights upcast for the check, restored bit for bit after): the
        path passes when it is within the same tolerance of fp32, or no further from it than
        the model's own bf16 forward is (x2); it fails as before when it computes something
        else (a wrong kernel is far off both)."""
        if not self.active:
            return False
        trainable = self._checked_parameters(model)
        fast = self._loss_and_grads(model, loss_fn, batch, trainable, enabled=True)
        ref = self._loss_and_grads(model, loss_fn, batch, trainable, enabled=False)
        if _agree(fast, ref, loss_rtol=2e-2, min_cosine=0.99):
            return True
        truth = self._fp32_reference(model, loss_fn, batch, trainable)
        if truth is not None:
            fast_err, ref_err = abs(fast[0] - truth[0]), abs(ref[0] - truth[0])
            fast_cos, ref_cos = _cosine(fast[1], truth[1]), _cosine(ref[1], truth[1])
            # within the first comparison's tolerance of fp32, or no further than twice the model's own bf16 error
            if fast_err <= max(2 * ref_err, 2e-2 * max(1.0, abs(truth[0]))) and fast_cos >= min(0.99, ref_cos - 0.005):
                log.info("fast CPU path checked against an fp32 forward: loss off by %.4f (the model's own bf16 forward: %.4f), "
                         "gradient cosine %.4f (own: %.4f)", fast_err, ref_err, fast_cos, ref_cos)
                return True
            detail = (f"loss {fast[0]:.5f} vs {ref[0]:.5f}, fp32 {truth[0]:.5f}; gradient cosine with fp32 {fast_cos:.4f} vs "
                      f"the model's own {ref_cos:.4f}")
        else:
            detail = f"loss {fast[0]:.5f} vs {ref[0]:.5f}, gradient cosine {_cosine(fast[1], ref[1]):.4f}"
        self.off_reason = f"it disagrees with the model's own forward on this model ({detail})"
        log.warning("fast CPU path off: %s; training with the model's own forward", self.off_reason)
        self.remove()
        return False

    @staticmethod
    def _checked_parameters(model: nn.Module) -> list[torch.Tensor]:
        trainable, budget = [], VERIFY_GRADIENT_ELEMENTS
        for p in model.parameters():  # full fine-tuning: compare a bounded subset (a 1B model's gradients twice is 8 GB)
            if p.requires_grad and p.numel() <= budget:
                trainable.append(p)
                budget -= p.numel()
        return trainable

    def _loss_and_grads(self, model, loss_fn, batch, trainable, enabled: bool) -> tuple[float, torch.Tensor]:
        """Mean loss and the flattened fp32 gradients of one batch, dropout off."""
        was_training = model.training
        model.eval()
        try:
            self.enabled = enabled
            model.zero_grad(set_to_none=True)
            if not trainable:  # the loss alone
                with torch.no_grad():
                    loss, count = loss_fn(model, batch)
                return float(loss) / count, torch.zeros(0)
            loss, count = loss_fn(model, batch)
            (loss / count).backward()
            grads = torch.cat([p.grad.flatten().float() if p.grad is not None else torch.zeros(p.numel()) for p in trainable])
            return float(loss.detach()) / count, grads
        finally:
            self.enabled = True
            model.zero_grad(set_to_none=True)
            model.train(was_training)

    def agrees(self, model, loss_fn, reference_fn, batch: dict[str, torch.Tensor], compute_dtype: torch.dtype) -> tuple[bool, str]:
        """Whether two loss functions that compute the same thing on this path (a batch's shared
        prefix once, and every example whole) give one batch the same loss and trainable gradients
        (dropout off): to fp32's precision where the products are fp32. Returns the verdict and the
        numbers, for the log.

        Where the products are bf16 the two round differently (a shared prefix's gradients are
        summed over the examples before its products, not after), and on the tone data's first
        examples they differ by as much as either differs from fp32 (gradient cosine 0.9986
        between them, 0.9984-0.9987 each with fp32). So a disagreement there is arbitrated, as
        verify() does, against `reference_fn` in fp32 (the model's own forward, weights upcast for
        the check): `loss_fn` passes when it is no further from fp32 than `reference_fn` in bf16 is
        (`_no_further`). Where no fp32 forward can run (4-bit weights, too little memory), the scale
        is how far the model's own bf16 forward is from `reference_fn`: two right bf16 computations.
        A wrong function is far off both (a prefix missing half its keys' gradients: cosine 0.98 on
        the tone data)."""
        trainable = self._checked_parameters(model)
        got = self._loss_and_grads(model, loss_fn, batch, trainable, enabled=True)
        want = self._loss_and_grads(model, reference_fn, batch, trainable, enabled=True)
        detail = f"loss {got[0]:.6f} vs {want[0]:.6f}, gradient cosine {_cosine(got[1], want[1]):.6f}"
        if compute_dtype == torch.float32:
            return _agree(got, want, 1e-4, 0.99999), detail
        if _agree(got, want, 1e-2, 0.9999):
            return True, detail
        truth = self._fp32_reference(model, reference_fn, batch, trainable)
        if truth is not None:  # each way's distance from fp32
            center, reference, against = truth, want, "fp32"
        else:  # no fp32 forward here (4-bit weights, memory): two right bf16 computations give the scale
            center, reference, against = want, self._loss_and_grads(model, reference_fn, batch, trainable, enabled=False), \
                "every example whole, and the model's own bf16 forward"
        detail += (f"; against {against}: loss off by {abs(got[0] - center[0]):.4f} vs {abs(reference[0] - center[0]):.4f}, "
                   f"gradient cosine {_cosine(got[1], center[1]):.6f} vs {_cosine(reference[1], center[1]):.6f}")
        return _no_further(got, reference, center), detail

    def fp32_loss(self, model, loss_fn, batch: dict[str, torch.Tensor]) -> float | None:
        """The mean loss of the model's own forward in fp32 (see _fp32_reference), or None."""
        result = self._fp32_reference(model, loss_fn, batch, [])
        return None if result is None else result[0]

    def _fp32_reference(self, model, loss_fn, batch, trainable) -> tuple[float, torch.Tensor] | None:
        """The model's own forward in fp32 (bf16/fp16 weights upcast, autocast off), or None
        where that cannot be done here: no low-precision weights or autocast to undo, 4-bit
        layers, or not memory enough for an fp32 copy of the weights."""
        low = [p for p in model.parameters() if p.dtype in (torch.bfloat16, torch.float16)]
        autocast = torch.is_autocast_enabled("cpu")
        if (not low and not autocast) or any(hasattr(m, "quant_state") or type(m).__name__.endswith("4bit") for m in model.modules()):
            return None
        needed = sum(p.numel() for p in low) * 4
        available = available_memory()
        if available is not None and needed > available // 2:
            return None
        saved = [(p, p.data) for p in low]
        try:
            for p in low:
                p.data = p.data.float()
            with torch.autocast("cpu", enabled=False):
                return self._loss_and_grads(model, loss_fn, batch, trainable, enabled=False)
        finally:
            for p, data in saved:  # the very tensors they held (the fast path's fused weights are views of them)
                p.data = data


    def remove(self) -> None:
        """Undo every change, in reverse order (idempotent)."""
        self.patches.undo()
        self.groups, self.norms, self.mlps, self.attention_modules, self.replaced_attention = [], [], [], [], None
        self.packed_bytes = 0
        self.packs_sequences = self.last_layer_on_loss_rows = False

    def __enter__(self) -> "FastPath":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
