"""Facts about the machine this process runs on (importable from any layer)."""

from __future__ import annotations

import os
from pathlib import Path


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity, as containers and taskset limit it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def threads_setting() -> int | None:
    """SLMOPS_NUM_THREADS, where set: the threads each slmops process uses (training and ONNX
    Runtime alike), e.g. to share a machine between jobs."""
    value = os.environ.get("SLMOPS_NUM_THREADS")
    return int(value) if value else None


def cache_root() -> Path:
    """slmops' own cache on this machine (fetched models, measured step times): $SLMOPS_CACHE,
    else ~/.cache/slmops."""
    return Path(os.environ.get("SLMOPS_CACHE", Path.home() / ".cache" / "slmops"))


def available_memory() -> int | None:
    """Bytes of memory this machine can still give without swapping (MemAvailable; None off Linux)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
