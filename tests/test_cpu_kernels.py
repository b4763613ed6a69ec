"""The fused C kernels compute what the PyTorch ops they replace compute (to the dtype's
precision), their autograd functions give PyTorch's gradients, and without a compiler
everything falls back to PyTorch."""

import contextlib
import json
import os
import platform
import shutil
import subprocess

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from slmops.finetune_recipe import build_model, plan_finetune
from slmops.train.cpu import kernels as cpu_kernels, mlp as fast_mlp, norm as fast_norm
from slmops.train.cpu.lora import drop_positions
from slmops.train.cpu.patches import Patches
from slmops.train.cpu.path import FastPath

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
@pytest.mark.parametrize("rows", [5, 4 * 13, 700])  # fewer rows than the weight gradient's blocks; one thread; two
def test_rmsnorm_trainable_weight_gradient(kernels, dtype, rows):
    """Full fine-tuning trains the norm's weight: its gradient comes out of the same backward pass."""
    torch.manual_seed(0)
    x = (torch.randn(rows, 96) * 3).to(dtype)
    weight = (torch.rand(96) + 0.5).to(dtype)
    grad = torch.randn(rows, 96).to(dtype)
    x64, w64 = x.double().requires_grad_(), weight.double().requires_grad_()
    (_reference_rmsnorm(x64, w64, 1e-5) * grad.double()).sum().backward()
    for use in (kernels, None):  # the kernel, then the PyTorch version
        xs, w = x.clone().requires_grad_(), weight.clone().requires_grad_()
        y = fast_norm.RMSNormFunction.apply(xs, w, 1e-5, use)
        y.backward(grad)
        assert torch.equal(xs.detach(), x)  # the saved input is left as it was
        torch.testing.assert_close(xs.grad.double(), x64.grad, **_ulps(dtype))
        # (bf16: the sum of `rows` products rounded once at the end, against float64's)
        torch.testing.assert_close(w.grad.double(), w64.grad, rtol=_ulps(dtype)["rtol"], atol=_ulps(dtype)["atol"] * rows ** 0.5)
        assert w.grad.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_trainable_norm_installs_on_the_kernel_only_where_its_gradient_agrees(kernels, dtype, monkeypatch):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    module = LlamaRMSNorm(96, eps=1e-5).to(dtype)
    with torch.no_grad():
        module.weight.uniform_(0.5, 1.5)
    assert fast_norm.matches(module) and fast_norm.weight_gradient_agrees(module, kernels)
    patches = Patches()
    fast_norm.install(patches, module, lambda: True, kernels)
    x = torch.randn(40, 96).to(dtype).requires_grad_()
    module(x).sum().backward()
    assert module.weight.grad is not None and module.weight.grad.abs().sum() > 0
    patches.undo()
    # a kernel whose weight gradient is wrong (the PyTorch version's, doubled) is not used for this norm
    broken = cpu_kernels.Kernels.rmsnorm_backward_with_weight

    def doubled(self, *args):
        dx, dw = broken(self, *args)
        return dx, dw * 2

    monkeypatch.setattr(cpu_kernels.Kernels, "rmsnorm_backward_with_weight", doubled)
    assert not fast_norm.weight_gradient_agrees(module, kernels)
    assert fast_norm.weight_gradient_agrees(module, None)
    module.weight.grad = None
    fast_norm.install(patches, module, lambda: True, kernels)
    y = module(x.detach())
    y.sum().backward()
    expected = LlamaRMSNorm(96, eps=1e-5).to(dtype)
    expected.weight.data.copy_(module.weight.data)
    expected(x.detach()).sum().backward()
    torch.testing.assert_close(module.weight.grad, expected.weight.grad, **_ulps(dtype))
    patches.undo()


def test_trainable_norms_alike_are_checked_once(kernels, monkeypatch):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    calls = []
    monkeypatch.setattr(fast_norm, "weight_gradient_agrees", lambda module, k: calls.append(module) or False)
    norms = [LlamaRMSNorm(96, eps=1e-5), LlamaRMSNorm(96, eps=1e-5), LlamaRMSNorm(64, eps=1e-5)]
    patches, checked = Patches(), {}
    for module in norms:
        fast_norm.install(patches, module, lambda: True, kernels, checked)
    assert calls == [norms[0], norms[2]]  # one check for the two alike, one for the other width
    x = torch.randn(5, 96, requires_grad=True)
    try:
        for module in norms[:2]:  # both answered by the one failed check: the PyTorch version, no kernels
            y = module(x)
            assert type(y.grad_fn).__name__.startswith("RMSNormFunction")
            assert y.grad_fn.kernels is None
    finally:
        patches.undo()


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


@pytest.mark.parametrize("dtype,packed", [(torch.bfloat16, False), (torch.bfloat16, True), (torch.float32, False)])
def test_frozen_mlp_function_gives_the_input_gradient_of_the_mlp(kernels, dtype, packed):
    """The whole SwiGLU MLP on frozen weights as one node (its forward products on AMX-packed
    weights where asked and available): output and input gradient as the float64
    down(silu(x gate^T) * x up^T) (to the dtype's precision), and no weight gradients."""
    torch.manual_seed(2)
    x = torch.randn(2, 9, 32).to(dtype).requires_grad_()
    w_gate, w_up, w_down = (torch.randn(*shape).div(5).to(dtype) for shape in ((80, 32), (80, 32), (32, 80)))
    grad = torch.randn(2, 9, 32).to(dtype)
    packs = tuple(kernels.pack_weight(w) for w in (w_gate, w_up, w_down)) if packed and kernels.amx else None
    assert (packs is not None) == (packed and _cpu_has_amx() and kernels is cpu_kernels.get())
    out = fast_mlp.FrozenMLPFunction.apply(x, w_gate, w_up, w_down, kernels, packs)
    out.backward(grad)
    x64 = x.detach().double().requires_grad_()
    want = F.linear(F.silu(F.linear(x64, w_gate.double())) * F.linear(x64, w_up.double()), w_down.double())
    want.backward(grad.double())
    torch.testing.assert_close(out.double(), want.detach(), **_ulps(dtype))
    torch.testing.assert_close(x.grad.double(), x64.grad, **_ulps(dtype))
    assert all(w.grad is None for w in (w_gate, w_up, w_down))


def test_mlp_under_autocast_runs_its_modules(kernels):
    """Under autocast (full fine-tuning's matmuls) the one-node MLP steps aside: the installed
    MLP gives what the module's own forward gives, gradients included."""
    torch.manual_seed(3)

    class MLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_proj, self.up_proj = torch.nn.Linear(32, 80, bias=False), torch.nn.Linear(32, 80, bias=False)
            self.down_proj, self.act_fn = torch.nn.Linear(80, 32, bias=False), torch.nn.SiLU()

        def forward(self, x):
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    mlp = MLP().requires_grad_(False)
    x, grad = torch.randn(2, 7, 32), torch.randn(2, 7, 32)
    results = []
    patches = Patches()
    for install in (False, True):
        if install:
            assert fast_mlp.matches(mlp)
            fast_mlp.install(patches, mlp, lambda: True, kernels)
        x_in = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = mlp(x_in)
        out.float().backward(grad)
        results.append((out.float(), x_in.grad))
    patches.undo()
    torch.testing.assert_close(results[1][0], results[0][0], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=2e-2, atol=2e-2)


# (k, n, features, p): few positions (one thread); over DROP_PARALLEL_MIN positions, h and dx split
# by rows between the threads: many rows, and few rows holding hundreds of positions each
SHAPES = [(3, 37, 40, 0.1), (3, 64, 576, 0.05), (1, 8, 1024, 0.6)]


@pytest.mark.parametrize("k,n,features,p", SHAPES)
@pytest.mark.parametrize("dtype,rank", [(torch.bfloat16, 16), (torch.bfloat16, 5), (torch.float32, 16)])
def test_sparse_lora_dropout_kernels_equal_products_on_masked_copies(kernels, dtype, rank, k, n, features, p):
    """h = (x * keep_j) A_j^T, dA_j = d_j^T (x * keep_j) and dx = sum_j keep_j * (d_j A_j), from
    products on x itself minus the dropped terms, against float64 products on masked copies
    (rank 16 in bf16 runs the AVX-512 code where the CPU has it, other ranks the generic loops)."""
    torch.manual_seed(0)
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
    start = h.clone()
    kernels.lora_drop_h(h, x, a_t, dropped, k)
    want_h = torch.cat([(x64 * keep[j]) @ a64[j].t() for j in range(k)], 1)
    _assert_close_after_cancellation(h, want_h, start)

    da = (x.t() @ d_pre).float()
    start = da.clone()
    kernels.lora_drop_da(da, x, d_pre, dropped, k)
    want_da = torch.cat([(x64 * keep[j]).t() @ d64[:, j] for j in range(k)], 1)
    _assert_close_after_cancellation(da, want_da, start.to(dtype))

    dx = d_pre @ a_t.t()
    start = dx.clone()
    kernels.lora_drop_dx(dx, d_pre, a_t, dropped, k)
    want_dx = sum(keep[j] * (d64[:, j] @ a64[j]) for j in range(k))
    # an element dropped by several adapters is stored (rounded) after each adapter's term
    partial = sum(((1 - keep[j]) * (d64[:, j] @ a64[j])).abs() for j in range(k))
    _assert_close_after_cancellation(dx, want_dx, start, partial)


def test_sparse_lora_dropout_kernels_give_the_same_on_one_thread_and_two(kernels):
    """Over DROP_PARALLEL_MIN positions h and dx split the rows between the threads: bitwise as
    on one thread (each element's terms in the same order); da runs on one thread either way."""
    k, n, features, rank = 3, 96, 576, 16
    results = {}
    for threads in (1, 2, 1, 2):
        torch.manual_seed(5)
        x, a_t = torch.randn(n, features).bfloat16(), torch.randn(features, k * rank).bfloat16()
        d_pre = torch.randn(n, k * rank).bfloat16()
        dropped = drop_positions(k * n * features, 0.05, kernels=kernels)
        with torch_threads(threads):
            h, da, dx = x @ a_t, (x.t() @ d_pre).float(), d_pre @ a_t.t()
            kernels.lora_drop_h(h, x, a_t, dropped, k)
            kernels.lora_drop_da(da, x, d_pre, dropped, k)
            kernels.lora_drop_dx(dx, d_pre, a_t, dropped, k)
        if threads in results:  # run to run, same threads: identical
            assert all(torch.equal(got, was) for got, was in zip((h, da, dx), results[threads]))
        results[threads] = (h, da, dx)
    (h1, da1, dx1), (h2, da2, dx2) = results[1], results[2]
    assert torch.equal(h1, h2) and torch.equal(dx1, dx2) and torch.equal(da1, da2)


def _assert_close_after_cancellation(got, want, start, partial=0.0):
    """got = start - (dropped terms), start the product rounded to its dtype: the error is
    that rounding (relative to |start|, which the subtraction may leave much larger than
    |want|), the result's own rounding, and that of any partial result stored between terms."""
    rel = {torch.bfloat16: 2**-7, torch.float32: 1e-5}[start.dtype]
    bound = rel * (start.double().abs() + want.abs() + partial) + 1e-4
    excess = (got.double() - want).abs() - bound
    assert float(excess.max()) <= 0, f"off by up to {float(excess.max()):.3g} beyond the rounding bound"


def _splitmix64_uniforms(seed: int, first: int, count: int) -> np.ndarray:
    """The C file's uniforms, in numpy: top 24 bits of splitmix64 outputs first+1 .. first+count."""
    z = np.uint64(seed) + np.arange(first + 1, first + count + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(40)).astype(np.float64) / 2**24


def test_dropout_positions_kernel_computes_geometric_gaps_of_splitmix64_uniforms(kernels):
    """The kernel's gaps are floor(ln(1 - u) / ln(1 - p)) + 1 of its generator's uniforms,
    computed here in float64 (a gap within the float log's rounding of an integer may differ
    by one); a draw continued from `first` is the same stream as one long draw."""
    n, p, seed = 300_000, 0.05, 0x1234_5678_9ABC_DEF
    log_keep = float(np.log1p(-p))
    count = 16_000  # ~ n * p + 8 sqrt(n * p): nearly always enough
    positions, complete = kernels.drop_positions(seed, 0, count, log_keep, -1, n)
    assert not complete and int(positions[-1]) < n and torch.all(positions[1:] > positions[:-1])
    want_gaps = np.floor(np.log1p(-_splitmix64_uniforms(seed, 0, count)) / log_keep) + 1
    gaps = torch.diff(positions, prepend=torch.tensor([-1])).numpy()
    differ = gaps != want_gaps[: len(gaps)]
    assert differ.sum() <= 2 and np.all(np.abs(gaps - want_gaps[: len(gaps)])[differ] == 1)
    first_part, more = kernels.drop_positions(seed, 0, 100, log_keep, -1, n)
    assert more and len(first_part) == 100
    rest, _ = kernels.drop_positions(seed, 100, count - 100, log_keep, int(first_part[-1]), n)
    assert torch.equal(torch.cat([first_part, rest]), positions)


def test_dropout_positions_with_the_kernel_come_from_torchs_generator(kernels):
    """The seed comes from torch's generator: same torch seed, same positions, whatever the
    default dtype (the kernel reads no torch floats); another seed, other positions."""
    n, p = 300_000, 0.05
    torch.manual_seed(3)
    fast = drop_positions(n, p, kernels=kernels)
    assert torch.all(fast[1:] > fast[:-1]) and int(fast.max()) < n
    assert abs(len(fast) - n * p) < 5 * (n * p) ** 0.5
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(3)
        assert torch.equal(drop_positions(n, p, kernels=kernels), fast)
    finally:
        torch.set_default_dtype(previous)
    torch.manual_seed(4)
    assert not torch.equal(drop_positions(n, p, kernels=kernels)[:100], fast[:100])


def test_large_tensors_use_both_threads_and_agree(kernels):
    """Above PARALLEL_MIN elements the loops run on OpenMP threads: same results (two threads
    asked for: under `pytest -n 2` a worker runs on one)."""
    torch.manual_seed(1)
    gate, up = torch.randn(64, 1536), torch.randn(64, 1536)
    x, weight = torch.randn(400, 576), torch.rand(576)
    with torch_threads(2):
        torch.testing.assert_close(kernels.swiglu_forward(gate, up), F.silu(gate) * up, rtol=1e-5, atol=1e-5)
        y, _ = kernels.rmsnorm_forward(x, weight, 1e-6)
    torch.testing.assert_close(y.double(), _reference_rmsnorm(x, weight, 1e-6), rtol=1e-5, atol=1e-5)


@contextlib.contextmanager
def torch_threads(count: int):
    """PyTorch's (and so the kernels' OpenMP) thread count for the block; restored after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def test_unsupported_inputs_take_pytorch_ops(kernels):
    gate = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    out = fast_mlp.swiglu(gate, torch.randn(4, 8, dtype=torch.float64), kernels)
    assert "SwiGLU" not in type(out.grad_fn).__name__  # float64: PyTorch's ops
    strided = torch.randn(8, 4).t()
    assert not kernels.supports(strided)


def test_no_compiler_means_pytorch_ops(monkeypatch, tiny_llama, tmp_path):
    model = build_model(plan_finetune(tiny_config(tiny_llama, tmp_path / "out")))
    monkeypatch.setenv("SLMOPS_CPU_KERNELS", "0")
    cpu_kernels.get.cache_clear()
    try:
        assert cpu_kernels.get() is None
        path = FastPath.install(model)
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
    from slmops.train.cpu import attention as fast_attention

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


def _cpu_has_amx() -> bool:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return " amx_bf16" in cpuinfo.read()
    except OSError:
        return False


def _cap_isa(monkeypatch, cap: str | None) -> None:
    """ONEDNN_MAX_CPU_ISA set to `cap` (None: unset), its older name unset."""
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    if cap is None:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)


@pytest.mark.parametrize("cap,tiles,bf16_dots", [(None, True, True), ("ALL", True, True), ("avx512_core_amx", True, True),
                                                 ("AVX10_1_512_AMX", True, True), ("AVX512_CORE_BF16", False, True),
                                                 ("AVX2", False, False)])
def test_the_tile_kernels_follow_onednns_isa_cap(monkeypatch, cap, tiles, bf16_dots):
    """ONEDNN_MAX_CPU_ISA below AMX turns the fast path's own tile kernels off too (one variable runs a
    training as on a CPU without tiles), below AVX512-BF16 its bf16 attention kernel as well; unset, or
    at a level with AMX, they run where the CPU has them."""
    built = cpu_kernels.get()
    _cap_isa(monkeypatch, cap)
    capped = cpu_kernels.Kernels(built.lib)
    assert capped.amx is (tiles and bool(built.lib.amx_available()))
    assert capped.packed_attention is (bf16_dots and bool(built.lib.fa_available()))
    assert not built.lib.amx_available() or _cpu_has_amx()


@pytest.mark.parametrize("cap,admitted", [(None, True), ("AVX512_CORE_BF16", True), ("AVX512_CORE", False), ("AVX2", False)])
def test_bf16_is_chosen_only_where_onednns_isa_cap_lets_it_be_fast(monkeypatch, cap, admitted):
    """Capped below AVX512-BF16, oneDNN computes bf16 products without bf16 instructions (Zen 3 measured
    1.2 GFLOP/s against fp32's 100): a run left to choose trains in fp32 there, as on a CPU without them."""
    from slmops.models import precision

    _cap_isa(monkeypatch, cap)
    has_bf16 = "avx512_bf16" in cpu_kernels.cpu_features().split()
    precision.cpu_has_fast_bf16.cache_clear()
    try:
        chosen = precision.choose_precision(None, False, "auto", True, torch.device("cpu"))
        assert precision.cpu_has_fast_bf16() is (admitted and has_bf16)
        assert chosen.weights == (torch.bfloat16 if admitted and has_bf16 else torch.float32), chosen.reason
    finally:
        precision.cpu_has_fast_bf16.cache_clear()


# (m, k, n): the LoRA shapes (rank 16 and three stacked: 48), and tails of every kind: rows under a
# tile (16), columns under a panel pair (32), an inner size that is not a multiple of 32.
AMX_SHAPES = [(384, 576, 48), (400, 48, 960), (48, 390, 576), (37, 16, 100), (5, 34, 7), (16, 2, 3)]


@pytest.mark.parametrize("m,k,n", AMX_SHAPES)
def test_amx_matmul_matches_float64(kernels, m, k, n):
    """C = alpha A B (+ C) on AMX tiles, for B given row-major, column-major and as a column
    slice of a wider matrix, and A given as a transpose; bf16 out rounded once, fp32 out, and
    fp32 stored transposed."""
    native = kernels is cpu_kernels.get()  # the generic build (no AVX-512) has no AMX path
    assert kernels.amx == (_cpu_has_amx() and native), "AMX exactly where the CPU has it and the library is built for it"
    if not kernels.amx:
        return
    torch.manual_seed(0)
    a = torch.randn(m, k, dtype=torch.bfloat16)
    wide = torch.randn(k, n + 9, dtype=torch.bfloat16)
    b_layouts = (torch.randn(k, n, dtype=torch.bfloat16), torch.randn(n, k, dtype=torch.bfloat16).t(), wide[:, 3 : 3 + n])
    for a, b in [(a, b) for b in b_layouts] + [(a.t().contiguous().t(), b_layouts[0])]:  # last: A given transposed
        exact = a.double() @ b.double()
        scale = float(exact.abs().max())
        bf16 = dict(rtol=0, atol=scale * 2**-8)  # one bf16 rounding of the result, relative to its largest element
        torch.testing.assert_close(kernels.amx_matmul(a, b).double(), exact, **bf16)
        start = torch.randn(m, n, dtype=torch.bfloat16)
        out = start.clone()
        assert kernels.amx_matmul(a, b, out=out, alpha=0.5, accumulate=True) is out
        torch.testing.assert_close(out.double(), start.double() + 0.5 * exact, rtol=2**-8, atol=scale * 2**-8)
        fp32 = dict(rtol=1e-5, atol=scale * 1e-6)  # products of bf16 are exact in fp32: only the fp32 sums round
        torch.testing.assert_close(kernels.amx_matmul(a, b, fp32=True).double(), exact, **fp32)
        transposed = kernels.amx_matmul(a, b, transposed=True)
        assert transposed.shape == (n, m) and transposed.dtype == torch.float32
        torch.testing.assert_close(transposed.double(), exact.t(), **fp32)


def test_amx_matmul_rejects_what_it_cannot_compute(kernels):
    bf = dict(dtype=torch.bfloat16)
    if not kernels.amx:  # (test_amx_matmul_matches_float64 checks that this is right)
        with pytest.raises(RuntimeError, match="no AMX"):
            kernels.amx_matmul(torch.zeros(4, 4, **bf), torch.zeros(4, 4, **bf))
        return
    with pytest.raises(ValueError, match="even inner size"):
        kernels.amx_matmul(torch.zeros(4, 3, **bf), torch.zeros(3, 4, **bf))
    with pytest.raises(TypeError, match="bf16"):
        kernels.amx_matmul(torch.zeros(4, 4), torch.zeros(4, 4, **bf))
    with pytest.raises(ValueError, match="contiguous"):
        kernels.amx_matmul(torch.zeros(4, 4, **bf), torch.zeros(4, 4, **bf), out=torch.zeros(4, 4, **bf).t(), accumulate=True)
    with pytest.raises(ValueError, match="shape"):  # an `out` it would write past
        kernels.amx_matmul(torch.zeros(4, 4, **bf), torch.zeros(4, 6, **bf), out=torch.zeros(4, 4, **bf), accumulate=True)
    with pytest.raises(ValueError, match="do not chain"):
        kernels.amx_matmul(torch.zeros(4, 4, **bf), torch.zeros(6, 4, **bf))
    with pytest.raises(ValueError, match="input features"):
        kernels.amx_linear(torch.zeros(4, 6, **bf), kernels.pack_weight(torch.zeros(8, 4, **bf)))


@pytest.mark.parametrize("members", [(0, 1, 2), (0, 2), (1,)])
def test_lora_operands_are_the_stacked_transposed_and_block_matrices(kernels, members):
    """One pass gives what stack/cast, transpose and block_diag give: A stacked in bf16, its
    transpose, and each B_j^T times its scale in its adapter's rows and its member's columns
    (zero elsewhere)."""
    torch.manual_seed(0)
    sizes, rank, features = (24, 8, 8), 5, 20
    columns = [sum(sizes[:m]) for m in members]
    a = [torch.randn(rank, features) for _ in members]
    b = [torch.randn(sizes[m], rank) for m in members]
    scales = [1.5, 2.25, 0.5][: len(members)]
    a2, a_t, b_block = kernels.lora_operands(a, b, scales, columns, sum(sizes))
    stacked = torch.cat(a).to(torch.bfloat16)
    assert torch.equal(a2, stacked) and torch.equal(a_t, stacked.t())
    expected = torch.zeros(len(members) * rank, sum(sizes), dtype=torch.bfloat16)
    for j, (m, b_j) in enumerate(zip(members, b)):
        expected[j * rank : (j + 1) * rank, columns[j] : columns[j] + sizes[m]] = (scales[j] * b_j.t()).to(torch.bfloat16)
    assert torch.equal(b_block, expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(384, 48), (5, 70), (33, 1)])
def test_transpose(kernels, dtype, shape):
    x = torch.randn(*shape).to(dtype)
    assert torch.equal(kernels.transpose(x), x.t())


# ---- the kernel cache: only a library slmops built, for this CPU, in a private folder --------
def _fresh_get(monkeypatch, cache):
    monkeypatch.setenv("SLMOPS_CACHE", str(cache))
    cpu_kernels.get.cache_clear()


def _planted_library(path, marker):
    """A shared library that creates `marker` the moment it is loaded."""
    source = path.with_suffix(".c")
    source.write_text('#include <stdio.h>\n__attribute__((constructor)) static void run(void) '
                      f'{{ FILE *f = fopen("{marker}", "w"); if (f) fclose(f); }}\n'
                      "long slmops_kernels_version(void) { return %d; }\n" % cpu_kernels.VERSION)
    subprocess.run([cpu_kernels._compiler(), "-shared", "-fPIC", str(source), "-o", str(path)], check=True)
    source.unlink()


def test_a_planted_library_is_refused_and_rebuilt(monkeypatch, tmp_path, caplog):
    cache = tmp_path / "cache"
    _fresh_get(monkeypatch, cache)
    try:
        target = cpu_kernels.library_path(cpu_kernels._compiler())
        target.parent.mkdir(parents=True, mode=0o700)
        marker = tmp_path / "ran"
        _planted_library(target, marker)  # no build record: not ours
        with caplog.at_level("WARNING", logger="slmops"):
            kernels = cpu_kernels.get()
        assert kernels is not None and not marker.exists()
        assert "has no build record" in caplog.text
        # a planted library beside the genuine record: the hash gives it away
        _planted_library(target, marker)
        os.chmod(target, 0o700)
        cpu_kernels.get.cache_clear()
        caplog.clear()
        with caplog.at_level("WARNING", logger="slmops"):
            assert cpu_kernels.get() is not None
        assert "sha256 mismatch" in caplog.text and not marker.exists()
        assert cpu_kernels._sha256(target) == json.loads(target.with_suffix(".json").read_text())["sha256"]  # ours again
    finally:
        cpu_kernels.get.cache_clear()


def test_a_library_built_for_other_cpu_features_is_not_loaded(monkeypatch, tmp_path, caplog):
    cache = tmp_path / "cache"
    _fresh_get(monkeypatch, cache)
    try:
        assert cpu_kernels.get() is not None
        first = cpu_kernels.library_path(cpu_kernels._compiler())
        # the same cache on a CPU without AVX-512: another file name, built anew
        monkeypatch.setattr(cpu_kernels, "cpu_features", lambda: "fpu sse sse2 avx avx2")
        other = cpu_kernels.library_path(cpu_kernels._compiler())
        assert other != first
        # a record that says another CPU (copied from another machine under this name) is bypassed
        shutil.copy(first, other)
        record = json.loads(first.with_suffix(".json").read_text())
        other.with_suffix(".json").write_text(json.dumps(record))  # its cpu_features are this machine's, not "fpu sse..."
        os.chmod(other, 0o700)
        cpu_kernels.get.cache_clear()
        with caplog.at_level("WARNING", logger="slmops"):
            kernels = cpu_kernels.get()
        assert "was built for another CPU" in caplog.text
        assert kernels is not None
        assert json.loads(other.with_suffix(".json").read_text())["cpu_features"] == "fpu sse sse2 avx avx2"
    finally:
        cpu_kernels.get.cache_clear()


def test_a_cache_folder_others_can_write_is_refused(monkeypatch, tmp_path, caplog):
    cache = tmp_path / "shared"
    (cache / "kernels").mkdir(parents=True)
    os.chmod(cache / "kernels", 0o777)
    _fresh_get(monkeypatch, cache)
    try:
        with caplog.at_level("WARNING", logger="slmops"):
            assert cpu_kernels.get() is None
        assert "fused CPU kernels off" in caplog.text and "is writable by others (mode 0777)" in caplog.text
        assert not list((cache / "kernels").iterdir())
    finally:
        cpu_kernels.get.cache_clear()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_rows_matches_the_pytorch_rotation_and_its_transpose(kernels, dtype):
    """The packed batch's rotary embedding (long padding-free batches): forward and backward
    (the transpose) equal attention._rope's in float64, to one rounding of the dtype; the
    input may be a column slice of a wider matrix (a fused q/k/v output)."""
    from slmops.train.cpu.attention import RopeRowsFunction, _Rope, _rope

    torch.manual_seed(0)
    rows, heads, dim = 37, 3, 64
    x = torch.randn(rows, 3 * heads * dim, dtype=dtype)[:, heads * dim : 2 * heads * dim].view(rows, heads, dim)
    angles = torch.randn(1, rows, dim // 2) * 3
    cos, sin_swapped = _Rope().get(torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1))
    cos, sin_swapped = cos[0], sin_swapped[0]
    exact = x.double().requires_grad_()
    want = _rope(exact, cos[:, None].double(), sin_swapped[:, None].double())
    grad = torch.randn(rows, heads, dim, dtype=dtype)
    (want_grad,) = torch.autograd.grad(want, exact, grad.double())
    ours = x.detach().requires_grad_()
    got = RopeRowsFunction.apply(ours, cos, sin_swapped, kernels)
    (got_grad,) = torch.autograd.grad(got, ours, grad)
    assert got.dtype == dtype and got.is_contiguous()
    tolerance = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=2**-8, atol=2**-8)
    torch.testing.assert_close(got.double(), want.detach(), **tolerance)
    torch.testing.assert_close(got_grad.double(), want_grad, **tolerance)
    with pytest.raises(ValueError, match="side by side"):
        kernels.rope_rows(x.transpose(1, 2), cos, sin_swapped)
