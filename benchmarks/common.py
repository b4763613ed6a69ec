"""What the benchmarks share: where they ran, and how a piece is timed (benchmarks import it as a sibling module)."""

from __future__ import annotations

import platform
import time

from slmops.models.precision import onednn_isa_cap


def cpu_name() -> str:
    """The CPU's model name, and the oneDNN ISA cap where one is set (it changes which instructions
    every row runs: ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 on an AMX Xeon runs as without tiles)."""
    name = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cap = onednn_isa_cap()
    return f"{name}, ISA capped by ONEDNN_MAX_CPU_ISA={cap}" if cap else name


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
