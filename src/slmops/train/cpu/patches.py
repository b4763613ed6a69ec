"""The fast path's changes to a model, recorded as they are made so that one call undoes
them all, in reverse order: replaced forwards, attributes set, weights re-pointed, and the
attention implementation switched. Nothing here touches a process-wide setting."""

from __future__ import annotations

import types
from collections.abc import Callable

from torch import nn


class Patches:
    def __init__(self):
        self._undo: list[Callable[[], None]] = []

    def __len__(self) -> int:
        return len(self._undo)

    def replace_forward(self, module: nn.Module, forward: Callable) -> None:
        """module.forward(*args) becomes forward(module, own_forward, *args, **kwargs), where
        own_forward is what module.forward was (for the cases the replacement leaves to it)."""
        had_own = "forward" in vars(module)
        own = module.forward
        module.forward = types.MethodType(lambda self, *args, **kwargs: forward(self, own, *args, **kwargs), module)

        def undo():
            if had_own:
                module.forward = own
            else:
                del module.forward  # back to the class's forward

        self._undo.append(undo)

    def set_attr(self, obj, name: str, value) -> None:
        had = name in vars(obj)
        old = vars(obj).get(name)
        setattr(obj, name, value)
        self._undo.append(lambda: setattr(obj, name, old) if had else delattr(obj, name))

    def on_undo(self, undo: Callable[[], None]) -> None:
        """Any other change: `undo` restores it."""
        self._undo.append(undo)

    def undo(self) -> None:
        while self._undo:
            self._undo.pop()()
