"""The command line itself: --help, --dry_run. (Bad inputs: tests/test_bad_inputs.py.)"""

import pytest

from slmops.cli.main import main
from slmops.models import load as model_load

from conftest import TONE, TONE_TEMPLATE


@pytest.fixture(autouse=True)
def no_model_loading(monkeypatch):
    """Every error in this file must surface before weights are loaded."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was reported")

    monkeypatch.setattr(model_load, "load_model", refuse)
    monkeypatch.setattr("slmops.finetune_recipe.load_model", refuse)


def run_cli(capsys, *args):
    try:
        code = main(list(args))
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def base_args(model, out):
    return ["finetune", "-m", str(model), "-d", str(TONE), "--text_template", TONE_TEMPLATE, "-o", str(out)]


def test_dry_run_prints_plan(capsys, tiny_llama, tmp_path):
    code, text = run_cli(capsys, *base_args(tiny_llama, tmp_path / "o"), "--dry_run", "--method", "dora")
    assert code == 0
    assert "method: dora" in text and '"target_modules"' in text and "q_proj" in text


def test_help_lists_olive_flags(capsys):
    code, text = run_cli(capsys, "finetune", "--help")
    assert code == 0
    for flag in ["--model_name_or_path", "--data_name", "--train_split", "--eval_split", "--text_template", "--method",
                 "--lora_r", "--max_steps", "--per_device_train_batch_size", "--gradient_checkpointing", "--report_to",
                 "--resume_from_checkpoint", "--early_stopping_patience", "--trust_remote_code", "--log_level", "--task_name"]:
        assert flag in text


def test_dry_run_creates_nothing(capsys, tiny_llama, tmp_path):
    out = tmp_path / "new" / "o"
    code, text = run_cli(capsys, *base_args(tiny_llama, out), "--dry_run")
    assert code == 0 and "# plan" in text
    assert not (tmp_path / "new").exists()
