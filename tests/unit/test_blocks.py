"""Building Blocks with known answers: NMF recovers planted factors, the variance curve, group attribution in closed
form, the objectives of the batched feature visualisation, the image choice."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from mechscope.cnn.methods import blocks as B
from mechscope.cnn.methods import blocks_vis as V
from mechscope.cnn.methods import featvis as FV
from mechscope.cnn.methods.group_attribution import components, group_flow, group_scores
from mechscope.cnn.methods.nmf_groups import explained_variance, nmf_curve, nmf_groups
from mechscope.cnn.models.cnn import CNN, CNNConfig
from mechscope.cnn.models.spec import walk
from mechscope.core.errors import MechscopeError
from mechscope.core.outputs import weights_hash


def planted(p=96, c=12, r=4, seed=0):
    """A = W·H with sparse non-negative factors (each group owns a few channels and positions of its own)."""
    rng = np.random.default_rng(seed)
    w = rng.random((p, r)) * (rng.random((p, r)) < 0.35)
    h = rng.random((r, c)) * (rng.random((r, c)) < 0.4)
    for g in range(r):  # an anchor position and channel per group: the factorisation is unique up to scale
        w[g, :], w[g, g] = 0, 1.0
        h[:, g], h[g, g] = 0, 1.0
    return w, h


def best_match(truth: np.ndarray, found: np.ndarray) -> np.ndarray:
    """For each row of ``truth``, the largest correlation with any row of ``found`` (each used once)."""
    from scipy.optimize import linear_sum_assignment

    corr = np.corrcoef(np.vstack([truth, found]))[: len(truth), len(truth) :]
    rows, cols = linear_sum_assignment(-corr)
    return corr[rows, cols]


def test_nmf_recovers_planted_factors_up_to_permutation_and_scale():
    w, h = planted()
    g = nmf_groups(w @ h, "layer", k=4, seed=0)
    assert g.k == 4 and g.chosen_by == "--groups" and g.explained > 0.9999
    assert best_match(h, g.directions).min() >= 0.99
    assert best_match(w.T, g.spatial.T).min() >= 0.99
    assert np.allclose(np.linalg.norm(g.directions, axis=1), 1.0)
    assert list(g.share) == sorted(g.share, reverse=True) and abs(sum(g.share) - 1) < 1e-9


def test_curve_is_monotone_and_reaches_one_at_full_rank():
    rng = np.random.default_rng(1)
    for shape in ((40, 9), (7, 15)):
        a = np.maximum(rng.normal(size=shape), 0)
        fits = nmf_curve(a, seed=0)
        curve = [explained_variance(a, *f) for f in fits]
        assert len(curve) == min(shape)
        assert all(b >= a_ - 1e-12 for a_, b in zip(curve, curve[1:], strict=False))
        assert curve[-1] == pytest.approx(1.0, abs=1e-9)
        assert all((f[0] >= 0).all() and (f[1] >= 0).all() for f in fits)


def test_k_from_threshold_and_negative_share():
    w, h = planted(seed=2)
    a = w @ h
    g = nmf_groups(a, "layer", threshold=0.95, seed=0)
    assert g.curve[g.k - 1] >= 0.95 and (g.k == 1 or g.curve[g.k - 2] < 0.95)
    assert g.chosen_by == "threshold" and g.negative_share == 0.0
    signed = a.copy()
    signed[0, 0] = -2.0
    assert nmf_groups(signed, "layer", k=2).negative_share == pytest.approx(4.0 / (signed**2).sum())
    with pytest.raises(MechscopeError, match="between 1 and 12"):
        nmf_groups(a, "layer", k=13)


def test_explained_variance_of_an_imperfect_fit_is_the_outside_formula():
    """At k = 1 the best non-negative fit of a non-negative matrix is its leading singular pair (Perron-Frobenius),
    so the curve's first value is s₁² / Σ s²: strictly between 0 and 1 on the planted rank-4 matrix; the chosen k is
    the first reaching the threshold (k ≥ 2 here), and the groups' product explains what the curve says."""
    w, h = planted(seed=3)
    a = w @ h
    s = np.linalg.svd(a, compute_uv=False)
    g = nmf_groups(a, "layer", threshold=0.99, seed=0)
    assert 0.2 < g.curve[0] < 0.99 and g.curve[0] == pytest.approx(s[0] ** 2 / (s**2).sum(), abs=1e-6)
    assert g.k >= 2 and g.curve[g.k - 2] < 0.99 <= g.curve[g.k - 1]
    residual = np.linalg.norm(a - g.spatial @ g.directions) ** 2 / np.linalg.norm(a) ** 2
    assert g.explained == pytest.approx(1 - residual, abs=1e-12) and g.explained == g.curve[g.k - 1]
    one = nmf_groups(a, "layer", k=1, seed=0)
    assert one.explained == pytest.approx(s[0] ** 2 / (s**2).sum(), abs=1e-6)


def test_group_attribution_linear_case_is_the_closed_form():
    g = torch.Generator().manual_seed(0)
    c, hh, ww, t, k = 3, 4, 5, 6, 2
    m, bias = torch.randn(t, c * hh * ww, generator=g), torch.randn(t, generator=g)
    a = torch.rand(c, hh, ww, generator=g)
    comps = components(np.random.default_rng(0).random((hh * ww, k)), np.random.default_rng(1).random((k, c)),
                       (c, hh, ww))  # fmt: skip

    def f(x):
        return x.flatten(1) @ m.T + bias

    flow = group_flow(f, a, comps, "src", "dst", tuple("abcdef"))
    closed = (comps.flatten(1) @ m.T).numpy()  # attr(g → t) = M_t · V_g
    np.testing.assert_allclose(flow.attribution, closed, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(flow.removal, closed, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(flow.residual, ((a - comps.sum(0)).flatten() @ m.T).numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(flow.attribution.sum(0) + flow.residual, flow.grad_x_act, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(flow.completeness_gap, 0, atol=1e-4)  # linear: f(a) − f(0) exactly


def test_group_scores_read_the_group_back():
    comps = components(np.array([[1.0, 0.0], [0.5, 2.0]]), np.array([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]), (3, 1, 2))
    s = group_scores(comps[:1], comps)  # group 1's component alone
    assert s[0, 0].item() == pytest.approx(1.0) and s[0, 1].item() == pytest.approx(0.0)
    assert group_scores(torch.zeros(1, 3, 1, 2), torch.zeros(2, 3, 1, 2)).abs().sum() == 0


def tiny_spec(channels=(4, 6)):
    torch.manual_seed(0)
    return walk(CNN(CNNConfig(channels=channels, image_size=16, kernel_size=3, n_classes=3)).eval())


def test_flows_on_a_cnn_sum_to_the_change_at_the_linear_readout():
    spec = tiny_spec()
    x = torch.rand(1, 1, 16, 16)
    _, acts = B.stage_activations(spec, x)
    layers = [B.analyse_layer(spec, s, acts[s.name], [0], 2, 0.9, 0, 12, 3) for s in spec.stages]
    sel = B.Selection((0,), (0,), (1,), (1,), (0.5,), "test")
    flows = B.image_flows(spec, layers, sel, ("a", "b", "c"))
    assert [(f.source, f.target) for f in flows] == [("conv1", "conv2"), ("conv2", "logits")]
    last = flows[-1]
    np.testing.assert_allclose(last.grad_x_act, last.actual_change, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(last.attribution, last.removal, rtol=1e-4, atol=1e-4)
    assert flows[0].attribution.shape == (2, 2)


def test_objectives_per_image():
    spec = tiny_spec()
    v = torch.rand(4)
    entries = [("channel", "conv1.hook_post", 2), ("centre", "conv1.hook_out", v), ("mean", "conv1.hook_out", v)]
    obj = V.blocks_objective(entries)
    act = torch.rand(3, 4, 7, 7)
    post = torch.rand(3, 4, 14, 14)
    got = obj({"conv1.hook_post": post, "conv1.hook_out": act})
    assert got[0] == pytest.approx(float(post[0, 2].mean()))
    a = act[1, :, 3, 3]
    cos = float(a @ v) / float(a.norm() * v.norm() + 1e-6)
    assert got[1] == pytest.approx(float(a @ v) * max(cos, 0.1) ** 2, rel=1e-5)
    per = [(float(act[2, :, i, j] @ v), act[2, :, i, j].norm() * v.norm()) for i in range(7) for j in range(7)]
    mean = np.mean([d * max(d / (float(n) + 1e-6), 0.1) ** 2 for d, n in per])
    assert got[2] == pytest.approx(mean, rel=1e-5)
    assert obj.names == {"conv1.hook_post", "conv1.hook_out"}
    assert spec.stage("conv1").hook_out in FV.hook_points(spec.model)


def test_select_images_typical_and_errors():
    spec = tiny_spec()
    with torch.no_grad():  # large read-out weights: the random images fall in every class
        spec.readout.fc.weight.normal_(0, 3, generator=torch.Generator().manual_seed(0))
    x = torch.rand(30, 1, 16, 16)
    logits, _ = B.stage_activations(spec, x)
    y = logits.argmax(1)  # every image correct
    assert len(set(y.tolist())) == 3
    sel = B.select_images(spec, x, y, None, 1)
    prob = torch.softmax(logits, 1).max(1).values
    for c, i in zip(sel.labels, sel.images, strict=True):
        assert i == int(torch.where(y == c, prob, torch.tensor(-1.0)).argmax())
    assert sel.shown == sel.images and sel.labels == tuple(sorted(set(y.tolist())))
    with pytest.raises(MechscopeError, match="out of range"):
        B.select_images(spec, x, y, 30, None)
    with pytest.raises(MechscopeError, match="exclude"):
        B.select_images(spec, x, y, 1, 1)
    with pytest.raises(MechscopeError, match="correctly classified"):
        B.select_images(spec, x, y, None, 30)


def test_check_groups_and_grid_cells():
    spec = tiny_spec((4, 6))
    B.check_groups(spec, 1, 4)
    with pytest.raises(MechscopeError, match="at least 1"):
        B.check_groups(spec, 1, 0)
    with pytest.raises(MechscopeError, match="conv1 has only 4 channels"):
        B.check_groups(spec, 1, 5)
    assert B.grid_cells(torch.rand(5, 24, 24), 12).shape == (144, 5)
    assert B.grid_cells(torch.rand(5, 4, 4), 12).shape == (16, 5)
    act = torch.arange(16.0).view(1, 4, 4)
    assert B.grid_cells(act, 2)[:, 0].tolist() == [2.5, 4.5, 10.5, 12.5]


def test_channel_images_reused_only_for_the_same_weights(tmp_path):
    spec = tiny_spec()
    sha = weights_hash(spec.model)
    assign = [("conv1.hook_post", c) for c in range(4)] + [("conv2.hook_post", 0)]
    images = torch.rand(5, 1, 16, 16)
    V.save_for_blocks(tmp_path, spec.model, spec, assign, images)
    got = V.load_channel_images(tmp_path / V.CHANNEL_IMAGES, sha, {"conv1.hook_post": 4})
    assert torch.equal(got["conv1.hook_post"], images[:4])
    assert V.load_channel_images(tmp_path / V.CHANNEL_IMAGES, sha, {"conv2.hook_post": 6}) is None  # incomplete
    other = nn.Linear(2, 2)
    assert V.load_channel_images(tmp_path / V.CHANNEL_IMAGES, weights_hash(other), {"conv1.hook_post": 4}) is None


def test_distinct_vectors_and_truncated_network():
    v = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [2.0, 2.0], [0.0, 1.0 + 1e-9]])
    first, back = V.distinct(v)
    assert first.tolist() == [0, 1, 3] and torch.equal(v[first][back], v[[0, 1, 0, 3, 1]])
    spec = tiny_spec()
    net = V.Truncated(spec, "conv1.hook_out")
    x = torch.rand(2, 1, 16, 16)
    _, acts = B.stage_activations(spec, x)
    assert torch.allclose(net(x), acts["conv1"])
    assert set(FV.hook_points(net)) == {"hook_input", "conv1.hook_pre", "conv1.hook_post", "conv1.hook_out"}
    assert set(FV.hook_points(spec.model)) >= {"conv2.hook_out", "hook_logits"}  # the model's names unchanged


def test_a_users_sequential_model_through_the_blocks_steps():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 5, 3), nn.GELU(),
                        nn.Flatten(), nn.Linear(5 * 5 * 5, 3))  # fmt: skip
    spec = walk(net.eval(), (3, 16, 16))
    x = torch.rand(2, 3, 16, 16)
    _, acts = B.stage_activations(spec, x)
    assert torch.allclose(V.Truncated(spec, "conv2.hook_out")(x), acts["conv2"], atol=1e-6)
    layers = [B.analyse_layer(spec, s, acts[s.name][:1], [0], 2, 0.9, 0, 4, 2) for s in spec.stages]
    images = V.visualise_blocks(spec, layers, steps=2, seed=0, vrange=(0.0, 1.0))
    assert images["groups"]["conv2"].shape == (2, 3, 16, 16) and images["channels"]["conv1"].shape == (4, 3, 16, 16)
    flows = B.image_flows(spec, layers, B.Selection((0,), (0,), (0,), (0,), (1.0,), "t"), ("a", "b", "c"))
    np.testing.assert_allclose(flows[-1].grad_x_act, flows[-1].actual_change, rtol=1e-4, atol=1e-4)
    with pytest.raises(MechscopeError, match="no positive activation"):
        nmf_groups(np.zeros((4, 3)), "conv9.hook_out")
