"""Feature-visualisation objectives, dataset examples, tuning curves and stimuli against truths from outside them:
hand arithmetic on tiny tensors, a plain ``run_with_cache`` read indexed by hand, hand-built responses with a known
label, and where the drawn ink lies. Each test pins one behaviour that could break while every other test passed
(a mean read as a sum or a max, a sign, a swapped axis, the blank drawn at the wrong end of the range, the weakest
passing family chosen, an unsorted curvature axis, an arc or a corner drawn the wrong way)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mechscope.cnn.methods import featvis as FV
from mechscope.cnn.methods import tuning as T
from mechscope.cnn.methods.stimuli import Stimulus, StimulusSet, draw_stimuli, render, settings
from mechscope.cnn.models.cnn import CNN, CNNConfig
from mechscope.cnn.models.spec import walk
from mechscope.core.hooks import HookPoint, run_with_cache

HOOK = "conv1.hook_post"

# ---- objectives by hand ----------------------------------------------------------------------


def two_channels() -> torch.Tensor:
    """[1, 2, 2, 2]: channel 1 holds [[1, 2], [3, 4]] (mean 2.5, sum 10, max 4); channel 0 holds 9s."""
    t = torch.full((1, 2, 2, 2), 9.0)
    t[0, 1] = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    return t


def test_channel_is_the_mean_over_positions():
    """Hand arithmetic: (1 + 2 + 3 + 4) / 4 = 2.5 (a sum would give 10, a max 4)."""
    assert FV.channel("L", 1)({"L": two_channels()}).tolist() == [2.5]


def test_direction_averages_positions_before_the_dot_product():
    """Hand arithmetic: the channel means are (9, 2.5); their dot product with (0, 1) is 2.5 (the max would be 4)."""
    assert FV.direction("L", torch.tensor([0.0, 1.0]))({"L": two_channels()}).tolist() == [2.5]


def test_diversity_of_identical_images_is_its_lowest():
    """By its definition −(mean cosine similarity of the group's Gram matrices): identical images have cosine
    similarity 1 with each other, so the objective is −1 for each; images with disjoint channels have 0."""
    assert FV.diversity("L", 2)({"L": torch.ones(2, 3, 4, 4)}).tolist() == pytest.approx([-1.0, -1.0])
    apart = torch.zeros(2, 3, 4, 4)
    apart[0, 0], apart[1, 1] = 1.0, 1.0  # Gram matrices with no entry in common: cosine 0
    assert FV.diversity("L", 2)({"L": apart}).abs().max() < 1e-6


def test_total_variation_of_stripes_by_hand():
    """Hand arithmetic on a 4×4 image, each term the mean absolute difference of neighbours: vertical stripes
    change by 1 between every pair of columns (12 pairs) and never between rows, so TV = 0 + 1 = 1; horizontal
    stripes likewise 1 + 0; a checkerboard 1 + 1 = 2."""
    v = torch.zeros(1, 1, 4, 4)
    v[..., 1::2] = 1.0
    h = v.transpose(2, 3).contiguous()
    tv = FV.total_variation()
    assert tv({FV.INPUT: v}).tolist() == [1.0]
    assert tv({FV.INPUT: h}).tolist() == [1.0]
    assert tv({FV.INPUT: (v + h) % 2}).tolist() == [2.0]


class Identity(nn.Module):
    """The smallest model for dataset_examples: the image itself at one hook point."""

    def __init__(self) -> None:
        super().__init__()
        self.hook_post = HookPoint()

    def forward(self, x):
        return self.hook_post(x)


def test_dataset_example_position_on_a_non_square_map():
    """Outside truth: the image is its own activation, a 3×5 map whose only 1 sits at row 2, column 1, so the
    argmax position is (2, 1) (flat index 11 = 2·5 + 1)."""
    x = torch.zeros(1, 1, 3, 5)
    x[0, 0, 2, 1] = 1.0
    ex = FV.dataset_examples(Identity(), x, ["hook_post"], k=1)["hook_post"]
    assert ex.positions[0, 0].tolist() == [2, 1]
    assert ex.top_values[0, 0] == 1.0


# ---- tuning against run_with_cache ---------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    """One conv stage (3×3, no padding, 16×16 → 14×14, field size 3, jump 1, start 0) after the CNN's own input
    normalisation; channel 0 is a positive box filter with a bias of 1, so a black image does not leave it at 0
    and a white one drives it far more; channels 1-2 are random. Tuned on edges and arcs."""
    torch.manual_seed(0)
    model = CNN(CNNConfig(image_size=16, channels=(3,), kernel_size=3)).eval()
    with torch.no_grad():
        model.conv1.conv.weight[0] = 1.0 / 9
        model.conv1.conv.bias[0] = 1.0
    spec = walk(model)
    stim = draw_stimuli(16, seed=0, families=("edge", "curve"))
    return model, spec, stim, T.tuning(spec, stim, {"conv1": torch.ones(3)})


def hand_centre(centre: tuple[float, float]) -> tuple[int, int]:
    """The map position whose 3-pixel field [p, p + 3) is centred nearest the point: p = round(c − 1.5), in 0..13."""
    return tuple(min(max(round(c - 1.5), 0), 13) for c in centre)


def test_centre_response_is_read_at_row_then_column(tiny):
    """Outside truth: run_with_cache's map indexed [image, :, row, column] at the hand-computed position of
    stimulus centres off the diagonal (row ≠ column), and the maximum over the map."""
    model, spec, _, _ = tiny
    x = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    centres = [(3.2, 10.7), (11.9, 4.1), (7.3, 12.6)]
    sts = [Stimulus("blob", radius=2.0, centre=c) for c in centres]
    r_max, r_centre = T.responses(spec, x, sts)["conv1"]
    _, cache = run_with_cache(model, x, names=[HOOK])
    a = cache[HOOK]
    for i, c in enumerate(centres):
        py, px = hand_centre(c)
        assert py != px
        assert torch.equal(r_centre[i], a[i, :, py, px])
        assert torch.equal(r_max[i], a[i].flatten(1).amax(1))


def test_blank_is_the_response_to_a_black_image(tiny):
    """Outside truth: run_with_cache on an all-zero image (value_range[0] = 0, the stimuli's black), the maximum
    over positions; for the box filter that is relu(1 + 9 · (1/9) · (0 − 0.1307) / 0.3081) by hand."""
    model, _, _, r = tiny
    _, cache = run_with_cache(model, torch.zeros(1, 1, 16, 16), names=[HOOK])
    want = cache[HOOK][0].flatten(1).amax(1)
    units = r.stage("conv1").units
    for c, u in enumerate(units):
        assert u.blank == pytest.approx(float(want[c]), abs=1e-6)
    assert units[0].blank == pytest.approx(1.0 - 0.1307 / 0.3081, abs=1e-5)


def members(stim: StimulusSet, cv: T.Curve, x: float) -> list[int]:
    """The images of a curve point: its family, its fixed parameters, and ``x`` on its axis (curvature: 1/radius)."""

    def along(s: Stimulus) -> float:
        return 1 / s.radius if cv.axis == "curvature" else getattr(s, cv.axis)

    return [i for i, s in enumerate(stim.stimuli) if s.family == cv.family and abs(along(s) - x) < 1e-9
            and all(getattr(s, k) == v for k, v in cv.fixed.items())]  # fmt: skip


def test_curves_are_means_over_positions_of_a_plain_forward(tiny):
    """Outside truth: each curve point is the mean, over the five drawn positions of its setting, of
    run_with_cache's maximum over the map (``response``) and of the map at the hand-computed centred position
    (``response_centre``)."""
    model, _, stim, r = tiny
    _, cache = run_with_cache(model, stim.images, names=[HOOK])
    a = cache[HOOK]
    amax = a.flatten(2).amax(2)  # [N, C]
    seen_spread = False
    for u in r.stage("conv1").units:
        c = u.channel
        for cv in u.curves:
            for x, y, yc in zip(cv.x, cv.response, cv.response_centre, strict=True):
                idx = members(stim, cv, x)
                assert len(idx) == 5, (cv.family, cv.axis, x)
                vals = amax[idx, c]
                centred = torch.stack([a[i, c, *hand_centre(stim.stimuli[i].centre)] for i in idx])
                assert y == pytest.approx(float(vals.mean()), rel=1e-5, abs=1e-6)
                assert yc == pytest.approx(float(centred.mean()), rel=1e-5, abs=1e-6)
                seen_spread |= float(vals.max() - vals.mean()) > 1e-3
    assert seen_spread  # positions differ somewhere, so a mean is not a max


# ---- labels and curves from hand-built responses ----------------------------------------------------


def hand_set(families: tuple[str, ...]) -> tuple[StimulusSet, T._Settings]:
    """Every setting of ``families`` at 16×16, once each (one position), on blank images."""
    sts = tuple(s for s in settings(16) if s.family in families)
    counts = {f: sum(s.family == f for s in sts) for f in families}
    stim = StimulusSet((16, 16), 0, 1.5, 1, ((0.0, 0.0),), {}, counts, sts, torch.zeros(len(sts), 1, 16, 16))
    return stim, T._Settings(stim)


def test_the_label_is_the_strongest_passing_family():
    """Known answer: edges answer only at 90° (1.0) and line endings only at 180° (0.8): both are perfectly sharp
    (circular variance 0) and driven (≥ 0.5 of a maximum of 1); lines answer 1.5 at every angle (broad). The
    docstring's rule, the passing family that drives the unit most, gives the edge."""
    stim, grid = hand_set(("line", "edge", "line_end"))
    r = torch.zeros(len(stim), 1)
    for i, s in enumerate(stim.stimuli):
        r[i, 0] = {("edge", 90.0): 1.0, ("line_end", 180.0): 0.8}.get((s.family, s.angle), 1.5 * (s.family == "line"))
    u = T.unit_tuning("conv1", 0, stim, grid, r, r, 0.0, 1.0)
    assert u.tuned and u.label_family == "edge" and u.label == "edge detector, dark→light at 90°"
    assert u.family_best["line_end"]["sharp"] and u.family_best["line_end"]["drive"] == pytest.approx(0.8)
    assert u.preferred.family == "line" and u.stronger() == ["line"]


def test_curvature_axis_runs_from_flat_to_tight():
    """Known answer: curvature is 1/radius, so the curve's x is 1/r over the drawn radii in increasing order, each
    paired with the response at that radius (here the response is the radius itself, at the preferred angle 0°)."""
    stim, grid = hand_set(("curve",))
    r = torch.tensor([[s.radius if s.angle == 0.0 else 0.0] for s in stim.stimuli])
    u = T.unit_tuning("conv1", 0, stim, grid, r, r, 0.0, 1.0)
    cv = u.curve("curve", "curvature")
    radii = sorted({s.radius for s in stim.stimuli})
    assert len(radii) == 5 and cv.fixed == {"angle": 0.0}
    assert list(cv.x) == pytest.approx(sorted(1 / q for q in radii))
    assert all(b > a for a, b in zip(cv.x[:-1], cv.x[1:], strict=True))
    assert list(cv.response) == pytest.approx([1 / x for x in cv.x], rel=1e-6)


# ---- where the stimuli put their ink -----------------------------------------------------------------


def centroid(img: torch.Tensor) -> tuple[float, float]:
    """(row, column) of the intensity centroid in pixel coordinates (pixel j spans [j, j + 1))."""
    img = img.squeeze().double()
    rows, cols = torch.meshgrid(torch.arange(img.shape[0]) + 0.5, torch.arange(img.shape[1]) + 0.5, indexing="ij")
    return float((img * rows).sum() / img.sum()), float((img * cols).sum() / img.sum())


def test_arc_passes_through_its_centre_and_opens_towards_its_angle():
    """By the docstring, an arc's midpoint is the stimulus centre and its circle's centre lies ``radius`` away in
    direction ``angle`` (y up), so the ink bends towards that side. Geometry by hand: a stroke of width w along an
    arc of radius r and half-aperture h = min(0.5·28/r, π)/2 is an annular sector (radii r ∓ w/2, centroid
    ⅔·(r2³ − r1³)/(r2² − r1²)·sin h/h from the circle's centre) plus two half-disc caps at its ends (centroid
    4·(w/2)/3π past each end along the tangent); the whole lies about 1.76 px from the midpoint, towards ``angle``."""
    r, w = 5.0, 2.1
    h = min(0.5 * 28 / r, math.pi) / 2
    r1, r2 = r - w / 2, r + w / 2
    sector, caps = h * (r2**2 - r1**2), math.pi * (w / 2) ** 2
    sector_at = r - 2 / 3 * (r2**3 - r1**3) / (r2**2 - r1**2) * math.sin(h) / h
    caps_at = r - r * math.cos(h) + math.sin(h) * 4 * (w / 2) / (3 * math.pi)
    want = (sector * sector_at + caps * caps_at) / (sector + caps)
    for angle, side in ((0.0, (0, 1)), (90.0, (-1, 0)), (180.0, (0, -1))):  # (row, column) of a step towards angle
        img = render([Stimulus("curve", angle=angle, radius=r, centre=(14.0, 14.0))], (28, 28), w)[0, 0]
        assert img[13:15, 13:15].max() > 0.9, angle  # the midpoint is inked
        cy, cx = centroid(img)
        assert (cy - 14.0) * side[0] + (cx - 14.0) * side[1] == pytest.approx(want, abs=0.05), (angle, cy, cx)
        assert abs((cy - 14.0) * side[1]) + abs((cx - 14.0) * side[0]) < 0.05  # symmetric about the axis


def test_corner_arms_are_half_the_opening_either_side():
    """By the docstring, a corner's two arms are ``opening`` degrees apart about the bisector ``angle``: at 90° and
    angle 0 they run at ±45°, so the pixel 8 px out at 45° (y up) is inked and straight up, 8 px, is dark."""
    img = render([Stimulus("corner", angle=0.0, opening=90.0, centre=(14.0, 14.0))], (28, 28), 2.0)[0, 0]
    d = 8 / math.sqrt(2)
    assert img[int(14 - d), int(14 + d)] > 0.5 and img[int(14 + d), int(14 + d)] > 0.5  # (8, 19) and (19, 19)
    assert img[6, 14] < 0.1 and img[6, 13] < 0.1 and img[22, 14] < 0.1  # straight up and down
    assert img[14, :13].max() < 0.1  # nothing behind the vertex
