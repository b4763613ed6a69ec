"""Typed configuration of `slmops run --config`: a workflow of passes.

The native form (Olive-shaped files are translated into it by slmops.workflow.olive):

    input_model: {model_name_or_path: smollm2-135m-instruct}
    data_configs:
      tone: {data_name: examples/data/tone.jsonl, train_split: "train[:500]", eval_split: "train[500:550]",
             text_template: "Phrase: {phrase}\\nTone: {tone}"}
    passes:                       # run in this order; each takes the previous one's output
      lora: {type: LoRA, config: {data_config: tone, lora_r: 16, max_steps: 80}}
      onnx: {type: ModelBuilder, config: {precision: int4}}
      score: {type: Evaluate, config: {evaluator: tone_eval}}
    evaluators:
      tone_eval: {data_config: tone, metrics: [accuracy, f1], eval_split: "train[550:]"}
    output_dir: models/tone/workflow

Each pass's `config` is checked against its type's own schema (slmops.workflow.passes)."""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator, model_validator

from slmops.config.base import Section, log_level_field, named_log_level, split_csv
from slmops.config.finetune import DataConfig, ModelConfig


class PassConfig(Section):
    type: str = Field(description="The pass: LoRA, QLoRA, DoRA, LoHa, LoKr, FullFinetune, MergeAdapterWeights, ModelBuilder "
                      "(alias OnnxConversion), GenerateAdapter, Evaluate.")
    config: dict[str, Any] = Field(default_factory=dict, description="The pass's options (its type's schema).")


class EvaluatorConfig(Section):
    data_config: str | None = Field(None, description="The data config to evaluate on (default: the only one).")
    metrics: list[str] = Field(["accuracy", "f1", "perplexity"], description="accuracy, f1, perplexity, bleu, rouge, latency.")
    eval_split: str | None = Field(None, description="Split to evaluate on (default: the data config's eval split, else its train split).")
    max_new_tokens: int = Field(32, gt=0, description="Most tokens generated per example.")
    batch_size: int = Field(16, gt=0, description="Examples per generation / loss batch.")
    max_samples: int | None = Field(None, gt=0, description="Evaluate at most this many rows.")
    compare_to_base: bool = Field(False, description="Also evaluate the model without its adapter.")

    _csv = field_validator("metrics", mode="before")(split_csv)


class WorkflowConfig(Section):
    """A whole `slmops run` workflow (see the module's docstring for the layout)."""

    input_model: ModelConfig = Field(default_factory=ModelConfig)
    data_configs: dict[str, DataConfig] = Field(default_factory=dict, description="Named data configs the passes refer to.")
    passes: dict[str, PassConfig] = Field(description="The passes, run in order.")
    evaluators: dict[str, EvaluatorConfig] = Field(default_factory=dict, description="Named evaluations the Evaluate passes use.")
    output_dir: str = Field("workflow-output", description="Folder for every pass's output, workflow.yaml, results.json, report.")
    log_level: int = log_level_field(1)

    _level = field_validator("log_level", mode="before")(named_log_level)

    @model_validator(mode="after")
    def _references(self) -> "WorkflowConfig":
        if not self.passes:
            raise ValueError("passes: a workflow needs at least one pass")
        for name in self.passes:
            if not name or "/" in name or name.startswith("."):
                raise ValueError(f"passes: {name!r} cannot name an output folder")
        for name, evaluator in self.evaluators.items():
            if evaluator.data_config is not None and evaluator.data_config not in self.data_configs:
                raise ValueError(f"evaluators.{name}.data_config: no data config named {evaluator.data_config!r} "
                                 f"(there are: {', '.join(self.data_configs) or 'none'})")
        return self
