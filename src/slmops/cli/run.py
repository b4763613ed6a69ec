"""`slmops run --config FILE`: a workflow of passes, from slmops' own file or Olive's."""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys

import yaml

from slmops.cli.common import setup_logging
from slmops.logs import log

EXAMPLE = """examples:
  slmops run --config examples/workflows/tone-int4.yaml              # fine-tune, evaluate, export int4, evaluate the bundle
  slmops run --config examples/workflows/olive-lora.yaml --setup     # Olive's file shape; install what it needs, then run
  slmops run --config x.yaml --dry_run                               # the translation and the plan, nothing loaded
"""
# import name -> pip requirement, for what --setup installs
PIP_NAMES = {"onnxruntime_genai": "onnxruntime-genai", "onnx_ir": "onnx-ir", "bitsandbytes": "bitsandbytes", "peft": "peft",
             "onnx": "onnx", "optuna": "optuna"}


def register(subparsers) -> None:
    parser = subparsers.add_parser("run", help="run a workflow file: fine-tune, merge, export, quantize, evaluate (Olive's files too)",
                                   epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", "--run-config", dest="config", required=True, help="the workflow file (YAML or JSON)")
    parser.add_argument("--output_path", "-o", default=None, help="the workflow's output folder (overrides its output_dir)")
    parser.add_argument("--setup", action="store_true", help="check what the workflow needs (packages, the model, the data), "
                        "install missing packages, then run it")
    parser.add_argument("--setup_only", action="store_true", help="as --setup, and stop before running")
    parser.add_argument("--dry_run", "--dry-run", action="store_true", help="print the translated workflow and the plan; load nothing")
    parser.add_argument("--no_cache", action="store_true", help="run every pass even where an earlier run's output still fits")
    parser.add_argument("--log_level", type=int, default=None, help="0 debug ... 4 critical [default: the workflow's, else 1]")
    search = parser.add_argument_group("a search file (with search_strategy) runs as `slmops tune`")
    search.add_argument("--storage", default=None, help="Optuna storage URL shared by workers [default: OUTPUT/study.db]")
    search.add_argument("--study_name", default=None, help="the study's name in the storage")
    search.add_argument("--n_trials", type=int, default=None, help="trials to finish, over all workers")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from slmops.workflow import load_workflow, plan_workflow, run_workflow
    from slmops.workflow.run import replayable

    if _is_search_file(args.config):
        from slmops.cli.tune import run_search

        return run_search(args.config, args)
    for flag in ("storage", "study_name", "n_trials"):
        if getattr(args, flag) is not None:
            from slmops.errors import ConfigError

            raise ConfigError(f"--{flag} is for a search; {args.config} has no search_strategy")
    config, olive = load_workflow(args.config)
    if args.log_level is not None:
        config = config.model_copy(update={"log_level": args.log_level})
    setup_logging(config.log_level)
    plan = plan_workflow(config, args.config, olive, args.output_path)
    if args.dry_run:
        if olive:
            print(f"# {args.config}, an Olive workflow, as slmops reads it")
        print(yaml.safe_dump(replayable(plan.config), sort_keys=False))
        print("# plan")
        print(json.dumps(plan.describe(), indent=2))
        return 0
    if args.setup or args.setup_only:
        setup(plan)
        if args.setup_only:
            return 0
    result = run_workflow(plan, no_cache=args.no_cache)
    ran = sum(r.status == "ran" for r in result.passes)
    print(f"slmops: workflow done in {result.output_dir}: {ran} pass(es) ran, {len(result.passes) - ran} reused; "
          "workflow.yaml, results.json, report.md", file=sys.stderr)
    for name, report in result.results.items():
        from slmops.evaluate.run import format_table

        print(f"\n{name}: {report['data']['source']} ({report['data']['split']}, {report['data']['rows']} rows)")
        print(format_table(report))
    return 0


def _is_search_file(path: str) -> bool:
    from pathlib import Path

    from slmops.config import load_yaml
    from slmops.tune.load import is_search

    if Path(path).suffix.lower() == ".json":
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError):
            return False  # the workflow loader names the problem
        return isinstance(data, dict) and is_search(data)
    return is_search(load_yaml(path))


def setup(plan) -> None:
    """What the workflow needs, checked and (packages) installed: the passes' modules, the
    input model (a built-in is fetched), the data of every data config."""
    from slmops.data.load import load_split
    from slmops.errors import ConfigError
    from slmops.models import resolve_model

    modules = sorted({m for p in plan.passes for m in p.kind.needs})
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        packages = [PIP_NAMES.get(m, m) for m in missing]
        command = [sys.executable, "-m", "pip", "install", *packages]
        log.info("installing %s for this workflow's passes", ", ".join(packages))
        if subprocess.run(command).returncode != 0:
            raise ConfigError(f"could not install {', '.join(packages)}; run: {' '.join(command)}")
    log.info("setup: packages present (%s)", ", ".join(modules) or "none needed")
    source = resolve_model(plan.config.input_model.model_name_or_path)
    log.info("setup: input model %s (%s)", source.given, source.kind)
    for name, data in plan.config.data_configs.items():
        split = load_split(data.data_name, data.train_split, data.data_files, data.train_subset)
        log.info("setup: data config %s: %s, %d rows", name, split.source, len(split.dataset))
