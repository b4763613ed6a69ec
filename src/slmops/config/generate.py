"""Typed configuration of `slmops generate` and `slmops chat`, on a PyTorch model or an ONNX
Runtime GenAI bundle."""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from slmops.config.base import Section, log_level_field, named_log_level, split_csv


class GenerationOptions(Section):
    """What generate and chat share: the model, its adapters, and how to decode."""

    model_name_or_path: str = Field(description="An ONNX Runtime GenAI bundle, or a PyTorch model (folder, built-in, slmops "
                                    "finetune output).", json_schema_extra={"cli": ["-m"]})
    adapter: list[str] = Field(
        [], description="Adapter(s): names in the bundle, .onnx_adapter files, PEFT folders, NAME=PATH, or 'base' for none. "
        "Several, comma-separated, are loaded once and switched per request.", json_schema_extra={"cli": ["--adapter_path"]})
    max_new_tokens: int = Field(128, gt=0, description="Most tokens generated per answer.")
    temperature: float = Field(0.0, ge=0, description="Sampling temperature; 0 is greedy.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling: keep the smallest set of tokens with this much probability.")
    seed: int | None = Field(None, description="Seed for sampling (same seed, same answer).")
    threads: int | None = Field(None, gt=0, description="ONNX Runtime threads. Default: the CPUs available.")
    trust_remote_code: bool = Field(False, description="Allow model code from the model folder to run.")
    log_level: int = log_level_field(2)

    _csv = field_validator("adapter", mode="before")(split_csv)
    _level = field_validator("log_level", mode="before")(named_log_level)


class GenerateConfig(GenerationOptions):
    """`slmops generate`: answers to prompts, streamed, with any adapter."""

    prompt: list[str] = Field([], description="A prompt (repeatable); \\n means a newline.", json_schema_extra={"repeatable": True})
    prompt_file: str | None = Field(None, description="A text file, one prompt per line.")
    chat: bool = Field(False, description="Wrap each prompt as a user message in the model's chat template.")

    @model_validator(mode="after")
    def _some_prompt(self) -> "GenerateConfig":
        if not self.prompt and not self.prompt_file:
            raise ValueError("give at least one --prompt or a --prompt_file")
        return self


class ChatConfig(GenerationOptions):
    """`slmops chat`: an interactive conversation with the model's chat template."""

    system: str | None = Field(None, description="A system message.")
