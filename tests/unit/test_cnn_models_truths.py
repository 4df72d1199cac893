"""The vision wing's model layer against truths from outside it: the receptive-field recurrence written as a plain
loop and a gradient probe on a positive linear network (non-square kernels, strides and images, so rows and
columns cannot be swapped unnoticed), the conv arithmetic formula, torch's own forward hooks, SoLU and the
normalisation in numpy, parameter counts by hand, each configuration limit at and just past its boundary, and the
explain result's look-ups on hand-built stand-ins."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from mechscope.cnn.config import ExplainSettings, TrainConfig, class_index
from mechscope.cnn.methods.explained import ExplainResult
from mechscope.cnn.models.cnn import CNN, MAX_HIDDEN, MAX_WIDTH, CNNConfig
from mechscope.cnn.models.spec import walk
from mechscope.core.errors import MechscopeError
from mechscope.core.hooks import run_with_cache
from tests.unit.test_spec_outside_truths import Scaled, support

# ---- receptive fields and shapes ---------------------------------------------------------------------------------


def positive_linear_net() -> nn.Sequential:
    """Conv (3×5, stride 1×2, pad 1×0), avg pool 2×3, conv (3×3, dilation 2×1, pad 0×1): no nonlinearity and
    positive weights, so an output's gradient is non-zero on exactly its receptive field (no cancellation)."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 2, (3, 5), stride=(1, 2), padding=(1, 0)), nn.Identity(), nn.AvgPool2d((2, 3)),
        nn.Conv2d(2, 3, 3, dilation=(2, 1), padding=(0, 1)), nn.Identity(), nn.Flatten(), nn.Linear(3 * 6 * 4, 4),
    )  # fmt: skip
    with torch.no_grad():
        for m in net:
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.abs_().add_(0.1)
    return net


def loop_rf(layers):
    """Araujo et al. 2019 as a plain loop, one axis at a time: r += (d(k-1)+1-1)·j, start -= p·j, j *= s."""
    out = []
    for axis in range(2):
        r, j, start = 1, 1, 0
        for k, s, p, d in layers:
            r, start, j = r + d[axis] * (k[axis] - 1) * j, start - p[axis] * j, j * s[axis]
        out.append((r, j, start))
    return tuple(zip(*out, strict=True))  # (size, jump, start), each (rows, cols)


def conv_out(n, k, s=1, p=0, d=1):
    """torch's documented output size: floor((n + 2p - d(k-1) - 1) / s) + 1."""
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


CONV1 = ((3, 5), (1, 2), (1, 0), (1, 1))
POOL = ((2, 3), (2, 3), (0, 0), (1, 1))
CONV2 = ((3, 3), (1, 1), (0, 1), (2, 1))


def test_non_square_receptive_fields_and_shapes_follow_the_recurrence_and_the_formula():
    """Outside truth: the recurrence as a loop per axis and the conv arithmetic formula, on a 20×27 image."""
    s = walk(positive_linear_net(), (1, 20, 27))
    rf = [(st.rf_post, st.rf_out) for st in s.stages]
    got = [tuple((r.size, r.jump, r.start) for r in pair) for pair in rf]
    assert got == [(loop_rf([CONV1]), loop_rf([CONV1, POOL])), (loop_rf([CONV1, POOL, CONV2]),) * 2]
    h1, w1 = conv_out(20, 3, 1, 1), conv_out(27, 5, 2, 0)
    h2, w2 = conv_out(h1 // 2, 3, 1, 0, 2), conv_out(w1 // 3, 3, 1, 1, 1)
    assert [st.shape_post for st in s.stages] == [(2, h1, w1), (3, h2, w2)] == [(2, 20, 12), (3, 6, 4)]
    assert [st.shape_out for st in s.stages] == [(2, h1 // 2, w1 // 3), (3, h2, w2)]
    assert s.to_dict()["stages"][0]["receptive_field_post"] == s.stages[0].rf_post.to_dict()
    assert s.to_dict()["stages"][0]["receptive_field_out"] == s.stages[0].rf_out.to_dict() != s.stages[0].rf_post


def test_every_box_is_the_gradient_support_of_its_unit():
    """Outside truth: autograd through the plain Sequential; the box of each output unit (clipped to the image) is the
    smallest box of input pixels with a non-zero gradient, for every unit of both stages. (27 columns: every
    column is read, so no window of a padded position lands on pixels the strides skipped.)"""
    net = positive_linear_net()
    s = walk(net, (1, 20, 27))
    x = torch.rand(1, 1, 20, 27, requires_grad=True, generator=torch.Generator().manual_seed(1))
    for st, end in ((s.stages[0], 3), (s.stages[1], 5)):
        out = net[:end](x)
        for y_ in range(out.shape[2]):
            for x_ in range(out.shape[3]):
                assert st.rf_out.box(y_, x_, 20, 27) == support(out[0, 0, y_, x_], x), (st.name, y_, x_)


def test_global_pooling_of_a_non_square_map_spans_both_sides():
    """Outside truth: the loop with the 8×12 map's own size as the pooling kernel and stride (hand: 3 + 7 = 10 rows,
    3 + 11 = 14 cols, the whole 10×14 image)."""
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 3))
    st = walk(net, (1, 10, 14)).stages[0]
    size, jump, start = loop_rf([((3, 3), (1, 1), (0, 0), (1, 1)), ((8, 12), (8, 12), (0, 0), (1, 1))])
    assert (st.rf_out.size, st.rf_out.jump, st.rf_out.start) == (size, jump, start) == ((10, 14), (8, 12), (0, 0))


# ---- our CNN: hooks, SoLU, normalisation, the architecture table --------------------------------------------------


def small_cnn(**kw) -> CNN:
    torch.manual_seed(0)
    cfg = dict(channels=(3, 5), image_size=12, kernel_size=3, n_classes=4, mean=0.25, std=0.5) | kw
    return CNN(CNNConfig(**cfg)).eval()


def test_hook_points_hold_what_torchs_forward_hooks_see_with_batchnorm():
    """Outside truth: torch's register_forward_hook on the CNN's own norm, activation and pool modules; hook_pre is
    after the BatchNorm (its running statistics set away from 0 and 1 so that before and after differ)."""
    model = small_cnn(batchnorm=True)
    with torch.no_grad():
        for st in model.stages:
            st.norm.running_mean.uniform_(-1, 1)
            st.norm.running_var.uniform_(2, 3)
    seen, names = {}, {"norm": "hook_pre", "act": "hook_post", "pool": "hook_out"}
    handles = [getattr(st, m).register_forward_hook(lambda mod, i, o, k=f"conv{n}.{h}": seen.__setitem__(k, o))
               for n, st in enumerate(model.stages, 1) for m, h in names.items()]  # fmt: skip
    x = torch.rand(2, 1, 12, 12, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        model(x)
        _, cache = run_with_cache(model, x, names=list(seen))
    for h in handles:
        h.remove()
    for name, value in seen.items():
        assert torch.equal(cache[name], value), name
    s = walk(model)
    assert torch.equal(s.run_from("conv1.hook_pre", cache["conv1.hook_pre"]), model(x))


def solu_np(a: np.ndarray) -> np.ndarray:
    """x · softmax(x) over axis 1, then (v - mean) / sqrt(var + 1e-5) over axis 1 (Elhage et al. 2022), in numpy."""
    e = np.exp(a - a.max(1, keepdims=True))
    v = a * e / e.sum(1, keepdims=True)
    return (v - v.mean(1, keepdims=True)) / np.sqrt(v.var(1, keepdims=True) + 1e-5)


def test_solu_is_taken_over_channels_in_the_stages_and_the_hidden_layer():
    """Outside truth: SoLU in numpy on each hook_pre and on the hidden layer's input, computed by the plain Linear."""
    model = small_cnn(activation="solu", hidden=6)
    x = torch.rand(2, 1, 12, 12, generator=torch.Generator().manual_seed(3))
    names = ["conv1.hook_pre", "conv1.hook_post", "conv2.hook_pre", "conv2.hook_post", "conv2.hook_out", "hook_hidden"]
    with torch.no_grad():
        _, c = run_with_cache(model, x, names=names)
        hidden_in = model.hidden(c["conv2.hook_out"].flatten(1)).double().numpy()
    for n in (1, 2):
        want = solu_np(c[f"conv{n}.hook_pre"].double().numpy())
        np.testing.assert_allclose(c[f"conv{n}.hook_post"].numpy(), want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(c["hook_hidden"].numpy(), solu_np(hidden_in), rtol=1e-4, atol=1e-5)


def test_per_channel_normalisation_in_numpy():
    """Outside truth: (x - mean[c]) / std[c] per channel in numpy, with three distinct means and stds."""
    model = CNN(CNNConfig(in_channels=3, image_size=12, channels=(2,), kernel_size=3, mean=(0.1, 0.5, 0.9),
                          std=(0.2, 0.4, 0.8)))  # fmt: skip
    x = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(4))
    want = (x.numpy() - np.array([0.1, 0.5, 0.9])[:, None, None]) / np.array([0.2, 0.4, 0.8])[:, None, None]
    np.testing.assert_allclose(model.normalize(x).numpy(), want, rtol=1e-6, atol=1e-6)


def test_architecture_table_by_hand():
    """Outside truth: hand counts. 12 → conv 3×3 → 10 → pool → 5 → conv → 3 → pool → 1. conv1 3·1·9+3 weights and
    2·3 BatchNorm = 36, conv2 5·3·9+5+10 = 150, read-out 5→7 (42) and 7→4 (32) = 74, non-linear (a hidden layer)."""
    model = small_cnn(batchnorm=True, hidden=7)
    rows = walk(model).architecture()
    assert [(r["layer"], r["shape"], r["parameters"], r["hook"]) for r in rows] == [
        ("input", [1, 12, 12], 0, "hook_input"),
        ("conv1: Conv2d 1→3 3×3, BatchNorm2d, ReLU, MaxPool2d 2×2", [3, 5, 5], 36, "conv1.hook_out"),
        ("conv2: Conv2d 3→5 3×3, BatchNorm2d, ReLU, MaxPool2d 2×2", [5, 1, 1], 150, "conv2.hook_out"),
        ("read-out: Linear 5→7 → 7→4 (non-linear)", [4], 74, "hook_logits"),
    ]
    assert sum(r["parameters"] for r in rows) == sum(p.numel() for p in model.parameters())
    assert model.layer_names() == ["conv1", "conv2", "hidden", "fc"]
    assert walk(small_cnn()).architecture()[-1]["layer"] == "read-out: Linear 5→4"


def test_stages_by_number_and_hook_name_and_their_channels():
    """Outside truth: the Conv2d modules' own in/out channels; "2" and "conv2.hook_post" name the second stage."""
    s = walk(small_cnn())
    assert s.stage("2").name == s.stage("conv2.hook_post").name == "conv2"
    assert [(st.in_channels, st.out_channels) for st in s.stages] == [(1, 3), (3, 5)]


def test_run_from_inclusive_lets_the_hook_act_first():
    """Outside truth: a torch forward hook that zeroes the last hook_out; from zeros a linear read-out gives its
    bias, and without ``inclusive`` the rest of the pass is fc(flatten(a)) by hand."""
    model = small_cnn()
    s = walk(model)
    a = torch.rand(2, 5, 1, 1, generator=torch.Generator().manual_seed(5))
    handle = model.conv2.hook_out.register_forward_hook(lambda m, i, o: torch.zeros_like(o))
    with torch.no_grad():
        inclusive, exclusive = s.run_from("conv2.hook_out", a, inclusive=True), s.run_from("conv2.hook_out", a)
    handle.remove()
    assert torch.equal(inclusive, model.fc.bias.detach().expand(2, 4))
    torch.testing.assert_close(exclusive, a.flatten(1) @ model.fc.weight.detach().T + model.fc.bias.detach())


# ---- a user's model ------------------------------------------------------------------------------------------------


class OwnParameter(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.0))
        self.conv, self.fc = nn.Conv2d(1, 2, 3), nn.Linear(72, 2)

    def forward(self, x):
        return self.fc(self.conv(x).flatten(1)) * self.scale


def test_a_model_holding_its_own_parameter_is_refused_by_name():
    """Outside truth: torch's named_parameters(recurse=False) of the module holds 'scale'; the walk says why."""
    assert [n for n, _ in OwnParameter().named_parameters(recurse=False)] == ["scale"]
    with pytest.raises(MechscopeError, match="OwnParameter\\): it holds parameters of its own"):
        walk(OwnParameter(), (1, 8, 8))


def test_replay_refuses_a_forward_half_a_permille_off():
    """Outside truth: hand arithmetic, a forward scaled by 1.0005 differs from the layers in order by 5e-4 of its
    largest logit: far above float32 error (~1e-7), so it is not the model's own forward."""
    with pytest.raises(MechscopeError, match="not its layers applied in order"):
        walk(Scaled(1.0005), (1, 8, 8))


# ---- configuration limits -----------------------------------------------------------------------------------------


def refused(make, fragment: str) -> None:
    with pytest.raises(MechscopeError, match=fragment) as e:
        make()
    assert "\n" not in str(e.value)  # one line, as `mechscope: error:` prints it


CNN_OK = [
    dict(n_classes=2),
    dict(channels=(1, 1, 1, 1), kernel_size=3, padding=1),
    dict(channels=(MAX_WIDTH,)),
    dict(kernel_size=1),
    dict(padding=0),
    dict(pool=1),
    dict(hidden=1),
    dict(hidden=MAX_HIDDEN),
    dict(mean=-1000.0),
    dict(std=1000.0),
    dict(image_size=6, kernel_size=5, pool=2, channels=(2,)),
]
CNN_BAD = [(dict(n_classes=1), "at least two classes"), (dict(channels=(1, 1, 1, 1, 1)), "1 to 4 widths"),
           (dict(channels=(MAX_WIDTH + 1,)), "1 to 4 widths"), (dict(kernel_size=0), "kernel size"),
           (dict(padding=-1), "padding at least 0"), (dict(pool=0), "pool must be at least 1"),
           (dict(hidden=0), "hidden width"), (dict(hidden=MAX_HIDDEN + 1), "hidden width"),
           (dict(mean=-1000.5), "mean -1000.5"), (dict(std=1000.5), "std 1000.5"),
           (dict(mean=(0.1, 0.2)), "mean has 2 values for 1 input channels"),
           (dict(image_size=5, kernel_size=5, pool=2, channels=(2,)), "too small")]  # fmt: skip


@pytest.mark.parametrize("kw", CNN_OK, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items())[:40])
def test_each_cnn_limit_is_allowed_at_its_boundary(kw):
    """Outside truth: the documented limits (1-4 stages of 1..4096 channels, kernel ≥ 1, padding ≥ 0, pool ≥ 1,
    hidden 1..2^20, mean in [-1000, 1000], std in (0, 1000]); a 6-pixel image has a 2×2 map under a 5×5 kernel
    which pools to 1×1 (hand: 6 - 5 + 1 = 2, 2 // 2 = 1)."""
    CNNConfig(**kw).validate()


@pytest.mark.parametrize("kw, fragment", CNN_BAD, ids=lambda v: str(v)[:40])
def test_each_cnn_limit_is_refused_just_past_it(kw, fragment):
    """Outside truth: the same limits, one step past each (a 5-pixel image: 5 - 5 + 1 = 1, 1 // 2 = 0)."""
    refused(lambda: CNNConfig(**kw).validate(), fragment)


def test_legacy_configs_and_round_trips():
    """Outside truth: runs before the shape options wrote conv1_channels/conv2_channels with defaults 16 and 32."""
    assert CNNConfig.from_dict({"conv1_channels": 8}).channels == (8, 32)
    assert CNNConfig.from_dict({"conv2_channels": 9}).channels == (16, 9)
    cfg = CNNConfig(in_channels=3, channels=(4, 6), mean=(0.1, 0.2, 0.3), std=(1.0, 2.0, 3.0), hidden=5)
    assert CNNConfig.from_dict(cfg.to_dict()) == cfg


TRAIN = [
    ("epochs", 1, 0, "--epochs must be at least 1"),
    ("epochs", 10_000, 10_001, "--epochs must be at most"),
    ("batch_size", 1, 0, "--batch-size must be at least 1"),
    ("batch_size", 65_536, 65_537, "--batch-size must"),
    ("warmup_fraction", 0.0, -0.01, "warm-up fraction"),
    ("warmup_fraction", 0.99, 1.0, "warm-up fraction"),
    ("weight_decay", 0.0, 1.0, "weight decay"),
    ("label_smoothing", 0.0, 1.0, "label smoothing"),
    ("label_smoothing", 0.0, -0.1, "label smoothing"),
    ("train_limit", 1, 0, "--train-limit must be at least 1"),
    ("shift", 0, -1, "--shift must be 0 or more"),
    ("shift", 64, 65, "--shift must be at most 64"),
    ("max_steps", 1, 0, "--max-steps must"),
    ("max_steps", 10**8, 10**8 + 1, "--max-steps must be at most"),
]


@pytest.mark.parametrize("name, ok, bad, fragment", TRAIN, ids=lambda v: str(v))
def test_each_training_limit_at_and_just_past_its_boundary(name, ok, bad, fragment):
    """Outside truth: TrainConfig's documented ranges; the value at the boundary passes, one step past is refused."""
    TrainConfig(**{name: ok}).validate()
    refused(lambda: TrainConfig(**{name: bad}).validate(), fragment)


EXPLAIN = [("test_limit", 100, 99, "--test-limit must be at least 100"), ("tolerance", 0.0, 1.0, "--tolerance"),
           ("tolerance", 0.0, -0.01, "--tolerance"), ("n_pairs", 1, 0, "--pairs"), ("n_mean", 1, 0, "n_mean"),
           ("batch_size", 1, 0, "batch_size"), ("held_out", 0, -1, "held_out must be 0 or more")]  # fmt: skip


@pytest.mark.parametrize("name, ok, bad, fragment", EXPLAIN, ids=lambda v: str(v))
def test_each_explain_limit_at_and_just_past_its_boundary(name, ok, bad, fragment):
    """Outside truth: ExplainSettings' documented ranges, as for training."""
    ExplainSettings(**{name: ok}).validate()
    refused(lambda: ExplainSettings(**{name: bad}).validate(), fragment)


def test_classes_resolve_by_name_and_index_within_range():
    """Outside truth: Python's own list.index for names; valid indices are 0..k-1, so -1 and k are refused."""
    names = ("ant", "bee", "cat")
    assert ExplainSettings(classes=("cat", 0), patch=("bee", "2")).resolve(names).patch == (1, 2)
    assert class_index(2, names) == 2
    refused(lambda: class_index(-1, names), "class -1 out of range: expected 0..2")
    refused(lambda: class_index(3, names), "class 3 out of range")
    refused(lambda: ExplainSettings(patch=("bee", 1)).resolve(names), "two different classes")


# ---- the explain result's look-ups -----------------------------------------------------------------------------


def test_explain_result_looks_up_by_stage_and_class():
    """Outside truth: hand-built stand-ins with distinct stages in a non-sorted order and distinct class names."""
    sel = (SimpleNamespace(stage="conv2", v=2), SimpleNamespace(stage="conv1", v=1))
    ex = (SimpleNamespace(stage="conv1", v=10), SimpleNamespace(stage="conv2", v=20))
    r = ExplainResult(
        run=None,
        model={},
        data={},
        class_names=("ant", "bee", "cat"),
        settings={},
        overview=None,
        weights=None,
        ablation=None,
        selectivity=sel,
        patching=None,
        circuits=None,
        examples=ex,
    )
    assert [r.name(k) for k in range(3)] == ["ant", "bee", "cat"]
    assert r.stage_names == ["conv2", "conv1"]
    assert (r.selectivity_of("conv1").v, r.selectivity_of("conv2").v) == (1, 2)
    assert (r.examples_of("conv1").v, r.examples_of("conv2").v) == (10, 20)


def test_a_users_sequential_starting_with_our_normalize_is_walked_and_replayed():
    """Outside truth: the plain Sequential's own forward and torch's named_modules paths for the stage's layers."""
    from mechscope.cnn.models.cnn import Normalize

    torch.manual_seed(0)
    net = nn.Sequential(Normalize(0.5, 0.25), nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(72, 3)).eval()
    s = walk(net, (1, 8, 8))
    assert [layer.path for layer in s.stages[0].layers] == [n for n, m in net.named_modules() if n in ("1", "2")]
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(s.run_from("hook_input", x), net(x), rtol=0, atol=1e-6)
