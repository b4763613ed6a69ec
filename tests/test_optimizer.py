"""clipped_step makes the same update as clip_grad_norm_ followed by the optimizer's step, for
every optimizer slmops builds, clipped or not; fused AdamW clips inside its own pass."""

import math

import pytest
import torch

from slmops.train import optimizer as optim_module
from slmops.train.optimizer import clipped_step


def _params(seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator).requires_grad_() for shape in ((64, 48), (48,), (7, 5, 3))]


def _make(kind: str, params):
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.1, momentum=0.9)
    return torch.optim.AdamW(params, lr=0.01, weight_decay=0.1, fused=True if kind == "fused" else None)


def _gradients(step: int, scale: float) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=generator) * scale for p in _params(0)]


@pytest.mark.parametrize("kind", ["fused", "adamw", "sgd"])
@pytest.mark.parametrize("scale", [10.0, 1e-3])  # every step clipped; none clipped (norm under max_norm)
def test_same_update_as_clip_grad_norm_then_step(kind, scale):
    ours, theirs = _params(0), _params(0)
    ours_opt, theirs_opt = _make(kind, ours), _make(kind, theirs)
    for step in range(4):
        for params in (ours, theirs):
            for p, g in zip(params, _gradients(step, scale)):
                p.grad = g.clone()
        norm = clipped_step(ours_opt, ours, max_norm=1.0)
        expected_norm = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
        theirs_opt.step()
        assert float(norm) == pytest.approx(float(expected_norm), rel=1e-6)
        assert not hasattr(ours_opt, "grad_scale")
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        if kind != "sgd":
            for a, b in zip(ours, theirs):
                torch.testing.assert_close(ours_opt.state[a]["exp_avg"], theirs_opt.state[b]["exp_avg"], rtol=1e-5, atol=1e-7)
                torch.testing.assert_close(ours_opt.state[a]["exp_avg_sq"], theirs_opt.state[b]["exp_avg_sq"], rtol=1e-5, atol=1e-9)
    moved = sum(float((a - b).abs().sum()) for a, b in zip(ours, _params(0)))
    assert moved > 0  # (the steps did update the parameters)


def test_fused_adamw_clips_in_its_own_pass(monkeypatch):
    params = _params(0)
    optimizer = _make("fused", params)
    for p, g in zip(params, _gradients(0, 10.0)):
        p.grad = g.clone()

    def no_separate_pass(*args, **kwargs):
        raise AssertionError("fused AdamW should divide the gradients itself")

    monkeypatch.setattr(torch.nn.utils, "clip_grads_with_norm_", no_separate_pass)
    norm = clipped_step(optimizer, params, max_norm=1.0)
    assert float(norm) > 1.0
    # the gradients it read were divided by the norm's excess (fused AdamW writes them back unscaled)
    unclipped = torch.cat([g.flatten() for g in _gradients(0, 10.0)]).norm()
    clipped = torch.cat([p.grad.flatten() for p in params]).norm()
    assert float(clipped) == pytest.approx(1.0, rel=1e-4) and float(unclipped) > 10


def test_non_finite_norm_is_clipped_as_clip_grad_norm_does():
    ours, theirs = _params(0), _params(0)
    ours_opt, theirs_opt = _make("fused", ours), _make("fused", theirs)
    for params in (ours, theirs):
        for p, g in zip(params, _gradients(0, 1.0)):
            p.grad = g.clone()
        params[0].grad[0, 0] = math.inf
    assert math.isinf(float(clipped_step(ours_opt, ours, 1.0)))
    torch.nn.utils.clip_grad_norm_(theirs, 1.0)
    theirs_opt.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, equal_nan=True)


def test_scales_gradients_itself_only_for_fused_adam():
    params = _params(0)
    assert optim_module.scales_gradients_itself(_make("fused", params), "cpu")
    assert not optim_module.scales_gradients_itself(_make("adamw", params), "cpu")
    assert not optim_module.scales_gradients_itself(_make("sgd", params), "cpu")


def test_a_pytorch_whose_fused_adamw_ignores_grad_scale_clips_in_its_own_pass(monkeypatch):
    """grad_scale is an attribute torch.optim reads for AMP, not a documented argument: were a
    PyTorch to stop reading it, clipping must not silently stop."""
    assert optim_module.honours_grad_scale("cpu")  # this PyTorch's does
    real_step = torch.optim.AdamW.step

    def step_ignoring_grad_scale(self, closure=None):
        scale = self.__dict__.pop("grad_scale", None)
        try:
            return real_step(self, closure)
        finally:
            if scale is not None:
                self.grad_scale = scale

    monkeypatch.setattr(torch.optim.AdamW, "step", step_ignoring_grad_scale)
    optim_module.honours_grad_scale.cache_clear()
    try:
        assert not optim_module.honours_grad_scale("cpu")
        ours, theirs = _params(0), _params(0)
        ours_opt, theirs_opt = _make("fused", ours), _make("fused", theirs)
        assert not optim_module.scales_gradients_itself(ours_opt, "cpu")
        for params in (ours, theirs):
            for p, g in zip(params, _gradients(0, 10.0)):
                p.grad = g.clone()
        clipped_step(ours_opt, ours, 1.0)
        torch.nn.utils.clip_grad_norm_(theirs, 1.0)
        theirs_opt.step()
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    finally:
        optim_module.honours_grad_scale.cache_clear()
