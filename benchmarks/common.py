"""What the benchmarks share: where they ran, and how a piece is timed (benchmarks import it as a sibling module)."""

from __future__ import annotations

import platform
import statistics
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


def alternating_report(runs: list[list[dict]]) -> tuple[dict[bool, float], float, int]:
    """Two processes' steps, each {"step", "candidate" (ran the candidate), "seconds", "tokens"},
    the candidate on opposite parities in the two: tokens/s of each arm over all steps, and the
    median of the per-batch ratios (the same step of the two processes is the same batch, same
    seed, run once each way) with how many batches it is over."""
    rows = [r for run in runs for r in run]
    rates = {}
    for arm in (True, False):
        mine = [r for r in rows if r["candidate"] == arm]
        rates[arm] = sum(r["tokens"] for r in mine) / sum(r["seconds"] for r in mine)
    first, second = ({r["step"]: r for r in run} for run in runs)
    per_batch = [(b if a["candidate"] else a)["seconds"] / (a if a["candidate"] else b)["seconds"]
                 for step, a in first.items() if (b := second.get(step)) and a["candidate"] != b["candidate"]]
    return rates, statistics.median(per_batch), len(per_batch)
