"""What every benchmark prints about where it ran (benchmarks import it as a sibling module)."""

from __future__ import annotations

import platform


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
