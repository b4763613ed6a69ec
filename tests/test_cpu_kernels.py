"""The fused C kernels compute what the PyTorch ops they replace compute (to the dtype's
precision), their autograd functions give PyTorch's gradients, and without a compiler
everything falls back to PyTorch."""

import platform

import pytest
import torch
import torch.nn.functional as F

from slmops.finetune_recipe import build_model, plan_finetune
from slmops.train import cpu_kernels, fast_mlp, fast_norm
from slmops.train.fast_lora import FastLoraPath, drop_positions

from helpers import tiny_config


# "generic": the library built without AVX-512, as CPUs without it (or without AVX512-BF16) run it;
# on x86 only, where the flag exists.
BUILDS = ["native", "generic"] if platform.machine() in ("x86_64", "AMD64") else ["native"]


@pytest.fixture(scope="module", params=BUILDS)
def kernels(request):
    built = cpu_kernels.get()
    assert built is not None, "this machine has gcc: the kernels must build (see cpu_kernels.get's log line)"
    if request.param == "generic":
        built = cpu_kernels.load(cpu_kernels._compiler(), cpu_kernels.FLAGS + ["-mno-avx512f"])
    return built


def _ulps(dtype):  # tolerance in units of the dtype's precision
    return {torch.bfloat16: dict(rtol=2e-2, atol=2e-2), torch.float32: dict(rtol=1e-5, atol=1e-5)}[dtype]


def _reference_rmsnorm(x, weight, eps):  # Llama's RMSNorm, in float64
    x64 = x.double()
    return weight.double() * x64 * torch.rsqrt(x64.square().mean(-1, keepdim=True) + eps)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rmsnorm_forward_and_backward(kernels, dtype):
    torch.manual_seed(0)
    x = (torch.randn(4, 13, 96) * 3).to(dtype)
    weight = (torch.rand(96) + 0.5).to(dtype)
    grad = torch.randn(4, 13, 96).to(dtype)
    y = fast_norm.RMSNormFunction.apply(x.requires_grad_(), weight, 1e-5, kernels)
    y.backward(grad)
    x64 = x.detach().double().requires_grad_()
    expected = _reference_rmsnorm(x64, weight, 1e-5)
    expected.backward(grad.double())
    torch.testing.assert_close(y.double(), expected.detach(), **_ulps(dtype))
    torch.testing.assert_close(x.grad.double(), x64.grad, **_ulps(dtype))
    # the eager fallback gives the same within the dtype's precision
    x2 = x.detach().clone().requires_grad_()
    fast_norm.RMSNormFunction.apply(x2, weight, 1e-5, None).backward(grad)
    torch.testing.assert_close(x2.grad.double(), x64.grad, **_ulps(dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_swiglu_forward_and_backward(kernels, dtype):
    torch.manual_seed(0)
    gate = (torch.randn(3, 17, 200) * 4).to(dtype).requires_grad_()  # large |gate|: both tails of the sigmoid
    up = torch.randn(3, 17, 200).to(dtype).requires_grad_()
    grad = torch.randn(3, 17, 200).to(dtype)
    out = fast_mlp.swiglu(gate, up, kernels)
    assert out.grad_fn is not None and "SwiGLU" in type(out.grad_fn).__name__
    out.backward(grad)
    g64, u64 = gate.detach().double().requires_grad_(), up.detach().double().requires_grad_()
    expected = F.silu(g64) * u64
    expected.backward(grad.double())
    torch.testing.assert_close(out.double(), expected.detach(), **_ulps(dtype))
    torch.testing.assert_close(gate.grad.double(), g64.grad, **_ulps(dtype))
    torch.testing.assert_close(up.grad.double(), u64.grad, **_ulps(dtype))


@pytest.mark.parametrize("dtype,rank", [(torch.bfloat16, 16), (torch.bfloat16, 5), (torch.float32, 16)])
def test_sparse_lora_dropout_kernels_equal_products_on_masked_copies(kernels, dtype, rank):
    """h = (x * keep_j) A_j^T, dA_j = d_j^T (x * keep_j) and dx = sum_j keep_j * (d_j A_j), from
    products on x itself minus the dropped terms, against float64 products on masked copies
    (rank 16 in bf16 runs the AVX-512 code where the CPU has it, other ranks the generic loops)."""
    torch.manual_seed(0)
    k, n, features, p = 3, 37, 40, 0.1
    x = torch.randn(n, features).to(dtype)
    a = torch.randn(k * rank, features).to(dtype)  # A_j in rows j * rank ..
    d_pre = torch.randn(n, k * rank).to(dtype)
    dropped = drop_positions(k * n * features, p, kernels=kernels)
    keep = torch.ones(k * n * features, dtype=torch.float64)
    keep[dropped] = 0
    keep = keep.view(k, n, features)
    a_t = a.t().contiguous()
    x64, a64, d64 = x.double(), a.double().view(k, rank, features), d_pre.double().view(n, k, rank)

    h = x @ a_t
    kernels.lora_drop_h(h, x, a_t, dropped, k)
    want_h = torch.cat([(x64 * keep[j]) @ a64[j].t() for j in range(k)], 1)
    torch.testing.assert_close(h.double(), want_h, **_ulps(dtype))

    da = (x.t() @ d_pre).float()
    kernels.lora_drop_da(da, x, d_pre, dropped, k)
    want_da = torch.cat([(x64 * keep[j]).t() @ d64[:, j] for j in range(k)], 1)
    torch.testing.assert_close(da.double(), want_da, **_ulps(dtype))

    dx = d_pre @ a_t.t()
    kernels.lora_drop_dx(dx, d_pre, a_t, dropped, k)
    want_dx = sum(keep[j] * (d64[:, j] @ a64[j]) for j in range(k))
    torch.testing.assert_close(dx.double(), want_dx, **_ulps(dtype))


def test_dropout_positions_kernel_draws_the_same_distribution(kernels):
    """The C loop turning uniforms into positions agrees with the PyTorch ops on the same
    uniforms except where a gap lands within rounding of an integer."""
    n, p = 300_000, 0.05
    torch.manual_seed(3)
    fast = drop_positions(n, p, kernels=kernels)
    torch.manual_seed(3)
    plain = drop_positions(n, p)
    assert torch.all(fast[1:] > fast[:-1]) and int(fast.max()) < n
    same = min(len(fast), len(plain))
    assert abs(len(fast) - len(plain)) <= 2 and torch.equal(fast[: same // 2], plain[: same // 2])
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # a user's setting must not reach the kernel's float input
    try:
        torch.manual_seed(3)
        assert torch.equal(drop_positions(n, p, kernels=kernels), fast)
    finally:
        torch.set_default_dtype(previous)


def test_large_tensors_use_both_threads_and_agree(kernels):
    """Above PARALLEL_MIN elements the loops run on OpenMP threads: same results."""
    torch.manual_seed(1)
    gate, up = torch.randn(64, 1536), torch.randn(64, 1536)
    torch.testing.assert_close(kernels.swiglu_forward(gate, up), F.silu(gate) * up, rtol=1e-5, atol=1e-5)
    x, weight = torch.randn(400, 576), torch.rand(576)
    y, _ = kernels.rmsnorm_forward(x, weight, 1e-6)
    torch.testing.assert_close(y.double(), _reference_rmsnorm(x, weight, 1e-6), rtol=1e-5, atol=1e-5)


def test_unsupported_inputs_take_pytorch_ops(kernels):
    gate = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    out = fast_mlp.swiglu(gate, torch.randn(4, 8, dtype=torch.float64), kernels)
    assert "SwiGLU" not in type(out.grad_fn).__name__  # float64: PyTorch's ops
    strided = torch.randn(8, 4).t()
    assert not kernels.supports(strided)


def test_no_compiler_means_pytorch_ops(monkeypatch, tiny_llama, tmp_path):
    model = build_model(plan_finetune(tiny_config(tiny_llama, tmp_path / "out"), quiet=True))
    monkeypatch.setenv("SLMOPS_CPU_KERNELS", "0")
    cpu_kernels.get.cache_clear()
    try:
        assert cpu_kernels.get() is None
        path = FastLoraPath(model)
        assert path.kernels is None and path.mlps == [] and len(path.norms) > 0
        assert "C kernels unavailable" in path.describe()
        path.remove()
    finally:
        cpu_kernels.get.cache_clear()


def test_mlp_with_another_activation_keeps_its_forward(kernels):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    config = LlamaConfig(hidden_size=32, intermediate_size=64, hidden_act="silu")
    assert fast_mlp.matches(LlamaMLP(config))
    config.hidden_act = "gelu"
    assert not fast_mlp.matches(LlamaMLP(config))


def test_a_failing_compiler_is_reported_and_pytorch_ops_used(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("CC", "false")  # exits 1 on any input
    monkeypatch.setenv("SLMOPS_CACHE", str(tmp_path))
    cpu_kernels.get.cache_clear()
    try:
        with caplog.at_level("WARNING", logger="slmops"):
            assert cpu_kernels.get() is None
        assert "fused CPU kernels unavailable" in caplog.text and "false failed" in caplog.text
    finally:
        cpu_kernels.get.cache_clear()


@pytest.mark.parametrize("dtype,shared_positions", [(torch.float32, True), (torch.float32, False), (torch.bfloat16, False)])
def test_rotary_attention_on_kernels_matches_pytorch_ops(kernels, dtype, shared_positions):
    """The kernels' rotate + transpose (forward and backward) give the PyTorch version's
    attention, with q/k/v as column slices of one projection output (as the fused q/k/v
    group returns them) and position embeddings per example or shared by the batch."""
    from slmops.train import fast_attention

    torch.manual_seed(0)
    batch, length, heads, kv_heads, dim = 3, 7, 6, 2, 8
    qkv = torch.randn(batch, length, (heads + 2 * kv_heads) * dim).to(dtype).requires_grad_()
    angles = torch.randn(1 if shared_positions else batch, length, dim // 2) * 3
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    cos32, sin_swapped = fast_attention._Rope().get(cos, sin)
    mask = torch.ones(batch, 1, length, length, dtype=torch.bool).tril()
    mask[1, :, :, 5:] = False
    bias = fast_attention._Bias().get(mask, length, heads // kv_heads, qkv.device)
    grad = torch.randn(batch, length, heads * dim).to(dtype)
    results = []
    for use in (kernels, None):
        q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], -1)
        out = fast_attention.RotaryAttentionFunction.apply(q, k, v, cos32, sin_swapped, bias, 0.35, heads, kv_heads, use)
        (d_qkv,) = torch.autograd.grad(out, qkv, grad)
        results.append((out.float(), d_qkv.float()))
    (out_k, grad_k), (out_ref, grad_ref) = results
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out_k, out_ref, **tolerance)
    torch.testing.assert_close(grad_k, grad_ref, **tolerance)
