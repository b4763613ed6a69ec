"""Human-readable reports: training curves and evaluation tables as pictures in one
self-contained HTML page (images embedded), plus report.md and loss.png."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from slmops.outputs import OutputLayout
from slmops.train.monitor import read_metrics


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display; must precede pyplot
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    _pyplot().close(fig)
    return buffer.getvalue()


def _series(records: list[dict], split: str, key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in records if r.get("split") == split and isinstance(r.get(key), (int, float))]


def loss_figure(records: list[dict], title: str) -> bytes | None:
    train, evals = _series(records, "train", "loss"), _series(records, "eval", "loss")
    if not train and not evals:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train loss", marker="." if len(train) < 30 else None)
    if evals:
        ax.plot(*zip(*evals), label="eval loss", marker="o")
    ax.set(xlabel="optimizer step", ylabel="cross-entropy (nats/token)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return _png(fig)


TRAIN_PANELS = (("learning_rate", "learning rate"), ("tokens_per_second", "tokens/s"), ("grad_norm", "gradient norm (before clipping)"),
                ("memory_mb", "memory (MB, resident)"), ("cpu_cores_busy", "CPU cores busy"), ("gpu_memory_mb", "GPU memory (MB, peak)"))


def eval_metric_names(records: list[dict]) -> list[str]:
    """The metrics the evaluations logged besides the loss (perplexity, accuracy, macro_f1, ...);
    not the row count, nor an unparseable count that stayed at zero."""
    names: list[str] = []
    evals = [r for r in records if r.get("split") == "eval"]
    for r in evals:
        names += [k for k, v in r.items() if k not in ("step", "split", "time", "loss", "epoch", "n") and isinstance(v, (int, float))
                  and k not in names]
    return [n for n in names if n != "unparseable" or any(r.get(n) for r in evals)]


def training_figure(records: list[dict]) -> bytes | None:
    """Learning rate, throughput, gradient norm, memory, CPU use and every eval metric over
    the steps, beside the loss."""
    panels = [(title, _series(records, "train", key)) for key, title in TRAIN_PANELS]
    panels += [(f"eval {key}", _series(records, "eval", key)) for key in eval_metric_names(records)]
    panels = [p for p in panels if p[1]]
    if not panels:
        return None
    fig, axes = panel_grid(len(panels), 4, (3.6, 3.0))
    for ax, (name, points) in zip(axes, panels):
        ax.plot(*zip(*points), marker="." if len(points) < 30 else None)
        ax.set(title=name, xlabel="step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def panel_grid(count: int, most_columns: int, panel_size: tuple[float, float]):
    """(figure, the first `count` axes) of a grid of panels, the unused cells blanked."""
    columns = min(count, most_columns)
    rows = -(-count // columns)
    fig, axes = _pyplot().subplots(rows, columns, figsize=(panel_size[0] * columns, panel_size[1] * rows), dpi=110, squeeze=False)
    cells = list(axes.flat)
    for ax in cells[count:]:
        ax.axis("off")
    return fig, cells[:count]


def confusion_figure(confusion: dict[str, dict[str, int]], title: str) -> bytes:
    gold = list(confusion)
    predicted = list(next(iter(confusion.values())))
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(predicted), 1.0 + 0.8 * len(gold)), dpi=110)
    values = [[confusion[g][p] for p in predicted] for g in gold]
    ax.imshow(values, cmap="Blues")
    ax.set_xticks(range(len(predicted)), predicted, rotation=45, ha="right")
    ax.set_yticks(range(len(gold)), gold)
    ax.set(xlabel="predicted", ylabel="gold", title=title)
    for i, row in enumerate(values):
        for j, value in enumerate(row):
            ax.text(j, i, str(value), ha="center", va="center", color="white" if value > max(map(max, values)) / 2 else "black")
    fig.tight_layout()
    return _png(fig)


def html_page(title: str, blocks: list[str | bytes]) -> str:
    """Text blocks (already HTML) and PNG images, in order, in one self-contained page."""
    parts = [f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
             "th:first-child,td:first-child{text-align:left}img{max-width:100%}</style>",
             f"<h1>{html.escape(title)}</h1>"]
    for block in blocks:
        if isinstance(block, bytes):
            parts.append(f"<p><img src='data:image/png;base64,{base64.b64encode(block).decode()}'></p>")
        else:
            parts.append(block)
    return "\n".join(parts)


def html_table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _task_line(task: dict) -> str:
    if task["kind"] != "classification":
        return task["kind"]
    return "classification: " + ", ".join(f"{label} ({count})" for label, count in task["labels"].items())


def write_training_report(layout: OutputLayout, log_dir: Path, plan: dict, result: dict, config: dict | None = None,
                          versions: dict | None = None, samples: list[dict] | None = None) -> Path:
    """report.md, report.html and loss.png of a finished run: facts, curves, the evaluations,
    a few eval prompts answered by the tuned model and its base, what was chosen automatically,
    the configuration and the library versions."""
    records = read_metrics(Path(log_dir) / "metrics.jsonl")
    title = (f"{plan['task_name']}: " if plan.get("task_name") else "") + f"{plan['method']} on {plan['model']['given']}"
    loss_png = loss_figure(records, title)
    if loss_png:
        (layout.root / "loss.png").write_bytes(loss_png)
    facts = [
        ("model", f"{plan['model']['given']} ({plan['model']['kind']})"),
        ("method", f"{plan['method']}, target modules: {plan['target_modules']}"),
        ("data", plan["data"]["format_description"]),
        ("train", plan["data"]["train"]["tokenized"]),
        ("task", _task_line(plan["data"].get("task") or {"kind": "generation"})),
        ("precision", f"{plan['precision']['name']} on {plan['precision']['device']} ({plan['precision']['reason']})"),
        ("steps", f"{result['steps']}" + (f" (stopped: {str(result.get('stop_reason') or 'early stopping').replace('_', ' ')})"
                                          if result["stopped_early"] else "")),
        ("final train loss", f"{result['final_train_loss']:.4f}" if result.get("final_train_loss") is not None else "n/a"),
        ("tokens", f"{result['input_tokens_seen']:,} through the model ({result['tokens_seen']:,} with loss) in "
                   f"{result['train_seconds']:.1f} s ({result['tokens_per_second']:.0f} tokens/s)"),
    ]
    if result.get("best_eval_loss") is not None:
        facts.append(("best eval", f"{result['best_eval_loss']:.4f} at step {result['best_step']}"))
    train = [r for r in records if r.get("split") == "train"]
    if any("peak_memory_mb" in r for r in train):
        peak = max(r.get("peak_memory_mb", 0) for r in train)
        busy = [r["cpu_cores_busy"] for r in train if "cpu_cores_busy" in r]
        facts.append(("machine", f"peak memory {peak:,.0f} MB; CPU cores busy {sum(busy) / len(busy):.2f} on average"
                                 + (f"; GPU memory peak {max(r.get('gpu_memory_mb', 0) for r in train):,.0f} MB"
                                    if any("gpu_memory_mb" in r for r in train) else "")))
    evals = eval_table(records)
    lines = ["# slmops finetune report", ""] + [f"- {k}: {v}" for k, v in facts]
    if evals:
        lines += ["", "## Evaluations", "", markdown_table(*evals)]
    answers = sample_table(samples or [])
    how = "most likely label" if (plan["data"].get("task") or {}).get("kind") == "classification" else "greedy"
    if answers:
        lines += ["", f"## Sample answers (eval prompts, {how})", "", markdown_table(*answers)]
    chosen = chosen_settings(plan)
    lines += ["", "## Chosen for this run", "", markdown_table(["setting", "value"], chosen)]
    if versions:
        lines += ["", "## Versions", "", ", ".join(f"{k} {v}" for k, v in versions.items())]
    if loss_png:
        lines += ["", "![loss curves](loss.png)", "", "Curves of every logged value (learning rate, throughput, gradient norm, "
                  "memory, CPU use, eval metrics): report.html"]
    path = layout.root / "report.md"
    path.write_text("\n".join(lines) + "\n")
    blocks: list[str | bytes] = [html_table(["", ""], [list(f) for f in facts])]
    blocks += [png for png in (loss_png, training_figure(records)) if png]
    if evals:
        blocks += ["<h2>Evaluations</h2>", html_table(*evals)]
    if answers:
        blocks += [f"<h2>Sample answers (eval prompts, {how})</h2>", html_table(*answers)]
    blocks += ["<h2>Chosen for this run</h2>", html_table(["setting", "value"], chosen)]
    if config:
        import yaml

        blocks += ["<h2>Configuration (run.yaml)</h2>", f"<pre>{html.escape(yaml.safe_dump(config, sort_keys=False))}</pre>"]
    if versions:
        blocks += ["<h2>Versions</h2>", html_table(["library", "version"], [[k, v] for k, v in versions.items()])]
    (layout.root / "report.html").write_text(html_page(f"slmops finetune: {title}", blocks))
    return path


def eval_table(records: list[dict]) -> tuple[list[str], list[list]] | None:
    """(header, rows): each evaluation's step, loss and metrics."""
    evals = [r for r in records if r.get("split") == "eval"]
    if not evals:
        return None
    names = ["loss", *eval_metric_names(records)]
    rows = [[r["step"], *(f"{r[n]:.4f}" if isinstance(r.get(n), (int, float)) else "" for n in names)] for r in evals]
    return ["step", *names], rows


def sample_table(samples: list[dict]) -> tuple[list[str], list[list]] | None:
    """(header, rows) of the sample answers: the prompt's end, expected, tuned, base."""
    if not samples:
        return None

    def cell(text: str | None, limit: int = 120) -> str:
        text = " ".join((text or "").split()).replace("|", "\\|")
        return text if len(text) <= limit else text[:limit] + "…"

    with_base = any(s.get("base") is not None for s in samples)
    header = ["prompt (end)", "expected", "tuned", *(["base"] if with_base else [])]
    rows = [[cell(s["prompt"][-160:]), cell(s["expected"]), cell(s["tuned"]), *([cell(s["base"])] if with_base else [])]
            for s in samples]
    return header, rows


def chosen_settings(plan: dict) -> list[list[str]]:
    """What slmops decided for the run (defaults resolved, automatic choices) as table rows."""
    rows = [["method", plan["method"]], ["target modules", str(plan["target_modules"])],
            ["learning rate", f"{plan['learning_rate']:g}"], ["max sequence length", str(plan["max_seq_len"])],
            ["precision", f"{plan['precision']['name']} on {plan['precision']['device']} ({plan['precision']['reason']})"],
            ["task", _task_line(plan["data"].get("task") or {"kind": "generation"})]]
    if plan.get("distributed"):
        d = plan["distributed"]
        rows.append(["processes", f"{d['world_size']} ({d['backend']}), global batch {d['global_batch']}"])
    return rows


def class_tables(metrics: dict) -> tuple[list[str], list[list], list[str], list[list]] | None:
    """(per-class header, rows, confusion header, rows) of a classification result, or None."""
    per_class, confusion = metrics.get("per_class"), metrics.get("confusion")
    if not per_class or not confusion:
        return None
    classes = [["label", "precision", "recall", "F1", "support"],
               [[label, f"{c['precision']:.4f}", f"{c['recall']:.4f}", f"{c['f1']:.4f}", c["support"]] for label, c in per_class.items()]]
    columns = list(next(iter(confusion.values())))
    matrix = [["gold / predicted", *columns], [[gold, *(row[c] for c in columns)] for gold, row in confusion.items()]]
    return classes[0], classes[1], matrix[0], matrix[1]


def markdown_table(header: list, rows: list[list]) -> str:
    lines = ["| " + " | ".join(str(h) for h in header) + " |", "|" + " --- |" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def write_evaluation_report(out: Path, report: dict, table_text: str) -> Path:
    blocks: list[str | bytes] = [f"<p>data: {html.escape(report['data']['source'])} ({html.escape(report['data']['split'])}, "
                                 f"{report['data']['rows']} rows)</p>", f"<pre>{html.escape(table_text)}</pre>"]
    for model in report["models"]:
        tables = class_tables(model["metrics"])
        if tables:
            blocks += [f"<h2>{html.escape(model['name'])}</h2>", html_table(tables[0], tables[1]), html_table(tables[2], tables[3]),
                       confusion_figure(model["metrics"]["confusion"], model["name"])]
    path = Path(out) / "report.html"
    path.write_text(html_page("slmops evaluate", blocks))
    return path
