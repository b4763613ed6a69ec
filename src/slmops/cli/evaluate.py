"""`slmops evaluate`: accuracy, F1, perplexity, BLEU, ROUGE, latency, side by side."""

from __future__ import annotations

import argparse
import json

from pydantic import ValidationError

from slmops.cli.common import add_schema_flags, setup_logging
from slmops.config import format_validation_error
from slmops.config.schema import DataConfig, EvaluateConfig, ModelConfig
from slmops.errors import ConfigError

EXAMPLE = """example:
  slmops evaluate -m models/tone/ft/model --adapter_path models/tone/ft/adapter --compare_to base \\
    -d examples/data/tone.jsonl --eval_split "train[550:]" \\
    --text_template "{phrase}\\nTone: {tone}" --metrics accuracy,f1
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser("evaluate", help="measure models (and adapters) on an eval split, side by side",
                                   epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_schema_flags(parser, ModelConfig, "model")
    add_schema_flags(parser, DataConfig, "data")
    add_schema_flags(parser, EvaluateConfig, "evaluate", skip={"model", "data"})
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.set_defaults(handler=run)


def build_config(args: argparse.Namespace) -> EvaluateConfig:
    values = {k: v for k, v in vars(args).items() if k not in {"handler", "command", "json"}}
    nested: dict = {"model": {}, "data": {}}
    for key, value in values.items():
        if key in ModelConfig.model_fields:
            nested["model"][key] = value
        elif key in DataConfig.model_fields:
            nested["data"][key] = value
        else:
            nested[key] = value
    try:
        return EvaluateConfig.model_validate(nested)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None


def run(args: argparse.Namespace) -> int:
    config = build_config(args)
    setup_logging(config.log_level)
    from slmops.evaluate.run import evaluate, format_table

    report = evaluate(config, quiet=config.log_level >= 3)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"data: {report['data']['source']} ({report['data']['split']}, {report['data']['rows']} rows)")
        print(format_table(report))
    return 0
