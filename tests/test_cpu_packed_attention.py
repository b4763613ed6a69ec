"""The causal attention of packed sequences (packed_attention.c on AMX tiles and on AVX512-BF16
dot products, packed_attention_f32.c in fp32 on AVX2; PackedAttentionFunction) computes what SDPA
computes sequence by sequence: outputs and gradients against an fp64 reference, the same loss and
gradients as the SDPA path in training, and a wrong kernel makes the fast path's start-up check
turn the path off. Where the CPU lacks a kernel's instructions the SDPA path runs instead, and
these tests check that it does."""

import functools
import logging

import pytest
import torch
import torch.nn.functional as F

from slmops.finetune_recipe import plan_finetune
from slmops.train.cpu import attention as fast_attention, kernels as cpu_kernels, packing as fast_packing
from slmops.train.cpu.path import FastPath
from slmops.train.loss import packed_loss, selective_loss

from conftest import build_tiny_model
from helpers import much_padding, tiny_config, trained_a_little


def _cpu_has(flag: str) -> bool:
    with open("/proc/cpuinfo") as cpuinfo:
        return f" {flag}" in cpuinfo.read()


@pytest.fixture(scope="module")
def kernels():
    built = cpu_kernels.get()
    assert built is not None, "this machine has gcc: the kernels must build"
    assert built.amx == _cpu_has("amx_bf16"), "AMX tiles exactly where the CPU has them"
    assert built.packed_attention == _cpu_has("avx512_bf16"), "the packed attention exactly where the CPU has AVX512-BF16"
    assert built.packed_attention_f32_built == (_cpu_has("avx2") and _cpu_has("fma")), "its fp32 kernel built with AVX2 + FMA"
    assert built.packed_attention_f32 == (built.packed_attention_f32_built and not _cpu_has("avx512f")), \
        "and used for training where the CPU has no AVX-512 (measured there only)"
    return built


def _sdpa_per_sequence(q, k, v, lengths, scale):
    """The reference: each sequence's causal attention alone, in SDPA."""
    outputs = []
    for q_i, k_i, v_i in zip(q.split(lengths), k.split(lengths), v.split(lengths)):
        out = F.scaled_dot_product_attention(q_i.transpose(0, 1)[None], k_i.transpose(0, 1)[None], v_i.transpose(0, 1)[None],
                                             is_causal=True, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
        outputs.append(out[0].transpose(0, 1))
    return torch.cat(outputs)


# lengths: a single token, rows under a tile (16) and a query block (32), exact blocks, one over,
# and long ones; heads: grouped-query (2, 3 and 4 query heads a key/value head) and plain; D: 32-128
SHAPES = [([1, 5, 33], 4, 2, 64), ([700, 17, 256], 9, 3, 64), ([100, 64], 8, 8, 128), ([31, 32, 65], 32, 8, 32)]


# the kernels: bf16 on AMX tiles, bf16 on AVX512-BF16 dot products (CPUs without tiles), fp32 on AVX2 + FMA
# (CPUs without fast bf16: they train in fp32); each runs where the CPU has its instructions
KERNELS = {"tiles": (torch.bfloat16, True), "avx512_bf16": (torch.bfloat16, False), "avx2_fp32": (torch.float32, False)}


def _kernel_here(kernels, name: str, monkeypatch) -> bool:
    """Whether the CPU has this kernel; the fp32 one is tested wherever it builds (training uses it only
    without AVX-512: switched on here for the test)."""
    dtype, tiles = KERNELS[name]
    monkeypatch.setattr(kernels, "packed_attention_f32", kernels.packed_attention_f32_built)
    return kernels.amx if tiles else kernels.packed_attention if dtype == torch.bfloat16 else kernels.packed_attention_f32


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("lengths,heads,kv_heads,dim", SHAPES)
def test_packed_attention_matches_an_fp64_reference(kernels, lengths, heads, kv_heads, dim, kernel, monkeypatch):
    """Each kernel where the CPU has it; elsewhere it refuses, and says why."""
    torch.manual_seed(0)
    dtype, tiles = KERNELS[kernel]
    tokens = sum(lengths)
    q, k, v = (torch.randn(tokens, h, dim, dtype=dtype) for h in (heads, kv_heads, kv_heads))
    grad = torch.randn(tokens, heads, dim, dtype=dtype)
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    scale = dim**-0.5
    if tiles and not kernels.amx:  # (the fixture checked that this CPU has none)
        return
    monkeypatch.setattr(kernels, "amx", tiles)
    if not _kernel_here(kernels, kernel, monkeypatch):
        assert not kernels.packed_attention_takes(q, k, v)
        with pytest.raises(RuntimeError, match="does not take"):
            kernels.packed_attention_forward(q, k, v, offsets, scale)
        return
    assert kernels.packed_attention_takes(q, k, v)
    exact = [t.double().requires_grad_() for t in (q, k, v)]
    want = _sdpa_per_sequence(*exact, lengths, scale)
    want_grads = torch.autograd.grad(want, exact, grad.double())
    out, lse = kernels.packed_attention_forward(q, k, v, offsets, scale)
    got_grads = kernels.packed_attention_backward(grad, q, k, v, out, lse, offsets, scale)
    # bf16: inputs, P and dS rounded to bf16 for their products, ~2^-8 relative; fp32: nothing rounded
    # but fp32 sums (measured ~1e-6 relative)
    relative, largest = (6e-3, 2e-2) if dtype == torch.bfloat16 else (1e-5, 1e-5)

    def close(got, expected):
        assert got.dtype == dtype
        error = (got.double() - expected).norm() / expected.norm()
        assert error < relative, float(error)
        assert float((got.double() - expected).abs().max()) < largest * float(expected.abs().max())

    close(out, want.detach())
    for got, expected in zip(got_grads, want_grads):
        close(got, expected)
    # each row's log-sum-exp of its scaled scores over the keys it sees
    for (a, b) in zip(offsets[:-1].tolist(), offsets[1:].tolist()):
        keys = k[a:b].double().repeat_interleave(heads // kv_heads, 1)  # (L, H, D)
        scores = torch.einsum("qhd,khd->hqk", q[a:b].double(), keys) * scale
        scores = scores.masked_fill(~torch.ones(b - a, b - a, dtype=torch.bool).tril(), float("-inf"))
        torch.testing.assert_close(lse[a:b].double(), scores.logsumexp(-1).T, rtol=0, atol=1e-3 if dtype == torch.bfloat16 else 1e-5)


def test_packed_attention_refuses_what_its_kernels_do_not_take(kernels, monkeypatch):
    bf, f32 = dict(dtype=torch.bfloat16), dict(dtype=torch.float32)
    monkeypatch.setattr(kernels, "packed_attention", True)
    monkeypatch.setattr(kernels, "packed_attention_f32", True)
    takes = kernels.packed_attention_takes
    assert takes(torch.zeros(8, 4, 64, **bf), torch.zeros(8, 2, 64, **bf), torch.zeros(8, 2, 64, **bf))
    assert takes(torch.zeros(8, 4, 48, **f32), torch.zeros(8, 2, 48, **f32), torch.zeros(8, 2, 48, **f32))  # fp32: D by 16
    assert not takes(torch.zeros(8, 4, 48, **bf), torch.zeros(8, 2, 48, **bf), torch.zeros(8, 2, 48, **bf))  # bf16: D by 32
    assert not takes(torch.zeros(8, 4, 40, **f32), torch.zeros(8, 2, 40, **f32), torch.zeros(8, 2, 40, **f32))
    assert not takes(torch.zeros(8, 4, 64, **bf), torch.zeros(8, 2, 64, **f32), torch.zeros(8, 2, 64, **f32))  # mixed dtypes
    assert not takes(torch.zeros(8, 4, 64, dtype=torch.float16), torch.zeros(8, 2, 64, dtype=torch.float16),
                     torch.zeros(8, 2, 64, dtype=torch.float16))  # fp16: no kernel
    assert not takes(torch.zeros(8, 3, 64, **bf), torch.zeros(8, 2, 64, **bf), torch.zeros(8, 2, 64, **bf))  # 3 heads over 2
    assert not takes(torch.zeros(8, 4, 128, **bf)[:, :, :64], torch.zeros(8, 2, 64, **bf), torch.zeros(8, 2, 64, **bf))  # strided
    monkeypatch.setattr(kernels, "packed_attention_f32", False)  # a CPU without AVX2: fp32 goes to SDPA
    assert not takes(torch.zeros(8, 4, 64, **f32), torch.zeros(8, 2, 64, **f32), torch.zeros(8, 2, 64, **f32))
    assert takes(torch.zeros(8, 4, 64, **bf), torch.zeros(8, 2, 64, **bf), torch.zeros(8, 2, 64, **bf))


@pytest.fixture(scope="module")
def llama_head_32(tokenizer_dir, tmp_path_factory):
    """A tiny Llama whose heads are 32 wide (hidden 128, 4 heads over 2 key/value heads): the
    tiles' size; the shared tiny models' heads (8) take SDPA."""
    return build_tiny_model("llama", tokenizer_dir, tmp_path_factory.mktemp("llama-d32"), hidden_size=128)


def _long_packed_run(model_dir, tmp_path, monkeypatch, bf16: bool = True):
    """A LoRA model (bf16, or fp32) on the fast path and a padded batch it packs as a long one (the
    short-attention limit lowered to 4 tokens)."""
    monkeypatch.setattr(fast_packing, "SHORT_ATTENTION_MAX_LEN", 4)
    plan = plan_finetune(tiny_config(model_dir, tmp_path / "m", lora_dropout=0.0, bf16=bf16, target_modules="all-linear"))
    model = trained_a_little(plan).train()
    assert model.get_input_embeddings().weight.dtype == (torch.bfloat16 if bf16 else torch.float32)
    path = FastPath.install(model)
    batch = much_padding(plan)
    packing = fast_packing.Packing.of(batch["attention_mask"])
    assert path.packs_sequences and packing is not None and packing.long
    assert packing.offsets.tolist() == [0, *torch.tensor(packing.lengths).cumsum(0).tolist()]
    return model, path, batch


def _loss_and_grads(model, batch):
    model.zero_grad()
    loss, count = packed_loss(model, batch)
    (loss / count).backward()
    return float(loss) / count, torch.cat([p.grad.flatten().float() for p in model.parameters() if p.requires_grad])


@pytest.mark.parametrize("kernel", KERNELS)
def test_long_packed_batches_on_the_kernel_train_as_on_sdpa(llama_head_32, tmp_path, monkeypatch, kernel):
    dtype, tiles = KERNELS[kernel]
    model, path, batch = _long_packed_run(llama_head_32, tmp_path, monkeypatch, bf16=dtype == torch.bfloat16)
    if tiles and not path.kernels.amx:
        return
    monkeypatch.setattr(path.kernels, "amx", tiles)
    here = _kernel_here(path.kernels, kernel, monkeypatch)
    calls = []
    own_apply = fast_attention.PackedAttentionFunction.apply
    monkeypatch.setattr(fast_attention.PackedAttentionFunction, "apply", lambda *a: calls.append(1) or own_apply(*a))
    loss, grads = _loss_and_grads(model, batch)
    assert len(calls) == (model.config.num_hidden_layers if here else 0), "the kernel exactly where the CPU takes it"
    described = {"tiles": "bf16 on AMX tiles", "avx512_bf16": "bf16 on AVX512-BF16", "avx2_fp32": "fp32 on AVX2"}[kernel]
    assert (described in path.describe()) == here, path.describe()
    monkeypatch.setattr(path.kernels, "packed_attention", False)  # the SDPA path, per sequence
    monkeypatch.setattr(path.kernels, "packed_attention_f32", False)
    sdpa_loss, sdpa_grads = _loss_and_grads(model, batch)
    assert len(calls) == (model.config.num_hidden_layers if here else 0)
    if dtype == torch.float32:  # nothing rounded on either side: equal to fp32 sums
        assert loss == pytest.approx(sdpa_loss, rel=1e-5)
        assert F.cosine_similarity(grads, sdpa_grads, dim=0) > 1 - 1e-6
        return
    # Both run the whole model in bf16 (gradient cosine with its fp32 forward ~0.985 either way), so
    # they agree to bf16 noise (a head or sequence mixed up is far off); against the model's own
    # forward in fp32, the tiles are no further from it than SDPA (measured: loss 0.032 vs 0.041 off,
    # cosine 0.984 vs 0.988).
    assert loss == pytest.approx(sdpa_loss, rel=5e-3)
    assert F.cosine_similarity(grads, sdpa_grads, dim=0) > 0.995
    exact_loss, exact_grads = path._fp32_reference(model, packed_loss, batch, path._checked_parameters(model))
    cosine, sdpa_cosine = (float(F.cosine_similarity(g, exact_grads, dim=0)) for g in (grads, sdpa_grads))
    assert abs(loss - exact_loss) <= max(1.5 * abs(sdpa_loss - exact_loss), 2e-3 * exact_loss)
    assert cosine >= sdpa_cosine - 0.005


@pytest.mark.parametrize("bf16", [True, False], ids=["bf16", "fp32"])
def test_a_wrong_packed_attention_turns_the_path_off(llama_head_32, tmp_path, monkeypatch, caplog, bf16):
    model, path, batch = _long_packed_run(llama_head_32, tmp_path, monkeypatch, bf16=bf16)
    if path.kernels is not None:  # the fp32 kernel wherever it builds (training uses it only without AVX-512)
        monkeypatch.setattr(path.kernels, "packed_attention_f32", path.kernels.packed_attention_f32_built)
    assert path.verify(model, packed_loss, batch)
    own_forward = cpu_kernels.Kernels.packed_attention_forward
    broken = []

    def off_by_one_head(self, q, k, v, offsets, scale):  # each head given its neighbour's output
        out, lse = own_forward(self, q, k, v, offsets, scale)
        broken.append(1)
        return out.roll(1, dims=1).contiguous(), lse

    monkeypatch.setattr(cpu_kernels.Kernels, "packed_attention_forward", off_by_one_head)
    kernel = path.kernels is not None and (path.kernels.packed_attention if bf16 else path.kernels.packed_attention_f32)
    with caplog.at_level(logging.WARNING, logger="slmops"):
        verified = path.verify(model, packed_loss, batch)
    if kernel:
        assert broken and not verified and "disagrees with the model's own forward" in caplog.text
    else:  # the CPU lacks this dtype's kernel: the SDPA path ran, never the (broken) kernel
        assert verified and not broken


def test_short_fp32_batches_attend_alone_on_the_kernel(llama_head_32, tmp_path, monkeypatch, caplog):
    """Where the products are fp32 and the fp32 kernel takes the heads, short padded batches train
    padding-free to exactly their real tokens, each sequence's attention alone in the kernel
    (FP32_ALONE: no scatter back to the padded layout around each layer's attention): the padded
    batch's loss and gradients, every batch with padding packed, one without none; bf16 products
    keep the padded-layout policy (sharing prefixes on AVX512-BF16 without AMX); and a wrong kernel
    turns the path off at the start-up check."""
    plan = plan_finetune(tiny_config(llama_head_32, tmp_path / "m", lora_dropout=0.0, bf16=False, target_modules="all-linear"))
    model = trained_a_little(plan).train()
    path = FastPath.install(model)
    if path.kernels is None or not path.kernels.packed_attention_f32_built:  # no C compiler or no AVX2 + FMA here
        assert path.packing_policy(torch.float32) is fast_packing.PADDED_ATTENTION
        return
    # the fp32 kernel wherever it builds (training takes it only without AVX-512, where it was measured)
    monkeypatch.setattr(path.kernels, "packed_attention_f32", True)
    policy = path.packing_policy(torch.float32)
    assert policy is fast_packing.FP32_ALONE
    # bf16 products: the padded layout, with shared prefixes on AVX512-BF16 dot products (measured there), not on AMX tiles
    avx512_bf16_kernel = path.kernels.packed_attention_for(torch.bfloat16, 32) and not path.kernels.amx
    assert path.packing_policy(torch.bfloat16) is (fast_packing.PADDED_ATTENTION_SHARED_PREFIX if avx512_bf16_kernel
                                                    else fast_packing.PADDED_ATTENTION)
    batch = much_padding(plan)
    packing = fast_packing.Packing.of(batch["attention_mask"], policy=policy)
    assert packing is not None and not packing.long and packing.alone
    assert packing.rows == packing.tokens == int(batch["attention_mask"].sum())  # no rows rounding the count up
    loss_fn = functools.partial(packed_loss, policy=policy)
    calls = []
    for function in (fast_attention.PackedAttentionFunction, fast_attention.SharedPrefixAttentionFunction):  # (the examples
        # share the chat template's opening, which this policy packs once: tests/test_cpu_shared_prefix.py)
        monkeypatch.setattr(function, "apply", lambda *a, own=function.apply: calls.append(1) or own(*a))

    def loss_and_grads(loss_fn):
        model.zero_grad()
        loss, count = loss_fn(model, batch)
        (loss / count).backward()
        return float(loss) / count, torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])

    loss, grads = loss_and_grads(loss_fn)
    assert len(calls) == model.config.num_hidden_layers, "every layer's attention on the kernel"
    padded_loss, padded_grads = loss_and_grads(selective_loss)
    assert len(calls) == model.config.num_hidden_layers
    assert loss == pytest.approx(padded_loss, rel=1e-5)
    assert F.cosine_similarity(grads, padded_grads, dim=0) > 1 - 1e-6  # fp32 both ways, summed in other orders
    # one padding token is enough to pack under this policy (the padded one keeps such a batch padded); none, nothing to pack
    one_short = torch.ones(8, 12, dtype=torch.long)
    one_short[3, -1] = 0
    assert fast_packing.Packing.of(one_short, policy=policy) is not None
    assert fast_packing.Packing.of(one_short) is None
    assert fast_packing.Packing.of(torch.ones(8, 12, dtype=torch.long), policy=policy) is None

    assert path.verify(model, loss_fn, batch)
    own_forward = cpu_kernels.Kernels.packed_attention_forward
    monkeypatch.setattr(cpu_kernels.Kernels, "packed_attention_forward",  # each head given its neighbour's output
                        lambda self, *a: (lambda out, lse: (out.roll(1, dims=1).contiguous(), lse))(*own_forward(self, *a)))
    with caplog.at_level(logging.WARNING, logger="slmops"):
        assert not path.verify(model, loss_fn, batch)
    assert "disagrees with the model's own forward" in caplog.text
