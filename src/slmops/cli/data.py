"""`slmops data preview`: one example as the model sees it, with its loss mask."""

from __future__ import annotations

import argparse

from slmops.cli.common import add_schema_flags
from slmops.config import DataConfig, ModelConfig


def register(subparsers) -> None:
    parser = subparsers.add_parser("data", help="inspect how a dataset is formatted and tokenized")
    sub = parser.add_subparsers(dest="data_command", required=True)
    preview = sub.add_parser(
        "preview",
        help="show examples tokenized, with the tokens that carry loss",
        epilog='example:\n  slmops data preview -d examples/data/tone.jsonl --text_template "{phrase}\\nTone: {tone}"',
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_schema_flags(preview, ModelConfig, "model", skip={"torch_dtype"})
    add_schema_flags(preview, DataConfig, "data")
    preview.add_argument("--index", type=int, default=0, help="which row of the split to show [default: 0]")
    preview.add_argument("--count", type=int, default=1, help="how many rows to show [default: 1]")
    preview.set_defaults(handler=run_preview)


def run_preview(args) -> int:
    from slmops.config import from_flat
    from slmops.data.format import build_formatter
    from slmops.data.load import load_split
    from slmops.data.prepare import preview
    from slmops.errors import DataError
    from slmops.models import load_tokenizer, resolve_model

    values = {k: v for k, v in vars(args).items() if k not in {"handler", "command", "data_command", "index", "count", "argv"}}
    config = from_flat(values)
    source = resolve_model(config.model.model_name_or_path)
    tokenizer = load_tokenizer(source.path, config.model.trust_remote_code)
    split = load_split(config.data.data_name, config.data.train_split, config.data.data_files, config.data.train_subset)
    formatter = build_formatter(config.data, list(split.dataset.column_names), tokenizer)
    print(f"format: {formatter.description}")
    if not 0 <= args.index < len(split.dataset):
        raise DataError(f"--index {args.index} is out of range: the split has {len(split.dataset)} rows")
    for row in range(args.index, min(args.index + args.count, len(split.dataset))):
        example = formatter(split.dataset[row])
        print(f"\n=== row {row} ===")
        print(preview(example, tokenizer, formatter, config.data.max_seq_len))
    return 0
