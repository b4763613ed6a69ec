"""What a search tunes: a `slmops finetune` config or a `slmops run` workflow. A target knows
its dimensions (which names it accepts, checked with the values the search may give them),
how to build one trial's config from sampled values, how to run it with the trial's hooks,
and how to write the best trial as a file its command runs as it is."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slmops.config import FinetuneConfig, flag_index, from_flat
from slmops.config.finetune import interval
from slmops.config.tune import DIMENSION_ALIASES, Dimension
from slmops.errors import ConfigError, suggest

# set by the search for each trial, not searchable
RESERVED = {"output_path", "overwrite", "resume_from_checkpoint", "ignore_mismatch", "log_level", "logging_dir", "stop_file"}


def dimension_values(dim: Dimension) -> list[Any]:
    """The values a dimension can take that its config must accept: its bounds, or each choice."""
    if dim.type in ("choice", "categorical"):
        return list(dim.values or [])
    if dim.type == "int":
        return [int(dim.low), int(dim.high)]
    return [dim.low, dim.high]


@dataclass
class TrialRun:
    """What one trial produced: the objective's value (None when it stopped before an
    evaluation), why it stopped early if it did, and the config it ran."""

    value: float | None
    stop_reason: str | None
    config: dict  # the trial's full config, as its command's file


class FinetuneTarget:
    """A `slmops finetune` config: the top-level flags of the tune file, or its sections
    (model/data/method/training), or both."""

    kind = "finetune"
    command = "slmops finetune --config"

    def __init__(self, run: dict[str, Any], source: str):
        self.source = source
        index = flag_index(FinetuneConfig)
        sections = set(FinetuneConfig.model_fields)  # model, data, method, training (`method` is also a flag)
        nested = {k for k, v in run.items() if k not in index or (k in sections and isinstance(v, dict))}
        self.flat = {k: v for k, v in run.items() if k not in nested}
        self.nested = {k: v for k, v in run.items() if k in nested}
        self.flags = [name for name in index if name not in RESERVED]
        self.base = self._build({}, "tune-output/trials/0")  # every problem of the run itself, named

    def _build(self, params: dict[str, Any], output_path: str, extra: dict | None = None) -> FinetuneConfig:
        values = {**self.flat, **(extra or {}), **params, "output_path": output_path}
        return from_flat(values, copy.deepcopy(self.nested), schema=FinetuneConfig, source=self.source)

    def dimension(self, name: str) -> str:
        """The flag a search-space key names (the seed's short names accepted), or a ConfigError."""
        flag = DIMENSION_ALIASES.get(name, name)
        if flag in RESERVED:
            raise ConfigError(f"search_space.{name}: set by the search for each trial, it cannot be searched")
        if flag not in self.flags:
            raise ConfigError(f"search_space.{name}: not a `slmops finetune` flag.{suggest(flag, [*self.flags, *DIMENSION_ALIASES])} "
                              "Any training, method or data flag can be searched (slmops finetune --help)")
        return flag

    def check_value(self, flag: str, value: Any) -> None:
        self._build({flag: value}, "tune-output/trials/0")

    # -- the objective ------------------------------------------------------------------------
    def objective_settings(self, metric: str) -> dict[str, Any]:
        """Flags every trial gets so its training evaluates, and keeps the best of, `metric`."""
        if not self.base.data.eval_split:
            raise ConfigError("a search scores each trial on held-out data: give the run an eval_split (data section or flag)")
        self.extra = metric_settings(metric, self.base.training.eval_metrics)
        self.metric = metric
        self._build({}, "tune-output/trials/0", self.extra)  # the settings themselves accepted
        return self.extra

    def evaluations(self) -> int | None:
        """How many times a trial evaluates (None: not known before the data is read)."""
        training = self.base.training
        if training.max_steps <= 0:
            return None
        return math.ceil(training.max_steps / interval(training.eval_steps, training.max_steps))

    def trial_config(self, params: dict[str, Any], folder: Path) -> FinetuneConfig:
        return self._build(params, str(folder), self.extra)

    def preflight(self, params: dict[str, Any], folder: Path) -> None:
        """The whole plan of one trial (data read, templates, model structure, targets) before
        any trial trains: a mistake every trial would make ends the search here."""
        from slmops.finetune_recipe import plan_finetune

        plan_finetune(self.trial_config(params, folder))

    processes = 1  # per trial (the search's nproc_per_node)

    def run(self, params: dict[str, Any], folder: Path, hooks) -> TrialRun:
        from slmops.finetune_recipe import finetune, replayable_config

        config = self.trial_config(params, folder)
        if self.processes > 1:
            return run_distributed_trial(config, folder, hooks, self.processes)
        result = finetune(config, hooks)
        return TrialRun(result.train.best_eval_loss, result.train.stop_reason, replayable_config(config))

    def best_file(self, trial_config: dict, output_path: Path) -> dict:
        config = copy.deepcopy(trial_config)
        config["output_path"] = str(output_path)
        return config


class WorkflowTarget:
    """A `slmops run` workflow (native, or Olive's shape translated). Dimensions are
    PASS.option (passes.PASS.config.option); a bare option names the one fine-tuning pass's."""

    kind = "workflow"
    command = "slmops run --config"

    def __init__(self, run: dict[str, Any], source: str):
        from slmops.workflow.run import parse_workflow, replayable

        self.source = source
        config, self.olive = parse_workflow(run, source)
        self.native = replayable(config)  # native keys from here on (Olive's translated)
        self.base = config
        from slmops.workflow.passes import FINETUNE_TYPES, canonical_type

        self.finetune_passes = [name for name, spec in config.passes.items() if canonical_type(spec.type) in FINETUNE_TYPES]
        self.extra: dict[str, dict[str, Any]] = {}

    def dimension(self, name: str) -> str:
        passes = self.base.passes
        if "." in name:
            pass_name, option = name.split(".", 1)
            if pass_name not in passes:
                raise ConfigError(f"search_space.{name}: no pass named {pass_name!r}.{suggest(pass_name, passes)} "
                                  f"(passes: {', '.join(passes)})")
        else:
            if len(self.finetune_passes) != 1:
                raise ConfigError(f"search_space.{name}: name the pass (PASS.{name}): the workflow has "
                                  f"{len(self.finetune_passes) or 'no'} fine-tuning passes")
            pass_name, option = self.finetune_passes[0], name
        option = DIMENSION_ALIASES.get(option, option)
        if option in RESERVED | {"model_name_or_path", "data_config"}:
            raise ConfigError(f"search_space.{name}: set by the workflow for each trial, it cannot be searched")
        return f"{pass_name}.{option}"

    def _with(self, params: dict[str, Any], folder: Path) -> dict:
        data = copy.deepcopy(self.native)
        for key, value in [*((f"{p}.{k}", v) for p, opts in self.extra.items() for k, v in opts.items()), *params.items()]:
            pass_name, option = key.split(".", 1)
            data["passes"][pass_name].setdefault("config", {})[option] = value
        data["output_dir"] = str(folder)
        return data

    def _plan(self, params: dict[str, Any], folder: Path):
        from slmops.workflow.run import parse_workflow, plan_workflow

        config, _ = parse_workflow(self._with(params, folder), self.source, olive=False)
        return plan_workflow(config, self.source)

    def check_value(self, flag: str, value: Any) -> None:
        from slmops.workflow.run import parse_workflow

        try:
            config, _ = parse_workflow(self._with({flag: value}, Path("tune-output/trials/0")), self.source, olive=False)
            pass_name = flag.split(".", 1)[0]
            from slmops.workflow.passes import get_pass_type

            spec = config.passes[pass_name]
            get_pass_type(spec.type, f"passes.{pass_name}").check(spec.config, config, f"passes.{pass_name}.config")
        except ConfigError as exc:
            first = str(exc).splitlines()[0]
            if "unknown key" in first:
                raise ConfigError(f"search_space.{flag}: {first.split(': ', 1)[-1]}") from None
            raise

    def objective_settings(self, metric: str) -> dict[str, Any]:
        """PASS.metric: an Evaluate pass's result; a bare metric: the fine-tuning pass's
        evaluation (it keeps the best of it)."""
        from slmops.workflow.passes import canonical_type

        if "." in metric:
            pass_name, name = metric.split(".", 1)
            spec = self.base.passes.get(pass_name)
            if spec is None or canonical_type(spec.type) != "Evaluate":
                evaluates = [n for n, s in self.base.passes.items() if canonical_type(s.type) == "Evaluate"]
                raise ConfigError(f"objective.metric {metric!r}: PASS.metric names an Evaluate pass's result, and {pass_name!r} "
                                  f"is not one (Evaluate passes: {', '.join(evaluates) or 'none'})")
            self.evaluate_pass, self.metric = pass_name, name
        else:
            if len(self.finetune_passes) != 1:
                raise ConfigError(f"objective.metric {metric!r}: name an Evaluate pass's result (PASS.{metric}); the workflow has "
                                  f"{len(self.finetune_passes) or 'no'} fine-tuning passes")
            self.evaluate_pass, self.metric = None, metric
        # each fine-tuning pass evaluates the metric as it trains when it can (pruning compares it)
        self.prunable = False
        planned = {p.name: p for p in self._plan({}, Path("tune-output/trials/0")).passes}
        for name in self.finetune_passes:
            finetune = planned[name].spec.finetune
            if finetune.data.eval_split:
                self.extra[name] = metric_settings(self.metric, finetune.training.eval_metrics)
                self.prunable = True
            elif self.evaluate_pass is None:
                raise ConfigError(f"objective.metric {metric!r}: the fine-tuning pass {name!r} has no eval_split to measure it on")
        self._plan({}, Path("tune-output/trials/0"))  # the settings themselves accepted
        return self.extra

    def evaluations(self) -> int | None:
        if not self.prunable:
            return 0
        counts = []
        for planned in self._plan({}, Path("tune-output/trials/0")).passes:
            if planned.name in self.finetune_passes:
                training = planned.spec.finetune.training
                if training.max_steps <= 0:
                    return None
                counts.append(math.ceil(training.max_steps / interval(training.eval_steps, training.max_steps)))
        return min(counts) if counts else 0

    def preflight(self, params: dict[str, Any], folder: Path) -> None:
        from slmops.finetune_recipe import plan_finetune

        plan = self._plan(params, folder)
        for planned in plan.passes:  # the first fine-tuning pass's data and model checked as it will run
            if planned.name in self.finetune_passes:
                config = planned.spec.finetune.model_copy(update={"output_path": str(planned.out)})
                config.model = config.model.model_copy(update={"model_name_or_path": self.base.input_model.model_name_or_path})
                plan_finetune(config)
                break

    def run(self, params: dict[str, Any], folder: Path, hooks) -> TrialRun:
        from slmops.workflow.run import run_workflow

        plan = self._plan(params, folder)
        result = run_workflow(plan, no_cache=True, hooks=hooks)
        stop = next((r.stop_reason for r in result.finetuned.values() if r.stop_reason), None)
        if self.evaluate_pass is not None:
            report = result.results.get(self.evaluate_pass)
            if report is None:
                raise ConfigError(f"the Evaluate pass {self.evaluate_pass!r} gave no result")
            tuned = next((m for m in report["models"] if not m["name"].endswith("(base)")), report["models"][0])
            if self.metric not in tuned["metrics"]:
                raise ConfigError(f"the Evaluate pass {self.evaluate_pass!r} has no {self.metric!r} (it measured: "
                                  f"{', '.join(tuned['metrics'])}); add it to the evaluator's metrics")
            value = tuned["metrics"][self.metric]
        else:
            value = next(iter(result.finetuned.values())).best_eval_loss
        return TrialRun(value, stop, self._with(params, folder))

    def best_file(self, trial_config: dict, output_path: Path) -> dict:
        config = copy.deepcopy(trial_config)
        config["output_dir"] = str(output_path)
        return config


def metric_settings(metric: str, eval_metrics: list[str] | None) -> dict[str, Any]:
    """The training flags that make a run evaluate `metric` and keep the best of it."""
    from slmops.evaluate.metrics import METRICS

    if metric in ("loss", "perplexity"):
        return {"metric_for_best_model": metric}
    family = next((m.name for m in METRICS.values() if metric in m.produces or m.name == metric), None)
    if family is None:
        known = sorted({"loss", "perplexity", *(p for m in METRICS.values() if m.needs == "generation" for p in m.produces)})
        raise ConfigError(f"objective.metric {metric!r}: not an evaluation metric.{suggest(metric, known)} "
                          f"Choose from: {', '.join(known)}")
    if METRICS[family].needs != "generation":
        raise ConfigError(f"objective.metric {metric!r}: measured by `slmops evaluate`, not while training (use it through an "
                          "Evaluate pass in a workflow)")
    current = list(eval_metrics or [])
    return {"metric_for_best_model": metric, "eval_metrics": current + ([family] if family not in current else [])}


def make_target(run: dict[str, Any], source: str) -> FinetuneTarget | WorkflowTarget:
    """A workflow has passes (or Olive's data_configs / input_model / a typed model entry);
    anything else is a finetune config (its `model:` section holds model_name_or_path)."""
    model = run.get("model")
    olive_model = isinstance(model, dict) and ("type" in model or "config" in model)
    if any(k in run for k in ("passes", "data_configs", "input_model", "engine", "training_config")) or olive_model:
        return WorkflowTarget(run, source)
    return FinetuneTarget(run, source)


def run_distributed_trial(config: FinetuneConfig, folder: Path, hooks, processes: int, poll_seconds: float = 0.5) -> TrialRun:
    """One trial as a torchrun launch of `slmops finetune` in `processes` processes, watched from
    this worker: each evaluation the run logs (its metrics.jsonl) goes to the trial's hooks
    (report, prune), and so does its progress (time limit); a stop they ask for is passed to the
    run through its --stop_file, which it obeys at its next step (every process together), then
    evaluates, checkpoints and ends. The study sees exactly what an in-process trial gives it."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    import yaml

    from slmops.finetune_recipe import replayable_config
    from slmops.interrupts import raise_if_interrupted
    from slmops.train.distributed import threads_per_process

    folder = Path(folder)
    stop_file = folder.parent / f"{folder.name}.stop"
    stop_file.unlink(missing_ok=True)
    config = config.model_copy(update={"training": config.training.model_copy(update={"stop_file": str(stop_file)})})
    trial_file = folder.parent / f"{folder.name}.yaml"
    trial_file.parent.mkdir(parents=True, exist_ok=True)
    trial_file.write_text(yaml.safe_dump(replayable_config(config), sort_keys=False))
    log_file = folder.parent / f"{folder.name}.log"
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads_per_process(processes)))}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               "-m", "slmops.cli.main", "finetune", "--config", str(trial_file), "--log_level", "2"]
    metrics_file = folder / "logs" / "metrics.jsonl"
    read_to, last_step = 0, 0  # how far metrics.jsonl has been read; the last train step seen
    stop_reason = None

    def relay() -> None:
        """The lines the run has logged since the last call (only whole ones) to the hooks."""
        nonlocal stop_reason, read_to, last_step
        try:
            with open(metrics_file, "rb") as handle:
                handle.seek(read_to)
                new = handle.read()
        except FileNotFoundError:
            return
        whole = new[: new.rfind(b"\n") + 1]
        read_to += len(whole)
        for line in whole.decode("utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("split") == "train":
                last_step = max(last_step, record["step"])
            elif record.get("split") == "eval" and hooks.on_evaluate is not None and stop_reason is None:
                values = {k: v for k, v in record.items() if k not in ("step", "split", "time") and isinstance(v, (int, float))}
                stop_reason = hooks.on_evaluate(record["step"], values)
        if hooks.after_step is not None and stop_reason is None:
            stop_reason = hooks.after_step(last_step)
        if stop_reason and not stop_file.exists():
            stop_file.write_text(stop_reason + "\n")

    with open(log_file, "w") as log_handle:
        process = subprocess.Popen(command, env=env, stdout=log_handle, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            while process.poll() is None:
                time.sleep(poll_seconds)
                raise_if_interrupted()
                relay()
            relay()  # the last evaluation, logged as the run ended
        except BaseException:  # Ctrl-C or a failure here: the launch goes with it
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
            raise
    if process.returncode != 0:
        tail = log_file.read_text(errors="replace").strip().splitlines()[-3:]
        raise RuntimeError(f"the trial's torchrun launch exited with {process.returncode}: {' / '.join(tail)} (log: {log_file})")
    result = (yaml.safe_load((folder / "run.yaml").read_text()) or {}).get("result") or {}
    return TrialRun(result.get("best_eval_loss"), result.get("stop_reason"), replayable_config(config))
