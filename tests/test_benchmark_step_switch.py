"""The step-switch benchmark's switches (benchmarks/step_switch.py): each change runs on the steps
of one parity and the other way on the rest, and each step is booked to the way it ran."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import step_switch  # noqa: E402

from slmops.train import optimizer, trainer  # noqa: E402
from slmops.train.cpu import norm  # noqa: E402
from slmops.train.cpu.patches import Patches  # noqa: E402


def test_the_alternation_books_each_step_to_its_way():
    for parity in (0, 1):
        alternation = step_switch.Alternation(parity)
        for step in range(1, 7):
            assert alternation.on() == (step % 2 == parity)
            alternation.after_step(step)
        assert alternation.arms == {step: step % 2 == parity for step in range(1, 7)}


def test_trainable_norms_take_the_fused_function_on_the_candidate_steps_only(monkeypatch):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    monkeypatch.setattr(norm, "install", norm.install)  # (restored after the test)
    alternation = step_switch.Alternation(parity=1)
    step_switch.switch_trainable_norms(alternation)
    trainable, frozen = LlamaRMSNorm(16), LlamaRMSNorm(16).requires_grad_(False)
    patches = Patches()
    for module in (trainable, frozen):
        norm.install(patches, module, lambda: True, None)
    x = torch.randn(3, 16, requires_grad=True)
    try:
        for step in range(1, 5):
            fused = type(trainable(x).grad_fn).__name__.startswith("RMSNormFunction")
            assert fused == alternation.on()
            assert type(frozen(x).grad_fn).__name__.startswith("RMSNormFunction")  # frozen norms: always fused
            alternation.after_step(step)
    finally:
        patches.undo()


def test_clipping_takes_slmops_step_on_the_candidate_steps_only(monkeypatch):
    monkeypatch.setattr(trainer, "clipped_step", trainer.clipped_step)  # (restored after the test)
    calls = []
    real_clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(optimizer, "clipped_step", lambda *args: calls.append("slmops") or torch.tensor(1.0))
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *args: calls.append("torch") or real_clip(*args))
    alternation = step_switch.Alternation(parity=0)
    step_switch.switch_clipping(alternation)
    param = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.SGD([param], lr=0.1)
    for step in range(1, 5):
        param.grad = torch.ones(4)
        trainer.clipped_step(opt, [param], 1.0)
        alternation.after_step(step)
    assert calls == ["torch", "slmops", "torch", "slmops"]


def test_shared_prefix_packs_once_on_the_candidate_steps_only(monkeypatch):
    from slmops.train.cpu import packing as fast_packing

    monkeypatch.setattr(fast_packing.Packing, "of", fast_packing.Packing.of)  # (restored after the test)
    alternation = step_switch.Alternation(parity=1)
    step_switch.switch_shared_prefix(alternation)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [5, 6, 7, 8, 11, 12]])
    labels = torch.tensor([[-100] * 5 + [10], [-100] * 5 + [12]])
    for step in range(1, 5):
        packing = fast_packing.Packing.of(torch.ones_like(ids), policy=fast_packing.FP32_ALONE, input_ids=ids, labels=labels)
        assert (packing is not None and packing.prefix == 4) == alternation.on()
        alternation.after_step(step)


def test_trim_tails_leaves_the_tails_out_on_the_candidate_steps_only(monkeypatch):
    from slmops.train.cpu import packing as fast_packing

    monkeypatch.setattr(fast_packing.Packing, "of", fast_packing.Packing.of)  # (restored after the test)
    alternation = step_switch.Alternation(parity=0)
    step_switch.switch_trim_tails(alternation)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [5, 9, 7, 8, 11, 12]])
    labels = torch.tensor([[-100] * 3 + [8, 9, 10], [-100] * 3 + [8, 11, -100]])
    mask = torch.tensor([[1] * 6, [1] * 5 + [0]])
    for step in range(1, 5):
        packing = fast_packing.Packing.of(mask, policy=fast_packing.FP32_ALONE, input_ids=ids, labels=labels)
        assert packing.tokens == (9 if alternation.on() else 11)  # each example's last token left out, or not
        alternation.after_step(step)
