"""How slmops talks while it works: one logger ("slmops"), and progress bars that show
exactly when that logger shows information (the CLI's --log_level 1 or lower; a library
caller that leaves logging alone sees no bars). No separate `quiet` switch."""

from __future__ import annotations

import logging

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
