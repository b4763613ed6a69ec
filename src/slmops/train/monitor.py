"""Where metrics go: metrics.jsonl (always) and the run's trackers (train/tracking.py:
TensorBoard, W&B, MLflow, as --report_to asks); what the machine is doing (ResourceMeter)."""

from __future__ import annotations

import json
import time
from pathlib import Path


class MetricsLog:
    def __init__(self, log_dir: Path, tracking=None, resume_step: int | None = None):
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.log_dir / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            # A resumed run continues the same curve: drop what was logged after the checkpoint
            # (and a last line torn by a kill mid-write).
            kept = [json.dumps(r) for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        elif self.path.exists():
            self.path.unlink()
        self.tracking = tracking  # closed by its owner (the recipe), after the outputs are written

    def log(self, step: int, split: str, **values: float) -> None:
        record = {"step": step, "split": split, "time": round(time.time(), 3), **values}
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.tracking is not None:
            self.tracking.log(step, split, values)


class ResourceMeter:
    """Memory and CPU use of this process since the last reading, for the train log (and so
    TensorBoard, the report): resident and peak memory, CPU cores kept busy, GPU memory."""

    def __init__(self):
        self._wall, self._cpu = time.perf_counter(), time.process_time()

    def read(self) -> dict[str, float]:
        import resource

        import torch

        wall, cpu = time.perf_counter(), time.process_time()
        busy = (cpu - self._cpu) / max(wall - self._wall, 1e-9)
        self._wall, self._cpu = wall, cpu
        resident = _resident_bytes() / 2**20
        peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, resident)  # Linux: KiB; the kernel's mark can lag
        reading = {"memory_mb": round(resident, 1), "peak_memory_mb": round(peak, 1), "cpu_cores_busy": round(busy, 2)}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            reading["gpu_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        return reading


def _resident_bytes() -> int:
    try:
        import os

        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):  # not Linux: the peak is the best there is
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl. A line that is not a whole JSON object (the last one
    of a run killed mid-write) is skipped, not fatal."""
    if not Path(path).exists():
        return []
    records = []
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records
