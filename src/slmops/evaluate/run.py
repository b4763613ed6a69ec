"""`slmops evaluate` as a library call: several models, one eval set, one table."""

from __future__ import annotations

import json
import logging
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

from slmops.config import EvaluateConfig
from slmops.data.format import build_formatter
from slmops.data.labels import MAX_LABELS, LabelSet, label_set
from slmops.data.load import load_split
from slmops.data.prepare import find_labels, format_rows, hold_out, rows_split
from slmops.data.tokenize import tokenize_examples
from slmops.errors import DataError
from slmops.evaluate.choices import predict_labels, score_labels
from slmops.evaluate.metrics import CLASSIFICATION_METRICS, check_labels, get_metrics
from slmops.inference import Backend, GenerationParams, open_backend
from slmops.logs import phase, progress_enabled
from slmops.outputs import versions

log = logging.getLogger("slmops")


@dataclass
class ModelResult:
    name: str
    metrics: dict
    predictions: list[str] = field(default_factory=list)
    seconds: float = 0.0
    label_scores: list[dict[str, float]] = field(default_factory=list)  # each label's log-probability, per example


def _label_set_for(cfg: EvaluateConfig, references: list[str]) -> LabelSet | None:
    """The label set scored by likelihood, or None where the answers are generated (and why, said once)."""
    if cfg.scoring == "generation":
        log.info("scoring: generated answers, parsed to labels (--scoring generation)")
        return None
    labels = label_set(references, cfg.labels)
    if len(labels.labels) > MAX_LABELS and cfg.scoring == "auto":
        log.info("scoring: generated answers (%d distinct gold answers is more than a label set of %d); --scoring likelihood "
                 "scores them all", len(labels.labels), MAX_LABELS)
        return None
    log.info("scoring: the likelihood of each of %d labels, the most likely one is the answer: %s", len(labels.labels), labels.describe())
    return labels


def _first(dataset, count: int | None):
    return dataset.select(range(count)) if count is not None and count < len(dataset) else dataset


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def evaluate(cfg: EvaluateConfig) -> dict:
    """Each model (and adapter) on one split, every asked metric; the report as a dict (and
    results.json, predictions, report.md/html in --output_path)."""
    metrics = get_metrics(cfg.metrics)  # unknown metric names fail before any work
    if cfg.output_path:  # an output we cannot write must not surface after the generation work
        from slmops.outputs import check_writable

        check_writable(Path(cfg.output_path), "--output_path")
    split = load_split(cfg.data.data_name, rows_split(cfg.data), cfg.data.data_files, cfg.data.eval_subset or cfg.data.train_subset)
    dataset = split.dataset
    held_out = cfg.data.eval_split == "auto"  # rows chosen once the first model's formatter gives the completions
    if not held_out:
        dataset = _first(dataset, cfg.data.max_samples)

    # (model, adapter): the adapter None is the model's default (an slmops output's own adapter);
    # 'base' compares the same loaded model with its adapter off
    candidates: list[tuple[str, str | None]] = [(cfg.model.model_name_or_path, cfg.adapter)]
    for other in cfg.compare_to or []:
        candidates.append((cfg.model.model_name_or_path, "base") if other == "base" else (other, None))

    results: list[ModelResult] = []
    labels: LabelSet | None = None  # the label set scored by likelihood, found from the first model's gold answers
    scoring_chosen = False
    examples = None
    references: list[str] = []
    backends: dict[str, Backend] = {}
    for model_name, adapter in candidates:
        backend = backends.get(model_name)
        if backend is None:
            with phase(f"loading {model_name}"):
                backend = open_backend(model_name, [adapter] if adapter and adapter != "base" else [],
                                       trust_remote_code=cfg.model.trust_remote_code, dtype=cfg.model.torch_dtype)
            backends = {model_name: backend}  # one model in memory at a time; reused for its 'base'
        chosen = adapter  # None: the backend's default adapter
        formatter = build_formatter(cfg.data, list(dataset.column_names), backend.tokenizer)
        if held_out:  # --eval_split auto: the rows `slmops finetune` held out of this train split with this --seed
            train_examples = format_rows(dataset, formatter)
            _, split, _, _ = hold_out(split, train_examples, find_labels(cfg.data, [ex.completion for ex in train_examples]), cfg.seed)
            dataset, held_out = _first(split.dataset, cfg.data.max_samples), False
        examples = format_rows(dataset, formatter)
        references = [ex.completion for ex in examples]
        needs_generation = any(m.needs == "generation" for m in metrics)
        if needs_generation and any(r is None for r in references):
            raise DataError(f"generation metrics need a completion in each example, and the {formatter.name} format has none; "
                            "use a template whose last field is the answer, or chat/prompt+completion data")
        classifying = any(m.name in CLASSIFICATION_METRICS for m in metrics)
        if classifying:
            check_labels(references)
            if not scoring_chosen:
                labels, scoring_chosen = _label_set_for(cfg, references), True
        started = time.perf_counter()
        values: dict = {}
        predictions: list[str] = []
        scores = None
        params = GenerationParams(max_new_tokens=cfg.max_new_tokens)
        if labels is not None:
            scores = score_labels(backend, examples, labels, chosen, formatter.add_special_tokens, progress_enabled(), cfg.batch_size)
            label_predictions = predict_labels(scores, labels)
            values["scoring"] = "likelihood"
        if needs_generation and (labels is None or any(m.needs == "generation" and m.name not in CLASSIFICATION_METRICS for m in metrics)):
            predictions = backend.generate_batch([ex.prompt for ex in examples], chosen, params, formatter.add_special_tokens,
                                                 cfg.batch_size, progress=progress_enabled())
        for metric in metrics:
            if metric.needs == "generation":
                if labels is not None and metric.name in CLASSIFICATION_METRICS:
                    values.update(metric.compute(predictions=label_predictions, references=references, labels=list(labels.labels)))
                else:
                    values.update(metric.compute(predictions=predictions, references=references))
            elif metric.needs == "loss":
                data = tokenize_examples(examples, backend.tokenizer, formatter, cfg.data.max_seq_len, cfg.data.long_examples)
                with phase(f"loss and perplexity over {len(examples)} rows ({_label(backend, adapter)})"):
                    loss_sum, count = backend.loss(data, chosen, cfg.batch_size)
                values.update(metric.compute(loss_sum=loss_sum, token_count=count))
            elif metric.needs == "timing":
                with phase(f"latency on {min(cfg.latency_samples, len(examples))} prompts ({_label(backend, adapter)})"):
                    timings = [{**backend.timed(ex.prompt, chosen, cfg.max_new_tokens, formatter.add_special_tokens),
                                "peak_rss_mb": peak_rss_mb()} for ex in examples[: cfg.latency_samples]]
                values.update(metric.compute(timings=timings))
        if labels is not None and not predictions:
            predictions = label_predictions
        results.append(ModelResult(_label(backend, adapter), values, predictions, time.perf_counter() - started,
                                   [dict(zip(labels.labels, map(float, row))) for row in scores] if scores is not None else []))

    report = {
        "data": {"source": split.source, "split": split.split, "rows": len(dataset), "fingerprint": split.fingerprint},
        "metrics": cfg.metrics,
        "models": [{"name": r.name, "metrics": r.metrics, "seconds": r.seconds} for r in results],
        "versions": versions(),
    }
    if cfg.output_path:
        _write(cfg, report, results, examples or [], references)
    return report


def _label(backend: Backend, adapter: str | None) -> str:
    """'models/tone/ft + tone', 'models/tone/ft (base)', 'bundle (onnx) + tone'."""
    if adapter == "base":
        return f"{backend.name} (base)"
    name = backend.load_adapter(adapter) if adapter is not None else backend.default_adapter
    return backend.name + (f" + {name}" if name else "")


HEADLINE = ["accuracy", "macro_f1", "micro_f1", "unparseable", "perplexity", "loss", "bleu", "rouge1", "rouge2", "rougeL",
            "ttft_p50_s", "ttft_p95_s", "decode_tokens_per_s_p50", "peak_rss_mb"]


def format_table(report: dict) -> str:
    """Metrics side by side; with two or more models, the difference of each to the last."""
    models = report["models"]
    keys = [k for k in HEADLINE if any(k in m["metrics"] and m["metrics"][k] is not None for m in models)]
    names = [m["name"] for m in models]
    header = ["metric", *names] + (["delta (first - last)"] if len(models) > 1 else [])
    rows = []
    for key in keys:
        vals = [m["metrics"].get(key) for m in models]
        row = [key, *[_fmt(v) for v in vals]]
        if len(models) > 1:
            row.append(_fmt(vals[0] - vals[-1]) if vals[0] is not None and vals[-1] is not None else "")
        rows.append(row)
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _write(cfg: EvaluateConfig, report: dict, results: list[ModelResult], examples, references) -> None:
    out = Path(cfg.output_path)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=2))
    for index, result in enumerate(results):
        if not result.predictions:
            continue
        with open(out / f"predictions-{index}.jsonl", "w") as handle:
            for i, (ex, ref, pred) in enumerate(zip(examples, references, result.predictions)):
                row = {"model": result.name, "prompt": ex.prompt, "reference": ref, "prediction": pred}
                if result.label_scores:  # the chosen label: the most likely one
                    row["label"] = max(result.label_scores[i], key=result.label_scores[i].get)
                    row["label_logprobs"] = result.label_scores[i]
                handle.write(json.dumps(row) + "\n")
    from slmops.report import class_tables, markdown_table, write_evaluation_report

    table = format_table(report)
    text = (f"# slmops evaluate\n\ndata: {report['data']['source']} ({report['data']['split']}, {report['data']['rows']} rows)"
            f"\n\n```\n{table}\n```\n")
    for model in report["models"]:
        tables = class_tables(model["metrics"])
        if tables:  # per class, then the confusion matrix (gold rows, predicted columns)
            text += f"\n## {model['name']}\n\n{markdown_table(tables[0], tables[1])}\n\n{markdown_table(tables[2], tables[3])}\n"
    (out / "report.md").write_text(text + "\nConfusion matrices as pictures: report.html\n")

    write_evaluation_report(out, report, table)
