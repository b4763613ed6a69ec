"""glibc's malloc kept from handing large tensors back to the kernel between steps.

By default glibc serves a request over its mmap threshold (128 KB, raised as blocks are freed,
to at most 32 MB) with a fresh mmap and unmaps it on free, and gives the top of the heap back
to the kernel once more than the trim threshold is free there. A training step allocates the
same large activations every time (on a 1B Llama shape at 8 x 256 tokens, each MLP
intermediate is 2,048 x 8,192 bf16 = 32 MiB, just over the largest threshold), so each one was
faulted in page by page again every step: a fused SwiGLU over such a tensor took 17 ms, 5.5 ms
with the blocks reused (`benchmarks/allocator.py`), and the 1B benchmark trained 12-40% faster.

`keep_freed_blocks()` raises both thresholds once per process (mallopt; the same as starting
it with MALLOC_TRIM_THRESHOLD_=256MiB MALLOC_MMAP_THRESHOLD_=64MiB): blocks up to 64 MB come from
the heap and up to 256 MB of freed heap stays mapped for the next step. Resident memory grows
by what the heap keeps (measured: +25-130 MB on the benchmark workloads). It is process-wide
and stays for the life of the process, so it is applied only with the CPU fast path (its
switch: --cpu_fast_path off), never over the user's own malloc settings, and
SLMOPS_MALLOC_TUNING=0 turns it off alone. Without glibc (musl, macOS, Windows) it does nothing.
The numbers it changes are none: only where memory comes from."""

from __future__ import annotations

import ctypes
import logging
import os
import sys

log = logging.getLogger("slmops")

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

TRIM_THRESHOLD = 256 << 20  # freed heap kept mapped, at most
MMAP_THRESHOLD = 64 << 20  # blocks below this come from the heap (mallopt's return says whether glibc took it)

# the user's own malloc settings, which win
USER_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")

_applied: bool | None = None  # once per process


def keep_freed_blocks() -> bool:
    """Raise glibc's trim and mmap thresholds (see the module docstring); True when they are
    in effect after the call. Idempotent."""
    global _applied
    if _applied is None:
        _applied = _apply()
    return _applied


def _apply() -> bool:
    why_not = _why_not()
    libc = None if why_not else _glibc()
    if libc is None:
        log.debug("malloc thresholds left as they are: %s", why_not or "not glibc")
        return False
    libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # the trim threshold first: setting either one ends glibc's own adjustment of the mmap
    # threshold, and with only the mmap threshold raised each freed top block is trimmed again
    applied = libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    log.debug("malloc: blocks under %d MB from the heap, %d MB of freed heap kept: %s", MMAP_THRESHOLD >> 20,
              TRIM_THRESHOLD >> 20, "in effect" if applied else "refused by this libc")
    return applied


def _why_not() -> str | None:
    """Why the user's setting, not ours, holds (None: nothing stands in the way)."""
    if os.environ.get("SLMOPS_MALLOC_TUNING", "1") == "0":
        return "SLMOPS_MALLOC_TUNING=0"
    users = [name for name in USER_SETTINGS if name in os.environ]
    if users or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return f"the environment sets malloc's own ({', '.join(users) or 'GLIBC_TUNABLES'})"
    return None


def _glibc():
    """The process's C library when it is glibc (musl has mallopt as a no-op); else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    return libc if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt") else None
