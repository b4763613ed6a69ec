"""Full fine-tuning's linears on kept bf16 copies of their fp32 weights (train/cpu/bf16_copies.py):
the same numbers as bf16 autocast gives, the copy rewritten whenever the weight changes (an
optimizer's step, a checkpoint loaded), gradients added in place into a buffer kept across
steps, the tied head's gradient still getting the embedding's rows, and nothing left behind."""

import pytest
import torch
from torch import nn

from slmops.finetune_recipe import build_model, plan_finetune
from slmops.train.cpu import bf16_copies
from slmops.train.cpu.patches import Patches
from slmops.train.cpu.path import FastPath
from slmops.train.loss import selective_loss

from helpers import much_padding, tiny_config

AUTOCAST = dict(device_type="cpu", dtype=torch.bfloat16)


def _run(layer: nn.Linear, x: torch.Tensor, grad: torch.Tensor):
    """Output, and the input's gradient, of one forward and backward under bf16 autocast."""
    x = x.clone().requires_grad_()
    with torch.autocast(**AUTOCAST):
        out = layer(x)
    out.backward(grad)
    return out.detach(), x.grad


def _taken(layer: nn.Linear) -> Patches:
    patches = Patches()
    bf16_copies.install(patches, [layer], lambda: True)
    return patches


@pytest.mark.parametrize("bias", [False, True])
def test_a_linear_on_its_copy_gives_autocasts_numbers(bias):
    torch.manual_seed(0)
    layer = nn.Linear(48, 40, bias=bias)
    x, grads = torch.randn(3, 5, 48), [torch.randn(3, 5, 40).bfloat16() for _ in range(2)]
    own = [_run(layer, x, g) for g in grads]  # two micro-batches, accumulated into .grad
    own_grads = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad(set_to_none=True)
    patches = _taken(layer)
    ours = [_run(layer, x, g) for g in grads]
    for (out, x_grad), (own_out, own_x_grad) in zip(ours, own):
        assert out.dtype == torch.bfloat16 and torch.equal(out, own_out)
        assert x_grad.dtype == torch.float32 and torch.equal(x_grad, own_x_grad)
    assert torch.equal(layer.weight.grad, own_grads[0])  # bf16 products, summed in fp32: bit for bit
    if bias:
        torch.testing.assert_close(layer.bias.grad, own_grads[1], rtol=1e-2, atol=1e-2)
    # the next step's gradient lands in the same buffer (no new tensor), with the new values alone
    buffer = layer.weight.grad
    layer.zero_grad(set_to_none=True)
    _run(layer, x, grads[0])
    assert layer.weight.grad is buffer
    patches.undo()
    layer.zero_grad(set_to_none=True)
    _run(layer, x, grads[0])
    assert torch.equal(buffer, layer.weight.grad)
    assert "forward" not in vars(layer) and bf16_copies.OPTIMIZER_STEPS._holders == 0


@pytest.mark.parametrize("change", ["adamw_fused", "adamw", "sgd", "load_state_dict", "new_storage"])
def test_the_copy_follows_every_change_of_the_weight(change):
    """Fused AdamW moves no version counter: the optimizer-step count is what marks the copy stale
    (a copy that only watched versions fails the fused case)."""
    torch.manual_seed(0)
    layer = nn.Linear(32, 24)
    x, grad = torch.randn(4, 32), torch.randn(4, 24).bfloat16()
    patches = _taken(layer)
    _run(layer, x, grad)  # the copy is made
    if change.startswith("adamw") or change == "sgd":
        optimizer = (torch.optim.SGD(layer.parameters(), lr=0.5) if change == "sgd" else
                     torch.optim.AdamW(layer.parameters(), lr=0.5, fused=change == "adamw_fused"))
        optimizer.step()
    elif change == "load_state_dict":
        layer.load_state_dict({"weight": torch.randn(24, 32), "bias": torch.randn(24)})
    else:
        layer.weight.data = torch.randn(24, 32)
    with torch.no_grad(), torch.autocast(**AUTOCAST):
        ours = layer(x)
    patches.undo()
    with torch.no_grad(), torch.autocast(**AUTOCAST):
        own = layer(x)
    assert torch.equal(ours, own)


def test_only_autocast_bf16_runs_take_the_copy():
    torch.manual_seed(0)
    layer = nn.Linear(16, 8)
    patches = _taken(layer)
    x = torch.randn(2, 16)
    assert layer(x).dtype == torch.float32  # no autocast: the layer's own fp32 forward
    with torch.autocast("cpu", dtype=torch.float16):
        assert layer(x).dtype == torch.float16
    patches.undo()


def _grads(model, batches):
    model.zero_grad(set_to_none=True)
    for batch in batches:
        with torch.autocast(**AUTOCAST):
            loss, count = selective_loss(model, batch)
        (loss / count).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("arch,linears", [("llama", 2 * 7 + 1), ("qwen2", 2 * 7 + 1), ("gpt2", 1)])
@pytest.mark.parametrize("micro_batches", [1, 2])
def test_full_fine_tuning_gets_the_same_gradients_through_the_copies(tiny_models, tmp_path, monkeypatch, arch, linears,
                                                                      micro_batches):
    """Every trainable linear (the head too: llama's and gpt2's tied to the embedding, whose rows
    then go straight into the .grad the head's copy wrote; qwen2's untied, with q/k/v biases)
    against the same path without the copies: the same bf16 products, so the same gradients up to
    the order of fp32 sums; gpt2's own layers are Conv1D, not taken."""
    plan = plan_finetune(tiny_config(tiny_models[arch], tmp_path / "full", method="full", bf16=True, lora_dropout=0.0))
    model = build_model(plan).eval()
    batch = much_padding(plan)
    batches = [batch, {k: v.flip(0) for k, v in batch.items()}][:micro_batches]
    own = _grads(model, batches)
    with monkeypatch.context() as patched:
        patched.setattr(bf16_copies, "candidates", lambda model, rows_hooked=None: [])
        with FastPath.install(model) as path:
            assert not path.bf16_copies
            without = _grads(model, batches)
    with FastPath.install(model) as path:
        assert len(path.bf16_copies) == linears, [type(m) for m in path.bf16_copies]
        assert f"{linears} trainable linears on kept bf16 copies" in path.describe()
        ours = _grads(model, batches)
    assert own.keys() == ours.keys() == without.keys()
    for key in own:
        scale = float(without[key].abs().max())
        torch.testing.assert_close(ours[key], without[key], rtol=1e-5, atol=1e-6 * scale, msg=key)
        # (the model's own forward: the fused kernels' bf16 roundings as well)
        cosine = torch.nn.functional.cosine_similarity(ours[key].flatten(), own[key].flatten(), dim=0)
        assert cosine > 0.99, (key, float(cosine))
    assert all("forward" not in vars(m) for m in model.modules()) and bf16_copies.OPTIMIZER_STEPS._holders == 0


def test_lora_and_fp32_weights_take_no_copies(tiny_llama, tmp_path):
    lora = build_model(plan_finetune(tiny_config(tiny_llama, tmp_path / "l", bf16=True)))
    with FastPath.install(lora) as path:
        assert not path.bf16_copies and "bf16 copies" not in path.describe()
    full = build_model(plan_finetune(tiny_config(tiny_llama, tmp_path / "f", method="full")))
    hooked = full.model.layers[0].self_attn.q_proj.weight
    hooked.register_post_accumulate_grad_hook(lambda p: None)  # someone else's hook: the engine must see its gradient
    taken = bf16_copies.candidates(full)
    assert taken and all(m.weight is not hooked for m in taken)
    assert full.get_output_embeddings() not in taken  # tied, and no rows hook named: left to the engine
