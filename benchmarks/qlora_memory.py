"""QLoRA vs LoRA memory and speed where 4-bit pays: a 1B-parameter Llama.

No 1B model ships through the package index, so this builds one with Llama 3.2 1B's
layer shapes (hidden 2048, MLP 8192, 16 layers, GQA 32/8 heads) and the built-in
tokenizer, with random weights saved in bf16 — memory and speed depend on the shapes,
not on the values. Then it fine-tunes it for a few steps with slmops `--method lora`
(bf16 base) and `--method qlora` (NF4 base), each in its own process, and reports peak
RSS and step time. On SmolLM2-135M the same comparison favours LoRA (see README).

    python benchmarks/qlora_memory.py            # ~5 minutes on 2 cores, ~6 GB of RAM
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TONE = ROOT / "examples" / "data" / "tone.jsonl"


def build_model(out: Path) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from slmops.models.builtin import fetch_builtin

    tokenizer = AutoTokenizer.from_pretrained(fetch_builtin("smollm2-135m-instruct"))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True, max_position_embeddings=2048,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    with torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def worker(method: str, model_dir: str, steps: int, out: str) -> None:
    from slmops.config import from_dict
    from slmops.finetune_recipe import finetune
    from slmops.train.monitor import read_metrics

    with tempfile.TemporaryDirectory() as tmp:
        cfg = from_dict({"model": {"model_name_or_path": model_dir},
                         "data": {"data_name": str(TONE), "train_split": "train[:64]", "text_template": "Phrase: {phrase}\nTone: {tone}"},
                         "method": {"method": method},
                         "training": {"max_steps": steps, "per_device_train_batch_size": 4, "logging_steps": 1, "report_to": "none",
                                      "save_steps": 10**9},
                         "output_path": str(Path(tmp) / "o")})
        finetune(cfg)
        memory = _proc_memory_mb()
        records = [r for r in read_metrics(Path(tmp) / "o" / "logs" / "metrics.jsonl") if r["split"] == "train"]
    Path(out).write_text(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                                     "anon_mb": memory["RssAnon"], "file_mb": memory["RssFile"],
                                     "step_seconds": [r["step_seconds"] for r in records[1:]]}))


def _proc_memory_mb() -> dict[str, float]:
    """Resident memory split into anonymous (the process's own tensors) and file-backed
    (memory-mapped safetensors pages, which the kernel can drop) — peak RSS alone counts
    a mapped checkpoint as if it were held."""
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("RssAnon", "RssFile"):
            values[key] = int(rest.split()[0]) / 1024
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model_dir", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.model_dir, args.steps, args.out)
        return
    with tempfile.TemporaryDirectory() as tmp:
        n_params = build_model(Path(tmp) / "llama-1b")
        results = {}
        for method in ("lora", "qlora"):
            with tempfile.NamedTemporaryFile(suffix=".json") as out:
                subprocess.run([sys.executable, __file__, "--worker", method, "--model_dir", str(Path(tmp) / "llama-1b"),
                                "--steps", str(args.steps), "--out", out.name], check=True)
                results[method] = json.loads(Path(out.name).read_text())
    print(f"\nLlama-3.2-1B-shaped model, {n_params / 1e9:.2f}B parameters, batch 4 of tone phrases")
    print(f"{'method':8s} {'peak RSS MB':>11s} {'anon MB at end':>14s} {'mapped file MB':>14s} {'step median s':>13s}")
    for method, r in results.items():
        steps = sorted(r["step_seconds"])
        print(f"{method:8s} {r['peak_rss_mb']:11.0f} {r['anon_mb']:14.0f} {r['file_mb']:14.0f} {steps[len(steps) // 2]:13.2f}")
    print(f"qlora_vs_lora_peak_rss: {results['qlora']['peak_rss_mb'] / results['lora']['peak_rss_mb']:.2f}")
    resident = {m: r["anon_mb"] + r["file_mb"] for m, r in results.items()}
    print(f"resident while training (anon + mapped): lora {resident['lora']:.0f} MB, qlora {resident['qlora']:.0f} MB")
    print(f"qlora_vs_lora_resident: {resident['qlora'] / resident['lora']:.2f}")


if __name__ == "__main__":
    main()
