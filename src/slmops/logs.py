"""How slmops talks while it works: one logger ("slmops"), and progress bars that show
exactly when that logger shows information (the CLI's --log_level 1 or lower; a library
caller that leaves logging alone sees no bars). No separate `quiet` switch."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time

log = logging.getLogger("slmops")


def progress_enabled() -> bool:
    return log.isEnabledFor(logging.INFO)


def progress_bar(iterable=None, *, enabled: bool | None = None, **kwargs):
    """tqdm, shown when the slmops logger shows information (or as `enabled` says)."""
    from tqdm.auto import tqdm

    show = progress_enabled() if enabled is None else enabled and progress_enabled()
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("mininterval", 1.0)
    return tqdm(iterable, disable=not show, **kwargs)


def say(bar, message: str) -> None:
    """A line for the user while a progress bar runs: above the bar when it shows, else to the
    log at INFO (so a library caller who keeps logging quiet sees nothing on stdout)."""
    import sys

    if progress_enabled() and not getattr(bar, "disable", True):
        bar.write(f"slmops: {message}", file=sys.stderr)
    else:
        log.info(message)


@contextlib.contextmanager
def phase(what: str, key: str | None = None, size: float = 1.0):
    """A long step without a bar of its own (an ONNX graph build, a parity check, loading a
    model): said when it starts, with how long it should take when this machine has done it
    before (the seconds per unit of `size` last measured for `key` at about this size), and how
    long it took."""
    key = _sized(key, size) if key else None
    expected = _expected_seconds(key, size) if key else None
    log.info("%s ...%s", what, f" (about {_duration(expected)}, from the last time on this machine)" if expected else "")
    started = time.perf_counter()
    yield
    seconds = time.perf_counter() - started
    log.info("%s: done in %s", what, _duration(seconds))
    if key:
        _remember(key, seconds / max(size, 1e-9))


def _sized(key: str, size: float) -> str:
    """The key with the size's power of two: a phase's time is not proportional to size over
    every scale (a tiny model's check is mostly fixed costs: 0.35 s per MB, which priced a
    513 MB model's 46 s check at 11 minutes), so a rate is only used for sizes within a
    factor of about two of the one it was measured on."""
    return f"{key}@2^{max(0, round(math.log2(max(size, 1.0))))}"


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"
    minutes, rest = divmod(int(round(seconds)), 60)
    return f"{minutes} min {rest:02d} s"


def _times_file():
    from slmops.machine import cache_root

    return cache_root() / "phase_seconds.json"  # this user's own cache; JSON, never code


def _expected_seconds(key: str, size: float) -> float | None:
    try:
        rate = json.loads(_times_file().read_text()).get(key)
    except (OSError, ValueError, AttributeError):
        return None
    return float(rate) * size if isinstance(rate, (int, float)) and rate > 0 else None


def _remember(key: str, rate: float) -> None:
    """Keep the rate for next time (a mean with the last one: one slow run does not take over).
    A cache that cannot be written costs the next estimate, nothing else."""
    file = _times_file()
    try:
        try:
            times = json.loads(file.read_text()) if file.is_file() else {}
        except ValueError:  # damaged: start it again
            times = {}
        if not isinstance(times, dict):
            times = {}
        old = times.get(key)
        times[key] = (old + rate) / 2 if isinstance(old, (int, float)) and old > 0 else rate
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_name(f"{file.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(times, indent=1, sort_keys=True))
        tmp.replace(file)
    except (OSError, ValueError):
        pass
