"""`slmops serve`: the OpenAI API on one base model and its adapters."""

from __future__ import annotations

import argparse

from slmops.cli.common import add_config_flags, config_from_args, setup_logging
from slmops.config import ServeConfig

EXAMPLE = """examples:
  slmops serve -m demo_out/onnx-int4                       # every adapter of the bundle, on 127.0.0.1:8000
  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{"model": "tone", "messages": [{"role": "user", "content": "Phrase: what a day\\nTone:"}], "max_tokens": 8}'
  slmops serve -m models/multi --adapter tone,qa --api_key secret --adapter_dir models/adapters --port 8080
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser("serve", help="an OpenAI-compatible server: one base model, every adapter a model id",
                                   epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_flags(parser, ServeConfig, main_title="serve")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(ServeConfig, args)
    setup_logging(config.log_level)
    from slmops.serve import serve

    serve(config)
    return 0
