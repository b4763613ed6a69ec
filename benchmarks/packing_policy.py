"""Padding-free batches under one packing policy against its peer, in the same training run:
`slmops.train.cpu.packing.PackingPolicy` decides which batches of a run train packed (their real
tokens only) and whether a short packed batch's attention runs per sequence in the packed
attention kernel or back in the padded layout around each layer. The two policies alternate step
by step inside one process, so the hour, the model and the data are the same for both; a second
process swaps the parities, so each policy runs every batch once.

    python benchmarks/packing_policy.py                                  # tone, LoRA: the machine's policy vs PADDED_ATTENTION
    python benchmarks/packing_policy.py --workload chat_qa --steps 24
    python benchmarks/packing_policy.py --method full                    # also: qlora
    python benchmarks/packing_policy.py --policies FP32_ALONE,PADDED_ATTENTION   # any two named in slmops/train/cpu/packing.py

Each process: ~2 minutes for 40 steps of tone on 2 cores. Prints the CPU, each policy's tokens/s
over the steps it ran (real tokens, as the training loop counts them) and the ratio candidate / peer (above 1: the candidate is faster), with the median of the per-batch
ratios. Uses the training benchmark's workloads (benchmarks/train_throughput.py) on the built-in
model.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import Alternation, cpu_name, print_alternating_report, run_both_parities  # noqa: E402


class Alternating:
    """Stands in for a PackingPolicy (the same attributes, read by Packing as each batch packs):
    the candidate's on the steps of one parity, the peer's on the others (common.Alternation)."""

    def __init__(self, candidate, peer, parity: int, alternation: Alternation | None = None):
        self.candidate, self.peer = candidate, peer
        self.alternation = alternation or Alternation(parity)
        self.after_step = self.alternation.after_step
        self.arms = self.alternation.arms  # step -> ran the candidate

    def unshared(self) -> "Alternating":
        return Alternating(self.candidate.unshared(), self.peer.unshared(), self.alternation.parity, self.alternation)

    @property
    def now(self):
        return self.candidate if self.alternation.on() else self.peer

    row_multiple = property(lambda self: self.now.row_multiple)
    pack_below = property(lambda self: self.now.pack_below)
    short_alone = property(lambda self: self.now.short_alone)
    share_prefix = property(lambda self: self.now.share_prefix)
    trim_tails = property(lambda self: self.now.trim_tails)

    def describe(self) -> str:
        return f"alternating per step: {self.candidate.describe()} / {self.peer.describe()}"


def worker(args) -> None:
    import train_throughput as tt

    from slmops.models.builtin import fetch_builtin
    from slmops.train.cpu import packing as fast_packing
    from slmops.train.cpu.path import FastPath
    from slmops.train.trainer import TrainingHooks

    own_policy = FastPath.packing_policy
    names = args.policies.split(",") if args.policies else None
    chosen = {}

    def packing_policy(self, compute_dtype):
        if not chosen:
            machine = own_policy(self, compute_dtype)
            candidate, peer = (getattr(fast_packing, n) for n in names) if names else (machine, fast_packing.PADDED_ATTENTION)
            if candidate == peer:
                raise SystemExit(f"both policies are {candidate}: nothing to compare (this machine's own is "
                                 f"{'PADDED_ATTENTION' if machine == fast_packing.PADDED_ATTENTION else machine}; name two with --policies)")
            chosen["policy"] = Alternating(candidate, peer, args.parity)
            chosen["dtype"] = str(compute_dtype).removeprefix("torch.")
        return chosen["policy"]

    FastPath.packing_policy = packing_policy
    work = tt.WORKLOADS[args.workload]
    model_dir = str(fetch_builtin("smollm2-135m-instruct"))
    # the start-up checks run on step 1's policy; every step after it is timed
    hooks = TrainingHooks(after_step=lambda step: chosen["policy"].after_step(step) if chosen else None)
    result = tt.run_slmops(work, args.workload, model_dir, args.steps, 1, {"method": args.method}, args.seed, hooks=hooks)
    if not chosen:
        raise SystemExit("the run trained no padding-free batches (the fast path or its packing check is off here)")
    policy = chosen["policy"]
    # run_slmops' timed records are steps 2 .. steps + 1
    rows = [{"step": i + 2, "candidate": policy.arms[i + 2], "seconds": s, "tokens": t}
            for i, (s, t) in enumerate(zip(result["step_seconds"], result["tokens"]))]
    Path(args.out).write_text(json.dumps({"rows": rows, "dtype": chosen["dtype"],
                                          "candidate": repr(policy.candidate), "peer": repr(policy.peer)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="tone", choices=["tone", "chat_qa", "codes"])
    parser.add_argument("--method", default="lora", choices=["lora", "qlora", "full"])
    parser.add_argument("--steps", type=int, default=40, help="timed steps per process (each policy half of them)")
    parser.add_argument("--policies", help="CANDIDATE,PEER: two PackingPolicy constants of slmops.train.cpu.packing "
                        "(default: the policy this machine trains with, against PADDED_ATTENTION)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--parity", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.out:
        return worker(args)
    print(f"CPU: {cpu_name()} ({os.cpu_count()} logical cores)")
    runs = run_both_parities(__file__, ["--workload", args.workload, "--method", args.method, "--steps", str(args.steps),
                                        "--seed", str(args.seed), *(["--policies", args.policies] if args.policies else [])])
    print(f"\n{args.workload}, {args.method}, products in {runs[0]['dtype']}, {args.steps} timed steps in each of 2 processes")
    print(f"candidate: {runs[0]['candidate']}\npeer:      {runs[0]['peer']}")
    print_alternating_report(runs)

if __name__ == "__main__":
    main()
