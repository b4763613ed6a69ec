"""`slmops evaluate`: accuracy, F1, perplexity, BLEU, ROUGE, latency, side by side."""

from __future__ import annotations

import argparse
import json

from slmops.cli.common import add_config_flags, config_from_args, setup_logging
from slmops.config import EvaluateConfig

EXAMPLE = """example:
  slmops evaluate -m models/tone/ft --compare_to base \\
    -d examples/data/tone.jsonl --eval_split "train[550:]" \\
    --text_template "{phrase}\\nTone: {tone}" --metrics accuracy,f1
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser("evaluate", help="measure models (and adapters) on an eval split, side by side",
                                   epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    add_config_flags(parser, EvaluateConfig, main_title="evaluate")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(EvaluateConfig, args, cli_only={"json"})
    setup_logging(config.log_level)
    from slmops.evaluate.run import evaluate, format_table

    report = evaluate(config)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"data: {report['data']['source']} ({report['data']['split']}, {report['data']['rows']} rows)")
        print(format_table(report))
    return 0
