"""Serving two task adapters on one SmolLM2-135M-Instruct base: `slmops serve` (the int4 ONNX
Runtime GenAI bundle, every request picking its adapter) against its peer, transformers + PEFT
serving the same two adapters one request at a time (set_adapter, generate), in one run.

`slmops serve` runs as a real server process on loopback, loaded by 1, 4 and 16 concurrent
clients (the official `openai` client, streaming, so time to first token is what a user
sees), requests alternating between the adapters. Each request is a chat prompt asking for
--max_tokens tokens, greedy. The peer answers the same requests in the same order.

    python benchmarks/serve.py                     # ~4 minutes on 2 cores (export included)
    python benchmarks/serve.py --requests 24 --max_tokens 32

Prints the CPU, a table (requests/s, p50/p95 latency, p50 time to first token, tokens/s) and
ends with `ratio_rps_serve_cN_vs_peer: X` lines (N = concurrent clients).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import cpu_name  # (benchmarks/common.py)

import torch

QUESTIONS = [
    "What is the capital of France?", "Name three rivers in Europe.", "How do plants make food?",
    "Give me a tip for learning to cook.", "What does a lighthouse do?", "Why is the sky blue?",
    "Suggest a name for a grey cat.", "What is a prime number?",
]


def random_adapter(model_path: Path, out: Path, seed: int, targets: list[str]) -> Path:
    """A LoRA r=16 with random weights: a tuned adapter's cost at run time."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_path)
    get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=targets, init_lora_weights=False)).save_pretrained(out)
    return out


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def summary(latencies: list[float], ttfts: list[float], tokens: int, seconds: float) -> dict:
    return {"rps": len(latencies) / seconds, "p50": percentile(latencies, 0.5), "p95": percentile(latencies, 0.95),
            "ttft": percentile(ttfts, 0.5), "tok_s": tokens / seconds}


def peer(model_path: Path, adapters: dict[str, Path], requests: list[tuple[str, str]], max_tokens: int) -> dict:
    """transformers + PEFT, the same adapters loaded once, one request at a time."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.generation.streamers import BaseStreamer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    names = list(adapters)
    model = PeftModel.from_pretrained(model, adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapters[name], adapter_name=name)

    class First(BaseStreamer):
        def __init__(self):
            self.calls, self.first = 0, None

        def put(self, value):
            self.calls += 1
            if self.calls == 2:  # the first call is the prompt
                self.first = time.perf_counter()

        def end(self):
            pass

    latencies, ttfts, tokens = [], [], 0
    started = time.perf_counter()
    for adapter, question in requests:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)
        t0 = time.perf_counter()
        model.set_adapter(adapter)
        streamer = First()
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id,
                                 streamer=streamer)
        latencies.append(time.perf_counter() - t0)
        ttfts.append((streamer.first or time.perf_counter()) - t0)
        tokens += out.shape[1] - ids["input_ids"].shape[1]
    return summary(latencies, ttfts, tokens, time.perf_counter() - started)


def load(url: str, requests: list[tuple[str, str]], clients: int, max_tokens: int) -> dict:
    """`clients` concurrent streaming clients work through the requests."""
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
    lock = threading.Lock()
    latencies, ttfts, tokens = [], [], [0]

    def one(job: tuple[str, str]) -> None:
        adapter, question = job
        t0 = time.perf_counter()
        first, count = None, 0
        stream = client.chat.completions.create(model=adapter, messages=[{"role": "user", "content": question}], max_tokens=max_tokens,
                                                temperature=0, stream=True, stream_options={"include_usage": True})
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content and first is None:
                first = time.perf_counter()
            if chunk.usage is not None:
                count = chunk.usage.completion_tokens
        with lock:
            latencies.append(time.perf_counter() - t0)
            ttfts.append((first or time.perf_counter()) - t0)
            tokens[0] += count

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, requests))
    return summary(latencies, ttfts, tokens[0], time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=32, help="requests per row [default: 32]")
    parser.add_argument("--max_tokens", type=int, default=32)
    parser.add_argument("--clients", default="1,4,16")
    args = parser.parse_args()

    from slmops.config import ExportConfig
    from slmops.deploy.export import export_bundle, plan_export
    from slmops.models.builtin import fetch_builtin

    model_path = fetch_builtin("smollm2-135m-instruct")
    requests = [(("tone", "qa")[i % 2], QUESTIONS[i % len(QUESTIONS)]) for i in range(args.requests)]
    with tempfile.TemporaryDirectory() as tmp:
        adapters = {"tone": random_adapter(model_path, Path(tmp) / "tone", 1, ["q_proj", "v_proj"]),
                    "qa": random_adapter(model_path, Path(tmp) / "qa", 2, ["q_proj", "k_proj", "v_proj", "o_proj"])}
        bundle = Path(tmp) / "bundle"
        started = time.perf_counter()
        export_bundle(plan_export(ExportConfig(model_name_or_path=str(model_path), adapter_path=[str(p) for p in adapters.values()],
                                               adapter_names=list(adapters), precision="int4", output_path=str(bundle), no_parity=True)))
        print(f"int4 bundle with both adapters exported in {time.perf_counter() - started:.0f} s", file=sys.stderr)

        rows = {"peer: transformers+PEFT, one at a time": peer(model_path, adapters, requests, args.max_tokens)}
        clients = [int(c) for c in args.clients.split(",")]
        server = subprocess.Popen([sys.executable, "-m", "slmops.cli.main", "serve", "-m", str(bundle), "--port", "0",
                                   "--max_concurrency", str(max(clients)), "--max_queue", str(args.requests)],
                                  stderr=subprocess.PIPE, text=True)
        try:
            url = None
            while url is None:
                line = server.stderr.readline()
                if not line:
                    raise SystemExit("the server did not start")
                found = re.search(r"on (http://[\d.]+:\d+)/v1", line)
                url = found[1] if found else None
            threading.Thread(target=server.stderr.read, daemon=True).start()
            load(url, requests[:4], 2, 4)  # warm-up
            for count in clients:
                rows[f"slmops serve, int4 bundle, {count} clients"] = load(url, requests, count, args.max_tokens)
        finally:
            server.terminate()
            server.wait()

    peer_row = next(iter(rows.values()))
    print(f"\nCPU: {cpu_name()} ({os.cpu_count()} cores); torch {torch.__version__}; SmolLM2-135M-Instruct, 2 adapters (LoRA r=16), "
          f"{args.requests} chat requests alternating adapters, {args.max_tokens} new tokens each, greedy\n")
    print("| row | requests/s | p50 latency s | p95 latency s | p50 time to first token s | tokens/s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, row in rows.items():
        print(f"| {name} | {row['rps']:.2f} | {row['p50']:.2f} | {row['p95']:.2f} | {row['ttft']:.3f} | {row['tok_s']:.0f} |")
    print()
    for count in clients:
        row = rows[f"slmops serve, int4 bundle, {count} clients"]
        print(f"ratio_rps_serve_c{count}_vs_peer: {row['rps'] / peer_row['rps']:.2f}")
        print(f"ratio_ttft_serve_c{count}_vs_peer: {peer_row['ttft'] / row['ttft']:.2f}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
