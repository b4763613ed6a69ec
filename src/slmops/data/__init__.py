"""Data: load splits, format rows into text with loss spans, tokenize, batch."""

from slmops.data.batching import collate, epoch_batches
from slmops.data.format import FormattedExample, Formatter, build_formatter
from slmops.data.load import LoadedSplit, load_split, parse_split
from slmops.data.prepare import PreparedData, prepare_data
from slmops.data.tokenize import IGNORE, TokenizedData, tokenize_examples

__all__ = [
    "IGNORE",
    "FormattedExample",
    "Formatter",
    "LoadedSplit",
    "PreparedData",
    "TokenizedData",
    "build_formatter",
    "collate",
    "epoch_batches",
    "load_split",
    "parse_split",
    "prepare_data",
    "tokenize_examples",
]
