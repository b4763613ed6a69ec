"""`slmops finetune`: flags as `olive finetune` and TrainingArguments name them."""

from __future__ import annotations

import argparse
import json
import sys

from slmops.cli.common import add_config_flags, setup_logging
from slmops.config import FinetuneConfig, from_flat, load_yaml, to_yaml

EXAMPLE = """example:
  slmops finetune -m smollm2-135m-instruct -d examples/data/tone.jsonl \\
    --train_split "train[:500]" --eval_split "train[500:]" \\
    --text_template "{phrase}\\nTone: {tone}" --method lora --max_steps 100 -o models/tone/ft
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "finetune",
        help="fine-tune a model with LoRA, QLoRA, DoRA, LoHa, LoKr or in full",
        description="Fine-tune a small language model. Flags follow `olive finetune` and Hugging Face TrainingArguments.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--dry_run", "--dry-run", action="store_true", help="validate, print the resolved config and plan, and stop")
    parser.add_argument("--save_config", default=None, metavar="FILE",
                        help="write this command as a workflow file (`slmops run --config FILE` reproduces the run), then run it "
                             "(with --dry_run: write it and stop)")
    parser.add_argument("--nproc_per_node", type=int, default=None, metavar="N",
                        help="train in N processes on this machine: slmops re-launches itself under torchrun (gloo on CPU, NCCL "
                             "on GPU); the global batch is per_device_train_batch_size x N x gradient_accumulation_steps. "
                             "Several machines: torchrun or accelerate launch (docs/distributed.md)")
    add_config_flags(parser, FinetuneConfig, main_title="run")
    parser.set_defaults(handler=run)


def build_config(args: argparse.Namespace) -> FinetuneConfig:
    values = {k: v for k, v in vars(args).items() if k not in {"config", "dry_run", "save_config", "handler", "command", "nproc_per_node", "argv"}}
    base = load_yaml(args.config) if args.config else None
    if base is not None and {"config", "resolved"} <= set(base):  # an OUT/run.yaml: replay its config
        base = dict(base["config"])
        # a replay is a new run: never inherit permission to delete a folder, or a resume
        base.pop("overwrite", None)
        if isinstance(base.get("training"), dict):
            base["training"] = {k: v for k, v in base["training"].items() if k not in ("resume_from_checkpoint", "ignore_mismatch")}
    return from_flat(values, base, schema=FinetuneConfig, source=args.config or "config")


def run(args: argparse.Namespace) -> int:
    config = build_config(args)
    setup_logging(config.log_level)
    from slmops.train import distributed

    if args.nproc_per_node is not None and args.nproc_per_node > 1 and not args.dry_run:
        if distributed.launched():
            from slmops.errors import ConfigError

            raise ConfigError("--nproc_per_node: this process is already one of a torchrun launch; give the number to torchrun only")
        return relaunch(args.nproc_per_node, getattr(args, "argv", None) or sys.argv[1:])
    try:
        return _run(args, config)
    finally:
        distributed.shutdown()


def relaunch(nproc: int, argv: list[str]) -> int:
    """This command again, in `nproc` processes under torchrun on this machine."""
    import os
    import shlex
    import subprocess

    rest, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc_per_node":
            skip = True
        elif not arg.startswith("--nproc_per_node="):
            rest.append(arg)
    from slmops.train.distributed import threads_per_process

    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads_per_process(nproc)))}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), "-m", "slmops.cli.main", *rest]
    print(f"slmops: torchrun --standalone --nproc_per_node {nproc} -m slmops.cli.main {shlex.join(rest)}", file=sys.stderr)
    return subprocess.run(command, env=env).returncode


def _run(args: argparse.Namespace, config: FinetuneConfig) -> int:
    from slmops.finetune_recipe import plan_finetune, run_plan
    from slmops.train import distributed

    plan = plan_finetune(config, dry_run=args.dry_run)
    if args.save_config:
        from pathlib import Path

        import yaml

        from slmops.workflow.convert import workflow_of

        Path(args.save_config).write_text("# slmops run --config " + args.save_config + "\n"
                                          + yaml.safe_dump(workflow_of(config), sort_keys=False))
        print(f"slmops: wrote {args.save_config} (slmops run --config {args.save_config} reproduces this run)", file=sys.stderr)
    if args.dry_run:
        print(to_yaml(config))
        print("# plan")
        print(json.dumps(plan.describe(), indent=2, default=str))
        if plan.output_note:
            print(f"slmops: warning: the run would stop here: {plan.output_note}", file=sys.stderr)
        return 0
    result = run_plan(plan)
    if not distributed.world().is_main:
        return 0
    train = result.train
    print(
        f"slmops: finished {train.steps} steps in {train.train_seconds:.0f} s ({train.tokens_per_second:.0f} tokens/s); "
        f"final train loss {train.final_train_loss:.4f}"
        + (f", best eval {plan.config.training.metric_for_best_model} {train.best_eval_loss:.4f} at step {train.best_step}"
           if train.best_eval_loss is not None else ""),
        file=sys.stderr,
    )
    print(f"slmops: outputs in {result.output_path}: model/, {'adapter/, ' if result.adapter_path else ''}checkpoints/, logs/, run.yaml; "
          f"report: {result.output_path / 'report.html'} (curves: {result.output_path / 'loss.png'})", file=sys.stderr)
    return 0
