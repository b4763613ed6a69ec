"""`slmops tune --config FILE`: hyper-parameter search (Optuna) over a finetune config or a
workflow; several processes on several machines can share one study through --storage."""

from __future__ import annotations

import argparse
import json
import sys

from slmops.cli.common import setup_logging

EXAMPLE = """examples:
  slmops tune --config examples/tune/tone-lora.yaml                      # the search file: space, strategy, objective, the run
  slmops tune --config examples/tune/tone-lora.yaml --dry_run            # the checked plan; nothing trains
  slmops tune --config search.yaml --storage postgresql://user:pw@db/slmops --study_name tone   # one worker of a shared study
  slmops finetune --config tune-output/best.yaml                          # the best trial, again
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser("tune", help="search hyper-parameters (learning rate, rank, batch size...) with pruning; "
                                   "workers on several machines share a study", epilog=EXAMPLE,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(parser)
    parser.set_defaults(handler=run)


def add_flags(parser, config_required: bool = True) -> None:
    if config_required:
        parser.add_argument("--config", required=True, help="the search file: search_strategy, search_space, objective, pruner, "
                            "and the run (a finetune config or a workflow, or config: FILE)")
    parser.add_argument("--output_path", "-o", default=None, help="folder for trials/, trials.csv, best.yaml, the report "
                        "[default: the file's output_path, else tune-output]")
    parser.add_argument("--storage", default=None, help="Optuna storage URL shared by workers (postgresql://user:pw@host/db) "
                        "[default: sqlite file OUTPUT/study.db]")
    parser.add_argument("--study_name", default=None, help="the study's name in the storage [default: the output folder's name]")
    parser.add_argument("--n_trials", type=int, default=None, help="trials to finish, over all workers (overrides num_trials)")
    parser.add_argument("--nproc_per_node", type=int, default=None, metavar="N",
                        help="train each trial in N processes on this machine (a torchrun launch per trial: DDP, gloo on CPU, "
                             "NCCL on GPUs) [default: the file's nproc_per_node, else 1]")
    parser.add_argument("--log_level", type=int, default=None, help="0 debug (every trial's own lines) ... 4 critical [default: 1]")
    parser.add_argument("--dry_run", "--dry-run", action="store_true", help="check the search file and print the plan; train nothing")


def run(args: argparse.Namespace) -> int:
    return run_search(args.config, args)


def run_search(config: str, args: argparse.Namespace) -> int:
    from slmops.tune import describe, load_search, tune

    overrides = {"output_path": args.output_path, "storage": getattr(args, "storage", None),
                 "study_name": getattr(args, "study_name", None), "n_trials": getattr(args, "n_trials", None),
                 "nproc_per_node": getattr(args, "nproc_per_node", None),
                 "log_level": args.log_level}
    setup_logging(args.log_level if args.log_level is not None else 1)
    plan = load_search(config, overrides)
    setup_logging(plan.config.log_level)
    if args.dry_run:
        print(json.dumps(describe(plan), indent=2))
        return 0
    try:
        result, paths = tune(plan)
    except KeyboardInterrupt:
        return 130
    best = result.best
    metric = plan.config.objective.metric
    if best is None:
        print(f"slmops: no trial completed ({result.counts.failed} failed); see {paths['trials']}", file=sys.stderr)
        return 1
    print(f"slmops: best trial {best.number}: {metric} {best.value:.6g} with "
          + ", ".join(f"{k}={v}" for k, v in best.params.items()), file=sys.stderr)
    print(f"slmops: {plan.target.command} {paths['best']} runs it again; report: {paths['report']}", file=sys.stderr)
    return 0
