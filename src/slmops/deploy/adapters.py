"""LoRA slots: the one naming scheme shared by export, adapter conversion and the ONNX back
end; the PEFT -> `.onnx_adapter` conversion; and the graph helpers that turn LoRA weights into
graph inputs (`make_lora_inputs`) and read them back (`graph_lora_slots`).

A bundle's graph has, for every targeted linear layer, two float inputs

    model.layers.{i}.{attn|mlp}.{proj}.lora_A.MatMul.weight   [in_features, rank]
    model.layers.{i}.{attn|mlp}.{proj}.lora_B.MatMul.weight   [rank, out_features]

(the names ONNX Runtime GenAI's model builder gives LoRA MatMuls, which Olive uses too),
with a rank-1 zero default, so the graph runs as the plain base model when no adapter is
active. An `.onnx_adapter` holds a value for every slot of the bundle — the adapter's own
A^T and (scaling * B)^T where it targets the layer, zeros where it does not — because ONNX
Runtime re-uses input buffers across requests and a missing slot fails with "Shape mismatch
attempting to re-use buffer". Fused layers (Phi-3's qkv_proj and gate_up_proj) are split
into the q/k/v and gate/up slots the builder emits: A is shared, B is cut by rows.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from slmops.errors import ModelError

_SLOT_SUFFIX_A = ".lora_A.MatMul.weight"
_SLOT_SUFFIX_B = ".lora_B.MatMul.weight"
_MODULE_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.(self_attn|attn|mlp)\.([A-Za-z0-9_]+)$")
_BLOCKS = {"self_attn": "attn", "attn": "attn", "mlp": "mlp"}
PLAIN_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FUSED_PROJECTIONS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
SUPPORTED_TARGETS = (*PLAIN_PROJECTIONS, *FUSED_PROJECTIONS)


def slot_inputs(slot: str) -> tuple[str, str]:
    """Graph input names (A, B) of a slot such as 'model.layers.0.attn.q_proj'."""
    return slot + _SLOT_SUFFIX_A, slot + _SLOT_SUFFIX_B


def slot_of_input(name: str) -> str | None:
    for suffix in (_SLOT_SUFFIX_A, _SLOT_SUFFIX_B):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None


def slots_for_module(module_key: str) -> tuple[str, list[str]]:
    """('model.layers.3.attn', ['q_proj']) for '...layers.3.self_attn.q_proj'."""
    match = _MODULE_RE.search(module_key)
    if not match or match.group(3) not in SUPPORTED_TARGETS:
        raise ModelError(
            f"LoRA on {module_key!r} cannot be deployed as an ONNX adapter: adapters may target the decoder layers' "
            f"{', '.join(SUPPORTED_TARGETS)}. Merge this adapter into the model instead (`slmops auto-opt` without "
            "--adapter_path on the merged model)"
        )
    layer, block, proj = match.groups()
    prefix = f"model.layers.{layer}.{_BLOCKS[block]}"
    return prefix, list(FUSED_PROJECTIONS.get(proj, (proj,)))


@dataclass
class PeftLora:
    """A PEFT LoRA adapter read from disk: per module, A [r, in] and B [out, r] with the
    scaling the adapter applies."""

    path: Path
    config: dict
    modules: dict[str, tuple[np.ndarray, np.ndarray, float]]

    @property
    def targets(self) -> list[str]:
        return sorted({key.rsplit(".", 1)[-1] for key in self.modules})

    @property
    def ranks(self) -> list[int]:
        return sorted({a.shape[0] for a, _, _ in self.modules.values()})


def read_peft_lora(adapter_path: str | Path) -> PeftLora:
    """Read and check a PEFT adapter folder; only what ONNX LoRA slots can express passes."""
    path = Path(adapter_path)
    config_file = path / "adapter_config.json"
    if not config_file.is_file():
        raise ModelError(f"adapter path {str(path)!r} holds no adapter_config.json (not a PEFT adapter)")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise ModelError(f"{config_file} is not valid JSON ({exc})") from None
    kind = config.get("peft_type")
    if kind != "LORA":
        raise ModelError(f"adapter {str(path)!r} is {kind}, not LoRA: only LoRA/QLoRA adapters become ONNX adapters. "
                         "Merge it into the model and export the merged model instead")
    for flag, what in (("use_dora", "DoRA"), ("lora_bias", "a LoRA bias"), ("fan_in_fan_out", "fan_in_fan_out (GPT-2 Conv1D)")):
        if config.get(flag):
            raise ModelError(f"adapter {str(path)!r} uses {what}, which ONNX LoRA slots cannot express: merge it into the "
                             "model and export the merged model instead")
    if config.get("modules_to_save"):
        raise ModelError(f"adapter {str(path)!r} also trains whole modules ({config['modules_to_save']}), which a LoRA slot "
                         "cannot carry: merge it into the model and export the merged model instead")
    weights = _read_weights(path)
    from peft.utils.other import get_pattern_key

    alpha_pattern = config.get("alpha_pattern") or {}
    modules: dict[str, tuple[np.ndarray, np.ndarray, float]] = {}
    for key, a in weights.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removesuffix(".lora_A.weight").removeprefix("base_model.model.")
        b = weights.get(key.replace(".lora_A.weight", ".lora_B.weight"))
        if b is None:
            raise ModelError(f"adapter {str(path)!r} has {key} but no matching lora_B weight (corrupt adapter file)")
        rank = a.shape[0]
        alpha = alpha_pattern.get(get_pattern_key(list(alpha_pattern), module), config.get("lora_alpha", 8))
        scaling = alpha / (rank**0.5) if config.get("use_rslora") else alpha / rank
        modules[module] = (a, b, float(scaling))
    if not modules:
        raise ModelError(f"adapter {str(path)!r} holds no LoRA weights")
    return PeftLora(path, config, modules)


def _read_weights(path: Path) -> dict[str, np.ndarray]:
    safetensors_file, bin_file = path / "adapter_model.safetensors", path / "adapter_model.bin"
    try:
        if safetensors_file.is_file():
            from safetensors.numpy import load_file

            try:
                return {k: v.astype(np.float32) for k, v in load_file(safetensors_file).items()}
            except TypeError:  # bf16 tensors have no NumPy dtype: go through torch
                from safetensors.torch import load_file as load_torch

                return {k: v.float().numpy() for k, v in load_torch(safetensors_file).items()}
        if bin_file.is_file():
            import torch

            return {k: v.float().numpy() for k, v in torch.load(bin_file, map_location="cpu", weights_only=True).items()}
    except Exception as exc:
        raise ModelError(f"could not read the adapter weights in {str(path)!r} ({type(exc).__name__}: {exc}); the file is corrupt or truncated") from None
    raise ModelError(f"adapter {str(path)!r} has no adapter_model.safetensors or adapter_model.bin")


def lora_slots(lora: PeftLora, slot_shapes: dict[str, list[int]] | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The adapter's own slots: {slot: (A^T [in, r], scaling * B^T [r, out])}.

    `slot_shapes` ({slot: [in, out]}, from a bundle) is needed to split fused layers."""
    slots: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for module, (a, b, scaling) in lora.modules.items():
        prefix, projections = slots_for_module(module)
        b_scaled = (b * scaling).astype(np.float32)
        if len(projections) == 1:
            slots[f"{prefix}.{projections[0]}"] = (np.ascontiguousarray(a.T), np.ascontiguousarray(b_scaled.T))
            continue
        names = [f"{prefix}.{p}" for p in projections]
        if slot_shapes is None or any(n not in slot_shapes for n in names):
            raise ModelError(f"adapter {str(lora.path)!r} targets the fused layer {module}; converting it needs the base "
                             "bundle's slot sizes: pass --base_bundle (a folder made by `slmops auto-opt`)")
        start = 0
        for name in names:
            rows = slot_shapes[name][1]
            slots[name] = (np.ascontiguousarray(a.T), np.ascontiguousarray(b_scaled[start : start + rows].T))
            start += rows
        if start != b.shape[0]:
            raise ModelError(f"adapter {str(lora.path)!r}: {module} is {b.shape[0]} wide but the bundle's slots add up to {start} (trained on another base)")
    return slots


def fill_for_bundle(slots: dict[str, tuple[np.ndarray, np.ndarray]], slot_shapes: dict[str, list[int]], source: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every slot of the bundle, zeros where the adapter does not reach; clear errors where
    the adapter does not fit the bundle."""
    extra = sorted(set(slots) - set(slot_shapes))
    if extra:
        raise ModelError(
            f"adapter {source!r} targets layers the base bundle has no LoRA slot for ({', '.join(extra[:4])}"
            f"{' ...' if len(extra) > 4 else ''}): export the base with this adapter among its --adapter_path "
            "(or with --lora_slots all)"
        )
    rank = max(a.shape[1] for a, _ in slots.values()) if slots else 1
    filled = {}
    for slot, (fan_in, fan_out) in slot_shapes.items():
        if slot in slots:
            a, b = slots[slot]
            if a.shape[0] != fan_in or b.shape[1] != fan_out:
                raise ModelError(f"adapter {source!r} does not fit the base bundle: {slot} is [{a.shape[0]} -> {b.shape[1]}] "
                                 f"in the adapter and [{fan_in} -> {fan_out}] in the bundle (trained on another base)")
            filled[slot] = (a, b)
        else:
            filled[slot] = (np.zeros((fan_in, rank), np.float32), np.zeros((rank, fan_out), np.float32))
    return filled


def write_onnx_adapter(slots: dict[str, tuple[np.ndarray, np.ndarray]], output: Path, dtype: str = "float32") -> Path:
    """Write ONNX Runtime's adapter format (readable by onnxruntime.LoraAdapter and
    onnxruntime_genai.Adapters), atomically."""
    import onnxruntime as ort

    np_dtype = {"float32": np.float32, "float16": np.float16}[dtype]
    params = {}
    for slot, (a, b) in slots.items():
        name_a, name_b = slot_inputs(slot)
        params[name_a] = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a.astype(np_dtype)))
        params[name_b] = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(b.astype(np_dtype)))
    adapter = ort.AdapterFormat()
    adapter.set_adapter_version(1)
    adapter.set_model_version(1)
    adapter.set_parameters(params)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    staged = output.with_name(output.name + ".partial")
    adapter.export_adapter(str(staged))
    staged.replace(output)
    return output


def read_onnx_adapter(path: Path) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    if not Path(path).is_file():
        raise ModelError(f"adapter file {str(path)!r} does not exist")
    try:
        adapter = ort.AdapterFormat.read_adapter(str(path))
    except Exception as exc:
        raise ModelError(f"{str(path)!r} is not a readable .onnx_adapter file ({exc})") from None
    return {name: value.numpy() for name, value in adapter.get_parameters().items()}


def check_adapter_file(path: Path, slot_shapes: dict[str, list[int]]) -> None:
    """An .onnx_adapter must fill every slot of the bundle with fitting shapes."""
    params = read_onnx_adapter(path)
    expected = {name for slot in slot_shapes for name in slot_inputs(slot)}
    missing, extra = sorted(expected - set(params)), sorted(set(params) - expected)
    if missing or extra:
        detail = (f"missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}" if missing else
                  f"unknown inputs {', '.join(extra[:3])}{' ...' if len(extra) > 3 else ''}")
        raise ModelError(f"adapter file {str(path)!r} does not match this bundle's LoRA slots ({detail}): convert it with "
                         "`slmops convert-adapters --adapter_path PEFT_DIR --base_bundle THIS_BUNDLE`")
    for slot, (fan_in, fan_out) in slot_shapes.items():
        name_a, name_b = slot_inputs(slot)
        if params[name_a].shape[0] != fan_in or params[name_b].shape[1] != fan_out:
            raise ModelError(f"adapter file {str(path)!r} does not fit this bundle at {slot} (trained on another base)")


def convert_adapter(adapter_path: str | Path, output: Path, slot_shapes: dict[str, list[int]] | None = None, dtype: str = "float32") -> dict:
    """PEFT LoRA folder -> .onnx_adapter. With a bundle's slot shapes, every slot is filled."""
    lora = read_peft_lora(adapter_path)
    slots = lora_slots(lora, slot_shapes)
    if slot_shapes is not None:
        slots = fill_for_bundle(slots, slot_shapes, str(adapter_path))
    write_onnx_adapter(slots, Path(output), dtype)
    return {"source": str(adapter_path), "file": str(output), "ranks": lora.ranks, "targets": lora.targets,
            "slots": len(slots)}


# ---- LoRA slots in a graph ---------------------------------------------------------------
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
