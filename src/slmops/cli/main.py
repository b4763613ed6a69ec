"""Entry point: `slmops COMMAND ...`. Each command lives in its own module and registers
itself here; library errors become one-line messages and an exit code."""

from __future__ import annotations

import os
import sys

from slmops.cli import data, deploy, evaluate, finetune, generate, models, report, run, serve, tune
from slmops.cli.common import Parser, fail
from slmops.errors import SlmopsError
from slmops.interrupts import remembering_ctrl_c

COMMANDS = [finetune, evaluate, deploy, generate, serve, run, tune, report, models, data]


def build_parser() -> Parser:
    from slmops.about import __version__

    parser = Parser(prog="slmops", description="Fine-tune small language models and make them ready to deploy.")
    parser.add_argument("--version", action="version", version=f"slmops {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=Parser, metavar="COMMAND")
    for module in COMMANDS:
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]  # (finetune --nproc_per_node launches it again)
    try:
        with remembering_ctrl_c():
            return args.handler(args)
    except SlmopsError as exc:
        return fail(exc)
    except KeyboardInterrupt:
        print("slmops: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("slmops: error: out of memory; try a smaller --per_device_train_batch_size / --max_seq_len, or --method qlora",
              file=sys.stderr)
        return 1
    except OSError as exc:  # a file or device problem the library did not foresee: still one line
        if os.environ.get("SLMOPS_TRACEBACK"):
            raise
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        print(f"slmops: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
