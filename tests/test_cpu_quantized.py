"""QLoRA's 4-bit base on the fast path (nf4.c, train/cpu/quantized.py): the C kernel dequantizes
bitsandbytes' NF4 and FP4 weights to exactly what bitsandbytes' own routine gives, the base's
forward and backward equal bitsandbytes' Linear4bit bit for bit, QLoRA training takes it, and a
layer in a form it does not take keeps bitsandbytes' forward."""

import pytest
import torch

bnb_functional = pytest.importorskip("bitsandbytes.functional", reason="QLoRA needs bitsandbytes (a dependency of slmops)")
import bitsandbytes as bnb  # noqa: E402

from slmops.finetune_recipe import plan_finetune  # noqa: E402
from slmops.train.cpu import compat, kernels as cpu_kernels  # noqa: E402
from slmops.train.cpu.path import FastPath  # noqa: E402
from slmops.train.cpu.quantized import FourBitWeight  # noqa: E402

from helpers import much_padding, tiny_config, trained_a_little  # noqa: E402


@pytest.fixture(scope="module")
def kernels():
    built = cpu_kernels.get()
    assert built is not None, "this machine has gcc: the kernels must build"
    return built


# shapes: one 16-element group short of a block, a tail past the last 16s (50 x 30 = 1,500), a
# vocabulary-sized run split over the threads; blocksizes 32 to 256; nested absmax and plain
CASES = [((64, 32), 32, True), ((50, 30), 64, True), ((1536, 576), 64, True), ((576, 200), 128, False), ((3, 48), 256, False)]


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape,blocksize,nested", CASES)
def test_the_kernel_dequantizes_as_bitsandbytes(kernels, shape, blocksize, nested, quant_type, dtype):
    torch.manual_seed(0)
    weight = torch.randn(shape) * 0.05
    weight[0, :8] = torch.tensor([0.0, 1.0, -1.0, 1e-8, -3.0, 3.0, 0.5, -0.25])  # the levels' ends and zero
    packed, state = bnb_functional.quantize_4bit(weight, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested)
    layer = bnb.nn.Linear4bit(shape[1], shape[0], bias=False, compute_dtype=dtype, quant_type=quant_type)
    layer.weight = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, quant_type=quant_type, blocksize=blocksize)
    four_bit = FourBitWeight.of(layer, kernels)
    assert four_bit is not None
    want = torch.ops.bitsandbytes.dequantize_4bit.default(packed, four_bit.absmax, blocksize, quant_type, shape, dtype)
    assert torch.equal(four_bit.dequantize(dtype), want)
    assert torch.equal(bnb_functional.dequantize_4bit(packed, state).to(dtype), want) or dtype == torch.bfloat16
    assert want.abs().max() > 0


def test_the_kernel_decodes_what_was_encoded_where_a_row_ends_inside_a_block(kernels):
    """Rows of 96 in blocks of 64: the blocks run over the flattened weight, as quantize_4bit
    wrote them. The kernel decodes them as bitsandbytes' own definition does (its generic
    backend) and comes back within a level of the weight; bitsandbytes 0.50.2's AVX-512 CPU
    kernel, the one its layers call on such a CPU, takes the wrong block's scale there (an error
    of the size of the weight's largest value), so QLoRA tests compare on whole-block rows."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    torch.manual_seed(0)
    weight = torch.randn(80, 96) * 0.1
    weight[3] *= 20  # one row of large values: a block's scale read from the wrong block shows
    packed, state = bnb_functional.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=False)
    layer = bnb.nn.Linear4bit(96, 80, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, quant_type="nf4", blocksize=64)
    four_bit = FourBitWeight.of(layer, kernels)
    ours = four_bit.dequantize(torch.float32)
    definition = _dequantize_4bit_compute(packed.reshape(-1), state.absmax, state.code, 64, (80, 96), torch.float32)
    assert torch.equal(ours, definition)
    level_gap = 0.16 * float(state.absmax.max())  # rounding to NF4's nearest level: at most half its widest gap, 0.152 of the scale
    assert float((ours - weight).abs().max()) < level_gap
    native = torch.ops.bitsandbytes.dequantize_4bit.default(packed, state.absmax, 64, "nf4", (80, 96), torch.float32)
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        assert torch.equal(native, ours)
    elif not torch.equal(native, ours):  # the known bitsandbytes behaviour: if this changes, the note above goes
        assert float((native - weight).abs().max()) > 3 * level_gap


@pytest.mark.parametrize("compute", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bias", [False, True])
def test_the_base_gives_bitsandbytes_output_and_input_gradient(kernels, compute, bias):
    torch.manual_seed(0)
    # rows of 128, two whole blocks (bitsandbytes' AVX-512 kernel: see the test below)
    layer = bnb.nn.Linear4bit(128, 80, bias=bias, compute_dtype=compute, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(80, 128) * 0.1, requires_grad=False, quant_type="nf4", blocksize=64)
    layer = layer.to("cpu")  # (quantizes on the move, as loading does)
    if bias:
        layer.bias.requires_grad_(False)
    four_bit = FourBitWeight.of(layer, kernels)
    assert four_bit is not None and four_bit.current()
    x = torch.randn(2, 7, 128, requires_grad=True)
    grad = torch.randn(2, 7, 80)
    want = layer(x)
    (want_dx,) = torch.autograd.grad(want, x, grad)
    got = four_bit.forward(x)
    (got_dx,) = torch.autograd.grad(got, x, grad)
    assert got.dtype == want.dtype == torch.float32
    assert torch.equal(got, want) and torch.equal(got_dx, want_dx)


def test_a_form_it_does_not_take_keeps_bitsandbytes_forward(kernels, monkeypatch):
    layer = bnb.nn.Linear4bit(32, 16, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(16, 32), requires_grad=False, quant_type="nf4", blocksize=64)
    layer = layer.to("cpu")
    assert FourBitWeight.of(layer, None) is None, "no C kernels: bitsandbytes' own"
    four_bit = FourBitWeight.of(layer, kernels)
    assert four_bit is not None
    layer.weight.quant_state.packing_format_for_cpu = True  # repacked for bitsandbytes' inference kernel
    assert not four_bit.current() and compat.four_bit_state(layer) is None
    layer.weight.quant_state.packing_format_for_cpu = False
    layer.compute_dtype = torch.float16
    assert compat.four_bit_state(layer) is None, "fp16 compute: bitsandbytes' own"
    with pytest.raises(ValueError, match="not taken"):
        kernels.dequantize_4bit(four_bit.packed, four_bit.absmax, four_bit.code, 24, (16, 32), torch.float32)  # blocks of 16s
    with pytest.raises(ValueError, match="not taken"):
        kernels.dequantize_4bit(four_bit.packed, four_bit.absmax, four_bit.code, 64, (16, 32), torch.float16)


@pytest.mark.parametrize("compute", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_frozen_4bit_mlp_runs_as_one_node_on_the_dequantized_weights(kernels, compute):
    """QLoRA with no adapter on the MLP: the three 4-bit projections and the SwiGLU between them
    run as one autograd node, each weight dequantized in C for its product (forward 3, backward 3)
    and nothing but gate(x) and up(x) kept for the backward; output and input gradient as the
    float64 MLP on the same dequantized weights (to the compute dtype's precision) and as
    bitsandbytes' own layers give them. Before, matches() found no floating weight to probe with
    and such an MLP ran as seven autograd nodes."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    from slmops.train.cpu import mlp as fast_mlp
    from slmops.train.cpu import quantized
    from slmops.train.cpu.patches import Patches

    torch.manual_seed(4)
    module = LlamaMLP(LlamaConfig(hidden_size=128, intermediate_size=256, hidden_act="silu"))
    for name in fast_mlp.PROJECTIONS:  # rows of whole 64-blocks (bitsandbytes' AVX-512 kernel: see above)
        plain = getattr(module, name)
        layer = bnb.nn.Linear4bit(plain.in_features, plain.out_features, bias=False, compute_dtype=compute, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(plain.weight.data.clone(), requires_grad=False, quant_type="nf4", blocksize=64)
        setattr(module, name, layer.to("cpu"))
    x = torch.randn(2, 7, 128).to(compute)
    grad = torch.randn(2, 7, 128).to(compute)

    def run():
        x_in = x.clone().requires_grad_()
        out = module(x_in)
        out.backward(grad)
        return out.detach(), x_in.grad, out.grad_fn

    own_out, own_dx, own_node = run()
    patches = Patches()
    four_bit = {}
    for name in fast_mlp.PROJECTIONS:
        layer = getattr(module, name)
        four_bit[layer] = FourBitWeight.of(layer, kernels)
        quantized.install(patches, four_bit[layer], lambda: True)
    assert fast_mlp.matches(module), "probed in the compute dtype: the projections hold no floating weight"
    fast_mlp.install(patches, module, lambda: True, kernels, four_bit)
    calls = []
    own = cpu_kernels.Kernels.dequantize_4bit
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(cpu_kernels.Kernels, "dequantize_4bit", lambda self, *a: calls.append(1) or own(self, *a))
        out, dx, node = run()
    patches.undo()
    assert type(node).__name__ == "FrozenFourBitMLPFunctionBackward" and type(own_node).__name__ != type(node).__name__
    assert len(calls) == 6 and out.dtype == dx.dtype == compute

    weights = [four_bit[getattr(module, name)].dequantize(torch.float32).double() for name in fast_mlp.PROJECTIONS]
    x64 = x.double().requires_grad_()
    want = torch.nn.functional.linear(torch.nn.functional.silu(x64 @ weights[0].T) * (x64 @ weights[1].T), weights[2])
    want.backward(grad.double())
    tolerance = {"rtol": 1e-4, "atol": 1e-5} if compute == torch.float32 else {"rtol": 4e-2, "atol": 4e-2}
    torch.testing.assert_close(out.double(), want.detach(), **tolerance)
    torch.testing.assert_close(dx.double(), x64.grad, **tolerance)
    torch.testing.assert_close(out, own_out, **tolerance)
    torch.testing.assert_close(dx, own_dx, **tolerance)


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_a_4bit_qkv_group_is_as_exact_as_pefts_layers(qlora_llama, tmp_path, bf16):
    """QLoRA's q, k and v as one group: their three 4-bit weights dequantized into one matrix for
    one product (forward, and again for the input gradient), the LoRA terms alongside. Measured
    against float64 arithmetic on the same dequantized weights and adapters: the outputs and the
    input's gradient at least as exact as PEFT's three layers over bitsandbytes' (in bf16 the group
    rounds the input gradient once where autograd adds three bf16 ones: closer to exact, and so
    further from PEFT's own result than the per-layer path was), the adapters' gradients to the
    compute dtype's precision (PEFT computes its LoRA terms in fp32)."""
    plan = plan_finetune(tiny_config(qlora_llama, tmp_path / "q", method="qlora", lora_dropout=0.0, bf16=bf16,
                                     target_modules="all-linear"))
    model = trained_a_little(plan).eval()
    dtype = torch.bfloat16 if bf16 else torch.float32
    for layer in model.get_decoder().layers:
        attention = layer.self_attn
        projections = [attention.q_proj, attention.k_proj, attention.v_proj]
        x = torch.randn(4, 9, 64, generator=torch.Generator().manual_seed(5)).to(dtype)
        grads = [torch.randn(4, 9, m.base_layer.out_features, generator=torch.Generator().manual_seed(6 + i)).to(dtype)
                 for i, m in enumerate(projections)]

        def run():
            x_in = x.clone().requires_grad_()
            outs = [m(x_in) for m in projections]
            torch.autograd.backward(outs, grads)
            result = [o.detach() for o in outs] + [x_in.grad] + [p.grad for m in projections
                                                                  for p in (m.lora_A.default.weight, m.lora_B.default.weight)]
            model.zero_grad(set_to_none=True)
            assert all(r.dtype == want for r, want in zip(result, [dtype] * 4 + [torch.float32] * 6))
            return [r.double() for r in result], outs[0].grad_fn

        x64 = x.double().requires_grad_()
        adapters, outs = [], []
        for m in projections:
            weight = FourBitWeight.of(m.base_layer, cpu_kernels.get()).dequantize(torch.float32).double()
            a, b = (p.detach().double().requires_grad_() for p in (m.lora_A.default.weight, m.lora_B.default.weight))
            adapters += [a, b]
            outs.append(x64 @ weight.T + m.scaling["default"] * (x64 @ a.T) @ b.T)
        torch.autograd.backward(outs, [g.double() for g in grads])
        exact = [o.detach() for o in outs] + [x64.grad] + [p.grad for p in adapters]

        peft, peft_node = run()
        with FastPath.install(model) as path:
            group = next(g for g in path.groups if g.members == projections)
            assert group.four_bit is not None and len(group.four_bit.members) == 3
            ours, node = run()
        assert "LinearGroupFunction" in type(node).__name__ and "LinearGroupFunction" not in type(peft_node).__name__

        def error(got, want):
            return float((got - want).norm() / want.norm())

        for index, (mine, theirs, want) in enumerate(zip(ours, peft, exact)):
            if index < 4:  # q, k, v, the input's gradient
                assert error(mine, want) <= 1.1 * error(theirs, want) + 1e-6, (index, error(mine, want), error(theirs, want))
            else:  # the adapters' gradients
                assert error(mine, want) < (1e-2 if bf16 else 1e-5), (index, error(mine, want))


def test_products_dequantize_into_one_reused_buffer(kernels):
    """A path's 4-bit products share one buffer per dtype (ProductBuffer): every weight, alone or
    stacked in a group, is dequantized into the same memory, grown to the largest, with the values
    a fresh dequantization gives; fresh tensors stay what dequantize() returns."""
    from slmops.train.cpu.quantized import FourBitGroupWeight, ProductBuffer

    buffer = ProductBuffer()
    weights = []
    for out_features in (80, 16, 16, 192):
        layer = bnb.nn.Linear4bit(128, out_features, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(torch.randn(out_features, 128) * 0.1, requires_grad=False, quant_type="nf4", blocksize=64)
        weights.append(FourBitWeight.of(layer.to("cpu"), kernels, buffer))
    group = FourBitGroupWeight.of(weights[:3])
    stacked = group.product_matrix(torch.bfloat16)
    assert stacked.shape == (112, 128) and torch.equal(stacked, torch.cat([w.dequantize(torch.bfloat16) for w in weights[:3]]))
    first = stacked.data_ptr()
    largest = weights[3].product_matrix(torch.bfloat16)
    assert torch.equal(largest, weights[3].dequantize(torch.bfloat16))
    again = weights[0].product_matrix(torch.bfloat16)
    assert again.data_ptr() == largest.data_ptr(), "grown once to the largest, then reused"
    assert torch.equal(again, weights[0].dequantize(torch.bfloat16))
    assert weights[0].dequantize(torch.bfloat16).data_ptr() not in (first, again.data_ptr())
    fp32 = weights[1].backward_matrix(torch.float32)
    assert fp32.dtype == torch.float32 and fp32.data_ptr() != again.data_ptr(), "one buffer per dtype"


@pytest.mark.parametrize("targets", ["all-linear", "q_proj,v_proj"])
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_qlora_training_takes_the_c_dequantization(qlora_llama, tmp_path, monkeypatch, bf16, targets):
    """Every 4-bit layer, with an adapter on it or frozen alone, on the C dequantization; the
    start-up check against PEFT's and bitsandbytes' own forward passes."""
    from peft.tuners.lora.bnb import Linear4bit

    from slmops.train.loss import packed_loss

    plan = plan_finetune(tiny_config(qlora_llama, tmp_path / "q", method="qlora", lora_dropout=0.0, bf16=bf16,
                                     target_modules=targets))
    model = trained_a_little(plan).eval()
    batch = much_padding(plan)
    four_bit_layers = [m for m in model.modules() if type(m) is bnb.nn.Linear4bit]
    assert len(four_bit_layers) == 14, "the tiny Llama: 2 layers x q, k, v, o, gate, up, down"
    with FastPath.install(model) as path:
        adapted = [g for g in path.groups if isinstance(g.members[0], Linear4bit)]
        assert sum(len(g.members) for g in adapted) == (14 if targets == "all-linear" else 4)
        assert {id(b) for g in adapted for b in g.bases} <= {id(m) for m in four_bit_layers}
        assert all(g.four_bit is not None for g in adapted), "every adapted base's product in the group's function"
        if targets == "all-linear":  # q, k and v share their input: one group, one product on their three 4-bit weights
            assert sorted(len(g.members) for g in adapted) == [1] * 8 + [3] * 2
            assert "2 shared-input groups with one fused matmul" in path.describe()
        assert path.four_bit_layers == 14 and all("forward" in vars(m) for m in four_bit_layers), "adapted or frozen alike"
        assert "14 4-bit base weights dequantized in C" in path.describe()
        assert len(path.mlps) == 2, "both layers' MLPs on the fused SwiGLU, adapted or all 4-bit"
        assert len(path.attention_modules) == 2 and path.packs_sequences, \
            "both layers' attention on the fused rotary attention (probed in the 4-bit q_proj's compute dtype): padding-free batches"
        calls = []
        own = cpu_kernels.Kernels.dequantize_4bit
        monkeypatch.setattr(cpu_kernels.Kernels, "dequantize_4bit", lambda self, *a: calls.append(1) or own(self, *a))
        assert path.verify(model, packed_loss, batch), "the start-up check passes"
        # each layer's forward, and its backward where its input needs a gradient: all but the first
        # layer's q, k and v (their input is the frozen embedding's output)
        assert len(calls) == 2 * 14 - 3
    assert all("forward" not in vars(m) for m in four_bit_layers), "removed: bitsandbytes' own forwards"
