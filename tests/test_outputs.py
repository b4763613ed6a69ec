"""The output folder: one run at a time (an OS lock), --overwrite that never loses the old run
before the new one has a checkpoint, and run.yaml that replays from anywhere."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import yaml

from conftest import TONE, TONE_TEMPLATE
from helpers import tiny_config

from slmops.cli.main import main
from slmops.finetune_recipe import finetune
from slmops.outputs import LOCK_FILE, SET_ASIDE, OutputLayout, OutputLock, RunFolder


def _tree(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_a_second_run_is_refused_with_the_holder_named(tiny_llama, tmp_path, capsys):
    out = tmp_path / "o"
    args = ["-m", str(tiny_llama), "-d", str(TONE), "--text_template", TONE_TEMPLATE, "--max_steps", "400", "--save_steps", "50",
            "--bf16", "false", "--report_to", "none", "-o", str(out), "--log_level", "3"]
    first = subprocess.Popen([sys.executable, "-m", "slmops.cli.main", "finetune", *args], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (out / LOCK_FILE).is_file():
            time.sleep(0.05)
        assert (out / LOCK_FILE).is_file(), "the first run never took the lock"
        code = main(["finetune", *args, "--overwrite"])
        text = capsys.readouterr().err
        assert code == 1
        assert f"is in use by another slmops run (PID {first.pid}" in text and "started 20" in text
    finally:
        first.kill()
        first.wait()
    # the kernel released the killed run's lock: the folder can be resumed at once
    OutputLock.acquire(out).release()


def test_overwrite_keeps_the_old_run_until_the_new_one_has_a_checkpoint(tiny_llama, tmp_path, monkeypatch):
    out = tmp_path / "o"
    finetune(tiny_config(tiny_llama, out, max_steps=2))
    old = _tree(out)
    old_adapter = (out / "adapter" / "adapter_model.safetensors").read_bytes()

    # the new run fails before its first checkpoint: the old run is back, nothing of the new one stays
    import slmops.finetune_recipe as recipe

    def broken(plan):
        raise RuntimeError("model failed to load")

    monkeypatch.setattr(recipe, "build_model", broken)
    with pytest.raises(RuntimeError):
        finetune(tiny_config(tiny_llama, out, max_steps=3, overwrite=True))
    monkeypatch.undo()
    assert _tree(out) == old
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == old_adapter

    # the new run succeeds: only the new run is left
    result = finetune(tiny_config(tiny_llama, out, max_steps=3, overwrite=True))
    assert result.train.steps == 3
    assert not (out / SET_ASIDE).exists() and not (out / LOCK_FILE).exists()
    assert yaml.safe_load((out / "run.yaml").read_text())["result"]["steps"] == 3


def test_a_set_aside_left_by_a_killed_overwrite_is_put_back(tmp_path):
    layout = OutputLayout(tmp_path / "o")
    (layout.root / "adapter").mkdir(parents=True)
    (layout.root / "run.yaml").write_text("old: true\n")
    (layout.root / "adapter" / "w").write_text("old")
    with RunFolder(layout, True, lambda: False):
        (layout.root / "logs").mkdir()  # the new run got this far, then was SIGKILLed:
        os.replace(layout.root / SET_ASIDE, tmp_path / "aside")  # (simulate: keep the set-aside, skip its cleanup)
    os.replace(tmp_path / "aside", layout.root / SET_ASIDE)
    assert (layout.root / "logs").exists() and not (layout.root / "run.yaml").exists()
    with RunFolder(layout, False, lambda: False):  # the next start, whatever it is, restores the old run first
        pass
    assert (layout.root / "run.yaml").read_text() == "old: true\n" and (layout.root / "adapter" / "w").read_text() == "old"
    assert not (layout.root / "logs").exists() and not (layout.root / SET_ASIDE).exists()


def test_the_base_model_folder_is_never_written_through_the_outputs_model_folder(tiny_llama, tmp_path):
    """The output's model/ shares the base's weight files (hard links) but never its small files:
    the run saves its tokenizer there, and a write through a link would edit the base in place
    (once: the shared built-in model cache, read by a concurrent export, truncated)."""
    import json
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_llama, base)
    config_file = base / "tokenizer_config.json"  # as a Hub file is: not byte-for-byte what transformers writes
    config_file.write_text(json.dumps(json.loads(config_file.read_text()), separators=(",", ":")))
    before = {f.name: f.read_bytes() for f in base.iterdir()}

    out = tmp_path / "o"
    finetune(tiny_config(base, out, max_steps=2))
    assert {f.name: f.read_bytes() for f in base.iterdir()} == before
    model = out / "model"
    assert (model / "model.safetensors").read_bytes() == before["model.safetensors"]
    for name in before:
        if not name.endswith(".safetensors"):
            with open(model / name, "w") as handle:  # as a user's editor, or a later tool, would
                handle.write("edited in the output")
    assert {f.name: f.read_bytes() for f in base.iterdir()} == before


def test_a_failed_start_in_a_new_folder_leaves_no_folder(tiny_llama, tmp_path, monkeypatch):
    import slmops.finetune_recipe as recipe

    monkeypatch.setattr(recipe, "build_model", lambda plan: (_ for _ in ()).throw(RuntimeError("no")))
    with pytest.raises(RuntimeError):
        finetune(tiny_config(tiny_llama, tmp_path / "new" / "o", max_steps=2))
    assert not (tmp_path / "new" / "o").exists()


def test_run_yaml_replays_from_another_folder_without_overwrite(tiny_llama, tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    # relative paths on the command line, as users type them
    model = os.path.relpath(tiny_llama, work)
    data = os.path.relpath(TONE, work)
    assert main(["finetune", "-m", model, "-d", data, "--text_template", TONE_TEMPLATE, "--max_steps", "2", "--bf16", "false",
                 "--report_to", "none", "-o", "runs/a", "--overwrite", "--log_level", "3"]) == 0
    stored = yaml.safe_load((work / "runs" / "a" / "run.yaml").read_text())["config"]
    assert os.path.isabs(stored["model"]["model_name_or_path"]) and os.path.isabs(stored["data"]["data_name"])
    assert stored["overwrite"] is False
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["finetune", "--config", str(work / "runs" / "a" / "run.yaml"), "-o", "b", "--log_level", "3"]) == 0
    assert (elsewhere / "b" / "adapter" / "adapter_model.safetensors").is_file()
    # replaying into the first run's folder is refused: the replay does not carry --overwrite
    assert main(["finetune", "--config", str(work / "runs" / "a" / "run.yaml"), "--log_level", "3"]) == 1
    assert "already holds another slmops run" in capsys.readouterr().err


def test_max_seq_len_is_clamped_to_the_models_context(tiny_llama, tmp_path, caplog):
    from slmops.finetune_recipe import plan_finetune

    with caplog.at_level("WARNING", logger="slmops"):
        plan = plan_finetune(tiny_config(tiny_llama, tmp_path / "o", max_seq_len=100_000))
    assert plan.data_config.max_seq_len == 256 and plan.describe()["max_seq_len"] == 256
    assert "--max_seq_len 100000 is longer than the model's context (256 positions): using 256" in caplog.text


def test_skip_bad_rows_leaves_them_out_and_counts_them(tiny_llama, tmp_path):
    from slmops.finetune_recipe import plan_finetune

    data = tmp_path / "d.jsonl"
    data.write_text('{"phrase": "a", "tone": "joyful"}\n{"phrase": "b", "tone": null}\n{"phrase": "c"}\n{"phrase": "d", "tone": "sad"}\n')
    plan = plan_finetune(tiny_config(tiny_llama, tmp_path / "o", data_name=str(data), train_split="train", skip_bad_rows=True))
    assert len(plan.data.train) == 2
    assert plan.describe()["data"]["train"]["skipped_bad_rows"] == 2
