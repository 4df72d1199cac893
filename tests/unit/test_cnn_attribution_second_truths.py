"""Vision attribution methods, second pass, against outside truths: Captum's own defaults on the same tiny CNN,
closed forms of IG on a quadratic model, Riemann sums written as plain numpy loops, occlusion as a plain loop of
masked forwards on a non-square image, group components built by a plain loop, and hand-given result fields."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from mechscope.cnn.methods import attribution as A
from mechscope.cnn.methods import layer_attribution as L
from mechscope.cnn.methods.attributed import AttributionResult, Completeness
from mechscope.cnn.methods.faithfulness import FaithfulnessReport
from mechscope.cnn.methods.group_attribution import components, flows_for_image, run_between
from mechscope.core.errors import MechscopeError
from tests.unit.test_blocks import tiny_spec
from tests.unit.test_explain_parts_truths import _tiny, hand_forward

pytestmark = pytest.mark.usefixtures("one_thread")  # small models: one torch thread


@pytest.fixture(scope="module")
def setup():
    """A random 16x16 CNN (3 classes), 5 random images and targets that differ between rows (seed 3: Grad-CAM maps
    of both signs, so the ReLU shows)."""
    model = _tiny(3)
    x = torch.rand(5, 1, 16, 16, generator=torch.Generator().manual_seed(11))
    return model, x, torch.tensor([0, 2, 1, 2, 1])


def close(ours, theirs):
    scale = theirs.abs().max().item()
    assert scale > 0
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5 * scale)


def test_default_settings_equal_captums_defaults(setup):
    """Outside truth: Captum with its own defaults (IG: 50 Gauss-Legendre steps from a black image; Saliency: |grad|;
    LayerGradCam: ReLU, bilinear upsampling) on conv2's post-ReLU map, and NoiseTunnel with the 25 samples of
    σ = 0.15 the SmoothGrad signature documents, its noise drawn from the same seed 0."""
    captum = pytest.importorskip("captum.attr")
    m, x, t = setup
    close(A.IntegratedGradients().attribute(m, x, t), captum.IntegratedGradients(m).attribute(x, target=t))
    close(A.Saliency().attribute(m, x, t), captum.Saliency(m).attribute(x, target=t))
    cam = captum.LayerGradCam(m, m.conv2.hook_post).attribute(x, target=t, relu_attributions=True)
    close(A.GradCAM().attribute(m, x, t), captum.LayerAttribution.interpolate(cam, (16, 16), "bilinear"))
    torch.manual_seed(0)
    theirs = captum.NoiseTunnel(captum.Saliency(m)).attribute(
        x, target=t, nt_type="smoothgrad", nt_samples=25, stdevs=0.15
    )
    close(A.SmoothGrad().attribute(m, x, t), theirs)
    lig = captum.LayerIntegratedGradients(m, m.conv1.hook_out).attribute(x, target=t)
    close(L.layer_integrated_gradients(m, x, t, "conv1.hook_out").per_position, lig)


class Square(nn.Module):
    """f_0(x) = (w·x)², f_1(x) = 3·(w·x) − 1 over a [B, 1, 2, 3] input; ∇f_0 = 2(w·x)·w."""

    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(torch.as_tensor(w, dtype=torch.float64).flatten())

    def forward(self, x):
        s = x.flatten(1) @ self.w
        return torch.stack([s**2, 3 * s - 1], 1)


W6 = np.array([0.5, -1.0, 2.0, 0.25, -0.75, 1.5])
X = np.array([[0.9, 0.2, -0.4, 0.7, 0.1, 0.3], [-0.5, 0.8, 0.6, -0.2, 0.4, -0.9]])
BASE = np.array([0.1, -0.2, 0.3, 0.05, 0.4, -0.1])


def ig_square(method, n):
    m = Square(W6)
    x = torch.tensor(X).view(2, 1, 2, 3)
    base = torch.tensor(BASE).view(1, 1, 2, 3)  # one baseline image for the whole batch
    return A.IntegratedGradients(n_steps=n, baseline=base, method=method).attribute_with_delta(m, x, 0)


@pytest.mark.parametrize("method", ["riemann_left", "riemann_right"])
def test_ig_one_sided_riemann_sums_are_a_plain_numpy_loop(method):
    """Outside truth: (x − x')·Σ_i (1/n)·∇f(x' + α_i(x − x')) with α_i = i/n (left, i = 0..n−1) or (i+1)/n (right),
    ∇f_0 = 2(w·p)·w, summed in a plain loop; the integrand is linear in α, so left and right differ."""
    n = 4
    attr, _ = ig_square(method, n)
    for row in range(2):
        d, total = X[row] - BASE, np.zeros(6)
        for i in range(n):
            alpha = (i + (1 if method == "riemann_right" else 0)) / n
            p = BASE + alpha * d
            total += 2 * (W6 @ p) * W6 / n
        np.testing.assert_allclose(attr[row].flatten().numpy(), d * total, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method, n", [("gausslegendre", 3), ("riemann_middle", 5), ("riemann_trapezoid", 4)])
def test_ig_exact_rules_give_the_closed_form_and_zero_delta(method, n):
    """Outside truth: for f = (w·x)² the path integral is exact, IG_i = (x_i − x'_i)·w_i·(w·x + w·x'), and the
    completeness gap (w·x)² − (w·x')² − Σ IG is 0 for rules exact on linear integrands."""
    attr, delta = ig_square(method, n)
    for row in range(2):
        closed = (X[row] - BASE) * W6 * (W6 @ X[row] + W6 @ BASE)
        np.testing.assert_allclose(attr[row].flatten().numpy(), closed, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(delta.numpy(), 0.0, atol=1e-10)


def test_ig_delta_is_f_x_minus_f_baseline_minus_the_sum_with_its_sign():
    """Outside truth: one right-Riemann step gives Σ IG = 2(w·x)(w·d) with d = x − x'; the documented delta
    f(x) − f(x') − Σ IG is then (w·x)² − (w·x')² − 2(w·x)(w·d) = −(w·d)², negative on every row."""
    _, delta = ig_square("riemann_right", 1)
    expected = [-((W6 @ (X[r] - BASE)) ** 2) for r in range(2)]
    np.testing.assert_allclose(delta.numpy(), expected, rtol=1e-10)
    assert (delta < 0).all()


def test_deeplift_and_input_x_gradient_on_a_linear_model_with_negative_inputs():
    """Outside truth: for f = W·x + b, DeepLIFT is W_t·(x − x') and input × gradient is x·W_t (signs kept: the
    inputs are negative as often as positive), with a [1, C, H, W] baseline shared by the batch."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 4)).double().eval()
    x = torch.randn(3, 1, 3, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    base = torch.linspace(-0.5, 0.6, 12, dtype=torch.float64).view(1, 1, 3, 4)
    t = torch.tensor([3, 0, 2])
    w = model[1].weight.detach().numpy()[t.numpy()].reshape(3, 1, 3, 4)
    xn, bn = x.numpy(), base.numpy()
    assert (xn < 0).any() and (xn > 0).any()
    np.testing.assert_allclose(A.DeepLift(baseline=base).attribute(model, x, t).numpy(), w * (xn - bn), rtol=1e-10)
    np.testing.assert_allclose(A.InputXGradient().attribute(model, x, t).numpy(), w * xn, rtol=1e-10)
    np.testing.assert_allclose(A.Saliency(abs=False).attribute(model, x, t).numpy(), w, rtol=1e-10)
    np.testing.assert_allclose(A.Saliency().attribute(model, x, t).numpy(), np.abs(w), rtol=1e-10)


def plain_occlusion(model, x, t, window, stride, fill):
    """Each window: positions 0, stride, ... until one reaches the edge (cropped there); a plain loop of forwards."""

    def starts(size):
        out, p = [], 0
        while True:
            out.append(p)
            if p + window >= size:
                return out
            p += stride

    _, _, h, w = x.shape
    with torch.no_grad():
        full = model(x)[0, t].item()
        total, count = np.zeros((h, w)), np.zeros((h, w))
        for y0 in starts(h):
            for x0 in starts(w):
                xo = x.clone()
                xo[..., y0 : y0 + window, x0 : x0 + window] = fill
                total[y0 : y0 + window, x0 : x0 + window] += full - model(xo)[0, t].item()
                count[y0 : y0 + window, x0 : x0 + window] += 1
    return total / count


class Bumpy(nn.Module):
    """A conv, ReLU and a linear read-out over a non-square 7x11 image: a transposed window shows."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.conv, self.relu, self.fc = nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Linear(2 * 7 * 11, 3)

    def forward(self, x):
        return self.fc(self.relu(self.conv(x)).flatten(1))


@pytest.mark.parametrize(
    "options, window, stride, fill", [({}, 4, 2, 0.0), ({"window": 3, "stride": 2, "baseline": 0.3}, 3, 2, 0.3)]
)
def test_occlusion_is_a_plain_loop_of_masked_forwards(options, window, stride, fill):
    """Outside truth: the mean drop of the target logit over the windows covering each pixel, one masked forward per
    window in a plain loop; defaults window 4, stride 2, black fill as documented, and a grey fill of 0.3."""
    model = Bumpy().double().eval()
    x = torch.rand(1, 1, 7, 11, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    got = A.Occlusion(**options).attribute(model, x, 1)
    np.testing.assert_allclose(got[0, 0].numpy(), plain_occlusion(model, x, 1, window, stride, fill), rtol=1e-9)


def test_method_names_and_aliases():
    """Outside truth: the names the module docstring and get_method document (ig, ixg, grad-cam, gbp)."""
    assert isinstance(A.get_method("IG"), A.IntegratedGradients)
    assert isinstance(A.get_method("ixg"), A.InputXGradient)
    assert isinstance(A.get_method("grad-cam"), A.GradCAM)
    assert isinstance(A.get_method("gbp"), A.GuidedBackprop)
    assert A.SmoothGrad(A.InputXGradient()).name == "smoothgrad_input_x_gradient"
    assert A.SmoothGrad().name == "smoothgrad"


def test_layer_ig_delta_has_the_documented_sign(setup):
    """Outside truth: delta = f(x) − f(x') − Σ attributions, with f from the hand-written forward; one coarse
    right-Riemann step leaves a gap of either sign, which the test requires to be non-zero."""
    m, x, t = setup
    r = L.layer_integrated_gradients(m, x, t, "conv1.hook_out", n_steps=1, method="riemann_right", baseline=0.2)
    f_x = hand_forward(m, x)["logits"].gather(1, t[:, None]).squeeze(1)
    f_b = hand_forward(m, torch.full_like(x, 0.2))["logits"].gather(1, t[:, None]).squeeze(1)
    expected = (f_x - f_b).double() - r.per_position.double().flatten(1).sum(1)
    assert expected.abs().min() > 1e-4
    torch.testing.assert_close(r.delta.double(), expected, rtol=1e-4, atol=1e-5)


def test_components_are_the_outer_products_by_a_plain_loop():
    """Outside truth: V[g, c, y, x] = spatial[y·W + x, g] · directions[g, c], filled in a plain loop on a non-square
    map (H 2, W 3) with distinct values, so a transposed layout shows."""
    rng = np.random.default_rng(0)
    c, h, w, k = 4, 2, 3, 2
    spatial, directions = rng.random((h * w, k)), rng.random((k, c))
    hand = np.zeros((k, c, h, w))
    for g in range(k):
        for ch in range(c):
            for y in range(h):
                for xx in range(w):
                    hand[g, ch, y, xx] = spatial[y * w + xx, g] * directions[g, ch]
    np.testing.assert_allclose(components(spatial, directions, (c, h, w)).numpy(), hand, rtol=1e-6)


def test_run_between_stops_at_the_named_hook_and_flows_name_groups_from_one():
    """Outside truth: the hand-written forward from conv1's pooled output to conv2's; the flows' targets are named
    "conv2 group 1", "conv2 group 2" (numbered from 1, as the pages show them)."""
    spec = tiny_spec()
    x = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(6))
    ref = hand_forward(spec.model, x)
    with torch.no_grad():
        got = run_between(spec, "conv1.hook_out", ref["conv1"], "conv2.hook_out")
    torch.testing.assert_close(got, ref["conv2"], rtol=1e-5, atol=1e-6)
    acts = {"conv1": ref["conv1"][0], "conv2": ref["conv2"][0]}
    g = torch.Generator().manual_seed(7)
    comps = {s: torch.rand(2, *a.shape, generator=g) for s, a in acts.items()}
    flows = flows_for_image(spec, acts, comps, ("a", "b", "c"))
    assert flows[0].targets == ("conv2 group 1", "conv2 group 2") and flows[1].targets == ("a", "b", "c")


def test_attribution_result_round_trip_keeps_completeness_work_and_weights():
    """Outside truth: distinct hand-given values for every field read back from the JSON dict and a round trip."""
    rep = FaithfulnessReport([], 0.4, 0.5, ["fc"], 2, 1)
    comp = Completeness(64, 0.012, 0.0034)
    work = {"forward": 7.0, "backward": 3.0}
    res = AttributionResult("pred", "conv2", ("a", "b"), (5,), (1,), (0,), rep, comp, {}, "cafe", work)
    d = res.to_dict()
    assert d["integrated_gradients_completeness"] == {"steps": 64, "max_abs_delta": 0.012, "max_relative_delta": 0.0034}
    assert d["work"] == work
    back = AttributionResult.from_dict(d)
    assert back.completeness == comp and back.work == work and back.weights_sha256 == "cafe"


@pytest.mark.parametrize("method", [A.IntegratedGradients, A.DeepLift])
def test_a_baseline_batch_that_does_not_match_the_inputs_is_refused_plainly(method):
    """Outside truth: _baseline_like's own promise (a baseline [1, 1, 3, 3] for [3, 1, 4, 4] inputs already gets
    it): "baseline of shape [...] does not match inputs", a MechscopeError, not a raw torch RuntimeError."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    x = torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    with pytest.raises(MechscopeError, match=r"baseline of shape \[2, 1, 4, 4\] does not match"):
        method(baseline=torch.zeros(2, 1, 4, 4)).attribute(model, x, 0)


@pytest.mark.parametrize("label", [3, -1])
def test_a_label_outside_the_classes_is_refused_not_dropped(label):
    """Outside truth: 3 classes are 0..2; a label 3 (or -1) has no row of [classes, C_t, C_s] to average into, so
    it is named instead of its images being left out of every class's mean without a word."""
    x = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 2, label])
    with pytest.raises(MechscopeError, match=rf"label {label} outside the 3 classes 0..2"):
        L.class_channel_to_channel(_tiny(3), x, labels, "conv1.hook_out", "conv2.hook_pre", n_classes=3)
    ok = L.class_channel_to_channel(_tiny(3), x, torch.tensor([0, 1, 2, 2]), "conv1.hook_out", "conv2.hook_pre", 3)
    assert ok.shape == (3, 4, 3)
