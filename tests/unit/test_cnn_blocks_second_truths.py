"""Building Blocks, second pass (methods/blocks.py, blocks_vis.py, nmf_groups.py, pipelines/blocks.py, report/blocks.py
and its page) against outside truths: a hand-built conv net on a non-square 3 × 10 map with a copied channel, plain
torch forward passes and numpy, the documented threshold rule hit exactly, Lucid's ``direction_neuron`` floor on the
cosine, receptive fields of a padded 3 × 3 conv by hand, and the rendered page parsed with html.parser."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from mechscope.cnn.data.images import make_dataset
from mechscope.cnn.methods import blocks as B
from mechscope.cnn.methods import blocks_vis as V
from mechscope.cnn.methods.nmf_groups import explained_variance, nmf_groups
from mechscope.cnn.models.spec import walk
from mechscope.cnn.pipelines.blocks import blocks_model, check_settings
from mechscope.cnn.report import blocks as R
from mechscope.core.errors import MechscopeError
from tests.unit import test_sentences_blocks as blocks_fixture
from tests.unit.test_blocks import planted, tiny_spec
from tests.unit.test_cnn_blocks_sae_truths import adaptive_cells
from tests.unit.test_cnn_pages_truths import Page
from tests.unit.test_data_models_truths import _fake_render

pytestmark = pytest.mark.usefixtures("one_thread")

HH, WW = 3, 10  # a 3 × 10 map: only the width exceeds a grid side of 4


def copy_net() -> tuple[nn.Sequential, object]:
    """A padded 3×3 conv with ReLU on 3 × 10 images; channel 1 is an exact copy of channel 0."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * HH * WW, 2)).eval()
    with torch.no_grad():
        net[0].weight[1], net[0].bias[1] = net[0].weight[0], net[0].bias[0]
        net[0].bias += 0.3
    return net, walk(net, (1, HH, WW))


def plain(net, x) -> np.ndarray:
    with torch.no_grad():
        return net[1](net[0](x)).double().numpy()


# ---- NMF groups ------------------------------------------------------------------------------------------------------


def test_a_threshold_met_exactly_is_reached():
    """Truth: the documented rule, k = the smallest k whose explained variance *reaches* the threshold: with the
    threshold set to the curve's own second value (same seed, same curve), k is 2, not 3."""
    w, h = planted(seed=5, r=5, c=14)
    curve = nmf_groups(w @ h, "layer", threshold=0.3, seed=0).curve
    assert len(curve) >= 3 and curve[0] < curve[1] < curve[2]
    g = nmf_groups(w @ h, "layer", threshold=curve[1], seed=0)
    assert g.k == 2 and g.explained == curve[1]


def test_copied_channels_land_in_one_group_and_an_empty_matrix_is_fully_explained():
    """Truth: a hand-built net whose channel 1 is a copy of channel 0: A = [a0, a0, a2] is exactly W·H with
    H = [[1, 1, 0], [0, 0, 1]], so two groups explain it all (numpy's ‖A − WH‖²) and every direction weighs the two
    copies equally; and 1 − 0/0 is defined as 1 for an all-zero A (the docstring)."""
    net, spec = copy_net()
    x = torch.rand(4, 1, HH, WW, generator=torch.Generator().manual_seed(1))
    a = plain(net, x).transpose(0, 2, 3, 1).reshape(-1, 3)
    g = nmf_groups(a, "conv1.hook_out", k=2, seed=0)
    assert 1 - ((a - g.spatial @ g.directions) ** 2).sum() / (a**2).sum() > 1 - 1e-6
    np.testing.assert_allclose(g.directions[:, 0], g.directions[:, 1], atol=1e-6)
    assert explained_variance(np.zeros((3, 2)), np.zeros((3, 1)), np.zeros((1, 2))) == 1.0


def test_growing_a_group_never_starts_worse_than_the_fit_it_grows():
    """Truth: _grow's documented bound, ‖A − W'H'‖² ≤ ‖A − WH‖² in numpy, on a hand-made over-fit whose residual
    [[1, 1, −9], [1, −9, 1]] has a positive part whose leading rank-1 term overlaps the −9s: the least-squares factor
    is negative there, so the new group must start at zero rather than at its magnitude."""
    from mechscope.cnn.methods.nmf_groups import _grow

    w, h = np.ones((2, 1)), np.full((1, 3), 10.0)
    a = w @ h + np.array([[1.0, 1.0, -9.0], [1.0, -9.0, 1.0]])
    w2, h2 = _grow(a, w, h)
    assert w2.shape == (2, 2) and (w2 >= 0).all() and (h2 >= 0).all()
    assert ((a - w2 @ h2) ** 2).sum() <= ((a - w @ h) ** 2).sum() + 1e-9


# ---- methods/blocks.py -----------------------------------------------------------------------------------------------


def test_a_non_square_map_gets_a_non_square_grid_and_every_channel_when_fewer_than_n_top():
    """Truth: adaptive average pooling by its definition in numpy: a 3 × 10 map with grid side 4 is pooled along the
    width only, into 3 × 4 cells; asking for 5 strongest channels of 3 gives all 3, by np.argsort; the crop is the
    centre position (1, 5)'s field, rows 0..2, columns 4..6."""
    net, spec = copy_net()
    x = torch.rand(2, 1, HH, WW, generator=torch.Generator().manual_seed(2))
    _, st = B.stage_activations(spec, x)
    lb = B.analyse_layer(spec, spec.stages[0], st["conv1"], [1], 2, 0.9, 0, 4, 5)
    cells = adaptive_cells(plain(net, x)[1], (3, 4))
    assert lb.grid == (3, 4) and lb.cells.shape == (1, 12, 3)
    np.testing.assert_allclose(lb.cells[0].numpy(), cells, atol=1e-5)
    order = np.argsort(-cells, axis=1, kind="stable")
    assert lb.top_channels.shape == (1, 12, 3)
    np.testing.assert_allclose(lb.top_values[0], np.take_along_axis(cells, order, 1), atol=1e-5)
    assert lb.crop == (0, 3, 4, 7)


def test_more_examples_asked_than_test_images_gives_them_all_in_order():
    """Truth: numpy's max over positions of ⟨a⁺, d_g⟩ on a plain forward, sorted descending: with k = 6 and 4 test
    images, each group lists all 4."""
    net, spec = copy_net()
    x = torch.rand(4, 1, HH, WW, generator=torch.Generator().manual_seed(3))
    d = np.array([[0.6, 0.0, 0.8], [0.0, 1.0, 0.0]])
    top_i, top_v, _ = B.group_examples(spec, x, {"conv1": d}, k=6)["conv1"]
    best = np.einsum("bchw,gc->gbhw", np.maximum(plain(net, x), 0), d).reshape(2, 4, -1).max(2)
    np.testing.assert_array_equal(top_i.numpy(), np.argsort(-best, axis=1, kind="stable"))
    np.testing.assert_allclose(top_v.numpy(), -np.sort(-best, axis=1), rtol=1e-5)


def test_stage_activations_in_small_batches_are_the_plain_forward():
    """Truth: the torch modules called directly on all 5 images at once, against batches of 2 (2 + 2 + 1)."""
    net, spec = copy_net()
    x = torch.rand(5, 1, HH, WW, generator=torch.Generator().manual_seed(4))
    logits, acts = B.stage_activations(spec, x, batch=2)
    with torch.no_grad():
        np.testing.assert_allclose(logits.numpy(), net(x).numpy(), atol=1e-6)
    np.testing.assert_allclose(acts["conv1"].double().numpy(), plain(net, x), atol=1e-6)


def test_one_misclassified_image_reports_its_own_class_probability_and_the_prediction():
    """Truth: numpy's softmax of the plain model's logits: image 0 labelled with a class it is not predicted as gets
    that class's probability, the model's argmax as prediction, and the sentence names the predicted class."""
    spec = tiny_spec()
    x = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        z = spec.model(x).double().numpy()
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    pred = int(p[0].argmax())
    y = torch.tensor([(pred + 1) % 3, 0, 0])
    sel = B.select_images(spec, x, y, 0, None)
    assert sel.predictions == (pred,) and sel.labels == ((pred + 1) % 3,)
    assert sel.probabilities[0] == pytest.approx(p[0, (pred + 1) % 3], rel=1e-5)
    r = replace(blocks_fixture.make_result(), selection=sel, class_names=("a", "b", "c"))
    assert f"(class {'abc'[(pred + 1) % 3]}, predicted {'abc'[pred]};" in R.selection_line(r)


# ---- methods/blocks_vis.py -------------------------------------------------------------------------------------------


def test_an_opposite_direction_keeps_lucids_floor_on_the_cosine():
    """Truth: Lucid's direction_neuron with cossim_pow 2: dot · max(cos, 0.1)²; v = −a has cos −1, so the value is
    dot · 0.01 = −|a|²/100 (hand arithmetic: a = (3, 4), |a|² = 25)."""
    act = torch.zeros(1, 2, 3, 3)
    act[0, :, 1, 1] = torch.tensor([3.0, 4.0])
    got = V.blocks_objective([("centre", "h", torch.tensor([-3.0, -4.0]))])({"h": act})
    assert got.item() == pytest.approx(-0.25, rel=1e-5)


def test_channel_pictures_are_asked_at_the_channels_post_activation_hook(monkeypatch):
    """Truth: ``cnn visualize`` saves and ``cnn blocks`` reuses channel images of hook_post (save_for_blocks); the
    ones computed here must be of the same hook, one per channel in order."""
    seen = []
    monkeypatch.setattr(V, "render_entries", lambda net, entries, *a, **k: seen.extend(entries) or
                        _fake_render(net, entries, *a, **k))  # fmt: skip
    spec = tiny_spec()
    groups = SimpleNamespace(directions=[np.array([0.0, 1.0, 0, 0])], k=1)
    lb = SimpleNamespace(stage="conv1", hook="conv1.hook_out", cells=torch.ones(1, 1, 4), groups=groups,
                         shape=(4, 7, 7), crop=(0, 4, 0, 4))  # fmt: skip
    V.visualise_blocks(spec, [lb], steps=1, seed=0, vrange=(0.0, 1.0))
    assert [e for e in seen if e[0] == "channel"] == [("channel", "conv1.hook_post", c) for c in range(4)]


# ---- pipelines/blocks.py ---------------------------------------------------------------------------------------------


EDGES = [({"threshold": 1.0}, {"threshold": 0.0}), ({"steps": 100_000}, {"steps": 100_001}),
         ({"max_side": 1}, {"max_side": 0}), ({"image": 0}, {"image": -1}), ({"n_top": 1}, {"n_top": 0}),
         ({"n_examples": 1}, {"n_examples": 0})]  # fmt: skip


@pytest.mark.parametrize(("kw", "bad"), EDGES)
def test_settings_on_the_edge_of_their_documented_ranges(kw, bad):
    """Truth: the ranges the messages state: threshold in (0, 1], steps at most 100,000, grid at least 1, an image
    index 0 or more, at least one top channel and one example: the edge itself is allowed, one step beyond is
    refused."""
    check_settings(kw)
    with pytest.raises(MechscopeError):
        check_settings(bad)


def typical_run(monkeypatch, tmp_path):
    """cnn blocks on a 3-class random CNN whose labels are its own predictions (all correct), two typical images a
    class, one visualisation step, every figure stubbed; returns (result, parsed page, test images)."""
    spec = tiny_spec()
    with torch.no_grad():
        spec.readout.fc.weight.normal_(0, 3, generator=torch.Generator().manual_seed(0))
        x = torch.rand(24, 1, 16, 16, generator=torch.Generator().manual_seed(6))
        y = spec.model(x).argmax(1)
    data = make_dataset("toy", x, y, x, y, class_names=("cat", "dog", "fox"))
    for name in ("input_fig", "curve_fig", "flow_fig", "grid_fig", "dictionary_fig", "groups_fig"):
        monkeypatch.setattr(R.BF, name, lambda *a, **k: "fig")
    _, r = blocks_model(spec.model, data, tmp_path / "b", typical=2, steps=1, groups=2)
    return r, Page((tmp_path / "b" / "report.html").read_text()), x


def test_typical_images_grid_the_most_typical_of_each_class_and_the_tables_show_each_field(monkeypatch, tmp_path):
    """Truth: the grid of class c's most typical image is that image's plain forward pooled in numpy (not the c-th
    analysed row); the page's attribution tables, parsed with html.parser, hold each flow's own fields by row."""
    r, page, x = typical_run(monkeypatch, tmp_path)
    spec = tiny_spec()
    with torch.no_grad():
        spec.readout.fc.weight.normal_(0, 3, generator=torch.Generator().manual_seed(0))
        conv1 = spec.model.conv1(spec.model.normalize(x)).numpy()
    sel, lb = r.selection, r.layers[0]
    assert len(set(sel.shown)) == 3 and sel.shown == sel.images[::2]
    for s, i in enumerate(sel.shown):
        np.testing.assert_allclose(lb.cells[s].numpy(), conv1[i].reshape(conv1.shape[1], -1).T, atol=1e-5)
    f = r.flows[-1]
    head = f"{f.source}: gradient × activation along each group ("
    table = next(t for t in page.tables if t[0][0].startswith(head))
    rows = {row[0]: row[1:] for row in table[1:]}
    assert rows["group 2"] == [f"{v:+.3f}" for v in f.attribution[1]]
    assert rows["outside the groups (residual)"] == [f"{v:+.3f}" for v in f.residual]
    removal = [t for t in page.tables if t[0][0] == "measured contribution of one group: as is − that group removed"]
    assert len(removal) == len(r.flows) and removal[-1][0][1:] == ["cat", "dog", "fox"]
    first = r.flows[0]  # conv1 → conv2 through a ReLU and a pool: removing a group is not its attribution
    assert not np.allclose(first.removal, first.attribution, atol=1e-3)
    assert [row[1:] for row in removal[0][1:]] == [[f"{v:+.3f}" for v in first.removal[g]] for g in (0, 1)]


# ---- report/blocks.py: sentences ------------------------------------------------------------------------------------


def test_layer_line_names_groups_set_by_hand_and_the_negative_share():
    """Truth: a hand-made layer with k set by --groups and a quarter of Σ a² negative: 0.25 × 100 = 25.0%; the same
    layer with k chosen by the 0.9 threshold says so (90.0%)."""
    lb = blocks_fixture.layer("conv1")
    lb = replace(lb, groups=replace(lb.groups, chosen_by="--groups", negative_share=0.25))
    line = R.layer_line(lb)
    assert "k = 2 groups (set by --groups) explain 93.0%" in line
    assert line.endswith("; 25.0% of the squared activation is negative and left out.")
    assert "k = 2 groups (the smallest k reaching 90.0%) explain" in R.layer_line(blocks_fixture.layer("conv1"))


def test_the_largest_contributions_are_ranked_by_size_whatever_their_sign():
    """Truth: hand-made attributions whose largest |value| is negative: towards dog, group 1 −3.00 before group 2
    +1.50; of conv1 → conv2, group 2 → group 1 −0.90 comes first; with 4 classes, the 3 largest changes are followed."""
    r = blocks_fixture.make_result()
    logits = replace(r.flows[1], attribution=np.array([[2.0, -3.0], [0.5, 1.5]]))
    pair = replace(r.flows[0], attribution=np.array([[0.5, 0.1], [-0.9, 0.3]]))
    r = replace(r, flows=(pair, logits))
    assert "largest by |contribution|: conv2 group 1 -3.00 (measured" in R.class_flow_line(r, 1)
    assert "largest links by |attribution| group 2 → group 1 -0.90" in R.pair_line(pair)
    four = replace(logits, targets=tuple("abcd"), actual_change=np.array([0.2, 0.9, -0.1, 0.5]))
    r4 = replace(r, flows=(pair, four), class_names=tuple("abcd"))
    assert R.shown_classes(r4) == [1, 3, 0]


# ---- report/blocks.py: what the figures are given -------------------------------------------------------------------


def report_layer() -> tuple[object, object]:
    """A hand-made conv1 layer of the 3 × 10 net: grid 3 × 4, two images (the second one shown), two groups."""
    _, spec = copy_net()
    rng = np.random.default_rng(7)
    g = replace(blocks_fixture.layer("conv1").groups, directions=np.array([[0.1, 0.7, 0.3], [0.6, 0.2, 0.5]]),
                spatial=rng.random((2 * HH * WW, 2)), share=(0.7, 0.3))  # fmt: skip
    norms = np.array([[0.5, 3.0, 0.1, 2.0, 0.2, 0.3, 1.0, 0.4, 0.6, 0.7, 0.8, 0.9]])
    top = np.tile([[2, 0, 1]], (1, 12, 1))
    lb = replace(blocks_fixture.layer("conv1"), shape=(3, HH, WW), grid=(3, 4), groups=g, cell_norms=norms,
                 top_channels=top, top_values=top * 0.5, example_images=np.array([[1, 0], [0, 1]]),
                 example_boxes=np.zeros((2, 2, 4), int))  # fmt: skip
    return lb, spec


def test_to_input_gives_each_pixel_the_position_centred_nearest():
    """Truth: a plain loop over pixels: receptive fields 4 wide every 2 pixels from 0 are centred at 1.5, 3.5, 5.5
    (rows) and at 1.5, 3.5 (columns); each pixel takes argmin |pixel − centre| (no ties with half-integer centres)."""
    stage = SimpleNamespace(rf_out=SimpleNamespace(start=(0, 0), size=(4, 4), jump=(2, 2)))
    heat = np.arange(6.0).reshape(3, 2)
    got = R.to_input(heat, stage, (8, 6))
    want = [[heat[np.abs(py - np.array([1.5, 3.5, 5.5])).argmin(), np.abs(px - np.array([1.5, 3.5])).argmin()]
             for px in range(6)] for py in range(8)]  # fmt: skip
    np.testing.assert_array_equal(got, want)


def test_dictionary_rows_are_the_strongest_cells_with_their_pixels_and_channels(monkeypatch):
    """Truth: the cells by descending norm from a hand-made norms row (1, 3, 6 first), cell 6 of a 3 × 4 grid is
    (1, 2), and it covers positions row 1, columns 5..7 (adaptive pooling bins of width 10 into 4), whose padded 3×3
    receptive fields span rows 0..2, columns 4..8 (exclusive ends 3 and 9)."""
    lb, spec = report_layer()
    r = SimpleNamespace(images={"cells": {"conv1": torch.zeros(1, 12, 1, 3, 3)}, "channels": {"conv1": torch.zeros(3, 1,
                        HH, WW)}})  # fmt: skip
    rows = R.dictionary_rows(r, spec, lb, np.zeros((HH, WW)), (0.0, 1.0), n=3)
    assert [row["cell_yx"] for row in rows] == [(0, 1), (0, 3), (1, 2)]
    assert rows[2]["box"] == (0, 3, 4, 9)
    assert [c["channel"] for c in rows[0]["channels"]] == [2, 0, 1]


def test_group_rows_label_each_group_and_map_the_first_shown_image(monkeypatch):
    """Truth: shares 70.0% and 30.0% by hand (×100); group 2's direction (0.6, 0.2, 0.5) weighs channels 0, 2, 1 in
    that order; the map is the second analysed image's strengths (rows 30..59 of W), each pixel under its own
    position for a padded 3×3 conv (stride 1: pixel = position)."""
    lb, spec = report_layer()
    sel = B.Selection((4, 9), (9,), (0, 1), (0, 1), (0.9, 0.8), "t")
    r = SimpleNamespace(images={"groups": {"conv1": torch.zeros(2, 1, HH, WW)}}, selection=sel)
    rows = R.group_rows(r, spec, lb, torch.zeros(2, 1, HH, WW), (0.0, 1.0))
    assert rows[0]["label"].split("\n")[1:] == ["70.0% of the norm²", "ch 1, ch 2, ch 0"]
    assert rows[1]["label"].split("\n")[1:] == ["30.0% of the norm²", "ch 0, ch 2, ch 1"]
    np.testing.assert_array_equal(rows[1]["map"], lb.groups.spatial[HH * WW :, 1].reshape(HH, WW))


def test_flow_links_keep_the_threshold_share_and_only_the_followed_classes(monkeypatch):
    """Truth: hand-made attributions: a link of exactly 15% of its pair's strongest (0.3 of 2.0) is drawn, one
    just under (0.29) is not; towards the logits only the 3 followed classes of 4 count, so the strongest link there
    (4.0 to class d, not followed) neither appears nor sets the widths."""
    r = blocks_fixture.make_result()
    pair = replace(r.flows[0], attribution=np.array([[2.0, 0.3], [0.29, -1.0]]))
    logits = replace(r.flows[1], targets=tuple("abcd"), attribution=np.array([[1.0, 0.1, 0.5, 4.0], [0.0] * 4]),
                     actual_change=np.array([0.4, 0.3, 0.2, 0.1]))  # fmt: skip
    r = replace(r, flows=(pair, logits), class_names=tuple("abcd"),
                images={"groups": {"conv1": torch.zeros(2, 1, 2, 2), "conv2": torch.zeros(2, 1, 2, 2)}})  # fmt: skip
    got = {}
    monkeypatch.setattr(R.BF, "flow_fig", lambda columns, links, title: got.update(links=links))
    R.flow_figure(r, (0.0, 1.0))
    assert {(k["col"], k["src"], k["dst"]) for k in got["links"]} == {(0, 0, 0), (0, 0, 1), (0, 1, 1), (1, 0, 0),
                                                                        (1, 0, 2)}  # fmt: skip
    assert next(k["width"] for k in got["links"] if (k["col"], k["dst"]) == (1, 2)) == pytest.approx(0.5)


def test_a_gap_of_exactly_the_tolerance_is_exact():
    """Truth: the documented rule, exact when every gap is *within* 1e-4 of the largest measured change: a gap of
    1e-4 against a largest change of 1.0 is within (0.0001 − 0 is exact in floating point)."""
    f = replace(blocks_fixture.make_result().flows[1], grad_x_act=np.array([1.0, 1e-4]),
                actual_change=np.array([1.0, 0.0]))  # fmt: skip
    assert np.abs(f.completeness_gap).tolist() == [0.0, 1e-4]
    assert R.is_exact(f) and "gradient × activation is exact" in R.completeness_line(f)
