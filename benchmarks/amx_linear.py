"""The AMX forward product on packed weights (`Kernels.amx_linear`, the CPU fast path's forward
for frozen base weights) against its peer, oneDNN's linear (`torch.nn.functional.linear`), on the
shapes training meets: SmolLM2-135M's projections at 320 to 8,192 rows (tokens of a micro-batch)
and a 1B Llama's at 2,048. Where the ratio falls below 1 sets `AMX_LINEAR_MAX_ROWS` in
src/slmops/train/cpu/kernels.py. Needs a CPU with AMX.

    python benchmarks/amx_linear.py      # ~1 minute on 2 cores

Prints the CPU and, per shape, both GFLOP/s (median of 8) and the ratio amx_linear / oneDNN,
measured twice, alternating.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from common import cpu_name, median_seconds  # (benchmarks/common.py)

from slmops.train.cpu import kernels as cpu_kernels

SHAPES = [(rows, shape) for rows in (320, 1024, 2048, 8192) for shape in [(1536, 576), (576, 1536), (192, 576), (576, 576)]] + \
    [(2048, (8192, 2048)), (2048, (2048, 8192)), (2048, (2048, 2048))]


def main() -> None:
    kernels = cpu_kernels.get()
    if kernels is None or not kernels.amx:
        raise SystemExit("this CPU (or build) has no AMX tiles: nothing to compare")
    print(f"cpu: {cpu_name()}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"AMX_LINEAR_MAX_ROWS = {cpu_kernels.AMX_LINEAR_MAX_ROWS}")
    print(f"{'rows':>6} {'weight (out x in)':>18} {'oneDNN GFLOP/s':>15} {'amx GFLOP/s':>12} {'ratio (twice)':>14}")
    for rows, (out_features, in_features) in SHAPES:
        weight = torch.randn(out_features, in_features).bfloat16()
        x = torch.randn(rows, in_features).bfloat16()
        packed = kernels.pack_weight(weight)
        ratios = []
        for _ in range(2):
            onednn = median_seconds(lambda: F.linear(x, weight))
            amx = median_seconds(lambda: kernels.amx_linear(x, packed))
            ratios.append(onednn / amx)
        flops = 2 * rows * out_features * in_features
        print(f"{rows:6d} {f'{out_features} x {in_features}':>18} {flops / onednn / 1e9:15.0f} {flops / amx / 1e9:12.0f} "
              f"{ratios[0]:6.2f} {ratios[1]:6.2f}")


if __name__ == "__main__":
    main()
