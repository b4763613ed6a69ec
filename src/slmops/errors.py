"""Typed errors. Library code raises these; only the CLI turns them into a message and an
exit code. Each subclasses a builtin so callers can catch them the usual way."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class SlmopsError(Exception):
    """Base class of every error slmops raises on purpose (bad input, not a bug)."""


class ConfigError(SlmopsError, ValueError):
    """A flag, config key or value is wrong."""


class DataError(SlmopsError, ValueError):
    """The dataset cannot be read or does not fit the requested format."""


class ModelError(SlmopsError, ValueError):
    """The model cannot be resolved, fetched or adapted as asked."""


class OutputError(SlmopsError, OSError):
    """The output folder cannot be written, or holds another run."""


def suggest(word: str, choices: Iterable[str], n: int = 1) -> str:
    """' Did you mean X?' for the nearest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(word, list(choices), n=n, cutoff=0.6)
    if not close:
        return ""
    return " Did you mean " + " or ".join(repr(c) for c in close) + "?"
