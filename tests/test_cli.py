"""The command line itself: --help, --dry_run. (Bad inputs: tests/test_bad_inputs.py.)"""

import pytest

from slmops.models import load as model_load

from helpers import run_cli
from conftest import TONE, TONE_TEMPLATE


@pytest.fixture(autouse=True)
def no_model_loading(monkeypatch):
    """Every error in this file must surface before weights are loaded."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was reported")

    monkeypatch.setattr(model_load, "load_model", refuse)
    monkeypatch.setattr("slmops.finetune_recipe.load_model", refuse)



def base_args(model, out):
    return ["finetune", "-m", str(model), "-d", str(TONE), "--text_template", TONE_TEMPLATE, "-o", str(out)]


def test_dry_run_prints_plan(capsys, tiny_llama, tmp_path):
    code, text = run_cli(capsys, *base_args(tiny_llama, tmp_path / "o"), "--dry_run", "--method", "dora")
    assert code == 0
    # (the tone data is a classification task: its defaults, all-linear among them, are said and planned)
    assert "method: dora" in text and '"target_modules": "all-linear"' in text and "classification defaults" in text


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


def test_dry_run_on_a_used_output_folder_shows_the_plan_and_says_what_the_run_would_hit(capsys, tiny_llama, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "run.yaml").write_text("status: finished\n")
    code, text = run_cli(capsys, *base_args(tiny_llama, out), "--dry_run")
    assert code == 0 and "# plan" in text, text
    assert "slmops: warning: the run would stop here: --output_path" in text and "already holds another slmops run" in text
    assert sorted(p.name for p in out.iterdir()) == ["run.yaml"]
    code, text = run_cli(capsys, *base_args(tiny_llama, out))  # the run itself is still refused
    assert code != 0 and "already holds another slmops run" in text


COMMANDS = ["finetune", "evaluate", "optimize", "auto-opt", "export", "generate-adapter", "convert-adapters", "generate", "chat"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_lists_each_flag_once_and_takes_a_config_file(capsys, command):
    """Every command is built from its typed config: each flag listed once in --help (the
    dashed spelling works but is not listed), and --config FILE."""
    import re

    code, text = run_cli(capsys, command, "--help")
    assert code == 0
    options = []
    for line in re.findall(r"^  (-[^\n]*?)(?:\s{2,}|$)", text, flags=re.M):  # option lines; descriptions are indented further
        options += [part.split()[0] for part in line.split(", ")]
    assert len(options) == len(set(options)), sorted(o for o in options if options.count(o) > 1)
    assert "--config" in options
    assert not [o for o in options if "-" in o[2:] and o not in ("--dry-run",)], "a dashed alias is listed"


def test_dashed_spelling_still_works(tiny_llama, tmp_path, capsys):
    code, text = run_cli(capsys, "finetune", "-m", str(tiny_llama), "-d", str(TONE), "--text-template", TONE_TEMPLATE,
                         "--max-steps", "3", "-o", str(tmp_path / "o"), "--dry_run")
    assert code == 0 and "max_steps: 3" in text


def test_every_command_reads_its_options_from_yaml(tmp_path, capsys):
    """Flags override the file; the file's unknown keys are named with a suggestion."""
    from slmops.cli.common import config_from_args
    from slmops.cli.main import build_parser
    from slmops.config import EvaluateConfig, ExportConfig, GenerateConfig

    parser = build_parser()
    export = tmp_path / "export.yaml"
    export.write_text("model_name_or_path: some/model\noutput_path: out\nprecision: int4\nact_precision: fp32\n")
    config = config_from_args(ExportConfig, parser.parse_args(["optimize", "--config", str(export), "--block_size", "64"]),
                              cli_only={"dry_run"})
    assert (config.precision, config.block_size, config.resolved_accuracy_level) == ("int4", 64, 1)
    evaluate = tmp_path / "evaluate.yaml"
    evaluate.write_text("model: {model_name_or_path: m}\ndata: {data_name: d.jsonl, eval_split: 'train[:8]'}\nmetrics: [accuracy]\n")
    config = config_from_args(EvaluateConfig, parser.parse_args(["evaluate", "--config", str(evaluate)]), cli_only={"json"})
    assert config.data.eval_split == "train[:8]" and config.metrics == ["accuracy"]
    generate = tmp_path / "generate.yaml"
    generate.write_text("model_name_or_path: m\nprompt: [hello]\ntemprature: 0.5\n")
    with pytest.raises(Exception, match="unknown key 'temprature'. Did you mean 'temperature'"):
        config_from_args(GenerateConfig, parser.parse_args(["generate", "--config", str(generate)]))


def test_a_long_phase_says_its_expected_time_from_the_last_run_here(tmp_path, monkeypatch, caplog):
    import json
    import logging

    from slmops.logs import phase

    monkeypatch.setenv("SLMOPS_CACHE", str(tmp_path))
    caplog.set_level(logging.INFO, logger="slmops")
    with phase("building the graph", "build", size=100):
        pass
    assert "building the graph ...\n" in caplog.text + "\n" and "building the graph: done in" in caplog.text
    json.loads((tmp_path / "phase_seconds.json").read_text())["build@2^7"]  # seconds per unit at ~100 units, kept for next time
    (tmp_path / "phase_seconds.json").write_text(json.dumps({"build@2^7": 0.5}))
    caplog.clear()
    with phase("building the graph", "build", size=120):
        pass
    assert "building the graph ... (about 60 s, from the last time on this machine)" in caplog.text
    caplog.clear()  # a rate measured on a small size (fixed costs over few units) does not price a large one
    with phase("building the graph", "build", size=2000):
        pass
    assert "building the graph ...\n" in caplog.text + "\n"
    (tmp_path / "phase_seconds.json").write_text("not json")  # a damaged cache costs the estimate, nothing else
    with phase("building the graph", "build", size=100):
        pass
    assert json.loads((tmp_path / "phase_seconds.json").read_text())["build@2^7"] >= 0
