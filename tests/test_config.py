import pytest
import yaml

from slmops.config import from_dict, from_flat, load_yaml, to_yaml
from slmops.errors import ConfigError


def test_flat_flags_coerce_types_and_split_lists():
    cfg = from_flat({"max_steps": "100", "trust_remote_code": "true", "target_modules": "q_proj, v_proj", "lora_dropout": "0.1"})
    assert cfg.training.max_steps == 100
    assert cfg.model.trust_remote_code is True
    assert cfg.method.target_modules == ["q_proj", "v_proj"]
    assert cfg.method.lora_dropout == pytest.approx(0.1)


def test_unknown_flag_suggests_nearest():
    with pytest.raises(ConfigError, match="--max_step.*max_steps"):
        from_flat({"max_step": "3"})


def test_all_bad_values_reported_at_once():
    with pytest.raises(ConfigError) as info:
        from_flat({"max_steps": "abc", "lora_dropout": "3"})
    message = str(info.value)
    assert "--max_steps" in message and "--lora_dropout" in message


def test_yaml_round_trip_and_unknown_keys(tmp_path):
    cfg = from_flat({"data_name": "x.jsonl", "method": "dora", "learning_rate": "1e-3", "early_stopping_patience": "0"})
    assert cfg.training.early_stopping_patience is None
    path = tmp_path / "run.yaml"
    path.write_text(to_yaml(cfg))
    again = from_dict(load_yaml(path))
    assert again == cfg
    with pytest.raises(ConfigError, match="unknown key 'training.lr'"):
        from_dict({"training": {"lr": 1}})
    with pytest.raises(ConfigError, match="belongs under 'training'"):
        from_dict({"max_steps": 3})


def test_named_log_level_and_resume_aliases():
    cfg = from_flat({"log_level": "warning", "resume_from_checkpoint": "true"})
    assert cfg.log_level == 2
    assert cfg.training.resume_from_checkpoint == "latest"


def test_bf16_and_fp16_conflict():
    with pytest.raises(ConfigError, match="bf16"):
        from_flat({"bf16": "true", "fp16": "true"})


def test_example_configs_parse():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "examples" / "configs"
    files = sorted(root.glob("*.yaml"))
    assert files, "examples/configs should ship at least one config"
    for file in files:
        from_dict(yaml.safe_load(file.read_text()), source=str(file))


def test_eval_steps_is_a_step_count_or_a_fraction_of_the_run():
    """As in transformers: below 1, a fraction of the run (0.2: five evaluations); the default,
    ten a run, rounds up so none falls a few steps before the last step's."""
    from slmops.config.finetune import interval

    assert from_flat({"eval_steps": "0.2"}).training.eval_steps == 0.2
    assert from_flat({"eval_steps": "50", "save_steps": "25.0"}).training.save_steps == 25
    with pytest.raises(ConfigError, match="eval_steps: a number of steps .* or a fraction of the run below 1"):
        from_flat({"eval_steps": "1.5"})
    assert [interval(0.2, 367), interval(None, 367), interval(None, 100), interval(61, 367), interval(0.1, 3)] == [74, 37, 10, 61, 1]
