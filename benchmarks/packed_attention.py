"""Causal attention of a packed batch in one C kernel (`PackedAttentionFunction`, the CPU fast
path's attention for long padding-free batches) against its peer, SDPA called once per sequence
(flash on a CPU: what the path runs without the kernel), forward and backward on the shapes of the
training benchmark's long workloads: codes (SmolLM2-135M's 9 heads over 3 key/value heads, 16
documents of 512-1,023 tokens) and llama1b (32 heads over 8, 8 sequences of ~200-256 tokens), head
size 64. In the dtype the fast path trains in on this CPU (--dtype auto): bf16 on AMX tiles where
the CPU has them, else on AVX512-BF16 dot products; fp32 (packed_attention_f32.c, AVX2 + FMA) on a
CPU with neither, against SDPA in fp32.

    python benchmarks/packed_attention.py      # ~1 minute on 2 cores
    # the AVX512-BF16 products on an AMX CPU, against SDPA with oneDNN held to the same ISA (as on an AMD EPYC;
    # slmops' tile kernels follow oneDNN's cap):
    ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 python benchmarks/packed_attention.py
    python benchmarks/packed_attention.py --dtype fp32   # the fp32 kernel, on any CPU with AVX2
    # (training uses the fp32 kernel where the CPU has no AVX-512; this is how to compare it on one that has)

Prints the CPU and, per shape, the milliseconds of one layer's forward + backward (median of 5),
the GFLOP/s they make (causal: half the square), and the ratio SDPA / kernel, measured twice,
alternating; and the largest difference between the two outputs.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from common import cpu_name, median_seconds  # (benchmarks/common.py)

from slmops.train.cpu import kernels as cpu_kernels
from slmops.train.cpu.attention import PackedAttentionFunction

SHAPES = {  # name: (sequence lengths, heads, key/value heads, head size)
    "codes": ([512 + (i * 37) % 512 for i in range(16)], 9, 3, 64),
    "llama1b": ([256 - (i * 13) % 60 for i in range(8)], 32, 8, 64),
}


def sdpa_per_sequence(q, k, v, lengths, scale):
    outputs = []
    for q_i, k_i, v_i in zip(q.split(lengths), k.split(lengths), v.split(lengths)):
        out = F.scaled_dot_product_attention(q_i.transpose(0, 1)[None], k_i.transpose(0, 1)[None], v_i.transpose(0, 1)[None],
                                             is_causal=True, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
        outputs.append(out[0].transpose(0, 1))
    return torch.cat(outputs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto",
                        help="auto: bf16 where the CPU has its kernel (AMX or AVX512-BF16), else fp32")
    args = parser.parse_args()
    kernels = cpu_kernels.get()
    if kernels is None:
        raise SystemExit("the C kernels did not build here (no C compiler?): nothing to compare")
    use_bf16 = args.dtype == "bf16" or (args.dtype == "auto" and kernels.packed_attention)
    # the fp32 kernel wherever it builds: this benchmark is how it gets measured on CPUs where training
    # does not use it yet (AVX-512 ones)
    kernels.packed_attention_f32 = kernels.packed_attention_f32_built
    if not (kernels.packed_attention if use_bf16 else kernels.packed_attention_f32):
        raise SystemExit(f"this CPU (or build) has no {'bf16 (AMX or AVX512-BF16)' if use_bf16 else 'fp32 (AVX2 + FMA)'} "
                         "packed attention kernel: nothing to compare")
    dtype = torch.bfloat16 if use_bf16 else torch.float32
    where = ("AMX tiles" if kernels.amx else "AVX512-BF16") if use_bf16 else "AVX2 + FMA"
    print(f"cpu: {cpu_name()}; torch {torch.__version__}, {torch.get_num_threads()} threads; {dtype}, the kernel on "
          f"{where}")
    print(f"{'shape':>8} {'SDPA ms':>8} {'GFLOP/s':>8} {'ours ms':>9} {'GFLOP/s':>8} {'ratio (twice)':>14} {'max diff':>9}")
    torch.manual_seed(0)
    for name, (lengths, heads, kv_heads, dim) in SHAPES.items():
        tokens, scale = sum(lengths), dim**-0.5
        offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
        q, k, v = (torch.randn(tokens, h, dim, dtype=dtype, requires_grad=True) for h in (heads, kv_heads, kv_heads))
        grad = torch.randn(tokens, heads, dim, dtype=dtype)

        def sdpa():
            sdpa_per_sequence(q, k, v, lengths, scale).backward(grad)

        def kernel():
            PackedAttentionFunction.apply(q, k, v, offsets, scale, kernels).backward(grad)

        ratios = []
        for _ in range(2):
            sdpa_s, kernel_s = median_seconds(sdpa, repeats=5, warmup=1), median_seconds(kernel, repeats=5, warmup=1)
            ratios.append(sdpa_s / kernel_s)
        with torch.no_grad():
            diff = float((sdpa_per_sequence(q, k, v, lengths, scale).float()
                          - PackedAttentionFunction.apply(q, k, v, offsets, scale, kernels).float()).abs().max())
        # forward: 2 products of L x L/2 x D multiply-adds per head; backward 5 (one of them the recomputed scores)
        flops = sum(7 * 2 * length * length / 2 * dim * heads for length in lengths)
        print(f"{name:>8} {sdpa_s * 1e3:8.1f} {flops / sdpa_s / 1e9:8.0f} {kernel_s * 1e3:9.1f} {flops / kernel_s / 1e9:8.0f} "
              f"{ratios[0]:6.2f} {ratios[1]:6.2f} {diff:9.4f}")


if __name__ == "__main__":
    main()
