"""Shared CLI plumbing: flags generated from the pydantic schema (one source of truth for
names, help and defaults), unknown-flag suggestions, logging levels, error exit."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import typing
import warnings
from collections.abc import Iterable

from pydantic import BaseModel

from slmops.errors import ConfigError, suggest

LOG_LEVELS = [logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR, logging.CRITICAL]


class Parser(argparse.ArgumentParser):
    """argparse that names the nearest valid flag for an unknown one, and never accepts an
    abbreviation (a typo like --max_step must not silently become --max_steps)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        # Unknown flags first: a misspelt required flag (--model_name_or_pth) should be named
        # as misspelt, not reported as the required flag missing.
        with self._nothing_required():
            parsed, unknown = self.parse_known_args(args, namespace)
        if not unknown:
            parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:
            parser = self._deepest_subparser(parsed)
            flags = [s for action in parser._actions for s in action.option_strings]
            problems = []
            previous_was_flag = False
            for token in unknown:
                if token.startswith("-"):
                    name = token.split("=", 1)[0]
                    problems.append(f"unknown flag {name}.{suggest(name, flags)}")
                    previous_was_flag = "=" not in token
                elif not previous_was_flag:  # a value after an unknown flag is not news
                    problems.append(f"unexpected argument {token!r}")
                else:
                    previous_was_flag = False
            parser.error("; ".join(problems))
        return parsed

    @contextlib.contextmanager
    def _nothing_required(self):
        parsers, changed = [self], []
        while parsers:
            parser = parsers.pop()
            for action in parser._actions:
                if action.required:
                    changed.append(action)
                    action.required = False
                if isinstance(action, argparse._SubParsersAction):
                    parsers.extend(action.choices.values())
        try:
            yield
        finally:
            for action in changed:
                action.required = True

    def _deepest_subparser(self, parsed) -> argparse.ArgumentParser:
        """The parser of the (sub)command the user chose, for flag suggestions."""
        parser: argparse.ArgumentParser = self
        while True:
            sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
            chosen = getattr(parsed, sub.dest, None) if sub else None
            if not chosen or chosen not in sub.choices:
                return parser
            parser = sub.choices[chosen]

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\nRun '{self.prog} --help' for all flags.\n")


def _is_bool(annotation) -> bool:
    return annotation is bool or (typing.get_origin(annotation) in (typing.Union, getattr(__import__("types"), "UnionType", None)) and bool in typing.get_args(annotation))


def add_schema_flags(parser: argparse.ArgumentParser, schema: type[BaseModel], title: str, skip: Iterable[str] = ()) -> list[str]:
    """Add one --flag per schema field (with its dashed spelling and short aliases as
    aliases). Defaults stay in the schema: unset flags are simply absent."""
    group = parser.add_argument_group(title)
    names = []
    for name, field in schema.model_fields.items():
        if name in skip or isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            continue
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        spellings = [*extra.get("cli", []), f"--{name}"]
        if "_" in name:
            spellings.append(f"--{name.replace('_', '-')}")
        default = field.get_default(call_default_factory=False)
        help_text = (field.description or "") + (f" [default: {default}]" if default not in (None, [], "") else "")
        kwargs: dict = {"dest": name, "default": argparse.SUPPRESS, "help": help_text.replace("%", "%%")}
        if _is_bool(field.annotation):
            kwargs.update(nargs="?", const="true", metavar="true|false")
        else:
            kwargs["metavar"] = name.upper()
        group.add_argument(*spellings, **kwargs)
        names.append(name)
    return names


class _CurrentStderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at each record, not the one it was created with
    (a second run in the same process — a notebook, a test — may have replaced it)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def setup_logging(level: int) -> None:
    level = max(0, min(level, 4))
    logger = logging.getLogger("slmops")
    logger.setLevel(LOG_LEVELS[level])
    if not logger.handlers:
        handler = _CurrentStderrHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("slmops: %(message)s"))
        logger.addHandler(handler)
    logger.propagate = False
    # Quiet the libraries' chatter unless debugging: bitsandbytes reports an optional
    # kernels package it does not find, peft calls a transformers API deprecated in v6.
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity(LOG_LEVELS[level] if level == 0 else logging.ERROR)
    if level > 1:  # "Loading weights" bars are noise above info level
        hf_logging.disable_progress_bar()
    if level > 0:
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
        warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad")


def fail(exc: BaseException) -> int:
    print(f"slmops: error: {exc}", file=sys.stderr)
    return 2 if isinstance(exc, ConfigError) else 1
