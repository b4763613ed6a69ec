"""Training in several processes: `slmops finetune` in 1 process against 2 (or N) processes under
torchrun on the same machine, data-parallel (each a whole copy) or sharded (FSDP, `Nfsdp`), the
same global batch, in one run. LoRA (or --method full) on the built-in SmolLM2-135M-Instruct
(or --model), tone data.

    python benchmarks/distributed_throughput.py                  # 1 vs 2 processes, ~5 min on 2 cores
    python benchmarks/distributed_throughput.py --nproc 1,2,4 --steps 30
    python benchmarks/distributed_throughput.py --nproc 1,2,2fsdp --method full   # what sharding saves in memory

On a CPU, N processes split one machine's cores (cores / N threads each): the ratio says what
the split costs or gains (less per-process threading overhead, one gradient all-reduce a step).
On a machine with N GPUs each process takes one (NCCL), where the ratio is the scaling.
Prints the CPU, a table (tokens/s, step seconds, final loss, rank 0's peak resident memory) and
`ratio_tokens_per_s_Nproc_vs_1proc: X` (and `ratio_peak_memory_Nfsdp_vs_Nproc: Y` for sharded rows).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import cpu_name  # (benchmarks/common.py)

ROOT = Path(__file__).resolve().parents[1]


def run(spec: str, args, out: Path) -> dict:
    nproc, sharded = int(spec.removesuffix("fsdp")), spec.endswith("fsdp")
    per_device = args.global_batch // nproc
    flags = ["finetune", "--model_name_or_path", args.model, "--data_name", str(ROOT / "examples" / "data" / "tone.jsonl"),
             "--train_split", "train[:500]", "--text_template",
             "Classify the tone of the phrase as joyful, angry, sad, fearful or neutral.\nPhrase: {phrase}\nTone: {tone}",
             "--max_steps", str(args.steps), "--per_device_train_batch_size", str(per_device), "--logging_steps", "1", "--save_steps", "1000000",
             "--lora_dropout", "0", "--report_to", "none", "--output_path", str(out), "--log_level", "2", "--method", args.method,
             *(["--fsdp", "full_shard"] if sharded else [])]
    if nproc == 1:
        command = [sys.executable, "-m", "slmops.cli.main", *flags]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "slmops.cli.main", *flags]
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{spec} failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    timed = train[args.warmup:]  # steps after the warm-up
    tokens = sum(r["tokens_per_second"] * r["step_seconds"] for r in timed)
    seconds = sum(r["step_seconds"] for r in timed)
    return {"row": spec if sharded else f"{nproc}proc", "nproc": nproc, "per_device": per_device, "tokens_per_s": tokens / seconds,
            "step_s": seconds / len(timed), "final_loss": train[-1]["loss"], "wall_s": wall,
            "peak_mb": max(r.get("peak_memory_mb", 0.0) for r in train)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--nproc", default="1,2", help="comma list of process counts, NUMBERfsdp for sharded (2fsdp); the first is the reference")
    parser.add_argument("--method", default="lora", choices=["lora", "full"])
    parser.add_argument("--global_batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    specs = [n.strip() for n in args.nproc.split(",") if n.strip()]
    print(f"CPU: {cpu_name()} ({os.cpu_count()} logical cores); {args.method}; global batch {args.global_batch}, {args.steps} steps "
          f"({args.warmup} warm-up)")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in specs:
            results.append(run(spec, args, Path(tmp) / spec))
    print(f"{'row':>9} {'per device':>10} {'tokens/s':>9} {'step s':>7} {'final loss':>10} {'peak MB':>8} {'wall s':>7}")
    for r in results:
        print(f"{r['row']:>9} {r['per_device']:>10} {r['tokens_per_s']:>9.0f} {r['step_s']:>7.3f} {r['final_loss']:>10.4f} "
              f"{r['peak_mb']:>8.0f} {r['wall_s']:>7.0f}")
    base = results[0]
    by_row = {r["row"]: r for r in results}
    for r in results[1:]:
        print(f"ratio_tokens_per_s_{r['row']}_vs_{base['row']}: {r['tokens_per_s'] / base['tokens_per_s']:.2f}")
        data_parallel = by_row.get(f"{r['nproc']}proc")
        if r["row"].endswith("fsdp") and data_parallel:
            print(f"ratio_peak_memory_{r['row']}_vs_{data_parallel['row']}: {r['peak_mb'] / data_parallel['peak_mb']:.2f}")


if __name__ == "__main__":
    main()
