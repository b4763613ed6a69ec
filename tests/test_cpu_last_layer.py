"""The last decoder layer's MLP on a packed batch's loss rows only (cpu/last_layer.py): it runs
on exactly the labelled rows, gives the padded batch's loss and gradients (LoRA, with gradient
checkpointing's recomputation, and full fine-tuning, whose MLP weights train), leaves batches that
are mostly labelled alone, and a wrong choice of rows turns the path off at the start-up check."""

import logging

import pytest
import torch

from slmops.finetune_recipe import plan_finetune
from slmops.train.cpu import last_layer, packing as fast_packing
from slmops.train.cpu.path import FastPath
from slmops.train.loss import IGNORE, packed_loss, selective_loss

from helpers import much_padding, tiny_config, trained_a_little


def _loss_and_grads(model, loss_fn, batch):
    model.zero_grad()
    loss, count = loss_fn(model, batch)
    (loss / count).backward()
    return float(loss) / count, {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}


def _model(tiny_llama, tmp_path, method="lora", checkpointing=False):
    options = {"target_modules": "all-linear", "lora_dropout": 0.0} if method == "lora" else {}
    plan = plan_finetune(tiny_config(tiny_llama, tmp_path / "m", method=method, gradient_checkpointing=checkpointing, **options))
    return plan, trained_a_little(plan).train()


def _rows_seen(model) -> list[int]:
    """The rows each call of the last layer's MLP computes (its gate projection's input: a module
    call with LoRA on every linear, and in full fine-tuning)."""
    seen = []
    model.get_decoder().layers[-1].mlp.gate_proj.register_forward_pre_hook(
        lambda module, args: seen.append(args[0].reshape(-1, args[0].shape[-1]).shape[0]))
    return seen


@pytest.mark.parametrize("method,checkpointing", [("lora", False), ("lora", True), ("full", False)])
def test_the_last_mlp_runs_on_the_loss_rows_with_the_same_loss_and_gradients(tiny_llama, tmp_path, monkeypatch, method, checkpointing):
    plan, model = _model(tiny_llama, tmp_path, method, checkpointing)
    expected_loss, expected_grads = _loss_and_grads(model, selective_loss, much_padding(plan))  # the model's own layers, padded
    path = FastPath.install(model)
    assert path.last_layer_on_loss_rows and "the last layer's MLP on a packed batch's labelled rows only" in path.describe()
    batch = much_padding(plan)
    labelled = int((batch["labels"][:, 1:] != IGNORE).sum())
    assert labelled < last_layer.MOST_ROWS * int(batch["attention_mask"].sum())  # the tone completions: a few rows each
    seen = _rows_seen(model)
    loss, grads = _loss_and_grads(model, packed_loss, batch)
    assert seen[0] == labelled and set(seen) == {labelled}  # (and again when checkpointing recomputes the layer)
    assert len(seen) == (2 if checkpointing else 1)
    assert loss == pytest.approx(expected_loss, rel=1e-5)
    for key in expected_grads:
        torch.testing.assert_close(grads[key], expected_grads[key], rtol=1e-4, atol=5e-6)  # (fp32, other sum orders)
    assert any("layers.1.mlp" in key and grads[key].abs().sum() > 0 for key in grads), "the last MLP's weights still learn"
    path.remove()


def test_mostly_labelled_batches_and_other_forwards_run_every_row(tiny_llama, tmp_path, monkeypatch):
    plan, model = _model(tiny_llama, tmp_path)
    FastPath.install(model)
    batch = much_padding(plan)
    batch = {**batch, "labels": batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE)}  # loss on every token
    seen = _rows_seen(model)
    _loss_and_grads(model, packed_loss, batch)
    with torch.no_grad():
        selective_loss(model, much_padding(plan))  # no packing: every row, and nothing left over from the packed batch
    rows = fast_packing.Packing.of(batch["attention_mask"]).rows  # (the real tokens, rounded up)
    assert seen == [rows, much_padding(plan)["input_ids"].numel()]


def test_a_wrong_choice_of_rows_turns_the_path_off(tiny_llama, tmp_path, monkeypatch, caplog):
    plan, model = _model(tiny_llama, tmp_path)
    path = FastPath.install(model)
    batch = much_padding(plan)
    assert path.verify(model, packed_loss, batch)
    own = last_layer.loss_rows
    monkeypatch.setattr(last_layer, "loss_rows", lambda targets, ignore: (lambda rows: None if rows is None else rows - 1)(own(targets, ignore)))
    with caplog.at_level(logging.WARNING, logger="slmops"):
        assert not path.verify(model, packed_loss, batch)
    assert "disagrees with the model's own forward" in caplog.text
