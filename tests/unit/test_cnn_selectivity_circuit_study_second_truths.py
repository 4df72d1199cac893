"""A second pass over ``cnn explain``'s class selectivity, per-channel examples and circuit study against outside
truths: per-class means by a plain loop over images, Morcos et al. (2018)'s index (μmax − μrest)/(μmax + μrest) in
numpy, the ``region`` thirds by hand centre-of-mass arithmetic, and a tiny CNN's circuits re-measured with
``hand_forward`` (a forward written out without hooks)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from mechscope.cnn.methods.activations import ExplainData, collect
from mechscope.cnn.methods.channel_selectivity import channel_selectivity
from mechscope.cnn.methods.circuit_study import circuit_study
from mechscope.cnn.methods.selectivity import region, selectivity
from mechscope.cnn.methods.unit_examples import unit_examples
from mechscope.cnn.models.spec import walk
from mechscope.core import intervene as A
from tests.unit.test_cnn_circuits_discovery_truths import _keep_only, _rates, _set_to, world  # noqa: F401
from tests.unit.test_explain_parts_truths import _tiny, hand_forward

pytestmark = pytest.mark.usefixtures("one_thread")
NAMES = ("a", "b", "c")
Y = torch.tensor([0] * 12 + [1] * 10 + [2] * 8)[torch.randperm(30, generator=torch.Generator().manual_seed(4))]
CORNERS = [(0, 0), (10, 10), (0, 10)]  # class k's hot pixel in the hand maps: upper left, lower right, upper right


def morcos(means: np.ndarray) -> np.ndarray:
    """(μmax − μrest)/(μmax + μrest) per row, μrest the plain mean of the other classes; 0 where both are 0."""
    out = []
    for row in means:
        top = row.max()
        rest = (row.sum() - top) / (len(row) - 1)
        out.append(0.0 if top + rest == 0 else (top - rest) / (top + rest))
    return np.array(out)


def loop_class_means(a: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    """[C, K] the mean over positions and over the class's images, by a plain loop over images."""
    sums, counts = np.zeros((a.shape[1], k)), np.zeros(k)
    for img, label in zip(a, y, strict=True):
        sums[:, label] += img.reshape(img.shape[0], -1).mean(1)
        counts[label] += 1
    return sums / counts


@pytest.fixture(scope="module")
def tiny():
    model = _tiny(0)
    x = torch.rand(30, 1, 16, 16, generator=torch.Generator().manual_seed(8))
    data = ExplainData(x, Y, x[:10], x[:0], Y[:0], NAMES)
    spec = walk(model)
    return model, spec, data, collect(model, spec, data)


def _hand_acts(acts, out1: torch.Tensor):
    """conv1's outputs replaced by ``out1``, its class maps by a hot pixel at CORNERS[k] on 11x11 maps."""
    maps = torch.zeros(3, out1.shape[1], 11, 11)
    for k, (r, c) in enumerate(CORNERS):
        maps[k, :, r, c] = 1.0
    return replace(acts, out={**acts.out, "conv1": out1}, maps={**acts.maps, "conv1": maps})


def _relu_like(n: int) -> torch.Tensor:
    """Non-negative activations [n, 3, 7, 7] that vary over positions: channel 0 prefers class 1 (all means > 0),
    channel 1 class 2, channel 2 class 1 and is exactly 0 on every class-0 image (a class mean of 0, none below)."""
    a = torch.rand(n, 3, 7, 7, generator=torch.Generator().manual_seed(9))
    a[:, 0] += torch.tensor([0.0, 0.4, 0.1])[Y].view(-1, 1, 1)
    a[:, 1] += torch.tensor([0.0, 0.1, 0.5])[Y].view(-1, 1, 1)
    a[:, 2] += torch.tensor([0.0, 0.3, 0.0])[Y].view(-1, 1, 1)
    a[Y == 0, 2] = 0.0
    return a


def test_non_negative_class_means_the_index_preference_order_and_region(tiny):
    """Truth: per-class means by a plain loop over images (mean over positions, not the maximum); the preferred
    class by numpy argmax; Morcos's index in numpy on the unshifted means (none is negative; a mean of exactly 0 is
    no reason to shift); channels grouped by preferred class, most selective first, by a plain sort; the region
    read on the preferred class's hand map (class 1: lower right, class 2: upper right), not on class 0's."""
    model, spec, data, acts = tiny
    a = _relu_like(30)
    st = selectivity(model, spec, data, _hand_acts(acts, a))[0]
    want = loop_class_means(a.double().numpy(), Y.numpy(), 3)
    np.testing.assert_allclose(st.class_means.numpy(), want, atol=1e-6)
    assert want[2, 0] == 0.0 and want.min(1)[0] > 0.05
    pref = want.argmax(1)
    assert st.preferred_class == tuple(pref.tolist()) == (1, 2, 1)
    assert not st.shifted
    np.testing.assert_allclose(st.index.numpy(), morcos(want), atol=1e-6)
    idx = morcos(want)
    assert st.order == tuple(sorted(range(3), key=lambda c: (pref[c], -idx[c])))
    assert st.region_on_preferred_class == ("lower right", "upper right", "lower right")


def test_channel_selectivity_shifts_every_network_but_explain_only_signed_ones(tiny):
    """Truth: Morcos's index in numpy on the loop's class means shifted to a minimum of 0 per channel (``index``) and
    unshifted (``explain_index``, as explain reports ReLU channels); these differ for a channel whose least active
    class mean is above 0. The stage's site is its output hook."""
    model, spec, data, acts = tiny
    a = _relu_like(30)
    st = channel_selectivity(model, spec, data, _hand_acts(acts, a))[0]
    want = loop_class_means(a.double().numpy(), Y.numpy(), 3)
    shifted = morcos(want - want.min(1, keepdims=True))
    np.testing.assert_allclose(st.index.numpy(), shifted, atol=1e-6)
    np.testing.assert_allclose(st.explain_index.numpy(), morcos(want), atol=1e-6)
    assert abs(shifted[0] - morcos(want)[0]) > 0.1
    assert (st.stage, st.hook) == ("conv1", "conv1.hook_out")
    assert st.preferred_class == (1, 2, 1) and st.silent == ()


def _constant_means(means: list[list[float]]) -> torch.Tensor:
    """[30, C, 7, 7] activations equal to means[c][label] everywhere."""
    return torch.tensor(means)[:, Y].T[:, :, None, None].expand(30, len(means), 7, 7).contiguous()


def test_silent_is_spread_within_the_tolerance_inclusive(tiny):
    """Truth, by hand: class means [0.5, 0.5, 0.5] spread 0 (silent even at tolerance 0); [1, 1, 0.85] spread 0.15
    (silent at tolerance 0.15 + ε, not at 0.1, though its max is only 0.05 above its mean); [-1, 0, 2] spread 3."""
    model, spec, data, acts = tiny
    a = _constant_means([[0.5, 0.5, 0.5], [1.0, 1.0, 0.85], [-1.0, 0.0, 2.0]])
    hand = _hand_acts(acts, a)
    assert channel_selectivity(model, spec, data, hand, tolerance=0.0)[0].silent == (0,)
    assert channel_selectivity(model, spec, data, hand, tolerance=0.1)[0].silent == (0,)
    assert channel_selectivity(model, spec, data, hand, tolerance=0.1501)[0].silent == (0, 1)
    st = selectivity(model, spec, data, hand)[0]
    assert st.shifted and float(st.index[2]) == pytest.approx(2.5 / 3.5, abs=1e-6)


@pytest.mark.parametrize(
    ("pixels", "want"),
    [
        ([(4, 5, 1.0)], "centre"),  # cy = 4/10 = 0.4 exactly: not upper (the bound is strict)
        ([(5, 6, 1.0)], "centre"),  # cx = 6/10 = 0.6 exactly: not right
        ([(3, 5, 1.0)], "upper centre"),  # cy = 0.3
        ([(5, 7, 1.0)], "middle right"),  # cx = 0.7
        ([(6, 4, 1.0)], "centre"),  # cy = 0.6 and cx = 0.4 exactly: neither lower nor left
        ([(7, 3, 1.0)], "lower left"),  # cy = 0.7, cx = 0.3
        ([(0, 0, 1.0), (10, 10, -1.0)], "upper left"),  # negative mass is clipped away first
        ([], "nowhere (never active)"),  # no mass at all
    ],
)
def test_region_thresholds_by_hand_on_an_11_by_11_map(pixels, want):
    """Truth: the centre of mass by hand, rows over (H − 1) = 10 and columns over (W − 1) = 10, thirds at 0.4/0.6."""
    m = np.zeros((11, 11))
    for r, c, v in pixels:
        m[r, c] = v
    assert region(m) == want


def test_region_divides_by_the_last_index_not_the_size():
    """Truth: a hot pixel at row 4, column 4 of a 7x7 map is at 4/6 ≈ 0.67 of the height and width: lower right
    (4/7 ≈ 0.57 would read as the centre)."""
    m = np.zeros((7, 7))
    m[4, 4] = 2.0
    assert region(m) == "lower right"


def test_examples_are_read_at_the_post_activation_by_a_plain_sort(tiny):
    """Truth: each conv1 channel's peak over positions of ``hand_forward``'s ReLU output, the images sorted by it in
    numpy (largest first); the layer named is the stage's post-activation hook."""
    model, spec, data, _ = tiny
    ex = unit_examples(model, spec, data, k=2)[0]
    peak = hand_forward(model, data.x)["conv1.post"].flatten(2).amax(2).numpy()  # [N, C]
    assert ex.layer == "conv1.hook_post"
    assert ex.top.tolist() == [list(np.argsort(-peak[:, c], kind="stable")[:2]) for c in range(3)]


# ---- circuit_study ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exact(world):  # noqa: F811
    model, spec, data, acts = world
    return circuit_study(model, spec, data, acts, [0, 1, 2], tolerance=0.0)


def _per_class(pred: torch.Tensor, y: torch.Tensor) -> list[float]:
    return [float((pred[y == k] == k).double().mean()) for k in range(3)]


def test_per_class_accuracies_growth_and_criterion_by_hand(world, exact):  # noqa: F811
    """Truth: ``hand_forward`` with conv2 edited by hand (only the circuit, the circuit at the reference mean, the
    circuit from the seeded donor), each class's accuracy by a plain mean; the growth curve as (accuracy, other
    classes called) with the first k channels of the greedy order kept; the criterion's bounds inclusive (at
    tolerance 0 a circuit matching the full accuracy exactly meets it)."""
    model, _, data, _ = world
    x, y = data.x, data.y
    ref = hand_forward(model, data.x_ref)["conv2"].double().mean(0).float()
    a = hand_forward(model, x)["conv2"]
    full = hand_forward(model, x)["logits"].argmax(1)
    donors = A.resample_donors(y, seed=exact.resample_seed, other_class=False)
    equal = False
    for c in exact.circuits:
        d, chans = c.target, list(c.channels)
        only = hand_forward(model, x, edit2=_keep_only(chans, ref))["logits"].argmax(1)
        without = hand_forward(model, x, edit2=_set_to(chans, ref))["logits"].argmax(1)
        resampled = hand_forward(model, x, edit2=_set_to(chans, a[donors]))["logits"].argmax(1)
        assert c.per_class_accuracy_circuit_only.tolist() == pytest.approx(_per_class(only, y), abs=1e-6)
        assert c.per_class_accuracy_circuit_ablated.tolist() == pytest.approx(_per_class(without, y), abs=1e-6)
        assert c.per_class_accuracy_circuit_resampled.tolist() == pytest.approx(_per_class(resampled, y), abs=1e-6)
        assert len(c.growth) == len(c.greedy_order)
        for k, g in enumerate(c.growth, 1):
            p = hand_forward(model, x, edit2=_keep_only(list(c.greedy_order[:k]), ref))["logits"].argmax(1)
            assert g.size == k
            assert (g.accuracy, g.other_classes_called) == pytest.approx(_rates(p, y, d), abs=1e-12)
        acc, fp = _rates(only, y, d)
        full_acc, full_fp = _rates(full, y, d)
        assert c.accuracy_criterion_met == (acc >= full_acc)
        assert c.meets_criterion == (acc >= full_acc and fp <= full_fp)
        equal |= acc == full_acc
    assert equal  # the inclusive bound is exercised


def test_ranking_site_and_feeder_stage(world, exact):  # noqa: F811
    """Truth: the ranking is numpy's argsort of minus the read-out's closed-form attribution mean_i Σ_hw (a − mean)·W[d]
    over the class's images (most positive first); the site is conv2's output hook, the feeders conv1's."""
    model, _, data, _ = world
    ref = hand_forward(model, data.x_ref)["conv2"].double().mean(0).float()
    a = hand_forward(model, data.x)["conv2"]
    w = model.fc.weight.detach().view(3, 4, 2, 2)
    for c in exact.circuits:
        att = ((a[data.y == c.target] - ref) * w[c.target]).flatten(2).sum(2).double().mean(0).numpy()
        assert list(c.ranking) == np.argsort(-att, kind="stable").tolist()
    assert (exact.site, exact.feeder_stage, exact.stage) == ("conv2.hook_out", "conv1", "conv2")


def test_held_out_verdict_is_inclusive_at_both_bounds(exact):
    """Truth, by hand with exact binary fractions: tolerance 0.25, held-out sufficiency 0.5 = 0.75 − 0.25 and other
    classes called 0.5 = 0.25 + 0.25 meet the criterion (≥ and ≤, as its sentence says); 0.5 − 2⁻⁸ below does not."""
    study = replace(exact, tolerance=0.25)
    c = replace(
        exact.circuits[0],
        held_out_full_accuracy=0.75,
        held_out_sufficiency=0.5,
        held_out_other_classes_called_full=0.25,
        held_out_other_classes_called_circuit=0.5,
    )
    assert study.held_out_met(c) is True
    assert study.held_out_met(replace(c, held_out_sufficiency=0.5 - 2**-8)) is False
    assert study.held_out_met(replace(c, held_out_other_classes_called_circuit=0.5 + 2**-8)) is False
    assert "≥ the full model's − 0" in exact.criterion and "≤ the full model's + 0" in exact.criterion
