"""Device and dtype policy: bf16 where the hardware computes it fast, fp32 elsewhere."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from functools import lru_cache

import torch


# oneDNN's ISA levels (ONEDNN_MAX_CPU_ISA) at which its bf16 products use AVX512-BF16 dot
# products; the levels with tiles have AMX in their names.
_ONEDNN_BF16_LEVELS = {"AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX10_1_512", "AVX10_2_512"}


def onednn_isa_cap() -> str | None:
    """oneDNN's ISA cap (ONEDNN_MAX_CPU_ISA, or its older name DNNL_MAX_CPU_ISA), upper-case; None
    where none is set (or it is ALL / DEFAULT)."""
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").strip().upper()
    return None if cap in ("", "ALL", "DEFAULT") else cap


def onednn_admits(feature: str) -> bool:
    """Whether oneDNN's ISA cap admits `feature`: "amx" (the tiles) or "avx512_bf16". PyTorch's CPU
    matmuls run under that cap, so the precision choice and the fast path's own kernels follow it
    too: one variable runs a whole training as on a CPU without them
    (ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 on an AMX Xeon)."""
    cap = onednn_isa_cap()
    if cap is None or "AMX" in cap:
        return True
    return feature == "avx512_bf16" and cap in _ONEDNN_BF16_LEVELS


@lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """AMX or AVX512-BF16 on x86 Linux (bf16 matmuls run several times faster than fp32), where
    oneDNN's ISA cap admits them."""
    if platform.system() == "Linux":
        try:
            with open("/proc/cpuinfo") as handle:
                for line in handle:
                    if line.startswith("flags"):
                        flags = set(line.split(":", 1)[1].split())
                        return ("amx_bf16" in flags and onednn_admits("amx")) or \
                            ("avx512_bf16" in flags and onednn_admits("avx512_bf16"))
        except OSError:
            pass
    return False


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


@dataclass(frozen=True)
class Precision:
    """How a run computes. `weights`: dtype of the frozen base weights; `autocast`: dtype of
    autocast regions (None: off); trainable parameters and optimizer state stay fp32."""

    device: torch.device
    weights: torch.dtype
    autocast: torch.dtype | None
    reason: str

    @property
    def name(self) -> str:
        if self.autocast is not None:
            return f"{str(self.autocast).removeprefix('torch.')} autocast"
        return str(self.weights).removeprefix("torch.")


def choose_precision(
    bf16: bool | None, fp16: bool, torch_dtype: str, adapter_method: bool, device: torch.device | None = None
) -> Precision:
    """Decide once, and say why. Adapter methods freeze the base, so it is stored in bf16
    (half the memory, fast matmuls) while adapters train in fp32. Full fine-tuning keeps
    fp32 master weights and runs matmuls under bf16 autocast."""
    device = device or pick_device()
    if fp16:
        if device.type != "cuda":
            raise ValueError("--fp16 needs a CUDA GPU; on a CPU use --bf16 (or nothing: bf16 is chosen when fast)")
        return Precision(device, torch.float32, torch.float16, "--fp16 asked")
    if device.type == "cuda":
        fast = torch.cuda.is_bf16_supported()
        why_fast = "the GPU supports bf16"
    else:
        fast = cpu_has_fast_bf16()
        why_fast = "the CPU has AMX/AVX512-BF16"
    if bf16 is None:
        use_bf16 = fast and torch_dtype in ("auto", "bfloat16")
        reason = f"bf16 chosen automatically: {why_fast}" if use_bf16 else "fp32: no fast bf16 on this device"
        if torch_dtype == "float32":
            reason = "fp32: --torch_dtype float32"
    else:
        use_bf16 = bf16
        reason = "--bf16 true" if bf16 else "--bf16 false"
        if bf16 and not fast:
            reason += " (warning: this device has no fast bf16; expect it to be slower than fp32)"
    if not use_bf16:
        return Precision(device, torch.float32, None, reason)
    if adapter_method:
        return Precision(device, torch.bfloat16, None, reason)
    return Precision(device, torch.float32, torch.bfloat16, reason)
