"""`slmops auto-opt` (alias `optimize`), `generate-adapter` and `convert-adapters`: ONNX
Runtime GenAI bundles with switchable LoRA adapters. Flags follow Olive's commands."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from slmops.cli.common import setup_logging
from slmops.errors import ConfigError

AUTO_OPT_EXAMPLE = """example (the output of `slmops finetune`, its adapter as a switchable .onnx_adapter):
  slmops auto-opt --model_name_or_path models/tone/ft/model --adapter_path models/tone/ft/adapter \\
    --device cpu --provider CPUExecutionProvider --use_ort_genai --output_path models/tone/onnx --log_level 1
  slmops auto-opt -m models/tone/ft --precision int4 -o models/tone/onnx-int4
"""
GENERATE_ADAPTER_EXAMPLE = """example (one base exported once, one .onnx_adapter per task):
  slmops generate-adapter --base_model_path smollm2-135m-instruct \\
    --adapter_paths models/tone/ft/adapter,models/qa/ft/adapter --output_path models/multi
"""
CONVERT_EXAMPLE = """example:
  slmops convert-adapters --adapter_path models/qa/ft/adapter --base_bundle models/multi \\
    --output_path models/qa.onnx_adapter
"""


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _export_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("export")
    group.add_argument("--output_path", "-o", required=True, help="folder for the bundle (must be new or empty)")
    group.add_argument("--precision", default="fp32", help="fp32, fp16, bf16, int8 or int4 (block-wise weight-only) [default: fp32]")
    group.add_argument("--device", choices=["cpu", "gpu"], default=None, help="target device (must match --provider)")
    group.add_argument("--provider", default="CPUExecutionProvider",
                       help="CPUExecutionProvider, CUDAExecutionProvider, DmlExecutionProvider, WebGpuExecutionProvider [default: CPU]")
    group.add_argument("--int4_block_size", "--block_size", dest="block_size", type=int, default=32,
                       help="int4/int8 quantization block size: 16, 32, 64, 128 or 256 [default: 32]")
    group.add_argument("--int4_accuracy_level", "--accuracy_level", dest="accuracy_level", type=int, default=4,
                       help="MatMulNBits accuracy level: 4 = int8 activations (fastest on CPU), 1 = fp32 activations (closest to fp32) [default: 4]")
    group.add_argument("--quant_algo", default="k_quant", help="int4/int8 weight rounding: k_quant, rtn or default (ORT's RTN) [default: k_quant]")
    group.add_argument("--lora_slots", choices=["auto", "all"], default="auto",
                       help="auto: LoRA slots on the layers the given adapters target; all: on every q/k/v/o/gate/up/down "
                            "projection, so adapters trained later on other layers plug in too [default: auto]")
    group.add_argument("--adapter_names", type=_csv, default=None, help="names of the adapters in the bundle, comma-separated [default: folder names]")
    group.add_argument("--threads", type=int, default=None, help="intra-op threads written to genai_config.json [default: the CPUs available]")
    group.add_argument("--parity_prompts", type=Path, default=None, help="text file, one prompt per line, for the PyTorch-vs-ONNX check")
    group.add_argument("--no_parity", action="store_true", help="skip the PyTorch-vs-ONNX greedy agreement check")
    group.add_argument("--use_ort_genai", action="store_true", help="accepted for Olive compatibility: the output is always an ORT GenAI bundle")
    group.add_argument("--use_model_builder", action="store_true", help="accepted for Olive compatibility: the ORT GenAI model builder is always used")
    group.add_argument("--trust_remote_code", action="store_true", help="allow model code from the model folder")
    group.add_argument("--log_level", type=int, default=1, help="0 debug (shows the model builder's output) ... 4 critical [default: 1]")


def register(subparsers) -> None:
    for name in ("auto-opt", "optimize"):
        parser = subparsers.add_parser(name, help="export to an ONNX Runtime GenAI bundle (fp32/int8/int4), adapters as .onnx_adapter"
                                       + (" (same as auto-opt)" if name == "optimize" else ""),
                                       epilog=AUTO_OPT_EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
        parser.add_argument("--model_name_or_path", "-m", required=True,
                            help="Hugging Face folder, built-in name, Hub id, or an slmops finetune output (its adapter is used)")
        parser.add_argument("--adapter_path", type=_csv, default=None, help="PEFT LoRA adapter folder(s), comma-separated")
        _export_flags(parser)
        parser.set_defaults(handler=run_auto_opt)

    parser = subparsers.add_parser("generate-adapter", help="one base bundle plus one .onnx_adapter per adapter, with a manifest",
                                   epilog=GENERATE_ADAPTER_EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base_model_path", "--model_name_or_path", "-m", dest="base_model_path", required=True,
                        help="the base: a Hugging Face model / built-in / slmops output (exported once), or an existing bundle (its files are shared)")
    parser.add_argument("--adapter_paths", "--adapter_path", dest="adapter_paths", type=_csv, required=True,
                        help="PEFT LoRA adapter folders trained on that base, comma-separated")
    _export_flags(parser)
    parser.set_defaults(handler=run_generate_adapter)

    parser = subparsers.add_parser("convert-adapters", help="a PEFT LoRA adapter -> an .onnx_adapter file",
                                   epilog=CONVERT_EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter_path", required=True, help="PEFT LoRA adapter folder")
    parser.add_argument("--output_path", "-o", required=True, help="the .onnx_adapter file to write")
    parser.add_argument("--base_bundle", type=Path, default=None,
                        help="bundle the adapter will run on: every LoRA slot it has is filled (zeros where the adapter does not reach). "
                             "Without it, only the adapter's own layers are written, which fits a bundle exported with this adapter's targets")
    parser.add_argument("--adapter_format", default="onnx_adapter", choices=["onnx_adapter"], help="output format [default: onnx_adapter]")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16"], help="weight type; match the bundle's activations [default: float32]")
    parser.add_argument("--log_level", type=int, default=1, help="0 debug ... 4 critical [default: 1]")
    parser.set_defaults(handler=run_convert)


def _prompts(path: Path | None) -> list[str]:
    if path is None:
        return []
    if not path.is_file():
        raise ConfigError(f"--parity_prompts file {str(path)!r} does not exist")
    prompts = [line.replace("\\n", "\n") for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ConfigError(f"--parity_prompts file {str(path)!r} holds no prompts")
    return prompts


def _export(args, model: str, adapters: list[str] | None) -> int:
    from slmops.deploy.export import export_bundle, plan_export

    quiet = args.log_level >= 3
    plan = plan_export(model, adapters, args.output_path, args.precision, args.provider, args.device, args.adapter_names,
                       args.block_size, args.accuracy_level, args.lora_slots, args.threads, _prompts(args.parity_prompts),
                       args.trust_remote_code, quiet=quiet, quant_algo=args.quant_algo)
    if not quiet:
        names = ", ".join(n for n, _ in plan.adapters) or "none"
        print(f"exporting {plan.architecture} ({plan.model_given}) to {plan.precision} for {plan.execution_provider}; "
              f"adapters: {names}; LoRA slots on: {', '.join(plan.lora_targets) or 'none'}")
    manifest = export_bundle(plan, quiet=quiet, run_parity=not args.no_parity)
    _print_summary(Path(args.output_path), manifest, quiet)
    return _parity_status(manifest)


def _print_summary(output: Path, manifest: dict, quiet: bool) -> None:
    if quiet:
        return
    print(f"bundle: {output} ({manifest.get('size_mb', '?')} MB, {manifest['precision']}, exported in {manifest.get('export_seconds', '?')} s)")
    for adapter in manifest.get("adapters", []):
        print(f"  adapter {adapter['name']}: {adapter['file']} (rank {','.join(map(str, adapter['ranks']))}, on {', '.join(adapter['targets'])})")
    for name, result in (manifest.get("parity") or {}).items():
        print(f"  parity {name}: {result['exact']}/{result['prompts']} prompts identical to PyTorch, "
              f"{100 * result['token_agreement']:.1f}% tokens agree, max |logit diff| {result['max_logit_diff']:.3g}")
        task = result.get("task_metric")
        if task:
            print(f"    {task['metric']} on {task['rows']} eval rows: PyTorch {task['pytorch']:.4f}, bundle {task['onnx']:.4f} "
                  f"(change {task['change']:+.4f})")


def _parity_status(manifest: dict) -> int:
    """fp32 must agree exactly with PyTorch; quantized bundles report their agreement."""
    parity = manifest.get("parity") or {}
    if manifest["precision"] == "fp32" and any(r["exact"] < r["prompts"] for r in parity.values()):
        print("slmops: error: the fp32 bundle's greedy output differs from PyTorch's on some prompts (see above); "
              "the bundle is kept for inspection", file=sys.stderr)
        return 1
    return 0


def run_auto_opt(args) -> int:
    setup_logging(args.log_level)
    return _export(args, args.model_name_or_path, args.adapter_path)


def run_generate_adapter(args) -> int:
    setup_logging(args.log_level)
    from slmops.deploy.runtime import is_bundle

    if is_bundle(args.base_model_path):
        from slmops.deploy.export import add_adapters_to_bundle

        manifest = add_adapters_to_bundle(Path(args.base_model_path), args.adapter_paths, Path(args.output_path), args.adapter_names)
        _print_summary(Path(args.output_path), manifest, args.log_level >= 3)
        return 0
    return _export(args, args.base_model_path, args.adapter_paths)


def run_convert(args) -> int:
    setup_logging(args.log_level)
    from slmops.deploy.adapters import convert_adapter

    slot_shapes = None
    if args.base_bundle is not None:
        from slmops.deploy.runtime import is_bundle, read_manifest

        if not is_bundle(args.base_bundle):
            raise ConfigError(f"--base_bundle {str(args.base_bundle)!r} is not a bundle (no genai_config.json)")
        slot_shapes = read_manifest(args.base_bundle).get("lora_slots") or None
    output = Path(args.output_path)
    if output.suffix != ".onnx_adapter":
        raise ConfigError(f"--output_path {str(output)!r} should end in .onnx_adapter")
    from slmops.outputs import check_writable

    if output.is_dir():
        raise ConfigError(f"--output_path {str(output)!r} is a folder; give the .onnx_adapter file to write")
    if not output.is_file():  # an existing adapter file is replaced (atomically)
        check_writable(output, "--output_path")
    info = convert_adapter(args.adapter_path, output, slot_shapes, args.dtype)
    if args.log_level < 3:
        print(json.dumps(info))
    return 0
