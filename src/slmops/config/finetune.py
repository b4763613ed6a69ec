"""Typed configuration of `slmops finetune`: the single source of truth for defaults,
help text and validation. The command line (`slmops finetune --flag`) and YAML files
(`slmops finetune --config run.yaml`) both build a `FinetuneConfig` from here.

Field names follow Microsoft Olive's `olive finetune` and Hugging Face
`TrainingArguments`, so a user who knows those knows these. Every field name is unique
across sections, which lets the CLI expose them as flat `--flags`."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from slmops.config.base import Section as _Section
from slmops.config.base import log_level_field, named_log_level
from slmops.config.base import split_csv as _split_csv


class ModelConfig(_Section):
    model_name_or_path: str = Field(
        "smollm2-135m-instruct",
        description="Model to tune: a built-in name (`slmops models list`), a local Hugging Face "
        "folder, a .gguf file, an earlier slmops output folder, or a Hugging Face Hub id.",
        json_schema_extra={"cli": ["-m"]},
    )
    trust_remote_code: bool = Field(False, description="Allow model code from the model's repository to run.")
    torch_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="dtype of the frozen base weights. auto: bfloat16 where the device computes it "
        "fast (CPUs with AMX/AVX512-BF16, recent GPUs), else float32.",
    )


class DataConfig(_Section):
    data_name: str | None = Field(
        None,
        description="Dataset: a local file or folder (json, jsonl, csv, parquet, txt) or a Hugging Face Hub dataset name.",
        json_schema_extra={"cli": ["-d"]},
    )
    data_files: list[str] | None = Field(None, description="Comma-separated data files inside --data_name (or alone).")
    train_subset: str | None = Field(None, description="Dataset subset (configuration name) for training.")
    eval_subset: str | None = Field(None, description="Dataset subset (configuration name) for evaluation.")
    train_split: str = Field("train", description="Training split, with slicing: 'train', 'train[:4096]', 'train[:90%]'.")
    eval_split: str | None = Field(
        None, description="Evaluation split, e.g. 'train[4096:4224]', or 'auto': 10% of the training rows held out (stratified "
        "by label for classification). Turns on validation, early stopping and best-adapter selection. Default: none, except "
        "auto for a classification task; 'none' trains on every row without validation.")
    task: Literal["auto", "classification", "generation"] = Field(
        "auto", description="classification: the completions are a few one-line labels (scored by each label's likelihood at "
        "evaluation, stratified --eval_split auto). auto: classification when the training completions look like a label set "
        "(at most 32 distinct one-line answers, each seen 4+ times on average), and said so."
    )
    text_template: str | None = Field(
        None,
        description="Python-format template over columns, e.g. 'Q: {question}\\nA: {answer}'. "
        "\\n escapes are honoured. When the last field ends the template, it is the completion.",
    )
    text_field: str | None = Field(None, description="Column holding the full training text (loss on all of it).")
    use_chat_template: bool = Field(False, description="Render messages / conversations / prompt+completion columns with the model's chat template.")
    data_format: Literal["auto", "template", "text", "chat", "prompt_completion", "alpaca", "input_output", "pairs"] = Field(
        "auto", description="How rows become text. auto: chosen from the flags and columns, and reported. pairs: text1, text2 "
        "and a numeric label per row, for a custom loss (no language-model loss)."
    )
    train_on_inputs: bool = Field(False, description="Compute the loss on the prompt too, not only on the completion.")
    max_seq_len: int = Field(1024, gt=0, description="Longest tokenized example.")
    long_examples: Literal["truncate", "drop"] = Field(
        "truncate", description="What to do with examples longer than --max_seq_len (counted and reported either way)."
    )
    max_samples: int | None = Field(None, gt=0, description="Use at most this many training rows (after the split slice).")
    skip_bad_rows: bool = Field(
        False, description="Leave out rows whose fields the format needs are missing or null (counted and reported); "
        "without it such rows are an error that names them."
    )

    _csv = field_validator("data_files", mode="before")(_split_csv)

    @field_validator("eval_split", mode="before")
    @classmethod
    def _no_eval(cls, value: Any) -> Any:
        return None if isinstance(value, str) and value.strip().lower() in {"none", "off", ""} else value


class MethodConfig(_Section):
    method: str = Field("lora", description="lora | qlora | dora | loha | lokr | full  (`slmops methods` lists them).")
    lora_r: int = Field(16, gt=0, description="Adapter rank.")
    lora_alpha: float = Field(32, gt=0, description="Adapter scaling numerator (scale = alpha / r).")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: list[str] | None = Field(
        None,
        description="Modules to adapt, comma-separated, or 'all-linear'. Default: the model's attention projections.",
    )
    modules_to_save: list[str] | None = Field(None, description="Extra modules trained in full and saved with the adapter.")
    adapter_path: str | None = Field(None, description="Start from this existing PEFT adapter instead of a fresh one.")
    deploy_precision: Literal["none", "int4", "int8"] = Field(
        "none", description="Quantization-aware adapter: train over the base weights `slmops optimize --precision int4|int8` will "
        "write (exported once before training and read back), so the deployed bundle scores what training measured. "
        "Adapter methods on a float base (lora, dora, loha, lokr); none: train over the base as it is.")

    _csv = field_validator("target_modules", "modules_to_save", mode="before")(_split_csv)


REPORT_TARGETS = ("tensorboard", "wandb", "mlflow")  # where --report_to sends metrics (train/tracking.py)


def parse_report_to(value) -> list[str]:
    """'tensorboard,wandb' / ['mlflow'] / 'all' / 'none' -> the named targets, in REPORT_TARGETS
    order ('all': TensorBoard and whichever of W&B and MLflow are installed, as transformers does)."""
    import importlib.util

    choices = (*REPORT_TARGETS, "all", "none")
    names = [str(v).strip().lower() for v in (value.split(",") if isinstance(value, str) else value or []) if str(v).strip()]
    unknown = [n for n in names if n not in choices]
    if unknown:
        raise ValueError(f"unknown --report_to {', '.join(unknown)}; choose from {', '.join(choices)} (a comma list)")
    if "none" in names and len(names) > 1:
        raise ValueError("--report_to none cannot be combined with other targets")
    if "all" in names:
        return ["tensorboard", *(t for t in ("wandb", "mlflow") if importlib.util.find_spec(t) is not None)]
    return [t for t in REPORT_TARGETS if t in names]


class TrainingConfig(_Section):
    max_steps: int = Field(-1, description="Optimizer steps to run; -1: run --num_train_epochs.")
    num_train_epochs: float = Field(1.0, gt=0, description="Epochs to run when --max_steps is -1.")
    per_device_train_batch_size: int = Field(8, gt=0, description="Examples per micro-batch.")
    per_device_eval_batch_size: int = Field(8, gt=0, description="Examples per evaluation batch.")
    gradient_accumulation_steps: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    gradient_checkpointing: bool | None = Field(
        None, description="Recompute activations in backward: less memory, ~30% slower. Default: on when one micro-batch's "
        "activations would take over half the memory available (long sequences, large batches), and said so.")
    learning_rate: float | None = Field(None, gt=0, description="Peak learning rate. Default: the method's own (2e-4 adapters, 2e-5 full).")
    lr_scheduler_type: Literal[
        "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"
    ] = Field("linear", description="Learning-rate schedule after warm-up.")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Fraction of steps spent warming up.")
    warmup_steps: int = Field(0, ge=0, description="Warm-up steps (overrides --warmup_ratio when > 0).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping norm; 0 turns clipping off.")
    optim: Literal["adamw_torch", "adamw_torch_fused", "adamw", "sgd"] = Field(
        "adamw_torch", description="Optimizer. The AdamW ones run PyTorch's fused kernel where the parameters allow it (same update)."
    )
    bf16: bool | None = Field(None, description="Train in bfloat16. Default: on where the device computes bf16 fast, and said so.")
    fp16: bool = Field(False, description="Train in float16 (CUDA only).")
    seed: int = Field(42, description="Seed for weights init, dropout and data order.")
    logging_steps: int = Field(10, gt=0, description="Log train loss every N steps.")
    eval_steps: int | float | None = Field(
        None, gt=0, description="Evaluate every N steps, or (below 1) every such fraction of the run, as in transformers: 0.2 is "
        "five times a run. Default: ten times a run.")
    save_steps: int | float | None = Field(
        None, gt=0, description="Checkpoint every N steps, or (below 1) every such fraction of the run. Default: as --eval_steps.")
    save_total_limit: int | None = Field(2, gt=0, description="Keep at most N step checkpoints (the best one is always kept).")
    logging_dir: str | None = Field(None, description="TensorBoard and metrics.jsonl folder. Default: OUTPUT/logs.")
    report_to: list[str] = Field(
        ["tensorboard"], description="Where metrics go besides metrics.jsonl, a comma list: tensorboard, wandb, mlflow; all "
        "(TensorBoard and whichever of W&B/MLflow are installed); none."
    )
    fsdp: Literal["off", "full_shard", "shard_grad_op"] = Field(
        "off", description="In several processes (torchrun, --nproc_per_node), shard the model with PyTorch FSDP: each process "
        "keeps 1/N of the weights, gradients and optimizer state. full_shard: weights gathered per layer for its forward and "
        "backward (least memory); shard_grad_op: kept from forward to backward. Hugging Face's spelling 'full_shard auto_wrap' "
        "works; accelerate launch --use_fsdp turns it on too. Off: each process keeps a whole copy (data parallel).")
    dataloader_num_workers: int = Field(0, ge=0, description="Worker processes for batching (0: in the main process).")
    stop_file: str | None = Field(
        None, description="A file whose appearance stops the run gracefully: it evaluates, checkpoints, writes its outputs "
        "and ends (its first line, if any, is the reason recorded). How `slmops tune` stops a distributed trial it prunes.")
    resume_from_checkpoint: str | None = Field(
        None, description="Checkpoint folder to resume from, or 'latest' (true) for the newest in OUTPUT/checkpoints."
    )
    ignore_mismatch: bool = Field(
        False, description="Resume a checkpoint even when it was written by a run with another model, method, data or "
        "batch order (normally refused, naming the difference)."
    )
    eval_metrics: list[str] | None = Field(
        None, description="Generation metrics computed at each evaluation besides the loss, e.g. 'accuracy,f1' (classification by generation)."
    )
    metric_for_best_model: str = Field(
        "loss", description="Eval metric that picks the best weights and drives early stopping: loss, perplexity, accuracy, macro_f1, bleu, rouge1..."
    )
    eval_max_new_tokens: int = Field(16, gt=0, description="Most tokens generated per eval example for --eval_metrics.")
    early_stopping_patience: int | None = Field(
        3, ge=1, description="Stop after N evaluations without improvement (needs --eval_split). 0/none turns it off."
    )
    early_stopping_threshold: float = Field(0.0, ge=0, description="Improvement smaller than this does not count.")
    load_best_model_at_end: bool = Field(True, description="With --eval_split, the saved adapter is the best one seen.")
    class_weights: Literal["none", "auto"] = Field(
        "none", description="auto: for a classification task, weight each example's loss by n / (labels x its label's count), "
        "so rare labels count as much as common ones (skewed data); none: every token counts the same."
    )
    loss: str | None = Field(
        None, description="A custom loss, FILE.py:ClassName: an nn.Module whose forward takes the batch's LossInputs (labelled "
        "logits, labels, hidden states, the batch with its extra columns) and returns a scalar. The file's code runs. "
        "Default: cross-entropy on the labelled tokens."
    )
    loss_kwargs: dict[str, Any] | None = Field(
        None, description="Arguments of the custom loss's constructor: 'margin=1.0,scale=2' (values read as YAML), or a mapping in YAML."
    )
    cpu_fast_path: Literal["auto", "on", "off"] = Field(
        "auto", description="The CPU fast path (fused kernels, checked against the model's own forward before training): auto "
        "takes it where the method, device and library versions allow and says why not otherwise; on also tries it on "
        "library versions it was not tested with; off never."
    )
    group_by_length: bool = Field(
        False,
        description="Batch examples of similar length: less padding, but batches whose lengths correlate with their "
        "labels learn more slowly in short runs (measured: held-out loss 2.40 vs 2.32 after 23 LoRA steps on the tone data).",
    )

    _metrics_csv = field_validator("eval_metrics", mode="before")(_split_csv)

    @field_validator("fsdp", mode="before")
    @classmethod
    def _fsdp_mode(cls, value):
        """Hugging Face TrainingArguments' --fsdp words ('full_shard auto_wrap'): the sharding word
        is the mode; auto_wrap is what slmops always does (one unit per decoder layer)."""
        if isinstance(value, bool) or value is None:
            return "full_shard" if value else "off"
        words = str(value).lower().replace(",", " ").split()
        if not words or words in (["false"], ["none"], ["no"]):
            return "off"
        if "offload" in words:
            raise ValueError("--fsdp offload (parameters kept in CPU memory between uses) is not supported; on a CPU they are "
                             "there already: use --fsdp full_shard")
        if "hybrid_shard" in words or "hybrid_shard_zero2" in words:
            raise ValueError("--fsdp hybrid_shard is not supported: use full_shard or shard_grad_op")
        modes = [w for w in words if w in ("off", "full_shard", "shard_grad_op", "true")]
        unknown = [w for w in words if w not in ("off", "full_shard", "shard_grad_op", "true", "auto_wrap")]
        if unknown or len(modes) > 1:
            raise ValueError(f"unknown --fsdp {value!r}: choose full_shard or shard_grad_op (optionally with auto_wrap), or off")
        return "full_shard" if not modes or modes[0] == "true" else modes[0]

    @field_validator("report_to", mode="before")
    @classmethod
    def _report_targets(cls, value):
        return parse_report_to(value)

    @field_validator("loss_kwargs", mode="before")
    @classmethod
    def _kwargs(cls, value: Any) -> Any:
        """'margin=1.0,scale=2' -> {'margin': 1.0, 'scale': 2}."""
        if isinstance(value, str):
            import yaml

            out = {}
            for part in filter(None, (p.strip() for p in value.split(","))):
                key, sep, raw = part.partition("=")
                if not sep or not key.strip().isidentifier():
                    raise ValueError(f"write the arguments as name=value pairs, comma-separated (got {part!r})")
                out[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
            return out
        return value

    @field_validator("eval_steps", "save_steps")
    @classmethod
    def _steps_or_fraction(cls, value: int | float | None) -> int | float | None:
        if isinstance(value, float) and value >= 1:
            if not value.is_integer():
                raise ValueError(f"a number of steps (an integer) or a fraction of the run below 1 (0.2: five times a run); got {value}")
            return int(value)
        return value

    @field_validator("max_steps")
    @classmethod
    def _steps(cls, value: int) -> int:
        if value == 0 or value < -1:
            raise ValueError("must be a positive number of steps, or -1 to run --num_train_epochs")
        return value

    @field_validator("early_stopping_patience", mode="before")
    @classmethod
    def _patience_off(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().lower() in {"0", "none", "off", "false"}:
            return None
        if value == 0:
            return None
        return value

    @field_validator("resume_from_checkpoint", mode="before")
    @classmethod
    def _resume_true(cls, value: Any) -> Any:
        if value is True or (isinstance(value, str) and value.strip().lower() in {"true", "latest"}):
            return "latest"
        if value is False or (isinstance(value, str) and value.strip().lower() in {"false", "none", ""}):
            return None
        return value

    @model_validator(mode="after")
    def _one_precision(self) -> "TrainingConfig":
        if self.bf16 and self.fp16:
            raise ValueError("--bf16 and --fp16 are both on; choose one")
        return self


class FinetuneConfig(_Section):
    """A whole `slmops finetune` run. YAML files have the sections as keys:

    model: {model_name_or_path: ...}
    data: {data_name: ..., text_template: ...}
    method: {method: lora, lora_r: 16}
    training: {max_steps: 100}
    output_path: models/x/ft
    """

    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    output_path: str = Field("models/slmops-ft", description="Output folder.", json_schema_extra={"cli": ["-o"]})
    overwrite: bool = Field(False, description="Replace an output folder that holds another run.")
    task_name: str | None = Field(None, description="A name for this run, shown in logs and reports.")
    log_level: int = log_level_field(1)

    _level = field_validator("log_level", mode="before")(named_log_level)


def interval(every: int | float | None, steps: int) -> int:
    """Steps between evaluations (or checkpoints) of a `steps`-step run: `every` steps, or that
    fraction of the run when below 1 (transformers' convention), or ten times a run by default,
    rounded up: no evaluation falls a few steps before the one every run ends with."""
    if every is None:
        every = 0.1
    if every < 1:
        return max(1, math.ceil(every * steps))
    return int(every)
