"""A `slmops finetune` command line as a workflow file (`--save_config`): one data config, one
fine-tuning pass whose folder holds what `--output_path` would have."""

from __future__ import annotations

from pathlib import Path

from slmops.config import FinetuneConfig
from slmops.workflow.passes import FINETUNE_TYPES


def _absolute(value):
    return str(Path(value).expanduser().resolve()) if isinstance(value, str) and Path(value).expanduser().exists() else value


def workflow_of(config: FinetuneConfig) -> dict:
    """The native workflow equivalent of a finetune config (local paths made absolute). Its
    pass writes into OUTPUT's parent as OUTPUT's name, so the folders line up with the command's."""
    pass_type = next(name for name, method in FINETUNE_TYPES.items() if method == config.method.method)
    data = config.data.model_dump(mode="json", exclude_defaults=True)
    data["data_name"] = _absolute(data.get("data_name"))
    if data.get("data_files") and not (data.get("data_name") and Path(data["data_name"]).is_dir()):
        data["data_files"] = [_absolute(f) for f in data["data_files"]]
    options = {"data_config": "data"}
    options.update({k: v for k, v in config.method.model_dump(mode="json", exclude_defaults=True).items() if k != "method"})
    training = config.training.model_dump(mode="json", exclude_defaults=True)
    for key in ("resume_from_checkpoint", "ignore_mismatch"):
        training.pop(key, None)
    if training.get("loss"):
        file, sep, rest = training["loss"].rpartition(":")
        training["loss"] = f"{_absolute(file)}:{rest}"
    options.update(training)
    output = Path(config.output_path).expanduser().resolve()
    model = config.model.model_dump(mode="json", exclude_defaults=True)
    model["model_name_or_path"] = _absolute(config.model.model_name_or_path)
    return {"input_model": model, "data_configs": {"data": data}, "passes": {output.name: {"type": pass_type, "config": options}},
            "output_dir": str(output.parent / f"{output.name}-workflow"), "log_level": config.log_level}
