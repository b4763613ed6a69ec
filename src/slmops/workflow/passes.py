"""The passes a workflow chains, one registry: each pass has one contract,

    run(context, artifact in, its typed config) -> artifact out,

writing only into its own folder (context.out). An artifact is a Hugging Face model (maybe
with a PEFT adapter) or an ONNX Runtime GenAI bundle (maybe with an adapter name), so passes
chain: LoRA -> MergeAdapterWeights -> ModelBuilder (int4) -> Evaluate, and so on. A pass's
config is checked against its own schema when the workflow is planned, before anything runs.

To add a pass: a check function, a run function, and one `register(PassType(...))`."""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from slmops.config import EvaluateConfig, ExportConfig, FinetuneConfig, from_dict, from_flat
from slmops.config.workflow import EvaluatorConfig, WorkflowConfig
from slmops.errors import ConfigError, ModelError, suggest

log = logging.getLogger("slmops")


@dataclass
class Artifact:
    """What flows between passes. kind 'hf': `model` is anything --model_name_or_path takes
    (a built-in, a Hugging Face folder, an slmops finetune output) and `adapter` a PEFT folder
    or None; kind 'bundle': `model` is a bundle folder and `adapter` one of its adapter names."""

    kind: str
    model: str
    adapter: str | None = None
    key: str = ""  # fingerprint of everything that made it: the cache keys of later passes chain through it
    adapter_from: str | None = None  # the pass that trained the adapter: its name in an exported bundle

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class PassContext:
    workflow: WorkflowConfig
    name: str  # the pass's name: its output folder
    out: Path  # the workflow's output folder / name
    results: dict[str, Any] = field(default_factory=dict)  # evaluations of this run, by pass name
    hooks: Any = None  # train.trainer.TrainingHooks for the fine-tuning passes (a tuning trial's pruning)
    finetuned: dict[str, Any] = field(default_factory=dict)  # fine-tuning passes' TrainResults, by pass name


@dataclass(frozen=True)
class PassType:
    name: str
    summary: str
    takes: tuple[str, ...]  # artifact kinds it accepts
    gives: str | None  # the kind it produces; None: its input passes through
    check: Callable[[dict, WorkflowConfig, str], BaseModel]  # (config dict, workflow, path) -> typed config (raises ConfigError)
    run: Callable[[PassContext, Artifact, BaseModel], Artifact]
    needs: tuple[str, ...] = ()  # modules it imports (for --setup)
    needs_adapter: bool = False


PASSES: dict[str, PassType] = {}
ALIASES = {"OnnxConversion": "ModelBuilder", "ExtractAdapters": "GenerateAdapter", "LoftQ": "QLoRA"}
FINETUNE_TYPES = {"LoRA": "lora", "QLoRA": "qlora", "DoRA": "dora", "LoHa": "loha", "LoKr": "lokr", "FullFinetune": "full"}


def register(kind: PassType) -> PassType:
    if kind.name in PASSES:
        raise ValueError(f"pass type {kind.name!r} is registered twice")
    PASSES[kind.name] = kind
    return kind


def canonical_type(name: str) -> str:
    return ALIASES.get(name, name)


def get_pass_type(name: str, path: str) -> PassType:
    kind = canonical_type(name)
    if kind not in PASSES:
        raise ConfigError(f"{path}.type: unknown pass type {name!r}.{suggest(name, [*PASSES, *ALIASES])} "
                          f"Pass types: {', '.join(PASSES)}")
    return PASSES[kind]


def _prefixed(exc: ConfigError, path: str) -> ConfigError:
    """A config error re-worded with each key's path in the workflow file:
    '--max_steps: ...' -> 'passes.lora.config.max_steps: ...'."""
    out = []
    for line in re.split(r"; |\n", str(exc)):
        unknown = re.match(r"unknown option --(\w+)\.(.*)", line) or re.match(rf"{re.escape(path)}: unknown key '(?:\w+\.)?(\w+)'\.(.*)", line)
        flag = re.match(r"--([\w.]+): (.*)", line)
        if unknown:
            out.append(f"{path}.{unknown[1]}: unknown key.{unknown[2]}")
        elif flag:
            out.append(f"{path}.{flag[1]}: {flag[2]}")
        else:
            out.append(line if line.startswith(path) else f"{path}: {line}")
    return ConfigError("\n".join(out))


def _data_config_name(config: dict, workflow: WorkflowConfig, path: str, key: str = "data_config") -> str:
    name = config.pop(key, None)
    if name is None:
        if len(workflow.data_configs) == 1:
            return next(iter(workflow.data_configs))
        raise ConfigError(f"{path}.{key}: name the data config to use (there are: {', '.join(workflow.data_configs) or 'none'})")
    if name not in workflow.data_configs:
        raise ConfigError(f"{path}.{key}: no data config named {name!r}.{suggest(name, workflow.data_configs)} "
                          f"(there are: {', '.join(workflow.data_configs) or 'none'})")
    return name


# ---- fine-tuning: LoRA, QLoRA, DoRA, LoHa, LoKr, FullFinetune ---------------------------------
class FinetunePass(BaseModel):
    data_config: str
    finetune: FinetuneConfig  # model and output are filled in when the pass runs


RESERVED_FINETUNE = {"model_name_or_path", "output_path", "overwrite", "log_level", "resume_from_checkpoint", "ignore_mismatch"}


def _check_finetune(method: str):
    def check(config: dict, workflow: WorkflowConfig, path: str) -> FinetunePass:
        config = dict(config)
        name = _data_config_name(config, workflow, path)
        reserved = sorted(RESERVED_FINETUNE & set(config))
        if reserved:
            raise ConfigError(f"{path}: {', '.join(reserved)} are set by the workflow (the input model, the pass's own folder), "
                              "not by a pass")
        given = config.pop("method", method)
        if given != method:
            raise ConfigError(f"{path}.method: {given!r} contradicts the pass type (method {method!r})")
        base = {"data": workflow.data_configs[name].model_dump(exclude_unset=True)}
        try:
            finetune = from_flat({**config, "method": method}, base, schema=FinetuneConfig, source=path)
        except ConfigError as exc:
            raise _prefixed(exc, f"{path}") from None
        return FinetunePass(data_config=name, finetune=finetune)

    return check


def _run_finetune(context: PassContext, artifact: Artifact, spec: FinetunePass) -> Artifact:
    from slmops.finetune_recipe import finetune

    config = spec.finetune.model_copy(update={"output_path": str(context.out), "log_level": context.workflow.log_level,
                                              "task_name": context.name})
    config.model = config.model.model_copy(update={"model_name_or_path": artifact.model,
                                                   "trust_remote_code": context.workflow.input_model.trust_remote_code})
    result = finetune(config, context.hooks)
    context.finetuned[context.name] = result.train
    if result.adapter_path is not None:
        return Artifact("hf", str(context.out), str(result.adapter_path), adapter_from=context.name)
    return Artifact("hf", str(result.model_path))


# ---- MergeAdapterWeights ------------------------------------------------------------------------
class NoOptions(BaseModel):
    model_config = {"extra": "forbid"}


def _check_nothing(config: dict, workflow: WorkflowConfig, path: str) -> NoOptions:
    if config:
        raise ConfigError(f"{path}: this pass takes no options (got {', '.join(config)})")
    return NoOptions()


def _run_merge(context: PassContext, artifact: Artifact, spec: NoOptions) -> Artifact:
    """The adapter folded into the base: a plain Hugging Face folder `from_pretrained` loads."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from slmops.models import load_tokenizer, resolve_model

    source = resolve_model(artifact.model)
    trust = context.workflow.input_model.trust_remote_code
    base = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32, trust_remote_code=trust)
    merged = PeftModel.from_pretrained(base, artifact.adapter).merge_and_unload()
    context.out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(context.out)
    load_tokenizer(source.path, trust).save_pretrained(context.out)
    return Artifact("hf", str(context.out))


# ---- ModelBuilder / OnnxConversion / GenerateAdapter ---------------------------------------------
EXPORT_RESERVED = {"model_name_or_path", "adapter_path", "output_path", "log_level"}


def _check_export(config: dict, workflow: WorkflowConfig, path: str) -> ExportConfig:
    reserved = sorted(EXPORT_RESERVED & set(config))
    if reserved:
        raise ConfigError(f"{path}: {', '.join(reserved)} come from the workflow (the previous pass's output, this pass's folder)")
    try:  # placeholders for what the run fills in; everything else is checked now
        return from_dict({**config, "model_name_or_path": "-", "output_path": "-"}, source=path, schema=ExportConfig)
    except ConfigError as exc:
        raise _prefixed(exc, path) from None


def _run_export(context: PassContext, artifact: Artifact, spec: ExportConfig) -> Artifact:
    from slmops.deploy.export import export_bundle, plan_export
    from slmops.inference.adapters import default_adapter_name

    names = spec.adapter_names or ([artifact.adapter_from or default_adapter_name(Path(artifact.adapter))] if artifact.adapter else None)
    config = spec.model_copy(update={"model_name_or_path": artifact.model, "adapter_path": [artifact.adapter] if artifact.adapter else None,
                                     "adapter_names": names, "output_path": str(context.out), "log_level": context.workflow.log_level})
    if context.out.exists():
        shutil.rmtree(context.out)
    manifest = export_bundle(plan_export(config))
    if config.precision == "fp32" and any(r["exact"] < r["prompts"] for r in (manifest.get("parity") or {}).values()):
        raise ModelError(f"{context.name}: the fp32 bundle's greedy output differs from PyTorch's (see {context.out}/slmops_bundle.json)")
    return Artifact("bundle", str(context.out), names[0] if names else None)


# ---- Evaluate ---------------------------------------------------------------------------------
class EvaluatePass(BaseModel):
    evaluator: EvaluatorConfig
    data: dict


def _check_evaluate(config: dict, workflow: WorkflowConfig, path: str) -> EvaluatePass:
    config = dict(config)
    name = config.pop("evaluator", None)
    if name is not None:
        if config:
            raise ConfigError(f"{path}: give an evaluator's name or its options, not both (got {', '.join(config)})")
        if name not in workflow.evaluators:
            raise ConfigError(f"{path}.evaluator: no evaluator named {name!r}.{suggest(name, workflow.evaluators)} "
                              f"(there are: {', '.join(workflow.evaluators) or 'none'})")
        evaluator = workflow.evaluators[name]
    else:
        try:
            evaluator = EvaluatorConfig.model_validate(config)
        except Exception as exc:  # pydantic's ValidationError, named with the path
            from pydantic import ValidationError

            from slmops.config import format_validation_error

            if isinstance(exc, ValidationError):
                raise ConfigError(f"{path}: {format_validation_error(exc)}") from None
            raise
    data_name = evaluator.data_config or _data_config_name({}, workflow, path)
    if data_name not in workflow.data_configs:
        raise ConfigError(f"{path}.data_config: no data config named {data_name!r}")
    from slmops.evaluate.metrics import get_metrics

    get_metrics(evaluator.metrics)
    data = workflow.data_configs[data_name].model_dump(exclude_unset=True)
    data["eval_split"] = evaluator.eval_split or data.get("eval_split") or data.get("train_split", "train")
    if evaluator.max_samples:
        data["max_samples"] = evaluator.max_samples
    return EvaluatePass(evaluator=evaluator, data=data)


def _run_evaluate(context: PassContext, artifact: Artifact, spec: EvaluatePass) -> Artifact:
    from slmops.evaluate.run import evaluate

    adapter = artifact.adapter
    config = EvaluateConfig.model_validate({
        "model": {"model_name_or_path": artifact.model, "trust_remote_code": context.workflow.input_model.trust_remote_code},
        "data": spec.data, "adapter": adapter, "compare_to": ["base"] if spec.evaluator.compare_to_base else None,
        "metrics": spec.evaluator.metrics, "max_new_tokens": spec.evaluator.max_new_tokens, "batch_size": spec.evaluator.batch_size,
        "output_path": str(context.out), "log_level": context.workflow.log_level})
    report = evaluate(config)
    context.results[context.name] = {"artifact": artifact.to_dict(), **report}
    (context.out / "artifact.json").write_text(json.dumps(artifact.to_dict(), indent=2))
    return artifact


for _name, _method in FINETUNE_TYPES.items():
    register(PassType(_name, f"fine-tune with --method {_method}", ("hf",), "hf", _check_finetune(_method), _run_finetune,
                      needs=("peft", "bitsandbytes") if _method == "qlora" else ("peft",)))
register(PassType("MergeAdapterWeights", "fold the adapter into the base weights (a plain Hugging Face folder)", ("hf",), "hf",
                  _check_nothing, _run_merge, needs=("peft",), needs_adapter=True))
register(PassType("ModelBuilder", "export to an ONNX Runtime GenAI bundle (fp32/int8/int4), the adapter as a switchable "
                  ".onnx_adapter", ("hf",), "bundle", _check_export, _run_export, needs=("onnxruntime_genai", "onnx_ir", "onnx")))
register(PassType("GenerateAdapter", "the same export, its point the adapter as graph inputs (one base, many adapters)", ("hf",),
                  "bundle", _check_export, _run_export, needs=("onnxruntime_genai", "onnx_ir", "onnx"), needs_adapter=True))
register(PassType("Evaluate", "metrics of the current model (PyTorch or bundle) on a data config", ("hf", "bundle"), None,
                  _check_evaluate, _run_evaluate))
