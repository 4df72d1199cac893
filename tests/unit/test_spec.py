"""The spec walker: receptive fields by hand, walks against hand-written specs, a user's module seen
through hook points without being changed, every shape of our CNN, SoLU's values, and what it refuses."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mechscope.cnn.models.cnn import CNN, ChannelNorm, CNNConfig, SoLU
from mechscope.cnn.models.spec import ReceptiveField, walk
from mechscope.core import intervene as A
from mechscope.core.errors import MechscopeError
from mechscope.core.hooks import attached_hooks, hooks, run_with_cache


def rf(size, jump, start):
    return ReceptiveField((size, size), (jump, jump), (start, start))


def test_default_cnn_receptive_fields_by_hand():
    # conv1 5x5: 5 pixels, step 1. pool 2: 5 + (2-1)*1 = 6, step 2. conv2 5x5: 6 + 4*2 = 14, step 2.
    # pool 2: 14 + 1*2 = 16, step 4. Nothing padded: every window starts at pixel 0.
    s = walk(CNN())
    assert [(x.rf_post, x.rf_out) for x in s.stages] == [(rf(5, 1, 0), rf(6, 2, 0)), (rf(14, 2, 0), rf(16, 4, 0))]
    assert s.stage("conv2").rf_post.box(3, 1, 28, 28) == (6, 20, 2, 16)  # rows 2·3 .. 2·3+14, cols 2 .. 16
    assert s.stage("conv2").rf_out.box(3, 3, 28, 28) == (12, 28, 12, 28)


def test_strides_padding_dilation_by_hand():
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, stride=2, padding=1),  # size 3, step 2, start -1
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=2, dilation=2),  # k' = 5: size 3 + 4*2 = 11, step 2, start -1 - 2*2 = -5
        nn.ReLU(),
        nn.AvgPool2d(2),  # size 11 + 1*2 = 13, step 4, start -5
        nn.Conv2d(4, 4, 3, padding="same"),  # pads 1: size 13 + 2*4 = 21, step 4, start -5 - 4 = -9
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),  # 4x4 maps averaged: size 21 + 3*4 = 33, covers the whole 16x16 image
        nn.Flatten(),
        nn.Linear(4, 3),
    )
    s = walk(net, (1, 16, 16))
    assert [x.rf_post for x in s.stages] == [rf(3, 2, -1), rf(11, 2, -5), rf(21, 4, -9)]
    assert s.stages[1].rf_out == rf(13, 4, -5) and s.stages[2].rf_out.size == (33, 33)
    assert s.stages[2].rf_out.box(0, 0, 16, 16) == (0, 16, 0, 16)
    assert s.stages[0].rf_post.box(0, 0, 16, 16) == (0, 2, 0, 2)  # the window hangs over the padded edge
    assert [x.shape_out for x in s.stages] == [(4, 8, 8), (4, 4, 4), (4, 1, 1)]


def test_receptive_field_covers_what_a_position_depends_on():
    """Independent check: the gradient of one output position is non-zero only inside its box."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(2, 2, 3, dilation=2), nn.Tanh(),
        nn.MaxPool2d(2, stride=1), nn.Flatten(), nn.Linear(2 * 5 * 5, 2),
    )  # fmt: skip
    s = walk(net, (1, 20, 20))
    x = torch.rand(1, 1, 20, 20, requires_grad=True)
    _, cache = run_with_cache(s.model, x, names=["conv2.hook_out"], grad=True)
    for y_, x_ in ((0, 0), (2, 4), (4, 4)):
        (g,) = torch.autograd.grad(cache["conv2.hook_out"][0, 0, y_, x_], x, retain_graph=True)
        ys, xs = g[0, 0].abs().gt(0).nonzero(as_tuple=True)
        y0, y1, x0, x1 = s.stage("conv2").rf_out.box(y_, x_, 20, 20)
        assert y0 <= ys.min() and ys.max() < y1 and x0 <= xs.min() and xs.max() < x1


class UserNet(nn.Module):
    """A user's own module: named children, flattening by view() in forward."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.GELU(), nn.Dropout2d(0.1),
        )  # fmt: skip
        self.head = nn.Linear(16 * 8 * 8, 5)

    def forward(self, x):
        return self.head(self.features(x).view(x.shape[0], -1))


def test_walk_matches_a_hand_written_spec():
    s = walk(UserNet(), (3, 16, 16))
    expected = [  # stage, its layers (path, kind), hook_post shape, hook_out shape
        ("conv1", [("features.0", "conv"), ("features.1", "norm"), ("features.2", "act"), ("features.3", "pool")],
         (8, 16, 16), (8, 8, 8)),
        ("conv2", [("features.4", "conv"), ("features.5", "act"), ("features.6", "identity")], (16, 8, 8), (16, 8, 8)),
    ]  # fmt: skip
    got = [(x.name, [(lay.path, lay.kind) for lay in x.layers], x.shape_post, x.shape_out) for x in s.stages]
    assert got == expected
    assert s.source == "wrapped" and s.n_classes == 5 and s.input_shape == (3, 16, 16)
    assert [lay.path for lay in s.readout.layers] == ["head"] and s.readout.linear
    names = s.hook_names()
    assert names == ["hook_input", "conv1.hook_pre", "conv1.hook_post", "conv1.hook_out", "conv2.hook_pre",
                     "conv2.hook_post", "conv2.hook_out", "hook_logits"]  # fmt: skip
    plan = [name for name, _ in s.plan]
    assert plan.index("conv1.hook_pre") == plan.index("features.1") + 1  # after the norm, before the activation
    assert plan.index("conv1.hook_out") == plan.index("features.3") + 1
    assert s.parameter_groups() == [("head", ["net.head"]), ("conv2", ["net.features.4"]),
                                     ("conv1", ["net.features.0", "net.features.1"])]  # fmt: skip


@pytest.mark.parametrize(
    "config, n_stages, linear",
    [
        (CNNConfig(), 2, True),
        (CNNConfig(channels=(8,)), 1, True),
        (CNNConfig(channels=(4, 8, 8), kernel_size=3, padding=1, batchnorm=True), 3, True),
        (CNNConfig(channels=(4, 8), hidden=12), 2, False),
        (CNNConfig(channels=(4, 8), activation="solu"), 2, True),
        (CNNConfig(channels=(4, 8), activation="gelu", pool=1, image_size=16), 2, True),
    ],
    ids=["default", "one-stage", "three-bn", "hidden", "solu", "gelu-nopool"],
)
def test_every_shape_of_our_cnn(config, n_stages, linear):
    torch.manual_seed(0)
    model = CNN(config).eval()
    s = walk(model)
    assert s.source == "mechscope" and s.model is model and len(s.stages) == n_stages
    assert s.readout.linear == linear and s.readout.hidden == config.hidden
    x = torch.rand(3, *model.input_shape)
    assert torch.equal(s.run_from("hook_input", x), model(x))  # the plan is the forward, bit for bit
    _, cache = run_with_cache(model, x, names=[s.last.hook_out])
    torch.testing.assert_close(s.run_from(s.last.hook_out, cache[s.last.hook_out]), model(x), rtol=0, atol=0)
    for st, (conv, pooled) in zip(s.stages, config.stage_sizes(), strict=True):
        assert st.shape_post[1:] == (conv, conv) and st.shape_out[1:] == (pooled, pooled)


def test_a_user_model_is_left_as_it_was():
    torch.manual_seed(0)
    net = UserNet().train()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    s = walk(net, (3, 16, 16))
    x = torch.rand(4, 3, 16, 16)
    net.eval()
    with torch.no_grad():
        logits, cache = run_with_cache(s.model, x, names=["conv1.hook_post", "conv2.hook_out"])
        assert torch.equal(logits, net(x))
        assert torch.equal(cache["conv1.hook_post"], net.features[:3](x))

    def zero(act, hook):
        return torch.zeros_like(act)

    with torch.no_grad(), hooks(s.model, fwd=[("conv2.hook_out", zero)]):
        assert torch.equal(s.model(x), net.head(torch.zeros(4, 16 * 8 * 8)).expand(4, -1))
    assert attached_hooks(net) == [] and attached_hooks(s.model) == []
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
    assert not any(isinstance(m, type(s.model.hook_input)) for m in net.modules())  # no hook point put into it


def test_intervene_at_equals_intervene_through_the_whole_model():
    torch.manual_seed(0)
    model = CNN(CNNConfig(channels=(4, 8, 8), kernel_size=3, padding=1, batchnorm=True)).eval()
    s = walk(model)
    x = torch.rand(20, 1, 28, 28)
    _, cache = run_with_cache(model, x, names=["conv1.hook_out"])
    masks = A.channel_masks((4, 14, 14))
    mean = torch.rand(4, 14, 14)
    hooked = A.intervene(model, x, "conv1.hook_out", masks, mean)
    torch.testing.assert_close(A.intervene_at(s, cache["conv1.hook_out"], "conv1.hook_out", masks, mean), hooked)


def test_solu_and_channel_norm_against_hand_computed_values():
    x = torch.tensor([[1.0, 2.0, 3.0]])  # [B=1, C=3]
    e = torch.exp(torch.tensor([1.0, 2.0, 3.0]))
    soft = e / e.sum()  # 0.0900, 0.2447, 0.6652
    solu = torch.tensor([1.0, 2.0, 3.0]) * soft
    # by hand (math.exp in float64): x·softmax(x), then (v − mean) / sqrt(var + 1e-5)
    torch.testing.assert_close(solu, torch.tensor([0.0900305732, 0.4894569421, 1.9957228673]), rtol=1e-6, atol=1e-6)
    by_hand = torch.tensor([-0.9363802822, -0.4496179536, 1.3859982357])
    torch.testing.assert_close(SoLU(3)(x)[0], by_hand, rtol=1e-5, atol=1e-5)
    norm = ChannelNorm(2)
    norm.weight.data = torch.tensor([2.0, 3.0])
    norm.bias.data = torch.tensor([0.5, -1.0])
    img = torch.tensor([1.0, 3.0]).view(1, 2, 1, 1)  # mean 2, var 1: normalised (-1, 1)
    torch.testing.assert_close(norm(img).flatten(), torch.tensor([-1.5, 2.0]), rtol=1e-4, atol=1e-4)


class Custom(nn.Module):
    def forward(self, x):
        return x * 2


class Functional(nn.Module):
    def __init__(self):
        super().__init__()
        with torch.random.fork_rng():  # fixed weights: with 5 of 200 seeds the ReLU changed none of the outputs
            torch.manual_seed(0)
            self.conv = nn.Conv2d(1, 2, 3)
            self.fc = nn.Linear(2 * 6 * 6, 2)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))  # a functional ReLU the walk cannot see


class Tutorial(nn.Module):
    """As PyTorch's tutorial writes a CNN: one nn.ReLU and one nn.MaxPool2d used after both convolutions and in the
    head, torch.flatten in forward, and a Dropout registered but never called."""

    def __init__(self):
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.conv1, self.pool, self.conv2 = nn.Conv2d(1, 3, 5), nn.MaxPool2d(2), nn.Conv2d(3, 4, 3)
            self.relu, self.unused = nn.ReLU(), nn.Dropout(0.5)
            self.fc1, self.fc2 = nn.Linear(4 * 2 * 2, 6), nn.Linear(6, 3)

    def forward(self, x):
        x = self.pool(self.relu(self.conv1(x)))
        x = self.pool(self.relu(self.conv2(x)))
        return self.fc2(self.relu(self.fc1(torch.flatten(x, 1))))


def test_layers_called_more_than_once_are_read_in_the_order_forward_calls_them():
    """Truth: the model's own modules applied by hand in its forward's order: each stage's hook points hold
    relu(conv(x)) and pool(relu(conv(x))) of its own convolution, the logits are the model's, the receptive fields
    follow Araujo et al.'s recurrence through conv 5, pool 2, conv 3, pool 2 (5, then 6 jump 2, then 10 jump 2,
    then 12 jump 4), and the uncalled Dropout is in no stage. The trace leaves no hook behind."""
    m = Tutorial().eval()
    s = walk(m, (1, 16, 16))
    assert [[layer.path for layer in st.layers] for st in s.stages] == [["conv1", "relu", "pool"],
                                                                         ["conv2", "relu", "pool"]]  # fmt: skip
    assert [layer.path for layer in s.readout.layers] == ["fc1", "relu", "fc2"] and s.readout.hidden == 6
    x = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    names = [f"conv{i}.hook_{h}" for i in (1, 2) for h in ("post", "out")]
    logits, cache = run_with_cache(s.model, x, names=names)
    with torch.no_grad():
        post1 = torch.relu(m.conv1(x))
        out1 = nn.functional.max_pool2d(post1, 2)
        post2 = torch.relu(m.conv2(out1))
        out2 = nn.functional.max_pool2d(post2, 2)
        theirs = m.fc2(torch.relu(m.fc1(out2.flatten(1))))
    for name, want in zip(names, (post1, out1, post2, out2), strict=True):
        torch.testing.assert_close(cache[name], want)
    torch.testing.assert_close(logits, theirs)
    rf = [(st.rf_post.size, st.rf_post.jump, st.rf_out.size, st.rf_out.jump) for st in s.stages]
    assert rf == [((5, 5), (1, 1), (6, 6), (2, 2)), ((10, 10), (2, 2), (12, 12), (4, 4))]
    assert not any(mod._forward_hooks for mod in m.modules())


class WeightsTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 1, 3, padding=1), nn.Linear(64, 2)

    def forward(self, x):
        return self.fc(self.conv(self.conv(x)).flatten(1))


@pytest.mark.parametrize(
    "net, shape, message",
    [
        (nn.Sequential(nn.Conv2d(1, 2, 3), nn.LSTM(4, 4)), (1, 8, 8), "cannot read layer 1 (LSTM)"),
        (nn.Sequential(nn.Conv2d(1, 2, 3), nn.Sequential(Custom()), nn.Flatten(), nn.Linear(72, 2)), (1, 8, 8),
         "cannot read layer 1.0 (Custom)"),
        (nn.Sequential(nn.Flatten(), nn.Linear(64, 2)), (1, 8, 8), "no Conv2d before layer 0 (Flatten)"),
        (nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(72, 2), nn.Conv2d(2, 2, 1)), (1, 8, 8),
         "cannot read layer 3 (Conv2d) after the read-out began"),
        (nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(72, 2)), (3, 8, 8),
         "takes 1 channel(s); the images have 3"),
        (nn.Sequential(nn.Conv2d(1, 2, 5), nn.MaxPool2d(2), nn.Conv2d(2, 2, 5), nn.Flatten(), nn.Linear(8, 2)),
         (1, 10, 10), "images of 10×10 do not fit the network: 2 (Conv2d) fails on [2, 3, 3]"),
        (Functional(), (1, 8, 8), "not its layers applied in order"),
        (WeightsTwice(), (1, 8, 8), "layer conv (Conv2d) holds weights and is called 2 times in forward"),
    ],
    ids=["lstm", "custom", "no-conv", "conv-after-linear", "channels", "too-small", "functional", "weights-twice"],
)
def test_what_the_walk_refuses(net, shape, message):
    with pytest.raises(MechscopeError, match=re_escape(message)):
        walk(net, shape)
    assert not any(m._forward_hooks for m in net.modules())  # the call-order trace's hooks are gone


def re_escape(text: str) -> str:
    import re

    return re.escape(text)


def test_unknown_stage_names_the_stages():
    with pytest.raises(MechscopeError, match="unknown layer 'conv3'; the stages are conv1, conv2"):
        walk(CNN()).stage("conv3")


def test_the_cnns_fast_pooling_equals_torchs():
    """The CNN's MaxPool2d takes strided maxima without a gradient: the same values as torch's kernel (odd sizes,
    k = 3, NaN, ties), and torch's own forward and gradient when one is needed."""
    from mechscope.cnn.models.cnn import MaxPool2d

    g = torch.Generator().manual_seed(0)
    for k, shape in [(2, (4, 3, 8, 8)), (2, (4, 3, 9, 7)), (3, (2, 2, 15, 16))]:
        x = torch.randn(*shape, generator=g)
        x[0, 0, 0, 0] = float("nan")
        x[1, 0, :4, :4] = 1.0  # ties
        want = nn.MaxPool2d(k)(x)
        with torch.no_grad():
            got = MaxPool2d(k)(x)
        assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num())
    x = torch.ones(1, 1, 4, 4, requires_grad=True)  # all ties: torch sends each window's gradient to one input
    MaxPool2d(2)(x).sum().backward()
    assert x.grad.sum() == 4 and x.grad.max() == 1
