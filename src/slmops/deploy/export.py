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

from slmops.deploy.adapters import (SUPPORTED_TARGETS, convert_adapter, default_adapter_name, fill_for_bundle,
                                    lora_slots, read_peft_lora, slot_of_input, slots_for_module, write_onnx_adapter)
from slmops.deploy.runtime import MANIFEST, default_threads
from slmops.errors import ConfigError, ModelError, OutputError, suggest
from slmops.outputs import DEPLOY_PACKAGES, check_writable, versions

log = logging.getLogger("slmops")

# Text decoders ONNX Runtime GenAI's builder exports with LoRA support (Llama, Qwen2 and
# Phi-3 are tested here on tiny models; SmolLM2 is a Llama).
SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Phi3ForCausalLM",
    "GemmaForCausalLM", "Gemma2ForCausalLM", "GraniteForCausalLM", "OlmoForCausalLM", "SmolLM3ForCausalLM",
)
PROVIDERS = {"CPUExecutionProvider": "cpu", "CUDAExecutionProvider": "cuda", "DmlExecutionProvider": "dml",
             "WebGpuExecutionProvider": "webgpu"}
DEVICE_OF = {"cpu": "cpu", "cuda": "gpu", "dml": "gpu", "webgpu": "gpu"}
# (precision, builder execution provider) pairs the builder supports.
VALID_PAIRS = {("fp32", "cpu"), ("fp32", "cuda"), ("fp16", "cuda"), ("fp16", "dml"), ("bf16", "cuda"), ("int8", "cpu"),
               ("int8", "cuda"), ("int4", "cpu"), ("int4", "cuda"), ("int4", "dml"), ("int4", "webgpu")}
PRECISIONS = ("fp32", "fp16", "bf16", "int8", "int4")
# Weight rounding for int4/int8. k_quant kept more of SmolLM2-135M's greedy tokens than
# plain round-to-nearest (62% vs 54% argmax agreement with fp32 over a prompt) at +2 MB.
QUANT_ALGOS = ("k_quant", "rtn", "default")


@dataclass
class ExportPlan:
    model_path: Path
    model_given: str
    architecture: str
    adapters: list[tuple[str, Path]]  # (name, PEFT folder)
    lora_targets: list[str]  # module leaf names that get slots
    precision: str
    execution_provider: str  # builder name: cpu, cuda, ...
    output: Path
    block_size: int = 32
    accuracy_level: int = 4
    quant_algo: str = "k_quant"
    threads: int = field(default_factory=default_threads)
    parity_prompts: list[str] = field(default_factory=list)
    parity_tokens: int = 16
    trust_remote_code: bool = False
    linear_shapes: dict[str, tuple[int, int]] = field(default_factory=dict)  # {module: (in, out)}, read once


def plan_export(model_name_or_path: str, adapter_paths: list[str] | None, output_path: str, precision: str = "fp32",
                provider: str = "CPUExecutionProvider", device: str | None = None, adapter_names: list[str] | None = None,
                block_size: int = 32, accuracy_level: int = 4, lora_slots: str = "auto", threads: int | None = None,
                parity_prompts: list[str] | None = None, trust_remote_code: bool = False, quiet: bool = False,
                quant_algo: str = "k_quant") -> ExportPlan:
    """Check everything that can be checked without exporting; raise a clear error otherwise."""
    from slmops.models import resolve_model
    from slmops.models.load import check_weight_files, load_config

    precision = precision.lower()
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown --precision {precision!r}; choose one of {', '.join(PRECISIONS)}.{suggest(precision, PRECISIONS)}")
    if provider not in PROVIDERS:
        raise ConfigError(f"unknown --provider {provider!r}; choose one of {', '.join(PROVIDERS)}.{suggest(provider, PROVIDERS)}")
    ep = PROVIDERS[provider]
    if device is not None and device != DEVICE_OF[ep]:
        raise ConfigError(f"--device {device} does not go with --provider {provider} (a {DEVICE_OF[ep]} provider)")
    if (precision, ep) not in VALID_PAIRS:
        pairs = ", ".join(f"{p} on {next(k for k, v in PROVIDERS.items() if v == e)}" for p, e in sorted(VALID_PAIRS) if e == ep)
        raise ConfigError(f"--precision {precision} is not supported with {provider}; supported there: {pairs}")
    if block_size not in (16, 32, 64, 128, 256):
        raise ConfigError(f"--block_size {block_size}: int4 block size must be one of 16, 32, 64, 128, 256")
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise ConfigError("--accuracy_level must be 0-4 (1: fp32 activations, 4: int8 activations, fastest on CPU)")
    if quant_algo not in QUANT_ALGOS:
        raise ConfigError(f"--quant_algo {quant_algo!r}: choose one of {', '.join(QUANT_ALGOS)}.{suggest(quant_algo, QUANT_ALGOS)}")
    if lora_slots not in ("auto", "all"):
        raise ConfigError(f"--lora_slots {lora_slots!r}: choose auto (the layers the adapters target) or all")

    output = Path(output_path)
    check_writable(output, "--output_path")
    if output.is_dir() and any(output.iterdir()):
        raise OutputError(f"output folder {str(output)!r} is not empty; choose another --output_path or remove it "
                          "(re-exporting into a used folder would mix old and new weights)")

    source = resolve_model(model_name_or_path, quiet=quiet)
    check_weight_files(source.path)
    config = load_config(source.path, trust_remote_code)
    architecture = (getattr(config, "architectures", None) or ["?"])[0]
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ModelError(f"{architecture} ({model_name_or_path}) cannot be exported for ONNX Runtime GenAI; supported "
                         f"architectures: {', '.join(SUPPORTED_ARCHITECTURES)}")

    heads = getattr(config, "num_attention_heads", 1)
    head_size = getattr(config, "head_dim", None) or config.hidden_size // heads
    if ep == "cpu" and head_size % 16:
        raise ModelError(f"{model_name_or_path} has attention heads of size {head_size}; ONNX Runtime's CPU attention kernel "
                         "needs a multiple of 16, so this model cannot run as an ONNX Runtime GenAI bundle on CPU")

    given_adapters = list(adapter_paths or [])
    if source.adapter_path is not None and not given_adapters:
        given_adapters = [str(source.adapter_path)]  # an slmops finetune output: its own adapter
    names = list(adapter_names or [])
    if names and len(names) != len(given_adapters):
        raise ConfigError(f"--adapter_names has {len(names)} names for {len(given_adapters)} adapters")
    adapters: list[tuple[str, Path]] = []
    targets: set[str] = set()
    structure = _linear_shapes(config, trust_remote_code)
    for index, adapter in enumerate(given_adapters):
        path = Path(adapter)
        name = names[index] if names else default_adapter_name(path)
        if name in {n for n, _ in adapters}:
            raise ConfigError(f"two adapters are named {name!r}; name them with --adapter_names a,b")
        lora = read_peft_lora(path)
        _check_adapter_base(lora, structure, str(path))
        adapters.append((name, path))
        targets.update(lora.targets)
    available = sorted({key.rsplit(".", 1)[-1] for key in structure} & set(SUPPORTED_TARGETS))
    if lora_slots == "all":
        targets = set(available)
    return ExportPlan(source.path, model_name_or_path, architecture, adapters, sorted(targets), precision, ep, output,
                      block_size, accuracy_level, quant_algo, threads or default_threads(), list(parity_prompts or []), 16,
                      trust_remote_code, structure)


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
def export_bundle(plan: ExportPlan, quiet: bool = False, run_parity: bool = True) -> dict:
    staging = plan.output.with_name(f".{plan.output.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    started = time.perf_counter()
    try:
        with _quiet_output(staging / "builder.log", quiet):
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
                             "ranks": info["ranks"], "targets": info["targets"]})
        manifest = {
            "format": 1,
            "base": {"model": plan.model_given, "path": str(plan.model_path), "architecture": plan.architecture},
            "precision": plan.precision,
            "execution_provider": plan.execution_provider,
            "quantization": ({"block_size": plan.block_size, "accuracy_level": plan.accuracy_level, "algorithm": plan.quant_algo}
                             if plan.precision in ("int4", "int8") else None),
            "lora_slots": slot_shapes,
            "adapters": adapters,
            "export_seconds": round(time.perf_counter() - started, 1),
            "versions": versions(DEPLOY_PACKAGES),
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if run_parity and plan.execution_provider == "cpu":
            from slmops.deploy.parity import check_parity

            manifest["parity"] = check_parity(staging, plan, quiet=quiet)
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
def _quiet_output(log_file: Path, quiet: bool):
    """The builder prints a lot; keep it in builder.log unless asked for detail."""
    if not quiet and log.isEnabledFor(logging.DEBUG):
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


def _run_builder(plan: ExportPlan, staging: Path, template: Path | None) -> None:
    try:
        from onnxruntime_genai.models.builder import create_model, parse_extra_options
    except ImportError as exc:
        raise ModelError(f"the ONNX export needs onnxruntime-genai and onnx-ir ({exc}); install slmops with its dependencies") from None
    options = []
    if template is not None:
        options.append(f"adapter_path={template}")
    if plan.precision in ("int4", "int8"):
        options += [f"block_size={plan.block_size}", f"accuracy_level={plan.accuracy_level}", f"algo_config={plan.quant_algo}"]
        if template is not None:  # LoRA weights become inputs: their MatMuls must stay float
            options.append("nodes_to_exclude=" + ",".join(_lora_node_names(plan)))
    if plan.trust_remote_code:
        options.append("hf_remote=true")
    cache = staging / "cache"
    extra = parse_extra_options(str(plan.model_path), str(plan.model_path), str(staging), plan.precision,
                                plan.execution_provider, str(cache), options)
    create_model(str(plan.model_path), str(plan.model_path), str(staging), plan.precision, plan.execution_provider, str(cache), **extra)
    if not (staging / "model.onnx").is_file() or not (staging / "genai_config.json").is_file():
        raise ModelError(f"the model builder produced no model.onnx / genai_config.json; see {staging / 'builder.log'}")


def make_lora_inputs(model_file: Path) -> dict[str, list[int]]:
    """Turn LoRA MatMul weights into graph inputs with a rank-1 zero default; return
    {slot: [in, out]}. Only the small graph file is rewritten; the base weights' external
    data file is untouched."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(model_file), load_external_data=False)
    graph = model.graph
    existing_inputs = {i.name for i in graph.input}
    shapes: dict[str, list[int]] = {}
    kept = []
    lora_initializers = []
    for init in graph.initializer:
        slot = slot_of_input(init.name)
        (lora_initializers if slot else kept).append(init)
    if not lora_initializers:
        return {}
    del graph.initializer[:]
    graph.initializer.extend(kept)
    for init in lora_initializers:
        slot = slot_of_input(init.name)
        dtype = helper.tensor_dtype_to_np_dtype(init.data_type)
        fan_in_or_rank, rank_or_out = list(init.dims)
        is_a = init.name.endswith(".lora_A.MatMul.weight")
        rank_dim = f"lora_rank.{slot}"
        if is_a:
            shapes.setdefault(slot, [0, 0])[0] = fan_in_or_rank
            dims, zeros = [fan_in_or_rank, rank_dim], np.zeros((fan_in_or_rank, 1), dtype)
        else:
            shapes.setdefault(slot, [0, 0])[1] = rank_or_out
            dims, zeros = [rank_dim, rank_or_out], np.zeros((1, rank_or_out), dtype)
        graph.initializer.append(numpy_helper.from_array(zeros, init.name))  # the default: no adapter
        if init.name not in existing_inputs:
            graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, dims))
    onnx.save_model(model, str(model_file))
    return dict(sorted(shapes.items(), key=lambda kv: _slot_order(kv[0])))


def _slot_order(slot: str):
    parts = slot.split(".")
    return (int(parts[2]), parts[3], parts[4]) if len(parts) >= 5 and parts[2].isdigit() else (0, slot, "")


def graph_lora_slots(model_file: Path) -> dict[str, list[int]]:
    """{slot: [in, out]} read from a graph's LoRA inputs (bundles not made by slmops)."""
    import onnx

    model = onnx.load(str(model_file), load_external_data=False)
    shapes: dict[str, list[int]] = {}
    for value in model.graph.input:
        slot = slot_of_input(value.name)
        if slot is None:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]
        entry = shapes.setdefault(slot, [0, 0])
        if value.name.endswith(".lora_A.MatMul.weight"):
            entry[0] = dims[0]
        else:
            entry[1] = dims[1]
    return shapes


def _set_threads(genai_config: Path, threads: int) -> None:
    # ONNX Runtime GenAI's default thread count leaves decode speed on the table (about 2x here).
    config = json.loads(genai_config.read_text())
    options = config["model"]["decoder"].setdefault("session_options", {})
    options["intra_op_num_threads"] = threads
    # ONNX Runtime warns once per LoRA input at load ("initializer appears in graph inputs"):
    # that is the design here, not a problem; errors are still reported.
    options["log_severity_level"] = 3
    genai_config.write_text(json.dumps(config, indent=4))


# ---- generate-adapter on an existing bundle / convert-adapters ---------------------------
def add_adapters_to_bundle(base_bundle: Path, adapter_paths: list[str], output: Path, adapter_names: list[str] | None = None) -> dict:
    """A new bundle folder sharing the base's files (hard links) plus converted adapters."""
    from slmops.deploy.runtime import read_manifest

    check_writable(output, "--output_path")
    if output.is_dir() and any(output.iterdir()):
        raise OutputError(f"output folder {str(output)!r} is not empty; choose another --output_path or remove it")
    from slmops.deploy.runtime import genai_config

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
                                                        "ranks": lora.ranks, "targets": lora.targets})
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
