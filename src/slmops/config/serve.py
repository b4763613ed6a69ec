"""Typed configuration of `slmops serve`: an OpenAI-compatible server for one base model and
its adapters."""

from __future__ import annotations

import re

from pydantic import Field, field_validator, model_validator

from slmops.config.base import Section, log_level_field, named_log_level, split_csv

ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class ServeConfig(Section):
    """`slmops serve`: the OpenAI API (models, chat/completions, completions, streaming) on one
    loaded base model, each adapter a model id of its own.

    model_name_or_path: models/multi
    adapters: [tone, qa=models/qa/ft]
    port: 8000
    """

    model_name_or_path: str = Field(description="An ONNX Runtime GenAI bundle (the deployed path), or a PyTorch model with PEFT "
                                    "adapters.", json_schema_extra={"cli": ["-m"]})
    adapters: list[str] = Field(
        [], description="Adapters served from the start, comma-separated: names in the bundle, NAME=PATH, PEFT folders or "
        ".onnx_adapter files. Default: every adapter the bundle lists.", json_schema_extra={"cli": ["--adapter"]})
    served_model_name: str | None = Field(None, description="The base model's id in the API. Default: the model folder's name.")
    host: str = Field("127.0.0.1", description="Address to listen on (loopback by default; 0.0.0.0 exposes the server).")
    port: int = Field(8000, ge=0, le=65535, description="Port to listen on (0: any free port, printed at start).")
    api_key: str | None = Field(None, description="Require 'Authorization: Bearer KEY' on every request (default: the "
                                "SLMOPS_API_KEY environment variable, else no key).")
    max_concurrency: int = Field(4, gt=0, description="Requests generating at the same time (PyTorch runs one at a time).")
    max_queue: int = Field(16, ge=0, description="Requests waiting for a slot; beyond it the server answers 429.")
    max_tokens_limit: int = Field(1024, gt=0, description="Largest max_tokens a request may ask for.")
    max_request_bytes: int = Field(1_000_000, gt=0, description="Largest request body accepted (413 beyond).")
    adapter_dir: str | None = Field(
        None, description="Folder that adapters added at run time (POST /v1/adapters) must lie in. Without it, adding "
        "adapters at run time is off.")
    threads: int | None = Field(None, gt=0, description="ONNX Runtime threads. Default: the CPUs available.")
    trust_remote_code: bool = Field(False, description="Allow model code from the model folder to run.")
    log_level: int = log_level_field(1)

    _csv = field_validator("adapters", mode="before")(split_csv)
    _level = field_validator("log_level", mode="before")(named_log_level)

    @model_validator(mode="after")
    def _names(self) -> "ServeConfig":
        if self.served_model_name is not None and not ADAPTER_NAME.match(self.served_model_name):
            raise ValueError(f"--served_model_name {self.served_model_name!r}: use letters, digits, '.', '_' and '-' (64 at most)")
        return self
