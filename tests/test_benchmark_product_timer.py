"""The benchmark's product timer (benchmarks/train_throughput.py, `--profile`): every matrix
product of a forward and backward, the backward's transposed ones included, timed by shape."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import train_throughput  # noqa: E402


def test_the_timer_sees_forward_and_backward_products_by_shape():
    torch.manual_seed(0)
    first, second = torch.nn.Linear(32, 48, bias=False), torch.nn.Linear(48, 16)
    x = torch.randn(24, 32)
    with train_throughput.product_timer() as timer:
        for _ in range(3):
            second(first(x).relu()).sum().backward()
    rows = {(r["op"], r["shapes"]): r for r in timer.by_shape(wall=10.0, most=20)}
    assert rows[("mm", "[24, 32] x [32, 48]")]["calls"] == 3  # first's forward (x @ W^T)
    assert rows[("addmm", "[24, 48] x [48, 16]")]["calls"] == 3  # second's forward, bias added
    assert rows[("mm", "[16, 24] x [24, 48]")]["calls"] == 3  # second's weight gradient: transposed A
    assert rows[("mm", "[48, 24] x [24, 32]")]["calls"] == 3  # first's weight gradient
    assert rows[("mm", "[24, 16] x [16, 48]")]["calls"] == 3  # the input gradient between them
    assert all(r["gflops"] > 0 and 0 < r["share"] < 1 for r in rows.values())
    assert len(rows) == 5  # (x needs no gradient: no product for it)
    with torch.no_grad():
        first(x)
    after = {(r["op"], r["shapes"]): r["calls"] for r in timer.by_shape(wall=10.0, most=20)}
    assert after[("mm", "[24, 32] x [32, 48]")] == 3  # nothing timed once the mode is left
