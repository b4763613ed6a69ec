"""A prefix that every example of a batch shares (a chat template's system prompt) is packed and
computed once (packing.Packing.prefix, SharedPrefixAttentionFunction): the attention against an
fp64 reference of separate examples, the same loss and gradients as packing every example whole (on
the kernel, on SDPA and on the model's own attention), which prefixes are shared and which are not,
and the trainer's start-up check that turns sharing off when it trains differently (with bf16
products, settled by the distance of each from an fp32 forward)."""

import dataclasses
import functools

import pytest
import torch
import torch.nn.functional as F

from slmops.data.tokenize import IGNORE
from slmops.finetune_recipe import plan_finetune
from slmops.train.cpu import packing as fast_packing
from slmops.train.cpu.attention import SharedPrefixAttentionFunction
from slmops.train.cpu.packing import FP32_ALONE, Packing, shareable_prefix
from slmops.train.cpu.path import FastPath
from slmops.train.loss import packed_loss, selective_loss

from helpers import tiny_config, trained_a_little
from test_cpu_packed_attention import KERNELS, _kernel_here, kernels, llama_head_32  # noqa: F401 (fixtures)

UNSHARED = FP32_ALONE.unshared()
WHOLE_TAILS = dataclasses.replace(FP32_ALONE, trim_tails=False)  # the layout with every token (tails: test_cpu_packing_tails.py)


def _batch(vocab: int, lengths=(14, 9, 17), common: int = 6, prompt: int = 8, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded examples whose first `common` tokens agree, with no loss before position `prompt`."""
    generator = torch.Generator().manual_seed(0)
    width = max(lengths)
    ids = torch.randint(1, vocab, (len(lengths), width), generator=generator)
    ids[:, :common] = ids[0, :common]
    ids[1:, common] = (ids[0, common] + torch.arange(1, len(lengths))) % (vocab - 1) + 1  # each differs right after
    valid = torch.arange(width)[None] < torch.tensor(lengths)[:, None]
    labels = ids.masked_fill(~valid, IGNORE)
    labels[:, :prompt] = IGNORE
    return {"input_ids": ids.masked_fill(~valid, pad_id), "attention_mask": valid.long(), "labels": labels}


def test_the_shareable_prefix_is_the_common_tokens_before_the_first_loss():
    batch = _batch(50)
    ids, labels, valid = batch["input_ids"], batch["labels"], batch["attention_mask"].bool()
    assert shareable_prefix(ids, labels, valid) == 6  # all six common tokens: the first loss reads position 7
    late = dict(batch, labels=batch["labels"].clone())
    late["labels"][1, 4] = 7  # position 3 predicts a labelled token: the prefix stops before it
    assert shareable_prefix(ids, late["labels"], valid) == 3
    assert shareable_prefix(ids[:1], labels[:1], valid[:1]) == 0  # one example: nothing to share
    same = ids[[0, 0]], labels[[0, 0]], valid[[0, 0]]  # the same example twice: all but the labelled part
    assert shareable_prefix(*same) == 7
    text = ids.masked_fill(~valid, IGNORE)  # a loss on every token (a text task): nothing loss-free to share
    assert shareable_prefix(ids, text, valid) == 0
    short = _batch(50, lengths=(14, 4, 17), prompt=14)  # an example of 4 tokens keeps 1 of its own
    assert shareable_prefix(short["input_ids"], short["labels"], short["attention_mask"].bool()) == 3


def test_a_shared_prefix_packs_once():
    batch = _batch(50)
    packing = Packing.of(batch["attention_mask"], policy=WHOLE_TAILS, input_ids=batch["input_ids"], labels=batch["labels"])
    assert packing.prefix == 6 and packing.alone
    assert packing.lengths == [14, 3, 11] and packing.tokens == 28 and packing.offsets.tolist() == [0, 14, 17, 28]
    assert packing.position_ids()[0].tolist() == [*range(14), *range(6, 9), *range(6, 17)]
    packed = packing.pack(batch["input_ids"])[0]
    assert packed[:14].tolist() == batch["input_ids"][0, :14].tolist()
    assert packed[14:17].tolist() == batch["input_ids"][1, 6:9].tolist()
    # the model's own attention on the packed rows: each example sees the prefix's rows and its own, causally
    mask = packing.block_mask[0, 0]
    assert mask[14].nonzero().squeeze(1).tolist() == [0, 1, 2, 3, 4, 5, 14]
    assert mask[27].nonzero().squeeze(1).tolist() == [*range(6), *range(17, 28)]
    assert mask[13].nonzero().squeeze(1).tolist() == list(range(14))
    with pytest.raises(ValueError, match="no padded layout"):
        packing.pad(torch.zeros(1, 28, 4))
    # the policy decides: without share_prefix, or without the tokens, every example is packed whole
    for policy, given in ((WHOLE_TAILS.unshared(), True), (FP32_ALONE, False)):
        whole = Packing.of(batch["attention_mask"], policy=policy, **(dict(input_ids=batch["input_ids"], labels=batch["labels"]) if given else {}))
        assert whole.prefix == 0 and whole.tokens == 40
    # below SHARED_PREFIX_MIN common tokens nothing is shared (and a short batch without padding, whose
    # tails are kept, is not packed)
    few = _batch(50, lengths=(12, 12, 12), common=fast_packing.SHARED_PREFIX_MIN - 1)
    assert Packing.of(few["attention_mask"], policy=WHOLE_TAILS, input_ids=few["input_ids"], labels=few["labels"]) is None
    assert Packing.of(few["attention_mask"], policy=FP32_ALONE, input_ids=few["input_ids"], labels=few["labels"]).prefix == 0


def _reference(q, k, v, lengths, prefix, scale):
    """Each example's causal attention alone, its copy of the prefix's rows in front of its own (fp64)."""
    starts = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    outputs = []
    for i, (a, b) in enumerate(zip(starts[:-1], starts[1:])):
        rows = torch.arange(a, b) if i == 0 else torch.cat([torch.arange(prefix), torch.arange(a, b)])
        q_i, k_i, v_i = (t[rows].transpose(0, 1)[None] for t in (q, k, v))
        out = F.scaled_dot_product_attention(q_i, k_i, v_i, is_causal=True, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
        outputs.append(out[0].transpose(0, 1)[0 if i == 0 else prefix:])
    return torch.cat(outputs)


@pytest.mark.parametrize("merged", [False, True], ids=["kernel_prefix", "merged_in_torch"])
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("lengths,prefix,heads,kv_heads,dim", [([30, 5, 61], 24, 9, 3, 64), ([70, 1, 100, 33], 50, 4, 4, 32),
                                                               ([100, 17, 80], 100, 4, 2, 32)])
def test_shared_prefix_attention_matches_an_fp64_reference(kernels, lengths, prefix, heads, kv_heads, dim, kernel, merged,
                                                           monkeypatch):
    """The fp32 kernel attends to the prefix itself; the bf16 kernels' callers merge the prefix's part
    in (SharedPrefixAttentionFunction), which the fp32 kernel is also made to take here. Prefixes
    shorter than the first example and as long; examples of one token; grouped-query heads."""
    torch.manual_seed(0)
    dtype, tiles = KERNELS[kernel]
    if tiles and not kernels.amx:
        return  # (the fixture checked that this CPU has no tiles)
    monkeypatch.setattr(kernels, "amx", tiles)
    if merged:
        monkeypatch.setattr(type(kernels), "takes_shared_prefix", staticmethod(lambda q: False))
    elif dtype == torch.bfloat16:
        assert not kernels.takes_shared_prefix(torch.zeros(1, dtype=dtype))  # (the bf16 kernels always merge)
        return
    tokens = sum(lengths)
    q, k, v = (torch.randn(tokens, h, dim, dtype=dtype) for h in (heads, kv_heads, kv_heads))
    if not _kernel_here(kernels, kernel, monkeypatch) or not kernels.packed_attention_takes(q, k, v):
        assert not kernels.packed_attention_takes(q, k, v)  # (the layers then take the SDPA path, tested below)
        return
    grad = torch.randn(tokens, heads, dim, dtype=dtype)
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    scale = dim**-0.5
    exact = [t.double().requires_grad_() for t in (q, k, v)]
    want = _reference(*exact, lengths, prefix, scale)
    want_grads = torch.autograd.grad(want, exact, grad.double())
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    got = SharedPrefixAttentionFunction.apply(*inputs, offsets, prefix, scale, kernels)
    got_grads = torch.autograd.grad(got, inputs, grad)
    # bf16: the kernel's rounding (6e-3 in its own test) and the merged output's, once more; fp32: fp32 sums
    relative = 1e-2 if dtype == torch.bfloat16 else 1e-5
    for name, g, expected in zip(("out", "dq", "dk", "dv"), (got, *got_grads), (want, *want_grads)):
        assert g.dtype == dtype
        error = float((g.double() - expected.detach()).norm() / expected.norm())
        assert error < relative, (name, error)


def _model(model_dir, tmp_path):
    plan = plan_finetune(tiny_config(model_dir, tmp_path / "m", lora_dropout=0.0, bf16=False, target_modules="all-linear"))
    return plan, trained_a_little(plan).train()


def _loss_and_grads(model, loss_fn, batch):
    model.zero_grad()
    loss, count = loss_fn(model, batch)
    (loss / count).backward()
    return float(loss) / count, torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])


@pytest.mark.parametrize("attention", ["kernel", "sdpa", "own"])
def test_a_shared_prefix_trains_as_every_example_whole(llama_head_32, tmp_path, monkeypatch, attention):
    """fp32 LoRA on every linear layer: the loss and every gradient as with each example packed
    whole (and as the padded batch), the prefix's attention on the fp32 kernel, on SDPA per sequence
    (CPUs without the kernel), or on the model's own attention with the packing's mask (the path off)."""
    plan, model = _model(llama_head_32, tmp_path)
    path = FastPath.install(model)
    kernel = path.kernels is not None and path.kernels.packed_attention_f32_built
    if attention == "kernel":
        if not kernel:  # no C compiler or no AVX2 + FMA here: the other two cases cover the path
            return
        monkeypatch.setattr(path.kernels, "packed_attention_f32", True)
    elif path.kernels is not None:
        monkeypatch.setattr(path.kernels, "packed_attention_f32", False)
    path.enabled = attention != "own"
    batch = _batch(model.config.vocab_size, pad_id=plan.tokenizer.pad_token_id)
    calls = []
    own_apply = SharedPrefixAttentionFunction.apply
    monkeypatch.setattr(SharedPrefixAttentionFunction, "apply", lambda *a: calls.append(1) or own_apply(*a))
    loss, grads = _loss_and_grads(model, functools.partial(packed_loss, policy=FP32_ALONE), batch)
    assert len(calls) == (model.config.num_hidden_layers if attention == "kernel" else 0)
    whole_loss, whole_grads = _loss_and_grads(model, functools.partial(packed_loss, policy=UNSHARED), batch)
    padded_loss, padded_grads = _loss_and_grads(model, selective_loss, batch)
    for other_loss, other_grads in ((whole_loss, whole_grads), (padded_loss, padded_grads)):
        assert loss == pytest.approx(other_loss, rel=1e-5)
        assert F.cosine_similarity(grads, other_grads, dim=0) > 1 - 1e-6
        assert float((grads - other_grads).norm() / other_grads.norm()) < 1e-4


def test_the_start_up_check_turns_a_wrong_shared_prefix_off(llama_head_32, tmp_path, monkeypatch, caplog):
    """The trainer checks sharing against every example whole on its first two examples: a
    prefix whose keys miss the other examples' gradients trains with sharing off, and says why."""
    plan, model = _model(llama_head_32, tmp_path)
    path = FastPath.install(model)
    if path.kernels is None or not path.kernels.packed_attention_f32_built:
        return
    monkeypatch.setattr(path.kernels, "packed_attention_f32", True)
    batch = _batch(model.config.vocab_size, pad_id=plan.tokenizer.pad_token_id)
    shared, whole = functools.partial(packed_loss, policy=FP32_ALONE), functools.partial(packed_loss, policy=UNSHARED)
    assert path.agrees(model, shared, whole, batch, torch.float32)[0]
    own_backward = SharedPrefixAttentionFunction.backward

    def keys_without_the_prefix_part(ctx, grad):  # the prefix's keys keep only the first example's gradient
        d_q, d_k, d_v, *rest = own_backward(ctx, grad)
        fresh = ctx.kernels.packed_attention_backward(grad.to(ctx.saved_tensors[0].dtype).contiguous(), *ctx.saved_tensors, ctx.scale)
        d_k[: ctx.prefix] = fresh[1][: ctx.prefix]
        return (d_q, d_k, d_v, *rest)

    monkeypatch.setattr(SharedPrefixAttentionFunction, "backward", staticmethod(keys_without_the_prefix_part))
    agreed, detail = path.agrees(model, shared, whole, batch, torch.float32)
    assert not agreed and "gradient cosine" in detail


@pytest.mark.parametrize("bf16", [False, True])
def test_finetune_checks_shared_prefixes_and_says_so(llama_head_32, tmp_path, capsys, monkeypatch, bf16):
    """The tone template's opening ("Phrase:") is shared by every example and carries no loss: where
    the packing policy shares prefixes (fp32 products on the fp32 kernel, bf16 ones on AVX512-BF16
    without AMX), the trainer checks it on the first examples and says so; a sharing that trains
    differently is turned off, and the run still trains, every example packed whole."""
    from conftest import TONE, TONE_TEMPLATE
    from slmops.cli.main import main
    from slmops.train.cpu import kernels as cpu_kernels

    built = cpu_kernels.get()
    # FP32_ALONE: AVX2 + FMA without AVX-512; PADDED_ATTENTION_SHARED_PREFIX: AVX512-BF16 without AMX
    shares = built is not None and (built.packed_attention and not built.amx if bf16 else built.packed_attention_f32)

    def finetune(out: str) -> str:
        args = ["finetune", "-m", str(llama_head_32), "-d", str(TONE), "--text_template", TONE_TEMPLATE, "--train_split", "train[:32]",
                "--max_steps", "2", "--report_to", "none", "--bf16", str(bf16).lower(), "-o", str(tmp_path / out), "--lora_dropout", "0"]
        assert main(args) in (0, None)
        return capsys.readouterr().err

    text = finetune("o")
    assert ("shared prefixes: a prefix all of a batch's examples share is computed once (checked: loss" in text) == shares, text
    if not shares:
        return
    own_backward = SharedPrefixAttentionFunction.backward

    def values_without_the_prefix_part(ctx, grad):
        d_q, d_k, d_v, *rest = own_backward(ctx, grad)
        return (d_q, d_k, d_v * 0, *rest)

    monkeypatch.setattr(SharedPrefixAttentionFunction, "backward", staticmethod(values_without_the_prefix_part))
    text = finetune("broken")
    assert "shared prefixes off: computing a batch's shared prefix once trains differently from every example whole" in text, text
    assert "fast CPU path off" not in text, "the rest of the path still checked and kept"


@pytest.mark.parametrize("fp32_forward", [True, False])
def test_the_bf16_check_of_shared_prefixes_arbitrates_by_distance_from_fp32(llama_head_32, tmp_path, monkeypatch, fp32_forward):
    """With bf16 products a prefix computed once rounds differently from every example whole (on
    SmolLM2's tone examples as far apart as either is from fp32), so where the two differ beyond
    bf16's agreement the check asks which is closer to an fp32 forward (or, where none can run:
    4-bit weights, memory, to the model's own bf16 forward): a right sharing passes, one whose
    prefix rows pass no gradient back through the layers fails."""
    from slmops.train.cpu import path as fast_path_module

    plan = plan_finetune(tiny_config(llama_head_32, tmp_path / "m", lora_dropout=0.0, bf16=True, target_modules="all-linear"))
    model = trained_a_little(plan).train()
    dtype = plan.precision.autocast or plan.precision.weights
    assert dtype == torch.bfloat16
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=plan.precision.autocast is not None)
    path = FastPath.install(model)
    if not fp32_forward:
        monkeypatch.setattr(path, "_fp32_reference", lambda *a: None)
    batch = _batch(model.config.vocab_size, pad_id=plan.tokenizer.pad_token_id)
    policy = fast_packing.PADDED_ATTENTION_SHARED_PREFIX
    shared, whole = functools.partial(packed_loss, policy=policy), functools.partial(packed_loss, policy=policy.unshared())
    # beyond bf16's agreement: the arbitration decides (as on real data, where the two differ by ~1e-3 in cosine; on this
    # tiny random model bf16 is further from fp32, cosine 0.975, and a right sharing 0.960: the bound is relative)
    monkeypatch.setattr(fast_path_module, "_agree", lambda *a: False)
    with autocast:
        agreed, detail = path.agrees(model, shared, whole, batch, dtype)
    assert agreed and ("against fp32" if fp32_forward else "the model's own bf16 forward") in detail, detail

    prefix = shareable_prefix(batch["input_ids"], batch["labels"], batch["attention_mask"].bool())
    assert prefix >= fast_packing.SHARED_PREFIX_MIN

    def drop_the_prefix_rows_gradient(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if hidden.requires_grad:
            hidden.register_hook(lambda grad: torch.cat([grad[:, :prefix] * 0, grad[:, prefix:]], 1))

    def wrong_sharing(model, batch):  # the prefix rows pass no gradient back into earlier layers
        layers = model.get_base_model().get_decoder().layers
        hooks = [layer.register_forward_pre_hook(drop_the_prefix_rows_gradient, with_kwargs=True) for layer in layers]
        try:
            return shared(model, batch)
        finally:
            for hook in hooks:
                hook.remove()

    with autocast:
        agreed, detail = path.agrees(model, wrong_sharing, whole, batch, dtype)
    assert not agreed, detail
