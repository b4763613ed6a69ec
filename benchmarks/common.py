"""What the benchmarks share: where they ran, and how a piece is timed (benchmarks import it as a sibling module)."""

from __future__ import annotations

import platform
import time


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def median_seconds(run, repeats: int = 8, warmup: int = 2) -> float:
    """The median wall time of `repeats` calls of run(), after `warmup` untimed ones."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]
