"""Typed configs of every command: the single source of flags, help, YAML and validation.

finetune.py (FinetuneConfig and its sections), evaluate.py, deploy.py (optimize / auto-opt,
generate-adapter, convert-adapters), generate.py (generate, chat), serve.py; base.py builds any of them
from flat flags or nested YAML and names every problem at once."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from slmops.config import base as _base
from slmops.config.base import Section, flag_index, format_validation_error, load_yaml, sections, to_yaml
from slmops.config.deploy import ConvertAdaptersConfig, ExportConfig, GenerateAdapterConfig, ModelExportConfig
from slmops.config.evaluate import EvaluateConfig
from slmops.config.finetune import DataConfig, FinetuneConfig, MethodConfig, ModelConfig, TrainingConfig
from slmops.config.generate import ChatConfig, GenerateConfig
from slmops.config.serve import ServeConfig

__all__ = [
    "ChatConfig",
    "ConvertAdaptersConfig",
    "DataConfig",
    "EvaluateConfig",
    "ExportConfig",
    "ModelExportConfig",
    "FinetuneConfig",
    "GenerateAdapterConfig",
    "GenerateConfig",
    "MethodConfig",
    "ModelConfig",
    "Section",
    "ServeConfig",
    "TrainingConfig",
    "flag_index",
    "format_validation_error",
    "from_dict",
    "from_flat",
    "load_yaml",
    "sections",
    "to_yaml",
]


def from_flat(values: dict[str, Any], base: dict[str, Any] | None = None, schema: type[BaseModel] = FinetuneConfig,
              source: str = "config"):
    """A command's config from flat {flag: value} (as the CLI gives them) over an optional nested
    `base` (YAML); `slmops finetune`'s by default. Every problem is named at once (ConfigError)."""
    return _base.from_flat(values, base, schema, source)


def from_dict(data: dict[str, Any], source: str = "config", schema: type[BaseModel] = FinetuneConfig):
    """A command's config from its nested YAML layout; `slmops finetune`'s by default."""
    return _base.from_dict(data, source, schema)
