"""What the benchmarks share: where they ran, and how a piece is timed (benchmarks import it as a sibling module)."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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


class Alternation:
    """Which way the training step now running takes, for benchmarks that alternate two ways in one
    process: the candidate on the steps of one parity (`on`), advanced by the loop's after_step
    hook, each step booked to the way it ran (`arms`)."""

    def __init__(self, parity: int):
        self.parity = parity
        self.step = 1
        self.arms: dict[int, bool] = {}  # step -> ran the candidate

    def on(self) -> bool:
        return self.step % 2 == self.parity

    def after_step(self, step: int) -> None:
        self.arms[step] = self.on()
        self.step = step + 1


def run_both_parities(script: str, argv: list[str]) -> list[dict]:
    """Run `script` twice as a worker (`argv` plus --parity 0, then 1, and --out FILE), the candidate
    on even steps in the first process and odd ones in the second; returns what each wrote to its
    FILE (JSON with "rows": the timed steps, as alternating_report reads them)."""
    runs = []
    for parity in (0, 1):
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            print(f"process {parity + 1}/2: the candidate on {'even' if parity == 0 else 'odd'} steps ...", file=sys.stderr, flush=True)
            subprocess.run([sys.executable, script, *argv, "--parity", str(parity), "--out", out.name], check=True,
                           env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
            runs.append(json.loads(Path(out.name).read_text()))
    return runs


def print_alternating_report(runs: list[dict]) -> None:
    """Each way's steps and tokens/s over both processes, their ratio, and the median per-batch ratio."""
    rates, per_batch, batches = alternating_report([run["rows"] for run in runs])
    for arm in (True, False):
        steps = sum(r["candidate"] == arm for run in runs for r in run["rows"])
        print(f"{'candidate' if arm else 'peer':9s}  {steps:3d} steps  {rates[arm]:7.1f} tokens/s")
    print(f"ratio (candidate / peer, tokens/s): {rates[True] / rates[False]:.3f}; median per batch: {per_batch:.3f} over {batches} batches")


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
