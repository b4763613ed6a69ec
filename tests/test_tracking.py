"""--report_to: TensorBoard, Weights & Biases (offline) and MLflow (a local store) get the
run's hyper-parameters, metrics and artifacts; each is read back through its own format."""

from __future__ import annotations

import glob
import json
import struct

import pytest
from helpers import run_cli, tiny_config

from slmops.errors import ConfigError
from slmops.train.monitor import read_metrics
from slmops.config.finetune import parse_report_to
from slmops.train.tracking import Tracking, check_report_to


def test_report_to_takes_a_comma_list_all_and_none():
    assert parse_report_to("mlflow,tensorboard") == ["tensorboard", "mlflow"]
    assert parse_report_to(["wandb"]) == ["wandb"]
    assert parse_report_to("none") == [] and parse_report_to("") == []
    assert parse_report_to("all") == ["tensorboard", "wandb", "mlflow"]  # both are installed for the tests
    with pytest.raises(ValueError, match="unknown --report_to comet; choose from tensorboard, wandb, mlflow, all, none"):
        parse_report_to("tensorboard,comet")
    with pytest.raises(ValueError, match="cannot be combined"):
        parse_report_to("none,wandb")


def test_a_tracker_that_is_not_installed_is_refused_before_any_work(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"--report_to wandb needs the wandb package.*pip install 'slmops\[wandb\]'"):
        check_report_to(["tensorboard", "wandb"])
    check_report_to(["tensorboard", "mlflow"])


def test_unknown_report_to_is_a_clear_cli_error(tiny_llama, tmp_path, capsys):
    code, text = run_cli(capsys, "finetune", "-m", str(tiny_llama), "-d", "x.jsonl", "--report_to", "tensorbord", "-o", str(tmp_path / "o"))
    assert code == 2 and "unknown --report_to tensorbord" in text and "tensorboard, wandb, mlflow" in text
    assert not (tmp_path / "o").exists()


def test_a_failing_tracker_is_dropped_and_training_goes_on(caplog):
    import logging

    caplog.set_level(logging.WARNING, logger="slmops")  # (an earlier CLI test may have left it at ERROR)
    class Broken:
        name, where = "broken", "nowhere"

        def log(self, step, scalars):
            raise ConnectionError("server went away")

    class Kept:
        name, where, seen = "kept", "here", []

        def log(self, step, scalars):
            self.seen.append((step, scalars))

        def finish(self, summary, artifacts, failed):
            self.seen.append(("finish", failed))

    kept = Kept()
    tracking = Tracking([Broken(), kept])
    tracking.log(1, "train", {"loss": 2.0, "note": "text is not a metric"})
    tracking.log(2, "train", {"loss": 1.5})
    tracking.finish({"steps": 2}, {})
    assert kept.seen == [(1, {"train/loss": 2.0}), (2, {"train/loss": 1.5}), ("finish", False)]
    assert "broken: log failed (ConnectionError: server went away); no more metrics go there" in caplog.text


def _wandb_records(path):
    """The records of an offline W&B run file (LevelDB-style log of protobuf records, 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2

    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    position, block, pending = 7, 32768, b""
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if length == 0 and kind == 0:  # block padding
            position += left
            continue
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a whole record, or the last part of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def test_one_run_reports_to_tensorboard_wandb_and_mlflow(tiny_llama, tmp_path, monkeypatch):
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from slmops import finetune

    for var in ("WANDB_MODE", "WANDB_API_KEY", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))  # no W&B key on this machine: offline
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))
    out = tmp_path / "run"
    finetune(tiny_config(tiny_llama, out, max_steps=6, eval_split="train[64:80]", eval_steps=3, lora_r=4,
                         report_to="tensorboard,wandb,mlflow"))
    records = read_metrics(out / "logs" / "metrics.jsonl")
    train = {r["step"]: r for r in records if r["split"] == "train"}
    evals = {r["step"]: r["loss"] for r in records if r["split"] == "eval"}
    assert sorted(train) == [2, 4, 6] and sorted(evals) == [3, 6]
    for r in train.values():  # what the machine did, beside the loss
        assert r["grad_norm"] > 0 and r["memory_mb"] > 50 and r["peak_memory_mb"] >= r["memory_mb"] and r["cpu_cores_busy"] > 0

    # TensorBoard: the scalars and the hyper-parameters, in the run's own event file
    board = EventAccumulator(str(out / "logs"))
    board.Reload()
    assert {e.step: e.value for e in board.Scalars("train/loss")} == pytest.approx({s: r["loss"] for s, r in train.items()})
    assert {e.step: e.value for e in board.Scalars("eval/loss")} == pytest.approx(evals)
    for tag in ("train/learning_rate", "train/grad_norm", "train/memory_mb", "train/tokens_per_second"):
        assert len(board.Scalars(tag)) == 3, tag
    from tensorboard.plugins.hparams import plugin_data_pb2

    hparams = board.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(hparams["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["method.lora_r"].number_value == 4 and start.hparams["resolved.method"].string_value == "lora"

    # W&B, offline: config, every logged value, the adapter and report as artifacts
    [run_file] = glob.glob(str(out / "logs" / "wandb" / "offline-run-*" / "run-*.wandb"))
    history, config, artifacts = {}, {}, set()
    for record in _wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            history.setdefault(items["_step"], {}).update(items)
        elif kind == "run":
            config.update({u.key: json.loads(u.value_json) for u in record.run.config.update})
        elif kind == "artifact":
            artifacts.add(record.artifact.name)
    assert {s: h["train/loss"] for s, h in history.items() if "train/loss" in h} == pytest.approx({s: r["loss"] for s, r in train.items()})
    assert {s: h["eval/loss"] for s, h in history.items() if "eval/loss" in h} == pytest.approx(evals)
    assert config["method.lora_r"] == 4 and config["training.max_steps"] == 6
    assert {"run-adapter", "run-report"} <= artifacts

    # MLflow, a SQLite store in the logs folder: params, metric history, artifacts, status
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'logs' / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("slmops").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["method.lora_r"] == "4" and run.data.params["resolved.task"] == "classification"
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/loss")}
    assert history == pytest.approx({s: r["loss"] for s, r in train.items()})
    assert {m.step: m.value for m in client.get_metric_history(run.info.run_id, "eval/loss")} == pytest.approx(evals)
    assert run.data.metrics["result/steps"] == 6
    assert {"report.md", "report.html", "run.yaml", "adapter/adapter_model.safetensors", "adapter/adapter_config.json"} <= (
        {a.path for a in client.list_artifacts(run.info.run_id)} | {a.path for a in client.list_artifacts(run.info.run_id, "adapter")})

    # the run's own report: each evaluation, what was chosen, the configuration, the versions
    report = (out / "report.md").read_text()
    for step, loss in evals.items():
        assert f"| {step} | {loss:.4f} |" in report
    assert "| learning rate | 0.01 |" in report and "| task | classification: " in report and "torch " in report
    # three eval prompts answered by the saved adapter and by the base under it: a classifier's
    # answer is its most likely label (as evaluation scores it)
    from slmops.evaluate.choices import predict_labels, score_labels
    from slmops.finetune_recipe import plan_finetune
    from slmops.inference import open_backend

    answers = report.split("## Sample answers (eval prompts, most likely label)")[1].split("##")[0].strip().splitlines()
    assert answers[0] == "| prompt (end) | expected | tuned | base |" and len(answers) == 5
    data = plan_finetune(tiny_config(tiny_llama, tmp_path / "again", eval_split="train[64:80]")).data
    example = data.eval_examples[0]  # the first row of the table
    assert example.prompt == "Phrase: Thinking of our garden just makes me want to stay in bed.\nTone:"
    backend = open_backend(str(out))
    tuned, base = (predict_labels(score_labels(backend, [example], data.labels, a, data.formatter.add_special_tokens), data.labels)[0]
                   for a in (None, "base"))
    assert answers[2] == f"| Phrase: Thinking of our garden just makes me want to stay in bed. Tone: | sad | {tuned} | {base} |"
    page = (out / "report.html").read_text()
    assert "Configuration (run.yaml)" in page and "lora_r: 4" in page and page.count("data:image/png;base64,") == 2


def test_report_compares_runs_on_one_page(tiny_llama, tmp_path, capsys):
    from slmops import finetune

    for name, rate in (("slow", 1e-3), ("fast", 1e-2)):
        finetune(tiny_config(tiny_llama, tmp_path / name, max_steps=4, eval_split="train[64:80]", eval_steps=2, learning_rate=rate))
    page = tmp_path / "cmp.html"
    code, text = run_cli(capsys, "report", str(tmp_path / "slow"), str(tmp_path / "fast"), "-o", str(page))
    assert code == 0, text
    assert "run   status    steps" in text and "training.learning_rate  0.001  0.01" in text
    html = page.read_text()
    assert html.count("data:image/png;base64,") == 1 and "<td>training.learning_rate</td><td>0.001</td><td>0.01</td>" in html
    assert "output_path" not in html.split("Settings that differ")[1]
    # refused, with the fix named: a folder that is not a run; a page that exists
    code, text = run_cli(capsys, "report", str(tmp_path / "slow"), str(tmp_path))
    assert code == 2 and f"{tmp_path} is not a slmops finetune output folder (no run.yaml in it)" in text
    code, text = run_cli(capsys, "report", str(tmp_path / "slow"), "-o", str(page))
    assert code == 1 and "exists; give another --output_path or add --overwrite" in text
    assert run_cli(capsys, "report", str(tmp_path / "slow"), "-o", str(page), "--overwrite")[0] == 0
