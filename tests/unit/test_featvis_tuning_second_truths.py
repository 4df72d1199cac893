"""Feature visualisation, stimuli and tuning labels, second pass, against truths from outside the code: closed-form
optima of a linear unit, hand arithmetic on tiny tensors, plain loops over images, areas and lengths of drawn
shapes by geometry, the circular-variance formula written in numpy, and the module docstrings' stated thresholds."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from mechscope.cnn.methods import featvis as FV
from mechscope.cnn.methods import tuning as T
from mechscope.cnn.methods.stimuli import Stimulus, default_radii, draw_stimuli, principal_angle, render, stroke_width
from mechscope.cnn.models.cnn import CNN, CNNConfig
from mechscope.cnn.models.spec import walk
from mechscope.core.hooks import HookPoint, run_with_cache
from tests.unit.test_featvis_tuning_truths import Identity, hand_set

# ---- transforms and objectives by hand -------------------------------------------------------------


def test_pad_fills_with_its_value_and_crop_takes_the_centre():
    """Hand indexing: a 6×6 arange cropped to 2×2 keeps rows 2-3, columns 2-3 ([[14, 15], [20, 21]]); pad(1, 0.7)
    puts 0.7 on every border pixel of a 3×3 → 5×5 image."""
    x = torch.arange(36.0).reshape(1, 1, 6, 6)
    assert FV.crop_to(2, 2)(x, None)[0, 0].tolist() == [[14.0, 15.0], [20.0, 21.0]]
    p = FV.pad(1, 0.7)(torch.zeros(1, 1, 3, 3), None)[0, 0]
    border = torch.cat([p[0], p[-1], p[1:-1, 0], p[1:-1, -1]])
    assert p.shape == (5, 5) and torch.allclose(border, torch.full((16,), 0.7)) and p[1:4, 1:4].abs().sum() == 0


def test_neuron_reads_row_then_column_at_the_map_centre():
    """Hand indexing on a 3×5 map holding 10·row + column: the centre is row 1, column 2 (12); (y=0, x=3) is 3."""
    a = {"L": (10 * torch.arange(3.0)[:, None] + torch.arange(5.0)[None, :]).expand(1, 2, 3, 5)}
    assert FV.neuron("L", 1)(a).tolist() == [12.0]
    assert FV.neuron("L", 0, y=0, x=3)(a).tolist() == [3.0]


def test_l1_l2_against_their_target_by_hand():
    """Hand arithmetic on pixels (0.2, 0.9) with target 0.5: L1 = (0.3 + 0.4) / 2 = 0.35, L2 = (0.09 + 0.16) / 2 =
    0.125; with target 0, L1 of (−0.2, 0.9) is 0.55 (no cancelling of signs)."""
    x = {FV.INPUT: torch.tensor([[[[0.2, 0.9]]]])}
    assert FV.l1(0.5)(x).item() == pytest.approx(0.35)
    assert FV.l2(0.5)(x).item() == pytest.approx(0.125)
    assert FV.l1()({FV.INPUT: torch.tensor([[[[-0.2, 0.9]]]])}).item() == pytest.approx(0.55)


def const(value: float, name: str) -> FV.Objective:
    return FV.Objective(lambda a: torch.tensor([value]), set(), name)


def test_objective_arithmetic():
    """Hand arithmetic with constants 5 and 2: 5 − 2 = 3, 5 + 2 = 7, −5, 3·5 = 15, 2 − 3·5 = −13."""
    a, b = const(5.0, "a"), const(2.0, "b")
    assert [(a - b)({}).item(), (a + b)({}).item(), (-a)({}).item(), (3 * a)({}).item()] == [3.0, 7.0, -5.0, 15.0]
    assert (b - a * 3)({}).item() == -13.0


def test_diversity_of_three_images_by_hand():
    """numpy: Gram matrices of one-channel-per-image maps, cosine similarity of their flattenings, the mean over the
    g·(g − 1) = 6 ordered pairs (the diagonal excluded), negated, for each image of the group."""
    rng = np.random.default_rng(0)
    acts = rng.random((3, 2, 2, 2))
    grams = [f @ f.T / 4 for f in acts.reshape(3, 2, 4)]
    cos = [[np.dot(p.ravel(), q.ravel()) / np.linalg.norm(p) / np.linalg.norm(q) for q in grams] for p in grams]
    want = -(np.sum(cos) - 3.0) / 6
    got = FV.diversity("L", 3)({"L": torch.tensor(acts)})
    assert got.tolist() == pytest.approx([want] * 3, rel=1e-9)


def test_unit_values_of_mixed_layers():
    """Hand indexing: image i excites assignment[i]; a conv channel's value is its mean over positions (the map 0,
    1, 2, 3 has mean 1.5, not its max 3), a logit is itself."""
    conv = torch.zeros(3, 2, 2, 2)
    conv[1, 0] = torch.tensor([[0.0, 1.0], [2.0, 3.0]])
    logits = torch.arange(12.0).reshape(3, 4)
    obj = FV.units_objective([("B", 1), ("A", 0), ("B", 3)])
    assert obj({"A": conv, "B": logits}).tolist() == [1.0, 1.5, 11.0]


# ---- the optimisation loop on a linear unit -----------------------------------------------------------


class Linear16(nn.Module):
    """A 4×4 grey image → one number w·x (a 4×4 conv with no bias), at hook_post."""

    input_shape = (1, 4, 4)

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.hook_input = HookPoint()
        self.conv = nn.Conv2d(1, 1, 4, bias=False)
        self.conv.weight.data = w.reshape(1, 1, 4, 4).clone()
        self.hook_post = HookPoint()

    def forward(self, x):
        return self.hook_post(self.conv(self.hook_input(x)))


W = torch.linspace(-1.0, 1.0, 16).reshape(4, 4) * torch.tensor([1.0, -1.0, 1.0, -1.0])  # asymmetric, both signs
LAM = 80.0


def test_render_finds_the_closed_form_optimum_and_scores_untransformed_images():
    """Closed form: maximising w·x − λ·mean((x − 0.5)²) over 16 pixels sets w_i = (λ/8)(x_i − 0.5), so
    x = 0.5 + 8w/λ. The transform mirrors the image before the model, so the optimum drawn is the mirror of it;
    ``final`` is the objective of the image as drawn (not mirrored), computed here in numpy; ``first`` is the
    objective of the seeded starting image (sigmoid of N(0, 0.01²) pixels from the seed), mirrored."""
    m = Linear16(W)
    obj = FV.neuron("hook_post", 0, 0, 0) - LAM * FV.l2(0.5)
    flip = lambda x, g: x.flip(-1)  # noqa: E731
    r = FV.render(m, obj, batch=1, steps=300, param="pixel", lr=0.05, seed=3, transforms=flip, log_every=4)
    want = (0.5 + 8 * W / LAM).flip(-1)
    assert torch.allclose(r.images[0, 0], want, atol=0.01)
    img, w = r.images[0, 0].double().numpy(), W.double().numpy()
    assert r.final.item() == pytest.approx(float((w * img).sum() - LAM * ((img - 0.5) ** 2).mean()), abs=1e-4)
    start = torch.sigmoid(torch.randn((1, 1, 4, 4), generator=torch.Generator().manual_seed(3)) * 0.01).flip(-1)
    s = start[0, 0].double().numpy()
    assert r.first.item() == pytest.approx(float((w * s).sum() - LAM * ((s - 0.5) ** 2).mean()), abs=1e-5)
    assert len(r.history) == 300 // 4 + 1 and r.history[0] == pytest.approx(r.first.item())


def test_history_logs_every_kth_step_and_the_last():
    """Counting: 10 steps logged every 4 are steps 0, 4, 8 and the last, 9: four entries."""
    r = FV.render(Linear16(W), FV.neuron("hook_post", 0, 0, 0), batch=1, steps=10, param="pixel", seed=0,
                  transforms=lambda x, g: x, log_every=4)  # fmt: skip
    assert len(r.history) == 4


def test_a_linear_unit_over_a_box_reaches_its_corners_in_value_range():
    """Closed form: a linear function over the box [lo, hi]^16 is maximal at the corner hi where w > 0 and lo
    where w < 0; with value_range (−1, 3) the images approach 3 and −1 there."""
    r = FV.render(Linear16(W), FV.neuron("hook_post", 0, 0, 0), batch=1, steps=200, param="pixel", lr=0.2, seed=0,
                  transforms=lambda x, g: x, value_range=(-1.0, 3.0))  # fmt: skip
    img = r.images[0, 0]
    assert img[W > 0].min() > 2.8 and img[W < 0].max() < -0.8
    assert img.min() >= -1.0 and img.max() <= 3.0


def test_fourier_spectrum_falls_as_one_over_frequency():
    """Lucid's parameterisation: with every (real) coefficient set to the same small value, the logit of the image
    has the spectrum scale ∝ 1/|f|, so along the first row the columns 1, 2, 3 of an 8×8 image stand in ratio
    1 : 1/2 : 1/3."""
    (params,), image = FV.fourier_image((1, 1, 8, 8), torch.Generator().manual_seed(0))
    with torch.no_grad():
        params.zero_()
        params[..., 0] = 1e-3  # small: the sigmoid stays far from saturation
        p = image()[0, 0].double()
        spec = torch.fft.rfft2(torch.log(p / (1 - p)), norm="ortho").real
    assert [spec[0, 2] / spec[0, 1], spec[0, 3] / spec[0, 1]] == pytest.approx([1 / 2, 1 / 3], rel=1e-4)


# ---- dataset examples and maxima by plain loops -------------------------------------------------------


def test_dataset_examples_over_batches_by_a_plain_loop():
    """Plain loop over 5 images of 2 channels: a channel's value is its max over positions; top highest first,
    bottom lowest first; value_max is the max over all images (across batches of 2) of the mean over positions."""
    x = torch.rand(5, 2, 2, 3, generator=torch.Generator().manual_seed(4)) * 0.5
    x[0, 1] = 0.9  # the highest mean of channel 1, in the first batch; its max is not the highest
    x[3, 1, 0, 0] = 2.0  # the highest max of channel 1, with a lower mean
    ex = FV.dataset_examples(Identity(), x, ["hook_post"], k=3, batch_size=2)["hook_post"]
    for c in range(2):
        maxima = [float(x[i, c].max()) for i in range(5)]
        means = [float(x[i, c].mean()) for i in range(5)]
        assert ex.top[c].tolist() == sorted(range(5), key=lambda i: -maxima[i])[:3]
        assert ex.bottom[c].tolist() == sorted(range(5), key=lambda i: maxima[i])[:3]
        assert float(ex.value_max[c]) == pytest.approx(max(means))
    assert ex.top[1, 0] == 3 and float(ex.value_max[1]) == pytest.approx(0.9)


def test_dataset_max_is_the_highest_map_value_over_images():
    """Plain loop: each image forwarded alone, its map's maximum, the largest of those per channel."""
    torch.manual_seed(0)
    model = CNN(CNNConfig(image_size=16, channels=(3,), kernel_size=3)).eval()
    spec = walk(model)
    x = torch.rand(7, 1, 16, 16, generator=torch.Generator().manual_seed(5))
    want = torch.full((3,), -math.inf)
    for i in range(7):
        _, cache = run_with_cache(model, x[i : i + 1], names=["conv1.hook_post"])
        want = torch.maximum(want, cache["conv1.hook_post"][0].flatten(1).amax(1))
    assert torch.allclose(T.dataset_max(spec, x, batch_size=3)["conv1"], want)


def test_receptive_field_of_a_pooled_output_and_layer_names():
    """Hand arithmetic for the default CNN (5×5 conv, 2×2 pool): position (1, 2) of conv1.hook_out pools conv
    positions rows 2-3, columns 4-5, seeing input rows 2..8 and columns 4..10; at hook_post it sees 1..6, 2..7."""
    spec = walk(CNN())
    assert FV.receptive_field(spec, "conv1.hook_out", 1, 2) == (2, 8, 4, 10)
    assert FV.receptive_field(spec, "conv1.hook_post", 1, 2) == (1, 6, 2, 7)
    assert [FV.short_layer_name(n) for n in ("conv2.hook_post", "hook_logits")] == ["conv2", "logits"]


# ---- stimuli by geometry ------------------------------------------------------------------------------


def test_ring_is_an_outline_of_area_two_pi_r_w():
    """Geometry: an annulus of radius r and width w has area π((r + w/2)² − (r − w/2)²) = 2πrw; the centre is dark."""
    img = render([Stimulus("ring", radius=6.0, centre=(14.2, 13.7))], (28, 28), 2.0)[0, 0]
    assert float(img.sum()) == pytest.approx(2 * math.pi * 6.0 * 2.0, rel=0.03)
    assert float(img[13:15, 13:15].max()) < 0.01


def test_line_end_starts_at_the_centre():
    """By the docstring, a line ending starts at the centre and runs towards its angle: at 0° the pixels of row 14
    right of column 16 are inked, those left of column 12 are dark; its ink is w · (28 − 14) px."""
    img = render([Stimulus("line_end", angle=0.0, centre=(14.0, 14.0))], (28, 28), 2.0)[0, 0]
    assert float(img[13:15, 16:].min()) > 0.99 and float(img[:, :12].max()) < 0.01
    assert float(img.sum()) == pytest.approx(2.0 * 14 + math.pi * 1.0**2 / 2, rel=0.02)  # a round cap at the start


def test_pixels_hold_the_area_they_cover():
    """Area coverage: an edge at 0° through column 14.3 (light to its right) covers 0.7 of pixel column 14, all of
    column 15 and none of column 13, exactly, with a supersample of 4 (the boundary never falls between samples)."""
    img = render([Stimulus("edge", angle=0.0, centre=(14.0, 14.3))], (28, 28), 2.0, supersample=4)[0, 0]
    assert img[:, 13:16].mean(0).tolist() == pytest.approx([0.0, 0.7, 1.0], abs=1e-6)


def test_stroke_width_and_radii_follow_the_docstring():
    """The docstrings: strokes are 2.1 px at 28×28 and never under 1.5; radii are listed for 28×28 and scale with
    the image (doubled at 56×56); a horizontal line of that width across 28 columns holds 28 × 2.1 px of ink."""
    assert stroke_width(28) == pytest.approx(2.1) and stroke_width(10) == 1.5
    r28, r56 = default_radii(28), default_radii(56)
    assert r28 == {"curve": (2.5, 3.5, 5.0, 7.5, 11.0), "blob": (1.0, 1.5, 2.0, 3.0, 4.5, 6.5),
                   "ring": (3.0, 4.5, 6.5, 9.0)}  # fmt: skip
    assert {k: tuple(v / 2 for v in vs) for k, vs in r56.items()} == r28
    line = render([Stimulus("line", angle=0.0, centre=(14.0, 14.0))], (28, 28), stroke_width(28))[0, 0]
    assert float(line.sum()) == pytest.approx(28 * 2.1, rel=1e-3)


def test_positions_sit_on_the_diagonals_of_a_non_square_image_with_jitter_both_ways():
    """By the docstring: the image centre (rows/2, columns/2) and four offsets on the diagonals, each moved by up to
    ``jitter`` px either way (seeded uniform: both signs occur)."""
    stim = draw_stimuli((16, 24), seed=2, jitter=0.5, families=("blob",))
    offs = stim.offsets
    assert offs[0] == (0.0, 0.0) and {(math.copysign(1, a), math.copysign(1, b)) for a, b in offs[1:]} == {
        (-1, -1), (-1, 1), (1, -1), (1, 1)}  # fmt: skip
    assert all(abs(a) == abs(b) > 0 for a, b in offs[1:])
    dev = np.array([[s.centre[0] - 8 - offs[s.position][0], s.centre[1] - 12 - offs[s.position][1]]
                    for s in stim.stimuli])  # fmt: skip
    assert np.abs(dev).max() <= 0.5 and (dev.min(0) < -0.2).all() and (dev.max(0) > 0.2).all()


def test_principal_angle_of_hand_drawn_diagonals():
    """Geometry (y up): ink on (row i, column i) falls to the right, 135°; on (row i, column 7 − i) it rises, 45°."""
    down = torch.eye(8)
    assert principal_angle(down) == pytest.approx(135.0)
    assert principal_angle(down.flip(1)) == pytest.approx(45.0)


# ---- labels at their stated thresholds, from hand-built responses --------------------------------------


def responses(stim, table: dict, default: float = 0.0) -> torch.Tensor:
    """[N, 1]: table[(family, angle, radius, opening)] or ``default``."""
    return torch.tensor([[table.get(s.setting(), default)] for s in stim.stimuli])


def test_drive_of_exactly_half_passes():
    """The docstring: driven when the best image reaches at least half the maximum (≥ 0.5): an edge answering 0.5
    at 90° only, with a maximum of 1, is labelled."""
    stim, grid = hand_set(("edge",))
    u = T.unit_tuning("conv1", 0, stim, grid, *[responses(stim, {("edge", 90.0, None, None): 0.5})] * 2, 0.0, 1.0)
    assert u.tuned and u.drive == 0.5 and u.label == "edge detector, dark→light at 90°"


def blob_unit(values: list[float]):
    stim, grid = hand_set(("blob",))
    radii = sorted(s.radius for s in stim.stimuli)
    r = responses(stim, {("blob", None, q, None): v for q, v in zip(radii, values, strict=True)})
    return radii, T.unit_tuning("conv1", 0, stim, grid, r, r, 0.0, 1.0)


def test_size_falloff_of_exactly_half_is_sharp():
    """The docstring: sharp when 1 − (smallest response at a larger radius) / (response at the preferred radius)
    ≥ 0.5; preferred radius 3rd of 6 at 1.0, the smallest larger response 0.5: 1 − 0.5 = 0.5 passes."""
    radii, u = blob_unit([0.2, 0.3, 1.0, 0.5, 0.75, 0.6])
    assert u.tuned and u.sharpness == 0.5 and u.label == f"blob, radius {radii[2]:g}"


def test_bigger_is_better_is_reported_at_the_largest_radius():
    """The docstring: fall-off is 0 when bigger is always better, and the reason says the unit responds most at the
    largest radius drawn."""
    _, u = blob_unit([0.1, 0.2, 0.3, 0.4, 0.5, 1.0])
    assert not u.tuned and u.sharpness == 0.0
    assert "size fall-off 0.00 < 0.5 (it responds most at the largest radius drawn" in u.reason


def test_lines_at_right_angles_cancel_with_the_second_harmonic():
    """The formula in numpy, k = 2 for lines (period 180°): responses 1 at 0° and 90° give |1 + e^{iπ}| = 0, so
    circular variance 1 (broad); k = 1 would have given 1 − √2/2 ≈ 0.29 and a sharp label. The reason states
    the failed test with its direction."""
    stim, grid = hand_set(("line",))
    r = responses(stim, {("line", 0.0, None, None): 1.0, ("line", 90.0, None, None): 1.0})
    u = T.unit_tuning("conv1", 0, stim, grid, r, r, 0.0, 1.0)
    cv = u.curve("line", "angle")
    y, th = np.array(cv.response), np.radians(cv.x)
    assert cv.circular_variance == pytest.approx(1 - abs((y * np.exp(2j * th)).sum()) / y.sum(), abs=1e-9)
    assert cv.circular_variance == pytest.approx(1.0, abs=1e-9) and not u.tuned
    assert u.reason.startswith("preferred family line: circular variance 1.00 > 0.3")


def test_stronger_families_strongest_first():
    """Known answer: a sharp edge at 0.6 is the label; broad lines (1.0) and line endings (0.9) drive it more and
    are listed strongest first."""
    stim, grid = hand_set(("line", "edge", "line_end"))
    r = torch.tensor([[{"line": 1.0, "line_end": 0.9}.get(s.family, 0.6 * (s.angle == 45.0))] for s in stim.stimuli])
    u = T.unit_tuning("conv1", 0, stim, grid, r, r, 0.0, 1.0)
    assert u.label_family == "edge" and u.stronger() == ["line", "line_end"]
    assert "not labelled for: line (drive 1.00, circular variance 1.00), line_end (drive 0.90" in u.reason


def test_corner_opening_curve_holds_the_preferred_angle():
    """Known answer: a corner unit answering at 120° only, 1.0 at opening 90°, 0.6 at 120°, 0.3 at 60°: its opening
    curve is read at the preferred angle 120° and is (0.3, 1.0, 0.6) over openings (60, 90, 120)."""
    stim, grid = hand_set(("corner",))
    table = {("corner", 120.0, None, o): v for o, v in ((60.0, 0.3), (90.0, 1.0), (120.0, 0.6))}
    u = T.unit_tuning("conv1", 0, stim, grid, *[responses(stim, table)] * 2, 0.0, 1.0)
    op = u.curve("corner", "opening")
    assert op.fixed == {"angle": 120.0} and op.x == (60.0, 90.0, 120.0) and op.response == pytest.approx((0.3, 1, 0.6))
    angle = u.curve("corner", "angle")
    assert angle.fixed == {"opening": 90.0} and T.preferred_angle(angle) == 120.0
    assert u.label == "corner of 90°, opening towards 120°"


def test_a_silent_unit_has_no_drive():
    """Definition: drive is response / maximum; a unit whose maximum over the test images is 0 has none (0)."""
    stim, grid = hand_set(("edge", "blob"))
    z = torch.zeros(len(stim), 1)
    u = T.unit_tuning("conv1", 0, stim, grid, z, z, 0.0, 0.0)
    assert not u.tuned and u.drive == 0.0 and u.reason.startswith("silent")


def test_angles_on_a_circle_and_curvature_words():
    """Arithmetic: 350° and 10° are 20° apart; 10° and 170° are 20° apart as lines (period 180°); an arc of radius 4
    has curvature 1/4 = 0.25."""
    assert T.angle_difference(350.0, 10.0) == 20.0 and T.angle_difference(10.0, 170.0, 180.0) == 20.0
    assert "(curvature 0.25)" in T.label_text(Stimulus("curve", angle=90.0, radius=4.0))


def test_jitter_reaches_every_shift_up_to_d_both_ways():
    """The docstring: a translation by up to d pixels; with d = 1 over 60 seeded draws, a marked centre pixel of a
    3×3 image lands on all 9 positions (shifts −1, 0, 1 in each direction)."""
    x = torch.zeros(1, 1, 3, 3)
    x[0, 0, 1, 1] = 1.0
    g = torch.Generator().manual_seed(0)
    seen = {tuple(torch.nonzero(FV.jitter(1)(x, g)[0, 0])[0].tolist()) for _ in range(60)}
    assert seen == {(r, c) for r in range(3) for c in range(3)}


def test_rotation_at_scale_one_keeps_a_centred_disc_round():
    """Geometry: a rotation about the centre maps a centred disc onto itself, so its second moments stay equal
    (c_rr = c_cc, c_rc = 0) and its ink is kept; a shear or reflection-shear would make it an ellipse."""
    disc = render([Stimulus("blob", radius=8.0, centre=(14.0, 14.0))], (28, 28), 2.0).expand(6, 1, 28, 28)
    out = FV.random_affine((1.0, 1.0), 30.0)(disc, torch.Generator().manual_seed(1))[:, 0].double()
    rows = torch.arange(28, dtype=torch.float64)[:, None] - 13.5
    cols = torch.arange(28, dtype=torch.float64)[None, :] - 13.5
    for img in out:
        m = img.sum()
        crr, ccc, crc = (img * rows**2).sum() / m, (img * cols**2).sum() / m, (img * rows * cols).sum() / m
        assert float(m) == pytest.approx(float(disc[0].sum()), rel=0.01)
        assert abs(float(crr - ccc)) < 0.05 * float(crr) and abs(float(crc)) < 0.05 * float(crr)
