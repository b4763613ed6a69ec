"""The packing-policy benchmark's switch (benchmarks/packing_policy.py): the policy Packing reads
alternates with the steps, the parity picks which policy runs the odd ones, and each step is
booked to the policy it ran under."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import packing_policy  # noqa: E402

from slmops.train.cpu.packing import FP32_ALONE, PADDED_ATTENTION, Packing  # noqa: E402


def test_the_policy_alternates_with_the_steps():
    one_short = torch.ones(8, 12, dtype=torch.long)  # one padding token: FP32_ALONE packs it, PADDED_ATTENTION does not
    one_short[3, -1] = 0
    for parity in (0, 1):
        policy = packing_policy.Alternating(FP32_ALONE, PADDED_ATTENTION, parity)
        for step in range(1, 7):
            candidate = step % 2 == parity
            packing = Packing.of(one_short, policy=policy)
            assert (packing is not None) == candidate
            if candidate:
                assert packing.alone and packing.rows == packing.tokens == 95
            assert "alternating per step" in policy.describe()
            policy.after_step(step)
        assert policy.arms == {step: step % 2 == parity for step in range(1, 7)}
