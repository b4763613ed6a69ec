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

from slmops.train.cpu import attention, compat, mlp, norm
from slmops.train.cpu import kernels as kernels_module
from slmops.train.cpu.lora import LinearGroup
from slmops.train.cpu.patches import Patches

log = logging.getLogger("slmops")

# Children of one module that read the same input, in the order models call them.
# (gate_proj + up_proj is not grouped: measured on AMX, one (n, 576) x (576, 3072) product
# forward and backward is slower than two of half the width.)
SHARED_INPUT_GROUPS = (("q_proj", "k_proj", "v_proj"),)

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


def _available_memory() -> int | None:
    """MemAvailable from /proc/meminfo, in bytes (None off Linux)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _fusable(module: nn.Module, lora_type: type) -> bool:
    """A frozen plain nn.Linear, bare or as the base of a PEFT LoRA layer."""
    base = compat.base_layer(module, lora_type)
    return type(base) is nn.Linear and not base.weight.requires_grad and (base.bias is None or not base.bias.requires_grad)


class FastPath:
    """The groups, fused norms, MLPs and attention on a model (PEFT LoRA/QLoRA; for full
    fine-tuning only the weight-free parts apply: SwiGLU, attention, packing)."""

    def __init__(self, model: nn.Module | None, off_reason: str | None = None):
        self.model = model
        self.off_reason = off_reason
        self.patches = Patches()
        self.groups: list[LinearGroup] = []
        self.norms: list[nn.Module] = []
        self.mlps: list[nn.Module] = []
        self.attention_modules: list[nn.Module] = []
        self.replaced_attention: str | None = None
        self.packed_bytes = 0
        self.packs_sequences = False
        self.kernels: kernels_module.Kernels | None = None
        self._attention = attention.AttentionState()

    @classmethod
    def disabled(cls, reason: str) -> "FastPath":
        """A path that is off (and says why): installs nothing, `active` is False."""
        return cls(None, reason)

    @classmethod
    def install(cls, model: nn.Module) -> "FastPath":
        path = cls(model)
        try:
            path._install()
        except BaseException:
            path.patches.undo()
            raise
        return path

    def _install(self) -> None:
        model, patches = self.model, self.patches
        lora_type = compat.lora_linear_type()
        self.kernels = kernels_module.get()
        grouped: set[int] = set()
        for parent in model.modules():
            for names in SHARED_INPUT_GROUPS:
                members = [getattr(parent, name, None) for name in names]
                if not all(isinstance(m, nn.Module) and _fusable(m, lora_type) for m in members):
                    continue
                bases = [compat.base_layer(m, lora_type) for m in members]
                if len({(b.in_features, b.weight.dtype, b.weight.device) for b in bases}) != 1:
                    continue
                self.groups.append(LinearGroup(patches, members, lora_type, True, self))
                grouped.update(id(m) for m in members)
        quantized = compat.lora_4bit_types()
        for module in model.modules():
            if type(module) is lora_type and id(module) not in grouped:
                self.groups.append(LinearGroup(patches, [module], lora_type, _fusable(module, lora_type), self))
            elif type(module) in quantized:  # QLoRA: the base runs as bitsandbytes' layer, the LoRA term here
                self.groups.append(LinearGroup(patches, [module], type(module), False, self))
        for module in model.modules():
            if norm.matches(module):
                norm.install(patches, module, lambda: self.enabled, self.kernels)
                self.norms.append(module)
            elif self.kernels is not None and mlp.matches(module):
                mlp.install(patches, module, lambda: self.enabled, self.kernels)
                self.mlps.append(module)
        self.packed_bytes = self._pack_frozen_weights()
        self.replaced_attention = attention.install(patches, model, self._attention)
        if self.replaced_attention:
            self.attention_modules = attention.install_modules(patches, model, self._attention, self.kernels)
        # Padding-free batches (loss.packed_loss) need every decoder layer's attention on the fused function.
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
        layers = getattr(decoder, "layers", None)
        self.packs_sequences = bool(self.attention_modules) and isinstance(layers, nn.ModuleList) and \
            len(self.attention_modules) == len(layers)
        if not len(patches):
            self.off_reason = "nothing in this model it knows how to take over"

    def _pack_frozen_weights(self) -> int:
        """Pack the frozen bf16 base weights of the groups and MLPs once for the AMX forward
        products (kernels.amx_linear, ~1.35x oneDNN's linear at these sizes; the backward keeps
        oneDNN), where the CPU has AMX and the copies (one more of the base's linear weights)
        fit in a quarter of the memory available now. Returns the bytes packed."""
        kernels = self.kernels
        if kernels is None or not kernels.amx:
            return 0
        groups = [g for g in self.groups if g.weight is not None and _packable(g.weight)]
        mlps = {m: w for m in self.mlps if (w := mlp._frozen_weights(m)) is not None and all(_packable(t) for t in w)}
        needed = sum(g.weight.numel() * 2 for g in groups) + sum(t.numel() * 2 for w in mlps.values() for t in w)
        available = _available_memory()
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

    def describe(self) -> str:
        if not self.active:
            return f"off: {self.off_reason}" if self.off_reason else "off"
        parts = []
        if self.lora_layers:
            fused = [g for g in self.groups if g.fuse_base and len(g.members) > 1]
            parts += [f"{self.lora_layers} LoRA layers", f"{len(fused)} shared-input groups with one fused matmul"]
        if self.norms:
            parts.append(f"{len(self.norms)} fused RMSNorms")
        if self.mlps:
            parts.append(f"{len(self.mlps)} fused SwiGLUs")
        if self.lora_layers:
            parts.append("sparse dropout draws")
        if self.replaced_attention:
            rotary = f" ({len(self.attention_modules)} with the rotary embedding inside)" if self.attention_modules else ""
            parts.append(f"short-batch attention in {attention.NAME}{rotary}")
        if self.packs_sequences:
            parts.append("padding-free batches where padding is over 10%")
        if self.packed_bytes:
            parts.append(f"AMX forward products on packed base weights ({self.packed_bytes / 2**20:.2f} MB)")
        if self.kernels is not None and self.kernels.amx and self.lora_layers:
            parts.append("LoRA products on AMX in bf16")
        parts.append("C kernels" if self.kernels is not None else "PyTorch ops only (C kernels unavailable)")
        if compat.unknown_versions():
            parts.append("on untested library versions (--cpu_fast_path on)")
        return ", ".join(parts)

    def verify(self, model: nn.Module, loss_fn, batch: dict[str, torch.Tensor]) -> bool:
        """Loss and adapter gradients of one batch (dropout off) with this path and with
        PEFT's forward agree to bf16 precision; otherwise remove the path and say so."""
        if not self.active:
            return False
        trainable, budget = [], VERIFY_GRADIENT_ELEMENTS
        for p in model.parameters():  # full fine-tuning: compare a bounded subset (a 1B model's gradients twice is 8 GB)
            if p.requires_grad and p.numel() <= budget:
                trainable.append(p)
                budget -= p.numel()
        results = []
        was_training = model.training
        model.eval()
        try:
            for enabled in (True, False):
                self.enabled = enabled
                model.zero_grad(set_to_none=True)
                loss, count = loss_fn(model, batch)
                (loss / count).backward()
                grads = torch.cat([p.grad.flatten().float() if p.grad is not None else torch.zeros(p.numel()) for p in trainable])
                results.append((float(loss.detach()) / count, grads))
        finally:
            self.enabled = True
            model.zero_grad(set_to_none=True)
            model.train(was_training)
        (fast_loss, fast_grads), (ref_loss, ref_grads) = results
        loss_ok = abs(fast_loss - ref_loss) <= 2e-2 * max(1.0, abs(ref_loss))
        cosine = float(F.cosine_similarity(fast_grads, ref_grads, dim=0)) if ref_grads.norm() > 0 else 1.0
        if loss_ok and cosine > 0.99:
            return True
        self.off_reason = (f"it disagrees with the model's own forward on this model (loss {fast_loss:.5f} vs {ref_loss:.5f}, "
                           f"gradient cosine {cosine:.4f})")
        log.warning("fast CPU path off: %s; training with the model's own forward", self.off_reason)
        self.remove()
        return False

    def remove(self) -> None:
        """Undo every change, in reverse order (idempotent)."""
        self.patches.undo()
        self.groups, self.norms, self.mlps, self.attention_modules, self.replaced_attention = [], [], [], [], None
        self.packed_bytes = 0
        self.packs_sequences = False

    def __enter__(self) -> "FastPath":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
