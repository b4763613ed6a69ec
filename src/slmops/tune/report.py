"""What a search leaves in its output folder, read from the study (so every worker, on any
machine, writes the whole study): trials.csv, best.yaml (the best trial's full config, run as
it is by its command), report.md and report.html with Optuna's pictures; and the live table."""

from __future__ import annotations

import csv
import html
import io
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import yaml

from slmops.tune.load import SearchPlan

log = logging.getLogger("slmops")


def _duration(trial) -> float | None:
    if trial.datetime_start is None or trial.datetime_complete is None:
        return None
    return (trial.datetime_complete - trial.datetime_start).total_seconds()


def _value(trial) -> float | None:
    """A complete trial's objective; a pruned one's last reported value."""
    if trial.state.name == "COMPLETE":
        return trial.value
    if trial.state.name == "PRUNED" and trial.intermediate_values:
        return trial.intermediate_values[max(trial.intermediate_values)]
    return None


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def state_of(trial) -> str:
    name = trial.state.name.lower()
    if name == "fail" and trial.user_attrs.get("surplus"):
        return "surplus"
    return name


def _note(trial) -> str:
    from optuna.storages import RetryHeartbeatStaleTrialCallback as Retry

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        retried = Retry.retried_trial_number(trial)
    parts = []
    if trial.user_attrs.get("fail_reason") and trial.state.name == "FAIL":
        parts.append(trial.user_attrs["fail_reason"])
    if trial.state.name == "PRUNED" and trial.intermediate_values:
        parts.append(f"pruned at step {max(trial.intermediate_values)}")
    if trial.user_attrs.get("stop_reason") == "time_limit":
        parts.append("stopped at the trial time limit")
    if retried is not None:
        parts.append(f"retry of trial {retried}")
    return "; ".join(parts)


class TrialTable:
    """One line per trial as it finishes: number, state, metric, time, parameters (and why,
    for a failure). Lines go above the study's progress bar."""

    def __init__(self, plan: SearchPlan, bar=None):
        self.plan = plan
        self.names = list(plan.config.search_space)
        self.bar = bar
        self.header_done = False

    def _say(self, line: str) -> None:
        from slmops.logs import say

        say(self.bar, line)

    def _width(self, name: str) -> int:
        return max(len(name), 9)

    def header(self) -> str:
        return (f"{'trial':>5}  {'state':<8}  {self.plan.config.objective.metric:>10}  {'time':>7}  "
                + "  ".join(f"{name:>{self._width(name)}}" for name in self.names))

    def row(self, trial) -> str:
        value = _value(trial)
        duration = _duration(trial)
        params = "  ".join(f"{_format(trial.params.get(name, '-')):>{self._width(name)}}" for name in self.names)
        note = _note(trial)
        return (f"{trial.number:>5}  {state_of(trial):<8}  {(_format(value) if value is not None else '-'):>10}  "
                f"{(f'{duration:.0f} s' if duration is not None else '-'):>7}  {params}" + (f"  ({note})" if note else ""))

    def __call__(self, study, trial) -> None:
        if trial.user_attrs.get("surplus"):
            return
        if not self.header_done:
            self._say(self.header())
            self.header_done = True
        self._say(self.row(trial))


def _atomic_write(path: Path, text: str | bytes) -> None:
    """Several workers on one machine write the same files: each write is whole."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    if isinstance(text, bytes):
        tmp.write_bytes(text)
    else:
        tmp.write_text(text)
    tmp.replace(path)


def write_trials_csv(plan: SearchPlan, study, path: Path) -> None:
    names = list(plan.config.search_space)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["number", "state", plan.config.objective.metric, "seconds", *names, "note", "folder", "worker"])
    for trial in study.get_trials(deepcopy=False):
        value = _value(trial)
        duration = _duration(trial)
        worker = trial.user_attrs.get("worker") or {}
        writer.writerow([trial.number, state_of(trial), "" if value is None else value, "" if duration is None else round(duration, 1),
                         *[trial.params.get(name, "") for name in names], _note(trial), trial.user_attrs.get("folder", ""),
                         f"{worker.get('host', '')}:{worker.get('pid', '')}" if worker else ""])
    _atomic_write(path, buffer.getvalue())


def write_best(plan: SearchPlan, best, path: Path) -> Path | None:
    """best.yaml: the best trial's full config, its output folder OUT/best-run."""
    if best is None or "config" not in best.user_attrs:
        return None
    config = plan.target.best_file(best.user_attrs["config"], plan.out / "best-run")
    header = (f"# the best trial of study {plan.config.study_name or plan.out.name}: trial {best.number}, "
              f"{plan.config.objective.metric} {best.value:.6g}\n"
              f"# {plan.target.command} {path} runs it again (same seed: the same {plan.config.objective.metric})\n")
    _atomic_write(path, header + yaml.safe_dump(config, sort_keys=False))
    return path


def _figures(study) -> list[tuple[str, bytes]]:
    """Optimization history, parameter importances and parallel coordinates (those the
    study's trials allow: importances need two complete trials that differ)."""
    import optuna
    import optuna.visualization.matplotlib as plots

    from slmops.report import _png, _pyplot

    _pyplot()  # the Agg backend before optuna imports pyplot
    figures = []
    makers = [("Optimization history", plots.plot_optimization_history), ("Parameter importances", plots.plot_param_importances),
              ("Parallel coordinates", plots.plot_parallel_coordinate), ("Intermediate values", plots.plot_intermediate_values)]
    for title, make in makers:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                axes = make(study)
            except (ValueError, RuntimeError, ZeroDivisionError) as exc:  # too few trials for this picture
                log.debug("tune report: no %s (%s)", title.lower(), exc)
                continue
        figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
        figure.set_size_inches(8, 4.5)
        figure.tight_layout()
        figures.append((title, _png(figure)))
    del optuna
    return figures


def write_report(plan: SearchPlan, study, result) -> None:
    from slmops.report import html_page, html_table
    from slmops.tune.study import shown_url

    out = plan.out
    table = TrialTable(plan)
    rows = [table.row(t) for t in study.get_trials(deepcopy=False) if not t.user_attrs.get("surplus")]
    counts = result.counts
    best = result.best
    summary = [
        ("study", f"{result.study_name} in {shown_url(result.storage)}"),
        ("search", f"{plan.config.search_strategy.type}, {plan.config.search_strategy.num_trials} trials; "
                   f"objective {plan.direction} {plan.config.objective.metric}"),
        ("trials", f"{counts.complete} complete, {counts.pruned} pruned, {counts.failed} failed, {counts.running} running, "
                   f"{counts.waiting} waiting"),
    ]
    if best is not None:
        summary.append(("best", f"trial {best.number}: {plan.config.objective.metric} {best.value:.6g} with "
                                + ", ".join(f"{k}={_format(v)}" for k, v in best.params.items())))
        summary.append(("run it", f"{plan.target.command} {out / 'best.yaml'}"))
    figures = _figures(study) if counts.complete else []
    md = ["# slmops tune", "", *[f"- **{k}**: {v}" for k, v in summary], "", "## Trials", "", "```", table.header(), *rows, "```", ""]
    for index, (title, png) in enumerate(figures):
        name = f"tune-{index + 1}.png"
        _atomic_write(out / name, png)
        md += [f"## {title}", "", f"![{title}]({name})", ""]
    _atomic_write(out / "report.md", "\n".join(md))
    blocks: list[str | bytes] = [html_table(["", ""], [[k, v] for k, v in summary]), "<h2>Trials</h2>",
                                 f"<pre>{html.escape(chr(10).join([table.header(), *rows]))}</pre>"]
    for title, png in figures:
        blocks += [f"<h2>{html.escape(title)}</h2>", png]
    _atomic_write(out / "report.html", html_page("slmops tune", blocks))


def write_outputs(plan: SearchPlan, study, result) -> dict[str, Path | None]:
    out = plan.out
    out.mkdir(parents=True, exist_ok=True)
    write_trials_csv(plan, study, out / "trials.csv")
    best = write_best(plan, result.best, out / "best.yaml")
    write_report(plan, study, result)
    return {"trials": out / "trials.csv", "best": best, "report": out / "report.html"}
