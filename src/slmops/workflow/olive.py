"""Microsoft Olive's workflow files, translated into slmops' native workflow (config/workflow.py).

Olive's shape (its README's and docs' examples):

    model: {type: PyTorchModel, config: {model_path: ..., task: text-generation}}   # or input_model: {type: HfModel, model_path: ...}
    data_configs:
      - name: custom_dataset
        type: HuggingfaceContainer
        load_dataset_config: {data_files: data.json, split: train}
        pre_process_data_config: {text_template: "User: {input}\\nAssistant: {output}"}
    passes:
      lora: {type: LoRA, config: {r: 16, lora_alpha: 32, target_modules: [...], training_args: {...}}}
    engine: {output_dir: ..., evaluator: ...}        # or output_dir / evaluators at the top level

Every key is checked: an unknown one is an error naming its path (`passes.lora.config.lora_alpah`)
and the nearest valid key; all problems of a file are reported at once."""

from __future__ import annotations

from typing import Any

from slmops.config import TrainingConfig
from slmops.errors import suggest

OLIVE_MODEL_TYPES = {"pytorchmodel", "hfmodel", "huggingfacemodel"}
OLIVE_DATA_TYPES = {"huggingfacecontainer"}
# Olive's names in a LoRA-family pass config -> slmops' flags
PASS_KEY_ALIASES = {"r": "lora_r", "alpha": "lora_alpha", "train_data_config": "data_config", "eval_data_config": "eval_data_config",
                    "lora_r": "lora_r", "lora_alpha": "lora_alpha"}
# Olive's ModelBuilder / OnnxConversion config names -> slmops' export flags
EXPORT_KEY_ALIASES = {"int4_block_size": "block_size", "int4_accuracy_level": "accuracy_level", "execution_provider": "provider"}
LOAD_DATASET_KEYS = {"data_name", "data_files", "split", "subset", "trust_remote_code"}
PREPROCESS_KEYS = {"text_template", "text_cols", "max_seq_len", "max_samples", "use_chat_template", "train_on_inputs"}
TOP_LEVEL = {"model", "input_model", "data_configs", "passes", "evaluators", "engine", "output_dir", "training_config",
             "log_severity_level", "log_level", "systems", "host", "target", "workflow_id", "evaluator", "search_strategy",
             "search_space", "cache_dir", "clean_cache", "evaluate_input_model"}


def looks_like_olive(data: dict) -> bool:
    """An Olive file: its own keys, or data configs as a list, or typed model entries."""
    if any(k in data for k in ("model", "engine", "training_config", "systems")):
        return True
    if isinstance(data.get("data_configs"), list):
        return True
    model = data.get("input_model")
    return isinstance(model, dict) and "type" in model


def translate(data: dict, source: str) -> tuple[dict, list[str]]:
    """(native workflow dict, problems). Problems name the key's path in the file."""
    problems: list[str] = []
    native: dict[str, Any] = {}
    for key in data:
        if key not in TOP_LEVEL:
            problems.append(f"{source}: unknown key '{key}'.{suggest(key, TOP_LEVEL)}")

    # ---- the input model
    model = data.get("input_model", data.get("model"))
    where = "input_model" if "input_model" in data else "model"
    if isinstance(model, dict):
        model_type = str(model.get("type", "HfModel")).lower()
        if model_type not in OLIVE_MODEL_TYPES:
            problems.append(f"{source}: {where}.type {model.get('type')!r}: slmops takes PyTorchModel / HfModel inputs")
        fields = dict(model.get("config") or {})
        fields.update({k: v for k, v in model.items() if k not in ("type", "config")})
        native_model: dict[str, Any] = {}
        for key, value in fields.items():
            if key in ("model_path", "model_name_or_path"):
                native_model["model_name_or_path"] = value
            elif key == "trust_remote_code":
                native_model["trust_remote_code"] = value
            elif key in ("torch_dtype",):
                native_model["torch_dtype"] = value
            elif key == "task":
                if str(value) not in ("text-generation", "text-generation-with-past"):
                    problems.append(f"{source}: {where}.config.task {value!r}: slmops fine-tunes text-generation models")
            elif key in ("adapter_path",):
                problems.append(f"{source}: {where}.config.adapter_path: start from an adapter with a pass's config "
                                "'adapter_path' instead")
            else:
                problems.append(f"{source}: unknown key '{where}.config.{key}'.{suggest(key, ['model_path', 'task', 'trust_remote_code'])}")
        native["input_model"] = native_model
    elif model is not None:
        problems.append(f"{source}: '{where}' must be a mapping")

    # ---- data configs: Olive's list of containers -> named DataConfigs
    splits: dict[str, tuple[str | None, tuple, str | None]] = {}  # name -> (split, source files, subset)
    raw_data = data.get("data_configs") or []
    native_data: dict[str, dict] = {}
    if isinstance(raw_data, dict):  # already native
        native_data = raw_data
    elif isinstance(raw_data, list):
        for index, entry in enumerate(raw_data):
            path = f"data_configs[{index}]"
            if not isinstance(entry, dict) or "name" not in entry:
                problems.append(f"{source}: {path} needs a 'name'")
                continue
            path = f"data_configs.{entry['name']}"
            kind = str(entry.get("type", "HuggingfaceContainer")).lower()
            if kind not in OLIVE_DATA_TYPES:
                problems.append(f"{source}: {path}.type {entry.get('type')!r}: slmops reads HuggingfaceContainer data configs")
            for key in entry:
                if key not in ("name", "type", "load_dataset_config", "pre_process_data_config", "dataloader_config", "user_script"):
                    problems.append(f"{source}: unknown key '{path}.{key}'.{suggest(key, ['load_dataset_config', 'pre_process_data_config'])}")
            if "user_script" in entry:
                problems.append(f"{source}: {path}.user_script: slmops does not run data scripts; use text_template or a data format")
            load = entry.get("load_dataset_config") or {}
            prep = entry.get("pre_process_data_config") or {}
            fields: dict[str, Any] = {}
            for key, value in load.items():
                if key not in LOAD_DATASET_KEYS:
                    problems.append(f"{source}: unknown key '{path}.load_dataset_config.{key}'.{suggest(key, LOAD_DATASET_KEYS)}")
                elif key == "split":
                    fields["train_split"] = value
                elif key == "subset":
                    fields["train_subset"] = value
                elif key != "trust_remote_code":
                    fields[key] = value
            for key, value in prep.items():
                if key not in PREPROCESS_KEYS:
                    problems.append(f"{source}: unknown key '{path}.pre_process_data_config.{key}'.{suggest(key, PREPROCESS_KEYS)}")
                elif key == "text_cols":
                    cols = [value] if isinstance(value, str) else list(value)
                    if len(cols) != 1:
                        problems.append(f"{source}: {path}.pre_process_data_config.text_cols: give one column (or a text_template)")
                    else:
                        fields["text_field"] = cols[0]
                else:
                    fields[key] = value
            files = fields.get("data_files")
            if isinstance(files, str):
                fields["data_files"] = [files]
            if fields.get("data_files") and not fields.get("data_name"):
                # a single local file: slmops names it as the dataset (its split is 'train')
                if len(fields["data_files"]) == 1:
                    fields["data_name"] = fields.pop("data_files")[0]
            native_data[entry["name"]] = fields
            splits[entry["name"]] = (fields.get("train_split"), (fields.get("data_name"), tuple(fields.get("data_files") or [])),
                                     fields.get("train_subset"))
    else:
        problems.append(f"{source}: 'data_configs' must be a list (Olive) or a mapping of names (slmops)")
    native["data_configs"] = native_data

    # ---- training defaults for every fine-tuning pass
    training_defaults = data.get("training_config") or {}
    if not isinstance(training_defaults, dict):
        problems.append(f"{source}: 'training_config' must be a mapping")
        training_defaults = {}
    for key in training_defaults:
        if key not in TrainingConfig.model_fields and key not in ("fp16", "bf16"):
            problems.append(f"{source}: unknown key 'training_config.{key}'.{suggest(key, TrainingConfig.model_fields)}")

    # ---- passes
    native_passes: dict[str, dict] = {}
    raw_passes = data.get("passes") or {}
    if not isinstance(raw_passes, dict):
        problems.append(f"{source}: 'passes' must be a mapping of pass names to passes")
        raw_passes = {}
    from slmops.workflow.passes import FINETUNE_TYPES, canonical_type

    for name, spec in raw_passes.items():
        if not isinstance(spec, dict) or "type" not in spec:
            problems.append(f"{source}: passes.{name} needs a 'type'")
            continue
        config = dict(spec.get("config") or {})
        config.update({k: v for k, v in spec.items() if k not in ("type", "config")})  # Olive also takes them flat
        kind = canonical_type(spec["type"])
        if kind in FINETUNE_TYPES:
            config = {**{k: v for k, v in training_defaults.items()}, **_training_args(config)}
            renamed = {PASS_KEY_ALIASES.get(k, k): v for k, v in config.items()}
            if "eval_data_config" in renamed:
                eval_name = renamed.pop("eval_data_config")
                train_name = renamed.get("data_config")
                if eval_name not in splits:
                    problems.append(f"{source}: passes.{name}.config.eval_data_config: no data config named {eval_name!r}")
                elif train_name in splits and splits[eval_name][1] != splits[train_name][1]:
                    problems.append(f"{source}: passes.{name}.config.eval_data_config {eval_name!r} reads other files than "
                                    f"{train_name!r}; slmops evaluates on a split of the training data source")
                else:
                    renamed["eval_split"] = splits[eval_name][0] or "train"
            config = renamed
        elif kind in ("ModelBuilder", "GenerateAdapter"):
            config = {EXPORT_KEY_ALIASES.get(k, k): v for k, v in config.items()}
            if "precision" in config:
                config["precision"] = str(config["precision"]).lower()
        native_passes[name] = {"type": spec["type"], "config": config}
    native["passes"] = native_passes

    # ---- evaluators, engine, output
    evaluators = data.get("evaluators") or {}
    native["evaluators"] = {name: _evaluator(name, spec, source, problems) for name, spec in evaluators.items()} \
        if isinstance(evaluators, dict) else {}
    engine = data.get("engine") or {}
    if not isinstance(engine, dict):
        problems.append(f"{source}: 'engine' must be a mapping")
        engine = {}
    for key in engine:
        if key not in ("output_dir", "evaluator", "log_severity_level", "cache_dir", "host", "target", "search_strategy",
                       "clean_cache", "evaluate_input_model"):
            problems.append(f"{source}: unknown key 'engine.{key}'.{suggest(key, ['output_dir', 'evaluator', 'search_strategy'])}")
    output_dir = data.get("output_dir") or engine.get("output_dir")
    if output_dir:
        native["output_dir"] = output_dir
    level = data.get("log_severity_level", engine.get("log_severity_level", data.get("log_level")))
    if level is not None:
        native["log_level"] = level
    evaluator = data.get("evaluator") or engine.get("evaluator")
    if evaluator:  # Olive evaluates the workflow's output with it: an Evaluate pass at the end
        if isinstance(evaluator, dict):
            native["evaluators"]["evaluator"] = _evaluator("evaluator", evaluator, source, problems)
            evaluator = "evaluator"
        native["passes"]["evaluate"] = {"type": "Evaluate", "config": {"evaluator": evaluator}}
    for key in ("systems", "host", "target"):
        value = data.get(key) or engine.get(key)
        if value and not _local(value):
            problems.append(f"{source}: '{key}': slmops runs passes on this machine (LocalSystem); "
                            "use torchrun / accelerate for several machines")
    return native, problems


def _training_args(config: dict) -> dict:
    """Olive's `training_args: {...}` block flattened into the pass's flags."""
    args = config.pop("training_args", None) or {}
    return {**args, **config}


def _local(value) -> bool:
    text = str(value).lower()
    return "local" in text or text in ("", "none")


def _evaluator(name: str, spec: Any, source: str, problems: list[str]) -> dict:
    """Olive's evaluator ({metrics: [{name, type, data_config, sub_types}]}) or slmops' own."""
    if not isinstance(spec, dict):
        problems.append(f"{source}: evaluators.{name} must be a mapping")
        return {}
    metrics = spec.get("metrics")
    if isinstance(metrics, list) and metrics and isinstance(metrics[0], dict):
        names, data_config = [], None
        for index, metric in enumerate(metrics):
            kind = str(metric.get("type", metric.get("name", ""))).lower()
            names.append({"accuracy": "accuracy", "f1": "f1", "perplexity": "perplexity", "latency": "latency", "bleu": "bleu",
                          "rouge": "rouge"}.get(kind, kind))
            data_config = data_config or metric.get("data_config")
        out = {k: v for k, v in spec.items() if k != "metrics"}
        out["metrics"] = names
        if data_config:
            out["data_config"] = data_config
        return out
    return spec
