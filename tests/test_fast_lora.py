"""The CPU fast LoRA path computes PEFT's function: same loss and gradients without
dropout, the same dropout distribution and gradients with it, through gradient
checkpointing, and it steps aside when it disagrees with PEFT."""

import logging
import math

import pytest
import torch

from slmops.data.batching import collate
from slmops.finetune_recipe import build_model, finetune, plan_finetune
from slmops.train.cpu import attention as fast_attention, kernels as cpu_kernels, packing as fast_packing
from slmops.train.cpu import lora as fast_lora
from slmops.train.cpu.lora import LinearGroupFunction, _Spec, drop_positions
from slmops.train.cpu.path import FastPath
from slmops.train.loss import check_packing, packed_loss, selective_loss

from helpers import much_padding, tiny_config, trained_a_little


def _loss_and_grads(model, batch, seed=0, loss_fn=selective_loss):
    torch.manual_seed(seed)  # the same dropout draws for both runs
    model.zero_grad()
    loss, n = loss_fn(model, batch)
    (loss / n).backward()
    return float(loss) / n, {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}


def _batch(plan, rows=6):
    return collate(plan.data.train, list(range(rows)), plan.tokenizer.pad_token_id)


def _untouched(module) -> bool:
    """No trace of the fast path left on a module: its class's forward, no slmops attributes."""
    return "forward" not in vars(module) and not any(name.startswith("_slmops") for name in vars(module))


@pytest.mark.parametrize("arch,targets", [("llama", "all-linear"), ("qwen2", "all-linear"), ("gpt2", "all-linear"),
                                          ("llama", "k_proj"), ("llama", "q_proj,v_proj")])
def test_same_loss_and_gradients_as_peft_without_dropout(tiny_models, tmp_path, arch, targets):
    """(LoRA on some of q/k/v: the group still fuses the three base weights, with adapters on some members.)"""
    plan = plan_finetune(tiny_config(tiny_models[arch], tmp_path / arch, lora_dropout=0.0, target_modules=targets))
    model = trained_a_little(plan).train()
    batch = _batch(plan)
    ref_loss, ref_grads = _loss_and_grads(model, batch)
    path = FastPath.install(model)
    assert path.lora_layers > 0
    if arch != "gpt2":  # GPT-2's fused Conv1D c_attn: the LoRA term goes through the path, the base runs as itself
        assert any(len(g.members) == 3 and g.fuse_base for g in path.groups), "q/k/v not fused"
        assert len(path.norms) > 0 and path.replaced_attention == "sdpa"
        assert len(path.mlps) > 0, "SwiGLU MLPs on the fused kernels"
        assert len(path.attention_modules) > 0, "Llama-style attention with the rotary embedding inside"
    loss, grads = _loss_and_grads(model, batch)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    for key in ref_grads:
        torch.testing.assert_close(grads[key], ref_grads[key], rtol=1e-4, atol=5e-6)  # fp32 sums in another order

    path.remove()
    assert all(_untouched(m) for m in model.modules())
    assert model.config._attn_implementation == "sdpa"
    storages = [m.weight.untyped_storage().data_ptr() for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(storages) == len(set(storages)), "fused weights must be independent again (saving shared storage fails)"
    assert _loss_and_grads(model, batch)[0] == pytest.approx(ref_loss, rel=1e-5)


@pytest.mark.parametrize("bf16", [False, True])
def test_qlora_adapters_on_4bit_layers_take_the_path_and_give_peft_loss_and_gradients(qlora_llama, tmp_path, monkeypatch, bf16):
    """QLoRA: the adapters on bitsandbytes' 4-bit layers run through the path (the base as the 4-bit
    layer, the LoRA term in the compute dtype, on AMX where bf16 and the CPU has it) and give
    PEFT's loss and gradients (PEFT computes the LoRA term in fp32: bf16 tolerance)."""
    from peft.tuners.lora.bnb import Linear4bit

    plan = plan_finetune(tiny_config(qlora_llama, tmp_path / "q", method="qlora", lora_dropout=0.0, bf16=bf16))
    model = trained_a_little(plan).train()
    batch = _batch(plan)
    ref_loss, ref_grads = _loss_and_grads(model, batch)
    path = FastPath.install(model)
    quantized = [m for g in path.groups for m in g.members if isinstance(m, Linear4bit)]
    assert quantized and path.lora_layers == len(quantized), "every 4-bit LoRA layer in a group"
    calls, kernels = [], path.kernels
    if kernels is not None and kernels.amx:
        original = kernels.amx_matmul
        monkeypatch.setattr(kernels, "amx_matmul", lambda *args, **kw: calls.append(1) or original(*args, **kw))
    loss, grads = _loss_and_grads(model, batch)
    assert bool(calls) == (bf16 and kernels is not None and kernels.amx)
    assert loss == pytest.approx(ref_loss, rel=2e-2)
    # Relative difference of each gradient as a whole. bf16's is ~2^-8 per element per rounding, and
    # the two sides round in different places: the path's q/k/v group sums its input gradient's three
    # parts before rounding, PEFT's layers round each and add them in bf16 (closer to exact on the
    # path's side: tests/test_cpu_quantized.py::test_a_4bit_qkv_group_is_as_exact_as_pefts_layers), so
    # over two layers they part by up to ~7.5% on this tiny model (5% with per-layer products).
    for key in ref_grads:
        error = float((grads[key].float() - ref_grads[key].float()).norm() / ref_grads[key].float().norm())
        assert error < (1e-1 if bf16 else 1e-4), (key, error)
    path.remove()
    assert all(_untouched(m) for m in model.modules())
    assert _loss_and_grads(model, batch)[0] == pytest.approx(ref_loss, rel=1e-6)


def test_amx_forward_on_packed_weights_only_for_short_micro_batches(tiny_llama, tmp_path, monkeypatch):
    """Where the CPU has AMX the frozen bf16 base weights are packed and a micro-batch of at most
    AMX_LINEAR_MAX_ROWS tokens takes the AMX forward on them; a longer one takes oneDNN's linear
    on the same weights (faster there), with the same loss and gradients to bf16 rounding."""
    from slmops.train.cpu import kernels as cpu_kernels

    plan = plan_finetune(tiny_config(tiny_llama, tmp_path / "amx", bf16=True, lora_dropout=0.0))
    torch.manual_seed(0)
    model = trained_a_little(plan).train()
    path = FastPath.install(model)
    kernels, batch = path.kernels, _batch(plan, 8)
    amx = kernels is not None and kernels.amx
    assert (path.packed_bytes > 0) == amx
    calls = []
    if amx:
        original = kernels.amx_linear
        monkeypatch.setattr(kernels, "amx_linear", lambda *args, **kw: calls.append(args[0].shape[0]) or original(*args, **kw))
    short = _loss_and_grads(model, batch)
    assert bool(calls) == amx and all(rows <= cpu_kernels.AMX_LINEAR_MAX_ROWS for rows in calls)
    calls.clear()
    monkeypatch.setattr(cpu_kernels, "AMX_LINEAR_MAX_ROWS", 0)  # every micro-batch "long"
    long = _loss_and_grads(model, batch)
    assert not calls
    assert long[0] == pytest.approx(short[0], rel=1e-2)
    for key in short[1]:
        cosine = torch.nn.functional.cosine_similarity(long[1][key].flatten().float(), short[1][key].flatten().float(), dim=0)
        assert cosine > 0.99, key
    path.remove()
    # micro-batches that would all take oneDNN's products: no packed copies at all (memory)
    monkeypatch.setattr(cpu_kernels, "AMX_LINEAR_MAX_ROWS", 1024)
    for tokens, packs in ((1024, amx), (1025, False), (None, amx)):
        path = FastPath.install(model, micro_batch_tokens=tokens)
        assert (path.packed_bytes > 0) == packs, tokens
        if amx and not packs:
            assert all(g.packed is None for g in path.groups) and not any(hasattr(m, "_slmops_packed") for m in path.mlps)
        path.remove()


def test_finetune_installs_the_fast_path_with_the_typical_micro_batch(tiny_llama, tmp_path, monkeypatch):
    """finetune tells the fast path how many tokens a micro-batch typically holds (batch size x the
    (lower) median example length): what decides whether the AMX copies of the weights are made."""
    from slmops.finetune_recipe import finetune

    seen = []
    install = FastPath.install.__func__
    monkeypatch.setattr(FastPath, "install", classmethod(lambda cls, model, tokens=None: seen.append(tokens) or install(cls, model, tokens)))
    config = tiny_config(tiny_llama, tmp_path / "run", bf16=True, max_steps=1, per_device_train_batch_size=4)
    plan = plan_finetune(config)
    lengths = sorted(plan.data.train.lengths)
    finetune(config)
    assert seen == [4 * lengths[(len(lengths) - 1) // 2]]


def test_bf16_fast_path_matches_plain_fp32_path(tiny_llama, tmp_path):
    """The default CPU fast path (bf16 base, bf16 adapter compute, fp32 master weights) gives
    the plain fp32 PEFT loss and gradients within bf16 tolerance."""
    results = {}
    for bf16 in (False, True):
        plan = plan_finetune(tiny_config(tiny_llama, tmp_path / str(bf16), bf16=bf16, lora_dropout=0.0))
        torch.manual_seed(0)
        model = trained_a_little(plan).train()
        if bf16:
            FastPath.install(model)
        results[bf16] = _loss_and_grads(model, _batch(plan, 8))
    (fast_loss, fast_grads), (ref_loss, ref_grads) = results[True], results[False]
    assert fast_loss == pytest.approx(ref_loss, rel=2e-2)
    for key in ref_grads:
        cosine = torch.nn.functional.cosine_similarity(fast_grads[key].flatten(), ref_grads[key].flatten(), dim=0)
        assert cosine > 0.98, key


@pytest.mark.parametrize("p,with_kernels", [(0.05, False), (0.05, True), (0.2, False), (0.2, True), (0.5, False)])
def test_drop_positions_are_iid_bernoulli(p, with_kernels):
    n = 400_000
    kernels = cpu_kernels.get() if with_kernels else None
    assert kernels is not None or not with_kernels
    torch.manual_seed(1)
    positions = drop_positions(n, p, kernels=kernels)
    assert positions.dtype == torch.int64 and int(positions.max()) < n and int(positions.min()) >= 0
    assert torch.all(positions[1:] > positions[:-1]), "sorted, no repeats"
    sigma = math.sqrt(n * p * (1 - p))
    assert abs(len(positions) - n * p) < 5 * sigma
    mask = torch.zeros(n, dtype=torch.bool)
    mask[positions] = True
    # independence of neighbours: P(both dropped) = p^2
    pairs = float((mask[:-1] & mask[1:]).float().mean())
    assert pairs == pytest.approx(p * p, rel=0.1)
    torch.manual_seed(1)
    assert torch.equal(drop_positions(n, p, kernels=kernels), positions), "same seed, same draws (checkpoints and resume replay them)"
    assert len(drop_positions(n, 0.0)) == 0


@pytest.mark.parametrize("dtype,with_kernels,with_base", [(torch.float64, False, True), (torch.float32, True, True),
                                                            (torch.float32, True, False)])
def test_group_with_dropout_matches_reference_and_keeps_its_input(monkeypatch, dtype, with_kernels, with_base):
    """Three adapters over one input, dropout on: output and every gradient equal the
    reference y_i = x W_i^T + s/(1-p) (x * m_i) A_i^T B_i^T with the same masks (in float64
    with PyTorch ops on masked copies; in float32 with the C kernels that take the dropped
    terms out of products on x itself; and with the base computed outside, W = None)."""
    kernels = cpu_kernels.get() if with_kernels else None
    assert kernels is not None or not with_kernels
    torch.manual_seed(0)
    n_in, sizes, rank, p, scale = 12, (12, 4, 4), 3, 0.3, 2.0
    x = torch.randn(2, 5, n_in, dtype=dtype, requires_grad=True)
    before = x.detach().clone()
    weight = torch.randn(sum(sizes), n_in, dtype=dtype)
    a = [torch.randn(rank, n_in, dtype=dtype, requires_grad=True) for _ in sizes]
    b = [torch.randn(size, rank, dtype=dtype, requires_grad=True) for size in sizes]
    drawn = []
    original = fast_lora.drop_positions
    monkeypatch.setattr(fast_lora, "drop_positions", lambda *args: drawn.append(original(*args)) or drawn[-1])
    spec = _Spec(sizes, (0, 1, 2), (scale / (1 - p),) * 3, rank, p, kernels)
    outs = LinearGroupFunction.apply(x, weight if with_base else None, None, spec, *a, *b)  # None: LoRA terms only
    grads_out = [torch.randn_like(o) for o in outs]
    fast = torch.autograd.grad(outs, [x, *a, *b], grads_out)
    assert torch.equal(x.detach(), before)

    keep = torch.ones(len(sizes) * x.numel(), dtype=dtype)
    keep[drawn[0]] = 0
    keep = keep.view(len(sizes), *x.shape)
    assert 0.5 < float(keep.mean()) < 0.9
    start, ref_outs = 0, []
    for j, size in enumerate(sizes):
        w = weight[start : start + size]
        start += size
        ref_outs.append((x @ w.t() if with_base else 0) + scale / (1 - p) * ((x * keep[j]) @ a[j].t()) @ b[j].t())
    for out, ref in zip(outs, ref_outs):
        torch.testing.assert_close(out, ref)
    reference = torch.autograd.grad(ref_outs, [x, *a, *b], grads_out)
    for got, want in zip(fast, reference):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("members", [(0, 1, 2), (0, 2), (1,)])
def test_group_with_adapters_on_some_members(members):
    """A group whose adapters sit on some of its members (LoRA on q and v only, say): each
    member's output is its base product plus its own adapter's term, and only those
    adapters get gradients (the block of B's laid out by member, not by adapter order)."""
    torch.manual_seed(1)
    n_in, sizes, rank, scale = 10, (10, 4, 6), 3, 1.5
    x = torch.randn(3, 4, n_in, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(sum(sizes), n_in, dtype=torch.float64)
    a = [torch.randn(rank, n_in, dtype=torch.float64, requires_grad=True) for _ in members]
    b = [torch.randn(sizes[m], rank, dtype=torch.float64, requires_grad=True) for m in members]
    spec = _Spec(sizes, members, (scale,) * len(members), rank, 0.0, None)
    outs = LinearGroupFunction.apply(x, weight, None, spec, *a, *b)
    grads_out = [torch.randn_like(o) for o in outs]
    fast = torch.autograd.grad(outs, [x, *a, *b], grads_out)
    starts = [0, sizes[0], sizes[0] + sizes[1]]
    ref_outs = [x @ weight[starts[i] : starts[i] + size].t() for i, size in enumerate(sizes)]
    for j, m in enumerate(members):
        ref_outs[m] = ref_outs[m] + scale * (x @ a[j].t()) @ b[j].t()
    for out, ref in zip(outs, ref_outs):
        torch.testing.assert_close(out, ref)
    for got, want in zip(fast, torch.autograd.grad(ref_outs, [x, *a, *b], grads_out)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("packed", [False, True, "long"])
def test_gradient_checkpointing_replays_the_same_dropout(tiny_llama, tmp_path, monkeypatch, packed):
    """Recomputed layers draw the same dropout masks; a packed (padding-free) batch too, its
    packing handed down to the recomputed layers again (short, and long: per-sequence attention,
    forced by a lower length limit)."""
    if packed == "long":
        monkeypatch.setattr(fast_packing, "SHORT_ATTENTION_MAX_LEN", 4)
    results = []
    for checkpointing in (False, True):
        plan = plan_finetune(tiny_config(tiny_llama, tmp_path / str(checkpointing), lora_dropout=0.3,
                                         gradient_checkpointing=checkpointing))
        torch.manual_seed(0)
        model = trained_a_little(plan).train()
        FastPath.install(model)
        batch, loss_fn = (much_padding(plan), packed_loss) if packed else (_batch(plan), selective_loss)
        packing = fast_packing.Packing.of(batch["attention_mask"])
        assert (packing is not None) == bool(packed) and (packing is None or packing.long == (packed == "long"))
        results.append(_loss_and_grads(model, batch, seed=5, loss_fn=loss_fn))
    (loss, grads), (loss_ckpt, grads_ckpt) = results
    assert loss_ckpt == pytest.approx(loss, rel=1e-5)
    for key in grads:
        torch.testing.assert_close(grads_ckpt[key], grads[key], rtol=1e-4, atol=1e-6)


def test_attention_function_matches_sdpa_with_padding_and_grouped_heads():
    torch.manual_seed(0)
    batch, heads, kv_heads, length, dim = 3, 6, 2, 9, 8
    q = torch.randn(batch, heads, length, dim, dtype=torch.float64, requires_grad=True)
    k = torch.randn(batch, kv_heads, length, dim, dtype=torch.float64, requires_grad=True)
    v = torch.randn(batch, kv_heads, length, dim, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(batch, 1, length, length, dtype=torch.bool).tril()
    mask[0, :, :, 6:] = False  # a right-padded row
    rep = heads // kv_heads
    ref = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), attn_mask=mask)
    ref = ref.transpose(1, 2)
    bias = fast_attention._Bias().get(mask, length, rep, q.device)
    out = fast_attention.AttentionFunction.apply(q, k, v, bias, dim**-0.5)
    valid = mask[:, 0].any(-1)[:, :, None, None].expand_as(ref)  # query rows with something to attend to
    torch.testing.assert_close(out[valid], ref[valid])
    grad = torch.randn_like(ref) * valid
    for got, want in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
        torch.testing.assert_close(got, want)


def test_rotary_attention_matches_hf_rope_and_sdpa_with_padding_and_grouped_heads():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    torch.manual_seed(0)
    batch, heads, kv_heads, length, dim = 3, 6, 2, 9, 8
    q = torch.randn(batch, length, heads * dim, dtype=torch.float64, requires_grad=True)
    k = torch.randn(batch, length, kv_heads * dim, dtype=torch.float64, requires_grad=True)
    v = torch.randn(batch, length, kv_heads * dim, dtype=torch.float64, requires_grad=True)
    angles = torch.randn(batch, length, dim // 2, dtype=torch.float64) * 3
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    mask = torch.ones(batch, 1, length, length, dtype=torch.bool).tril()
    mask[0, :, :, 6:] = False  # a right-padded row
    rep, scale = heads // kv_heads, 0.3

    def heads_first(x, n):
        return x.view(batch, length, n, dim).transpose(1, 2)

    q_rope, k_rope = apply_rotary_pos_emb(heads_first(q, heads), heads_first(k, kv_heads), cos, sin)
    ref = torch.nn.functional.scaled_dot_product_attention(q_rope, k_rope.repeat_interleave(rep, 1), heads_first(v, kv_heads).repeat_interleave(rep, 1),
                                                           attn_mask=mask, scale=scale)
    ref = ref.transpose(1, 2).reshape(batch, length, heads * dim)
    cos64, sin_swapped = fast_attention._Rope().get(cos, sin)
    bias = fast_attention._Bias().get(mask, length, rep, q.device)
    out = fast_attention.RotaryAttentionFunction.apply(q, k, v, cos64, sin_swapped, bias, scale, heads, kv_heads)
    valid = mask[:, 0].any(-1)[:, :, None].expand_as(ref)  # query rows with something to attend to
    torch.testing.assert_close(out[valid], ref[valid])
    grad = torch.randn_like(ref) * valid
    for got, want in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
        torch.testing.assert_close(got, want)


def test_verify_removes_a_path_that_disagrees_with_peft(tiny_llama, tmp_path, monkeypatch, caplog):
    plan = plan_finetune(tiny_config(tiny_llama, tmp_path / "m", lora_dropout=0.0))
    model = trained_a_little(plan).train()
    path = FastPath.install(model)
    assert path.verify(model, selective_loss, _batch(plan)) and path.groups
    original_run = fast_lora.LinearGroup.run
    monkeypatch.setattr(fast_lora.LinearGroup, "run", lambda self, x: tuple(o * 1.5 for o in original_run(self, x)))
    with caplog.at_level(logging.WARNING, logger="slmops"):
        assert not path.verify(model, selective_loss, _batch(plan))
    assert "disagrees with the model's own forward" in caplog.text
    assert not path.groups and all(not hasattr(m, "_slmops_own_forward") for m in model.modules())
    assert model.training


def test_finetune_says_which_precision_and_path_it_chose(tiny_llama, tmp_path, capsys):
    from conftest import TONE, TONE_TEMPLATE
    from slmops.cli.main import main

    args = ["finetune", "-m", str(tiny_llama), "-d", str(TONE), "--text_template", TONE_TEMPLATE, "--train_split", "train[:32]",
            "--max_steps", "2", "--report_to", "none", "--bf16", "true", "-o", str(tmp_path / "o"),
            "--target_modules", "q_proj,k_proj,v_proj,o_proj"]
    assert main(args) in (0, None)
    text = capsys.readouterr().err
    assert "precision: bfloat16 on cpu" in text
    # tiny Llama: 2 layers, LoRA on q/k/v/o, 5 RMSNorms; its linear weights
    # (2 x (q/k/v 64x32 + o 32x32 + MLP 3 x 64x32) bf16) packed for AMX where the CPU has it
    kernels = cpu_kernels.get()
    amx = kernels is not None and kernels.amx
    packed = 2 * (64 * 32 + 32 * 32 + 3 * 64 * 32) * 2
    attention_kernels = (["bf16 on AMX tiles" if amx else "bf16 on AVX512-BF16"] if kernels.packed_attention else []) + (
        ["fp32 on AVX2"] if kernels.packed_attention_f32 else [])
    assert ("fast CPU path: 8 LoRA layers, 2 shared-input groups with one fused matmul, 5 fused RMSNorms, 2 fused SwiGLUs, "
            "sparse dropout draws, short-batch attention in slmops_cpu_training (2 with the rotary embedding inside), "
            "padding-free batches (which ones: the loss line; each sequence's causal attention alone"
            + (", in one C kernel: " + ", ".join(attention_kernels) if attention_kernels else "") + "), "
            + "the last layer's MLP on a packed batch's labelled rows only, "
            + (f"AMX forward products on packed base weights ({packed / 2**20:.2f} MB), LoRA products on AMX in bf16, " if amx else "")
            + "C kernels") in text, text
    # bf16 products (and heads of 8): short batches pack only with enough padding, their attention in the padded layout
    assert ("loss: output head on labelled positions only; padding-free batches (real tokens only): short ones where padding "
            "is over 10%, all batches over 192 tokens") in text, text


@pytest.mark.parametrize("bf16", [False, True])
def test_full_fine_tuning_path_matches_the_model_own_forward(tiny_llama, tmp_path, bf16):
    """Full fine-tuning (fp32 master weights, bf16 autocast when asked) takes the weight-free
    parts of the path — fused SwiGLU, attention with the rotary embedding inside — and the
    RMSNorms with their trainable weights, with the model's own loss and gradients (the norms'
    weights' included, to the autocast dtype's precision)."""
    plan = plan_finetune(tiny_config(tiny_llama, tmp_path / "full", method="full", bf16=bf16))
    model = build_model(plan).train()
    batch = _batch(plan)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    with autocast:
        ref_loss, ref_grads = _loss_and_grads(model, batch)
    path = FastPath.install(model)
    assert path.lora_layers == 0 and len(path.norms) == 5 and len(path.mlps) == 2 and len(path.attention_modules) == 2
    assert all(norm.weight.requires_grad for norm in path.norms)
    with autocast:
        loss, grads = _loss_and_grads(model, batch)
    assert loss == pytest.approx(ref_loss, rel=2e-2 if bf16 else 1e-5)
    for key in ref_grads:
        if bf16:
            cosine = torch.nn.functional.cosine_similarity(grads[key].flatten(), ref_grads[key].flatten(), dim=0)
            assert cosine > 0.99, (key, float(cosine))
        else:
            torch.testing.assert_close(grads[key], ref_grads[key], rtol=1e-4, atol=5e-6)
    assert "LoRA" not in path.describe() and "2 fused SwiGLUs" in path.describe() and "5 fused RMSNorms" in path.describe()
    assert any("norm" in key for key in ref_grads)  # (the norms' weight gradients were compared above)


def test_only_attention_modules_that_compute_the_same_function_are_taken_over():
    from transformers import LlamaConfig, Qwen3Config
    from transformers.models.llama.modeling_llama import LlamaAttention
    from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention

    config = LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64)
    config._attn_implementation = "sdpa"
    llama = LlamaAttention(config, layer_idx=0)
    assert fast_attention.matches(llama)
    own = llama.forward
    llama.forward = lambda *args, **kwargs: (own(*args, **kwargs)[0] * 1.1, None)  # a different function
    assert not fast_attention.matches(llama)
    qwen3 = Qwen3Config(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64, head_dim=8)
    qwen3._attn_implementation = "sdpa"
    assert not fast_attention.matches(Qwen3Attention(qwen3, layer_idx=0))  # q/k norms: keeps its own forward


@pytest.mark.parametrize("long", [False, True])
def test_padding_free_batches_give_the_padded_loss_and_gradients(tiny_llama, tmp_path, monkeypatch, long):
    """packed_loss runs a batch's real tokens as one sequence (rows rounded up to a multiple
    of 16), the fast path's attention keeping examples apart — the fused function in the
    padded layout for short batches, each sequence's causal SDPA for long ones (forced here by
    a lower length limit): same loss and gradients as the padded batch; batches it should not
    pack take the padded path."""
    if long:
        monkeypatch.setattr(fast_packing, "SHORT_ATTENTION_MAX_LEN", 4)
    long_calls = []
    own_alone_packed = fast_attention._alone_packed
    monkeypatch.setattr(fast_attention, "_alone_packed", lambda *a: long_calls.append(1) or own_alone_packed(*a))
    plan = plan_finetune(tiny_config(tiny_llama, tmp_path / "m", lora_dropout=0.0, target_modules="all-linear"))
    model = trained_a_little(plan).train()
    path = FastPath.install(model)
    assert path.packs_sequences and "padding-free batches" in path.describe()
    # heads of 8: no packed attention kernel takes them, so short batches' attention stays in the padded layout
    assert path.packing_policy(torch.float32) is fast_packing.PADDED_ATTENTION
    batch = much_padding(plan)
    packing = fast_packing.Packing.of(batch["attention_mask"])
    assert packing is not None and packing.rows % 16 == 0 and packing.tokens == int(batch["attention_mask"].sum())
    assert packing.long == long and packing.rows > packing.tokens  # some rows round the count up: they must carry nothing
    padded_loss, padded_grads = _loss_and_grads(model, batch)
    assert not long_calls
    from transformers.models.llama import modeling_llama

    masks = []  # what transformers made of the attention_mask it was handed: a long batch's is passed through
    own_mask = modeling_llama.create_causal_mask
    monkeypatch.setattr(modeling_llama, "create_causal_mask", lambda **kw: masks.append(own_mask(**kw)) or masks[-1])
    def assert_packed_gives_the_padded_loss_and_gradients():
        loss, grads = _loss_and_grads(model, batch, loss_fn=packed_loss)
        assert loss == pytest.approx(padded_loss, rel=1e-5)
        for key in padded_grads:
            torch.testing.assert_close(grads[key], padded_grads[key], rtol=1e-4, atol=5e-6)

    assert_packed_gives_the_padded_loss_and_gradients()
    assert len(long_calls) == (model.config.num_hidden_layers if long else 0)
    if long:  # no (1, 1, N, N) mask built for it; a layer falling back (the path off, here) reads the block mask
        assert masks and all(m.untyped_storage().nbytes() == 1 for m in masks)
        path.enabled = False
        assert_packed_gives_the_padded_loss_and_gradients()
        path.enabled = True
    assert check_packing(model, batch)
    probe = _batch(plan, 2)  # the trainer's start-up check packs its probe even with little padding
    assert fast_packing.Packing.of(probe["attention_mask"], only_if_it_pays=False) is not None
    assert check_packing(model, probe)
    left_padded = {k: v.flip(1) for k, v in batch.items()}
    assert not check_packing(model, left_padded), "a batch that cannot be packed cannot vouch for packing"

    left = batch["attention_mask"].flip(1)  # left padding: positions would differ
    assert fast_packing.Packing.of(left) is None
    full = torch.ones(4, 10, dtype=torch.long)  # nothing to remove: a short batch stays padded, a long one packs all the same
    assert (fast_packing.Packing.of(full) is None) == (not long)



@pytest.mark.parametrize("rows", [14, 15])  # 15: the weight gradients' inner size is odd (oneDNN takes those)
@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("amx", [True, False])
def test_bf16_group_with_kernels_matches_float64_reference(monkeypatch, rows, p, amx):
    """A bf16 q/k/v group on the C kernels (fp32 adapters with their own scales, dropout on and
    off; the base product on a packed weight and the adapters' products on AMX tiles where the
    kernels have them, else oneDNN) gives the float64 reference's outputs and gradients, with
    the same dropout masks, to bf16 precision."""
    kernels = cpu_kernels.get()
    assert kernels is not None
    calls, use_amx = [], amx and kernels.amx
    monkeypatch.setattr(kernels, "amx", use_amx)
    if use_amx:
        original = kernels.amx_matmul
        monkeypatch.setattr(kernels, "amx_matmul", lambda *args, **kw: calls.append(1) or original(*args, **kw))
    drawn = []
    original_draw = fast_lora.drop_positions
    monkeypatch.setattr(fast_lora, "drop_positions", lambda *args: drawn.append(original_draw(*args)) or drawn[-1])
    torch.manual_seed(0)
    n_in, sizes, rank, scales = 64, (64, 32, 32), 8, (2.0, 0.5, 1.25)
    x = torch.randn(rows, n_in, dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(sum(sizes), n_in) / 4).to(torch.bfloat16)  # base and adapter terms of one size
    a = [(torch.randn(rank, n_in) / 4).requires_grad_() for _ in sizes]
    b = [(torch.randn(size, rank) / 4).requires_grad_() for size in sizes]
    grads_out = [torch.randn(rows, size, dtype=torch.bfloat16) for size in sizes]
    packed = kernels.pack_weight(weight) if use_amx else None  # the base product on AMX too
    spec = _Spec(sizes, (0, 1, 2), tuple(s / (1 - p) for s in scales), rank, p, kernels, packed)
    outs = LinearGroupFunction.apply(x, weight, None, spec, *a, *b)
    got = [o.double() for o in outs] + [g.double() for g in torch.autograd.grad(outs, [x, *a, *b], grads_out)]

    keep = torch.ones(len(sizes) * x.numel(), dtype=torch.float64)
    if p:
        keep[drawn[0]] = 0
    keep = keep.view(len(sizes), *x.shape)
    x64 = x.detach().double().requires_grad_()
    a64 = [t.detach().double().requires_grad_() for t in a]
    b64 = [t.detach().double().requires_grad_() for t in b]
    starts = [0, sizes[0], sizes[0] + sizes[1]]
    ref = [x64 @ weight[starts[j] : starts[j] + size].double().t() + scales[j] / (1 - p) * ((x64 * keep[j]) @ a64[j].t()) @ b64[j].t()
           for j, size in enumerate(sizes)]
    want = [o.detach() for o in ref] + list(torch.autograd.grad(ref, [x64, *a64, *b64], [g.double() for g in grads_out]))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=2e-2, atol=1e-2 * float(w.abs().max()))
    assert bool(calls) == use_amx, "the products ran on AMX exactly where asked and available"
    if use_amx:  # the weight gradients stay on oneDNN where their inner size (rows) is odd
        assert len(calls) == (6 if rows % 2 == 0 else 4)


def test_the_fast_path_is_taken_or_says_why_not(tiny_llama, tmp_path, monkeypatch, caplog):
    """auto: on for the methods that take it, on a CPU, on known library versions; a version it
    was not tested with (faked here) turns it off with the reason, and training runs the plain
    path; --cpu_fast_path on tries it anyway; off is off; dora does not take it."""
    from importlib.metadata import version

    from slmops.train.cpu import compat, decide

    cpu = torch.device("cpu")
    assert decide("auto", True, "lora", cpu) is None
    assert decide("off", True, "lora", cpu) == "--cpu_fast_path off"
    assert "--method dora does not take it" in decide("auto", False, "dora", cpu)
    assert decide("auto", True, "lora", torch.device("cuda")) == "training on cuda"
    real = compat.installed_version
    monkeypatch.setattr(compat, "installed_version", lambda p: "5.99.0" if p == "transformers" else real(p))
    assert decide("auto", True, "lora", cpu) == ("library versions it was not tested with: transformers 5.99.0 (known: >=5.24, <5.25) "
                                                 "(--cpu_fast_path on tries it anyway)")
    assert decide("on", True, "lora", cpu) is None
    with caplog.at_level("INFO", logger="slmops"):
        result = finetune(tiny_config(tiny_llama, tmp_path / "plain", max_steps=3))
    assert "fast CPU path: off: library versions it was not tested with: transformers 5.99.0" in caplog.text
    assert result.train.steps == 3
    assert version("transformers") != "5.99.0"  # only slmops' view of the version was faked
    monkeypatch.undo()
    caplog.clear()
    with caplog.at_level("INFO", logger="slmops"):
        finetune(tiny_config(tiny_llama, tmp_path / "fast", max_steps=3))
        finetune(tiny_config(tiny_llama, tmp_path / "dora", max_steps=3, method="dora"))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("fast CPU path")]
    assert "LoRA layers" in lines[0] and lines[1].startswith("fast CPU path: off: --method dora does not take it")


def test_the_path_is_removed_when_training_fails(tiny_llama, tmp_path, monkeypatch):
    """The fast path is a context manager around training: an exception mid-run still undoes
    every patch (the model is left as PEFT made it)."""
    from slmops.train import trainer as trainer_module

    seen = {}

    def boom(self):
        seen["model"] = self.model
        raise RuntimeError("stop here")

    monkeypatch.setattr(trainer_module.Trainer, "train", boom)
    with pytest.raises(RuntimeError, match="stop here"):
        finetune(tiny_config(tiny_llama, tmp_path / "o", max_steps=3))
    assert all(_untouched(m) for m in seen["model"].modules())
    assert seen["model"].config._attn_implementation == "sdpa"


def test_a_bf16_disagreement_is_arbitrated_in_fp32(tiny_llama, tmp_path, monkeypatch, caplog):
    """In bf16 the model's own forward is noisy too: when the two disagree, the path is judged
    against the fp32 forward (weights upcast for the check and restored bit for bit). A path
    as close to fp32 as the model's own bf16 forward stays; a wrong one still goes."""
    from slmops.train.cpu import path as path_module

    plan = plan_finetune(tiny_config(tiny_llama, tmp_path / "m", lora_dropout=0.0, bf16=True))
    model = trained_a_little(plan).train()
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    fast = FastPath.install(model)
    monkeypatch.setattr(path_module, "_agree", lambda *args, **kwargs: False)  # as if bf16 noise had split them
    with caplog.at_level(logging.INFO, logger="slmops"):
        assert fast.verify(model, selective_loss, _batch(plan))
    assert "checked against an fp32 forward" in caplog.text
    for name, p in model.named_parameters():  # the check left every weight as it was, dtype and bits
        assert p.dtype == weights[name].dtype and torch.equal(p, weights[name]), name
    assert all(g.weight.data_ptr() == g.bases[0].weight.data_ptr() for g in fast.groups if g.fuse_base)  # still fused views
    original_run = fast_lora.LinearGroup.run
    monkeypatch.setattr(fast_lora.LinearGroup, "run", lambda self, x: tuple(o * 1.5 for o in original_run(self, x)))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="slmops"):
        assert not fast.verify(model, selective_loss, _batch(plan))
    assert "gradient cosine with fp32" in caplog.text and not fast.active


def test_pass_size_keeps_a_pass_activations_under_the_budget(tiny_llama, tmp_path):
    """The pass size: ACTIVATION_BUDGET over layers x (2 x MLP + 10 x hidden) x the element size
    the activations are computed in, never under MIN_PASS_TOKENS; None for a model whose size is
    unknown. A run takes it on the CPU fast path with the built-in loss only."""
    from slmops import finetune_recipe as recipe
    from slmops.models.load import ModelStructure

    def structure(layers, hidden, mlp):
        return ModelStructure("llama", [], [], 0, None, hidden, layers, mlp)

    budget = recipe.ACTIVATION_BUDGET
    smollm = structure(30, 576, 1536)
    assert recipe.pass_tokens_for(smollm, 4) == budget // (30 * (2 * 1536 + 10 * 576) * 4) == 2026
    assert recipe.pass_tokens_for(smollm, 2) == budget // (30 * (2 * 1536 + 10 * 576) * 2) == 4052
    llama1b = structure(16, 2048, 8192)
    assert recipe.pass_tokens_for(llama1b, 2) == 1820 and recipe.pass_tokens_for(llama1b, 4) == recipe.MIN_PASS_TOKENS
    assert recipe.pass_tokens_for(structure(None, 576, 1536), 4) is None

    from transformers import AutoConfig

    tiny = AutoConfig.from_pretrained(tiny_llama)
    plan = plan_finetune(tiny_config(tiny_llama, tmp_path / "a"))  # fp32 here
    assert plan.pass_tokens == recipe.pass_tokens_for(structure(tiny.num_hidden_layers, tiny.hidden_size, tiny.intermediate_size), 4)
    assert plan.describe()["pass_tokens"] == plan.pass_tokens
    assert plan_finetune(tiny_config(tiny_llama, tmp_path / "b", cpu_fast_path="off")).pass_tokens is None
    from conftest import ROOT

    custom = plan_finetune(tiny_config(tiny_llama, tmp_path / "c", loss=f"{ROOT / 'examples' / 'custom_loss.py'}:LabelSmoothedCrossEntropy"))
    assert custom.pass_tokens is None and "pass_tokens" not in custom.describe()


def test_long_micro_batches_train_in_passes_that_give_the_whole_batch_gradients(tiny_llama, tmp_path, monkeypatch, caplog):
    """A micro-batch over the run's pass size trains as consecutive pieces of whole examples, one
    forward/backward each: the same adapter as one pass over the batch (and as the plain path);
    the log says so. A custom loss (a mean per micro-batch) keeps it whole."""
    from slmops import finetune_recipe as recipe
    from slmops.train import trainer as trainer_module

    pieces = []
    own = trainer_module.Trainer._passes_of
    monkeypatch.setattr(trainer_module.Trainer, "_passes_of", lambda self, b: pieces.append(len(own(self, b))) or own(self, b))
    common = dict(max_steps=3, lora_dropout=0.0, group_by_length=False, learning_rate=1e-3, target_modules="all-linear")
    finetune(tiny_config(tiny_llama, tmp_path / "whole", **common))
    assert pieces == [1, 1, 1]
    monkeypatch.setattr(recipe, "pass_tokens_for", lambda structure, element_size: 60)
    pieces.clear()
    with caplog.at_level(logging.INFO, logger="slmops"):
        finetune(tiny_config(tiny_llama, tmp_path / "passes", **common))
    assert "passes: micro-batches over 60 tokens train as passes of whole examples" in caplog.text
    assert len(pieces) == 3 and min(pieces) >= 3, pieces
    finetune(tiny_config(tiny_llama, tmp_path / "plain", cpu_fast_path="off", **common))
    from safetensors.torch import load_file

    whole, passes, plain = (load_file(tmp_path / name / "adapter" / "adapter_model.safetensors") for name in ("whole", "passes", "plain"))
    assert any(float(v.abs().max()) > 0 for k, v in passes.items() if "lora_B" in k)  # it trained
    for key in whole:
        torch.testing.assert_close(passes[key], whole[key], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(passes[key], plain[key], rtol=1e-3, atol=1e-5)

    from conftest import ROOT

    pieces.clear()
    finetune(tiny_config(tiny_llama, tmp_path / "custom", max_steps=1,
                         loss=f"{ROOT / 'examples' / 'custom_loss.py'}:LabelSmoothedCrossEntropy"))
    assert pieces == [1]


def test_start_up_checks_run_on_the_last_tokens_of_long_examples(tiny_llama, tmp_path, monkeypatch):
    """The checks' probe (the first two examples) is cut to each example's last PROBE_MAX_LEN
    tokens, its labelled answer kept; the checks pass on it and the path stays."""
    from slmops.train import trainer as trainer_module
    from slmops.train.trainer import Trainer, TrainingData, TrainingSetup

    monkeypatch.setattr(trainer_module, "PROBE_MAX_LEN", 12)
    plan = plan_finetune(tiny_config(tiny_llama, tmp_path / "m", lora_dropout=0.0))
    whole = _batch(plan, 2)
    assert whole["input_ids"].shape[1] > 12
    model = build_model(plan)
    with FastPath.install(model) as path:
        setup = TrainingSetup(plan.precision, plan.learning_rate, tmp_path / "c", tmp_path / "l", True)
        trainer = Trainer(model, TrainingData(plan.data.train, None, plan.tokenizer.pad_token_id), plan.config.training, setup, path)
        probe = trainer._probe_batch()
        assert probe["input_ids"].shape[1] == 12 and (probe["labels"] != -100).any(1).all()
        for row in range(2):  # each example's end, with its labels
            n = int(whole["attention_mask"][row].sum())
            assert torch.equal(probe["input_ids"][row], whole["input_ids"][row, n - 12 : n])
        trainer.prepare()
        assert trainer.fast_path is path and path.active
