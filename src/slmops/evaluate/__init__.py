"""Metrics registry (metrics.py) and the evaluate command's library function (run.py), on
the inference layer."""

from slmops.evaluate.metrics import METRICS, classification_report, get_metrics, normalize_label

__all__ = ["METRICS", "classification_report", "get_metrics", "normalize_label"]
