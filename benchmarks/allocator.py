"""glibc's malloc with the thresholds the CPU fast path raises (`slmops.train.cpu.allocator`:
blocks under 64 MB from the heap, freed heap kept) against its peer, glibc's defaults (a fresh
mmap, faulted in page by page, for each block over its mmap threshold), on one frozen Llama MLP
forward and backward as training runs it (`FrozenMLPFunction`: three products and the fused
SwiGLU, 2,048 tokens), on SmolLM2-135M's shape and a 1B Llama shape. The setting is
process-wide and permanent, so each row runs in its own process, the rows alternating.

    python benchmarks/allocator.py      # ~1 minute on 2 cores

Prints the CPU and, per shape, each row's median milliseconds (5 rounds of 5 calls) and the
ratio default / tuned (above 1: the tuned allocator is faster), with each process's peak RSS.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time

SHAPES = {"smollm2_135m (576 -> 1,536)": (576, 1536), "llama1b (2,048 -> 8,192)": (2048, 8192)}
TOKENS = 2048  # a 1B benchmark micro-batch: 8 x 256


def measure(shape: str, tuned: bool) -> dict:
    import torch

    from slmops.train.cpu import allocator
    from slmops.train.cpu import kernels as kernels_module
    from slmops.train.cpu.mlp import FrozenMLPFunction

    if tuned and not allocator.keep_freed_blocks():
        raise SystemExit("the malloc thresholds could not be raised here (not glibc, or MALLOC_* set)")
    kernels = kernels_module.get()
    if kernels is None:
        raise SystemExit("the C kernels did not build (no C compiler?): nothing to measure")
    hidden, inner = SHAPES[shape]
    torch.manual_seed(0)
    x = torch.randn(TOKENS, hidden, dtype=torch.bfloat16, requires_grad=True)
    weights = [(torch.randn(*s) * 0.02).to(torch.bfloat16) for s in ((inner, hidden), (inner, hidden), (hidden, inner))]
    grad = torch.randn(TOKENS, hidden, dtype=torch.bfloat16)

    def step():
        x.grad = None
        FrozenMLPFunction.apply(x, *weights, kernels, None).backward(grad)

    step()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(5):
            step()
        times.append((time.perf_counter() - start) / 5 * 1e3)
    return {"ms": statistics.median(times), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    from common import cpu_name  # (benchmarks/common.py)

    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "SLMOPS_MALLOC_TUNING"}
    print(f"CPU: {cpu_name()}, {os.cpu_count()} logical cores")
    for shape in SHAPES:
        rows: dict[str, list[dict]] = {"default": [], "tuned": []}
        for _ in range(2):
            for row in rows:
                out = subprocess.run([sys.executable, __file__, "--worker", shape, row], env=env, capture_output=True, text=True,
                                     check=True)
                rows[row].append(json.loads(out.stdout.strip().splitlines()[-1]))
        ms = {row: statistics.median(r["ms"] for r in runs) for row, runs in rows.items()}
        rss = {row: max(r["peak_rss_mb"] for r in runs) for row, runs in rows.items()}
        print(f"\n{shape}, {TOKENS} tokens, MLP forward + backward:")
        for row in rows:
            print(f"  {row:8s} {ms[row]:8.1f} ms   peak RSS {rss[row]:7.0f} MB")
        print(f"  ratio default / tuned: {ms['default'] / ms['tuned']:.2f}x, peak RSS tuned / default {rss['tuned'] / rss['default']:.2f}x")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        print(json.dumps(measure(sys.argv[2], sys.argv[3] == "tuned")))
    else:
        main()
