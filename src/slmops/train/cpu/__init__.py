"""The CPU fast path: training on a CPU with far fewer ops than the libraries' own forwards,
checked against them before a run relies on it. Everything low-level lives here:

- path.py      FastPath: install every piece, verify against the model's own forward, remove
               (a context manager); `decide` says whether a run takes it and why not
- patches.py   the one registry of the changes made to a model, undone in one call
- compat.py    every private API of torch / transformers / PEFT / bitsandbytes used, and the
               library versions the path is known to work with (others: off, or --cpu_fast_path on)
- lora.py      LoRA groups (q/k/v as one autograd function, sparse dropout draws)
- attention.py short-batch attention with the rotary embedding inside; a packed batch's attention,
               each sequence alone (or after the prefix its batch shares)
- packing.py   padding-free packing: which batches pack (per kind of CPU), a prefix all of a
               batch's examples share computed once, each example's loss-free tail left out
- norm.py      RMSNorm on a frozen weight;  mlp.py  SwiGLU and the frozen MLP as one node
- embedding.py the tied, trainable embedding's gradient as rows (full fine-tuning)
- quantized.py QLoRA's 4-bit base, dequantized by the C kernel (nf4.c)
- allocator.py glibc's malloc thresholds raised, so a step's large tensors are not faulted in anew
- kernels.py + kernels.c   fused C kernels (AVX-512, AMX where the CPU has them), compiled on
               first use into a private, verified cache

A new kernel: a function in kernels.c, its ctypes binding in kernels.py, and its use in the
piece it speeds up, tested against float64 in tests/test_cpu_kernels.py."""

from slmops.train.cpu.path import FastPath, decide

__all__ = ["FastPath", "decide"]
