"""Resolve model sources (built-in, local folder, GGUF, earlier slmops output, Hub id),
inspect them without loading, and load them with a dtype policy."""

from slmops.models.builtin import BUILTIN_MODELS, DEFAULT_MODEL, fetch_builtin
from slmops.models.load import ModelStructure, inspect_model, load_model, load_tokenizer
from slmops.models.precision import Precision, choose_precision
from slmops.models.resolve import ModelSource, resolve_model

__all__ = [
    "BUILTIN_MODELS",
    "DEFAULT_MODEL",
    "ModelSource",
    "ModelStructure",
    "Precision",
    "choose_precision",
    "fetch_builtin",
    "inspect_model",
    "load_model",
    "load_tokenizer",
    "resolve_model",
]
