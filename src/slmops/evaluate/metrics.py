"""Metrics registry. Each metric names what it needs (generated text or token losses)
and computes from maintained libraries where one exists (sacrebleu, rouge-score)."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

from slmops.data.labels import is_label, normalize_label
from slmops.errors import ConfigError, suggest


@dataclass(frozen=True)
class Metric:
    name: str
    needs: str  # "generation" | "loss" | "timing"
    summary: str
    compute: Callable[..., dict]
    produces: tuple[str, ...] = ()  # scalar result keys, e.g. ("macro_f1", "micro_f1")


METRICS: dict[str, Metric] = {}


def register(metric: Metric) -> Metric:
    METRICS[metric.name] = metric
    return metric


def get_metrics(names: list[str]) -> list[Metric]:
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ConfigError(
            "--metrics: " + "; ".join(f"unknown metric {n!r}.{suggest(n, METRICS)}" for n in unknown) + f" Choose from: {', '.join(METRICS)}"
        )
    return [METRICS[n] for n in names]


def extract_label(prediction: str, labels: set[str]) -> str:
    """The label a generated answer gives: the normalized first line when it is a label;
    else the one label named as a whole word in that line ("I am angry." -> angry);
    else the normalized line itself (which then counts as unparseable)."""
    line = normalize_label(prediction)
    if line in labels:
        return line
    named = [label for label in labels if re.search(rf"\b{re.escape(label)}\b", line)]
    return named[0] if len(named) == 1 else line


def classification_report(predictions: list[str], references: list[str], labels: list[str] | None = None) -> dict:
    """Accuracy, macro/micro F1, per-class precision/recall/F1 and the confusion matrix.
    The label set is the gold labels plus `labels` (the set scored by likelihood); a
    prediction outside it counts as wrong and is tallied as unparseable. The classes scored
    are those in the gold answers or predicted (scikit-learn's default)."""
    gold = [normalize_label(r) for r in references]
    known = set(gold) | {normalize_label(label) for label in labels or []}
    pred = [extract_label(p, known) for p in predictions]
    labels = sorted(set(gold) | {p for p in pred if p in known})
    label_set = set(labels)
    unparseable = sum(1 for p in pred if p not in label_set)
    n = len(gold)
    correct = sum(1 for g, p in zip(gold, pred) if g == p)
    per_class = {}
    for label in labels:
        tp = sum(1 for g, p in zip(gold, pred) if g == label and p == label)
        fp = sum(1 for g, p in zip(gold, pred) if g != label and p == label)
        fn = sum(1 for g, p in zip(gold, pred) if g == label and p != label)
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[label] = {"precision": precision, "recall": recall, "f1": f1, "support": tp + fn}
    columns = labels + (["(other)"] if unparseable else [])
    confusion = {g: {c: 0 for c in columns} for g in sorted(set(gold))}
    for g, p in zip(gold, pred):
        confusion[g][p if p in label_set else "(other)"] += 1
    # Micro-F1 over the gold classes equals accuracy when every prediction is in the label set.
    tp_all = correct
    fp_all = sum(1 for g, p in zip(gold, pred) if p in label_set and p != g)
    fn_all = n - correct
    micro_p = tp_all / (tp_all + fp_all) if tp_all + fp_all else 0.0
    micro_r = tp_all / (tp_all + fn_all) if tp_all + fn_all else 0.0
    return {
        "accuracy": correct / n if n else 0.0,
        "macro_f1": sum(c["f1"] for c in per_class.values()) / len(labels) if labels else 0.0,
        "micro_f1": 2 * micro_p * micro_r / (micro_p + micro_r) if micro_p + micro_r else 0.0,
        "unparseable": unparseable,
        "n": n,
        "per_class": per_class,
        "confusion": confusion,
    }


def _accuracy(predictions, references, labels=None, **_) -> dict:
    report = classification_report(predictions, references, labels)
    return {"accuracy": report["accuracy"], "unparseable": report["unparseable"], "n": report["n"]}


def _f1(predictions, references, labels=None, **_) -> dict:
    report = classification_report(predictions, references, labels)
    return {k: report[k] for k in ("macro_f1", "micro_f1", "per_class", "confusion")}


def _bleu(predictions, references, **_) -> dict:
    import sacrebleu

    return {"bleu": sacrebleu.corpus_bleu([p.strip() for p in predictions], [[r.strip() for r in references]]).score}


def _rouge(predictions, references, **_) -> dict:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for p, r in zip(predictions, references):
        scores = scorer.score(r, p)
        for key in totals:
            totals[key] += scores[key].fmeasure
    return {key: value / max(len(predictions), 1) for key, value in totals.items()}


def _perplexity(loss_sum: float, token_count: int, **_) -> dict:
    loss = loss_sum / max(token_count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": token_count}


def _latency(timings: list[dict], **_) -> dict:
    import statistics

    ttft = sorted(t["ttft_s"] for t in timings)
    decode = [t["decode_tokens_per_s"] for t in timings if t["decode_tokens_per_s"] is not None]

    def pct(values, q):
        return values[min(len(values) - 1, int(round(q * (len(values) - 1))))] if values else None

    return {
        "ttft_p50_s": pct(ttft, 0.5),
        "ttft_p95_s": pct(ttft, 0.95),
        "decode_tokens_per_s_p50": statistics.median(decode) if decode else None,
        "peak_rss_mb": max(t["peak_rss_mb"] for t in timings) if timings else None,
    }


register(Metric("accuracy", "generation", "chosen label == gold label (normalized; chosen by likelihood or generated)", _accuracy, ("accuracy", "unparseable")))
register(Metric("f1", "generation", "macro and micro F1, per-class precision/recall/F1, confusion matrix", _f1, ("macro_f1", "micro_f1")))
register(Metric("perplexity", "loss", "exp(mean cross-entropy) over the completion tokens", _perplexity, ("loss", "perplexity")))
register(Metric("bleu", "generation", "corpus BLEU (sacrebleu)", _bleu, ("bleu",)))
register(Metric("rouge", "generation", "ROUGE-1/2/L F-measure (rouge-score)", _rouge, ("rouge1", "rouge2", "rougeL")))
register(Metric("latency", "timing", "time to first token and decode tokens/s (p50/p95), peak memory", _latency,
                ("ttft_p50_s", "ttft_p95_s", "decode_tokens_per_s_p50", "peak_rss_mb")))

# Metrics that compare one label per example (scored by label likelihood for a classification task).
CLASSIFICATION_METRICS = ("accuracy", "f1")

# Metrics where a smaller value is better (for best-model selection and early stopping).
LOWER_IS_BETTER = {"loss", "perplexity", "unparseable", "ttft_p50_s", "ttft_p95_s", "peak_rss_mb"}

# The best value a metric can take: once the best model scores it, no later evaluation can
# improve on it (a tie keeps the earlier weights), so early stopping need not wait out its patience.
BEST_POSSIBLE = {"accuracy": 1.0, "macro_f1": 1.0, "micro_f1": 1.0, "rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0, "bleu": 100.0,
                 "unparseable": 0.0}


def check_labels(references: list[str | None]) -> None:
    """Classification metrics compare one-line labels: refuse gold answers that a generated
    first line can never equal (empty, or spread over several lines)."""
    from slmops.errors import DataError

    bad = [i for i, r in enumerate(references) if not is_label(r)]
    if bad:
        example = references[bad[0]]
        raise DataError(
            f"accuracy/f1 need one-line, non-empty gold labels, and {len(bad)} eval example(s) have none "
            f"(first: row {bad[0]}, {example!r}); use bleu/rouge for free text, or fix the label column"
        )
