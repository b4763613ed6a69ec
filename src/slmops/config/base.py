"""What every command's config shares: a strict pydantic base (unknown keys are errors), the
helpers fields use, and the machinery that turns flat `--flags` or nested YAML into a config
and names every problem at once, the way the user typed it.

A command config is a pydantic model whose fields are plain values or *sections* (nested
Section models, e.g. `model:` and `data:`). Every field name is unique across the sections
of one command, so the CLI exposes them all as flat flags."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from slmops.errors import ConfigError, suggest


class Section(BaseModel):
    # Unknown keys are errors (reported with a suggestion by from_dict).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def split_csv(value: Any) -> Any:
    """'q_proj, v_proj' -> ['q_proj', 'v_proj']; lists pass through."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


LOG_LEVEL_NAMES = {"debug": 0, "info": 1, "warning": 2, "error": 3, "critical": 4}


def named_log_level(value: Any) -> Any:
    """'info', 'warning'... -> 1, 2...: a before-validator for log_level fields."""
    if isinstance(value, str) and value.strip().lower() in LOG_LEVEL_NAMES:
        return LOG_LEVEL_NAMES[value.strip().lower()]
    return value


def log_level_field(default: int):
    """The --log_level every command takes: 0 debug ... 4 critical (as Olive's), or the names.
    Pair it with `_level = field_validator("log_level", mode="before")(named_log_level)`."""
    return Field(default, ge=0, le=4, description="0 debug, 1 info, 2 warning, 3 error, 4 critical (as Olive's --log_level).")


# ---- the schema of a command ------------------------------------------------------------
def sections(schema: type[BaseModel]) -> dict[str, type[Section]]:
    """The nested sections of a command config: {field name: its Section class}."""
    return {name: field.annotation for name, field in schema.model_fields.items()
            if isinstance(field.annotation, type) and issubclass(field.annotation, Section)}


def flag_index(schema: type[BaseModel]) -> dict[str, str | None]:
    """Every flat flag name of a command -> the section that holds it (None: top level)."""
    parts = sections(schema)
    index: dict[str, str | None] = {name: None for name in schema.model_fields if name not in parts}
    for section, section_schema in parts.items():
        for name in section_schema.model_fields:
            if name in index:  # the flat CLI relies on unique names; fail loudly in development
                raise AssertionError(f"{schema.__name__}: config field {name!r} is defined twice")
            index[name] = section
    return index


def from_flat(values: dict[str, Any], base: dict[str, Any] | None, schema: type[BaseModel], source: str = "config"):
    """Flat {flag: value} (as the CLI gives them) over an optional nested `base` dict (YAML)."""
    index = flag_index(schema)
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
            if not isinstance(nested.get(section), dict):
                nested[section] = {}
            nested[section][key] = value
    if problems:
        raise ConfigError("; ".join(problems))
    return from_dict(nested, source, schema)


def from_dict(data: dict[str, Any], source: str, schema: type[BaseModel]):
    """Nested dict (YAML layout) -> the command's config, naming every problem at once."""
    problems = []
    index = flag_index(schema)
    parts = sections(schema)
    top_level = [name for name in schema.model_fields if name not in parts]
    for key, value in data.items():
        if key in parts:
            if not isinstance(value, dict):
                problems.append(f"{source}: '{key}' must be a mapping of options")
                continue
            known = parts[key].model_fields
            for sub in value:
                if sub not in known:
                    hint = suggest(sub, known)
                    if not hint and sub in index:
                        hint = f" It belongs under '{index[sub]}'." if index[sub] else " It is a top-level key."
                    problems.append(f"{source}: unknown key '{key}.{sub}'.{hint}")
        elif key not in top_level:
            hint = suggest(key, list(parts) + top_level)
            if not hint and key in index:
                hint = f" It belongs under '{index[key]}'."
            problems.append(f"{source}: unknown key '{key}'.{hint}")
    if problems:
        raise ConfigError("\n".join(problems))
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, schema)) from None


def format_validation_error(exc: ValidationError, schema: type[BaseModel] | None = None) -> str:
    """pydantic's errors as '--flag: problem (got value)' lines, named as the user typed them."""
    parts = set(sections(schema)) if schema is not None else set()
    lines = []
    for err in exc.errors():
        loc = [str(part) for part in err["loc"] if not str(part).isdigit()]
        # loc is (section, field) or (field,); the flat flag is the last name.
        name = loc[-1] if loc and loc[-1] not in parts else ".".join(loc)
        got = err.get("input")
        got_text = f" (got {got!r})" if got is not None and not isinstance(got, dict) and err["type"] != "missing" else ""
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "missing":
            message = "required (give it as a flag or in --config)"
        lines.append(f"--{name}: {message}{got_text}" if name else f"{message}{got_text}")
    return "; ".join(lines)


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
    return data


def to_yaml(config: BaseModel) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


