"""`slmops auto-opt` / `generate-adapter`: a Hugging Face model (and LoRA adapters) ->
an ONNX Runtime GenAI bundle whose LoRA weights are graph inputs.

How: ONNX Runtime GenAI's model builder exports the base with a *template* adapter (zero
LoRA weights of rank 1 on every layer any adapter targets), which it emits as separate
lora_A / lora_B MatMuls; those weights then become graph inputs that keep their zeros as
defaults (`make_lora_inputs`). Each real adapter becomes an `.onnx_adapter` filling every
slot (`adapters.py`). int4/int8 quantize the base MatMuls block-wise and leave the LoRA
MatMuls in float (their weights are inputs, not constants).

Everything is checked before the builder runs, and the bundle is built in a staging folder
beside the output and moved into place only when complete.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from slmops.deploy.adapters import (SUPPORTED_TARGETS, convert_adapter, fill_for_bundle, lora_slots, make_lora_inputs,
                                    read_peft_lora, slots_for_module, write_onnx_adapter)
from slmops.deploy.bundle import MANIFEST, genai_config, read_manifest
from slmops.inference.adapters import default_adapter_name, trained_template
from slmops.inference.onnx_backend import default_threads
from slmops.config.deploy import ExportConfig, ExportOptions, GenerateAdapterConfig
from slmops.errors import ConfigError, ModelError
from slmops.logs import phase
from slmops.outputs import DEPLOY_PACKAGES, check_new_folder, versions

log = logging.getLogger("slmops")

# Text decoders ONNX Runtime GenAI's builder exports with LoRA support (Llama, Qwen2 and
# Phi-3 are tested here on tiny models; SmolLM2 is a Llama).
SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Phi3ForCausalLM",
    "GemmaForCausalLM", "Gemma2ForCausalLM", "GraniteForCausalLM", "OlmoForCausalLM", "SmolLM3ForCausalLM",
)


@dataclass
class ExportPlan:
    """Everything decided before the model builder runs (what --dry_run prints)."""

    options: ExportOptions
    model_path: Path
    model_given: str
    architecture: str
    adapters: list[tuple[str, Path]]  # (name, PEFT folder)
    lora_targets: list[str]  # module leaf names that get slots
    output: Path
    threads: int
    parity_prompts: list[str] = field(default_factory=list)
    parity_tokens: int = 16
    linear_shapes: dict[str, tuple[int, int]] = field(default_factory=dict)  # {module: (in, out)}, read once

    @property
    def precision(self) -> str:
        return self.options.precision

    @property
    def execution_provider(self) -> str:
        return self.options.execution_provider

    def describe(self) -> dict:
        return {"model": self.model_given, "path": str(self.model_path), "architecture": self.architecture,
                "adapters": {name: str(path) for name, path in self.adapters}, "lora_slots_on": self.lora_targets,
                "precision": self.precision, "execution_provider": self.execution_provider, "output": str(self.output),
                "quantization": self.quantization, "threads": self.threads}

    @property
    def quantization(self) -> dict | None:
        if self.precision not in ("int4", "int8"):
            return None
        weights = {k: v for k, v in self.options.weight_quantization().items() if k != "precision"}
        return {"accuracy_level": self.options.resolved_accuracy_level, **weights}


def plan_export(options: ExportConfig | GenerateAdapterConfig) -> ExportPlan:
    """Check everything that can be checked without exporting; raise a clear error otherwise.
    (Flag values and their combinations were checked by the config itself.)"""
    from slmops.models import resolve_model
    from slmops.models.load import check_weight_files, load_config

    model_name_or_path, adapter_paths = _source(options)
    output = Path(options.output_path)
    check_new_folder(output)
    parity_prompts = _read_prompts(options.parity_prompts)

    source = resolve_model(model_name_or_path)
    check_weight_files(source.path)
    config = load_config(source.path, options.trust_remote_code)
    architecture = (getattr(config, "architectures", None) or ["?"])[0]
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ModelError(f"{architecture} ({model_name_or_path}) cannot be exported for ONNX Runtime GenAI; supported "
                         f"architectures: {', '.join(SUPPORTED_ARCHITECTURES)}")

    heads = getattr(config, "num_attention_heads", 1)
    head_size = getattr(config, "head_dim", None) or config.hidden_size // heads
    if options.execution_provider == "cpu" and head_size % 16:
        raise ModelError(f"{model_name_or_path} has attention heads of size {head_size}; ONNX Runtime's CPU attention kernel "
                         "needs a multiple of 16, so this model cannot run as an ONNX Runtime GenAI bundle on CPU")

    given_adapters = list(adapter_paths or [])
    if source.adapter_path is not None and not given_adapters:
        given_adapters = [str(source.adapter_path)]  # an slmops finetune output: its own adapter
    names = list(options.adapter_names or [])
    if names and len(names) != len(given_adapters):
        raise ConfigError(f"--adapter_names has {len(names)} names for {len(given_adapters)} adapters")
    adapters: list[tuple[str, Path]] = []
    targets: set[str] = set()
    structure = _linear_shapes(config, options.trust_remote_code)
    for index, adapter in enumerate(given_adapters):
        path = Path(adapter)
        name = names[index] if names else default_adapter_name(path)
        if name in {n for n, _ in adapters}:
            raise ConfigError(f"two adapters are named {name!r}; name them with --adapter_names a,b")
        lora = read_peft_lora(path)
        _check_adapter_base(lora, structure, str(path))
        adapters.append((name, path))
        targets.update(lora.targets)
    for name, path in adapters:
        _check_trained_precision(name, path, options)
    available = sorted({key.rsplit(".", 1)[-1] for key in structure} & set(SUPPORTED_TARGETS))
    if options.lora_slots == "all":
        targets = set(available)
    return ExportPlan(options, source.path, model_name_or_path, architecture, adapters, sorted(targets), output,
                      options.threads or default_threads(), parity_prompts, 16, structure)


def _check_trained_precision(name: str, path: Path, options) -> None:
    """A quantization-aware adapter (finetune --deploy_precision) fits the export it was trained
    over; another precision or quantization still works, without that agreement: said."""
    from slmops.inference.adapters import trained_for_precision

    trained = trained_for_precision(path)
    if trained is None:
        return
    here = options.weight_quantization()
    differ = {key: (value, here.get(key)) for key, value in trained.items() if here.get(key) != value}
    if differ:
        log.warning("adapter %s was trained over the %s export's weights (--deploy_precision); this export differs in %s: its "
                    "scores may move from what training measured (export with the same settings to keep them)", name,
                    trained.get("precision"), ", ".join(f"{key} {new} (trained over {old})" for key, (old, new) in differ.items()))
    else:
        log.info("adapter %s was trained over these very weights (--deploy_precision %s)", name, trained["precision"])


def _source(options) -> tuple[str, list[str] | None]:
    if isinstance(options, GenerateAdapterConfig):
        return options.base_model_path, options.adapter_paths
    return options.model_name_or_path, options.adapter_path


def _read_prompts(path: str | None) -> list[str]:
    if path is None:
        return []
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--parity_prompts file {path!r} does not exist")
    prompts = [line.replace("\\n", "\n") for line in file.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ConfigError(f"--parity_prompts file {path!r} holds no prompts")
    return prompts


def _linear_shapes(config, trust_remote_code: bool) -> dict[str, tuple[int, int]]:
    """{module name: (in, out)} of the model's linear layers, built on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return {name: (m.in_features, m.out_features) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def _check_adapter_base(lora, structure: dict[str, tuple[int, int]], source: str) -> None:
    """Every adapted layer exists in this model with the adapter's shapes, and has a slot."""
    for module, (a, b, _) in lora.modules.items():
        if module not in structure:
            raise ModelError(f"adapter {source!r} has weights for {module!r}, a layer this model does not have: it was trained on another base")
        fan_in, fan_out = structure[module]
        if a.shape[1] != fan_in or b.shape[0] != fan_out:
            raise ModelError(f"adapter {source!r} does not fit this model: {module} is [{fan_in} -> {fan_out}] here and "
                             f"[{a.shape[1]} -> {b.shape[0]}] in the adapter (trained on another base)")
        slots_for_module(module)  # e.g. lm_head: no slot can carry it


# ---- the export itself ---------------------------------------------------------------
def export_bundle(plan: ExportPlan, run_parity: bool | None = None) -> dict:
    """Build the bundle in a staging folder beside the output (model builder, LoRA inputs,
    adapters, manifest, parity check) and move it into place only when complete."""
    run_parity = not plan.options.no_parity if run_parity is None else run_parity
    staging = plan.output.with_name(f".{plan.output.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    started = time.perf_counter()
    try:
        size_mb = _weights_mb(plan.model_path)
        with phase(f"building the {plan.precision} ONNX graph ({size_mb:,.0f} MB of weights; ONNX Runtime GenAI's model builder)",
                   f"export-build-{plan.precision}-{plan.execution_provider}", size_mb):
            with _builder_output(staging / "builder.log"):
                template = _write_template_adapter(plan, staging / "template") if plan.lora_targets else None
                _run_builder(plan, staging, template)
        if template is not None:
            shutil.rmtree(template)
        shutil.rmtree(staging / "cache", ignore_errors=True)
        slot_shapes = make_lora_inputs(staging / "model.onnx")
        _set_threads(staging / "genai_config.json", plan.threads)
        adapters = []
        for name, path in plan.adapters:
            info = convert_adapter(path, staging / "adapters" / f"{name}.onnx_adapter", slot_shapes)
            adapters.append({"name": name, "file": f"adapters/{name}.onnx_adapter", "source": str(path),
                             "ranks": info["ranks"], "targets": info["targets"],
                             "text_template": trained_template(path)})  # the prompt a chat gives it (None: chat turns)
        manifest = {
            "format": 1,
            "base": {"model": plan.model_given, "path": str(plan.model_path), "architecture": plan.architecture},
            "precision": plan.precision,
            "execution_provider": plan.execution_provider,
            "quantization": plan.quantization,
            "lora_slots": slot_shapes,
            "adapters": adapters,
            "export_seconds": round(time.perf_counter() - started, 1),
            "versions": versions(DEPLOY_PACKAGES),
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if run_parity and plan.execution_provider == "cpu":
            from slmops.deploy.parity import check_parity

            checked = ", ".join(["the base", *(name for name, _ in plan.adapters)])
            with phase(f"checking the bundle against PyTorch (greedy tokens and logits: {checked})",
                       f"export-parity-{plan.precision}", size_mb * (1 + len(plan.adapters))):
                manifest["parity"] = check_parity(staging, plan)
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
        manifest["size_mb"] = round(sum(f.stat().st_size for f in staging.rglob("*") if f.is_file()) / 2**20, 1)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if plan.output.exists():
            plan.output.rmdir()  # checked empty by plan_export
        staging.rename(plan.output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


@contextlib.contextmanager
def _builder_output(log_file: Path):
    """The builder prints a lot; keep it in builder.log unless asked for detail (--log_level 0)."""
    if log.isEnabledFor(logging.DEBUG):
        yield
        return
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
        try:
            yield
        finally:
            log_file.write_text(buffer.getvalue())


def _write_template_adapter(plan: ExportPlan, folder: Path) -> Path:
    """A zero LoRA of rank 1 on every targeted layer: the builder turns it into the slots."""
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file

    tensors = {}
    for module, (fan_in, fan_out) in plan.linear_shapes.items():
        if module.rsplit(".", 1)[-1] in plan.lora_targets:
            tensors[f"base_model.model.{module}.lora_A.weight"] = torch.zeros(1, fan_in)
            tensors[f"base_model.model.{module}.lora_B.weight"] = torch.zeros(fan_out, 1)
    folder.mkdir(parents=True)
    LoraConfig(r=1, lora_alpha=1, target_modules=list(plan.lora_targets)).save_pretrained(folder)
    save_file(tensors, folder / "adapter_model.safetensors")
    return folder


def _lora_node_names(plan: ExportPlan) -> list[str]:
    """The builder's node names of every slot's LoRA MatMuls (kept out of int4/int8)."""
    names = []
    for module in plan.linear_shapes:
        if module.rsplit(".", 1)[-1] in plan.lora_targets:
            prefix, projections = slots_for_module(module)  # "model.layers.3.attn", ["q_proj"]
            _, _, layer, block = prefix.split(".")
            names += [f"/model/layers.{layer}/{block}/{proj}/{ab}/MatMul" for proj in projections for ab in ("lora_A", "lora_B")]
    return names


def _weights_mb(model_path: Path) -> float:
    """The model's weight files in MB: what the export's steps take time in proportion to."""
    files = [f for pattern in ("*.safetensors", "*.bin") for f in Path(model_path).glob(pattern)]
    return max(sum(f.stat().st_size for f in files) / 2**20, 1.0)


# --int8_layers -> the model builder's matmul_mixed_precision selectors
INT8_LAYERS = {"head": "last_matmul:int8", "sensitive": "last_matmul:int8,mixed_layers:int8"}


def _run_builder(plan: ExportPlan, staging: Path, template: Path | None) -> None:
    try:
        from onnxruntime_genai.models.builder import create_model, parse_extra_options
    except ImportError as exc:
        raise ModelError(f"the ONNX export needs onnxruntime-genai and onnx-ir ({exc}); install slmops with its dependencies") from None
    options = []
    if template is not None:
        options.append(f"adapter_path={template}")
    if plan.precision in ("int4", "int8"):
        options += [f"block_size={plan.options.block_size}", f"accuracy_level={plan.options.resolved_accuracy_level}",
                    f"algo_config={plan.options.quant_algo}"]
        if plan.precision == "int4" and plan.options.int8_layers != "none":
            options.append("matmul_mixed_precision=" + INT8_LAYERS[plan.options.int8_layers])
        if template is not None:  # LoRA weights become inputs: their MatMuls must stay float
            options.append("nodes_to_exclude=" + ",".join(_lora_node_names(plan)))
    if plan.options.trust_remote_code:
        options.append("hf_remote=true")
    cache = staging / "cache"
    extra = parse_extra_options(str(plan.model_path), str(plan.model_path), str(staging), plan.precision,
                                plan.execution_provider, str(cache), options)
    create_model(str(plan.model_path), str(plan.model_path), str(staging), plan.precision, plan.execution_provider, str(cache), **extra)
    if not (staging / "model.onnx").is_file() or not (staging / "genai_config.json").is_file():
        raise ModelError(f"the model builder produced no model.onnx / genai_config.json; see {staging / 'builder.log'}")


def _set_threads(config_file: Path, threads: int) -> None:
    # ONNX Runtime GenAI's default thread count leaves decode speed on the table (about 2x here).
    config = json.loads(config_file.read_text())
    options = config["model"]["decoder"].setdefault("session_options", {})
    options["intra_op_num_threads"] = threads
    # ONNX Runtime warns once per LoRA input at load ("initializer appears in graph inputs"):
    # that is the design here, not a problem; errors are still reported.
    options["log_severity_level"] = 3
    config_file.write_text(json.dumps(config, indent=4))


# ---- generate-adapter on an existing bundle / convert-adapters ---------------------------
def add_adapters_to_bundle(base_bundle: Path, adapter_paths: list[str], output: Path, adapter_names: list[str] | None = None) -> dict:
    """A new bundle folder sharing the base's files (hard links) plus converted adapters."""
    check_new_folder(output)
    genai_config(base_bundle)  # a corrupt base is named here, not copied into a new bundle
    manifest = read_manifest(base_bundle)
    slot_shapes = manifest.get("lora_slots") or {}
    if not slot_shapes:
        raise ModelError(f"bundle {str(base_bundle)!r} has no LoRA slots (exported without adapters); export the base with "
                         "--adapter_path (or --lora_slots all) so adapters can plug in")
    names = list(adapter_names or [default_adapter_name(Path(p)) for p in adapter_paths])
    if len(names) != len(adapter_paths):
        raise ConfigError(f"--adapter_names has {len(names)} names for {len(adapter_paths)} adapters")
    existing = {a["name"] for a in manifest.get("adapters", [])}
    converted = []
    for name, path in zip(names, adapter_paths):  # check all before writing anything
        if name in existing or name in [c[0] for c in converted]:
            raise ConfigError(f"an adapter named {name!r} is already in the bundle; pick another with --adapter_names")
        lora = read_peft_lora(path)
        converted.append((name, path, fill_for_bundle(lora_slots(lora, slot_shapes), slot_shapes, str(path)), lora))
    staging = output.with_name(f".{output.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        _link_tree(base_bundle, staging)
        for name, path, slots, lora in converted:
            write_onnx_adapter(slots, staging / "adapters" / f"{name}.onnx_adapter")
            manifest.setdefault("adapters", []).append({"name": name, "file": f"adapters/{name}.onnx_adapter", "source": str(path),
                                                        "ranks": lora.ranks, "targets": lora.targets,
                                                        "text_template": trained_template(path)})
        (staging / MANIFEST).unlink(missing_ok=True)  # a hard link to the base's manifest: replace, never edit in place
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if output.exists():
            output.rmdir()
        staging.rename(output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def _link_tree(source: Path, target: Path) -> None:
    for file in source.rglob("*"):
        if file.is_dir():
            continue
        dest = target / file.relative_to(source)
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(file, dest)
        except OSError:
            shutil.copy2(file, dest)
