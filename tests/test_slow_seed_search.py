"""The seed's search file as written, on the real built-in model. Its own file: `make test`
hands out whole files to its workers, and its trials run one after another."""

from __future__ import annotations

import pytest

from slow_helpers import TONE, slmops

pytestmark = [pytest.mark.slow, pytest.mark.needs_default_model]
SUITE_SECONDS = 175  # about, on one test worker (conftest: the longest files start first)


def test_seed_search_file_prunes_and_best_yaml_reproduces_the_best_trial(tmp_path, builtin_model):
    """The seed's search space as written, on LoRA of the built-in model with a small per-trial
    budget: six trials, at least one pruned, best.yaml runs again to the best trial's metric."""
    import csv

    import yaml

    search = {
        "search_strategy": {"type": "random", "num_trials": 6},
        "search_space": {
            "learning_rate": {"type": "float", "low": 1e-6, "high": 1e-3, "log": True},
            "lora_r": {"type": "int", "low": 8, "high": 64},
            "batch_size": {"type": "choice", "values": [8, 16, 32]},
        },
        "pruner": {"type": "median", "n_startup_trials": 2},
        "model": {"model_name_or_path": "smollm2-135m-instruct"},
        "data": {"data_name": TONE, "train_split": "train[:200]", "eval_split": "train[500:516]", "max_seq_len": 48,
                 "text_template": "Phrase: {phrase}\nTone: {tone}"},
        "method": {"method": "lora"},
        "training": {"max_steps": 2, "eval_steps": 1, "report_to": "none"},
        "output_path": str(tmp_path / "tune"),
    }
    file = tmp_path / "search.yaml"
    file.write_text(yaml.safe_dump(search, sort_keys=False))
    slmops("tune", "--config", str(file), cwd=tmp_path)
    with (tmp_path / "tune" / "trials.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and {r["state"] for r in rows} <= {"complete", "pruned"}, rows
    assert any(r["state"] == "pruned" for r in rows), rows
    assert all(8 <= int(r["lora_r"]) <= 64 and r["batch_size"] in ("8", "16", "32") for r in rows)
    best = min((r for r in rows if r["state"] == "complete"), key=lambda r: float(r["loss"]))
    slmops("finetune", "--config", str(tmp_path / "tune" / "best.yaml"), cwd=tmp_path)
    run = yaml.safe_load((tmp_path / "tune" / "best-run" / "run.yaml").read_text())
    assert run["result"]["best_eval_loss"] == pytest.approx(float(best["loss"]), rel=1e-4)
    assert run["config"]["method"]["lora_r"] == int(best["lora_r"])
