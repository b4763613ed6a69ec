"""The base weights an int4/int8 ONNX export will run, as PyTorch tensors.

Quantization-aware LoRA (`slmops finetune --deploy_precision int4`): the adapter trains over
the very weights the bundle's MatMulNBits nodes hold, so adapter and base agree once deployed
(a classifier tuned over the float base lost 6.8 macro-F1 points on TweetEval emotion when its
base went to int4). The weights come from the real export — ONNX Runtime GenAI's model builder
with the options `slmops optimize` uses — read back and dequantized, not from a re-implementation
of its k-quant rounding, so they are exactly what the bundle computes with.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from slmops.errors import ModelError

log = logging.getLogger("slmops")

# the builder's fused MatMuls -> the model's projections they hold, rows in this order
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
_NAME = re.compile(r"^model\.layers\.(\d+)\.\w+\.(\w+)\.MatMul\.weight_Q\d+G\d+$")


def export_settings(precision: str) -> dict:
    """The quantization settings `slmops optimize --precision P` uses by default: what the
    adapter is trained against, recorded in run.yaml and compared at export."""
    from slmops.config import ExportConfig

    return ExportConfig(model_name_or_path="-", output_path="-", precision=precision).weight_quantization()


def quantized_weights(model_path: Path, precision: str, lora_targets: list[str] | str | None = None,
                      trust_remote_code: bool = False) -> dict[str, np.ndarray]:
    """{ONNX weight name: dequantized [out, in] weight} for every weight the `precision` export
    of `model_path` quantizes (the decoder's linear layers, the output head, a separate
    quantized embedding); `torch_names` puts them under the model's own names. `lora_targets`:
    the adapter's target modules (or "all-linear"), whose LoRA slots the deployed bundle will
    have: they change the graph's layout (q/k/v unfused) and so which weights the mixed
    int4/int8 strategy keeps at int8."""
    from slmops.config import ExportConfig
    from slmops.deploy.adapters import SUPPORTED_TARGETS
    from slmops.deploy.export import export_bundle, plan_export

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="slmops-quantized-base-") as scratch:
        options = ExportConfig(model_name_or_path=str(model_path), output_path=str(Path(scratch) / "bundle"), precision=precision,
                               trust_remote_code=trust_remote_code, no_parity=True)
        plan = plan_export(options)
        if lora_targets:  # slots as `slmops optimize` makes them for an adapter on these modules
            available = {module.rsplit(".", 1)[-1] for module in plan.linear_shapes} & set(SUPPORTED_TARGETS)
            wanted = available if lora_targets == "all-linear" else {t.rsplit(".", 1)[-1] for t in lora_targets} & available
            plan = dataclasses.replace(plan, lora_targets=sorted(wanted))
        export_bundle(plan, run_parity=False)
        weights = read_quantized_weights(Path(scratch) / "bundle" / "model.onnx")
    log.info("quantization-aware: the %s export's weights of %d layers read back in %.0f s", precision, len(weights),
             time.perf_counter() - started)
    return weights


def read_quantized_weights(model_file: Path) -> dict[str, np.ndarray]:
    """{ONNX weight name: dequantized [out, in] float32 array} of every MatMulNBits in the graph,
    and of a block-quantized embedding with weights of its own ("embed_tokens" key; one that reads
    the output head's weights, as tied models do, is the head's)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(model_file))
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    weights = {}
    for node in model.graph.node:
        # MatMulNBits(x, weight, scales, zero points); GatherBlockQuantized(weight, ids, scales, zero points)
        first = {"MatMulNBits": 1, "GatherBlockQuantized": 0}.get(node.op_type)
        if first is None or node.input[first] not in initializers:  # (a tied embedding reads the head's weight)
            continue
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        packed, scales = numpy_helper.to_array(initializers[node.input[first]]), numpy_helper.to_array(initializers[node.input[2]])
        zero_points = numpy_helper.to_array(initializers[node.input[3]]) if len(node.input) > 3 and node.input[3] else None
        if node.op_type == "MatMulNBits":
            name, k, n = node.input[1], attributes["K"], attributes["N"]
        else:
            name, k, n = "embed_tokens", scales.shape[-1] * attributes["block_size"], packed.shape[0]
        weights[name] = dequantize_nbits(packed, scales, zero_points, attributes["bits"], attributes["block_size"], k, n)
    return weights


def dequantize_nbits(packed: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, bits: int, block_size: int,
                     k: int, n: int) -> np.ndarray:
    """MatMulNBits' weight as float32 [N, K]: (q - zero point) * scale per block of K.
    `packed` is [N, blocks, block_size * bits / 8] with the low bits first; zero points are packed
    the same way per row (absent: the middle of the range)."""
    blocks = -(-k // block_size)
    q = _unpack(packed.reshape(n, -1), bits).reshape(n, blocks, block_size).astype(np.float32)
    if zero_points is None:
        zp = np.full((n, blocks), 2 ** (bits - 1), dtype=np.float32)
    else:
        zp = _unpack(zero_points.reshape(n, -1), bits)[:, :blocks].astype(np.float32)
    w = (q - zp[..., None]) * scales.reshape(n, blocks).astype(np.float32)[..., None]
    return w.reshape(n, blocks * block_size)[:, :k]


def _unpack(data: np.ndarray, bits: int) -> np.ndarray:
    if bits == 8:
        return data
    if bits != 4:
        raise ModelError(f"a {bits}-bit MatMulNBits weight: only 4 and 8 bits are read")
    low, high = data & 0x0F, data >> 4
    return np.stack([low, high], axis=-1).reshape(data.shape[0], -1)


def torch_names(onnx_weights: dict[str, np.ndarray], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The dequantized weights under the model's module names ("model.layers.3.attn.q_proj..." in
    the builder's naming is the model's layer 3 linear `q_proj`; "lm_head" the output head,
    "embed_tokens" the input embedding)."""
    linears = {name: module for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear) or name.endswith("embed_tokens")}
    by_layer: dict[tuple[str, str], str] = {}
    for name in linears:
        found = re.search(r"layers\.(\d+)\..*?(\w+)$", name)
        if found:
            by_layer[(found.group(1), found.group(2))] = name
    named, unknown = {}, []
    for onnx_name, weight in onnx_weights.items():
        if onnx_name.startswith("lm_head.") or onnx_name == "embed_tokens":
            end = "lm_head" if onnx_name.startswith("lm_head.") else "embed_tokens"
            parts = [(next((name for name in linears if name.endswith(end)), None), weight)]
        else:
            found = _NAME.match(onnx_name)
            layer, projection = found.groups() if found else (None, None)
            if (layer, projection) in by_layer or projection not in FUSED:
                parts = [(by_layer.get((layer, projection)), weight)]
            else:  # one MatMul for several of the model's projections: their rows in order
                targets = [by_layer.get((layer, p)) for p in FUSED[projection]]
                rows = [linears[t].weight.shape[0] if t else 0 for t in targets]
                parts = list(zip(targets, np.split(weight, np.cumsum(rows)[:-1]))) if None not in targets else [(None, weight)]
        for target, part in parts:
            if target is None or tuple(linears[target].weight.shape) != part.shape:
                unknown.append(onnx_name)
                break
            named[target] = torch.from_numpy(np.ascontiguousarray(part))
    if unknown:
        raise ModelError(f"quantization-aware training: the export's weights {', '.join(unknown[:3])}{' ...' if len(unknown) > 3 else ''} "
                         "match no linear layer of this model (the builder lays this architecture out differently); train without "
                         "--deploy_precision")
    return named


@torch.no_grad()
def load_quantized_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> int:
    """Copy the dequantized weights (torch_names) into the model's modules. A tied embedding
    follows the output head, as the bundle's embedding reads the head's quantized weights."""
    modules = dict(model.named_modules())
    for name, weight in weights.items():
        modules[name].weight.copy_(weight.to(modules[name].weight.dtype))
    return len(weights)
