"""The OpenAI API's request bodies, as this server reads them. Parameters the server cannot
honour are refused by name (400) unless they ask for the neutral value (n=1, logprobs off...),
so a client never gets an answer computed differently than it asked."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# parameter -> the value that means "nothing special": accepted, anything else is a 400
NEUTRAL = {"n": 1, "logprobs": False, "top_logprobs": None, "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": None,
           "tools": None, "tool_choice": None, "functions": None, "function_call": None, "best_of": 1, "echo": False,
           "suffix": None, "parallel_tool_calls": None, "modalities": None, "audio": None, "prediction": None}
IGNORED = {"user", "metadata", "store", "service_tier", "reasoning_effort", "safety_identifier", "prompt_cache_key"}


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(None, gt=0)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        return stops

    @model_validator(mode="after")
    def _supported(self):
        for name, value in (self.model_extra or {}).items():
            if name in IGNORED:
                continue
            if name not in NEUTRAL:
                raise ValueError(f"unknown parameter {name!r}")
            if value is not None and value != NEUTRAL[name] and not (name in ("tools", "logit_bias", "functions") and not value):
                raise ValueError(f"{name}={value!r} is not supported by this server (only {NEUTRAL[name]!r})")
        return self

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    @property
    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, gt=0)

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Request):
    prompt: str | list[str]
    max_tokens: int | None = Field(16, gt=0)  # OpenAI's default for completions

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value):
        if isinstance(value, list):
            if len(value) != 1:
                raise ValueError("give one prompt per request (a list of prompts is not supported)")
            return value[0]
        return value

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens


class AdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    path: str
