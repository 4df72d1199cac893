"""Building Blocks, NMF groups, CNN sparse dictionaries and the CNN replacement model against outside truths:
activations from plain torch forward passes, projections / cell averages / shares / means written out in numpy,
sklearn's own NMF, a hand-built net with planted anti-correlated channels, receptive-field centres by hand."""

from __future__ import annotations

import dataclasses
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from mechscope.cnn.methods import blocks as B
from mechscope.cnn.methods import sae as S
from mechscope.cnn.methods.group_attribution import flows_for_image
from mechscope.cnn.methods.nmf_groups import explained_variance, nmf_groups
from mechscope.cnn.methods.replacement import receptive_centres
from mechscope.cnn.models.cnn import CNN, CNNConfig
from mechscope.cnn.models.spec import walk
from mechscope.core.dictionaries import DictionaryConfig, SparseDictionary
from tests.unit.test_blocks import planted, tiny_spec
from tests.unit.test_sae_cnn import identity_sae, images, tiny_cnn

pytestmark = pytest.mark.usefixtures("one_thread")

H, W = 6, 10  # a non-square map: a swapped y/x or a transposed position order shows


def gelu_net() -> tuple[nn.Sequential, object]:
    """One 3x3 conv stage (padding 1) with GELU on 6x10 images: channel 2's kernel is minus channel 0's, so at every
    position one of the two is negative (GELU's tail) while the other is positive."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.GELU(), nn.Flatten(), nn.Linear(3 * H * W, 2)).eval()
    with torch.no_grad():
        net[0].weight[2] = -net[0].weight[0]
        net[0].bias[2] = -net[0].bias[0]
    return net, walk(net, (1, H, W))


def plain_acts(net, x) -> np.ndarray:
    """The stage's output by calling the torch modules directly (no mechscope hooks)."""
    with torch.no_grad():
        return net[1](net[0](x)).numpy().astype(np.float64)


def numpy_examples(acts: np.ndarray, d: np.ndarray, k: int):
    """Per group: the k images with the largest max_p <a+[:, p], d_g>, their values and best (y, x)."""
    a = np.maximum(acts, 0)
    proj = np.einsum("bchw,gc->gbhw", a, d).reshape(len(d), len(a), -1)  # [G, N, H*W]
    best, where = proj.max(2), proj.argmax(2)
    top = np.argsort(-best, axis=1, kind="stable")[:, :k]
    vals = np.take_along_axis(best, top, 1)
    pos = np.take_along_axis(where, top, 1)
    return top, vals, np.stack([pos // acts.shape[3], pos % acts.shape[3]], -1)


def test_group_examples_and_their_boxes_against_numpy_on_a_signed_layer():
    """Truth: the projections max_p <max(a, 0)[:, p], d_g> written in numpy on the activations of a plain torch
    forward (negative GELU values clipped, as the docstring says), best position (y, x) = divmod(p, W) of a 6x10
    map, and the receptive field of a padded 3x3 conv by hand: rows y-1..y+1, columns x-1..x+1, clipped."""
    net, spec = gelu_net()
    x = torch.randn(23, 1, H, W, generator=torch.Generator().manual_seed(1))
    acts = plain_acts(net, x)
    assert (acts < 0).any(axis=1).all()  # every position has a negative channel: the clipping matters
    d = np.array([[1.0, 0.0, 1.0], [0.2, 1.0, 0.5]])
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    top_i, top_v, pos = B.group_examples(spec, x, {"conv1": d}, k=5, batch=7)["conv1"]
    t_i, t_v, t_pos = numpy_examples(acts, d, 5)
    np.testing.assert_array_equal(top_i.numpy(), t_i)
    np.testing.assert_allclose(top_v.numpy(), t_v, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(pos.numpy(), t_pos)

    _, st = B.stage_activations(spec, x[:4])
    lb = B.analyse_layer(spec, spec.stages[0], st["conv1"], [0], 2, 0.9, 0, 4, 2)
    (lb,) = B.attach_examples(spec, [lb], x, k=5)
    t_i, t_v, t_pos = numpy_examples(acts, lb.groups.directions, 5)
    np.testing.assert_array_equal(lb.example_images, t_i)
    np.testing.assert_allclose(lb.example_values, t_v, rtol=1e-5, atol=1e-6)
    boxes = [[(max(y - 1, 0), min(y + 2, H), max(xx - 1, 0), min(xx + 2, W)) for y, xx in row] for row in t_pos]
    np.testing.assert_array_equal(lb.example_boxes, np.array(boxes))


def adaptive_cells(a: np.ndarray, out: tuple[int, int]) -> np.ndarray:
    """[C, H, W] -> [gh*gw, C]: adaptive average pooling by its definition (bin i covers floor(i*H/gh) ..
    ceil((i+1)*H/gh))."""
    c, h, w = a.shape
    gh, gw = out
    cells = []
    for i in range(gh):
        for j in range(gw):
            y0, y1 = (i * h) // gh, -((-(i + 1) * h) // gh)
            x0, x1 = (j * w) // gw, -((-(j + 1) * w) // gw)
            cells.append(a[:, y0:y1, x0:x1].mean((1, 2)))
    return np.array(cells)


def test_analyse_layer_rows_cells_and_dictionary_by_hand():
    """Truth: numpy. At full rank the groups reproduce the clipped activations laid out positions x channels
    (row i*H*W + y*W + x); the grid cells are adaptive-average-pool bins by definition; the strongest channels,
    their values and the cell norms by np.argsort / np.linalg.norm; the crop is the centre position's field."""
    net, spec = gelu_net()
    x = torch.randn(3, 1, H, W, generator=torch.Generator().manual_seed(2))
    acts = plain_acts(net, x)
    _, st = B.stage_activations(spec, x)
    lb = B.analyse_layer(spec, spec.stages[0], st["conv1"], [1, 2], 3, 0.9, 0, 4, 2)
    flat = np.maximum(acts, 0).transpose(0, 2, 3, 1).reshape(-1, 3)
    assert lb.groups.explained == pytest.approx(1.0, abs=1e-9)
    np.testing.assert_allclose(lb.groups.spatial @ lb.groups.directions, flat, atol=1e-5)
    assert lb.grid == (4, 4) and lb.shape == (3, H, W)
    cells = np.stack([adaptive_cells(acts[i], (4, 4)) for i in (1, 2)])  # [2, 16, 3]
    np.testing.assert_allclose(lb.cells.numpy(), cells, atol=1e-5)
    np.testing.assert_allclose(lb.cell_norms, np.linalg.norm(cells, axis=2), rtol=1e-5, atol=1e-6)
    order = np.argsort(-cells, axis=2, kind="stable")[..., :2]
    np.testing.assert_array_equal(lb.top_channels, order)
    np.testing.assert_allclose(lb.top_values, np.take_along_axis(cells, order, 2), atol=1e-5)
    assert lb.crop == (2, 5, 4, 7)  # position (3, 5) sees rows 2..4, columns 4..6


def test_image_flows_use_each_images_own_groups_toward_the_linear_readout():
    """Truth: the closed form of the last flow through a linear read-out, attribution[g, t] = <V_g, W_fc[t]>
    (V_g = that image's spatial column ⊗ direction g, reshaped [C, H, W]), each class column averaged over the
    images of that class (class 2 has none: over all), written in numpy from the fc weights."""
    spec = tiny_spec()
    x = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    _, acts = B.stage_activations(spec, x)
    layers = [B.analyse_layer(spec, s, acts[s.name], [0], 2, 0.9, 0, 12, 3) for s in spec.stages]
    sel = B.Selection((0, 1), (0,), (0, 1), (0, 1), (0.5, 0.5), "test")
    last = B.image_flows(spec, layers, sel, ("a", "b", "c"))[-1]
    lb = layers[-1]
    c, h, w = lb.shape
    fc = spec.readout.fc.weight.detach().numpy().astype(np.float64)  # [3, C*H*W]
    per = []
    for i in range(2):
        sp = lb.groups.spatial[i * h * w : (i + 1) * h * w]  # [H*W, k]
        v = np.einsum("pg,gc->gcp", sp, lb.groups.directions).reshape(lb.groups.k, c * h * w)
        per.append(v @ fc.T)  # [k, 3]
    truth = np.stack([per[0][:, 0], per[1][:, 1], (per[0][:, 2] + per[1][:, 2]) / 2], 1)
    np.testing.assert_allclose(last.attribution, truth, rtol=1e-4, atol=1e-5)


def test_image_flows_of_two_identical_images_are_the_one_images_flows():
    """Truth: averaging copies changes nothing: the flows over two copies of one image (same groups) equal
    ``flows_for_image`` on it with its own default divisors ‖V'_h‖², not twice them."""
    spec = tiny_spec()
    x = torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(4))
    _, acts = B.stage_activations(spec, x)
    one = [B.analyse_layer(spec, s, acts[s.name], [0], 2, 0.9, 0, 12, 3) for s in spec.stages]
    two = [dataclasses.replace(lb, acts=torch.cat([lb.acts, lb.acts]),
                               groups=dataclasses.replace(lb.groups, spatial=np.vstack([lb.groups.spatial] * 2)))
           for lb in one]  # fmt: skip
    flows = B.image_flows(spec, two, B.Selection((0, 0), (0,), (1, 1), (1, 1), (0.5, 0.5), "t"), ("a", "b", "c"))
    comps = {}
    for lb in one:  # V_g = spatial column ⊗ direction, [k, C, H, W], by hand
        v = np.einsum("pg,gc->gcp", lb.groups.spatial, lb.groups.directions).reshape(lb.groups.k, *lb.shape)
        comps[lb.stage] = torch.as_tensor(v, dtype=torch.float32)
    own = flows_for_image(spec, {lb.stage: lb.acts[0] for lb in one}, comps, ("a", "b", "c"))
    for got, ref in zip(flows, own, strict=True):
        np.testing.assert_allclose(got.attribution, ref.attribution, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(got.removal, ref.removal, rtol=1e-4, atol=1e-6)


def test_select_images_shows_the_most_typical_of_each_class():
    """Truth: softmax of the plain model's logits; per class, the correctly classified images sorted by their
    class's probability, and the grid/dictionary shown for the most probable one."""
    spec = tiny_spec()
    with torch.no_grad():
        spec.readout.fc.weight.normal_(0, 3, generator=torch.Generator().manual_seed(0))
    x = torch.rand(40, 1, 16, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        prob = torch.softmax(spec.model(x), 1)
    y = prob.argmax(1)
    sel = B.select_images(spec, x, y, None, 2)
    for c in range(3):
        mine = (y == c).nonzero().flatten()
        ranked = mine[prob[mine, c].argsort(descending=True)][:2].tolist()
        assert list(sel.images[2 * c : 2 * c + 2]) == ranked
        assert sel.shown[c] == ranked[0]
    np.testing.assert_allclose(sel.probabilities, [float(prob[i, y[i]]) for i in sel.images], rtol=1e-5)


def test_check_groups_counts_the_positions_of_every_image():
    """Truth: the rule 1 ≤ K ≤ min(C, n·H·W) over the stacked images; sklearn's NMF fits K = 5 groups to conv2's
    2 images × 2×2 positions × 8 channels, so --groups 5 with two images is allowed."""
    from sklearn.decomposition import NMF

    spec = tiny_spec((8, 8))
    x = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(6))
    _, acts = B.stage_activations(spec, x)
    flat = acts["conv2"].permute(0, 2, 3, 1).reshape(-1, 8).numpy()
    assert flat.shape == (8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert NMF(n_components=5, init="nndsvda", max_iter=50).fit_transform(flat).shape == (8, 5)
    B.check_groups(spec, 2, 5)  # must not raise
    with pytest.raises(Exception, match="at most 8 groups"):
        B.check_groups(spec, 2, 9)


def test_group_shares_are_the_frobenius_norms_of_the_rank_one_parts():
    """Truth: share_g = ‖W_g ⊗ H_g‖²_F / Σ_h ‖W_h ⊗ H_h‖²_F from numpy outer products of the returned factors
    (scale-invariant), groups sorted by it; the planted directions have very different norms."""
    w, h = planted(seed=4)
    h = h * np.array([[0.1], [1.0], [5.0], [20.0]])
    g = nmf_groups(w @ h, "layer", k=4, seed=0)
    sizes = np.array([np.linalg.norm(np.outer(g.spatial[:, i], g.directions[i])) ** 2 for i in range(4)])
    np.testing.assert_allclose(g.share, sizes / sizes.sum(), rtol=1e-6)
    assert list(np.argsort(-sizes, kind="stable")) == [0, 1, 2, 3]


def test_curve_runs_to_095_and_is_no_worse_than_sklearns_fresh_fits():
    """Truth: sklearn's NMF (same solver settings) fitted afresh at each k, explained variance 1 − ‖A−WH‖²/‖A‖² in
    numpy; the curve goes on to the first k reaching 0.95 even when the threshold is lower."""
    from sklearn.decomposition import NMF

    w, h = planted(seed=5, r=5, c=14)
    a = w @ h
    g = nmf_groups(a, "layer", threshold=0.3, seed=0)
    assert g.curve[-1] >= 0.95 and all(v < 0.95 for v in g.curve[:-1])
    assert g.k == next(i + 1 for i, v in enumerate(g.curve) if v >= 0.3)
    for k, value in enumerate(g.curve, 1):
        m = NMF(n_components=k, init="nndsvda", solver="cd", tol=1e-6, max_iter=1000, random_state=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wk = m.fit_transform(a)
        ev = 1 - ((a - wk @ m.components_) ** 2).sum() / (a**2).sum()
        assert value >= ev - 1e-9 and explained_variance(a, wk, m.components_) == pytest.approx(ev, abs=1e-12)


def test_latent_and_channel_means_per_image_by_hand():
    """Truth: an identity SAE (latent j = relu(channel j), latent C+j = relu(−channel j)) on conv2's output read
    with a plain torch forward hook: each latent's mean over an image's 16 positions, and each channel's, in
    numpy."""
    model = tiny_cnn(6)
    spec = walk(model)
    x = images(5, 7)
    got = {}
    handle = model.conv2.register_forward_hook(lambda m, i, o: got.__setitem__("a", o.detach()))
    with torch.no_grad():
        model(x)
    handle.remove()
    a = got["a"].numpy().astype(np.float64)  # [5, 6, 4, 4]
    acts = S.activations(spec, x, "conv2.hook_out", batch=2)
    np.testing.assert_allclose(S.channel_means(acts).numpy(), a.mean((2, 3)), rtol=1e-5, atol=1e-7)
    lat = S.latent_activations(identity_sae(6), acts, batch=3)
    means = S.latent_means(lat, 5).numpy()
    truth = np.concatenate([np.maximum(a, 0).mean((2, 3)), np.maximum(-a, 0).mean((2, 3))], 1)
    np.testing.assert_allclose(means, truth, rtol=1e-5, atol=1e-7)


def scaled_dictionary() -> SparseDictionary:
    cfg = DictionaryConfig(d_in=6, d_sae=8, normalize_activations="expected_average_only_in")
    d = SparseDictionary(cfg, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        d.in_scale.fill_(2.5)
        d.out_scale.fill_(2.5)
        d.b_dec.copy_(torch.linspace(-0.3, 0.4, 6))
    return d.eval()


def test_encoder_directions_and_class_effects_are_in_raw_units():
    """Truth: finite differences on the scaled dictionary's own raw-unit maps, z(e_c) − z(0) (encoder) and
    decode(e_j) − decode(0) (decoder), and the class effect as the change of the plain nn.Linear read-out when the
    decoder direction is added at every position of conv2's map, centred over the classes."""
    d = scaled_dictionary()
    with torch.no_grad():
        z = d.pre_activations(d.normalise_input(torch.cat([torch.zeros(1, 6), torch.eye(6)])))
        enc = (z[1:] - z[:1]).T  # [8, 6]
        dec = d.decode(torch.eye(8)) - d.decode(torch.zeros(1, 8))  # [8, 6]
    np.testing.assert_allclose(S.encoder_directions(d).numpy(), enc.numpy(), rtol=1e-5, atol=1e-6)
    model = tiny_cnn(7)
    spec = walk(model)
    a = torch.rand(1, 6, 4, 4)
    with torch.no_grad():
        base = model.fc(a.flatten(1))[0]
        change = torch.stack([model.fc((a + dec[j].view(1, 6, 1, 1)).flatten(1))[0] - base for j in range(8)])
    truth = change - change.mean(1, keepdim=True)
    np.testing.assert_allclose(S.class_effects(spec, d, "conv2.hook_out").numpy(), truth.numpy(), atol=1e-5)


@pytest.mark.parametrize(
    ("config", "sae", "transcoder"),
    [
        (CNNConfig(), [(2.5, 2, 12), (7.5, 4, 4)], [(2.0, 1, 24), (6.5, 2, 8)]),
        (CNNConfig(image_size=16, kernel_size=3, padding=1), [(0.5, 2, 8), (1.5, 4, 4)], [(0.0, 1, 16), (0.5, 2, 8)]),
    ],
)
def test_receptive_centres_by_hand_and_by_the_walked_fields(config, sae, transcoder):
    """Truth: receptive-field arithmetic by hand (a k×k valid conv moves position 0's centre to (k−1)/2 − padding
    pixels; a 2×2 pool adds half a jump and doubles it), and the centre start + (size − 1)/2 of the receptive
    fields ``walk`` finds for each stage's output."""
    torch.manual_seed(0)
    model = CNN(config).eval()
    assert receptive_centres(model, "sae") == sae
    assert receptive_centres(model, "transcoder") == transcoder
    spec = walk(model)
    for s, (start, jump, size) in zip(spec.stages, sae, strict=True):
        rf = s.rf_out
        assert rf.start[0] + (rf.size[0] - 1) / 2 == start and rf.jump[0] == jump and s.shape_out[1] == size


@pytest.mark.parametrize("hook", ["conv2.hook_out", "conv1.hook_post"])
def test_tuning_labels_read_each_units_strongest_position_and_the_blank_image(monkeypatch, hook):
    """Truth: plain forward hooks on the stage's own module and numpy. A unit's response to a stimulus is its
    largest value over the map's positions (not the mean over them) and its response to a blank image the same on
    zeros; for an identity dictionary (±channels) unit u < C is ReLU(channel u) and u ≥ C is ReLU(−channel u − C).
    The centre response is the unit at the position centre_positions names."""
    from mechscope.cnn.methods import tuning as T
    from mechscope.cnn.methods.stimuli import draw_stimuli

    model = tiny_cnn()
    spec = walk(model)
    sae = identity_sae(S.hook_shape(spec, hook)[0])
    stim = draw_stimuli(spec.input_shape[1:], 0, families=("edge",))
    seen = []
    real = T.unit_tuning
    monkeypatch.setattr(T, "unit_tuning", lambda *a, **k: seen.append(a) or real(*a, **k))
    S.tuning_labels(spec, hook, lambda r: sae.encode(r), stim, torch.ones(sae.cfg.d_sae), batch=7)

    stage, where = hook.split(".")
    module = getattr(getattr(model, stage), "pool" if where == "hook_out" else "act")  # torch's own modules
    out = []
    handle = module.register_forward_hook(lambda m, i, o: out.append(o.detach()))
    try:
        with torch.no_grad():
            model(stim.images)
            model(torch.zeros(1, *spec.input_shape))
    finally:
        handle.remove()
    act, blank_act = out
    a = act.double().numpy()
    units = np.concatenate([np.maximum(a, 0), np.maximum(-a, 0)], 1)  # [N, 2C, H, W]
    b = blank_act.double().numpy()
    blank_units = np.concatenate([np.maximum(b, 0), np.maximum(-b, 0)], 1)
    r_max, r_centre = seen[0][4].double().numpy(), seen[0][5].double().numpy()
    np.testing.assert_allclose(r_max, units.reshape(len(a), units.shape[1], -1).max(2), atol=1e-5)
    assert [s[6] for s in seen] == pytest.approx(list(blank_units[0].reshape(units.shape[1], -1).max(1)), abs=1e-5)
    pos = T.centre_positions(SimpleNamespace(rf_post=spec.stage(hook).rf_out if where == "hook_out" else
                                             spec.stage(hook).rf_post), stim.stimuli, a.shape[2:])  # fmt: skip
    np.testing.assert_allclose(r_centre, units[np.arange(len(a)), :, pos[:, 0], pos[:, 1]], atol=1e-5)
    assert not np.allclose(r_max, units.reshape(len(a), units.shape[1], -1).mean(2), atol=1e-3)  # the case


def test_a_fresh_fit_worse_than_the_last_k_falls_back_to_a_warm_start(monkeypatch):
    """Truth: the documented contract (explained variance non-decreasing in k) and _grow's bound (a start from the
    k − 1 fit plus the residual's non-negative rank-1 part is no worse than that fit). A fresh fit at k = 2 forced to
    a useless local optimum (all zeros: explained variance 0) must be replaced by the warm start, which explains
    at least what k = 1 did, measured with numpy's own ‖A − WH‖² / ‖A‖²."""
    from mechscope.cnn.methods import nmf_groups as G

    a = np.abs(np.random.default_rng(4).normal(size=(12, 6)))
    real = G._fit

    def fit(a_, k, seed, init=None, max_iter=1000):
        if init is None and k == 2:
            return np.zeros((a_.shape[0], 2)), np.zeros((2, a_.shape[1]))
        return real(a_, k, seed, init=init, max_iter=max_iter)

    monkeypatch.setattr(G, "_fit", fit)
    fits = G.nmf_curve(a, k_max=3)
    ev = [1 - ((a - w @ h) ** 2).sum() / (a**2).sum() for w, h in fits]
    assert ev[0] > 0.5 and ev[1] >= ev[0] - 1e-12 and ev[2] >= ev[1] - 1e-12
    assert fits[1][0].shape == (12, 2) and (fits[1][0] >= 0).all() and (fits[1][1] >= 0).all()
