"""`slmops report RUN [RUN ...]`: several finetune runs on one page: their curves overlaid,
their results side by side, and the settings in which they differ."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from slmops.errors import ConfigError, OutputError
from slmops.report import _png, _series, eval_metric_names, html_page, html_table, panel_grid
from slmops.train.monitor import read_metrics
from slmops.train.tracking import flat_params


@dataclass
class Run:
    name: str
    path: Path
    doc: dict  # run.yaml
    records: list[dict]  # logs/metrics.jsonl

    @property
    def result(self) -> dict:
        return self.doc.get("result") or {}

    def train_records(self) -> list[dict]:
        return [r for r in self.records if r.get("split") == "train"]


def load_run(path: Path) -> Run:
    path = Path(path).expanduser()
    run_yaml = path / "run.yaml"
    if not run_yaml.is_file():
        raise ConfigError(f"{path} is not a slmops finetune output folder (no run.yaml in it); give the folder that "
                          "`slmops finetune --output_path` wrote")
    try:
        doc = yaml.safe_load(run_yaml.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{run_yaml} is not valid YAML ({exc}); was it edited by hand?") from None
    if not isinstance(doc, dict) or "config" not in doc:
        raise ConfigError(f"{run_yaml} is not a slmops run record (no 'config' section)")
    log_dir = Path((doc["config"].get("training") or {}).get("logging_dir") or path / "logs")
    return Run(path.name, path, doc, read_metrics(log_dir / "metrics.jsonl"))


def _unique_names(runs: list[Run]) -> None:
    """Folder names, with their parent where two runs share one (a/ft, b/ft)."""
    shared = {run.name for run in runs if sum(r.name == run.name for r in runs) > 1}
    for run in runs:
        if run.name in shared:
            run.name = f"{run.path.parent.name}/{run.path.name}"


def result_table(runs: list[Run]) -> tuple[list[str], list[list]]:
    header = ["run", "status", "steps", "final train loss", "best eval", "tokens/s", "train time (s)", "peak memory (MB)"]
    rows = []
    for run in runs:
        result, train = run.result, run.train_records()
        metric = ((run.doc["config"].get("training") or {}).get("metric_for_best_model") or "loss")
        best = (f"{metric} {result['best_eval_loss']:.4f} (step {result['best_step']})"
                if result.get("best_eval_loss") is not None else "")
        peak = max((r.get("peak_memory_mb", 0) for r in train), default=0)
        rows.append([run.name, run.doc.get("status", "?"), result.get("steps", ""),
                     f"{result['final_train_loss']:.4f}" if result.get("final_train_loss") is not None else "", best,
                     f"{result['tokens_per_second']:.0f}" if result.get("tokens_per_second") else "",
                     f"{result['train_seconds']:.1f}" if result.get("train_seconds") else "", f"{peak:,.0f}" if peak else ""])
    return header, rows


def differences(runs: list[Run]) -> tuple[list[str], list[list]]:
    """The configuration keys whose values are not the same in every run (output paths aside)."""
    flat = [flat_params(run.doc["config"]) for run in runs]
    keys = sorted({k for f in flat for k in f})
    differing = [k for k in keys if k not in ("output_path",) and len({repr(f.get(k)) for f in flat}) > 1]
    return ["setting", *(run.name for run in runs)], [[k, *(f.get(k, "") for f in flat)] for k in differing]


def curves_figure(runs: list[Run]) -> bytes | None:
    """Train loss, eval loss and each eval metric, one panel each, one line per run."""
    panels = [("train loss", "train", "loss"), ("eval loss", "eval", "loss")]
    metrics: list[str] = []
    for run in runs:
        metrics += [m for m in eval_metric_names(run.records) if m not in metrics]
    panels += [(f"eval {m}", "eval", m) for m in metrics]
    panels = [p for p in panels if any(_series(run.records, p[1], p[2]) for run in runs)]
    if not panels:
        return None
    fig, axes = panel_grid(len(panels), 3, (4.4, 3.4))
    for ax, (title, split, key) in zip(axes, panels):
        for run in runs:
            points = _series(run.records, split, key)
            if points:
                ax.plot(*zip(*points), label=run.name, marker="o" if split == "eval" or len(points) < 30 else None)
        ax.set(title=title, xlabel="optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    return _png(fig)


def text_table(header: list[str], rows: list[list]) -> str:
    cells = [header, *([str(c) for c in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def compare_runs(paths: list[Path], out: Path, overwrite: bool = False) -> tuple[Path, str]:
    """Write the comparison page to `out`; return it and the results as a text table."""
    out = Path(out).expanduser()
    if out.exists() and not overwrite:
        raise OutputError(f"{out} exists; give another --output_path or add --overwrite to replace it")
    if out.suffix.lower() not in (".html", ".htm"):
        raise ConfigError(f"--output_path {out}: the comparison is one HTML page; name it *.html")
    runs = [load_run(p) for p in paths]  # every folder checked before anything is drawn
    _unique_names(runs)
    results, changed = result_table(runs), differences(runs)
    blocks: list[str | bytes] = ["<h2>Results</h2>", html_table(*results)]
    figure = curves_figure(runs)
    if figure:
        blocks.append(figure)
    blocks += ["<h2>Settings that differ</h2>",
               html_table(*changed) if changed[1] else "<p>none: the runs share every setting</p>"]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    tmp.write_text(html_page(f"slmops: {len(runs)} runs compared", blocks))
    tmp.replace(out)
    text = text_table(*results)
    if changed[1]:
        text += "\n\n" + text_table(*changed)
    return out, text
