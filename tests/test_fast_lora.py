import pytest
import torch

from slmops.data.batching import collate
from slmops.finetune_recipe import build_model, plan_finetune
from slmops.train.fast_lora import FastLoraPath
from slmops.train.loss import selective_loss

from helpers import tiny_config


def _loss_and_grads(model, batch):
    torch.manual_seed(0)  # the same masks for the model's own dropout (GPT-2 has some)
    model.zero_grad()
    loss, n = selective_loss(model, batch)
    (loss / n).backward()
    return float(loss) / n, {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}


def _trained_a_little(plan):
    model = build_model(plan)
    with torch.no_grad():  # non-zero B so every adapter term matters
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model


def test_same_loss_and_gradients_as_peft_without_dropout(tiny_models, tmp_path):
    for arch in ("llama", "gpt2"):
        plan = plan_finetune(tiny_config(tiny_models[arch], tmp_path / arch, lora_dropout=0.0), quiet=True)
        model = _trained_a_little(plan).train()
        batch = collate(plan.data.train, list(range(6)), plan.tokenizer.pad_token_id)
        ref_loss, ref_grads = _loss_and_grads(model, batch)
        path = FastLoraPath(model, seed=0)
        assert len(path.layers) > 0
        loss, grads = _loss_and_grads(model, batch)
        assert loss == pytest.approx(ref_loss, rel=1e-5)
        for key in ref_grads:
            torch.testing.assert_close(grads[key], ref_grads[key], rtol=1e-4, atol=1e-6)
        path.remove()
        assert all(not hasattr(m, "_slmops_peft_forward") for m in model.modules())


def test_bf16_fast_path_matches_plain_fp32_path(tiny_llama, tmp_path):
    """The default CPU fast path (bf16 base, bf16 adapter compute, fp32 master weights) gives
    the plain fp32 PEFT loss within bf16 tolerance."""
    losses = {}
    for bf16 in (False, True):
        plan = plan_finetune(tiny_config(tiny_llama, tmp_path / str(bf16), bf16=bf16, lora_dropout=0.0), quiet=True)
        torch.manual_seed(0)
        model = _trained_a_little(plan).train()
        if bf16:
            FastLoraPath(model, seed=0)
        losses[bf16], _ = _loss_and_grads(model, collate(plan.data.train, list(range(8)), plan.tokenizer.pad_token_id))
    assert losses[True] == pytest.approx(losses[False], rel=2e-2)


def test_dropout_masks_have_the_right_rate_and_replay(tiny_llama, tmp_path):
    plan = plan_finetune(tiny_config(tiny_llama, tmp_path / "m"), quiet=True)
    path = FastLoraPath(build_model(plan), seed=3)
    state = path.state_dict()
    mask = path.keep_mask(torch.Size([1000, 1000]), 0.05)
    assert mask.dtype == torch.bool
    assert float(mask.float().mean()) == pytest.approx(0.95, abs=2e-3)
    path.load_state_dict(state)
    assert torch.equal(path.keep_mask(torch.Size([1000, 1000]), 0.05), mask)
    assert not torch.equal(path.keep_mask(torch.Size([1000, 1000]), 0.05), mask)
