"""A Ctrl-C that is not lost.

Python raises KeyboardInterrupt wherever the main thread is when SIGINT arrives. When that is
inside a weakref callback or a `__del__` (SQLAlchemy's connection finalizers run in the middle
of Optuna's storage calls), the interpreter prints "Exception ignored in ..." and carries on: the
Ctrl-C is gone, and a search worker trains its trial to the end and starts the next one.

`remembering_ctrl_c()` keeps Python's behaviour (raise at once) and also records the interrupt.
Long loops call `raise_if_interrupted()` at their safe points (each training step, each trial,
each poll of a launched run), so an interrupt that was swallowed is raised there instead.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_interrupted = threading.Event()  # set by the handler below; read at safe points


def _remember_and_raise(signum, frame) -> None:
    _interrupted.set()
    raise KeyboardInterrupt


@contextmanager
def remembering_ctrl_c() -> Iterator[None]:
    """While inside: Ctrl-C raises KeyboardInterrupt as usual and is remembered for
    `raise_if_interrupted`. Leaves a handler someone else installed alone, and does nothing off
    the main thread (where Python allows no signal handlers)."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    _interrupted.clear()
    signal.signal(signal.SIGINT, _remember_and_raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        _interrupted.clear()


def raise_if_interrupted() -> None:
    """Raise KeyboardInterrupt if a Ctrl-C arrived (and may have been swallowed) since
    `remembering_ctrl_c()` was entered; a no-op otherwise."""
    if _interrupted.is_set():
        raise KeyboardInterrupt
