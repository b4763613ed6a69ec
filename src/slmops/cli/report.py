"""`slmops report RUN [RUN ...]`: finetune runs compared on one HTML page."""

from __future__ import annotations

import sys


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "report", help="compare finetune runs: curves overlaid, results side by side, the settings that differ",
        description="Compare finetune output folders on one self-contained HTML page (each run's own report is "
        "OUTPUT/report.html).")
    parser.add_argument("runs", nargs="+", metavar="RUN", help="finetune output folders (each holds run.yaml)")
    parser.add_argument("-o", "--output_path", default="slmops-report.html", help="the page to write [default: slmops-report.html]")
    parser.add_argument("--overwrite", action="store_true", help="replace the page if it exists")
    parser.set_defaults(handler=run_report)


def run_report(args) -> int:
    from slmops.compare import compare_runs

    page, table = compare_runs(args.runs, args.output_path, args.overwrite)
    print(table)
    print(f"slmops: wrote {page}", file=sys.stderr)
    return 0
