"""Metrics, predictors and the evaluate command's library function."""

from slmops.evaluate.metrics import METRICS, classification_report, get_metrics, normalize_label

__all__ = ["METRICS", "classification_report", "get_metrics", "normalize_label"]
