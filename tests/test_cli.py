"""Bad input: a clear one-line error, before any model is loaded or training starts."""

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


def test_unknown_flag_suggests(capsys, tiny_llama, tmp_path):
    code, text = run_cli(capsys, *base_args(tiny_llama, tmp_path / "o"), "--max_step", "3", "--lora-rr", "2")
    assert code == 2
    assert "unknown flag --max_step. Did you mean '--max_steps'?" in text
    assert "unknown flag --lora-rr" in text
    assert not (tmp_path / "o").exists()


def test_misspelt_required_flag_is_named_as_misspelt(capsys, tmp_path):
    code, text = run_cli(capsys, "auto-opt", "--model_name_or_pth", "m", "-o", str(tmp_path / "o"))
    assert code == 2
    assert "unknown flag --model_name_or_pth. Did you mean '--model_name_or_path'?" in text
    code, text = run_cli(capsys, "auto-opt", "-o", str(tmp_path / "o"))
    assert code == 2 and "required: --model_name_or_path" in text


@pytest.mark.parametrize(
    "extra, message",
    [
        (["-d", "missing.jsonl"], "data file 'missing.jsonl' does not exist"),
        (["--text_template", "{phrase} {mood}"], "'mood' not in the data"),
        (["--train_split", "train[4096:4224]"], "out of range: split 'train' has 650 rows"),
        (["--eval_split", "train[10:10]"], "selects no rows"),
        (["--target_modules", "q_projj"], "'q_projj' not found"),
        (["--method", "lorra"], "unknown method 'lorra'. Did you mean 'lora'?"),
        (["--max_steps", "many"], "--max_steps: Input should be a valid integer"),
        (["-m", "smollm3-135m"], "not a built-in model"),
    ],
)
def test_bad_input_errors(capsys, tiny_llama, tmp_path, extra, message):
    code, text = run_cli(capsys, *base_args(tiny_llama, tmp_path / "o"), *extra)
    assert code != 0
    assert message in text, text
    assert text.count("slmops: error:") + text.count("error:") >= 1
    assert not (tmp_path / "o" / "checkpoints").exists()


def test_malformed_json_line(capsys, tiny_llama, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"phrase": "a", "tone": "b"}\n{"phrase": "c" "tone": "d"}\n')
    code, text = run_cli(capsys, *base_args(tiny_llama, tmp_path / "o"), "-d", str(bad))
    assert code != 0 and "line 2" in text


def test_corrupt_gguf(capsys, tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"NOPE" + b"\0" * 64)
    code, text = run_cli(capsys, "finetune", "-m", str(fake), "-d", str(TONE), "--text_template", TONE_TEMPLATE, "-o", str(tmp_path / "o"))
    assert code != 0 and "not a GGUF file" in text


def test_unwritable_output(capsys, tiny_llama, tmp_path):
    # /proc refuses new folders even to root, where a chmod-ed folder would not.
    code, text = run_cli(capsys, *base_args(tiny_llama, "/proc/slmops-test/o"))
    assert code != 0 and "cannot write to --output_path" in text


def test_output_path_is_a_file(capsys, tiny_llama, tmp_path):
    target = tmp_path / "file"
    target.write_text("keep me")
    code, text = run_cli(capsys, *base_args(tiny_llama, target))
    assert code != 0 and "is a file" in text
    assert target.read_text() == "keep me"


def test_output_holding_files_is_kept(capsys, tiny_llama, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, text = run_cli(capsys, *base_args(tiny_llama, out))
    assert code != 0 and "--overwrite" in text
    assert (out / "notes.txt").read_text() == "mine"


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
