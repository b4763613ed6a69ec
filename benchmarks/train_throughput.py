"""Training throughput on a CPU (or GPU): slmops vs Hugging Face TRL SFTTrainer + PEFT, on
several workloads, each row in its own process, every peer in the same run.

Workloads (--workload, or `all`):
- tone: the built-in SmolLM2-135M-Instruct, the shipped tone data in chat form (one turn, loss
  on the answer), batch 8, max length 128;
- chat_qa: the same model on multi-turn conversations (three library Q&A exchanges each, from
  examples/data/library_qa.json, through the chat template), batch 8, max length 256;
- codes: the same model on long sequences: tiny-codes Q&A sessions of 512-1024 tokens (several
  exchanges per document, loss on all of it), batch 16 as in the seed's QLoRA example, max length 1024;
- llama1b: a 1B-parameter Llama-3.2 shape (random weights, as qlora_memory.py builds it) on the
  codes documents cut to 256 tokens, batch 8.
LoRA r=16 alpha=32 dropout 0.05 on q/k/v/o, AdamW lr 2e-4 everywhere. Rows alternate over
--rounds; the first --warmup steps are not timed. The held-out loss is computed the same way for
every row after training (mean cross-entropy of the last assistant turn, or of the whole text;
an adapter on the base it trained against, fp32 or NF4), so rows compare by it. Peak RSS is each
row's process high-water mark at the end of training (model loading, training, the tool's own
outputs), read before that scoring loads its model.

    .venv/bin/pip install -c constraints.txt -r benchmarks/requirements.txt
    python benchmarks/train_throughput.py                 # tone: ~17 minutes a round on 2 cores (TRL rows are slow)
    python benchmarks/train_throughput.py --steps 20 --rounds 1 --rows slmops,trl_fp32
    python benchmarks/train_throughput.py --workload all --rows trl_fp32,trl_bf16_nogc,slmops   # hours on 2 cores
    python benchmarks/train_throughput.py --workload all --rows slmops --profile   # where a step's time goes, per workload
    python benchmarks/train_throughput.py --setup_olive                           # Olive in its own virtualenv, once
    python benchmarks/train_throughput.py --rows olive,slmops --steps 20          # slmops against `olive finetune`

The `olive` row runs Microsoft Olive 0.13's `olive finetune` (its defaults: bf16 weights, gradient
checkpointing, examples packed into max-length blocks with the loss on every token, constant
learning rate after a 3% warm-up) with the same LoRA, batch, length and steps, in its own
virtualenv (it pins onnxruntime-genai 0.13.2, slmops a newer one): `--setup_olive` builds it
under ~/.cache/slmops/olive-venv, or set OLIVE_PYTHON to another one's python.

On a CPU without fast bf16 (AVX2 only: no AMX, no AVX512-BF16) the TRL LoRA rows that train in
bf16 are not run (a bf16 matmul there is tens of times slower than fp32: 1.2 vs 90 GFLOP/s on a
2-core Zen 3 EPYC; the run prints both rates), TRL's fastest flags are `trl_fp32_nogc`, the olive
row passes Olive's own `--torch_dtype float32`, and trl_qlora and trl_full train in fp32 (QLoRA's
NF4 base computing in fp32); slmops picks fp32 there by itself.

Prints the CPU and a table per workload, and ends with `ratio_vs_trl_fp32: X`,
`ratio_vs_trl_bf16: Y`, `ratio_vs_trl_fastest: Z` (against the fastest TRL LoRA row of each
workload) and `ratio_vs_olive: W` with the olive row, each the minimum over the workloads run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from common import cpu_name  # (benchmarks/common.py)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data"
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
LR, FULL_LR = 2e-4, 2e-5
EVAL_ROWS = 64  # rows held out of each workload's data, scored after training by every row


@dataclass(frozen=True)
class Workload:
    model: str  # "builtin" (SmolLM2-135M-Instruct) or "llama1b" (random weights, built once per run)
    kind: str  # "chat": rows of messages, loss on the assistant's answers; "text": rows of text, loss on all of it
    batch: int
    max_len: int
    steps: int  # timed steps by default (--steps overrides)
    warmup: int


WORKLOADS = {
    "tone": Workload("builtin", "chat", 8, 128, 40, 5),
    "chat_qa": Workload("builtin", "chat", 8, 256, 20, 3),
    "codes": Workload("builtin", "text", 16, 1024, 4, 1),  # ~12k tokens a step: minutes a step on 2 cores
    "llama1b": Workload("llama1b", "text", 8, 256, 3, 1),
}

# row name -> (runner, options); peers first so the table reads against them
ROWS = {
    "trl_fp32": ("trl", {"bf16": False}),  # TRL's CPU defaults, fp32 (gradient checkpointing on, as its default)
    "trl_bf16": ("trl", {"bf16": True}),  # TRL's CPU defaults: bf16 autocast + gradient checkpointing
    "trl_bf16_nogc": ("trl", {"bf16": True, "gradient_checkpointing": False}),  # TRL's best flags here
    # TRL's best flags on a CPU without fast bf16 (AVX2 only), where its bf16 rows are not run
    "trl_fp32_nogc": ("trl", {"bf16": False, "gradient_checkpointing": False}),
    "olive": ("olive", {}),  # `olive finetune` with its defaults (chat workloads only: it packs rows; see the top)
    "slmops": ("slmops", {}),
    "slmops_fp32": ("slmops", {"bf16": False}),
    "slmops_nogc": ("slmops", {"gradient_checkpointing": False}),  # never recompute (slmops turns it on by itself where a pass would not fit)
    "slmops_plain": ("slmops", {"cpu_fast_path": "off"}),  # slmops without its CPU fast path: the model's own (PEFT's) forward
    # QLoRA (4-bit NF4 base via bitsandbytes) and full fine-tuning, each against its own peer
    "trl_qlora": ("trl", {"bf16": True, "gradient_checkpointing": False, "method": "qlora"}),
    "slmops_qlora": ("slmops", {"method": "qlora"}),
    "trl_full": ("trl", {"bf16": True, "gradient_checkpointing": False, "method": "full"}),
    "slmops_full": ("slmops", {"method": "full"}),
}


# The rows of a run without --rows: every peer and method, or on a CPU without fast bf16 the
# ones that run there (see `bf16_rows_unsuited`).
DEFAULT_ROWS = "trl_fp32,trl_bf16,trl_bf16_nogc,slmops,trl_qlora,slmops_qlora,trl_full,slmops_full"
DEFAULT_ROWS_WITHOUT_BF16 = "trl_fp32,trl_fp32_nogc,slmops,trl_qlora,slmops_qlora,trl_full,slmops_full"
# Peers whose bf16 is a default of the recipe rather than the thing measured: on a CPU without fast
# bf16 they train in fp32 (Olive with its own --torch_dtype float32, QLoRA computing its NF4 base in
# fp32, full fine-tuning in fp32), as slmops does there by itself.
FP32_WITHOUT_FAST_BF16 = ("olive", "trl_qlora", "trl_full")
TRL_LORA_ROWS = ("trl_fp32", "trl_fp32_nogc", "trl_bf16", "trl_bf16_nogc")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- the workloads' data: (train rows, held-out rows), the same for every row -----------------------


def _tone_rows() -> list[dict]:
    rows = [json.loads(line) for line in (DATA / "tone.jsonl").read_text().splitlines()]
    return [{"messages": [{"role": "user", "content": r["phrase"]}, {"role": "assistant", "content": r["tone"]}]} for r in rows]


def _chat_qa_rows() -> list[dict]:
    """Conversations of three Q&A exchanges: every ordered triple of distinct questions drawn with
    a fixed seed (the 40 pairs alone would make too few rows)."""
    pairs = json.loads((DATA / "library_qa.json").read_text())
    rng = random.Random(0)
    rows = []
    for _ in range(600):
        conversation = []
        for pair in rng.sample(pairs, 3):
            conversation += [{"role": "user", "content": pair["input"]}, {"role": "assistant", "content": pair["output"]}]
        rows.append({"messages": conversation})
    return rows


def _codes_rows() -> list[dict]:
    """Programming Q&A sessions: tiny-codes exchanges (in a seeded order) joined until a document
    reaches its drawn size of 5-10 exchanges of ~100 tokens (460-1,145 tokens of SmolLM2's
    tokenizer, median 760; max length 1024 cuts the longest)."""
    rows = [json.loads(line) for line in (DATA / "tiny_codes.jsonl").read_text().splitlines()]
    rng = random.Random(0)
    rng.shuffle(rows)
    docs, current, size = [], [], 0
    target = rng.randint(5, 10) * 100
    for r in rows:
        current.append(f"### Language: {r['programming_language']} \n### Question: {r['prompt']} \n### Answer: {r['response']}")
        size += 100  # (~100 tokens an exchange; max_len cuts the few long ones)
        if size >= target:
            docs.append({"text": "\n\n".join(current)})
            current, size, target = [], 0, rng.randint(5, 10) * 100
    return docs


def workload_rows(name: str) -> tuple[list[dict], list[dict]]:
    rows = {"tone": _tone_rows, "chat_qa": _chat_qa_rows, "codes": _codes_rows, "llama1b": _codes_rows}[name]()
    return rows[:-EVAL_ROWS], rows[-EVAL_ROWS:]


def heldout_loss(model, tokenizer, rows: list[dict], kind: str, max_len: int) -> float:
    """Mean cross-entropy per token of each held-out row's last assistant turn (chat) or of its
    whole text, cut to max_len: one measure for every row of the table."""
    import torch
    import torch.nn.functional as F

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            if kind == "chat":
                prompt = tokenizer.apply_chat_template(row["messages"][:-1], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
                ids = tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=True)["input_ids"][:max_len]
                start = len(prompt)
            else:
                ids = tokenizer(row["text"])["input_ids"][:max_len]
                start = 1
            x = torch.tensor([ids])
            logits = model(input_ids=x).logits[0, start - 1 : -1].float()
            target = x[0, start:]
            total += float(F.cross_entropy(logits, target, reduction="sum"))
            count += int(target.numel())
    return total / max(count, 1)


# -- workers (each in its own process) ------------------------------------------------------


def run_slmops(work: Workload, name: str, model_dir: str, steps: int, warmup: int, options: dict, seed: int,
               profile: bool = False, hooks=None) -> dict:
    """Train one slmops row; `hooks` (TrainingHooks), if given, hear the loop too (another benchmark's)."""
    from slmops.config import from_dict
    from slmops.finetune_recipe import finetune
    from slmops.train.monitor import read_metrics

    train_rows, held_out = workload_rows(name)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in train_rows))
        options = dict(options)
        method = options.pop("method", "lora")
        cfg = from_dict({
            "model": {"model_name_or_path": model_dir},
            # task generation: the tone answers are labels, and a classification task would take the
            # classification defaults (held-out split, cosine schedule, early stopping) that TRL's rows lack
            "data": {"data_name": str(data), "max_seq_len": work.max_len, "task": "generation",
                     **({"use_chat_template": True} if work.kind == "chat" else {"text_field": "text"})},
            "method": {"method": method, "lora_r": LORA["r"], "lora_alpha": LORA["lora_alpha"],
                       "lora_dropout": LORA["lora_dropout"], "target_modules": LORA["target_modules"] if method != "full" else None},
            "training": {"max_steps": warmup + steps, "per_device_train_batch_size": work.batch,
                         "learning_rate": FULL_LR if method == "full" else LR,
                         "logging_steps": 1, "report_to": "none", "save_steps": 10**9, "seed": seed, **options},
            "output_path": str(Path(tmp) / "out"),
        })
        profiler = StepProfiler(warmup, warmup + steps) if profile else None
        own = profiler.hooks() if profiler else None
        result = finetune(cfg, own.merged(hooks) if own else hooks)
        training_peak = peak_rss_mb()  # (before the scoring below loads its own model)
        logged = read_metrics(Path(tmp) / "out" / "logs" / "metrics.jsonl")
        records = [r for r in logged if r["split"] == "train"]
        # (a profiling run measures where the time goes, not the result)
        eval_loss = None if profile else _score_output(Path(tmp) / "out", model_dir, method, held_out, work)
    timed = records[warmup:]
    return {
        "step_seconds": [r["step_seconds"] for r in timed],
        "tokens": [r["tokens_per_second"] * r["step_seconds"] for r in timed],
        "losses": [r["loss"] for r in records],
        "eval_loss": eval_loss,
        "precision": result.plan["precision"]["name"] + ("" if method == "lora" else f" ({method})"),
        "fast_loss": result.train.fast_loss,
        "peak_rss_mb": training_peak,
        **({"profile": profiler.shares(), "products": profiler.products, "product_steps": profiler.product_steps}
           if profiler else {}),
    }


# Where a training step's time goes, by the operators PyTorch's profiler sees (self time, so
# nothing counts twice); the fused C kernels are called through ctypes, which the profiler does
# not see: their time is in "outside PyTorch operators", with the Python between operators.
PROFILE_GROUPS = [
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_weight_int4", "aten::linear")),
    ("attention", ("scaled_dot_product", "flash_attention", "attention", "aten::_softmax", "softmax_backward")),
    ("output head + loss", ("cross_entropy", "log_softmax", "nll_loss", "ChunkedHeadLoss")),
    ("optimizer", ("adam", "Optimizer", "_foreach", "clip_grad", "aten::norm")),
]


class StepProfiler:
    """Where the timed steps' time goes, through the loop's after_step hook: the matrix products
    timed one by one (product_timer) over the first half of steps (first, last], then
    torch.profiler over the second half for each group's share. The profiler's own per-operator
    times are not used for the products' rates, and the products are timed before it starts: on
    full fine-tuning in fp32 (AVX2 Zen 3) the weight-gradient products (transposed A) ran at
    57-73 GFLOP/s under the profiler and in the steps after it had stopped, 107-164 timed the same
    way in a run that never started it.
    The shares are read as the profiler stops and the profiler is dropped there: a profiler
    still alive when the run's teardown frees its hooks crashed the worker."""

    def __init__(self, first: int, last: int):
        self.first, self.last = first, last
        self.middle = first + (last - first) // 2  # (one step: the profiler's, no products timed)
        self.profile = None
        self.timer = None  # product_timer(), while it times
        self.started = 0.0
        self.result: dict[str, float] | None = None
        self.products: list[dict] = []  # the matrix products by shape, longest first (product_timer().by_shape)

    @property
    def product_steps(self) -> tuple[int, int] | None:
        """The steps whose products are timed (first and last), or None with a single timed step."""
        return (self.first + 1, self.middle) if self.middle > self.first else None

    def hooks(self):
        from slmops.train.trainer import TrainingHooks

        return TrainingHooks(after_step=self._after_step)

    def _after_step(self, step: int) -> None:
        from torch.profiler import ProfilerActivity, profile

        if step == self.first and self.product_steps:
            self.timer = product_timer().__enter__()
            self.started = time.perf_counter()
        if step == self.middle:
            if self.timer is not None:
                self.products = self.timer.by_shape(time.perf_counter() - self.started)
                self.timer.__exit__(None, None, None)
                self.timer = None
            self.profile = profile(activities=[ProfilerActivity.CPU], record_shapes=True)
            self.profile.start()
            self.started = time.perf_counter()
        elif step == self.last and self.profile is not None:
            wall = time.perf_counter() - self.started
            self.profile.stop()
            self.result = self._shares(self.profile.key_averages(), wall)
            self.profile = None

    @staticmethod
    def _shares(events, wall: float) -> dict[str, float]:
        """Each group's share of the profiled steps' wall time (events may repeat an operator, one
        per operand shapes: they add up)."""
        other = "other PyTorch operators (elementwise, norms, copies)"
        seconds = {group: 0.0 for group, _ in PROFILE_GROUPS} | {other: 0.0}
        others = {}
        for event in events:
            group = next((g for g, keys in PROFILE_GROUPS if any(k.lower() in event.key.lower() for k in keys)), other)
            seconds[group] += event.self_cpu_time_total / 1e6
            if group == other:
                others[event.key] = others.get(event.key, 0.0) + event.self_cpu_time_total / 1e6
        seconds["outside PyTorch operators (fused C kernels, Python)"] = max(0.0, wall - sum(seconds.values()))
        shares = {group: value / wall for group, value in seconds.items()}
        # the largest of the "other" operators, by name: what the next kernel would fuse
        for key, value in sorted(others.items(), key=lambda kv: -kv[1])[:4]:
            shares[f"  of which {key}"] = value / wall
        return shares

    def shares(self) -> dict[str, float]:
        if self.result is None:
            raise RuntimeError(f"the run ended before step {self.last}: nothing was profiled")
        return self.result


PRODUCT_OPS = ("mm", "addmm", "addmm_", "bmm")


def product_timer():
    """A dispatch mode (below autograd, so the backward's products too) with a clock around each
    matrix product, by operator and operand shapes (`by_shape`). The steps around them run slower
    for the mode's Python per operator; each product's own time does not. (Defined here so the
    parent process, which only launches workers, does not import torch for it.)"""
    from torch.utils._python_dispatch import TorchDispatchMode

    class ProductTimer(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seconds: dict[tuple, list] = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            name = func._overloadpacket.__name__
            if name not in PRODUCT_OPS:
                return func(*args, **kwargs)
            started = time.perf_counter()
            out = func(*args, **kwargs)
            elapsed = time.perf_counter() - started
            a, b = (args[0], args[1]) if name in ("mm", "bmm") else (args[1], args[2])  # (addmm: the added matrix first)
            entry = self.seconds.setdefault((name, tuple(a.shape), tuple(b.shape)), [0.0, 0])
            entry[0] += elapsed
            entry[1] += 1
            return out

        def by_shape(self, wall: float, most: int = 8) -> list[dict]:
            """The products by operand shapes, longest first: each one's share of the timed
            steps' wall time and the rate it ran at. Set against the matmul peak the run
            measured, the rates tell a step whose products are slow (shapes, cold caches) from
            one that is simply made of products at the peak."""
            rows = []
            for (name, a, b), (seconds, calls) in self.seconds.items():
                if name == "bmm" and len(a) == 3:
                    flops = 2 * a[0] * a[1] * a[2] * b[2]
                elif len(a) == 2 and len(b) == 2:
                    flops = 2 * a[0] * a[1] * b[1]
                else:
                    continue
                if seconds:
                    rows.append({"op": name, "shapes": f"{list(a)} x {list(b)}", "calls": calls, "share": seconds / wall,
                                 "gflops": flops * calls / seconds / 1e9})
            return sorted(rows, key=lambda r: -r["share"])[:most]

    return ProductTimer()


def _score_output(out: Path, model_dir: str, method: str, held_out: list[dict], work: Workload) -> float:
    if method != "full":
        return _score_adapter(out / "adapter", model_dir, held_out, work, method)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32)
    return heldout_loss(model, AutoTokenizer.from_pretrained(model_dir), held_out, work.kind, work.max_len)


def _score_adapter(adapter: Path, model_dir: str, held_out: list[dict], work: Workload, method: str = "lora") -> float:
    """The held-out loss of an adapter on the base it trained against: fp32 weights for LoRA,
    the NF4 base (the same BitsAndBytesConfig, so the same 4-bit weights) for QLoRA, whichever
    tool trained it. (slmops' QLoRA adapter used to be scored on the fp32 base and TRL's on its
    NF4 training model: 3.89 against 3.57 on tone; scored alike, 3.52 against 3.53.)"""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if method == "qlora":
        base = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=nf4_config(), device_map="cpu")
    else:
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter)
    return heldout_loss(model, AutoTokenizer.from_pretrained(model_dir), held_out, work.kind, work.max_len)


def nf4_config():
    """The QLoRA recipe's 4-bit base (TRL's and slmops' --method qlora alike), computing in bf16, or
    in fp32 on a CPU without fast bf16 (as slmops' does there)."""
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16 if fast_bf16_here() else torch.float32)


def run_trl(work: Workload, name: str, model_dir: str, steps: int, warmup: int, options: dict, seed: int) -> dict:
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

    train_rows, held_out = workload_rows(name)
    if work.kind == "chat":  # TRL's conversational prompt-completion form: loss on the last assistant turn
        data = Dataset.from_list([{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in train_rows])
    else:  # language modelling on the whole text
        data = Dataset.from_list(train_rows)
    options = dict(options)
    method = options.pop("method", "lora")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if method == "qlora":  # the usual TRL QLoRA recipe: bitsandbytes NF4 base, PEFT LoRA
        from peft import prepare_model_for_kbit_training

        model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=nf4_config(), device_map="cpu")
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with tempfile.TemporaryDirectory() as tmp:
        args = SFTConfig(output_dir=tmp, use_cpu=not torch.cuda.is_available(), max_steps=warmup + steps,
                         per_device_train_batch_size=work.batch, learning_rate=FULL_LR if method == "full" else LR, logging_steps=1,
                         save_strategy="no", report_to="none", max_length=work.max_len, seed=seed,
                         **({"completion_only_loss": True} if work.kind == "chat" else {}), **options)
        trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                             peft_config=None if method == "full" else LoraConfig(task_type="CAUSAL_LM", **LORA), callbacks=[Timer()])
        collator = trainer.data_collator

        def counting_collator(features):
            batch = collator(features)
            tokens.append(int(batch["attention_mask"].sum()) if "attention_mask" in batch else int(batch["input_ids"].numel()))
            return batch

        trainer.data_collator = counting_collator
        trainer.train()
        training_peak = peak_rss_mb()  # (before the scoring below loads its own model)
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        if method == "full":
            eval_loss = heldout_loss(trainer.model.float(), tokenizer, held_out, work.kind, work.max_len)
        else:  # the adapter as saved, scored as every adapter row's is
            trainer.model.save_pretrained(Path(tmp) / "adapter")
            eval_loss = _score_adapter(Path(tmp) / "adapter", model_dir, held_out, work, method)
    return {"step_seconds": step_seconds[warmup:], "tokens": tokens[warmup : warmup + steps], "losses": losses, "eval_loss": eval_loss,
            "precision": ("nf4 base + " if method == "qlora" else "") + ("bf16 autocast" if options.get("bf16") else "fp32"),
            "gradient_checkpointing": options.get("gradient_checkpointing", args.gradient_checkpointing), "peak_rss_mb": training_peak}


OLIVE_VENV = Path.home() / ".cache" / "slmops" / "olive-venv"
OLIVE_PINS = ["olive-ai==0.13.0", "onnxruntime-genai==0.13.2", "requests"]
OLIVE_SHARED = ("torch", "transformers", "peft", "datasets", "accelerate")  # at slmops' pins (constraints.txt)


def olive_python() -> Path:
    python = Path(os.environ.get("OLIVE_PYTHON") or OLIVE_VENV / "bin" / "python")
    if not python.exists():
        sys.exit(f"the olive row needs Olive's virtualenv: {python} is missing. Build it with "
                 f"`python benchmarks/train_throughput.py --setup_olive`, or set OLIVE_PYTHON to a python that has olive-ai 0.13")
    return python


def setup_olive() -> None:
    """Olive 0.13 in its own virtualenv: it pins onnxruntime-genai 0.13.2; the libraries both
    share (torch, transformers, peft...) at slmops' pins, so the rows differ by the trainer only."""
    pins = [line.strip() for line in (ROOT / "constraints.txt").read_text().splitlines()
            if line.strip().lower().startswith(tuple(f"{name}==" for name in OLIVE_SHARED))]
    subprocess.run([sys.executable, "-m", "venv", str(OLIVE_VENV)], check=True)
    pip = [str(OLIVE_VENV / "bin" / "pip"), "install", "--quiet"]
    subprocess.run([*pip, next(p for p in pins if p.startswith("torch=="))], check=True)  # the CPU wheel first (see README)
    subprocess.run([*pip, *pins, *OLIVE_PINS], check=True)
    print(f"olive: {OLIVE_VENV / 'bin' / 'olive'}")


# Runs inside Olive's virtualenv: `olive finetune` in this process, its transformers.Trainer
# timed per step by a callback as TRL's is, the tokens of each batch counted.
OLIVE_DRIVER = """
import json, sys, time
import transformers
result_path, argv = sys.argv[1], sys.argv[2:]
record = {"step_seconds": [], "tokens": [], "losses": []}
trainers = []

class Timer(transformers.TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()
    def on_step_end(self, args, state, control, **kwargs):
        record["step_seconds"].append(time.perf_counter() - self.start)

init = transformers.Trainer.__init__
def timed_init(self, *args, **kwargs):
    init(self, *args, **kwargs)
    self.add_callback(Timer())
    collate = self.data_collator
    def counting(features):
        batch = collate(features)
        mask = batch.get("attention_mask")
        record["tokens"].append(int(mask.sum()) if mask is not None else int(batch["input_ids"].numel()))
        return batch
    self.data_collator = counting
    trainers.append(self)
transformers.Trainer.__init__ = timed_init

from olive.cli.launcher import main
try:
    main(argv)
except SystemExit as stop:
    if stop.code:
        raise
record["losses"] = [h["loss"] for h in trainers[-1].state.log_history if "loss" in h]
with open(result_path, "w") as f:
    json.dump(record, f)
"""


def run_olive(work: Workload, name: str, model_dir: str, steps: int, warmup: int, options: dict, seed: int) -> dict:
    if work.kind != "chat":
        raise SystemExit(f"the olive row runs on the chat workloads (tone, chat_qa), not {name}")
    train_rows, held_out = workload_rows(name)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "train.jsonl"
        data.write_text("".join(json.dumps({"messages": r["messages"]}) + "\n" for r in train_rows))
        out, result = Path(tmp) / "out", Path(tmp) / "result.json"
        argv = ["finetune", "-m", model_dir, "-d", "json", "--data_files", str(data), "--train_split", "train",
                "--use_chat_template", "--max_seq_len", str(work.max_len), "--method", "lora", "--lora_r", str(LORA["r"]),
                "--lora_alpha", str(LORA["lora_alpha"]), "--target_modules", ",".join(LORA["target_modules"]),
                "-o", str(out), "--disable_telemetry",
                # Olive's bf16 default on a CPU without fast bf16 would take hours: its own fp32 option there
                *([] if options.get("bf16", True) else ["--torch_dtype", "float32"]),
                # passed through to transformers.TrainingArguments
                "--max_steps", str(warmup + steps), "--per_device_train_batch_size", str(work.batch), "--learning_rate", str(LR),
                "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none", "--seed", str(seed),
                "--output_dir", str(Path(tmp) / "trainer")]
        # cwd: Olive writes its cache (.olive-cache) into the working directory
        subprocess.run([str(olive_python()), "-c", OLIVE_DRIVER, str(result), *argv], check=True, cwd=tmp,
                       env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
        record = json.loads(result.read_text())
        adapter = next(out.rglob("adapter_config.json")).parent
        eval_loss = _score_adapter(adapter, model_dir, held_out, work)
    children_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"step_seconds": record["step_seconds"][warmup:], "tokens": record["tokens"][warmup : warmup + steps],
            "losses": record["losses"], "eval_loss": eval_loss,
            "precision": "bf16 weights (olive default)" if options.get("bf16", True) else "fp32 (--torch_dtype float32)",
            "peak_rss_mb_children": children_peak}


def worker(workload: str, name: str, model_dir: str, steps: int, warmup: int, out: str, seed: int, profile: bool) -> None:
    runner, options = ROWS[name]
    if name in FP32_WITHOUT_FAST_BF16 and not fast_bf16_here():
        options = {**options, "bf16": False}
    if runner == "slmops":
        result = run_slmops(WORKLOADS[workload], workload, model_dir, steps, warmup, options, seed, profile)
    elif runner == "olive":
        result = run_olive(WORKLOADS[workload], workload, model_dir, steps, warmup, options, seed)
    else:
        result = run_trl(WORKLOADS[workload], workload, model_dir, steps, warmup, options, seed)
    # the peak while training: each runner reads it before its held-out scoring loads another model
    # (the olive row trains in a child process: its peak is the child's)
    if runner == "olive":
        result["peak_rss_mb"] = result.pop("peak_rss_mb_children")
    Path(out).write_text(json.dumps(result))


# -- driver ---------------------------------------------------------------------------------


def matmul_peak_gflops() -> tuple[float, str]:
    """The best 2048x2048 matmul rate in the dtype this machine trains fastest in: bf16 where the
    CPU computes it natively (AMX, AVX512-BF16) or on a GPU, else fp32 (a bf16 matmul takes
    a minute on an AVX2-only CPU)."""
    import torch

    dtype = torch.bfloat16 if fast_bf16_here() else torch.float32
    a = torch.randn(2048, 2048, dtype=dtype)
    b = torch.randn(2048, 2048, dtype=dtype)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(5):
            a @ b
        best = min(best, (time.perf_counter() - start) / 5)
    return 2 * 2048**3 / best / 1e9, "bf16" if dtype == torch.bfloat16 else "fp32"


def fast_bf16_here() -> bool:
    """Whether this machine computes bf16 natively (a GPU, or a CPU with AMX / AVX512-BF16)."""
    import torch

    from slmops.models.precision import cpu_has_fast_bf16

    return torch.cuda.is_available() or cpu_has_fast_bf16()


def bf16_rows_unsuited(names: list[str]) -> tuple[list[str], str]:
    """The rows that train in bf16, and why they are not run, on a CPU without fast bf16: there
    oneDNN has no bf16 kernels and a bf16 matmul is tens of times slower than fp32 (such a row would
    take hours and measure nothing a user would choose). ([], "") where bf16 is fast."""
    if fast_bf16_here():
        return [], ""
    unsuited = [n for n in names if ROWS[n][1].get("bf16") is True and n not in FP32_WITHOUT_FAST_BF16]
    if not unsuited:
        return [], ""
    import torch

    rates = {}
    for dtype in (torch.bfloat16, torch.float32):
        a, b = torch.randn(256, 256, dtype=dtype), torch.randn(256, 256, dtype=dtype)
        a @ b
        start = time.perf_counter()
        a @ b
        rates[dtype] = 2 * 256**3 / (time.perf_counter() - start) / 1e9
    return unsuited, (f"not run on this CPU (no AMX or AVX512-BF16: a bf16 matmul runs at {rates[torch.bfloat16]:.1f} "
                      f"GFLOP/s here, fp32 at {rates[torch.float32]:.0f}); TRL's fastest flags here: trl_fp32_nogc")


def non_embedding_parameters(model_dir: str) -> int:
    """The parameters every token's forward multiplies by: all but the input embedding (a tied
    output head, shared with it, is left out too: slmops runs it on labelled tokens only)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    return sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()


def model_for(work: Workload, scratch: Path) -> str:
    from slmops.models.builtin import fetch_builtin

    if work.model == "builtin":
        return str(fetch_builtin("smollm2-135m-instruct"))
    folder = scratch / "llama1b"
    if not folder.exists():
        from qlora_memory import build_model  # (benchmarks/qlora_memory.py: the script's folder is on the path)

        build_model(folder)
    return str(folder)


def per_workload(value: str | None, name: str, default: int) -> int:
    """--steps/--warmup: N for every workload, or NAME=N,... (the rest keep their defaults)."""
    if not value:
        return default
    if "=" not in value:
        return int(value)
    given = dict(item.split("=", 1) for item in value.split(",") if item.strip())
    return int(given.get(name, default))


def _death(returncode: int) -> str:
    """How a row's process ended, for the table."""
    if returncode == -signal.SIGKILL:
        return "killed (SIGKILL: out of memory, most likely; see dmesg)"
    if returncode < 0:
        return f"died of {signal.Signals(-returncode).name}"
    return f"failed (exit status {returncode}; its error is printed above)"


def run_workload(name: str, names: list[str], args, scratch: Path, peak: float) -> dict[str, dict]:
    """Run each row of one workload in its own process, `args.rounds` times alternating; print the
    table and the ratios; return the rows that ran, by name."""
    work = WORKLOADS[name]
    steps, warmup = per_workload(args.steps, name, work.steps), per_workload(args.warmup, name, work.warmup)
    model_dir = model_for(work, scratch)
    results: dict[str, list[dict]] = {n: [] for n in names}
    for round_index in range(args.rounds):
        for row in names:
            with tempfile.NamedTemporaryFile(suffix=".json") as out:
                print(f"{name} round {round_index + 1}/{args.rounds}: {row} ...", file=sys.stderr, flush=True)
                done = subprocess.run([sys.executable, __file__, "--worker", row, "--workload", name, "--model_dir", model_dir,
                                       "--steps", str(steps), "--warmup", str(warmup), "--out", out.name, "--seed",
                                       str(args.seed + round_index), *(["--profile"] if args.profile else [])],
                                      env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
                # A row that dies is a result too (TRL without gradient checkpointing on 16 x 1,024 tokens
                # outgrows 24 GB and the kernel kills it): reported as such, the other rows still run.
                results[row].append(json.loads(Path(out.name).read_text()) if done.returncode == 0
                                    else {"failed": _death(done.returncode)})
    # A LoRA step on a frozen base costs ~4 FLOPs per non-embedding parameter per token
    # (forward 2, input-gradient 2; no weight gradients for the base).
    flops_per_token = 4 * non_embedding_parameters(model_dir)
    table = {}
    for row in names:
        runs = results[row]
        failed = next((r["failed"] for r in runs if "failed" in r), None)
        if failed:
            table[row] = {"failed": failed}
            continue
        tokens = sum(sum(r["tokens"]) for r in runs)
        seconds = sum(sum(r["step_seconds"]) for r in runs)
        tps = tokens / seconds
        table[row] = {
            "tokens_per_s": tps, "step_median_s": statistics.median(s for r in runs for s in r["step_seconds"]),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
            "loss_last": statistics.mean(statistics.mean(r["losses"][-min(10, len(r["losses"])):]) for r in runs),
            "eval_loss": statistics.mean(r["eval_loss"] for r in runs) if runs[0]["eval_loss"] is not None else float("nan"),
            "eval_range": (min(r["eval_loss"] or 0.0 for r in runs), max(r["eval_loss"] or 0.0 for r in runs)),
            "peak_fraction": tps * flops_per_token / 1e9 / peak,
            "precision": runs[0].get("precision"),
            "profile": runs[0].get("profile"),
            "products": runs[0].get("products", []),
            "product_steps": runs[0].get("product_steps"),
        }
    print(f"\n== workload {name}: {work.kind}, batch {work.batch}, max length {work.max_len}, {steps} timed steps after {warmup}, "
          f"{args.rounds} round(s)")
    print(f"{'row':16s} {'tokens/s':>9s} {'step med s':>10s} {'peak RSS MB':>11s} {'held-out loss':>22s} {'train loss':>10s} "
          f"{'% peak':>11s}  precision")
    for row, r in table.items():
        if "failed" in r:
            print(f"{row:16s} {'-':>9s} {'-':>10s} {'-':>11s}  {r['failed']}")
            continue
        held_out = (f"{r['eval_loss']:7.4f} [{r['eval_range'][0]:.3f}-{r['eval_range'][1]:.3f}]" if not math.isnan(r["eval_loss"])
                    else f"{'not scored (--profile)':>22s}")
        print(f"{row:16s} {r['tokens_per_s']:9.0f} {r['step_median_s']:10.3f} {r['peak_rss_mb']:11.0f} "
              f"{held_out} {r['loss_last']:10.4f} "
              f"{100 * r['peak_fraction']:10.1f}%  {r['precision']}")
    ran = {row: r for row, r in table.items() if "failed" not in r}
    for row, r in ran.items():
        if r["profile"]:
            print(f"{name}: where a {row} step's time goes (torch.profiler over the second half of round 1's timed steps): "
                  + ", ".join(f"{group} {100 * share:.0f}%" for group, share in r["profile"].items()))
            steps = r.get("product_steps")
            which = f"step {steps[0]}" if steps and steps[0] == steps[1] else f"steps {steps[0]}-{steps[1]}" if steps else ""
            print(f"{name}: {row}'s longest matrix products, each timed alone ({which}): "
                  + "; ".join(f"{p['op']} {p['shapes']} x{p['calls']} {100 * p['share']:.0f}% at {p['gflops']:.0f} GFLOP/s"
                              for p in r["products"]) if steps else
                  f"{name}: {row}'s matrix products not timed: --profile times them over the first half of the timed steps, "
                  "and this run has one")
    ours = ran.get("slmops")
    if ours:
        for peer in (*TRL_LORA_ROWS, "olive"):
            if peer in ran:
                print(f"{name}: slmops / {peer}: throughput {ours['tokens_per_s'] / ran[peer]['tokens_per_s']:.2f}x, "
                      f"peak RSS {ours['peak_rss_mb'] / ran[peer]['peak_rss_mb']:.2f}x")
    for ours_name, peer in (("slmops_qlora", "trl_qlora"), ("slmops_full", "trl_full")):
        if ours_name in ran and peer in ran:
            a, b = ran[ours_name], ran[peer]
            print(f"{name}: {ours_name} / {peer}: throughput {a['tokens_per_s'] / b['tokens_per_s']:.2f}x, "
                  f"peak RSS {a['peak_rss_mb'] / b['peak_rss_mb']:.2f}x")
    return ran  # the rows that ran (one that died has no rate; it was printed above)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="tone", help=f"comma-separated: {', '.join(WORKLOADS)}, or all")
    parser.add_argument("--steps", default=None, help="timed optimizer steps per row: N, or per workload (tone=20,codes=2) "
                        f"[default: {', '.join(f'{k}={w.steps}' for k, w in WORKLOADS.items())}]")
    parser.add_argument("--warmup", default=None, help="untimed steps first: N, or per workload "
                        f"[default: {', '.join(f'{k}={w.warmup}' for k, w in WORKLOADS.items())}]")
    parser.add_argument("--rounds", type=int, default=1, help="times each row runs, alternating")
    parser.add_argument("--rows", default=None, help=f"comma-separated: {', '.join(ROWS)} (QLoRA and full rows run on the tone "
                        f"workload only) [default: {DEFAULT_ROWS}; on a CPU without fast bf16: {DEFAULT_ROWS_WITHOUT_BF16}]")
    parser.add_argument("--profile", action="store_true", help="slmops rows print their longest matrix products by shape "
                        "with the rate each ran at (each timed alone, the first half of the timed steps) and where the time "
                        "goes (torch.profiler, the second half; both slow the steps: time and profile in separate runs)")
    parser.add_argument("--setup_olive", action="store_true", help=f"build Olive 0.13's virtualenv for the olive row ({OLIVE_VENV}) and exit")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model_dir", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=42, help="seed of round 1; round i uses seed + i - 1 for every row")
    args = parser.parse_args()
    if args.setup_olive:
        setup_olive()
        return
    if args.worker:
        worker(args.workload, args.worker, args.model_dir, int(args.steps), int(args.warmup), args.out, args.seed, args.profile)
        return

    workloads = list(WORKLOADS) if args.workload == "all" else [w.strip() for w in args.workload.split(",") if w.strip()]
    rows_asked = args.rows or (DEFAULT_ROWS if fast_bf16_here() else DEFAULT_ROWS_WITHOUT_BF16)
    names = [n.strip() for n in rows_asked.split(",") if n.strip()]
    unknown = [n for n in names if n not in ROWS] + [w for w in workloads if w not in WORKLOADS]
    if unknown:
        parser.error(f"unknown row(s) or workload(s) {', '.join(unknown)}; rows: {', '.join(ROWS)}; workloads: {', '.join(WORKLOADS)}, all")
    unsuited, why = bf16_rows_unsuited(names)
    if unsuited:
        print(f"{', '.join(unsuited)}: {why}", flush=True)
        names = [n for n in names if n not in unsuited]
    # the peers' libraries, checked before anything runs (a missing one would end the run hours in)
    if any(ROWS[n][0] == "trl" for n in names):
        import importlib.util

        if importlib.util.find_spec("trl") is None:
            sys.exit("the trl rows need TRL: .venv/bin/pip install -c constraints.txt -r benchmarks/requirements.txt")
    if "olive" in names:
        olive_python()
    print(f"CPU: {cpu_name()} ({os.cpu_count()} logical cores)")
    peak, peak_dtype = matmul_peak_gflops()
    print(f"{peak_dtype} 2048x2048 matmul peak measured in this run: {peak:.0f} GFLOP/s (the '% peak' column: the FLOPs of every "
          "token of the data; slmops computes a prefix all of a batch's examples share once, so its figure can pass 100%)")
    tables = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name in workloads:
            rows = [n for n in names if (name == "tone" or not n.endswith(("_qlora", "_full")))
                    and (n != "olive" or WORKLOADS[name].kind == "chat")]  # (Olive's packing is for chat rows here)
            tables[name] = run_workload(name, rows, args, Path(scratch), peak)
    print("\nheld-out loss: after training, every row scored the same way on the workload's last "
          f"{EVAL_ROWS} rows (last assistant turn, or the whole text); mean [min-max] over the rounds, each round its own seed")
    for label, peers in (("ratio_vs_trl_fp32", ("trl_fp32",)), ("ratio_vs_trl_bf16", ("trl_bf16", "trl_bf16_nogc")),
                         ("ratio_vs_trl_fastest", TRL_LORA_ROWS), ("ratio_vs_olive", ("olive",))):
        ratios = {name: t["slmops"]["tokens_per_s"] / max(t[p]["tokens_per_s"] for p in peers if p in t)
                  for name, t in tables.items() if "slmops" in t and any(p in t for p in peers)}
        if ratios:
            print(f"{label} per workload: " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
            print(f"{label}: {min(ratios.values()):.2f}")


if __name__ == "__main__":
    main()
