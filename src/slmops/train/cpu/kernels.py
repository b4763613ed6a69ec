"""Fused CPU kernels (kernels.c), compiled on first use and called through ctypes.

On a CPU, training a small model at short sequence lengths spends as much time in
elementwise ops as in matrix products: RMSNorm is seven PyTorch ops forward and eight
backward, SwiGLU five, each a full pass over memory plus dispatch and an autograd node.
The C file does each in one pass. It is plain C with OpenMP (no PyTorch headers), so the
system C compiler builds it in under a second; the library is cached under
~/.cache/slmops/kernels (or $SLMOPS_CACHE/kernels), keyed by a hash of the source, the
compiler, its flags and the CPU's features. The folder is private (0700, refused when another
user owns it or can write to it) and a cached library is loaded only when its sha256 and CPU
features match the record written when slmops built it (`_verify`): a planted or foreign
library is rebuilt, never run.

Without a C compiler, or with SLMOPS_CPU_KERNELS=0, `get()` returns None and callers use
their PyTorch code path: same results, slower."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import logging
import math
import os
import platform
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import NamedTuple

import torch

from slmops.models.precision import onednn_admits

log = logging.getLogger("slmops")

SOURCE = Path(__file__).with_name("kernels.c")
SOURCES = (SOURCE, SOURCE.with_name("packed_attention.c"), SOURCE.with_name("packed_attention_f32.c"),
           SOURCE.with_name("nf4.c"))  # (kernels.c includes the others: one library)
VERSION = 12  # slmops_kernels_version() in the C file
_SUFFIX = {torch.bfloat16: "bf16", torch.float32: "f32"}
# A trainable RMSNorm weight's gradient is summed over this many fixed blocks of rows, then over the
# blocks: the same sum whatever the thread count (up to this many threads share the rows).
RMSNORM_DW_PARTS = 16
# The packed attention kernels take heads whose size is a multiple of this: the bf16 kernel's inner
# step (AMX tiles, AVX512-BF16 dot products), the fp32 kernel's two AVX2 vectors.
_PACKED_ATTENTION_HEAD_MULTIPLE = {torch.bfloat16: 32, torch.float32: 16}


def _cache_dir() -> Path:
    root = os.environ.get("SLMOPS_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "slmops") / "kernels"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


# -march=native: the library is built on the machine that runs it (AVX-512 where present).
# No -ffast-math: in a shared library it would switch the whole process to flush denormals.
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-shared", "-fPIC"]


class CacheRefused(RuntimeError):
    """The kernel cache cannot be trusted (shared folder, foreign file, wrong hash or CPU)."""


def cpu_features() -> str:
    """The CPU's feature flags (what -march=native compiles for), as one sorted string."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return " ".join(sorted(set(line.split(":", 1)[1].split())))
    except OSError:
        pass
    return platform.machine()


def _check_private(path: Path, what: str) -> None:
    """Owned by this user and writable by nobody else: a library that another user could
    replace (a shared cache folder, a planted file) would run as this user on import."""
    info = path.stat()
    if info.st_uid != os.getuid():
        raise CacheRefused(f"{what} {path} belongs to another user (uid {info.st_uid})")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise CacheRefused(f"{what} {path} is writable by others (mode {stat.S_IMODE(info.st_mode):04o}); "
                           f"fix with: chmod go-w {path}")


def _private_dir(path: Path) -> Path:
    """Create `path` (mode 0700) if needed and check it and its parent are private."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    _check_private(path.parent, "cache folder")
    _check_private(path, "kernel cache folder")
    return path


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _compiler_version(compiler: str) -> str:
    return subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False).stdout


def library_path(compiler: str, flags: list[str] = FLAGS) -> Path:
    """Where the library for this source, compiler, flags and CPU lives in the cache. Keyed
    on the CPU's features too: -march=native code built on one CPU dies with SIGILL on another
    (a home folder shared over NFS, a container image built elsewhere)."""
    key = hashlib.sha256(b"".join(path.read_bytes() for path in SOURCES) + _compiler_version(compiler).encode() + " ".join(flags).encode()
                         + cpu_features().encode()).hexdigest()[:16]
    return _cache_dir() / f"cpu_kernels-{key}.so"


def _build(compiler: str, flags: list[str] = FLAGS) -> Path:
    """The library for this source, compiler, flags and CPU, from the private cache or built
    into it. Each build records its sha256 and the CPU features it was built for beside it
    (NAME.json); a cached library is used only when both still match."""
    target = library_path(compiler, flags)
    version = _compiler_version(compiler)
    features = cpu_features()
    folder = _private_dir(target.parent)
    record = target.with_suffix(".json")
    if target.exists() or record.exists():
        try:
            _verify(target, record, features)
            return target
        except (CacheRefused, OSError, ValueError, KeyError) as problem:
            log.warning("cached CPU kernel library not used (%s): building it again", problem)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        built = Path(tmp) / target.name
        result = subprocess.run([compiler, *flags, str(SOURCE), "-o", str(built), "-lm"], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[:2000]}")
        os.chmod(built, 0o700)
        staged_record = Path(tmp) / record.name
        staged_record.write_text(json.dumps({"sha256": _sha256(built), "cpu_features": features, "compiler": version.splitlines()[0] if version else compiler,
                                             "flags": flags, "version": VERSION}, indent=2))
        os.replace(built, target)  # atomic: a concurrent build of the same source is harmless
        os.replace(staged_record, record)
    _verify(target, record, features)
    return target


def _verify(library: Path, record_file: Path, features: str) -> None:
    """Refuse a library this process did not build for this CPU: foreign owner or mode, no
    record, a hash that differs from the record, or other CPU features."""
    if not record_file.is_file():
        raise CacheRefused(f"{library.name} has no build record")
    _check_private(library, "kernel library")
    _check_private(record_file, "kernel build record")
    record = json.loads(record_file.read_text())
    if record["cpu_features"] != features:
        raise CacheRefused(f"{library.name} was built for another CPU")
    if _sha256(library) != record["sha256"]:
        raise CacheRefused(f"{library.name} differs from the library slmops built (sha256 mismatch)")

class PackedWeight(NamedTuple):
    """A linear weight (out, in) in AMX's tile layout (Kernels.pack_weight)."""

    data: torch.Tensor
    out_features: int
    in_features: int


class Kernels:
    """The compiled library; each method takes contiguous CPU tensors of one dtype."""

    def __init__(self, lib: ctypes.CDLL):
        self.lib = lib
        p, i64, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
        for suffix in _SUFFIX.values():
            getattr(lib, f"rmsnorm_fwd_{suffix}").argtypes = [p, p, p, p, i64, i64, f32]
            getattr(lib, f"rmsnorm_bwd_{suffix}").argtypes = [p, p, p, p, p, i64, i64]
            getattr(lib, f"rmsnorm_bwd_dw_{suffix}").argtypes = [p, p, p, p, p, p, i64, i64, i64]
            getattr(lib, f"swiglu_fwd_{suffix}").argtypes = [p, p, p, i64]
            getattr(lib, f"swiglu_bwd_{suffix}").argtypes = [p, p, p, p, p, i64]
            getattr(lib, f"rope_heads_first_{suffix}").argtypes = [p, i64, p, p, i64, p, i64, i64, i64, i64, f32]
            getattr(lib, f"rope_tokens_first_{suffix}").argtypes = [p, p, p, i64, p, i64, i64, i64, i64, f32]
            getattr(lib, f"rope_rows_{suffix}").argtypes = [p, i64, p, p, p, i64, i64, i64, f32]
            for name in ("lora_drop_h", "lora_drop_da", "lora_drop_dx"):
                getattr(lib, f"{name}_{suffix}").argtypes = [p, p, p, p, i64, i64, i64, i64, i64]
            for name in ("rmsnorm_fwd", "rmsnorm_bwd", "rmsnorm_bwd_dw", "swiglu_fwd", "swiglu_bwd", "rope_heads_first", "rope_tokens_first", "rope_rows",
                         "lora_drop_h", "lora_drop_da", "lora_drop_dx"):
                getattr(lib, f"{name}_{suffix}").restype = None
        lib.drop_positions_seeded.argtypes = [ctypes.c_uint64, i64, i64, ctypes.c_double, i64, i64, p]
        lib.drop_positions_seeded.restype = i64
        lib.amx_scratch_elements.argtypes = [i64, i64, i64, ctypes.c_int]
        lib.amx_scratch_elements.restype = i64
        lib.amx_matmul.argtypes = [p, i64, i64, p, i64, i64, p, p, i64, i64, i64, i64, f32, ctypes.c_int, ctypes.c_int]
        lib.amx_matmul.restype = ctypes.c_int
        lib.amx_packed_weight_elements.argtypes = [i64, i64]
        lib.amx_packed_weight_elements.restype = i64
        lib.amx_pack_weight.argtypes = [p, i64, i64, p]
        lib.amx_pack_weight.restype = None
        lib.amx_linear.argtypes = [p, i64, p, p, i64, i64, i64, i64, ctypes.c_int]
        lib.amx_linear.restype = ctypes.c_int
        lib.fa_available.restype = ctypes.c_int
        lib.fa_forward_bf16.argtypes = [p, p, p, p, i64, i64, i64, i64, f32, ctypes.c_int, p, p]
        lib.fa_forward_bf16.restype = ctypes.c_int
        lib.fa_backward_bf16.argtypes = [p, p, p, p, p, p, p, i64, i64, i64, i64, f32, ctypes.c_int, p, p, p]
        lib.fa_backward_bf16.restype = ctypes.c_int
        lib.fa_f32_available.restype = ctypes.c_int
        lib.fa_forward_f32.argtypes = [p, p, p, p, i64, i64, i64, i64, f32, i64, p, p]
        lib.fa_forward_f32.restype = ctypes.c_int
        lib.fa_backward_f32.argtypes = [p, p, p, p, p, p, p, i64, i64, i64, i64, f32, i64, p, p, p]
        lib.fa_backward_f32.restype = ctypes.c_int
        lib.nf4_dequantize.argtypes = [p, p, p, i64, i64, p, p]
        lib.nf4_dequantize.restype = ctypes.c_int
        lib.lora_operands_bf16.argtypes = [p, p, p, p, p, i64, i64, i64, i64, p, p, p]
        lib.lora_operands_bf16.restype = None
        for suffix in _SUFFIX.values():
            getattr(lib, f"transpose_{suffix}").argtypes = [p, i64, i64, p]
            getattr(lib, f"transpose_{suffix}").restype = None
        # AMX tiles: built with them (-march=native on a CPU that has them), granted by the kernel, and
        # admitted by the ISA cap PyTorch's own matmuls run under (precision.onednn_admits)
        self.amx = bool(lib.amx_available()) and onednn_admits("amx")
        # the packed attention: on the tiles where there are, else on AVX512-BF16 dot products (built with
        # them, and admitted by the ISA cap)
        self.packed_attention = bool(lib.fa_available()) and onednn_admits("avx512_bf16")
        # and in fp32 on AVX2 + FMA (packed_attention_f32.c): CPUs without fast bf16 train in fp32. Built on
        # every CPU with AVX2 + FMA (the tests run it wherever it builds); used where the CPU has no AVX-512,
        # where it was measured against SDPA (Zen 3: 1.6-2.4x). With AVX-512, SDPA's fp32 kernel runs 16
        # lanes wide against this kernel's 8 and the two have not been compared, so SDPA keeps fp32 there.
        self.packed_attention_f32_built = bool(lib.fa_f32_available())
        self.packed_attention_f32 = self.packed_attention_f32_built and "avx512f" not in cpu_features().split()
        self._scratch = threading.local()

    @staticmethod
    def supports(*tensors: torch.Tensor) -> bool:
        first = tensors[0]
        return (first.device.type == "cpu" and first.dtype in _SUFFIX
                and all(t.device.type == "cpu" and t.dtype == first.dtype and t.is_contiguous() for t in tensors))

    def rmsnorm_forward(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        cols = x.shape[-1]
        rows = x.numel() // cols
        y = torch.empty_like(x)
        inv_rms = torch.empty(*x.shape[:-1], 1, dtype=torch.float32)
        getattr(self.lib, f"rmsnorm_fwd_{_SUFFIX[x.dtype]}")(x.data_ptr(), weight.data_ptr(), y.data_ptr(), inv_rms.data_ptr(), rows, cols, eps)
        return y, inv_rms

    def rmsnorm_backward(self, grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, inv_rms: torch.Tensor) -> torch.Tensor:
        cols = x.shape[-1]
        dx = torch.empty_like(x)
        getattr(self.lib, f"rmsnorm_bwd_{_SUFFIX[x.dtype]}")(grad.data_ptr(), x.data_ptr(), weight.data_ptr(), inv_rms.data_ptr(),
                                                             dx.data_ptr(), x.numel() // cols, cols)
        return dx

    def rmsnorm_backward_with_weight(self, grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                                     inv_rms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """rmsnorm_backward's dx and the weight's gradient (fp32, summed over the rows in fixed blocks)."""
        cols = x.shape[-1]
        rows = x.numel() // cols
        dx = torch.empty_like(x)
        parts = max(1, min(RMSNORM_DW_PARTS, rows))
        dw_parts = torch.zeros(parts, cols, dtype=torch.float32)
        getattr(self.lib, f"rmsnorm_bwd_dw_{_SUFFIX[x.dtype]}")(grad.data_ptr(), x.data_ptr(), weight.data_ptr(), inv_rms.data_ptr(),
                                                                dx.data_ptr(), dw_parts.data_ptr(), parts, rows, cols)
        return dx, dw_parts.sum(0)

    def swiglu_forward(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(gate)
        getattr(self.lib, f"swiglu_fwd_{_SUFFIX[gate.dtype]}")(gate.data_ptr(), up.data_ptr(), out.data_ptr(), gate.numel())
        return out

    def swiglu_backward(self, grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d_gate, d_up = torch.empty_like(gate), torch.empty_like(up)
        getattr(self.lib, f"swiglu_bwd_{_SUFFIX[gate.dtype]}")(grad.data_ptr(), gate.data_ptr(), up.data_ptr(), d_gate.data_ptr(),
                                                              d_up.data_ptr(), gate.numel())
        return d_gate, d_up


    # Sparse LoRA dropout (see the C file): k adapters over one input x (n, in), adapter j
    # dropping the flat positions `dropped` (sorted, int64) in [j * x.numel(), (j + 1) * x.numel()).
    # a_t: (in, k * r), the adapters' A matrices transposed side by side; d_pre: (n, k * r).
    # All tensors contiguous, one dtype (bf16 or fp32) but `da`, which is fp32.

    def lora_drop_h(self, h: torch.Tensor, x: torch.Tensor, a_t: torch.Tensor, dropped: torch.Tensor, k: int) -> None:
        """h (n, k * r) holding x @ a_t: subtract the dropped elements' terms, in place."""
        getattr(self.lib, f"lora_drop_h_{_SUFFIX[x.dtype]}")(h.data_ptr(), x.data_ptr(), a_t.data_ptr(), *_drops(x, a_t, dropped, k))

    def lora_drop_da(self, da: torch.Tensor, x: torch.Tensor, d_pre: torch.Tensor, dropped: torch.Tensor, k: int) -> None:
        """da (in, k * r) fp32 holding x.T @ d_pre: subtract the dropped elements' terms, in place."""
        getattr(self.lib, f"lora_drop_da_{_SUFFIX[x.dtype]}")(da.data_ptr(), x.data_ptr(), d_pre.data_ptr(), *_drops(x, d_pre, dropped, k))

    def lora_drop_dx(self, dx: torch.Tensor, d_pre: torch.Tensor, a_t: torch.Tensor, dropped: torch.Tensor, k: int) -> None:
        """dx (n, in) holding d_pre @ a_t.T (plus other terms): subtract the dropped elements' terms, in place."""
        getattr(self.lib, f"lora_drop_dx_{_SUFFIX[dx.dtype]}")(dx.data_ptr(), d_pre.data_ptr(), a_t.data_ptr(), *_drops(dx, a_t, dropped, k))

    def drop_positions(self, seed: int, first: int, count: int, log_keep: float, end: int, numel: int) -> tuple[torch.Tensor, bool]:
        """Positions after `end` from `count` geometric gaps, their uniforms drawn from `seed`
        (uniforms first .. first + count - 1 of its stream; see the C file and
        lora.drop_positions); (those below numel, whether all `count` were used)."""
        out = torch.empty(count, dtype=torch.int64)
        written = self.lib.drop_positions_seeded(seed, first, count, log_keep, end, numel, out.data_ptr())
        return out[:written], written == count

    def amx_matmul(self, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None, *, alpha: float = 1.0,
                   accumulate: bool = False, fp32: bool = False, transposed: bool = False) -> torch.Tensor:
        """alpha * a @ b (+ out when accumulate) on AMX tiles (`self.amx` only): a (m, k) and b (k, n)
        bf16 matrices (views with a unit stride either way take no copy), k even. The result is bf16,
        or fp32 with `fp32`; with `transposed` it is fp32 and stored as its transpose (n, m). `out`,
        if given, must be contiguous and of that dtype and shape."""
        if not self.amx:
            raise RuntimeError("amx_matmul: this library or CPU has no AMX tiles (check `Kernels.amx` first)")
        if a.dtype != torch.bfloat16 or b.dtype != torch.bfloat16:
            raise TypeError(f"amx_matmul multiplies bf16 matrices, got {a.dtype} and {b.dtype}")
        if a.stride(0) != 1 and a.stride(1) != 1:
            a = a.contiguous()
        if b.stride(0) != 1 and b.stride(1) != 1:
            b = b.contiguous()
        m, k = a.shape
        n = b.shape[1]
        if b.shape[0] != k:
            raise ValueError(f"amx_matmul: shapes {tuple(a.shape)} and {tuple(b.shape)} do not chain")
        _check_out(out, (n, m) if transposed else (m, n), torch.float32 if fp32 or transposed else torch.bfloat16)
        a_rows, a_cols = (a.stride(0), 1) if a.stride(1) == 1 else (1, a.stride(1))  # row-major, or a transpose
        scratch = self._packing_buffer(self.lib.amx_scratch_elements(m, n, k, int(a_cols != 1)))
        if out is None:
            out = torch.empty((n, m) if transposed else (m, n), dtype=torch.float32 if fp32 or transposed else torch.bfloat16)
        mode = 2 if transposed else int(fp32)
        if not self.lib.amx_matmul(a.data_ptr(), a_rows, a_cols, b.data_ptr(), b.stride(0), b.stride(1), scratch.data_ptr(),
                                   out.data_ptr(), out.stride(0), m, n, k, alpha, int(accumulate), mode):
            raise ValueError(f"amx_matmul needs an even inner size, got {k}")
        return out

    def packed_attention_for(self, dtype: torch.dtype, head_dim: int) -> bool:
        """Whether this CPU's build has a packed attention kernel for `dtype` (bf16 where it is built,
        fp32 where the fp32 one is used) that takes heads of `head_dim`."""
        enabled = {torch.bfloat16: self.packed_attention, torch.float32: self.packed_attention_f32}.get(dtype, False)
        return bool(enabled) and head_dim % _PACKED_ATTENTION_HEAD_MULTIPLE[dtype] == 0

    def packed_attention_takes(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
        """Whether packed_attention_forward takes these (N, heads, D) operands on this CPU: contiguous,
        query heads a multiple of key/value heads, and bf16 with D a multiple of 32 (the tiles' inner
        step) where the bf16 kernel is built, or fp32 with D a multiple of 16 where the fp32 one is."""
        return (self.packed_attention_for(q.dtype, q.shape[2])
                and all(t.dtype == q.dtype and t.device.type == "cpu" and t.dim() == 3 and t.is_contiguous() for t in (q, k, v))
                and k.shape == v.shape and k.shape[0] == q.shape[0] and k.shape[2] == q.shape[2]
                and q.shape[1] % k.shape[1] == 0)

    def packed_attention_forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offsets: torch.Tensor,
                                 scale: float, prefix: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Causal attention of packed sequences (operands that packed_attention_takes): q (N, H, D), k and
        v (N, Hkv, D), sequence s in rows offsets[s] .. offsets[s + 1] (int64, ascending, ending at N),
        each attending to itself only; with a shared `prefix` (fp32 only: `takes_shared_prefix`), the
        sequences after the first attend to rows 0 .. prefix - 1 before their own. bf16 on AMX tiles
        where the CPU has them, else on AVX512-BF16 dot products; fp32 on AVX2 + FMA. Returns the
        output (N, H, D) in q's dtype and each query row's log-sum-exp of the scaled scores (N, H)
        fp32, for the backward."""
        if not self.packed_attention_takes(q, k, v) or (prefix and not self.takes_shared_prefix(q)):
            raise RuntimeError(f"packed attention: this build or CPU does not take {q.dtype} operands of shapes "
                               f"{tuple(q.shape)}, {tuple(k.shape)}{f' with a shared prefix' if prefix else ''} "
                               "(check `packed_attention_takes` first)")
        tokens, heads, dim = q.shape
        out = torch.empty_like(q)
        lse = torch.empty(tokens, heads, dtype=torch.float32)
        pointers = (q.data_ptr(), k.data_ptr(), v.data_ptr(), offsets.data_ptr(), offsets.numel() - 1, heads, k.shape[1], dim, scale)
        done = (self.lib.fa_forward_bf16(*pointers, int(self.amx), out.data_ptr(), lse.data_ptr()) if q.dtype == torch.bfloat16
                else self.lib.fa_forward_f32(*pointers, prefix, out.data_ptr(), lse.data_ptr()))
        if not done:
            raise MemoryError("packed attention: its buffers could not be allocated")
        return out, lse

    def packed_attention_backward(self, grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                                  lse: torch.Tensor, offsets: torch.Tensor, scale: float, prefix: int = 0) -> tuple[torch.Tensor, ...]:
        """dq, dk, dv (shaped as q, k, v) from grad = dL/d out (contiguous, out's shape and dtype), with
        the forward's `prefix`."""
        if prefix and not self.takes_shared_prefix(q):
            raise RuntimeError(f"packed attention: no {q.dtype} kernel with a shared prefix")
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        pointers = (grad.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr(), offsets.data_ptr(),
                    offsets.numel() - 1, q.shape[1], k.shape[1], q.shape[2], scale)
        done = (self.lib.fa_backward_bf16(*pointers, int(self.amx), dq.data_ptr(), dk.data_ptr(), dv.data_ptr())
                if q.dtype == torch.bfloat16 else self.lib.fa_backward_f32(*pointers, prefix, dq.data_ptr(), dk.data_ptr(), dv.data_ptr()))
        if not done:
            raise MemoryError("packed attention: its buffers could not be allocated")
        return dq, dk, dv

    @staticmethod
    def takes_shared_prefix(q: torch.Tensor) -> bool:
        """Whether the kernel for q's dtype attends to a shared prefix itself (the fp32 one); the bf16
        one's callers merge the prefix's part in (attention.SharedPrefixAttentionFunction)."""
        return q.dtype == torch.float32

    def pack_weight(self, weight: torch.Tensor) -> PackedWeight:
        """A frozen bf16 linear weight (out, in), contiguous, packed once for `amx_linear` (`self.amx` only)."""
        if not self.amx or weight.dtype != torch.bfloat16 or not weight.is_contiguous() or weight.shape[1] % 2:
            raise ValueError("pack_weight takes a contiguous bf16 (out, in) weight with even `in`, on a CPU with AMX")
        out_features, in_features = weight.shape
        packed = torch.empty(self.lib.amx_packed_weight_elements(out_features, in_features), dtype=torch.bfloat16)
        self.lib.amx_pack_weight(weight.data_ptr(), out_features, in_features, packed.data_ptr())
        return PackedWeight(packed, out_features, in_features)

    @staticmethod
    def amx_linear_pays(rows: int) -> bool:
        """Whether `amx_linear` beats oneDNN's linear for an input of this many rows (AMX_LINEAR_MAX_ROWS)."""
        return rows <= AMX_LINEAR_MAX_ROWS

    def amx_linear(self, x: torch.Tensor, weight: PackedWeight, out: torch.Tensor | None = None,
                   accumulate: bool = False) -> torch.Tensor:
        """x (m, in) @ W^T (+ out when accumulate), bf16, W packed by `pack_weight`; x with unit column stride."""
        if x.dim() != 2 or x.shape[1] != weight.in_features:
            raise ValueError(f"amx_linear: input {tuple(x.shape)} for a weight of {weight.in_features} input features")
        if x.dtype != torch.bfloat16 or x.stride(1) != 1:
            x = x.to(torch.bfloat16).contiguous()
        _check_out(out, (x.shape[0], weight.out_features), torch.bfloat16)
        if out is None:
            out = torch.empty(x.shape[0], weight.out_features, dtype=torch.bfloat16)
        if not self.lib.amx_linear(x.data_ptr(), x.stride(0), weight.data.data_ptr(), out.data_ptr(), out.stride(0), x.shape[0],
                                   weight.out_features, weight.in_features, int(accumulate)):
            raise ValueError(f"amx_linear needs an even inner size, got {weight.in_features}")
        return out

    def lora_operands(self, a: list[torch.Tensor], b: list[torch.Tensor], scales: list[float], columns: list[int],
                      total: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The bf16 operands of k adapters from their contiguous fp32 A_j (r, in) and B_j (size_j, r):
        A stacked (k r, in), its transpose (in, k r), and the block matrix (k r, total) holding
        scales[j] B_j^T in rows j r .. j r + r - 1 and columns columns[j] .. columns[j] + size_j - 1,
        zero elsewhere."""
        k, (r, features) = len(a), a[0].shape
        if not (len(b) == len(scales) == len(columns) == k and all(m.shape == (r, features) for m in a)
                and all(m.shape[1] == r and 0 <= c and c + m.shape[0] <= total for m, c in zip(b, columns))
                and all(m.dtype == torch.float32 and m.is_contiguous() for m in (*a, *b))):
            raise ValueError("lora_operands: k contiguous fp32 A (r, in) and B (size, r) with columns inside `total`")
        a2 = torch.empty(k * r, features, dtype=torch.bfloat16)
        a_t = torch.empty(features, k * r, dtype=torch.bfloat16)
        b_block = torch.empty(k * r, total, dtype=torch.bfloat16)
        pointers = ctypes.c_void_p * k
        sizes = (ctypes.c_int64 * k)(*[m.shape[0] for m in b])
        self.lib.lora_operands_bf16(pointers(*[m.data_ptr() for m in a]), pointers(*[m.data_ptr() for m in b]),
                                    (ctypes.c_float * k)(*scales), (ctypes.c_int64 * k)(*columns), sizes, k, r, features,
                                    total, a2.data_ptr(), a_t.data_ptr(), b_block.data_ptr())
        return a2, a_t, b_block

    def dequantize_4bit(self, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                        shape: tuple[int, ...], dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
        """A bitsandbytes 4-bit weight (NF4 or FP4: `code` holds its 16 levels, fp32) as `dtype` (fp32
        or bf16) of `shape`: packed uint8, two elements a byte (the first in the high nibble), each
        run of `blocksize` elements scaled by its absmax (fp32, nested absmax already expanded).
        `out`: a contiguous tensor of that shape and dtype to write into (a slice of a larger one)."""
        n = math.prod(shape)
        if not (packed.dtype == torch.uint8 and packed.is_contiguous() and packed.numel() * 2 >= n and absmax.dtype == torch.float32
                and absmax.is_contiguous() and absmax.numel() * blocksize >= n and code.dtype == torch.float32 and code.numel() == 16
                and code.is_contiguous() and dtype in (torch.float32, torch.bfloat16)):
            raise ValueError(f"dequantize_4bit: operands not taken ({packed.dtype} {tuple(packed.shape)}, absmax {absmax.dtype} "
                             f"{tuple(absmax.shape)}, code {tuple(code.shape)}, {dtype}, {shape})")
        if out is None:
            out = torch.empty(shape, dtype=dtype)
        elif tuple(out.shape) != tuple(shape) or out.dtype != dtype or not out.is_contiguous():
            raise ValueError(f"dequantize_4bit: out {out.dtype} {tuple(out.shape)} is not a contiguous {dtype} {tuple(shape)}")
        fp32 = dtype == torch.float32
        if not self.lib.nf4_dequantize(packed.data_ptr(), absmax.data_ptr(), code.data_ptr(), n, blocksize,
                                       out.data_ptr() if fp32 else None, None if fp32 else out.data_ptr()):
            raise ValueError(f"dequantize_4bit: {n} elements in blocks of {blocksize} not taken (even, blocks of 16s)")
        return out

    def transpose(self, x: torch.Tensor) -> torch.Tensor:
        """x (rows, cols) contiguous -> its transpose, contiguous."""
        if x.dim() != 2 or not x.is_contiguous() or x.dtype not in _SUFFIX:
            raise ValueError("transpose takes a contiguous bf16 or fp32 matrix")
        rows, cols = x.shape
        out = torch.empty(cols, rows, dtype=x.dtype)
        getattr(self.lib, f"transpose_{_SUFFIX[x.dtype]}")(x.data_ptr(), rows, cols, out.data_ptr())
        return out

    def _packing_buffer(self, elements: int) -> torch.Tensor:
        """A bf16 scratch buffer of at least `elements` (B packed for the tiles), kept per thread."""
        buffer = getattr(self._scratch, "buffer", None)
        if buffer is None or buffer.numel() < elements:
            buffer = self._scratch.buffer = torch.empty(elements, dtype=torch.bfloat16)
        return buffer

    @staticmethod
    def rows_strided(x: torch.Tensor) -> bool:
        """(B, T, F) with unit stride along F and one stride between all B * T rows (a column
        slice of a contiguous matrix qualifies), in a supported dtype."""
        return (x.dim() == 3 and x.device.type == "cpu" and x.dtype in _SUFFIX and x.stride(2) == 1
                and x.stride(0) == x.shape[1] * x.stride(1))

    def rope_rows(self, x: torch.Tensor, cos: torch.Tensor, sin_swapped: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        """x (rows, heads, D), bf16 or fp32, each row's heads side by side (any stride between rows),
        rotated per row by cos and sin_swapped ((rows, D) fp32 contiguous; see attention._rope):
        x * cos + swap(x * sin_swapped), or its transpose with `inverse`; a new contiguous tensor
        of x's shape and dtype."""
        rows, heads, dim = x.shape
        if x.stride(2) != 1 or x.stride(1) != dim:
            raise ValueError("rope_rows: each row's heads must be side by side")
        y = torch.empty(rows, heads, dim, dtype=x.dtype)
        getattr(self.lib, f"rope_rows_{_SUFFIX[x.dtype]}")(x.data_ptr(), x.stride(0), cos.data_ptr(), sin_swapped.data_ptr(), y.data_ptr(),
                                                          rows, heads, dim, -1.0 if inverse else 1.0)
        return y

    def rope_heads_first(self, x: torch.Tensor, cos: torch.Tensor | None, sin_swapped: torch.Tensor | None, heads: int,
                         scale: float = 1.0) -> torch.Tensor:
        """x (B, T, heads * D) -> (B, heads, T, D) fp32, rotated by the position embedding
        (cos, sin_swapped: (B or 1, T, D) fp32 contiguous; None: no rotation) and scaled."""
        batch, tokens, features = x.shape
        dim = features // heads
        y = torch.empty(batch, heads, tokens, dim, dtype=torch.float32)
        getattr(self.lib, f"rope_heads_first_{_SUFFIX[x.dtype]}")(
            x.data_ptr(), x.stride(1), *_rope_args(cos, sin_swapped), y.data_ptr(), batch, tokens, heads, dim, scale)
        return y

    def rope_tokens_first(self, g: torch.Tensor, cos: torch.Tensor | None, sin_swapped: torch.Tensor | None, dtype: torch.dtype,
                          scale: float = 1.0) -> torch.Tensor:
        """The transpose: g (B, heads, T, D) fp32 contiguous -> (B, T, heads * D) in dtype,
        with the inverse rotation (the rotation's transpose) and the scale."""
        batch, heads, tokens, dim = g.shape
        y = torch.empty(batch, tokens, heads * dim, dtype=dtype)
        getattr(self.lib, f"rope_tokens_first_{_SUFFIX[dtype]}")(
            g.data_ptr(), *_rope_args(cos, sin_swapped), y.data_ptr(), batch, tokens, heads, dim, scale)
        return y


def _check_out(out: torch.Tensor | None, shape: tuple[int, int], dtype: torch.dtype) -> None:
    """An `out` the AMX kernels write in place must be exactly what they write."""
    if out is not None and (tuple(out.shape) != shape or out.dtype != dtype or not out.is_contiguous()):
        raise ValueError(f"`out` must be a contiguous {dtype} tensor of shape {shape}, got {out.dtype} {tuple(out.shape)}")


def _drops(x: torch.Tensor, adapters: torch.Tensor, dropped: torch.Tensor, k: int) -> tuple:
    """The trailing arguments of the lora_drop kernels: dropped, count, k, n, in, r."""
    n, features = x.shape
    return dropped.data_ptr(), dropped.numel(), k, n, features, adapters.shape[1] // k


def _rope_args(cos: torch.Tensor | None, sin_swapped: torch.Tensor | None) -> tuple:
    if cos is None:
        return None, None, 0
    return cos.data_ptr(), sin_swapped.data_ptr(), 0 if cos.shape[0] == 1 else cos.shape[1] * cos.shape[2]


# Past this many input rows (tokens of a micro-batch) oneDNN's linear is faster than amx_linear
# on packed weights: `python benchmarks/amx_linear.py` on the 2-core AMX Xeon, 2026-12-03, gave
# amx_linear / oneDNN 1.09-2.03x at 320 rows (SmolLM2's products), 0.82-1.56x at 1,024, and
# 0.52-0.95x at 2,048 and 8,192 rows (SmolLM2's and a 1B Llama's), where oneDNN's own blocking
# over many rows wins. Short batches (tone, classification) keep the AMX forward; long documents
# and large batches go to oneDNN.
AMX_LINEAR_MAX_ROWS = 1024


@functools.lru_cache(maxsize=1)
def get() -> Kernels | None:
    """The kernels, built if needed; None (said once) where they cannot be built."""
    if os.environ.get("SLMOPS_CPU_KERNELS", "1") == "0":
        return None
    if not sys.platform.startswith("linux"):  # built and tested with GCC on Linux only
        return None
    compiler = _compiler()
    if compiler is None:
        log.info("no C compiler found: fused CPU kernels off (install gcc for faster CPU training)")
        return None
    try:
        return load(compiler)
    except CacheRefused as error:
        log.warning("fused CPU kernels off: %s; using PyTorch ops instead", error)
        return None
    except (OSError, RuntimeError, AttributeError) as error:
        log.warning("fused CPU kernels unavailable (%s): using PyTorch ops instead", error)
        return None


def load(compiler: str, flags: list[str] = FLAGS) -> Kernels:
    """Build (or find in the cache) and load the library with these compiler flags. Tests
    also build it without AVX-512 (`FLAGS + ["-mno-avx512f"]`): the generic loops other
    CPUs run."""
    path = _build(compiler, flags)
    features = cpu_features()
    _verify(path, path.with_suffix(".json"), features)  # again, just before it is loaded and runs
    lib = ctypes.CDLL(str(path))
    if lib.slmops_kernels_version() != VERSION:
        raise RuntimeError("stale library")
    return Kernels(lib)
