"""`slmops tune`: a search file read as the seed writes it (and Olive's spelling), every bad
dimension named before anything trains, a search that prunes and whose best.yaml runs again to
the same metric, several workers on one study (SQLite, and a real PostgreSQL the test starts),
and a study that resumes after SIGKILL or Ctrl-C with the killed trial retried, not lost."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from helpers import run_cli, tiny_config
from conftest import TONE
from postgres_server import postgres_server, why_unavailable

SUITE_SECONDS = 175  # about, on one test worker (conftest: the longest files start first)


SEED_SPACE = {  # the seed's search file, as written
    "learning_rate": {"type": "float", "low": 1e-6, "high": 1e-3, "log": True},
    "lora_r": {"type": "int", "low": 8, "high": 64},
    "batch_size": {"type": "choice", "values": [8, 16, 32]},
}
TINY_SPACE = {
    "learning_rate": {"type": "float", "low": 1e-6, "high": 1e-2, "log": True},
    "lora_r": {"type": "int", "low": 2, "high": 16},
    "batch_size": {"type": "choice", "values": [4, 8]},
}


def search_file(path: Path, model: Path, out: Path, trials: int = 6, max_steps: int = 8, eval_steps: int = 2, **search) -> Path:
    data = {
        "search_strategy": {"type": "random", "num_trials": trials},
        "search_space": TINY_SPACE,
        "pruner": {"type": "median", "n_startup_trials": 2},
        **search,
        "model_name_or_path": str(model),
        "data_name": str(TONE),
        "train_split": "train[:64]",
        "eval_split": "train[64:96]",
        "text_template": "Phrase: {phrase}\nTone: {tone}",
        "max_steps": max_steps,
        "eval_steps": eval_steps,
        "report_to": "none",
        "bf16": False,
        "max_seq_len": 64,
        "output_path": str(out),
    }
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path



def worker(*args: str, log: Path) -> subprocess.Popen:
    """One `slmops tune` process, as a user starts it on a machine."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two workers share this machine's cores
    return subprocess.Popen([sys.executable, "-m", "slmops.cli.main", "tune", *args, "--log_level", "2"],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)


def trials_of(out: Path, name: str | None = None, storage: str | None = None):
    import optuna

    from slmops.tune.study import engine_url

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    url = storage or f"sqlite:///{out / 'study.db'}"
    return optuna.load_study(study_name=name or out.name, storage=engine_url(url)).get_trials(deepcopy=False)


def states(trials) -> list[str]:
    return [t.state.name for t in trials]


def table(out: Path) -> list[dict]:
    with (out / "trials.csv").open() as f:
        return list(csv.DictReader(f))


# ---- the file ------------------------------------------------------------------------------------------
BAD_SPACES = [
    ("unknown type", {"learning_rate": {"type": "uniform", "low": 1e-5, "high": 1e-3}}, "search_space.learning_rate.type"),
    ("low > high", {"learning_rate": {"type": "float", "low": 1e-3, "high": 1e-5}}, "search_space.learning_rate: low 0.001 is above high 1e-05"),
    ("log with low 0", {"learning_rate": {"type": "float", "low": 0, "high": 1e-3, "log": True}}, "search_space.learning_rate: log: true needs low > 0"),
    ("unknown parameter", {"lora_rank": {"type": "int", "low": 8, "high": 64}}, "search_space.lora_rank: not a `slmops finetune` flag. Did you mean 'lora_r'"),
    ("empty choice", {"batch_size": {"type": "choice", "values": []}}, "search_space.batch_size: a choice needs a non-empty 'values' list"),
    ("value the flag refuses", {"lora_r": {"type": "int", "low": 0, "high": 8}}, "search_space.lora_r: 0 is not accepted"),
    ("unknown key", {"lora_r": {"type": "int", "low": 2, "high": 8, "lg": True}}, "unknown key 'search_space.lora_r.lg'. Did you mean 'log'"),
    ("int with a fraction", {"lora_r": {"type": "int", "low": 2.5, "high": 8}}, "search_space.lora_r: an int dimension needs whole low and high"),
    ("set per trial", {"output_path": {"type": "choice", "values": ["a", "b"]}}, "search_space.output_path: set by the search for each trial"),
]


@pytest.mark.parametrize("name,space,message", BAD_SPACES, ids=[c[0] for c in BAD_SPACES])
def test_a_bad_search_space_is_one_line_naming_the_key_before_any_training(name, space, message, tiny_llama, tmp_path, capsys):
    file = search_file(tmp_path / "s.yaml", tiny_llama, tmp_path / "out", search_space=space)
    code, text = run_cli(capsys, "tune", "--config", str(file))
    assert code == 2, text
    errors = [line for line in text.splitlines() if line.startswith("slmops: error:")]
    assert len(errors) == 1 and message in errors[0] and str(file) in errors[0], text
    assert not (tmp_path / "out").exists()  # nothing trained, nothing written


@pytest.mark.parametrize("search,message", [
    ({"objective": {"metric": "acuracy"}}, "objective.metric 'acuracy': not an evaluation metric. Did you mean 'accuracy'"),
    ({"search_strategy": {"type": "grid"}}, "search_space.learning_rate: a grid needs a finite set of values"),
    ({"search_strategy": {"type": "random", "num_trial": 3}}, "unknown key 'search_strategy.num_trial'. Did you mean 'num_trials'"),
    ({"pruner": {"type": "percentile"}}, "pruner.type"),
], ids=["objective", "grid-float", "strategy-key", "pruner"])
def test_bad_strategy_objective_and_pruner_are_named(search, message, tiny_llama, tmp_path, capsys):
    file = search_file(tmp_path / "s.yaml", tiny_llama, tmp_path / "out", **search)
    code, text = run_cli(capsys, "tune", "--config", str(file))
    assert code == 2 and message in text, text
    assert not (tmp_path / "out").exists()


def test_a_mistake_every_trial_would_make_stops_the_search_before_the_first_trial(tiny_llama, tmp_path, capsys):
    file = search_file(tmp_path / "s.yaml", tiny_llama, tmp_path / "out")
    data = yaml.safe_load(file.read_text())
    data["text_template"] = "Phrase: {phrase}\nTone: {mood}"
    file.write_text(yaml.safe_dump(data))
    code, text = run_cli(capsys, "tune", "--config", str(file))
    assert code != 0 and "slmops: error: --text_template: field(s) 'mood' not in the data" in text, text
    assert not (tmp_path / "out" / "study.db").exists() and not list((tmp_path / "out").glob("trials/[0-9]*"))


def test_seed_file_olive_spelling_and_aliases_make_the_plan(tiny_llama, tmp_path, capsys):
    from slmops.tune import load_search

    olive = search_file(tmp_path / "o.yaml", tiny_llama, tmp_path / "out", search_space={
        **SEED_SPACE, "lora_alpha": [16, 32]})  # Olive: a list is a choice
    data = yaml.safe_load(olive.read_text())
    data.pop("search_strategy")
    data["engine"] = {"search_strategy": {"sampler": "tpe", "max_iter": 5, "execution_order": "joint"}}
    olive.write_text(yaml.safe_dump(data))
    code, text = run_cli(capsys, "tune", "--config", str(olive), "--dry_run")
    assert code == 0, text
    plan = json.loads(text[text.index("{"):])
    assert plan["search"]["strategy"] == "tpe" and plan["search"]["trials"] == 5
    assert plan["space"]["batch_size"]["flag"] == "per_device_train_batch_size"
    assert plan["space"]["lora_alpha"] == {"flag": "lora_alpha", "type": "choice", "values": [16, 32]}
    assert plan["objective"] == {"metric": "loss", "direction": "minimize"} and plan["pruning"].startswith("median")
    assert not (tmp_path / "out").exists()

    accuracy = load_search(search_file(tmp_path / "a.yaml", tiny_llama, tmp_path / "out2", objective={"metric": "accuracy"}),
                           {"n_trials": 3})
    assert accuracy.direction == "maximize" and accuracy.config.search_strategy.num_trials == 3
    assert accuracy.target.extra == {"metric_for_best_model": "accuracy", "eval_metrics": ["accuracy"]}


# ---- a search ------------------------------------------------------------------------------------------
def test_search_prunes_writes_outputs_and_best_yaml_reproduces_the_best_trial(tiny_llama, tmp_path, capsys):
    out = tmp_path / "out"
    file = search_file(tmp_path / "s.yaml", tiny_llama, out)
    code, text = run_cli(capsys, "tune", "--config", str(file))
    assert code == 0, text
    rows = table(out)
    assert len(rows) == 6 and {r["state"] for r in rows} <= {"complete", "pruned"}
    pruned = [r for r in rows if r["state"] == "pruned"]
    assert pruned and all(r["note"].startswith("pruned at step") for r in pruned)
    assert all(float(r["learning_rate"]) > 0 and r["batch_size"] in ("4", "8") for r in rows)
    assert "trial  state" in text and "complete" in text  # the live table
    # every trial ran with its own sampled values, in its own folder
    for row in rows:
        ran = yaml.safe_load((out / "trials" / row["number"] / "run.yaml").read_text())["config"]
        assert ran["method"]["lora_r"] == int(row["lora_r"]) and ran["training"]["per_device_train_batch_size"] == int(row["batch_size"])

    best = min((r for r in rows if r["state"] == "complete"), key=lambda r: float(r["loss"]))
    best_file = yaml.safe_load((out / "best.yaml").read_text())
    assert best_file["method"]["lora_r"] == int(best["lora_r"]) and best_file["output_path"] == str(out / "best-run")
    report = (out / "report.md").read_text()
    assert f"**best**: trial {best['number']}: loss" in report and "![Parameter importances](tune-2.png)" in report
    assert (out / "report.html").read_text().count("<img") >= 2

    code, text = run_cli(capsys, "finetune", "--config", str(out / "best.yaml"), "--log_level", "2")
    assert code == 0, text
    again = yaml.safe_load((out / "best-run" / "run.yaml").read_text())["result"]["best_eval_loss"]
    assert again == pytest.approx(float(best["loss"]), rel=1e-5)

    # the same command again: the study is done, nothing runs twice
    code, text = run_cli(capsys, "tune", "--config", str(file))
    assert code == 0 and len(table(out)) == 6
    # a changed search on that study is refused, naming what changed
    file.write_text(file.read_text().replace("high: 16", "high: 32"))
    code, text = run_cli(capsys, "tune", "--config", str(file))
    assert code == 2 and "searches another search space" in text, text


def test_a_failing_trial_is_recorded_with_its_reason_and_the_study_goes_on(tiny_llama, tmp_path, capsys, monkeypatch):
    from slmops.tune import targets

    real = targets.FinetuneTarget.run

    def flaky(self, params, folder, hooks):
        if folder.name == "1":
            raise RuntimeError("the disk said no")
        return real(self, params, folder, hooks)

    monkeypatch.setattr(targets.FinetuneTarget, "run", flaky)
    out = tmp_path / "out"
    code, text = run_cli(capsys, "tune", "--config", str(search_file(tmp_path / "s.yaml", tiny_llama, out, trials=3)))
    assert code == 0, text
    rows = table(out)
    assert [r["state"] for r in rows] == ["complete", "fail", "complete", "complete"]
    assert rows[1]["note"] == "RuntimeError: the disk said no"


def test_search_over_a_workflow_inside_slmops_run(tiny_llama, tmp_path, capsys):
    """`slmops run --config` with a search_strategy tunes the workflow; PASS.option dimensions;
    best.yaml is a workflow that `slmops run` runs."""
    out = tmp_path / "out"
    workflow = {
        "search_strategy": {"type": "grid"},
        "search_space": {"lora.lora_r": {"type": "choice", "values": [2, 8]}},
        "input_model": {"model_name_or_path": str(tiny_llama)},
        "data_configs": {"tone": {"data_name": str(TONE), "train_split": "train[:32]", "eval_split": "train[32:48]",
                                  "text_template": "Phrase: {phrase}\nTone: {tone}", "max_seq_len": 64}},
        "passes": {"lora": {"type": "LoRA", "config": {"data_config": "tone", "max_steps": 4, "eval_steps": 2,
                                                        "learning_rate": 1e-2, "bf16": False, "report_to": "none"}}},
        "output_dir": str(out),
    }
    file = tmp_path / "wf.yaml"
    file.write_text(yaml.safe_dump(workflow, sort_keys=False))
    code, text = run_cli(capsys, "run", "--config", str(file), "--output_path", str(out), "--log_level", "2")
    assert code == 0, text
    rows = table(out)
    assert sorted(r["lora.lora_r"] for r in rows) == ["2", "8"] and {r["state"] for r in rows} == {"complete"}
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert best["passes"]["lora"]["config"]["lora_r"] in (2, 8) and best["output_dir"] == str(out / "best-run")
    code, text = run_cli(capsys, "run", "--config", str(out / "best.yaml"), "--log_level", "2")
    assert code == 0, text
    assert (out / "best-run" / "lora" / "adapter" / "adapter_config.json").is_file()
    code, text = run_cli(capsys, "run", "--config", str(file), "--n_trials", "1", "--dry_run")  # (grid size 2 caps it)
    assert code == 0 and '"trials": 1' in text, text


# ---- several workers, kills ------------------------------------------------------------------------------
def _two_workers_complete_the_study(file: Path, outs: list[Path], extra: list[str], tmp_path: Path, trials: int):
    procs = [worker("--config", str(file), "--output_path", str(out), *extra, log=tmp_path / f"w{i}.log")
             for i, out in enumerate(outs)]
    for p in procs:
        p.wait(timeout=600)
    logs = [(tmp_path / f"w{i}.log").read_text() for i in range(len(procs))]
    assert [p.returncode for p in procs] == [0, 0], logs
    return logs


def _check_exact(trials, n: int):
    finished = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) == n, states(trials)
    assert not [t for t in trials if t.state.name in ("RUNNING", "WAITING")], states(trials)
    # no trial run twice: every finished trial's parameters are its own
    params = [tuple(sorted(t.params.items())) for t in finished]
    assert len(set(params)) == n
    return finished


def test_two_workers_on_one_sqlite_study_run_each_trial_once(tiny_llama, tmp_path):
    out = tmp_path / "out"
    file = search_file(tmp_path / "s.yaml", tiny_llama, out, trials=8)
    _two_workers_complete_the_study(file, [out, out], [], tmp_path, 8)
    finished = _check_exact(trials_of(out), 8)
    workers = {t.user_attrs["worker"]["pid"] for t in finished}
    assert len(workers) == 2  # both took part
    assert len(table(out)) >= 8


@pytest.mark.skipif(why_unavailable() is not None, reason=str(why_unavailable()))
def test_two_workers_on_a_real_postgresql_share_one_study(tiny_llama, tmp_path):
    """Two machines in the docs' recipe: one PostgreSQL, each worker with its own output folder."""
    with postgres_server() as url:
        outs = [tmp_path / "machine-a", tmp_path / "machine-b"]
        file = search_file(tmp_path / "s.yaml", tiny_llama, outs[0], trials=8)
        _two_workers_complete_the_study(file, outs, ["--storage", url, "--study_name", "tone"], tmp_path, 8)
        trials = trials_of(outs[0], "tone", url)
        finished = _check_exact(trials, 8)
        folders = {Path(t.user_attrs["folder"]).parent.parent for t in finished}
        assert folders == set(outs)  # each machine ran some, in its own folder
        assert not (outs[0] / "study.db").exists()
        # either machine's table holds the whole study
        assert len([r for r in table(outs[1]) if r["state"] in ("complete", "pruned")]) == 8


def _kill_mid_trial(file: Path, out: Path, sig: int, tmp_path: Path) -> tuple[int, int]:
    """Start a worker, wait until a trial is a third through its training (its first checkpoint
    is written), send `sig`; (its number, rc)."""
    proc = worker("--config", str(file), log=tmp_path / "killed.log")
    deadline = time.monotonic() + 300
    number = None
    try:
        while number is None and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
            if not (out / "study.db").exists():
                continue
            try:
                trials = trials_of(out)
            except KeyError:  # the database is there, the study not yet
                continue
            except Exception as exc:  # the worker is creating the tables this moment (this look would too)
                if "already exists" in str(exc) or "UNIQUE constraint failed" in str(exc):
                    continue
                raise
            running = [t for t in trials if t.state.name == "RUNNING"
                       and (out / "trials" / str(t.number) / "checkpoints" / "step-000100").exists()]
            number = running[0].number if running else None
        assert number is not None, (tmp_path / "killed.log").read_text()
        proc.send_signal(sig)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    return number, proc.returncode


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["sigkill", "ctrl-c"])
def test_a_trial_killed_in_flight_is_retried_and_the_study_finishes_exact(sig, tiny_llama, tmp_path, capsys):
    out = tmp_path / "out"
    file = search_file(tmp_path / "s.yaml", tiny_llama, out, trials=2, max_steps=300, eval_steps=100)
    killed, rc = _kill_mid_trial(file, out, sig, tmp_path)
    assert rc == (-signal.SIGKILL if sig == signal.SIGKILL else 130)
    code, text = run_cli(capsys, "tune", "--config", str(file), "--log_level", "2")  # the same command again
    assert code == 0, text
    trials = trials_of(out)
    finished = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) == 2 and not [t for t in trials if t.state.name in ("RUNNING", "WAITING")], states(trials)
    dead = trials[killed]
    assert dead.state.name == "FAIL"
    reason = "its worker died" if sig == signal.SIGKILL else "interrupted (Ctrl-C)"
    assert reason in dead.user_attrs["fail_reason"]
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == killed]
    assert len(retry) == 1 and retry[0].params == dead.params and retry[0].state.name in ("COMPLETE", "PRUNED")
    rows = table(out)
    assert rows[killed]["state"] == "fail" and reason in rows[killed]["note"]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_ctrl_c_swallowed_by_a_storage_finalizer_still_stops_the_trial_and_it_is_retried(tiny_llama, tmp_path, capsys, monkeypatch):
    """The ctrl-c case above once failed: the SIGINT landed in SQLAlchemy's weakref callback,
    Python printed "Exception ignored" and the worker trained both trials to the end and exited 0.
    Here the Ctrl-C lands in such a finalizer at step 3 of the first trial, every time."""
    from helpers import lose_a_ctrl_c_after_step

    out = tmp_path / "out"
    file = search_file(tmp_path / "s.yaml", tiny_llama, out, trials=2, max_steps=40, eval_steps=20, logging_steps=1)
    logged = lose_a_ctrl_c_after_step(monkeypatch, 3)
    code, text = run_cli(capsys, "tune", "--config", str(file), "--log_level", "2")
    assert code == 130, text
    assert logged == [1, 2, 3], logged  # stopped before step 4, not at the end of the trial
    monkeypatch.undo()
    code, text = run_cli(capsys, "tune", "--config", str(file), "--log_level", "2")
    assert code == 0, text
    trials = trials_of(out)
    assert states(trials)[0] == "FAIL" and "interrupted (Ctrl-C)" in trials[0].user_attrs["fail_reason"]
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == 0]
    assert len(retry) == 1 and retry[0].params == trials[0].params and retry[0].state.name in ("COMPLETE", "PRUNED")
    assert len([t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]) == 2


def test_the_shipped_search_file_makes_its_plan(capsys, monkeypatch):
    from conftest import ROOT

    monkeypatch.chdir(ROOT)
    code, text = run_cli(capsys, "tune", "--config", "examples/tune/tone-lora.yaml", "--dry_run")
    assert code == 0, text
    plan = json.loads(text[text.index("{"):])
    assert plan["run"]["kind"] == "finetune" and plan["search"]["trials"] == 20
    assert plan["space"]["learning_rate"] == {"flag": "learning_rate", "type": "float", "low": 1e-6, "high": 1e-3, "log": True}
    assert plan["pruning"].startswith("median") and plan["output"] == str(ROOT / "models" / "tone" / "tune")


def test_config_pointer_is_read_relative_to_the_search_file(tiny_llama, tmp_path, capsys, monkeypatch):
    from slmops.tune import load_search

    (tmp_path / "runs").mkdir()
    search_file(tmp_path / "runs" / "run.yaml", tiny_llama, tmp_path / "ignored")
    run = yaml.safe_load((tmp_path / "runs" / "run.yaml").read_text())
    for key in ("search_strategy", "search_space", "pruner", "output_path"):
        run.pop(key)
    (tmp_path / "runs" / "run.yaml").write_text(yaml.safe_dump(run))
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"search_space": {"r": {"type": "int", "low": 2, "high": 4}},
                                                     "config": "runs/run.yaml"}))
    monkeypatch.chdir(tmp_path / "runs")  # not where the pointer is relative to
    plan = load_search(tmp_path / "s.yaml")
    assert plan.dimensions == {"r": "lora_r"} and plan.target.kind == "finetune"
    assert plan.out == (tmp_path / "runs" / "tune-output").resolve()  # the default, under the working folder
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"search_space": {"r": {"type": "int", "low": 2, "high": 4}},
                                                     "config": "runs/run.yaml", "max_steps": 3}))
    with pytest.raises(Exception, match="the keys max_steps would be ignored"):
        load_search(tmp_path / "s.yaml")


def test_trial_timeout_stops_a_trial_which_still_reports_its_evaluation(tiny_llama, tmp_path, capsys):
    out = tmp_path / "out"
    file = search_file(tmp_path / "s.yaml", tiny_llama, out, trials=2, max_steps=500, eval_steps=250, trial_timeout=0.01,
                       pruner={"type": "none"})
    code, text = run_cli(capsys, "tune", "--config", str(file))
    assert code == 0, text
    trials = trials_of(out)
    assert states(trials) == ["COMPLETE", "COMPLETE"]
    for trial in trials:
        assert trial.user_attrs["stop_reason"] == "time_limit"
        result = yaml.safe_load((out / "trials" / str(trial.number) / "run.yaml").read_text())["result"]
        assert result["steps"] == 1 and result["best_step"] == 1 and result["best_eval_loss"] == pytest.approx(trial.value)


def test_workers_opening_a_new_sqlite_study_at_the_same_moment_all_get_it(tiny_llama, tmp_path):
    """Six local workers started together on a new study file: without waiting for each other,
    about one in three failed ('table studies already exists', 'UNIQUE constraint failed:
    alembic_version.version_num'). Real processes: each says it is ready (imports done, plan
    read), then all are released at once by one file appearing."""
    file = search_file(tmp_path / "s.yaml", tiny_llama, tmp_path / "out")
    go = tmp_path / "go"
    script = ("import os, sys, time\n"
              "from slmops.tune import load_search\n"
              "from slmops.tune.study import open_storage\n"
              "plan = load_search(sys.argv[1])\n"
              "open(sys.argv[3], 'w').close()\n"
              "while not os.path.exists(sys.argv[2]): time.sleep(0.001)\n"
              "open_storage(plan)\n"
              "print('opened')\n")
    procs = [subprocess.Popen([sys.executable, "-c", script, str(file), str(go), str(tmp_path / f"ready-{i}")], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(6)]
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not all((tmp_path / f"ready-{i}").exists() for i in range(6)):
        assert all(proc.poll() is None for proc in procs), [proc.communicate()[0] for proc in procs]
        time.sleep(0.05)
    go.touch()
    outputs = [proc.communicate(timeout=120)[0] for proc in procs]
    assert [o.strip().splitlines()[-1] for o in outputs] == ["opened"] * 6, outputs


def test_workers_racing_to_create_the_tables_of_a_new_database_wait_for_each_other(tiny_llama, tmp_path, monkeypatch):
    """Two machines starting at once on a new PostgreSQL: the loser of CREATE TABLE gets a
    'duplicate key' error while the winner commits; it opens the storage again instead of failing."""
    import optuna.storages

    from slmops.tune import load_search
    from slmops.tune.study import open_storage

    real, calls = optuna.storages.RDBStorage, []

    def racing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError('duplicate key value violates unique constraint "pg_type_typname_nsp_index"')
        return real(*args, **kwargs)

    monkeypatch.setattr(optuna.storages, "RDBStorage", racing)
    plan = load_search(search_file(tmp_path / "s.yaml", tiny_llama, tmp_path / "out"))
    assert open_storage(plan) is not None and len(calls) == 2


def test_a_stop_file_ends_the_run_gracefully_with_its_reason(tiny_llama, tmp_path):
    from slmops import finetune
    from slmops.train.monitor import read_metrics

    stop = tmp_path / "stop"
    stop.write_text("pruned\n")  # there from the start: the run stops after its first step
    result = finetune(tiny_config(tiny_llama, tmp_path / "run", max_steps=8, eval_split="train[64:80]", stop_file=str(stop)))
    assert result.train.steps == 1 and result.train.stop_reason == "pruned"
    evals = [r["step"] for r in read_metrics(tmp_path / "run" / "logs" / "metrics.jsonl") if r["split"] == "eval"]
    assert evals == [1] and (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


def test_each_trial_can_be_a_distributed_run(tiny_llama, tmp_path, capsys):
    """nproc_per_node 2: every trial is a torchrun launch of two processes; its evaluations reach
    the study as an in-process trial's do (reported at each eval step, the value is the run's
    best), and a stop the worker asks for (a prune) reaches the run through its stop file."""
    out = tmp_path / "tune"
    file = search_file(tmp_path / "s.yaml", tiny_llama, out, trials=1, max_steps=4, eval_steps=2, nproc_per_node=2)
    code, text = run_cli(capsys, "tune", "--config", str(file), "--log_level", "2")
    assert code == 0, text
    trials = trials_of(out)
    assert [t.state.name for t in trials] == ["COMPLETE"]
    for trial in trials:
        run = yaml.safe_load((out / "trials" / str(trial.number) / "run.yaml").read_text())
        assert run["resolved"]["distributed"]["world_size"] == 2
        assert sorted(trial.intermediate_values) == [2, 4] and trial.value == pytest.approx(run["result"]["best_eval_loss"])

    from slmops.train.monitor import read_metrics
    from slmops.train.trainer import TrainingHooks
    from slmops.tune.targets import run_distributed_trial

    config = tiny_config(tiny_llama, tmp_path / "pruned", max_steps=40, eval_steps=2, eval_split="train[64:80]")
    seen = []

    def on_evaluate(step, values):
        seen.append((step, round(values["loss"], 4)))
        return "pruned"  # the first evaluation says stop

    trial = run_distributed_trial(config, tmp_path / "pruned", TrainingHooks(on_evaluate=on_evaluate), 2)
    assert trial.stop_reason == "pruned" and seen[0][0] == 2
    steps = [r["step"] for r in read_metrics(tmp_path / "pruned" / "logs" / "metrics.jsonl") if r["split"] == "train"]
    assert max(steps) < 40  # stopped within a few steps of the request, not at the end
