"""Typed configuration of `slmops evaluate`: one or more models (and adapters) on one split."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from slmops.config.base import Section, log_level_field, named_log_level, split_csv
from slmops.config.finetune import DataConfig, ModelConfig


class EvaluateConfig(Section):
    """`slmops evaluate`: one or more models on one eval split, side by side.

    model: {model_name_or_path: models/tone/ft}
    data: {data_name: examples/data/tone.jsonl, eval_split: "train[550:]", text_template: "..."}
    compare_to: [base]
    metrics: [accuracy, f1]
    """

    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=lambda: DataConfig(train_split="train"))
    adapter: str | None = Field(
        None, description="Adapter to evaluate on the model: a PEFT folder, or on a bundle one of its adapter names or an "
        ".onnx_adapter file. Default: the adapter an slmops output folder carries.",
        json_schema_extra={"cli": ["--adapter_path"]},
    )
    compare_to: list[str] | None = Field(
        None, description="Other models to evaluate beside it, comma-separated; 'base' is the model without its adapter."
    )
    metrics: list[str] = Field(["accuracy", "f1", "perplexity"], description="Comma-separated: accuracy, f1, perplexity, bleu, rouge, latency.")
    scoring: Literal["auto", "likelihood", "generation"] = Field(
        "auto", description="How accuracy/f1 pick each answer. likelihood: every label is scored as the completion and the most "
        "likely one is the prediction (no unparseable answers; one pass of the prompt for all labels); generation: the model "
        "writes an answer that is parsed. auto: likelihood when the gold answers form a label set (at most 32 distinct one-line "
        "answers), else generation."
    )
    labels: list[str] | None = Field(
        None, description="The label set for likelihood scoring, comma-separated (default: the distinct gold answers of the split; "
        "name them when the split may miss one)."
    )
    seed: int = Field(42, description="With --eval_split auto: the training run's --seed, which chose the rows it held out of "
                                      "train (the same rows are scored).")
    max_new_tokens: int = Field(32, gt=0, description="Most tokens generated per example.")
    batch_size: int = Field(16, gt=0, description="Examples per generation / loss batch.")
    latency_samples: int = Field(8, gt=0, description="Examples timed one at a time for the latency metric.")
    output_path: str | None = Field(None, description="Folder for results.json, predictions and report.md.", json_schema_extra={"cli": ["-o"]})
    log_level: int = log_level_field(1)

    _csv = field_validator("compare_to", "metrics", "labels", mode="before")(split_csv)
    _level = field_validator("log_level", mode="before")(named_log_level)

    @field_validator("metrics")
    @classmethod
    def _some_metrics(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("name at least one metric: accuracy, f1, perplexity, bleu, rouge, latency")
        return value
