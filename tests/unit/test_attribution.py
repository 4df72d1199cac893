"""Attribution methods: known answers on hand-built models, completeness, bad input, no hooks left."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mechscope.cnn.data.mnist import MNIST
from mechscope.cnn.methods import attribution as A
from mechscope.cnn.methods import layer_attribution as L
from mechscope.cnn.runs import load_run
from mechscope.core.errors import MechscopeError
from mechscope.core.hooks import attached_hooks


class Linear(nn.Module):
    """f_k(x) = Σ w_k · x + b_k over a [B, 1, 4, 4] input."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = nn.Parameter(torch.randn(3, 16, generator=g))
        self.b = nn.Parameter(torch.randn(3, generator=g))

    def forward(self, x):
        return x.flatten(1) @ self.w.T + self.b


class OnePath(nn.Module):
    """f_0(x) = v · relu(u · x + c), f_1 = −f_0: one ReLU, one path."""

    def __init__(self, u, c, v):
        super().__init__()
        self.u = nn.Parameter(u.flatten())
        self.c, self.v = c, v
        self.relu = nn.ReLU()

    def forward(self, x):
        h = self.relu((x.flatten(1) * self.u).sum(1, keepdim=True) + self.c)
        return torch.cat([self.v * h, -self.v * h], 1)


@pytest.fixture()
def x4():
    return torch.rand(5, 1, 4, 4, generator=torch.Generator().manual_seed(1))


def test_linear_ig_exact(x4):
    m = Linear()
    w = m.w[2].detach().view(1, 1, 4, 4)
    base = torch.full_like(x4, 0.3)
    for method in ("gausslegendre", "riemann_trapezoid", "riemann_middle"):
        for n in (2, 7, 50):
            ig = A.IntegratedGradients(n_steps=n, baseline=base, method=method).attribute(m, x4, 2)
            torch.testing.assert_close(ig, (x4 - base) * w, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(A.Saliency(abs=False).attribute(m, x4, 2), w.expand_as(x4))
    torch.testing.assert_close(A.InputXGradient().attribute(m, x4, 2), x4 * w)
    occ = A.Occlusion(window=1, stride=1).attribute(m, x4, 2)
    torch.testing.assert_close(occ, x4 * w, rtol=1e-5, atol=1e-6)


def test_relu_one_active_path_by_hand():
    u = torch.tensor([[1.0, -2.0], [0.5, 3.0]])
    x = torch.tensor([[[[0.8, 0.1], [0.4, 0.2]]]])  # u·x = 0.8 − 0.2 + 0.2 + 0.6 = 1.4
    c, v = -0.4, 2.0  # pre-activation 1.0 at x (active), −0.4 at the black baseline (inactive)
    m = OnePath(u, c, v)
    grad = v * u.view(1, 1, 2, 2)  # ∂f0/∂x on the active path
    torch.testing.assert_close(A.Saliency().attribute(m, x, 0), grad.abs())
    torch.testing.assert_close(A.InputXGradient().attribute(m, x, 0), x * grad)
    # DeepLIFT rescale: multiplier Δout/Δin = (1.0 − 0)/(1.0 − (−0.4)) = 1/1.4 at the ReLU
    torch.testing.assert_close(A.DeepLift().attribute(m, x, 0), x * grad / 1.4)
    # IG: the ReLU opens at α = 0.4/1.4, so the path integral is (1 − 0.4/1.4) of the gradient
    ig = A.IntegratedGradients(n_steps=2000, method="riemann_middle").attribute(m, x, 0)
    torch.testing.assert_close(ig, x * grad * (1 - 0.4 / 1.4), rtol=1e-3, atol=1e-4)
    # completeness for both: f(x) − f(0) = 2 · 1.0 − 0
    assert abs(A.DeepLift().attribute(m, x, 0).sum().item() - 2.0) < 1e-5
    # guided backprop: class 1 has a negative weight after the ReLU, so nothing passes
    assert A.GuidedBackprop().attribute(m, x, 1).abs().sum() == 0
    torch.testing.assert_close(A.GuidedBackprop().attribute(m, x, 0), grad)


@pytest.fixture(scope="module")
def trained(quick_run, mnist):
    model = load_run(quick_run).model
    x = MNIST.to_float(mnist.test_images[:16])
    with torch.no_grad():
        t = model(x).argmax(1)
    return model, x, t


def test_ig_completeness_on_trained_cnn(trained):
    m, x, t = trained
    _, delta = A.IntegratedGradients(n_steps=64).attribute_with_delta(m, x, t)
    with torch.no_grad():
        gap = m(x).gather(1, t[:, None]).squeeze(1) - m(torch.zeros_like(x)).gather(1, t[:, None]).squeeze(1)
    assert (delta.abs() < 0.01 * gap.abs()).all(), delta / gap


def test_every_method_shaped_like_inputs(trained):
    m, x, t = trained
    for name in A.METHODS:
        out = A.get_method(name).attribute(m, x[:3], t[:3])
        assert out.shape == x[:3].shape and torch.isfinite(out).all(), name


def test_smoothgrad_seeded(trained):
    m, x, t = trained
    a = A.SmoothGrad(seed=1).attribute(m, x[:4], t[:4])
    assert torch.equal(a, A.SmoothGrad(seed=1).attribute(m, x[:4], t[:4]))
    assert not torch.equal(a, A.SmoothGrad(seed=2).attribute(m, x[:4], t[:4]))


def test_layer_ig_completeness_and_act_x_grad_exact(trained):
    m, x, t = trained
    r = L.layer_integrated_gradients(m, x, t, "conv2.hook_out", n_steps=64)
    assert r.per_channel.shape == (16, 32)
    assert r.delta.abs().max() < 1e-3
    # the read-out is linear in conv2.hook_out: Σ a·∂f/∂a is the logit minus its bias, exactly
    axg = L.layer_activation_x_gradient(m, x, t, "conv2.hook_out")
    with torch.no_grad():
        logit = m(x).gather(1, t[:, None]).squeeze(1)
    torch.testing.assert_close(axg.per_channel.sum(1), logit - m.fc.bias[t], rtol=1e-4, atol=1e-4)


def test_channel_to_channel_is_exact_decomposition(trained):
    m, x, _ = trained
    c2c = L.channel_to_channel(m, x, "conv1.hook_out", "conv2.hook_pre")
    assert c2c.shape == (16, 32, 16)
    with torch.no_grad():
        from mechscope.core.hooks import run_with_cache

        _, cache = run_with_cache(m, x, names="conv2.hook_pre")
    pre = cache["conv2.hook_pre"].flatten(2).sum(2)  # [B, 32]
    torch.testing.assert_close(c2c.sum(2), pre - 64 * m.conv2.conv.bias.detach(), rtol=1e-4, atol=1e-3)
    one = L.channel_to_channel(m, x[:1], "conv1.hook_out", "conv2.hook_pre")
    torch.testing.assert_close(one[0], c2c[0], rtol=1e-5, atol=1e-5)
    per_class = L.class_channel_to_channel(m, x, torch.arange(16) % 10, "conv1.hook_out", "conv2.hook_post")
    assert per_class.shape == (10, 32, 16)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m, x: A.Saliency().attribute(m, x[:, :, :20], 0), r"expected input shaped \[batch, 1, 28, 28\]"),
        (lambda m, x: A.Saliency().attribute(m, (x * 255).to(torch.uint8), 0), "floating-point"),
        (lambda m, x: A.Saliency().attribute(m, x, 10), "target 10 out of range; the model has classes 0..9"),
        (lambda m, x: A.Saliency().attribute(m, x, -1), "target -1 out of range"),
        (lambda m, x: A.Saliency().attribute(m, x, torch.tensor([1, 2])), "target has 2 entries for 16 inputs"),
        (lambda m, x: A.GradCAM("conv9").attribute(m, x, 0), "unknown layer 'conv9'; valid layers: hook_input"),
        (lambda m, x: A.Saliency().attribute(m, x.clone().index_fill_(0, torch.tensor([0]), float("nan")), 0), "NaN"),
        (lambda m, x: A.get_method("lime"), "unknown attribution method 'lime'; valid methods: saliency"),
        (lambda m, x: A.IntegratedGradients(method="simpson"), "unknown integration method"),
        (lambda m, x: A.IntegratedGradients(n_steps=0), "n_steps must be at least 1"),
        (lambda m, x: A.Occlusion(window=30).attribute(m, x, 0), "window 30 larger than the input"),
        (lambda m, x: L.channel_to_channel(m, x, "conv2.hook_out", "conv1.hook_post"), "does not depend on"),
    ],
)
def test_bad_input(trained, call, message):
    m, x, _ = trained
    with pytest.raises(MechscopeError, match=message):
        call(m, x)
    assert attached_hooks(m) == []


def test_no_hook_left_after_success_or_error(trained, monkeypatch):
    m, x, t = trained
    calls = [
        lambda: L.layer_activation_x_gradient(m, x[:2], t[:2], "conv2"),
        lambda: L.layer_integrated_gradients(m, x[:2], t[:2], "conv1", n_steps=4),
        lambda: L.channel_to_channel(m, x[:2]),
    ]
    calls += [lambda name=name: A.get_method(name).attribute(m, x[:2], t[:2]) for name in A.METHODS]
    for call in calls:
        call()
        assert attached_hooks(m) == []

    original = m.fc.forward

    def broken(inp):
        raise RuntimeError("read-out failed")

    monkeypatch.setattr(m.fc, "forward", broken)
    for call in calls:
        with pytest.raises(RuntimeError, match="read-out failed"):
            call()
        assert attached_hooks(m) == [], call
    monkeypatch.setattr(m.fc, "forward", original)
