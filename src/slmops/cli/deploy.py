"""`slmops optimize` (alias `auto-opt`), `generate-adapter` and `convert-adapters`: ONNX
Runtime GenAI bundles with switchable LoRA adapters. Flags follow Olive's commands."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from slmops.cli.common import add_config_flags, config_from_args, setup_logging
from slmops.config import ConvertAdaptersConfig, ExportConfig, GenerateAdapterConfig, ModelExportConfig
from slmops.errors import ConfigError
from slmops.logs import log

OPTIMIZE_EXAMPLE = """examples (the output of `slmops finetune`, its adapter as a switchable .onnx_adapter):
  slmops optimize --model_name_or_path models/tone/ft/model --adapter_path models/tone/ft/adapter \\
    --device cpu --provider CPUExecutionProvider --precision int4 --output_path models/tone/onnx
  slmops optimize -m models/tone/ft --precision int4 -o models/tone/onnx-int4
(`slmops auto-opt`, Olive's earlier name for this command, takes the same flags.)
"""
GENERATE_ADAPTER_EXAMPLE = """example (one base exported once, one .onnx_adapter per task):
  slmops generate-adapter --base_model_path smollm2-135m-instruct \\
    --adapter_paths models/tone/ft/adapter,models/qa/ft/adapter --output_path models/multi
"""
CONVERT_EXAMPLE = """example:
  slmops convert-adapters --adapter_path models/qa/ft/adapter --base_bundle models/multi \\
    --output_path models/qa.onnx_adapter
"""
EXPORT_EXAMPLE = """examples (an slmops finetune output: its adapter is merged into the base):
  slmops export -m models/tone/ft --format merged -o models/tone/merged          # a Hugging Face folder
  slmops export -m models/tone/ft --format gguf --quantization q8_0 -o models/tone/gguf
  ollama create tone -f models/tone/gguf/Modelfile && ollama run tone             # (Ollama, where installed)
  llama-cli -m models/tone/gguf/model-q8_0.gguf -cnv                               # (llama.cpp, where installed)
"""
# Olive's `optimize` flags for NPU and QDQ flows, which ONNX Runtime GenAI bundles do not have:
# accepted as names so the message says what they are, not "unknown flag"
OLIVE_NPU_FLAGS = ("--num_split", "--memory", "--dim_param", "--dim_value", "--use_qdq_format", "--surgeries", "--enable_aot",
                   "--qnn_env_path")


class _NotForBundles(argparse.Action):
    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs="*", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} is Olive's option for NPU (QNN, VitisAI, OpenVINO) model preparation; slmops exports "
                     "ONNX Runtime GenAI bundles for CPU, CUDA, DirectML and WebGPU, which do not use it")


def register(subparsers) -> None:
    for name in ("optimize", "auto-opt"):
        parser = subparsers.add_parser(name, help="export to an ONNX Runtime GenAI bundle (fp32/int8/int4), adapters as .onnx_adapter"
                                       + (" (Olive's earlier name for optimize)" if name == "auto-opt" else ""),
                                       epilog=OPTIMIZE_EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
        parser.add_argument("--dry_run", "--dry-run", action="store_true", help="check everything, print the resolved config and plan, stop")
        add_config_flags(parser, ExportConfig, main_title="export")
        for flag in OLIVE_NPU_FLAGS:
            parser.add_argument(flag, action=_NotForBundles)
        parser.set_defaults(handler=run_optimize)

    parser = subparsers.add_parser("generate-adapter", help="one base bundle plus one .onnx_adapter per adapter, with a manifest",
                                   epilog=GENERATE_ADAPTER_EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_flags(parser, GenerateAdapterConfig, main_title="generate-adapter")
    parser.set_defaults(handler=run_generate_adapter)

    parser = subparsers.add_parser("export", help="the tuned model as a merged Hugging Face folder or a GGUF file for "
                                   "llama.cpp / Ollama (with a Modelfile), checked against PyTorch",
                                   epilog=EXPORT_EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry_run", "--dry-run", action="store_true", help="check the source and the output folder; write nothing")
    add_config_flags(parser, ModelExportConfig, main_title="export")
    parser.set_defaults(handler=run_model_export)

    parser = subparsers.add_parser("convert-adapters", help="a PEFT LoRA adapter -> an .onnx_adapter file",
                                   epilog=CONVERT_EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_flags(parser, ConvertAdaptersConfig, main_title="convert-adapters")
    parser.set_defaults(handler=run_convert)


def _export(config: ExportConfig | GenerateAdapterConfig, dry_run: bool = False) -> int:
    from slmops.config import to_yaml
    from slmops.deploy.export import export_bundle, plan_export

    plan = plan_export(config)
    if dry_run:
        print(to_yaml(config))
        print("# plan")
        print(json.dumps(plan.describe(), indent=2))
        return 0
    names = ", ".join(n for n, _ in plan.adapters) or "none"
    log.info("exporting %s (%s) to %s for %s; adapters: %s; LoRA slots on: %s", plan.architecture, plan.model_given, plan.precision,
             plan.execution_provider, names, ", ".join(plan.lora_targets) or "none")
    manifest = export_bundle(plan)
    _print_summary(Path(config.output_path), manifest, config.log_level)
    return _parity_status(manifest)


def _print_summary(output: Path, manifest: dict, log_level: int) -> None:
    if log_level >= 3:
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


def run_optimize(args) -> int:
    config = config_from_args(ExportConfig, args, cli_only={"dry_run"})
    setup_logging(config.log_level)
    return _export(config, args.dry_run)


def run_generate_adapter(args) -> int:
    config = config_from_args(GenerateAdapterConfig, args)
    setup_logging(config.log_level)
    from slmops.deploy.bundle import is_bundle

    if is_bundle(config.base_model_path):
        from slmops.deploy.export import add_adapters_to_bundle

        manifest = add_adapters_to_bundle(Path(config.base_model_path), config.adapter_paths, Path(config.output_path),
                                          config.adapter_names)
        _print_summary(Path(config.output_path), manifest, config.log_level)
        return 0
    return _export(config)


def run_model_export(args) -> int:
    config = config_from_args(ModelExportConfig, args, cli_only={"dry_run"})
    setup_logging(config.log_level)
    from slmops.deploy.portable import export_portable, plan_portable

    plan = plan_portable(config)
    if args.dry_run:
        print(json.dumps({"format": config.format, "base": str(plan.base), "adapter": str(plan.adapter) if plan.adapter else None,
                          "architecture": plan.architecture, "output": str(plan.output),
                          **({"quantization": config.quantization} if config.format == "gguf" else {})}, indent=2))
        return 0
    summary = export_portable(plan)
    check = summary.get("check") or {}
    what = f"{summary['file']} ({summary['size_mb']} MB, {summary['quantization']}) + Modelfile" if config.format == "gguf" else "merged model"
    print(f"export: {config.output_path}: {what}, in {summary['seconds']} s", file=sys.stderr)
    if check:
        against = "the merged model, read back by transformers" if config.format == "gguf" else "base + adapter in PyTorch"
        print(f"  check against {against}: {check['exact']}/{check['prompts']} prompts identical, "
              f"{100 * check['token_agreement']:.0f}% tokens agree, max |logit diff| {check['max_logit_diff']:.3g}"
              + ("" if check.get("tokenizer_identical", True) else "; the GGUF's tokenizer encodes differently"), file=sys.stderr)
    return 0


def run_convert(args) -> int:
    config = config_from_args(ConvertAdaptersConfig, args)
    setup_logging(config.log_level)
    from slmops.deploy.adapters import convert_adapter
    from slmops.deploy.bundle import is_bundle, read_manifest
    from slmops.outputs import check_writable

    slot_shapes = None
    if config.base_bundle is not None:
        if not is_bundle(config.base_bundle):
            raise ConfigError(f"--base_bundle {config.base_bundle!r} is not a bundle (no genai_config.json)")
        slot_shapes = read_manifest(Path(config.base_bundle)).get("lora_slots") or None
    output = Path(config.output_path)
    if output.is_dir():
        raise ConfigError(f"--output_path {str(output)!r} is a folder; give the .onnx_adapter file to write")
    if not output.is_file():  # an existing adapter file is replaced (atomically)
        check_writable(output, "--output_path")
    info = convert_adapter(config.adapter_path, output, slot_shapes, config.dtype)
    if config.log_level < 3:
        print(json.dumps(info))
    return 0
