"""Deletion/insertion curves, the cascading randomisation check (Adebayo et al. 2018), the report's verdict and the
layer attributions against outside truths: a hand-built model whose class-0 logit is a known linear function of the
pixels (curves as plain numpy sums, areas by the trapezoid rule written out), scipy's Spearman ρ, PyTorch's default
initialisation bound, torch.equal per parameter, Captum's layer methods and hand decompositions of linear maps."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as TF
from scipy import stats
from torch import nn

from mechscope.cnn.methods import attribution as A
from mechscope.cnn.methods import faithfulness as FA
from mechscope.cnn.methods import layer_attribution as L
from mechscope.cnn.methods.attributed import AttributionResult
from tests.unit.test_cnn_circuits_discovery_truths import _Sum
from tests.unit.test_explain_parts_truths import _tiny, hand_forward

pytestmark = pytest.mark.usefixtures("one_thread")

BASE = 0.25  # a baseline that is not 0: pixels at 0 are changeable, pixels at 0.25 on both channels are not


def _images() -> torch.Tensor:
    """Two 2-channel 4x4 images in float64. Image 0: 10 pixels differ from BASE (two of them on one channel only), 6
    sit at BASE on both channels; image 1: every pixel differs from BASE."""
    g = torch.Generator().manual_seed(7)
    x = 0.5 + torch.rand(2, 2, 4, 4, generator=g, dtype=torch.float64)
    flat = x[0].view(2, 16)
    flat[:, [1, 4, 6, 9, 11, 14]] = BASE  # background of image 0
    flat[0, 3], flat[1, 8] = BASE, BASE  # on one channel only: still changeable
    flat[1, 3], flat[0, 8] = 0.0, 0.0  # 0 is not the baseline: changeable
    return x


def _scores() -> torch.Tensor:
    """Distinct-valued scores with ties (pixels 0, 2 and 5 of image 0; 7 and 12 of image 1)."""
    s = torch.arange(32, dtype=torch.float64).view(2, 16).flip(1) * 0.7 % 5
    s[0, [0, 2, 5]] = 3.0
    s[1, [7, 12]] = 4.5
    return s


def hand_curves(x, scores, targets, steps, baseline):
    """Per image and step, in numpy: sort the changeable pixels by score (higher first, ties in pixel order), set
    the top round(k/steps·m) to the baseline (deletion) or keep only them (insertion), class-0 probability
    sigmoid(0.1·Σ), class 1 its complement."""
    x, scores = x.numpy().reshape(len(x), x.shape[1], -1), scores.numpy()
    dels, ins = np.zeros((len(x), steps + 1)), np.zeros((len(x), steps + 1))
    for b in range(len(x)):
        changeable = [p for p in range(x.shape[2]) if np.any(x[b, :, p] != baseline)]
        order = sorted(changeable, key=lambda p: (-scores[b, p], p))
        for k in range(steps + 1):
            top = order[: int(np.round(k / steps * len(order)))]
            d, i = x[b].copy(), np.full_like(x[b], baseline)
            d[:, top], i[:, top] = baseline, x[b][:, top]
            for out, img in ((dels, d), (ins, i)):
                p0 = 1 / (1 + math.exp(-0.1 * img.sum()))
                out[b, k] = p0 if targets[b] == 0 else 1 - p0
    return dels, ins


def trapezoid(curve, steps):
    return sum((curve[k] + curve[k + 1]) / 2 / steps for k in range(steps))


def test_curves_step_by_step_are_plain_sums_with_a_non_zero_baseline():
    """Truth: ``hand_curves`` (numpy) on two images with different targets, 2 channels, a baseline of 0.25, tied
    scores, and the model's batches cut into threes; areas by the trapezoid rule written out."""
    x, s, t = _images(), _scores(), torch.tensor([0, 1])
    c = FA.deletion_insertion(_Sum(), x, t, s, steps=4, baseline=BASE, batch_size=3)
    dels, ins = hand_curves(x, s, [0, 1], 4, BASE)
    np.testing.assert_allclose(c.deletion.numpy(), dels, rtol=1e-9)
    np.testing.assert_allclose(c.insertion.numpy(), ins, rtol=1e-9)
    np.testing.assert_allclose(c.fractions.numpy(), [0, 0.25, 0.5, 0.75, 1])
    assert c.deletion_auc == pytest.approx(np.mean([trapezoid(d, 4) for d in dels]), rel=1e-9)
    assert c.insertion_auc == pytest.approx(np.mean([trapezoid(i, 4) for i in ins]), rel=1e-9)
    assert c.deletion_auc != pytest.approx(dels.mean(), rel=1e-3)  # the trapezoid is not the plain mean here


def test_ties_keep_pixel_order_on_a_full_size_image():
    """Truth: ``hand_curves`` (ties in pixel order) on a 28x28 image scored on three levels only, each pixel a
    different value, so a tie group cut by a step in another order gives another probability."""
    g = torch.Generator().manual_seed(5)
    x = 0.01 + 0.04 * torch.rand(1, 1, 28, 28, generator=g, dtype=torch.float64)
    s = torch.randint(0, 3, (1, 784), generator=g).double()
    c = FA.deletion_insertion(_Sum(), x, 0, s, steps=7)
    dels, ins = hand_curves(x, s, [0], 7, 0.0)
    np.testing.assert_allclose(c.deletion.numpy(), dels, rtol=1e-12)
    np.testing.assert_allclose(c.insertion.numpy(), ins, rtol=1e-12)


def test_pixel_scores_sum_the_signed_channels():
    """Truth: numpy's sum over the channel axis, signs kept (−2 + 3 = 1, not 5)."""
    a = torch.tensor([[[[-2.0, 1.0]], [[3.0, -4.0]]]])  # [1, 2, 1, 2]
    np.testing.assert_array_equal(FA.pixel_scores(a).numpy(), a.numpy().sum(1).reshape(1, -1))


class Fixed(A.Attribution):
    """A 'method' that returns given maps whatever the model (so its randomisation ρ is known)."""

    name = "fixed"

    def __init__(self, maps: torch.Tensor) -> None:
        self.maps = maps

    def _attribute(self, model, inputs, target):
        return self.maps.clone()


def test_report_curves_and_random_order_are_the_hand_ones():
    """Truth: ``hand_curves`` for the method's map, and for the random order the scores drawn by torch.rand from a
    generator seeded with the report's seed (3); curves averaged over the images by numpy."""
    x, t = _images(), torch.tensor([1, 0])
    maps = torch.stack([_scores(), -_scores()], 1).view(2, 2, 4, 4) * torch.tensor([2.0, 1.0]).view(1, 2, 1, 1)
    r = FA.evaluate_faithfulness(_Sum(), x, t, {"fixed": Fixed(maps)}, [], steps=4, seed=3, baseline=BASE)
    dels, ins = hand_curves(x, maps.sum(1).flatten(1), [1, 0], 4, BASE)
    (m,) = r.methods
    np.testing.assert_allclose(m.deletion_curve, dels.mean(0), rtol=1e-9)
    np.testing.assert_allclose(m.insertion_curve, ins.mean(0), rtol=1e-9)
    assert m.deletion_auc == pytest.approx(np.mean([trapezoid(d, 4) for d in dels]), rel=1e-9)
    rnd = torch.rand((2, 16), generator=torch.Generator().manual_seed(3))
    rdels, rins = hand_curves(x, rnd, [1, 0], 4, BASE)
    np.testing.assert_allclose(r.random_deletion_curve, rdels.mean(0), rtol=1e-9)
    np.testing.assert_allclose(r.random_insertion_curve, rins.mean(0), rtol=1e-9)
    assert r.random_insertion_auc == pytest.approx(np.mean([trapezoid(i, 4) for i in rins]), rel=1e-9)
    assert r.fractions == pytest.approx([0, 0.25, 0.5, 0.75, 1]) and r.steps == 4 and r.n_inputs == 2
    other = torch.rand((2, 16), generator=torch.Generator().manual_seed(0))
    assert not np.allclose(hand_curves(x, other, [1, 0], 4, BASE)[0].mean(0), rdels.mean(0))  # the seed matters


def _stack() -> nn.Module:
    torch.manual_seed(11)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 5), nn.ReLU(), nn.Linear(5, 2)
    ).eval()


def test_the_cascade_is_cumulative_from_the_top_and_keeps_the_original():
    """Truth: Adebayo et al.'s cascade: after step k exactly the first k listed layers differ from the trained model
    (torch.equal per parameter), the rest, the norm and the trained model itself untouched; each redrawn Linear or
    Conv2d weight and bias lies within PyTorch's default bound 1/√fan_in (fan_in from torch.nn.init) and nearly
    fills it."""
    model = _stack()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    layers = ["6", ("hidden", ["4", "5"]), ("conv", ["0", "1"])]
    groups = [["6"], ["4"], ["0"]]
    seen = []
    for step, (name, rand) in enumerate(FA.randomise_cascading(model, layers, seed=2)):
        seen.append(name)
        params = dict(rand.named_parameters())
        for i, group in enumerate(groups):
            for p in group:
                for kind in ("weight", "bias"):
                    same = torch.equal(params[f"{p}.{kind}"], original[f"{p}.{kind}"])
                    assert same == (i > step), (step, p, kind)
        assert all(torch.equal(params[f"1.{k}"], original[f"1.{k}"]) for k in ("weight", "bias"))  # the norm's own
    assert seen == ["6", "hidden", "conv"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, original[k])
    for p in ("0", "4", "6"):
        w, bias = dict(rand.named_modules())[p].weight, dict(rand.named_modules())[p].bias
        bound = 1 / math.sqrt(nn.init._calculate_fan_in_and_fan_out(w)[0])
        assert 0.8 * bound < w.abs().max().item() <= bound and bias.abs().max().item() <= bound


def test_a_layer_without_parameters_is_refused():
    """Truth: a ReLU has nothing to re-initialise (the docstring's ValueError)."""
    with pytest.raises(ValueError, match="layer 2 has no parameters"):
        list(FA.randomise_cascading(_stack(), ["2"]))


def _rho(a, b):
    return stats.spearmanr(a, b).statistic


def test_randomisation_rho_is_scipys_per_image_on_the_whole_image_and_on_the_input():
    """Truth: scipy.stats.spearmanr of |attribution| summed over channels, trained vs the cascade's model, per image
    and over the pixels off the 0.25 baseline only, averaged by numpy; a map that copies the input keeps ρ = 1."""
    model, x, t = _stack().double(), _images(), torch.tensor([0, 1])
    sal = A.Saliency(abs=False)
    r = FA.evaluate_faithfulness(model, x, t, {"sal": sal, "copy": Fixed(x)}, ["6", "4"], steps=2, baseline=BASE)
    before = sal.attribute(model, x, t).abs().sum(1).flatten(1).numpy()
    mask = ((x - BASE).abs().sum(1).flatten(1) > 0).numpy()
    for (layer, rand), want_layer in zip(FA.randomise_cascading(model, ["6", "4"], seed=0), ["6", "4"], strict=True):
        after = sal.attribute(rand, x, t).abs().sum(1).flatten(1).numpy()
        whole = [_rho(before[i], after[i]) for i in range(2)]
        on_input = [_rho(before[i][mask[i]], after[i][mask[i]]) for i in range(2)]
        assert layer == want_layer and abs(whole[0] - on_input[0]) > 1e-3  # the mask matters for image 0
        assert r.methods[0].randomisation[layer] == pytest.approx(np.mean(whole), abs=1e-9)
        assert r.methods[0].randomisation_on_input[layer] == pytest.approx(np.mean(on_input), abs=1e-9)
    assert r.methods[1].randomisation == pytest.approx({"6": 1.0, "4": 1.0})
    assert r.methods[1].randomisation_on_input == pytest.approx({"6": 1.0, "4": 1.0})


def _with_foreground(n: int) -> torch.Tensor:
    """Image 0 of ``_images`` and an image at BASE but for its first ``n`` pixels."""
    x = _images()
    x[1] = BASE
    x[1, 0].view(-1)[:n] = torch.linspace(0.5, 0.9, n, dtype=torch.float64)
    return x


def test_an_image_of_one_foreground_pixel_is_left_out_of_the_input_rho():
    """Truth: the source's own comment ("NaN for an image of under 2 such pixels: left out") and scipy, whose ρ of
    one pair is NaN: the input-copy map's ρ on the input is image 0's alone, 1.0 (it counted a 0 and read 0.5)."""
    model, x = _stack().double(), _with_foreground(1)
    r = FA.evaluate_faithfulness(model, x, 0, {"copy": Fixed(x)}, ["6"], steps=2, baseline=BASE)
    assert r.methods[0].randomisation_on_input["6"] == pytest.approx(1.0)


def test_an_image_all_at_the_baseline_is_left_out_not_a_crash():
    """Truth: as above, an image with no foreground pixel has no ρ on the input and is left out (it raised a reshape
    error)."""
    model, x = _stack().double(), _with_foreground(0)
    r = FA.evaluate_faithfulness(model, x, 0, {"copy": Fixed(x)}, ["6"], steps=2, baseline=BASE)
    assert r.methods[0].randomisation_on_input["6"] == pytest.approx(1.0)


def _m(name, dele, ins, whole, on_input):
    return FA.MethodFaithfulness(name, dele, ins, whole, on_input, [dele, 0.0], [0.0, ins])


def test_verdict_reads_the_last_layer_and_is_strict_at_the_threshold():
    """Truth: Adebayo's check after the full cascade (the last layer listed), |ρ| < 0.5 on the input pixels: ρ 0.9
    then 0.1 passes, 0.1 then 0.9 fails, exactly 0.5 fails, −0.49 passes."""
    late_low = _m("late_low", 0.2, 0.6, {"fc": 0.9, "conv1": 0.9}, {"fc": 0.9, "conv1": 0.1})
    late_high = _m("late_high", 0.2, 0.6, {"fc": 0.1, "conv1": 0.1}, {"fc": 0.1, "conv1": 0.9})
    edge = _m("edge", 0.2, 0.6, {"fc": 0.0, "conv1": 0.0}, {"fc": 0.5, "conv1": 0.5})
    neg = _m("neg", 0.2, 0.6, {"fc": 0.9, "conv1": 0.9}, {"fc": -0.49, "conv1": -0.49})
    r = FA.FaithfulnessReport([late_low, late_high, edge, neg], 0.4, 0.5, ["fc", "conv1"], 2, 1)
    assert [r.passes(m) for m in r.methods] == [True, False, False, True]
    assert FA.final_rho({"fc": 0.3, "conv2": 0.2, "conv1": 0.7}) == 0.7 and FA.final_rho({}) is None


def test_ranking_puts_passing_methods_first_then_by_gap_and_the_dict_says_so():
    """Truth: a hand ordering: passing methods by insertion − deletion (0.7 > 0.3), then the failing one although
    its gap (0.9) is the largest; beats_random_order needs both areas better than the random order's (0.4, 0.5)."""
    a = _m("a", 0.3, 0.6, {"fc": 0.1}, {"fc": 0.1})  # gap 0.3, deletion better, insertion better
    b = _m("b", 0.1, 0.8, {"fc": 0.1}, {"fc": 0.1})  # gap 0.7
    c = _m("c", 0.0, 0.9, {"fc": 0.9}, {"fc": 0.9})  # gap 0.9, fails
    d = _m("d", 0.35, 0.45, {"fc": 0.1}, {"fc": 0.1})  # deletion better only
    r = FA.FaithfulnessReport([a, b, c, d], 0.4, 0.5, ["fc"], 2, 1, [0.0, 1.0], [0.4, 0.3], [0.2, 0.7])
    assert [m.method for m in r.ranking()] == ["b", "a", "d", "c"]
    out = r.to_dict()
    assert out["ranking"] == ["b", "a", "d", "c"]
    assert out["methods"]["b"]["insertion_minus_deletion"] == pytest.approx(0.7)
    assert [out["methods"][k]["beats_random_order"] for k in "abcd"] == [True, True, True, False]
    back = FA.FaithfulnessReport.from_dict(out)
    assert back == r and back.methods[1].deletion_curve == [0.1, 0.0] and back.methods[1].insertion_curve == [0.0, 0.8]


def test_attribution_result_keeps_labels_predictions_and_skips_apart():
    """Truth: the values given by hand, distinct per field, read back from the JSON dict and from a round trip."""
    rep = FA.FaithfulnessReport([_m("sal", 0.1, 0.8, {"fc": 0.1}, {"fc": 0.2})], 0.4, 0.5, ["fc"], 2, 1)
    res = AttributionResult("pred", "conv2", ("a", "b", "c"), (5, 9), (2, 0), (1, 2), rep, None, {"occ": "why"}, "ab")
    d = res.to_dict()
    assert d["examples"] == {"test_indices": [5, 9], "labels": [2, 0], "predictions": [1, 2]}
    assert d["skipped"] == {"occ": "why"} and d["ranking"] == ["sal"]
    assert AttributionResult.from_dict(d) == res


@pytest.fixture(scope="module")
def tiny_x():
    x = torch.rand(7, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    return _tiny(0), x


def test_layer_activation_x_gradient_matches_captum_and_per_channel_sums(tiny_x):
    """Truth: Captum's LayerGradientXActivation on conv1's output; per_channel is numpy's sum over positions."""
    captum = pytest.importorskip("captum.attr")
    model, x = tiny_x
    t = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    ours = L.layer_activation_x_gradient(model, x, t, "conv1.hook_out")
    module = dict(model.named_modules())["conv1.hook_out"]
    theirs = captum.LayerGradientXActivation(model, module).attribute(x, target=t).detach()
    torch.testing.assert_close(ours.per_position, theirs, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours.per_channel.numpy(), theirs.numpy().sum((2, 3)), rtol=1e-5, atol=1e-6)


def test_layer_ig_in_chunks_matches_captum_and_its_delta_is_the_hand_gap(tiny_x):
    """Truth: Captum's LayerIntegratedGradients (Gauss-Legendre, 6 steps) with the steps cut into chunks; delta is
    f(x)[t] − f(x')[t] − Σ attributions from a hand forward, and is not 0 at 6 steps."""
    captum = pytest.importorskip("captum.attr")
    model, x = tiny_x
    t = torch.tensor([2, 1, 0, 2, 1, 0, 2])
    res = L.layer_integrated_gradients(model, x, t, "conv1.hook_out", baseline=0.2, n_steps=6, batch_size=14)
    module = dict(model.named_modules())["conv1.hook_out"]
    theirs = captum.LayerIntegratedGradients(model, module).attribute(x, baselines=0.2, target=t, n_steps=6).detach()
    torch.testing.assert_close(res.per_position, theirs, rtol=1e-5, atol=1e-6)
    fx, fb = hand_forward(model, x)["logits"], hand_forward(model, torch.full_like(x, 0.2))["logits"]
    gap = (fx - fb)[torch.arange(7), t] - theirs.flatten(1).sum(1)
    torch.testing.assert_close(res.delta, gap, rtol=1e-4, atol=1e-6)
    assert gap.abs().max() > 1e-4


def test_channel_to_channel_in_chunks_is_the_hand_decomposition(tiny_x):
    """Truth: conv2's pre-activation is linear in conv1's output: entry [b, j, i] is channel i alone convolved with
    W[j, i], summed over positions (no bias); the images run in chunks of 3."""
    model, x = tiny_x
    got = L.channel_to_channel(model, x, "conv1.hook_out", "conv2.hook_pre", batch_size=3)
    a1, w2 = hand_forward(model, x)["conv1"], model.conv2.conv.weight.detach()
    hand = torch.stack([TF.conv2d(a1[:, i : i + 1], w2[:, i : i + 1]).sum((2, 3)) for i in range(3)], 2)
    assert got.shape == (7, 4, 3)
    torch.testing.assert_close(got, hand, rtol=1e-4, atol=1e-5)
