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


class TrainingClock:
    """The time a run has left, with training steps and pauses (evaluation, checkpoint) timed
    apart: a bar's own rate counts an evaluation's pause into the next steps, so its estimate
    jumps after each evaluation and drifts back. Here the steps left are priced at the median
    of the recent training steps, and the pauses left at the mean pause so far."""

    def __init__(self, total_steps: int, pause_every: int | None, start_step: int = 0, window: int = 20):
        self.total, self.pause_every, self.step = total_steps, pause_every, start_step
        self.window = window
        self.first_step: float | None = None  # kept apart: it pays for warm-up (kernels, allocator)
        self.step_seconds: list[float] = []  # the last `window` training steps after the first
        self.pause_seconds: list[float] = []

    def stepped(self, seconds: float) -> None:
        self.step += 1
        if self.first_step is None:
            self.first_step = seconds
        else:
            self.step_seconds = (self.step_seconds + [seconds])[-self.window :]

    def paused(self, seconds: float) -> None:
        self.pause_seconds.append(seconds)

    def pauses_left(self) -> int:
        """Pauses still to come: at each multiple of pause_every after this step, and at the last step."""
        if not self.pause_every or self.step >= self.total:
            return 0
        every = self.pause_every
        return self.total // every - self.step // every + (1 if self.total % every else 0)

    def remaining(self) -> float | None:
        """Seconds left, or None before the first training step has been timed."""
        timed = self.step_seconds or ([self.first_step] if self.first_step is not None else [])
        if not timed:
            return None
        per_step = sorted(timed)[len(timed) // 2]  # the median: one slow step (a GC pause) does not move it
        per_pause = sum(self.pause_seconds) / len(self.pause_seconds) if self.pause_seconds else 0.0
        return (self.total - self.step) * per_step + self.pauses_left() * per_pause

    def describe(self) -> str:
        """'01:23 left' ('+eval' while no evaluation has been timed yet)."""
        left = self.remaining()
        if left is None:
            return "? left"
        minutes, seconds = divmod(int(round(left)), 60)
        hours, minutes = divmod(minutes, 60)
        clock = f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes:02d}:{seconds:02d}"
        return clock + (" left" if self.pause_seconds or not self.pauses_left() else " left +eval")
