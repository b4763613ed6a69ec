"""Shared CLI plumbing: flags generated from the pydantic schema (one source of truth for
names, help and defaults), unknown-flag suggestions, logging levels, error exit."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import types
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
    return annotation is bool or (typing.get_origin(annotation) in (typing.Union, types.UnionType) and bool in typing.get_args(annotation))


def _literal_choices(annotation) -> list[str]:
    """The values of a Literal[...] (or Literal[...] | None) annotation, for --help."""
    if typing.get_origin(annotation) is typing.Literal:
        return [str(v) for v in typing.get_args(annotation)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [c for arg in typing.get_args(annotation) for c in _literal_choices(arg)]
    return []


def add_schema_flags(parser: argparse.ArgumentParser, schema: type[BaseModel], title: str, skip: Iterable[str] = ()) -> list[str]:
    """One --flag per field of `schema` (a flat section), listed once in --help under
    `title`; the dashed spelling (--max-steps) and the field's `cli` aliases work too, the
    dashed one hidden from --help. Defaults stay in the schema: unset flags are absent."""
    group = parser.add_argument_group(title)
    names = []
    fields = sorted(schema.model_fields.items(), key=lambda item: not item[1].is_required())  # required flags first
    for name, field in fields:
        if name in skip or isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            continue
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        spellings = [*[c for c in extra.get("cli", []) if c.startswith("-") and len(c) == 2], f"--{name}",
                     *[c for c in extra.get("cli", []) if c.startswith("--")]]
        default = field.get_default(call_default_factory=False) if not field.is_required() else None
        shown = "" if field.is_required() else (f" [default: {default}]" if default not in (None, [], "", False) else "")
        help_text = (field.description or "") + (" (required)" if field.is_required() else shown)
        kwargs: dict = {"dest": name, "default": argparse.SUPPRESS}
        if _is_bool(field.annotation):
            kwargs.update(nargs="?", const="true", metavar="true|false")
        elif extra.get("repeatable"):
            kwargs.update(action="append", metavar=name.upper())
        else:
            choices = _literal_choices(field.annotation)
            kwargs["metavar"] = "{" + ",".join(choices) + "}" if choices else name.upper()
        group.add_argument(*spellings, help=help_text.replace("%", "%%"), **kwargs)
        if "_" in name:  # the dashed spelling, accepted but not listed twice
            parser.add_argument(f"--{name.replace('_', '-')}", help=argparse.SUPPRESS, **kwargs)
        names.append(name)
    return names


def add_config_flags(parser: argparse.ArgumentParser, schema: type[BaseModel], titles: dict[str, str] | None = None,
                     main_title: str = "options") -> None:
    """The flags of a whole command config: a group per section, then its own fields; and
    --config FILE (YAML with the same keys, nested by section; flags override it)."""
    from slmops.config import sections

    parser.add_argument("--config", help="YAML (or JSON) file with this command's options; flags given here override it")
    for section, section_schema in sections(schema).items():
        add_schema_flags(parser, section_schema, (titles or {}).get(section, section))
    add_schema_flags(parser, schema, main_title, skip=sections(schema))


def config_from_args(schema: type[BaseModel], args: argparse.Namespace, cli_only: Iterable[str] = ()):
    """The command's config from its flags over its --config file, every problem named at once."""
    from slmops.config import from_flat, load_yaml

    skip = {"config", "handler", "command", "argv", *cli_only}
    values = {k: v for k, v in vars(args).items() if k not in skip and not k.endswith("_command")}
    base = load_yaml(args.config) if getattr(args, "config", None) else None
    return from_flat(values, base, schema=schema, source=getattr(args, "config", None) or "config")


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
    if getattr(exc, "silent", False):  # a process of a distributed run whose rank 0 reports the error
        return exc.exit_code
    if not getattr(exc, "reported", False):  # (rank 0 of a distributed run said it before the others stopped)
        print(f"slmops: error: {exc}", file=sys.stderr)
    return 2 if isinstance(exc, ConfigError) else 1
