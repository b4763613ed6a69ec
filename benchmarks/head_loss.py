"""The chunked output head and cross-entropy (`slmops.train.loss.ChunkedHeadLoss`, what training
uses when a batch's logits would pass 64 MB: long sequences with the loss on every token) against
its peer, the head followed by cross-entropy as the model's own forward computes them
(`F.linear` then `F.cross_entropy` on the full tokens x vocabulary logits), forward and backward
in bf16, on the shapes of the training benchmark: SmolLM2-135M's head (576 x 49,152) on a codes
micro-batch's 12,288 tokens, and a 1B Llama shape's (2,048 x 49,152) on 2,040 tokens.

    python benchmarks/head_loss.py      # ~1 minute on 2 cores

Prints the CPU and, per shape, each row's median milliseconds over 5 calls (alternating) and the
ratio peer / chunked (above 1: the chunked head is faster), and the logits memory each keeps.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from common import cpu_name  # (benchmarks/common.py)

from slmops.train.loss import CHUNK_LOGITS, ChunkedHeadLoss

SHAPES = {"smollm2_135m codes batch": (12288, 576, 49152), "llama1b batch": (2040, 2048, 49152)}


def main() -> None:
    torch.manual_seed(0)
    print(f"CPU: {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    for name, (tokens, hidden_size, vocab) in SHAPES.items():
        hidden = torch.randn(tokens, hidden_size, dtype=torch.bfloat16, requires_grad=True)
        weight = (torch.randn(vocab, hidden_size) * 0.02).to(torch.bfloat16)  # frozen, as under LoRA
        targets = torch.randint(0, vocab, (tokens,))

        def chunked():
            hidden.grad = None
            ChunkedHeadLoss.apply(hidden, weight, None, targets, None).backward()

        def peer():
            hidden.grad = None
            F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum").backward()

        times = {"chunked": [], "peer": []}
        chunked(), peer()
        for _ in range(5):
            for row, run in (("chunked", chunked), ("peer", peer)):
                started = time.perf_counter()
                run()
                times[row].append(time.perf_counter() - started)
        ms = {row: sorted(t)[len(t) // 2] * 1000 for row, t in times.items()}
        chunk_rows = max(1, CHUNK_LOGITS // vocab)
        print(f"{name}: {tokens} tokens x {vocab} words, hidden {hidden_size}: chunked {ms['chunked']:.0f} ms "
              f"(logits {min(tokens, chunk_rows) * vocab * 6 / 2**20:.0f} MB at a time), head then cross-entropy "
              f"{ms['peer']:.0f} ms (logits {tokens * vocab * 6 / 2**20:.0f} MB, and cross-entropy keeps more for the backward)")
        print(f"ratio_vs_head_then_cross_entropy[{name}]: {ms['peer'] / ms['chunked']:.2f}")


if __name__ == "__main__":
    main()
