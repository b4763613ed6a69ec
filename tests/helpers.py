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


def trained_a_little(plan):
    """The plan's model with non-zero LoRA B matrices, so every adapter term matters."""
    import torch

    from slmops.finetune_recipe import build_model

    model = build_model(plan)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model


def much_padding(plan):
    """The 3 shortest and 3 longest training examples: a batch worth packing."""
    from slmops.data.batching import collate

    lengths = plan.data.train.lengths
    by_length = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return collate(plan.data.train, by_length[:3] + by_length[-3:], plan.tokenizer.pad_token_id)


class _Thing:
    pass


def ctrl_c_inside_a_finalizer() -> None:
    """What SQLAlchemy's connection finalizers did to a search worker: SIGINT arrives while a
    weakref callback runs, so its KeyboardInterrupt goes to sys.unraisablehook ("Exception
    ignored in ...") and this returns as if nothing happened."""
    import signal
    import weakref

    thing = _Thing()
    ref = weakref.ref(thing, lambda _: signal.raise_signal(signal.SIGINT))  # noqa: F841 (lives until `thing` goes)
    del thing


def lose_a_ctrl_c_after_step(monkeypatch, at: int) -> list[int]:
    """From now on, every run's metrics log makes a Ctrl-C land in a finalizer (swallowed) right
    after it logs training step `at`, once. Returns the training steps logged, as they are (so
    log every step: --logging_steps 1)."""
    from slmops.train import monitor

    logged: list[int] = []
    log = monitor.MetricsLog.log

    def log_then_lose_a_ctrl_c(self, step, split, **values):
        log(self, step, split, **values)
        if split == "train":
            logged.append(step)
            if step == at and logged.count(at) == 1:
                ctrl_c_inside_a_finalizer()

    monkeypatch.setattr(monitor.MetricsLog, "log", log_then_lose_a_ctrl_c)
    return logged
