"""Typed configuration of `slmops tune` (and `slmops run` with a search): what to search, how,
for which metric, and the run it tunes (a finetune config or a workflow, in the same file or
pointed at).

    search_strategy: {type: random, num_trials: 20}     # random | grid | tpe; Olive: {sampler: tpe, max_iter: 20}
    search_space:
      learning_rate: {type: float, low: 1.0e-6, high: 1.0e-3, log: true}
      lora_r: {type: int, low: 8, high: 64}
      batch_size: {type: choice, values: [8, 16, 32]}   # = per_device_train_batch_size
    objective: {metric: loss, direction: minimize}      # any eval metric; the direction defaults from it
    pruner: {type: median}                              # median | hyperband | none
    # ... and the run: model/data/method/training sections (a finetune config), or passes (a workflow),
    # or `config: path/to/either.yaml`
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from slmops.config.base import Section, log_level_field, named_log_level

# the keys of a tune file that describe the search; every other key is the run it tunes
TUNE_KEYS = ("search_strategy", "search_space", "objective", "pruner", "trial_timeout", "storage", "study_name",
             "heartbeat_interval", "max_retries", "nproc_per_node", "output_path", "log_level")

# the seed's (and HF Trainer's) short names for flags
DIMENSION_ALIASES = {"batch_size": "per_device_train_batch_size", "r": "lora_r", "lr": "learning_rate", "epochs": "num_train_epochs"}


class SearchStrategy(Section):
    type: Literal["random", "grid", "tpe"] = Field("tpe", description="Sampler: random, grid (every combination) or tpe.")
    num_trials: int = Field(20, gt=0, description="Trials to finish (complete or pruned), over every worker of the study.")
    seed: int | None = Field(42, description="Sampler seed (the same study samples the same trials).")
    timeout: float | None = Field(None, gt=0, description="Seconds after which no new trial starts (the whole study budget).")
    joint: bool = Field(True, description="tpe: sample the dimensions jointly (multivariate), as Olive's execution_order: joint.")

    @model_validator(mode="before")
    @classmethod
    def _olive(cls, value: Any) -> Any:
        """Olive's spelling: {sampler: tpe, max_iter: 20, execution_order: joint}."""
        if isinstance(value, dict):
            value = dict(value)
            if "sampler" in value:
                value.setdefault("type", value.pop("sampler"))
            if "max_iter" in value:
                value.setdefault("num_trials", value.pop("max_iter"))
            if "execution_order" in value:
                order = value.pop("execution_order")
                if order not in ("joint", "pass-by-pass"):
                    raise ValueError(f"execution_order {order!r}: joint or pass-by-pass")
                value.setdefault("joint", order == "joint")
        return value


class Dimension(Section):
    type: Literal["float", "int", "choice", "categorical"] = Field(description="float, int, or choice (categorical) over values.")
    low: int | float | None = None  # (int first: an int dimension's bounds stay whole numbers)
    high: int | float | None = None
    log: bool = False
    step: float | None = Field(None, gt=0)
    values: list[Any] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> "Dimension":
        if self.type in ("choice", "categorical"):
            if not self.values:
                raise ValueError("a choice needs a non-empty 'values' list")
            if self.low is not None or self.high is not None:
                raise ValueError("a choice takes 'values', not low/high")
            return self
        if self.values is not None:
            raise ValueError(f"a {self.type} dimension takes low/high, not 'values' (use type: choice)")
        if self.low is None or self.high is None:
            raise ValueError(f"a {self.type} dimension needs 'low' and 'high'")
        if self.low > self.high:
            raise ValueError(f"low {self.low:g} is above high {self.high:g}")
        if self.log and self.low <= 0:
            raise ValueError(f"log: true needs low > 0 (got {self.low:g})")
        if self.log and self.step is not None:
            raise ValueError("log and step cannot be combined")
        if self.type == "int" and (self.low != int(self.low) or self.high != int(self.high)):
            raise ValueError("an int dimension needs whole low and high")
        return self


class Objective(Section):
    metric: str = Field("loss", description="The eval metric to optimize: loss, perplexity, accuracy, macro_f1, bleu, rougeL... "
                        "In a workflow, PASS.metric names an Evaluate pass's result (score.accuracy).")
    direction: Literal["minimize", "maximize"] | None = Field(None, description="Default: minimize loss-like metrics, maximize others.")


class Pruner(Section):
    type: Literal["median", "hyperband", "none"] = Field("median", description="Stop bad trials early from their evaluations.")
    n_startup_trials: int = Field(3, ge=0, description="median: trials finished before pruning starts.")
    n_warmup_steps: int = Field(0, ge=0, description="median: steps before a trial can be pruned.")
    min_resource: int = Field(1, gt=0, description="hyperband: the smallest budget (steps) a trial gets.")
    reduction_factor: int = Field(3, gt=1, description="hyperband: the fraction of trials promoted at each rung.")


class TuneConfig(Section):
    """A search: the strategy, the space, the objective, pruning, the storage. The run it tunes
    is the rest of the file (slmops.tune.load)."""

    search_strategy: SearchStrategy = Field(default_factory=SearchStrategy)
    search_space: dict[str, Dimension] = Field(description="Flag name -> dimension (any finetune flag; workflow: PASS.flag too).")
    objective: Objective = Field(default_factory=Objective)
    pruner: Pruner = Field(default_factory=Pruner)
    trial_timeout: float | None = Field(None, gt=0, description="Seconds a trial may train before it stops and reports.")
    storage: str | None = Field(None, description="Optuna storage URL: postgresql://... to share the study between machines. "
                                "Default: an SQLite file in the output folder.")
    study_name: str | None = Field(None, description="The study's name in the storage. Default: the output folder's name.")
    heartbeat_interval: int = Field(10, gt=0, description="Seconds between a running trial's heartbeats; a trial silent for "
                                    "3 of them is taken as dead (its worker was killed), failed, and retried.")
    max_retries: int = Field(2, ge=0, description="Times a trial whose worker died (killed, machine lost) is run again.")
    nproc_per_node: int = Field(1, ge=1, description="Processes each trial trains in: above 1, every trial is a torchrun launch "
                                "on this machine (DDP; gloo on CPU, NCCL on GPUs) that the worker watches, prunes and times out.")
    output_path: str = Field("tune-output", description="Folder for trials/, trials.csv, best.yaml, the report (and study.db).")
    log_level: int = log_level_field(1)

    _level = field_validator("log_level", mode="before")(named_log_level)

    @model_validator(mode="before")
    @classmethod
    def _olive_space(cls, value: Any) -> Any:
        """Olive's pass-level search values: a plain list is a choice."""
        if isinstance(value, dict) and isinstance(value.get("search_space"), dict):
            value = dict(value)
            value["search_space"] = {k: ({"type": "choice", "values": v} if isinstance(v, list) else v)
                                     for k, v in value["search_space"].items()}
        return value

    @field_validator("search_space")
    @classmethod
    def _some(cls, value: dict) -> dict:
        if not value:
            raise ValueError("name at least one dimension to search")
        return value
