"""Training throughput on a CPU (or GPU): slmops vs Hugging Face TRL SFTTrainer + PEFT.

Same work for every row: the built-in SmolLM2-135M-Instruct, the shipped tone data in chat
form with the loss on the assistant's answer only, LoRA r=16 alpha=32 dropout 0.05 on
q/k/v/o, batch 8, max length 128, AdamW lr 2e-4. Each row runs in its own process (clean
peak RSS), rows alternate over --rounds, and the first --warmup steps are not timed.

    .venv/bin/pip install -c constraints.txt -r benchmarks/requirements.txt
    python benchmarks/train_throughput.py                 # ~17 minutes a round on 2 cores (TRL rows are slow)
    python benchmarks/train_throughput.py --steps 20 --rounds 1 --rows slmops,trl_fp32

Prints a table and ends with `ratio_vs_trl_fp32: X` and `ratio_vs_trl_bf16: Y`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TONE = ROOT / "examples" / "data" / "tone.jsonl"
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
BATCH, MAX_LEN, LR = 8, 128, 2e-4

# row name -> (runner, options); peers first so the table reads against them
ROWS = {
    "trl_fp32": ("trl", {"bf16": False}),  # TRL's CPU defaults, fp32 (gradient checkpointing on, as its default)
    "trl_bf16": ("trl", {"bf16": True}),  # TRL's CPU defaults: bf16 autocast + gradient checkpointing
    "trl_bf16_nogc": ("trl", {"bf16": True, "gradient_checkpointing": False}),  # TRL's best flags here
    "slmops": ("slmops", {}),
    "slmops_fp32": ("slmops", {"bf16": False}),
    # QLoRA (4-bit NF4 base via bitsandbytes) and full fine-tuning, each against its own peer
    "trl_qlora": ("trl", {"bf16": True, "gradient_checkpointing": False, "method": "qlora"}),
    "slmops_qlora": ("slmops", {"method": "qlora"}),
    "trl_full": ("trl", {"bf16": True, "gradient_checkpointing": False, "method": "full"}),
    "slmops_full": ("slmops", {"method": "full"}),
}
FULL_LR = 2e-5


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


EVAL_ROWS = 64  # the last rows: a fixed held-out set, scored after training by every row


def rows_as_chat() -> list[dict]:
    rows = [json.loads(line) for line in TONE.read_text().splitlines()]
    return [{"phrase": r["phrase"], "tone": r["tone"]} for r in rows]


def messages(r: dict) -> dict:
    return {"messages": [{"role": "user", "content": r["phrase"]}, {"role": "assistant", "content": r["tone"]}]}


# -- workers (each in its own process) ------------------------------------------------------


def run_slmops(model_dir: str, steps: int, warmup: int, options: dict, seed: int) -> dict:
    from slmops.config import from_dict
    from slmops.finetune_recipe import finetune
    from slmops.train.monitor import read_metrics

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "chat.jsonl"
        data.write_text("".join(json.dumps(messages(r)) + "\n" for r in rows_as_chat()))
        options = dict(options)
        method = options.pop("method", "lora")
        cfg = from_dict({
            "model": {"model_name_or_path": model_dir},
            "data": {"data_name": str(data), "max_seq_len": MAX_LEN, "train_split": f"train[:-{EVAL_ROWS}]",
                     "eval_split": f"train[-{EVAL_ROWS}:]"},
            "method": {"method": method, "lora_r": LORA["r"], "lora_alpha": LORA["lora_alpha"],
                       "lora_dropout": LORA["lora_dropout"], "target_modules": LORA["target_modules"] if method != "full" else None},
            "training": {"max_steps": warmup + steps, "per_device_train_batch_size": BATCH,
                         "learning_rate": FULL_LR if method == "full" else LR,
                         "logging_steps": 1, "report_to": "none", "save_steps": 10**9, "seed": seed,
                         "eval_steps": warmup + steps, "early_stopping_patience": 0, "per_device_eval_batch_size": BATCH, **options},
            "output_path": str(Path(tmp) / "out"),
        })
        result = finetune(cfg)
        logged = read_metrics(Path(tmp) / "out" / "logs" / "metrics.jsonl")
        records = [r for r in logged if r["split"] == "train"]
        eval_loss = [r["loss"] for r in logged if r["split"] == "eval"][-1]
    timed = records[warmup:]
    return {
        "step_seconds": [r["step_seconds"] for r in timed],
        "tokens": [r["tokens_per_second"] * r["step_seconds"] for r in timed],
        "losses": [r["loss"] for r in records],
        "eval_loss": eval_loss,
        "precision": {"lora": "bf16 base + fp32 LoRA", "qlora": "nf4 base + bf16 compute", "full": "fp32 master + bf16 autocast"}[method]
        if options.get("bf16", True) else "fp32",
        "fast_loss": result.train.fast_loss,
    }


def run_trl(model_dir: str, steps: int, warmup: int, options: dict, seed: int) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    step_seconds: list[float] = []
    tokens: list[int] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            step_seconds.append(time.perf_counter() - self.start)

    pairs = [{"prompt": [{"role": "user", "content": r["phrase"]}], "completion": [{"role": "assistant", "content": r["tone"]}]}
             for r in rows_as_chat()]
    data, held_out = Dataset.from_list(pairs[:-EVAL_ROWS]), Dataset.from_list(pairs[-EVAL_ROWS:])
    options = dict(options)
    method = options.pop("method", "lora")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if method == "qlora":  # the usual TRL QLoRA recipe: bitsandbytes NF4 base, PEFT LoRA
        from peft import prepare_model_for_kbit_training
        from transformers import BitsAndBytesConfig

        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quant, device_map="cpu")
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with tempfile.TemporaryDirectory() as tmp:
        args = SFTConfig(output_dir=tmp, use_cpu=not torch.cuda.is_available(), max_steps=warmup + steps,
                         per_device_train_batch_size=BATCH, learning_rate=FULL_LR if method == "full" else LR, logging_steps=1,
                         save_strategy="no", report_to="none", max_length=MAX_LEN, completion_only_loss=True, seed=seed, **options)
        trainer = SFTTrainer(model=model, args=args, train_dataset=data, eval_dataset=held_out, processing_class=tokenizer,
                             peft_config=None if method == "full" else LoraConfig(task_type="CAUSAL_LM", **LORA), callbacks=[Timer()])
        collator = trainer.data_collator

        def counting_collator(features):
            batch = collator(features)
            tokens.append(int(batch["attention_mask"].sum()) if "attention_mask" in batch else int(batch["input_ids"].numel()))
            return batch

        trainer.data_collator = counting_collator
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        trainer.data_collator = collator  # not counted: evaluation is not training throughput
        eval_loss = trainer.evaluate()["eval_loss"]
    return {"step_seconds": step_seconds[warmup:], "tokens": tokens[warmup : warmup + steps], "losses": losses, "eval_loss": eval_loss,
            "precision": ("nf4 base + " if method == "qlora" else "") + ("bf16 autocast" if options.get("bf16") else "fp32"),
            "gradient_checkpointing": options.get("gradient_checkpointing", args.gradient_checkpointing)}


def worker(name: str, model_dir: str, steps: int, warmup: int, out: str, seed: int) -> None:
    runner, options = ROWS[name]
    result = (run_slmops if runner == "slmops" else run_trl)(model_dir, steps, warmup, options, seed)
    result["peak_rss_mb"] = peak_rss_mb()
    Path(out).write_text(json.dumps(result))


# -- driver ---------------------------------------------------------------------------------


def bf16_matmul_peak_gflops() -> float:
    import torch

    a = torch.randn(2048, 2048, dtype=torch.bfloat16)
    b = torch.randn(2048, 2048, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(5):
            a @ b
        best = min(best, (time.perf_counter() - start) / 5)
    return 2 * 2048**3 / best / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="timed optimizer steps per row")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--rounds", type=int, default=1, help="times each row runs, alternating")
    parser.add_argument("--rows", default="trl_fp32,trl_bf16,trl_bf16_nogc,slmops,trl_qlora,slmops_qlora,trl_full,slmops_full",
                        help=f"comma-separated: {', '.join(ROWS)}")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model_dir", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=42, help="seed of round 1; round i uses seed + i - 1 for every row")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.model_dir, args.steps, args.warmup, args.out, args.seed)
        return

    from slmops.models.builtin import fetch_builtin

    model_dir = str(fetch_builtin("smollm2-135m-instruct"))
    names = [n.strip() for n in args.rows.split(",") if n.strip()]
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        parser.error(f"unknown row(s) {', '.join(unknown)}; choose from {', '.join(ROWS)}")
    peak_at_start = bf16_matmul_peak_gflops()
    results: dict[str, list[dict]] = {n: [] for n in names}
    for round_index in range(args.rounds):
        for name in names:
            with tempfile.NamedTemporaryFile(suffix=".json") as out:
                print(f"round {round_index + 1}/{args.rounds}: {name} ...", file=sys.stderr, flush=True)
                subprocess.run([sys.executable, __file__, "--worker", name, "--model_dir", model_dir, "--steps", str(args.steps),
                                "--warmup", str(args.warmup), "--out", out.name, "--seed", str(args.seed + round_index)], check=True,
                               env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
                results[name].append(json.loads(Path(out.name).read_text()))
    peak = max(peak_at_start, bf16_matmul_peak_gflops())  # the better of two: the machine is shared
    # A LoRA step on a frozen base costs ~4 FLOPs per non-embedding parameter per token
    # (forward 2, input-gradient 2; no weight gradients for the base).
    non_embedding_params = 134.5e6 - 49152 * 576
    table = []
    for name in names:
        runs = results[name]
        tokens = sum(sum(r["tokens"]) for r in runs)
        seconds = sum(sum(r["step_seconds"]) for r in runs)
        tps = tokens / seconds
        table.append({
            "row": name, "tokens_per_s": tps, "step_median_s": statistics.median(s for r in runs for s in r["step_seconds"]),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
            "loss_last10": statistics.mean(statistics.mean(r["losses"][-10:]) for r in runs),
            "eval_loss": statistics.mean(r["eval_loss"] for r in runs),
            "eval_range": (min(r["eval_loss"] for r in runs), max(r["eval_loss"] for r in runs)),
            "peak_fraction": tps * 4 * non_embedding_params / 1e9 / peak,
            "precision": runs[0].get("precision"),
        })
    print(f"\nbf16 2048x2048 matmul peak measured in this run: {peak:.0f} GFLOP/s")
    print(f"held-out loss: mean completion cross-entropy on the last {EVAL_ROWS} rows after training (same for every row), "
          f"mean and [min-max] over the {args.rounds} round(s), each round its own seed")
    print(f"{'row':16s} {'tokens/s':>9s} {'step med s':>10s} {'peak RSS MB':>11s} {'held-out loss':>22s} {'train loss(last10)':>18s} "
          f"{'% bf16 peak':>11s}  precision")
    for row in table:
        print(f"{row['row']:16s} {row['tokens_per_s']:9.0f} {row['step_median_s']:10.3f} {row['peak_rss_mb']:11.0f} "
              f"{row['eval_loss']:7.4f} [{row['eval_range'][0]:.3f}-{row['eval_range'][1]:.3f}] {row['loss_last10']:18.4f} {100 * row['peak_fraction']:10.1f}%  {row['precision']}")
    by_name = {row["row"]: row for row in table}
    ours = by_name.get("slmops")
    if ours:
        for peer in ("trl_fp32", "trl_bf16", "trl_bf16_nogc"):
            if peer in by_name:
                print(f"slmops / {peer}: throughput {ours['tokens_per_s'] / by_name[peer]['tokens_per_s']:.2f}x, "
                      f"peak RSS {ours['peak_rss_mb'] / by_name[peer]['peak_rss_mb']:.2f}x")
        for ours_name, peer in (("slmops_qlora", "trl_qlora"), ("slmops_full", "trl_full")):
            if ours_name in by_name and peer in by_name:
                a, b = by_name[ours_name], by_name[peer]
                print(f"{ours_name} / {peer}: throughput {a['tokens_per_s'] / b['tokens_per_s']:.2f}x, "
                      f"peak RSS {a['peak_rss_mb'] / b['peak_rss_mb']:.2f}x")
        if "trl_fp32" in by_name:
            print(f"ratio_vs_trl_fp32: {ours['tokens_per_s'] / by_name['trl_fp32']['tokens_per_s']:.2f}")
        bf16_peers = [by_name[p] for p in ("trl_bf16", "trl_bf16_nogc") if p in by_name]
        if bf16_peers:
            best = max(bf16_peers, key=lambda r: r["tokens_per_s"])
            print(f"ratio_vs_trl_bf16: {ours['tokens_per_s'] / best['tokens_per_s']:.2f}")


if __name__ == "__main__":
    main()
