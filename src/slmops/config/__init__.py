"""Build, validate and serialize run configs. See `schema.py` for the fields."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from slmops.config.schema import SECTIONS, DataConfig, FinetuneConfig, MethodConfig, ModelConfig, TrainingConfig
from slmops.errors import ConfigError, suggest

__all__ = [
    "DataConfig",
    "FinetuneConfig",
    "MethodConfig",
    "ModelConfig",
    "TrainingConfig",
    "flag_sections",
    "format_validation_error",
    "from_flat",
    "from_dict",
    "load_yaml",
    "to_yaml",
]

# Top-level scalar fields of FinetuneConfig (not sections).
_TOP_LEVEL = [name for name in FinetuneConfig.model_fields if name not in SECTIONS]


def flag_sections() -> dict[str, str | None]:
    """Every flat flag name -> the section that holds it (None for top-level fields)."""
    index: dict[str, str | None] = {name: None for name in _TOP_LEVEL}
    for section, schema in SECTIONS.items():
        for name in schema.model_fields:
            if name in index:  # the flat CLI relies on unique names; fail loudly in development
                raise AssertionError(f"config field {name!r} is defined twice")
            index[name] = section
    return index


def from_flat(values: dict[str, Any], base: dict[str, Any] | None = None) -> FinetuneConfig:
    """Flat {flag: value} (as the CLI gives them) over an optional nested `base` dict."""
    index = flag_sections()
    nested: dict[str, Any] = {k: (dict(v) if isinstance(v, dict) else v) for k, v in (base or {}).items()}
    problems = []
    for key, value in values.items():
        if key not in index:
            problems.append(f"unknown option --{key}.{suggest(key, index)}")
            continue
        section = index[key]
        if section is None:
            nested[key] = value
        else:
            nested.setdefault(section, {})[key] = value
    if problems:
        raise ConfigError("; ".join(problems))
    return from_dict(nested)


def from_dict(data: dict[str, Any], source: str = "config") -> FinetuneConfig:
    """Nested dict (YAML layout) -> FinetuneConfig, naming every problem at once."""
    problems = []
    index = flag_sections()
    for key, value in data.items():
        if key in SECTIONS:
            if not isinstance(value, dict):
                problems.append(f"{source}: '{key}' must be a mapping of options")
                continue
            known = SECTIONS[key].model_fields
            for sub in value:
                if sub not in known:
                    hint = suggest(sub, known)
                    if not hint and sub in index:
                        hint = f" It belongs under '{index[sub]}'." if index[sub] else " It is a top-level key."
                    problems.append(f"{source}: unknown key '{key}.{sub}'.{hint}")
        elif key not in _TOP_LEVEL:
            hint = suggest(key, list(SECTIONS) + _TOP_LEVEL)
            if not hint and key in index:
                hint = f" It belongs under '{index[key]}'."
            problems.append(f"{source}: unknown key '{key}'.{hint}")
    if problems:
        raise ConfigError("\n".join(problems))
    try:
        return FinetuneConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None


def format_validation_error(exc: ValidationError) -> str:
    """pydantic's errors as '--flag: problem (got value)' lines, named as the user typed them."""
    lines = []
    for err in exc.errors():
        loc = [str(part) for part in err["loc"] if not str(part).isdigit()]
        # loc is (section, field) or (field,); the flat flag is the last name.
        name = loc[-1] if loc and loc[-1] not in SECTIONS else ".".join(loc)
        got = err.get("input")
        got_text = f" (got {got!r})" if got is not None and not isinstance(got, dict) else ""
        message = err["msg"].removeprefix("Value error, ")
        lines.append(f"--{name}: {message}{got_text}" if name else f"{message}{got_text}")
    return "; ".join(lines)


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
    return data


def to_yaml(config: FinetuneConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
