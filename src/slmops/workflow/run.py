"""`slmops run --config FILE` as a library call: load the file (Olive's shape is translated),
check every pass, then run them in order into OUT/<pass name>/, each taking the previous one's
output artifact. A pass whose config and inputs (the artifact that came in, the data's bytes)
are unchanged since its last successful run is reused, and says so.

OUT also gets workflow.yaml (the resolved native workflow: `slmops run --config
OUT/workflow.yaml` replays it), results.json (every Evaluate pass's metrics) and a report."""

from __future__ import annotations

import hashlib
import html
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError

from slmops.config.workflow import WorkflowConfig
from slmops.errors import ConfigError, OutputError
from slmops.workflow.passes import FINETUNE_TYPES, Artifact, PassContext, PassType, get_pass_type

log = logging.getLogger("slmops")
MARKER = ".slmops_pass.json"  # in each pass folder: its cache key and the artifact it made


def load_workflow(path: str | Path) -> tuple[WorkflowConfig, bool]:
    """(the workflow, whether it was Olive-shaped). Every problem of the file at once."""
    from slmops.config import load_yaml
    from slmops.workflow.olive import looks_like_olive

    path = Path(path)
    if path.suffix.lower() == ".json":
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            data = json.loads(path.read_text())
        except ValueError as exc:
            raise ConfigError(f"config file {str(path)!r} is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(path)!r} must hold an object at the top level")
    else:
        data = load_yaml(path)
    return parse_workflow(data, str(path), looks_like_olive(data))


def parse_workflow(data: dict, source: str, olive: bool | None = None) -> tuple[WorkflowConfig, bool]:
    from slmops.workflow.olive import looks_like_olive, translate

    olive = looks_like_olive(data) if olive is None else olive
    problems: list[str] = []
    if olive:
        data, problems = translate(data, source)
    try:
        config = WorkflowConfig.model_validate(data)
    except ValidationError as exc:
        # unknown keys first: a misspelt key is usually why a required one is "missing"
        errors = sorted(exc.errors(), key=lambda err: err["type"] != "extra_forbidden")
        problems += [_workflow_error(err, source) for err in errors]
        config = None
    if problems:
        raise ConfigError("\n".join(dict.fromkeys(problems)))
    return config, olive


def _workflow_error(err: dict, source: str) -> str:
    """One pydantic error as 'FILE: passes.lora.type: Field required' with the nearest key for unknown ones."""
    from slmops.errors import suggest

    loc = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        parent = err["loc"][:-1]
        known = _known_keys(parent)
        return f"{source}: unknown key '{loc}'.{suggest(str(err['loc'][-1]), known)}"
    message = err["msg"].removeprefix("Value error, ")
    got = err.get("input")
    got_text = f" (got {got!r})" if err["type"] not in ("missing",) and not isinstance(got, (dict, list)) and got is not None else ""
    return f"{source}: {loc}: {message}{got_text}" if loc else f"{source}: {message}{got_text}"


def _known_keys(parent: tuple) -> list[str]:
    from slmops.config import DataConfig, ModelConfig
    from slmops.config.workflow import EvaluatorConfig, PassConfig

    schema = {(): WorkflowConfig, ("input_model",): ModelConfig}.get(tuple(parent))
    if schema is None and parent:
        schema = {"data_configs": DataConfig, "passes": PassConfig, "evaluators": EvaluatorConfig}.get(str(parent[0]))
    return list(schema.model_fields) if schema else []


@dataclass
class PlannedPass:
    name: str
    kind: PassType
    spec: BaseModel
    out: Path


@dataclass
class WorkflowPlan:
    config: WorkflowConfig
    source: str
    olive: bool
    passes: list[PlannedPass]
    out: Path

    def describe(self) -> dict:
        return {"workflow": self.source, "translated_from_olive": self.olive, "output_dir": str(self.out),
                "passes": [{"name": p.name, "type": p.kind.name, "does": p.kind.summary, "output": str(p.out)} for p in self.passes]}


def plan_workflow(config: WorkflowConfig, source: str = "workflow", olive: bool = False, output_dir: str | None = None) -> WorkflowPlan:
    """Check every pass against its schema and against the artifact the pass before gives;
    check the output folder. No model is loaded. Every problem at once."""
    from slmops.outputs import check_writable

    if output_dir:
        config = config.model_copy(update={"output_dir": output_dir})
    out = Path(config.output_dir).expanduser().resolve()
    problems: list[str] = []
    planned: list[PlannedPass] = []
    kind, has_adapter, produced_by = "hf", False, "the input model"
    for name, spec in config.passes.items():
        path = f"passes.{name}"
        try:
            pass_type = get_pass_type(spec.type, path)
            typed = pass_type.check(spec.config, config, f"{path}.config")
        except ConfigError as exc:
            problems.append(str(exc))
            continue
        if kind not in pass_type.takes:
            problems.append(f"{path}: {pass_type.name} takes {' or '.join(_KIND[k] for k in pass_type.takes)}, and {produced_by} "
                            f"gives {_KIND[kind]}")
        if pass_type.needs_adapter and not has_adapter:
            problems.append(f"{path}: {pass_type.name} needs an adapter, and {produced_by} has none (put a LoRA-type pass before it)")
        if pass_type.name in FINETUNE_TYPES:
            has_adapter = typed.finetune.method.method != "full"
        elif pass_type.name == "MergeAdapterWeights":
            has_adapter = False
        kind = pass_type.gives or kind
        produced_by = f"pass {name!r}" if pass_type.gives else produced_by
        planned.append(PlannedPass(name, pass_type, typed, out / name))
    try:
        check_writable(out, "output_dir")
        if out.is_dir() and any(out.iterdir()) and not (out / "workflow.yaml").is_file():
            names = sorted(p.name for p in out.iterdir())[:5]
            problems.append(f"output_dir {str(out)!r} holds files that are not an slmops workflow's ({', '.join(names)}); choose another")
    except OutputError as exc:
        problems.append(str(exc))
    if problems:
        raise ConfigError("\n".join(problems))
    return WorkflowPlan(config, source, olive, planned, out)


_KIND = {"hf": "a PyTorch model", "bundle": "an ONNX bundle"}


# ---- fingerprints ---------------------------------------------------------------------------------
def _hash(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:20]


def model_fingerprint(model: str) -> str:
    """The input model's identity: its config and weight files (what it is, not where it is)."""
    from slmops.models import resolve_model

    source = resolve_model(model)
    config = source.path / "config.json"
    sizes = sorted((f.name, f.stat().st_size) for f in source.path.glob("*.safetensors"))
    return _hash({"config": config.read_text() if config.is_file() else None, "weights": sizes,
                  "adapter": str(source.adapter_path) if source.adapter_path else None})


def _data_of(spec: BaseModel) -> dict | None:
    if hasattr(spec, "finetune"):
        return spec.finetune.data.model_dump()
    if hasattr(spec, "data"):
        return spec.data
    return None


def pass_key(planned: PlannedPass, artifact: Artifact) -> str:
    from slmops.data.load import data_fingerprint

    data = _data_of(planned.spec)
    content = data_fingerprint(data.get("data_name"), data.get("data_files")) if data else None
    from slmops.about import __version__

    return _hash({"type": planned.kind.name, "config": planned.spec.model_dump(mode="json"), "input": artifact.key,
                  "data": content, "slmops": __version__})


# ---- running ----------------------------------------------------------------------------------------
@dataclass
class PassRecord:
    name: str
    type: str
    status: str  # ran | reused
    seconds: float
    artifact: dict


@dataclass
class WorkflowResult:
    output_dir: Path
    artifact: Artifact
    passes: list[PassRecord] = field(default_factory=list)
    results: dict = field(default_factory=dict)
    finetuned: dict = field(default_factory=dict)  # fine-tuning passes that ran: their TrainResults


def run_workflow(plan: WorkflowPlan, no_cache: bool = False, hooks=None) -> WorkflowResult:
    """Run the planned passes. `hooks` (train.trainer.TrainingHooks) go to every fine-tuning pass."""
    from slmops.outputs import OutputLock

    out = plan.out
    out.mkdir(parents=True, exist_ok=True)
    lock = OutputLock.acquire(out)
    try:
        (out / "workflow.yaml").write_text(yaml.safe_dump(replayable(plan.config), sort_keys=False))
        model = plan.config.input_model.model_name_or_path
        artifact = Artifact("hf", model, None, model_fingerprint(model))
        results: dict = {}
        finetuned: dict = {}
        records: list[PassRecord] = []
        for planned in plan.passes:
            key = pass_key(planned, artifact)
            marker = planned.out / MARKER
            saved = _read_marker(marker)
            if not no_cache and saved and saved.get("key") == key and _artifact_exists(saved["artifact"]):
                artifact = Artifact(**saved["artifact"])
                if saved.get("results") is not None:
                    results[planned.name] = saved["results"]
                log.info("%s: reused from %s (same config and inputs)", planned.name, planned.out)
                records.append(PassRecord(planned.name, planned.kind.name, "reused", 0.0, artifact.to_dict()))
                continue
            if planned.out.exists():  # a stale or failed run of this pass: the folder is the workflow's own
                shutil.rmtree(planned.out)
            log.info("%s: %s (%s)", planned.name, planned.kind.name, planned.kind.summary)
            started = time.perf_counter()
            context = PassContext(plan.config, planned.name, planned.out, results, hooks, finetuned)
            made = planned.kind.run(context, artifact, planned.spec)
            made.key = key
            seconds = time.perf_counter() - started
            planned.out.mkdir(parents=True, exist_ok=True)
            marker.write_text(json.dumps({"key": key, "type": planned.kind.name, "artifact": made.to_dict(), "seconds": round(seconds, 1),
                                          "results": results.get(planned.name)}, indent=2))
            records.append(PassRecord(planned.name, planned.kind.name, "ran", seconds, made.to_dict()))
            artifact = made
        result = WorkflowResult(out, artifact, records, results, finetuned)
        (out / "results.json").write_text(json.dumps({"passes": [r.__dict__ for r in records], "results": results}, indent=2,
                                                     default=str))
        _write_report(plan, result)
        return result
    finally:
        lock.release()


def _read_marker(marker: Path) -> dict | None:
    try:
        return json.loads(marker.read_text())
    except (OSError, ValueError):
        return None


def _artifact_exists(artifact: dict) -> bool:
    """A saved artifact is still there (passes write absolute paths; the input model passed
    through as given is not checked here: it is resolved again when used)."""
    model, adapter = Path(artifact["model"]), artifact.get("adapter")
    if model.is_absolute() and not model.exists():
        return False
    return artifact["kind"] != "hf" or adapter is None or Path(adapter).is_dir()


def replayable(config: WorkflowConfig) -> dict:
    """The native workflow with local paths made absolute (replays from any folder)."""
    data = config.model_dump(mode="json", exclude_unset=True)  # what the file said, no wall of defaults

    def absolute(value):
        return str(Path(value).expanduser().resolve()) if isinstance(value, str) and Path(value).expanduser().exists() else value

    data["input_model"] = {**data.get("input_model", {}),
                           "model_name_or_path": absolute(config.input_model.model_name_or_path)}
    data.setdefault("data_configs", {})
    data["output_dir"] = config.output_dir
    for fields in data["data_configs"].values():
        fields["data_name"] = absolute(fields.get("data_name"))
        if fields.get("data_files"):
            fields["data_files"] = [absolute(f) for f in fields["data_files"]]
    data["output_dir"] = str(Path(data["output_dir"]).expanduser().resolve())
    for spec in data["passes"].values():
        config = spec.get("config") or {}
        for key in ("loss", "adapter_path", "parity_prompts"):
            if isinstance(config.get(key), str):
                file, sep, rest = config[key].partition(":")
                config[key] = absolute(file) + (sep + rest if sep else "")
    return data


def _write_report(plan: WorkflowPlan, result: WorkflowResult) -> None:
    from slmops.evaluate.run import format_table
    from slmops.report import html_page, html_table

    rows = [[r.name, r.type, r.status, f"{r.seconds:.0f} s" if r.status == "ran" else "-", r.artifact["kind"],
             r.artifact["model"] + (f" + {r.artifact['adapter']}" if r.artifact.get("adapter") else "")] for r in result.passes]
    header = ["pass", "type", "status", "time", "output", "artifact"]
    md = [f"# slmops workflow\n\n{plan.source} -> {result.output_dir}\n", "| " + " | ".join(header) + " |",
          "| " + " | ".join("---" for _ in header) + " |", *["| " + " | ".join(map(str, row)) + " |" for row in rows]]
    blocks = [html_table(header, rows)]
    for name, report in result.results.items():
        table = format_table(report)
        md += [f"\n## {name}\n\n{report['data']['source']} ({report['data']['split']}, {report['data']['rows']} rows)\n", "```", table, "```"]
        blocks.append(f"<h2>{html.escape(name)}</h2><pre>{html.escape(table)}</pre>")
    (result.output_dir / "report.md").write_text("\n".join(md) + "\n")
    (result.output_dir / "report.html").write_text(html_page("slmops workflow", blocks))
