"""The spec walker against truths from outside it: autograd on the plain model, prefixes and suffixes of an
``nn.Sequential`` run by torch itself, and hand arithmetic. Each test pins one behaviour that could break
while every other test still passed (same-padding with dilation, dilated pooling, the read-out's linearity,
non-global adaptive pooling, the replay check's tolerance, where the hooks of a stage go)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mechscope.cnn.models.spec import walk
from mechscope.core.errors import MechscopeError
from mechscope.core.hooks import run_with_cache


def support(out: torch.Tensor, x: torch.Tensor) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1): the smallest box holding every input pixel where d out / d x is non-zero."""
    (g,) = torch.autograd.grad(out, x, retain_graph=True)
    ys, xs = g[0].abs().sum(0).gt(0).nonzero(as_tuple=True)
    return int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1


def test_same_padding_with_dilation_against_autograd():
    # Outside truth: autograd through torch's own conv. With padding="same", dilation 2 and a 3×3 kernel torch
    # pads d(k-1)/2 = 2 pixels, so output (5, 5) reads input rows/cols 3, 5, 7: the box (3, 8, 3, 8) by hand.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding="same", dilation=2), nn.ReLU(), nn.Flatten(), nn.Linear(288, 2))
    s = walk(net, (1, 12, 12))
    x = torch.rand(1, 1, 12, 12, requires_grad=True)
    pre = net[0](x)  # before the ReLU, so no position is cut off by it
    for y_, x_ in ((5, 5), (4, 7), (0, 0), (11, 11)):  # interior ones and the clipped corners
        assert s.stages[0].rf_post.box(y_, x_, 12, 12) == support(pre[0, 0, y_, x_], x)
    assert s.stages[0].rf_post.box(5, 5, 12, 12) == (3, 8, 3, 8)


def test_dilated_max_pool_against_autograd():
    # Outside truth: a 2×2 max pool with dilation 2 takes the max over rows {y, y+2} × cols {x, x+2}, a 3×3
    # window (hand arithmetic: k' = 2·(2-1) + 1 = 3); autograd sends each output's gradient to its argmax,
    # which on a random positive input lands outside the first 2×2 corner for most of the 36 outputs.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 1, 1), nn.ReLU(), nn.MaxPool2d(2, stride=1, dilation=2), nn.Flatten(),
                        nn.Linear(36, 2))  # fmt: skip
    with torch.no_grad():
        net[0].weight.fill_(1.0), net[0].bias.zero_()  # the conv passes the image through unchanged
    s = walk(net, (1, 8, 8))
    assert s.stages[0].rf_out.size == (3, 3) and s.stages[0].shape_out == (1, 6, 6)
    x = (torch.rand(1, 1, 8, 8) + 0.1).requires_grad_()
    out = net[:3](x)
    for y_ in range(6):
        for x_ in range(6):
            y0, y1, x0, x1 = s.stages[0].rf_out.box(y_, x_, 8, 8)
            gy0, gy1, gx0, gx1 = support(out[0, 0, y_, x_], x)
            assert y0 <= gy0 and gy1 <= y1 and x0 <= gx0 and gx1 <= x1, (y_, x_)


def test_an_activation_after_the_pool_makes_the_readout_nonlinear():
    # Outside truth: the plain Sequential suffix net[3:] (ReLU, Flatten, Linear) on activations with negative
    # values is not fc(flatten(a)), so a closed-form logit readout from hook_out would be wrong.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(32, 3))
    s = walk(net, (1, 10, 10))
    assert [layer.path for layer in s.readout.layers] == ["3", "4", "5"]
    assert s.readout.linear is False and s.readout.fc is net[5]
    a = torch.randn(5, *s.last.shape_out)
    with torch.no_grad():
        suffix = net[3:](a)
        assert not torch.allclose(suffix, s.readout.fc(a.flatten(1)))
        assert torch.equal(s.run_from(s.last.hook_out, a), suffix)
        # and the hook sits where net[:3] ends: the full model equals the suffix of the prefix
        x = torch.rand(5, 1, 10, 10)
        _, cache = run_with_cache(s.model, x, names=[s.last.hook_out])
        assert torch.equal(cache[s.last.hook_out], net[:3](x))


@pytest.mark.parametrize(
    "pool",
    [nn.AdaptiveAvgPool2d(2), nn.AdaptiveMaxPool2d((1, 2)), nn.AdaptiveAvgPool2d((None, 1))],
    ids=["avg-2", "max-1x2", "avg-none-1"],
)
def test_non_global_adaptive_pooling_is_refused(pool):
    # Hand arithmetic: an adaptive pool to more than one position has windows whose size and step vary with
    # the input's size, which no (size, jump, start) receptive field describes; only 1×1 output is read.
    with torch.no_grad():
        n = nn.Sequential(nn.Conv2d(1, 2, 3), pool).eval()(torch.zeros(1, 1, 8, 8)).numel()
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), pool, nn.Flatten(), nn.Linear(n, 2))
    with pytest.raises(MechscopeError, match=r"cannot read layer 2 \(Adaptive\w+\): only global \(1×1\) adaptive"):
        walk(net, (1, 8, 8))


def test_global_adaptive_pooling_sees_the_whole_image():
    # Outside truth: autograd. The one output of a global average pool after a 3×3 conv depends on every pixel.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(), nn.Linear(2, 2))
    s = walk(net, (1, 8, 8))
    x = torch.rand(1, 1, 8, 8, requires_grad=True)
    assert s.stages[0].rf_out.box(0, 0, 8, 8) == support(net[:2](x)[0, 0, 0, 0], x) == (0, 8, 0, 8)


class Scaled(nn.Module):
    """A forward that is its layers in order, then scaled: a percent-level difference the replay must catch."""

    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(18, 3))

    def forward(self, x):
        return self.net(x) * self.factor


def test_replay_refuses_a_forward_one_percent_off():
    # Outside truth: the module's own forward differs from net(x) by 1% of its largest logit (hand arithmetic:
    # |0.01·y| ≤ 0.01·max|1.01·y|), far above float error, so the layers in order are not the model.
    with pytest.raises(MechscopeError, match="the model's forward is not its layers applied in order"):
        walk(Scaled(1.01), (1, 8, 8))
    s = walk(Scaled(1.0), (1, 8, 8))  # the same module without the scale is read and replayed exactly
    x = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(s.model(x), s.model.net(x))


def test_hooks_of_a_stage_with_a_pool_before_its_activation():
    # Outside truth: the prefixes of the plain Sequential. Conv, MaxPool, ReLU, MaxPool: hook_pre is the
    # ReLU's input net[:2](x), hook_post its output net[:3](x), hook_out after the second pool net[:4](x).
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.MaxPool2d(2), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                        nn.Linear(8, 2))  # fmt: skip
    s = walk(net, (1, 8, 8))
    st = s.stages[0]
    assert (st.shape_post, st.shape_out) == ((2, 4, 4), (2, 2, 2)) and s.readout.linear
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        _, cache = run_with_cache(s.model, x, names=[st.hook_pre, st.hook_post, st.hook_out])
        for hook, end in ((st.hook_pre, 2), (st.hook_post, 3), (st.hook_out, 4)):
            assert cache[hook].shape == net[:end](x).shape and torch.equal(cache[hook], net[:end](x)), hook
    # hand arithmetic: conv 3×3 (size 3), pool 2 (size 4, jump 2), pool 2 (size 4 + 1·2 = 6, jump 4)
    assert (st.rf_post.size, st.rf_out.size, st.rf_out.jump) == ((4, 4), (6, 6), (4, 4))
