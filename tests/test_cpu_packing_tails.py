"""Each example's tokens after its last loss row (at least its last token, which predicts nothing)
are left out of a packed batch (packing.loss_free_tail, PackingPolicy.trim_tails): which tokens
stay, and the same loss and gradients as the padded batch and as packing every token."""

import dataclasses
import functools

import pytest
import torch
import torch.nn.functional as F

from slmops.data.tokenize import IGNORE
from slmops.train.cpu.packing import FP32_ALONE, Packing, loss_free_tail
from slmops.train.cpu.path import FastPath
from slmops.train.loss import packed_loss, selective_loss

from test_cpu_packed_attention import llama_head_32  # noqa: F401 (fixture)
from test_cpu_shared_prefix import _batch, _loss_and_grads, _model

KEEP_TAILS = dataclasses.replace(FP32_ALONE, trim_tails=False)


def _ending_early(vocab: int, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """_batch's examples (lengths 14, 9, 17; a loss from position 8 on), the first with its last
    three tokens loss-free, the third with no loss after position 11."""
    batch = _batch(vocab, pad_id=pad_id)
    batch["labels"][0, 11:] = IGNORE
    batch["labels"][2, 12:] = IGNORE
    return batch


def test_the_tail_after_the_last_loss_row_is_left_out():
    batch = _ending_early(50)
    kept = loss_free_tail(batch["attention_mask"].bool(), batch["labels"])
    # the last loss row is the position before the last labelled token: 9 (label 10), 7 (label 8), 10 (label 11)
    assert kept.sum(1).tolist() == [10, 8, 11]
    assert kept.equal(torch.arange(17)[None] < torch.tensor([10, 8, 11])[:, None])
    # an example without a loss keeps its first token; a one-token example keeps it
    batch["labels"][1] = IGNORE
    assert loss_free_tail(batch["attention_mask"].bool(), batch["labels"]).sum(1).tolist() == [10, 1, 11]
    one = torch.ones(1, 1, dtype=torch.bool)
    assert loss_free_tail(one, torch.tensor([[5]])).sum().item() == 1


def test_packing_leaves_each_tail_out_as_the_policy_says():
    batch = _ending_early(50)
    args = dict(input_ids=batch["input_ids"], labels=batch["labels"])
    trimmed = Packing.of(batch["attention_mask"], policy=FP32_ALONE.unshared(), **args)
    assert trimmed.lengths == [10, 8, 11] and trimmed.tokens == 29
    assert trimmed.position_ids()[0].tolist() == [*range(10), *range(8), *range(11)]
    # with the shared prefix (the first 6 tokens) as well
    shared = Packing.of(batch["attention_mask"], policy=FP32_ALONE, **args)
    assert shared.prefix == 6 and shared.lengths == [10, 2, 5]
    # without trim_tails, or without the labels, every real token is packed
    assert Packing.of(batch["attention_mask"], policy=KEEP_TAILS.unshared(), **args).tokens == 40
    assert Packing.of(batch["attention_mask"], policy=FP32_ALONE).tokens == 40
    # a batch without padding packs now: its last tokens are left out
    full = _batch(50, lengths=(12, 12, 12), common=3)
    assert Packing.of(full["attention_mask"], policy=KEEP_TAILS, input_ids=full["input_ids"], labels=full["labels"]) is None
    assert Packing.of(full["attention_mask"], policy=FP32_ALONE, input_ids=full["input_ids"], labels=full["labels"]).tokens == 33


@pytest.mark.parametrize("attention", ["kernel", "own"])
def test_left_out_tails_train_as_the_padded_batch(llama_head_32, tmp_path, monkeypatch, attention):
    """fp32 LoRA on every linear layer: the loss and every gradient as with every token packed and as
    the padded batch, on the fast path (the fp32 kernel where built, else SDPA per sequence) and on
    the model's own attention with the packing's mask."""
    plan, model = _model(llama_head_32, tmp_path)
    path = FastPath.install(model)
    path.enabled = attention != "own"
    batch = _ending_early(model.config.vocab_size, pad_id=plan.tokenizer.pad_token_id)
    rows = []
    own_of = Packing.of
    monkeypatch.setattr(Packing, "of", staticmethod(lambda *a, **k: (lambda p: rows.append(p.tokens) or p)(own_of(*a, **k))))
    for policy in (FP32_ALONE, FP32_ALONE.unshared()):
        loss, grads = _loss_and_grads(model, functools.partial(packed_loss, policy=policy), batch)
        kept_loss, kept_grads = _loss_and_grads(model, functools.partial(packed_loss, policy=dataclasses.replace(policy, trim_tails=False)), batch)
        padded_loss, padded_grads = _loss_and_grads(model, selective_loss, batch)
        for other_loss, other_grads in ((kept_loss, kept_grads), (padded_loss, padded_grads)):
            assert loss == pytest.approx(other_loss, rel=1e-5)
            assert F.cosine_similarity(grads, other_grads, dim=0) > 1 - 1e-6
            assert float((grads - other_grads).norm() / other_grads.norm()) < 1e-4
    assert rows == [17, 28, 29, 40]  # shared and trimmed, shared, trimmed, every token
