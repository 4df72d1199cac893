"""Tuning curves on synthetic stimuli: the stimuli by construction, circular variance by hand, and known answers
(oriented edge kernels written into conv1 are labelled with their angle; flat and random kernels are not)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from mechscope.cnn.methods import tuning as T
from mechscope.cnn.methods.stimuli import Stimulus, draw_stimuli, principal_angle, render
from mechscope.cnn.models.cnn import CNN, CNNConfig
from mechscope.cnn.models.spec import walk
from mechscope.core.errors import MechscopeError
from mechscope.core.hooks import attached_hooks


@pytest.fixture(scope="module")
def stim28():
    return draw_stimuli(28, seed=0)


# ---- circular variance and size fall-off by hand ---------------------------------------------


def test_circular_variance_hand_values():
    lines = np.arange(0, 180, 15)
    edges = np.arange(0, 360, 15)
    one = np.zeros(12)
    one[4] = 3.0
    assert T.circular_variance(one, lines, 2) == pytest.approx(0.0, abs=1e-12)
    assert T.circular_variance(np.ones(12), lines, 2) == pytest.approx(1.0, abs=1e-12)
    assert T.circular_variance(np.ones(24), edges, 1) == pytest.approx(1.0, abs=1e-12)
    # two opposite edge angles cancel on the circle (k = 1) but are the same line (k = 2)
    two = np.zeros(24)
    two[[0, 12]] = 1.0
    assert T.circular_variance(two, edges, 1) == pytest.approx(1.0, abs=1e-12)
    assert T.circular_variance(two, edges, 2) == pytest.approx(0.0, abs=1e-12)
    # a half-wave rectified cosine: 1 - pi/4 in the continuum
    rect = np.clip(np.cos(np.radians(edges - 90)), 0, None)
    assert T.circular_variance(rect, edges, 1) == pytest.approx(1 - math.pi / 4, abs=0.01)
    assert T.circular_variance(1 + np.cos(np.radians(edges)), edges, 1) == pytest.approx(0.5, abs=1e-9)
    # negative responses count as zero; nothing at all is untuned
    assert T.circular_variance(np.where(one > 0, 1.0, -5.0), lines, 2) == pytest.approx(0.0, abs=1e-12)
    assert T.circular_variance(np.zeros(12), lines, 2) == 1.0


def test_size_falloff_hand_values():
    assert T.size_falloff([1, 4, 2, 0.5], 1) == pytest.approx(1 - 0.5 / 4)
    assert T.size_falloff([1, 2, 3, 4], 3) == 0.0  # the largest is best: no fall-off to see
    assert T.size_falloff([0, 0, 0], 0) == 0.0


# ---- the stimuli -------------------------------------------------------------------------------


def test_stimuli_are_antialiased_and_in_range(stim28):
    x = stim28.images
    assert x.shape == (len(stim28.stimuli), 1, 28, 28) and x.dtype == torch.float32
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    for family in ("line", "edge", "curve", "line_end", "corner", "blob", "ring"):
        i = next(j for j, s in enumerate(stim28.stimuli) if s.family == family)
        img = x[i, 0]
        partial = ((img > 0.02) & (img < 0.98)).sum()
        assert partial >= 4, family  # grey pixels along the boundary
        assert float(img.max()) > 0.9, family
    # area coverage: a disc's pixels sum to its area
    for r in (1.0, 2.5, 4.0):
        disc = render([Stimulus("blob", radius=r, centre=(14.3, 13.8))], (28, 28), 2.0, supersample=4)
        assert float(disc.sum()) == pytest.approx(math.pi * r * r, rel=0.03)


def test_lines_rotate_and_edges_face_their_angle(stim28):
    lines = [(s, stim28.images[i]) for i, s in enumerate(stim28.stimuli) if s.family == "line" and s.position == 0]
    assert len(lines) == 12
    for s, img in lines:
        d = abs(principal_angle(img) - s.angle) % 180
        assert min(d, 180 - d) < 1.0, (s.angle, principal_angle(img))
    h, w = stim28.size
    yy, xx = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    for i, s in enumerate(stim28.stimuli):
        if s.family != "edge" or s.position != 0:
            continue
        img = stim28.images[i, 0]
        # dark -> light points in direction `angle` (y up): the mean gradient within a disc around the centre
        disc = (((yy - s.centre[0]) ** 2 + (xx - s.centre[1]) ** 2) < 10**2)[1:-1, 1:-1].float()
        gx = float(((img[1:-1, 2:] - img[1:-1, :-2]) * disc).sum())
        gy = float((-(img[2:, 1:-1] - img[:-2, 1:-1]) * disc).sum())
        seen = math.degrees(math.atan2(gy, gx)) % 360
        assert T.angle_difference(seen, s.angle) < 2, (s.angle, seen)


def test_stimuli_are_seeded():
    a, b, c = draw_stimuli(16, seed=3), draw_stimuli(16, seed=3), draw_stimuli(16, seed=4)
    assert torch.equal(a.images, b.images) and a.stimuli == b.stimuli
    assert not torch.equal(a.images, c.images)
    assert a.counts() == c.counts() and a.counts()["line"] == 12 * 5 and a.counts()["edge"] == 24 * 5
    for bad in (-1, 2**63, 1.5, True):
        with pytest.raises(MechscopeError, match="--seed"):
            draw_stimuli(16, seed=bad)


# ---- known answers -------------------------------------------------------------------------------


def edge_kernel(deg: float, k: int = 5, sigma: float = 1.2) -> torch.Tensor:
    """A derivative of a Gaussian: positive on the side that lies in direction ``deg`` (y up)."""
    r = torch.arange(k, dtype=torch.float32) - (k - 1) / 2
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    x, y = xx, -yy
    a = math.radians(deg)
    g = (x * math.cos(a) + y * math.sin(a)) * torch.exp(-(x**2 + y**2) / (2 * sigma**2))
    return g / g.abs().sum()


@pytest.fixture(scope="module")
def known(mnist):
    """The default CNN with conv1's kernels overwritten: edges at 0, 45, 90, 200°, one flat, six random."""
    torch.manual_seed(0)
    model = CNN().eval()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        w, b = model.conv1.conv.weight, model.conv1.conv.bias
        b.zero_()
        for c, deg in enumerate((0, 45, 90, 200)):
            w[c, 0] = edge_kernel(deg)
        w[4, 0] = 0.04
        for c in range(5, 11):
            w[c, 0] = torch.randn(5, 5, generator=g) * 0.2
    spec = walk(model)
    x = mnist.to_float(mnist.test_images[:2000])
    stim = draw_stimuli(28, seed=0)
    return model, T.tuning(spec, stim, T.dataset_max(spec, x))


def test_oriented_edge_kernels_get_their_angle(known):
    model, r = known
    units = r.stage("conv1").units
    for c, deg in enumerate((0, 45, 90, 200)):
        u = units[c]
        assert u.tuned and u.label_family == "edge", (deg, u.label, u.reason)
        assert T.angle_difference(u.label_stimulus.angle, deg) <= 15, (deg, u.label)
        assert u.label.startswith("edge detector, dark→light at")
        edge = u.curve("edge", "angle")
        assert edge.circular_variance < 0.25  # a rectified cosine: 0.21
        assert T.angle_difference(T.preferred_angle(edge), deg) <= 15
        assert u.drive > 0.9  # an edge is what such a kernel likes best: as much as any test image
    assert not attached_hooks(model)


def test_flat_and_random_kernels_are_not_labelled(known):
    _, r = known
    units = r.stage("conv1").units
    flat = units[4]
    assert not flat.tuned and flat.label == T.NOT_TUNED
    assert flat.curve("edge", "angle").circular_variance > 0.9  # every edge lights it alike
    for c in range(5, 11):
        assert not units[c].tuned, (c, units[c].label, units[c].reason)
        assert units[c].reason  # the numbers that failed
    # results are typed and serialise to plain JSON
    d = r.to_dict()
    assert d["stages"][0]["units"][0]["preferred"]["family"] in ("edge", "blob", "line", "corner", "curve")
    assert "images" not in d["stimuli"] and d["stimuli"]["counts"]["curve"] == 5 * 24 * 5


def test_centre_positions_follow_the_receptive_field():
    model = CNN(CNNConfig(channels=(4, 8), kernel_size=5))
    spec = walk(model)
    for s in spec.stages:
        h, w = s.shape_post[1:]
        sts = [Stimulus("blob", radius=2, centre=(cy, cx)) for cy in (9.2, 14.0, 18.7) for cx in (10.1, 14.0, 17.6)]
        pos = T.centre_positions(s, sts, (h, w))
        for st, (py, px) in zip(sts, pos.tolist(), strict=True):
            for a, p in ((0, py), (1, px)):
                centre = s.rf_post.start[a] + p * s.rf_post.jump[a] + s.rf_post.size[a] / 2
                assert abs(centre - st.centre[a]) <= s.rf_post.jump[a] / 2 + 1e-9


def test_any_network_three_channels_gelu_batchnorm_and_a_wrapped_sequential():
    torch.manual_seed(0)
    model = CNN(CNNConfig(in_channels=3, image_size=16, channels=(4, 8, 8), kernel_size=3, padding=1,
                          batchnorm=True, activation="gelu", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)))  # fmt: skip
    model.eval()
    spec = walk(model)
    images = torch.rand(64, 3, 16, 16)
    stim = draw_stimuli(16, seed=1)
    r = T.tuning(spec, stim, T.dataset_max(spec, images), (0.0, 1.0))
    assert [len(s.units) for s in r.stages] == [4, 8, 8]
    assert r.stages[0].units[0].preferred_image.shape == (1, 16, 16)
    x = T.model_inputs(stim, (3, 16, 16), (-1.0, 2.0))
    assert x.shape[1] == 3 and torch.equal(x[:, 0], x[:, 2]) and float(x.min()) == -1.0 and float(x.max()) == 2.0
    seq = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(3 * 7 * 7, 2)).eval()
    sspec = walk(seq, (1, 16, 16))
    rs = T.tuning(sspec, stim, T.dataset_max(sspec, torch.rand(32, 1, 16, 16)))
    assert len(rs.stages[0].units) == 3 and all(u.label for u in rs.units)
    with pytest.raises(MechscopeError, match="stimuli are 16×16; the model takes 28×28"):
        T.tuning(walk(CNN()), stim, {"conv1": torch.ones(16), "conv2": torch.ones(32)})
