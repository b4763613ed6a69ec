"""A Ctrl-C that Python swallows (raised inside a weakref callback or a __del__, where the
interpreter prints "Exception ignored" and carries on) is not lost: `remembering_ctrl_c` records
it and the next safe point raises it."""

from __future__ import annotations

import signal

import pytest

from helpers import ctrl_c_inside_a_finalizer
from slmops.interrupts import raise_if_interrupted, remembering_ctrl_c


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_ctrl_c_swallowed_by_a_finalizer_is_raised_at_the_next_safe_point():
    with remembering_ctrl_c():
        ctrl_c_inside_a_finalizer()  # returns: the interrupt was swallowed
        with pytest.raises(KeyboardInterrupt):
            raise_if_interrupted()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    raise_if_interrupted()  # outside, nothing is remembered


def test_a_ctrl_c_still_raises_at_once_and_another_handler_is_left_alone():
    with remembering_ctrl_c():
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    seen = []
    previous = signal.signal(signal.SIGINT, lambda *_: seen.append("mine"))
    try:
        with remembering_ctrl_c():
            signal.raise_signal(signal.SIGINT)
            raise_if_interrupted()
        assert seen == ["mine"]
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_finetune_from_python_stops_by_the_next_step_when_a_finalizer_swallows_the_ctrl_c(tiny_llama, tmp_path, monkeypatch):
    from helpers import lose_a_ctrl_c_after_step, tiny_config

    from slmops import finetune

    logged = lose_a_ctrl_c_after_step(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        finetune(tiny_config(tiny_llama, tmp_path / "out", max_steps=40, logging_steps=1))
    assert logged == [1, 2]  # not on to step 40
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
