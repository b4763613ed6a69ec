"""Small helpers shared by tests."""

from __future__ import annotations

from pathlib import Path

from slmops.config import from_flat


def tiny_config(model: Path, out: Path, **overrides):
    """A fast finetune config on the tiny model and the shipped tone data."""
    from conftest import TONE, TONE_TEMPLATE

    values = {
        "model_name_or_path": str(model),
        "data_name": str(TONE),
        "train_split": "train[:64]",
        "text_template": TONE_TEMPLATE,
        "max_steps": 8,
        "per_device_train_batch_size": 8,
        "learning_rate": 1e-2,
        "logging_steps": 2,
        "report_to": "none",
        "output_path": str(out),
        "bf16": False,
        "max_seq_len": 64,
        # (the tone data is a classification task, which holds out a tenth by default: tests
        # that want validation say so)
        "eval_split": "none",
    }
    values.update({k: v for k, v in overrides.items()})
    return from_flat({k: v for k, v in values.items() if v is not None})


def plan_export(model, adapters, out, **options):
    """deploy.export.plan_export from the arguments the tests think in (an ExportConfig)."""
    from slmops.config import ExportConfig, from_dict
    from slmops.deploy.export import plan_export as _plan_export

    config = from_dict({"model_name_or_path": str(model), "adapter_path": [str(a) for a in adapters] if adapters else None,
                        "output_path": str(out), **options}, schema=ExportConfig)
    return _plan_export(config)


def run_cli(capsys, *args) -> tuple[int, str]:
    """`slmops ARGS` in this process: (exit code, stdout + stderr)."""
    from slmops.cli.main import main

    try:
        code = main(list(args))
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out + captured.err
