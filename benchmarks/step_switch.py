"""One change to the training step, on and off step by step in the same training process: the
hour, the model and the data are the same for both ways, and a second process swaps the parities,
so each way runs every batch once. (Between two processes of the same run this machine's
throughput moved by ±6%, more than most single changes are worth; docs/benchmarks.md.)

Switches (--switch):
- trainable_norms: full fine-tuning's RMSNorms, whose weights train, on the fused function
  (slmops.train.cpu.norm; the weight's gradient from the C backward) against the modules' own
  forward in PyTorch operators;
- clipping: slmops.train.optimizer.clipped_step (no pass when nothing is clipped; fused AdamW
  divides by the norm's excess in its own pass) against torch's clip_grad_norm_ then step;
- shared_prefix: a prefix that all of a batch's examples share (the chat template's system
  prompt), packed and computed once (slmops.train.cpu.packing.Packing.prefix), against every
  example packed whole (where the machine's packing policy shares prefixes: fp32 products, and bf16 on
  AVX512-BF16 without AMX);
- trim_tails: each example's tokens after its last loss (at least its last token, which predicts
  nothing) left out of the packed rows (slmops.train.cpu.packing.loss_free_tail), against every
  example's tail kept (where the machine's packing policy trims: as for shared_prefix).

    python benchmarks/step_switch.py --switch trainable_norms --method full
    python benchmarks/step_switch.py --switch clipping --method full --steps 40
    python benchmarks/step_switch.py --switch clipping --method lora --workload chat_qa --steps 24
    python benchmarks/step_switch.py --switch shared_prefix --method lora
    python benchmarks/step_switch.py --switch trim_tails --method lora --steps 30

Each process: ~2 minutes for 40 steps of full fine-tuning on tone on 2 cores. Prints the CPU,
each way's tokens/s over the steps it ran (real tokens, as the training loop counts them), the
ratio candidate / peer (above 1: the change is faster) and the median of the per-batch ratios.
Uses the training benchmark's workloads (benchmarks/train_throughput.py) on the built-in model.
For packing policies, benchmarks/packing_policy.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import Alternation, cpu_name, print_alternating_report, run_both_parities  # noqa: E402


def switch_trainable_norms(alternation: Alternation) -> str:
    """The fast path installs trainable norms with an `is_enabled` that also asks the alternation."""
    from slmops.train.cpu import norm

    install = norm.install

    def alternating_install(patches, module, is_enabled, *args):
        if module.weight.requires_grad:
            return install(patches, module, lambda: is_enabled() and alternation.on(), *args)
        return install(patches, module, is_enabled, *args)

    norm.install = alternating_install
    return "trainable RMSNorms on the fused function / the modules' own forward"


def switch_clipping(alternation: Alternation) -> str:
    """The loop's clipped step: slmops' on the candidate's steps, clip_grad_norm_ + step on the others."""
    import torch

    from slmops.train import optimizer, trainer

    def alternating_step(opt, params, max_norm):
        if alternation.on():
            return optimizer.clipped_step(opt, params, max_norm)
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        opt.step()
        return norm

    trainer.clipped_step = alternating_step
    return "clipped_step / clip_grad_norm_ then step"


def _alternate_packing(alternation: Alternation, peer) -> None:
    """Packing.of with the packing policy as the machine has it on the candidate's steps, and
    `peer(policy)` on the others."""
    from slmops.train.cpu import packing as fast_packing

    of = fast_packing.Packing.of

    def alternating_of(attention_mask, only_if_it_pays=True, policy=fast_packing.PADDED_ATTENTION, input_ids=None, labels=None):
        return of(attention_mask, only_if_it_pays, policy if alternation.on() else peer(policy), input_ids, labels)

    fast_packing.Packing.of = staticmethod(alternating_of)


def switch_shared_prefix(alternation: Alternation) -> str:
    """Packing with the packing policy as the machine has it (a prefix that all of a batch's examples
    share, computed once) on the candidate's steps, every example packed whole on the others."""
    _alternate_packing(alternation, lambda policy: policy.unshared())
    return "a shared prefix computed once / every example packed whole"


def switch_trim_tails(alternation: Alternation) -> str:
    """Packing with the packing policy as the machine has it (each example's tokens after its last
    loss left out) on the candidate's steps, every example's tail kept on the others."""
    import dataclasses

    _alternate_packing(alternation, lambda policy: dataclasses.replace(policy, trim_tails=False))
    return "loss-free tails left out / every example's tail kept"


SWITCHES = {"trainable_norms": switch_trainable_norms, "clipping": switch_clipping, "shared_prefix": switch_shared_prefix,
            "trim_tails": switch_trim_tails}


def worker(args) -> None:
    import train_throughput as tt

    from slmops.models.builtin import fetch_builtin
    from slmops.train.trainer import TrainingHooks

    alternation = Alternation(args.parity)
    described = SWITCHES[args.switch](alternation)
    model_dir = str(fetch_builtin("smollm2-135m-instruct"))
    # (the start-up checks run before step 1; every step after the first is timed)
    result = tt.run_slmops(tt.WORKLOADS[args.workload], args.workload, model_dir, args.steps, 1, {"method": args.method},
                           args.seed, hooks=TrainingHooks(after_step=alternation.after_step))
    # run_slmops' timed records are steps 2 .. steps + 1
    rows = [{"step": i + 2, "candidate": alternation.arms[i + 2], "seconds": s, "tokens": t}
            for i, (s, t) in enumerate(zip(result["step_seconds"], result["tokens"]))]
    Path(args.out).write_text(json.dumps({"rows": rows, "described": described, "precision": result["precision"]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--switch", required=True, choices=sorted(SWITCHES))
    parser.add_argument("--workload", default="tone", choices=["tone", "chat_qa", "codes"])
    parser.add_argument("--method", default="full", choices=["lora", "qlora", "full"])
    parser.add_argument("--steps", type=int, default=40, help="timed steps per process (each way half of them)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--parity", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.out:
        return worker(args)
    print(f"CPU: {cpu_name()} ({os.cpu_count()} logical cores)")
    runs = run_both_parities(__file__, ["--switch", args.switch, "--workload", args.workload, "--method", args.method,
                                        "--steps", str(args.steps), "--seed", str(args.seed)])
    print(f"\n{args.workload}, {runs[0]['precision']}, {args.steps} timed steps in each of 2 processes")
    print(f"candidate / peer: {runs[0]['described']}")
    print_alternating_report(runs)

if __name__ == "__main__":
    main()
