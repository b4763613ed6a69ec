"""Inference speed on the built-in SmolLM2-135M-Instruct: transformers fp32 and bf16 against
the ONNX Runtime GenAI bundle slmops exports (fp32 and int4), batch 1, greedy.

Every row generates exactly --new_tokens tokens for the same chat prompts; rows alternate
over --rounds so machine noise hits them alike. Time to first token (prompt processing +
one token) and decode tokens/s (the rest) are medians over all prompts and rounds.

    python benchmarks/inference.py                   # ~3 minutes on 2 cores (exports included)
    python benchmarks/inference.py --rounds 1 --new_tokens 32

Ends with `ratio_decode_onnx_int4_vs_torch_fp32: X` style lines for scripts.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a bicycle stays upright while moving.",
    "List some good habits for writing clean Python code, with a sentence on each.",
    "Describe the water cycle to a ten-year-old.",
]


def torch_row(model_path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).eval()

    @torch.no_grad()
    def run(ids: list[int], new_tokens: int) -> tuple[float, float]:
        tensor = torch.tensor([ids])
        start = time.perf_counter()
        model.generate(input_ids=tensor, attention_mask=torch.ones_like(tensor), max_new_tokens=1, do_sample=False,
                       pad_token_id=tokenizer.eos_token_id)
        ttft = time.perf_counter() - start
        start = time.perf_counter()
        model.generate(input_ids=tensor, attention_mask=torch.ones_like(tensor), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        total = time.perf_counter() - start
        return ttft, (new_tokens - 1) / max(total - ttft, 1e-9)

    return run


def onnx_row(bundle_path: Path, threads: int, adapter: str | None = None):
    from slmops.inference.onnx_backend import OnnxBackend

    bundle = OnnxBackend(bundle_path, [adapter] if adapter else [], threads)

    def run(ids: list[int], new_tokens: int) -> tuple[float, float]:
        timing = bundle.timed(ids, adapter or "base", new_tokens)
        assert timing["tokens"] == new_tokens, timing
        return timing["ttft_s"], timing["decode_tokens_per_s"]

    return run


def export(model_path: Path, out: Path, precision: str, adapter: Path | None = None) -> float:
    from slmops.config import ExportConfig
    from slmops.deploy.export import export_bundle, plan_export

    started = time.perf_counter()
    config = ExportConfig(model_name_or_path=str(model_path), adapter_path=[str(adapter)] if adapter else None, output_path=str(out),
                          precision=precision, adapter_names=["task"] if adapter else None, no_parity=True)
    export_bundle(plan_export(config))
    return time.perf_counter() - started


def random_adapter(model_path: Path, out: Path) -> Path:
    """A LoRA r=16 on q/k/v/o with random weights: what a tuned adapter costs at run time."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_path)
    config = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(out)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="threads for both back ends [default: the CPUs available]")
    args = parser.parse_args()

    from slmops.inference.onnx_backend import default_threads
    from slmops.models.builtin import fetch_builtin

    threads = args.threads or default_threads()
    torch.set_num_threads(threads)
    model_path = fetch_builtin("smollm2-135m-instruct")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True) for p in PROMPTS]
    prompts = [p["input_ids"] if hasattr(p, "keys") else p for p in prompts]

    with tempfile.TemporaryDirectory() as tmp:
        sizes, export_s = {}, {}
        for precision in ("fp32", "int4"):
            out = Path(tmp) / precision
            export_s[precision] = export(model_path, out, precision)
            sizes[precision] = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20
        adapter = random_adapter(model_path, Path(tmp) / "adapter")
        export(model_path, Path(tmp) / "int4_lora", "int4", adapter)
        rows = {
            "torch_fp32": torch_row(model_path, torch.float32),
            "torch_bf16": torch_row(model_path, torch.bfloat16),
            "onnx_fp32": onnx_row(Path(tmp) / "fp32", threads),
            "onnx_int4": onnx_row(Path(tmp) / "int4", threads),
            # the multi-adapter graph (LoRA slots as inputs) with an r=16 adapter switched on
            "onnx_int4_lora_r16": onnx_row(Path(tmp) / "int4_lora", threads, "task"),
        }
        for run in rows.values():  # warm-up: first calls allocate and pack weights
            run(prompts[0][:16], 4)
        results: dict[str, dict[str, list[float]]] = {name: {"ttft": [], "decode": []} for name in rows}
        for round_index in range(args.rounds):
            for name, run in rows.items():
                for ids in prompts:
                    ttft, decode = run(ids, args.new_tokens)
                    results[name]["ttft"].append(ttft)
                    results[name]["decode"].append(decode)
            print(f"round {round_index + 1}/{args.rounds} done", file=sys.stderr)

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    base = {k: statistics.median(results["torch_fp32"][k]) for k in ("ttft", "decode")}
    print(f"\nSmolLM2-135M-Instruct, batch 1, greedy, {args.new_tokens} new tokens, {len(PROMPTS)} chat prompts "
          f"({min(map(len, prompts))}-{max(map(len, prompts))} tokens) x {args.rounds} rounds, {threads} threads; "
          f"torch {torch.__version__}; process peak RSS {peak:.0f} MB")
    print(f"bundle sizes: fp32 {sizes['fp32']:.0f} MB (export {export_s['fp32']:.0f} s), int4 {sizes['int4']:.0f} MB (export {export_s['int4']:.0f} s)\n")
    print("| row | decode tokens/s | time to first token ms | decode vs torch_fp32 | TTFT vs torch_fp32 |")
    print("| --- | ---: | ---: | ---: | ---: |")
    ratios = {}
    for name, values in results.items():
        decode, ttft = statistics.median(values["decode"]), statistics.median(values["ttft"])
        ratios[name] = (decode / base["decode"], base["ttft"] / ttft)
        print(f"| {name} | {decode:.1f} | {1000 * ttft:.1f} | {ratios[name][0]:.2f}x | {ratios[name][1]:.2f}x |")
    print()
    for name in ("torch_bf16", "onnx_fp32", "onnx_int4", "onnx_int4_lora_r16"):
        print(f"ratio_decode_{name}_vs_torch_fp32: {ratios[name][0]:.2f}")
        print(f"ratio_ttft_{name}_vs_torch_fp32: {ratios[name][1]:.2f}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
