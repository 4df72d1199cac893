"""Feature visualisation: every objective improves, digits come out as digits, a known answer,
bit-for-bit repeatability, dataset examples, and no hook left behind."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mechscope.cnn.data.mnist import MNIST
from mechscope.cnn.methods import featvis as FV
from mechscope.cnn.runs import load_run
from mechscope.core.errors import MechscopeError
from mechscope.core.hooks import HookPoint, attached_hooks


@pytest.fixture(scope="module")
def model(quick_run):
    return load_run(quick_run).model


OBJECTIVES = {
    "neuron": lambda: FV.neuron("conv2.hook_post", 3),
    "channel": lambda: FV.channel("conv1.hook_post", 5),
    "class_logit": lambda: FV.class_logit(4),
    "direction": lambda: FV.direction("conv2.hook_out", torch.linspace(-1, 1, 32)),
    "negative": lambda: -FV.channel("conv2.hook_pre", 7),
    "diversity": lambda: FV.channel("conv2.hook_post", 1) + 2.0 * FV.diversity("conv1.hook_post", 2),
    "regularised": lambda: 2 * FV.class_logit(3) - FV.total_variation() - 0.5 * FV.l1() - FV.l2(),
}


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_objective_improves(model, name):
    r = FV.render(model, OBJECTIVES[name](), batch=2, steps=48, seed=0, log_every=8)
    assert r.history[-1] > r.history[0] + 1e-3, r.history
    assert r.images.shape == (2, 1, 28, 28) and r.images.min() >= 0 and r.images.max() <= 1
    assert attached_hooks(model) == []


def test_class_logit_visualisations_are_their_digits(model):
    r = FV.render(model, FV.class_logit(list(range(10))) - FV.total_variation(), batch=10, seed=0)
    with torch.no_grad():
        assert model(r.images).argmax(1).tolist() == list(range(10))


def test_same_seed_same_images(model):
    obj = FV.channel("conv2.hook_post", [0, 1, 2])
    a = FV.render(model, obj, batch=3, steps=20, seed=5).images
    b = FV.render(model, obj, batch=3, steps=20, seed=5).images
    c = FV.render(model, obj, batch=3, steps=20, seed=6).images
    assert torch.equal(a, b) and not torch.equal(a, c)
    p1 = FV.render(model, obj, batch=3, steps=20, seed=5, param="pixel").images
    assert torch.equal(p1, FV.render(model, obj, batch=3, steps=20, seed=5, param="pixel").images)


class OneFilter(nn.Module):
    """First layer: one fixed 5x5 filter, then ReLU."""

    input_shape = (1, 28, 28)

    def __init__(self, w):
        super().__init__()
        self.hook_input = HookPoint()
        self.conv = nn.Conv2d(1, 1, 5, bias=False)
        self.conv.weight.data = w.view(1, 1, 5, 5).clone()
        self.relu = nn.ReLU()
        self.hook_post = HookPoint()

    def forward(self, x):
        return self.hook_post(self.relu(self.conv(self.hook_input(x))))


def test_known_answer_fixed_filter():
    w = torch.randn(5, 5, generator=torch.Generator().manual_seed(0))
    w = w - w.mean() + 0.1  # a positive sum: the neuron is alive on a grey start, so it gets a gradient
    m = OneFilter(w)
    # maximise the centre neuron, held near grey by an L2 pull, no transforms: the optimum is grey + c·w
    obj = FV.neuron("hook_post", 0, 12, 12) - 1000.0 * FV.l2(0.5)
    r = FV.render(m, obj, batch=1, steps=400, param="pixel", lr=0.05, transforms=lambda x, g: x, seed=0)
    patch = r.images[0, 0, 12:17, 12:17]
    a, b = (patch - patch.mean()).flatten(), (w - w.mean()).flatten()
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.9


def test_dataset_examples_match_brute_force(model, mnist):
    x = MNIST.to_float(mnist.test_images[:600])
    ex = FV.dataset_examples(model, x, ["conv1.hook_post", "hook_logits"], k=5, batch_size=128)
    with torch.no_grad():
        from mechscope.core.hooks import run_with_cache

        _, cache = run_with_cache(model, x, names=["conv1.hook_post", "hook_logits"])
    brute = cache["conv1.hook_post"].flatten(2).max(2).values.T  # [16, 600]
    assert torch.equal(ex["conv1.hook_post"].top, brute.topk(5, 1).indices)
    assert torch.equal(ex["hook_logits"].bottom, cache["hook_logits"].T.topk(5, 1, largest=False).indices)
    y, xx = ex["conv1.hook_post"].positions[2, 0].tolist()
    img = ex["conv1.hook_post"].top[2, 0]
    assert cache["conv1.hook_post"][img, 2, y, xx] == ex["conv1.hook_post"].top_values[2, 0]
    assert FV.receptive_field(model, "conv1.hook_post", y, xx) == (y, y + 5, xx, xx + 5)
    assert FV.receptive_field(model, "conv2.hook_post", 0, 0) == (0, 14, 0, 14)


def test_bad_input_and_no_hooks_after_errors(model):
    with pytest.raises(MechscopeError, match="unknown layer 'conv9.hook_post'; valid layers"):
        FV.render(model, FV.channel("conv9.hook_post", 0), batch=1, steps=2)
    with pytest.raises(MechscopeError, match="steps must be at least 1"):
        FV.render(model, FV.class_logit(0), batch=1, steps=0)
    with pytest.raises(MechscopeError, match="unknown parameterisation 'cppn'"):
        FV.render(model, FV.class_logit(0), batch=1, steps=2, param="cppn")
    with pytest.raises(MechscopeError, match=r"unit 99 out of range 0\.\.15"):
        FV.render(model, FV.channel("conv1.hook_post", 99), batch=1, steps=2)  # fails inside the loop
    assert attached_hooks(model) == []
