"""The tied, trainable input embedding's gradient added as rows (train/cpu/embedding.py): full
fine-tuning on the fast path gives the tied weight exactly the gradient the model's own forward
gives it — alone, accumulated over micro-batches, with a padding row — and the path takes only
a tied, trainable embedding and leaves nothing behind when removed."""

import pytest
import torch

from slmops.finetune_recipe import build_model, plan_finetune
from slmops.train.cpu import embedding as fast_embedding
from slmops.train.cpu.path import FastPath
from slmops.train.loss import selective_loss

from helpers import much_padding, tiny_config


def _grads(model, batches) -> dict[str, torch.Tensor]:
    """Every trainable gradient after backward over `batches` (accumulated, as micro-batches are)."""
    model.zero_grad(set_to_none=True)
    for batch in batches:
        loss, count = selective_loss(model, batch)
        (loss / count).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("micro_batches", [1, 2])
@pytest.mark.parametrize("padding_row", [False, True])
def test_the_tied_embedding_gets_the_model_own_gradient(tiny_models, tmp_path, monkeypatch, arch, micro_batches, padding_row):
    plan = plan_finetune(tiny_config(tiny_models[arch], tmp_path / "full", method="full", bf16=False, lora_dropout=0.0))
    model = build_model(plan).eval()  # (gpt2's own dropout off: the runs below compare gradients)
    embedding = model.get_input_embeddings()
    assert model.get_output_embeddings().weight is embedding.weight, "the tiny models tie their head to the embedding"
    if padding_row:  # nn.Embedding gives the padding row no gradient: neither may the rows
        embedding.padding_idx = plan.tokenizer.pad_token_id
    batch = much_padding(plan)
    batches = [batch, {k: v.flip(0) for k, v in batch.items()}][:micro_batches]
    name = _embedding_name(model)
    own = _grads(model, batches)
    with monkeypatch.context() as patched:  # the rest of the path alone: the embedding's own dense gradient
        patched.setattr(fast_embedding, "tied_trainable_embedding", lambda model: None)
        with FastPath.install(model) as path:
            assert not path.embedding_rows
            dense = _grads(model, batches)
    with FastPath.install(model) as path:
        assert path.embedding_rows and "the tied embedding's gradient added as rows" in path.describe()
        rows = _grads(model, batches)
        path.enabled = False  # the model's own forward while the path is installed: its own gradient, nothing added
        assert torch.equal(_grads(model, batches)[name], own[name])
    assert own.keys() == rows.keys() == dense.keys()
    head = _head_only(model, batches, name)
    if padding_row:  # (the head still gives the padding row its part)
        pad = plan.tokenizer.pad_token_id
        torch.testing.assert_close(own[name][pad], head[pad], rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(rows[name][pad], head[pad], rtol=1e-6, atol=1e-9)
    for key in own:
        # against the path without the rows: only the tied weight's sums change order (fp32 rounding: within one
        # ulp of the largest element; 1.4e-8 of it on the Zen 4 EPYC, whose AVX-512 products sum in another order)
        torch.testing.assert_close(rows[key], dense[key], rtol=1e-6, atol=1e-7 * float(dense[key].abs().max()))
        # against the model's own forward: the rest of the path's fp32 sums too (as test_fast_lora's full test);
        # the tied weight's gradient reaches ~8 over two micro-batches, and its rounding scales with it
        # (1.6e-5 on an AVX-512 Xeon, whose matrix products sum in another order than AVX2's)
        torch.testing.assert_close(rows[key], own[key], rtol=1e-4, atol=max(5e-6, 4e-6 * float(own[key].abs().max())))
    # the embedding's rows matter: without them the tied weight's gradient is the head's alone
    assert (rows[name] - dense[name]).abs().max() < 1e-3 * (own[name] - head).abs().max()
    # removed: the class's forward and no hook on the weight; the model's own gradient again
    assert "forward" not in vars(embedding) and not embedding.weight._post_accumulate_grad_hooks
    torch.testing.assert_close(_grads(model, batches)[name], own[name], rtol=0, atol=0)


def _head_only(model, batches, name) -> torch.Tensor:
    """The tied weight's gradient from the head alone (the embedding's output detached)."""
    embedding = model.get_input_embeddings()
    handle = embedding.register_forward_hook(lambda module, args, out: out.detach().requires_grad_())
    try:
        return _grads(model, batches)[name]
    finally:
        handle.remove()


def _embedding_name(model) -> str:
    weight = model.get_input_embeddings().weight
    return next(name for name, p in model.named_parameters() if p is weight)


def test_only_a_tied_trainable_embedding_is_taken(tiny_models, tmp_path):
    untied = build_model(plan_finetune(tiny_config(tiny_models["qwen2"], tmp_path / "q", method="full")))
    assert untied.get_output_embeddings().weight is not untied.get_input_embeddings().weight
    assert fast_embedding.tied_trainable_embedding(untied) is None
    lora = build_model(plan_finetune(tiny_config(tiny_models["llama"], tmp_path / "l")))  # LoRA: the embedding is frozen
    assert fast_embedding.tied_trainable_embedding(lora) is None
    with FastPath.install(lora) as path:
        assert not path.embedding_rows and "tied embedding" not in path.describe()
    full = build_model(plan_finetune(tiny_config(tiny_models["llama"], tmp_path / "f", method="full")))
    assert fast_embedding.tied_trainable_embedding(full) is full.get_input_embeddings()
    full.get_input_embeddings().sparse = True  # asks for sparse gradients itself: its own forward
    assert fast_embedding.tied_trainable_embedding(full) is None


def test_a_loss_that_never_reaches_the_head_still_gets_the_rows(tiny_llama, tmp_path):
    """The weight's gradient is then the rows alone (the hook starts it from zeros), and nothing
    is left over for the next step."""
    model = build_model(plan_finetune(tiny_config(tiny_llama, tmp_path / "f", method="full"))).eval()
    embedding = model.get_input_embeddings()
    ids = torch.tensor([[5, 7, 7, 9], [9, 3, 5, 5]])
    embedding(ids).pow(2).sum().backward()
    want = embedding.weight.grad.clone()
    model.zero_grad(set_to_none=True)
    with FastPath.install(model) as path:
        assert path.embedding_rows
        embedding(ids).pow(2).sum().backward()
        torch.testing.assert_close(embedding.weight.grad, want, rtol=1e-6, atol=0)
        model.zero_grad(set_to_none=True)
        loss, count = selective_loss(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
        (loss / count).backward()
        with_rows = embedding.weight.grad.clone()
    model.zero_grad(set_to_none=True)
    loss, count = selective_loss(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    (loss / count).backward()
    # (the rest of the path's fp32 sums as in the test above; a step's stale rows would be ~0.5 off)
    torch.testing.assert_close(with_rows, embedding.weight.grad, rtol=1e-4, atol=5e-6)
