"""The explain summary (report/summary.py), the microscope figures (report/cnn_figures.py) and the Building Blocks
figures (report/blocks_figures.py), second pass: hand-made results with distinct numbers whose sentences follow from
the report's own stated rules, checked at the rules' exact boundaries; figures' artists (image arrays, colour limits,
bar heights and errors) read back and compared with a computation written out here in numpy or a plain loop. The
results are those of tests/unit/test_sentences_explain.py and test_cnn_pages_truths.py (cat, dog, fox).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from matplotlib.colors import to_hex
from matplotlib.container import BarContainer

from mechscope.cnn.methods.ablation_study import ReadoutAblation, StageAblation, WholeStage
from mechscope.cnn.methods.overview import Overview
from mechscope.cnn.report import blocks_figures as BF
from mechscope.cnn.report import cnn_figures as F
from mechscope.cnn.report import summary as S
from tests.unit import test_cnn_pages_truths as pages_fixture
from tests.unit import test_sentences_explain as X
from tests.unit.test_lm_report_truths import captured

NAMES = X.NAMES


def _whole(stage: str, kind: str, reads_as: int, share: float, per_class) -> WholeStage:
    """As the explain fixture's, with the share stored in float64 (a float32 0.9995 is under 0.9995)."""
    pred = torch.full((3,), (1 - share) / 2, dtype=torch.float64)
    pred[reads_as] = share
    per = torch.tensor(per_class, dtype=torch.float64)
    return WholeStage(stage, kind, per, float(per.mean()), pred, reads_as)


def _with_whole(r, share: float, fox: float):
    """conv1 zero 30%, conv1 mean 60%, conv2 zero 15%, conv2 mean 25% test accuracy (all distinct); the mean conv2 map
    reads as a fox for ``share`` of the images, the foxes keeping ``fox``."""
    per = [0.0, max(0.75 - fox, 0.0), fox]
    whole = (_whole("conv1", "zero", 0, 1.0, [0.3] * 3), _whole("conv1", "mean", 1, 1.0, [0.6] * 3),
             _whole("conv2", "zero", 0, 1.0, [0.15] * 3), _whole("conv2", "mean", 2, share, per))  # fmt: skip
    return replace(r, ablation=replace(r.ablation, whole=whole))


# ---- summary: sentences -------------------------------------------------------------------------------------------


def test_whole_stage_accuracies_are_each_kinds_own_and_chance_is_one_over_the_classes():
    """Truth: test_accuracy of each (stage, kind), ×100 (60.0 / 25.0 mean, 30.0 / 15.0 zero); chance 100/3 = 33%."""
    lines = S.summarise(_with_whole(X.make_result(), 1.0, 0.5))
    assert lines[1] == ("Mean-ablating every channel of a stage leaves 60.0% (conv1) and 25.0% (conv2) test accuracy; "
                        "chance is 33%. Zero-ablating them: 30.0% and 15.0%.")  # fmt: skip


def test_a_mean_map_called_a_fox_for_exactly_half_the_images_reads_as_a_fox():
    """Truth: the stated rule "at least 50% counts as the mean map reading as that class", at 50% exactly: the
    sentence says so and the fox circuit's vacuous-test sentence is there."""
    lines = S.summarise(_with_whole(X.make_result(), 0.5, 0.25))
    line = X.one(lines, "Mean-ablation is not neutral here")
    assert "the network calls 50.0% of test images a fox (at least 50% counts" in line
    assert X.one(lines, "For the foxes, the class the mean conv2 map reads as")


def test_every_test_image_is_said_from_a_share_of_0_9995_and_not_below():
    """Truth: 0.9995 rounds to 100.0%, "every test image"; 0.9994 is 99.9% of them. The empty set meets the fox
    accuracy half exactly at full − tolerance = 0.98 − 0.01 = 0.97, and "with no channel kept, every image" needs
    the whole share; one channel "meets" the other half."""
    every = X.one(S.summarise(_with_whole(X.make_result(), 0.9995, 0.97)), "For the foxes")
    assert "the network calls every test image a fox)" in every
    assert "its accuracy half is met by the empty set (97.0% of the foxes called fox" in every
    assert "the circuit's 1 channel meets the other half" in every
    assert "(1.5% of them with only the circuit, full model 1.0%; with no channel kept, every image)." in every
    almost = X.one(S.summarise(_with_whole(X.make_result(), 0.9994, 0.97)), "For the foxes")
    assert "the network calls 99.9% of test images a fox)" in almost
    assert "full model 1.0%). Resample-ablating them" in almost


def test_the_mean_map_of_the_last_stage_is_used_when_the_circuits_stage_is_not_a_stage():
    """Truth: with no circuit stage among the stages, the last stage (conv2, read as a fox) is the one described,
    not the first (conv1, read as a dog)."""
    r = X.make_result()
    line = X.one(S.summarise(replace(r, circuits=replace(r.circuits, stage="fc", circuits=()))), "Mean-ablation is")
    assert "with every conv2 channel at its mean the network calls every test image a fox" in line


def test_no_errors_and_two_decimals_as_the_overview():
    """Truth: a diagonal confusion matrix of 1,200 images has no errors; 0.98765 is 98.77% to two decimals with
    2 + 1 + 1 + 1 + 1 = 6 errors in 300."""
    r = X.make_result()
    clean = Overview(1200, 1.0, (1.0, 1.0, 1.0), ((400, 0, 0), (0, 400, 0), (0, 0, 400)))
    assert S.summarise(replace(r, overview=clean))[0] == "Test accuracy 100.0% (no errors in 1,200)."
    line = S.summarise(replace(r, overview=replace(r.overview, test_accuracy=0.98765)))[0]
    assert line.startswith("Test accuracy 98.77% (6 errors in 300); ")


def test_three_tied_confusions_are_all_named():
    """Truth: the off-diagonal maximum 2 sits at (cat, dog), (cat, fox) and (dog, cat), row by row: three, named."""
    r = X.make_result()
    conf = ((96, 2, 2), (2, 97, 1), (0, 1, 99))
    line = S.summarise(replace(r, overview=replace(r.overview, confusion_matrix=conf)))[0]
    assert line.endswith("the most common confusions, 2 images each, are a cat read as a dog, a cat read as a fox "
                         "and a dog read as a cat.")  # fmt: skip


def test_the_costliest_channel_states_its_own_cost_and_three_tied_pairs_are_named():
    """Truth: conv1 channel 0 costs (3 + 2 + 0.1) / 3 = 1.7 points overall, the most; 3.0 points is the largest
    cost to one class, at (0, dog), (2, cat) and (3, fox): three pairs, named in row order."""
    r = X.make_result()
    conv1 = X._stage_ablation("conv1", 4, {(0, 1): 0.03, (0, 0): 0.02, (2, 0): 0.03, (3, 2): 0.03})
    ablation = replace(r.ablation, stages=(conv1, r.ablation.stages[1]))
    line = X.one(S.summarise(replace(r, ablation=ablation)), "conv1, one")
    assert "the costliest is channel 0 (1.7 points of test accuracy)" in line
    assert ("the largest cost to one class, 3.0 points each, is channel 0 on class dog, channel 2 on class cat and "
            "channel 3 on class fox;") in line  # fmt: skip


def test_a_stage_whose_every_ablation_raises_accuracy_states_no_negative_cost():
    """Truth: every one of conv1's channels raises test accuracy when mean-ablated (by 0.2 to 0.5 points overall,
    at least 0.1 on every class): no channel costs accuracy, and no cost below zero is printed."""
    r = X.make_result()
    mean = torch.tensor([[0.002, 0.003, 0.001], [0.005, 0.005, 0.005], [0.004, 0.002, 0.003], [0.003, 0.003, 0.003]])
    gain = StageAblation("conv1", "conv1.hook_out", "hand-made", mean, mean, mean.mean(1), mean.mean(1))
    line = X.one(
        S.summarise(replace(r, ablation=replace(r.ablation, stages=(gain, r.ablation.stages[1])))), "conv1, one"
    )
    assert "no channel costs test accuracy (each one's ablation raises it, by at least 0.2 points)" in line
    assert "no channel costs any one class accuracy;" in line and "-0." not in line and "costliest" not in line


def test_two_specialists_are_both_channels_with_their_own_region_and_no_negative_rest():
    """Truth: channels 1 (2.0 points on cat) and 3 (1.0 on fox) cost a class at least 0.5 points: "both channels";
    channel 3 raises the cats' and dogs' accuracy, so no other class loses more than 0.0 points; each channel's
    region is its own (upper left, upper right)."""
    r = X.make_result()
    conv2 = X._stage_ablation("conv2", 5, {(1, 0): 0.02, (3, 2): 0.01, (3, 0): -0.004, (3, 1): -0.002})
    regions = ("centre", "upper left", "lower right", "upper right", "lower left")
    sel = (r.selectivity[0], replace(r.selectivity[1], region_on_preferred_class=regions))
    lines = S.summarise(replace(r, ablation=replace(r.ablation, stages=(r.ablation.stages[0], conv2)), selectivity=sel))
    one = X.one(lines, "conv2 channel 1: mean-ablating it costs class cat 2.0 points")
    three = X.one(lines, "conv2 channel 3: mean-ablating it costs class fox 1.0 points")
    assert all("(named: both channels costing one class at least 0.5 points" in s for s in (one, three))
    assert "and no other class more than 0.0 (named" in three
    assert one.endswith("in the upper left of the image.") and three.endswith("in the upper right of the image.")


def test_patching_names_each_stages_largest_channel_last_stage_first_with_its_own_sd():
    """Truth: the largest |channel_mean| is conv2 channel 1 (−60%, sd 2) and conv1 channel 2 (−9%, sd 1); the
    sentence goes from the last stage back."""
    line = X.one(S.summarise(pages_fixture.make_result()), "Activation patching from a cat into a dog")
    assert "one stage at a time: conv2 channel 1 (-60% ± 2) and conv1 channel 2 (-9% ± 1), ± the sd over" in line


def test_nine_channels_tied_in_one_circuit_each_show_eight_and_an_ellipsis():
    """Truth: circuits (0, 1, 2), (3, 4, 5), (6, 7, 8) of 10 channels: nine in one circuit each, eight listed then
    "…", one of ten in none."""
    r = X.make_result()
    circuits = tuple(replace(c, channels=tuple(range(3 * i, 3 * i + 3))) for i, c in enumerate(r.circuits.circuits))
    sel = (r.selectivity[0], replace(r.selectivity[1], index=torch.full((10,), 0.3)))
    lines = S.summarise(replace(r, circuits=replace(r.circuits, circuits=circuits), selectivity=sel))
    line = X.one(lines, "No conv2 channel is in more than 1 circuit")
    assert line.endswith(": 9 channels are in 1 (0, 1, 2, 3, 4, 5, 6, 7, …); 1 of 10 channels are in none.")


def test_feature_visualisation_counts_and_a_stale_tuning_link_is_left_out():
    """Truth: 7 of 12 units exceed the data set's maximum (distinct numbers, in that order); a tuning link marked
    stale gives no sentence, the same link not stale gives one."""
    r = X.make_result()
    tuning = {"dir": "tune", "units": {"conv2 0": {"tuned": False}}}
    lines = S.summarise(r, {"featvis": {"dir": "fv", "summary": {"exceed_dataset_max": 7, "units": 12}},
                              "tuning": tuning | {"stale": True}})  # fmt: skip
    assert "Feature visualisation (from fv): 7 of 12 units reach a higher activation than any test image." in lines
    assert not any(s.startswith("Tuning curves") for s in lines)
    fresh = S.summarise(r, {"tuning": tuning})
    assert "Tuning curves on synthetic stimuli (from tune): 0 of 1 units tuned." in fresh


def test_a_feeder_share_without_the_full_count_says_the_stage_channels():
    """Truth: with no per-channel total stored (feeders_all None) the count of channels is unknown: "of the conv1
    channels", never a count."""
    r = X.make_result()
    cat = replace(r.circuits.circuits[0], feeders_all=None)
    circuits = replace(r.circuits, circuits=(cat, *r.circuits.circuits[1:]))
    line = X.one(S.summarise(replace(r, circuits=circuits)), "Class cat:")
    assert "23% of the summed |contribution| of the conv1 channels to the circuit channels' total" in line


def test_articles_plurals_and_the_digit_noun_follow_english():
    """Truth: English: an 8, an 11, an 18, an 80, a 1, a 7, an Ankle boot, a Shirt; boxes, foxes, cats; ten digit
    classes are digits, other names classes."""
    got = [S.article(n) for n in ("8", "11", "18", "80", "1", "7", "Ankle boot", "Shirt")]
    assert got == ["an 8", "an 11", "an 18", "an 80", "a 1", "a 7", "an Ankle boot", "a Shirt"]
    assert [S.plural(w) for w in ("box", "fox", "cat", "class")] == ["boxes", "foxes", "cats", "classes"]
    words = ("butterfly", "Puppy", "key", "deer", "sheep", "person", "Mouse", "Ankle boot", "sports car", "y")
    assert [S.plural(w) for w in words] == ["butterflies", "Puppies", "keys", "deer", "sheep", "people", "Mice",
                                             "Ankle boots", "sports cars", "ys"]  # fmt: skip
    got = [S.article(n) for n in ("unicorn", "umbrella", "user", "European", "hourglass", "horse", "egg")]
    assert got == ["a unicorn", "an umbrella", "a user", "a European", "an hourglass", "a horse", "an egg"]
    assert S.noun(tuple("0123456789")) == "digit" and S.noun(("0", "1")) == "class" and S.noun(NAMES) == "class"


# ---- microscope figures ---------------------------------------------------------------------------------------------


def _image(ax) -> np.ndarray:
    return np.ma.filled(np.ma.asarray(ax.images[0].get_array(), dtype=float), np.nan)


def _same(got, want) -> None:
    np.testing.assert_allclose(np.asarray(got, dtype=float), np.asarray(want, dtype=float), equal_nan=True)


def _tiled(arr: np.ndarray, cols: int) -> np.ndarray:
    """Tiles placed row by row (tile i at row i // cols, column i % cols), one NaN pixel between, written as a loop."""
    n, h, w = arr.shape
    cols = min(cols, n)  # no empty columns
    rows = (n + cols - 1) // cols
    out = np.full((rows * (h + 1) - 1, cols * (w + 1) - 1), np.nan)
    for i in range(n):
        y, x = (i // cols) * (h + 1), (i % cols) * (w + 1)
        out[y : y + h, x : x + w] = arr[i]
    return out


def test_tiles_are_placed_row_by_row_each_the_right_way_up():
    """Truth: a plain loop; 4 square tiles in 2 columns (a column-major or transposed tiling would differ) and 5
    non-square tiles in 2 columns, the last row half NaN."""
    square = np.arange(16, dtype=float).reshape(4, 2, 2)
    _same(F.tile(square, 2), _tiled(square, 2))
    flat = np.arange(30, dtype=float).reshape(5, 2, 3)
    _same(F.tile(flat, 2), _tiled(flat, 2))
    assert F.sym([-3.0, 1.0]) == 3.0 and F.sym([np.nan]) == 1.0 and F.sym([0.0]) == 1.0


def test_an_rgb_image_is_scaled_from_its_value_range_and_a_grey_one_keeps_it():
    """Truth: (x − lo) / (hi − lo) clipped to [0, 1], channels last; a grey image keeps its values with vmin/vmax."""
    img = np.array([[[-1.0, 0.0]], [[1.0, 3.0]], [[5.0, 2.0]]])  # [3, 1, 2]
    rgb, kw = F.as_image(img, (-1.0, 3.0))
    _same(rgb, [[[0.0, 0.5, 1.0], [0.25, 1.0, 0.75]]])
    assert kw == {}
    grey, kw = F.as_image(img[:1], (-1.0, 3.0))
    _same(grey, img[0])
    assert kw == {"cmap": "gray", "vmin": -1.0, "vmax": 3.0}


def test_the_confusion_colours_only_the_errors_up_to_the_largest(monkeypatch):
    """Truth: the off-diagonal counts as given, the diagonal blank (NaN), the colour scale 0 to the largest error 4."""
    figs = captured(monkeypatch, F)
    conf = np.array([[5, 3, 0], [1, 7, 4], [2, 0, 9]])
    F.confusion_fig(conf, NAMES)
    ax = figs[0].axes[0]
    want = conf.astype(float)
    np.fill_diagonal(want, np.nan)
    _same(_image(ax), want)
    assert ax.images[0].get_clim() == (0, 4.0)


def test_grey_filters_share_one_symmetric_scale_and_colour_filters_sit_on_grey(monkeypatch):
    """Truth: m = max |w| = 0.8; a grey filter is drawn as is on [−0.8, 0.8]; a colour filter as 0.5 + w / (2m)."""
    figs = captured(monkeypatch, F)
    w = np.array([[[[0.8, -0.2], [0.1, 0.0]]], [[[-0.4, 0.3], [0.2, -0.1]]]])  # [2, 1, 2, 2]
    F.filters_fig(w, "conv1")
    for i in range(2):
        _same(_image(figs[0].axes[i]), w[i, 0])
        assert figs[0].axes[i].images[0].get_clim() == (-0.8, 0.8)
    colour = np.stack([w[0, 0], w[1, 0], -w[0, 0]])[None]  # [1, 3, 2, 2]
    F.filters_fig(colour, "conv1")
    _same(_image(figs[1].axes[0]), 0.5 + np.moveaxis(colour[0], 0, -1) / 1.6)


def test_the_connections_show_the_norm_left_and_the_signed_sum_right_in_their_orientation(monkeypatch):
    """Truth: the fixture's kernel norm and signed sum [5 conv2, 4 conv1] as given, the sum on ± its max |value|."""
    figs = captured(monkeypatch, F)
    conn = pages_fixture.make_result().weights.connections[0]
    F.connections_fig(conn)
    a, b = [ax for ax in figs[0].axes if ax.images]
    _same(_image(a), conn.kernel_norm.numpy())
    _same(_image(b), conn.kernel_sum.numpy())
    v = float(np.abs(conn.kernel_sum.numpy()).max())
    assert b.images[0].get_clim() == pytest.approx((-v, v))


def test_each_template_panel_is_its_own_class_and_the_bottom_is_the_class_channel_sum(monkeypatch):
    """Truth: panel d titled with class d is templates[d] tiled 8 per row (loop above); the bottom panel is
    the class × channel sums as given."""
    figs = captured(monkeypatch, F)
    w = pages_fixture.make_result().weights
    F.templates_fig(w.readout_templates.numpy(), w.readout_class_channel_sum.numpy(), NAMES, "conv2")
    panels = [ax for ax in figs[0].axes if ax.images]
    for d, name in enumerate(NAMES):
        assert panels[d].get_title() == name
        _same(_image(panels[d]), _tiled(w.readout_templates.numpy()[d], 8))
    _same(_image(panels[3]), w.readout_class_channel_sum.numpy())


def _ablation64(name: str, mean: list[list[float]]):
    m = torch.tensor(mean, dtype=torch.float64)
    return replace(X._stage_ablation(name, len(mean)), zero=-m, mean=m, zero_overall=-m.mean(1), mean_overall=m.mean(1))


def test_the_ablation_panels_share_the_largest_scale_and_print_from_half_a_point(monkeypatch):
    """Truth: one colour scale for every panel, ± the largest |change| of any stage (12 points, conv2's); a change of
    exactly 0.5 points is printed (|change| ≥ 0.5), 0.4 is not; 9.96 prints as 10 and 9.94 as 9.9."""
    figs = captured(monkeypatch, F)
    conv1 = _ablation64("conv1", [[-0.005, 0.004, 0.0], [0.001, 0.0, -0.02]])
    conv2 = _ablation64("conv2", [[0.12, 0.0, 0.0], [0.0, -0.03, 0.0]])
    F.ablation_fig((conv1, conv2), "mean", NAMES)
    panels = [ax for ax in figs[0].axes if ax.images]
    assert [p.images[0].get_clim() for p in panels] == [pytest.approx((-12.0, 12.0))] * 2
    assert sorted(t.get_text() for t in panels[0].texts) == ["-0.5", "-2.0"]
    assert [F.points_text(v) for v in (9.96, 9.94, -9.96, 0.5)] == ["10", "9.9", "-10", "0.5"]


def _readout(kind_offset: float) -> np.ndarray:
    return np.arange(36, dtype=float).reshape(12, 3) / 1000 + kind_offset


def test_each_readout_panel_is_its_class_over_channels_and_positions_of_its_kind(monkeypatch):
    """Truth: unit u = c·6 + y·3 + x of a [2, 2, 3] read-out ("c y x" order); class d's map [c, y, x] is 100×
    the unit's change for class d, written as a loop; zero-ablation and mean-ablation differ by 50 points."""
    figs = captured(monkeypatch, F)
    ro = ReadoutAblation(tuple(f"u{i}" for i in range(12)), (2, 2, 3), torch.tensor(_readout(0.0)),
                         torch.tensor(_readout(0.5)))  # fmt: skip
    for kind, offset in (("zero", 0.0), ("mean", 0.5)):
        F.readout_ablation_fig(ro, kind, NAMES, "conv2")
        panels = [ax for ax in figs[-1].axes if ax.images]
        for d, name in enumerate(NAMES):
            maps = np.zeros((2, 2, 3))
            for c, y, x in np.ndindex(2, 2, 3):
                maps[c, y, x] = 100 * _readout(offset)[c * 6 + y * 3 + x, d]
            assert panels[d].get_title() == name
            _same(_image(panels[d]), _tiled(maps, 8))


def test_selectivity_colours_reach_down_to_a_negative_normalised_mean(monkeypatch):
    """Truth: channel means (2, −1, 0.5) and (−4, 1, 2) ÷ their max |mean| give a lowest value −1, the colour
    scale's bottom; rows in the stage's order."""
    figs = captured(monkeypatch, F)
    means = torch.tensor([[2.0, -1.0, 0.5], [-4.0, 1.0, 2.0]])
    sel = replace(X._selectivity("conv1", 2), class_means=means, order=(1, 0), index=torch.tensor([0.2, 0.7]))
    F.selectivity_fig(sel, NAMES)
    ax = figs[0].axes[0]
    _same(_image(ax), [[-1.0, 0.25, 0.5], [1.0, -0.5, 0.25]])
    assert ax.images[0].get_clim() == (-1.0, 1)


def test_the_patching_figure_shows_each_image_its_maps_and_the_last_stages_channels(monkeypatch):
    """Truth: the fixture's clean (cat) image above the corrupted (dog) one; each stage's position_mean ×100 tiled
    4 per row; the bars are conv2's channel_mean ×100 with its sd ×100 as error, orange where positive."""
    figs = captured(monkeypatch, F)
    pt = pages_fixture.make_result().patching
    F.patching_fig(pt, NAMES, (-3.0, 3.0))
    axes = figs[0].axes
    _same(_image(axes[0]), pt.clean_image.numpy()[0])
    _same(_image(axes[1]), pt.corrupted_image.numpy()[0])
    assert axes[0].get_title().startswith("a cat (clean)") and axes[1].get_title().startswith("a dog (corrupted)")
    maps = [ax for ax in axes[2:] if ax.images]
    for ax, st in zip(maps, pt.stages, strict=True):
        _same(_image(ax), _tiled(st.position_mean.numpy() * 100, 4))
    bars = next(ax for ax in axes if ax.containers)
    cont = next(c for c in bars.containers if isinstance(c, BarContainer))
    _same([p.get_width() for p in cont.patches], pt.stages[-1].channel_mean.numpy() * 100)
    assert [to_hex(p.get_facecolor()) for p in cont.patches] == ["#d95f02", "#7570b3", "#d95f02", "#d95f02", "#d95f02"]
    err = cont.errorbar.lines[2][0].get_segments()
    _same([s[1, 0] - s[0, 0] for s in err], 2 * pt.stages[-1].channel_std.numpy() * 100)
    assert "run a dog, take one unit from the paired cat" in figs[0]._suptitle.get_text()


def test_circuit_membership_colours_each_member_by_its_own_attribution_and_counts_sizes(monkeypatch):
    """Truth: row i, column ch is attribution[ch] of circuit i where ch is a member, blank (NaN) elsewhere (a loop);
    the number over each class's bars is its circuit's size."""
    figs = captured(monkeypatch, F)
    study = pages_fixture.make_result().circuits
    F.circuits_fig(study, NAMES, 5)
    want = np.full((3, 5), np.nan)
    for i, c in enumerate(study.circuits):
        for ch in c.channels:
            want[i, ch] = float(c.attribution[ch])
    _same(_image(figs[0].axes[2]), want)
    assert [t.get_text() for t in figs[0].axes[1].texts] == [str(c.size) for c in study.circuits]


def test_a_class_circuit_shows_each_channels_read_out_weights_under_its_map(monkeypatch):
    """Truth: channels (1, 2): maps_d[1], maps_d[2] on a scale from min(0, lowest) = −0.5 to max |value| = 3;
    read-out weights templates_d[1], templates_d[2] below them."""
    figs = captured(monkeypatch, F)
    maps = np.arange(45, dtype=float).reshape(5, 3, 3) / 6 - 2.0  # channel 1: −0.5 … 0.83, channel 2: 1 … 2.33
    maps[2, 2, 2] = 3.0
    templates = -np.arange(45, dtype=float).reshape(5, 3, 3)
    ci = pages_fixture.make_result().circuits.circuits[0]
    F.class_circuit_fig(ci, pages_fixture.make_result().circuits, NAMES, maps, templates)
    images = [ax for ax in figs[0].axes if ax.images]
    tops = [ax for ax in images if ax.get_title().startswith("ch ")]
    bottoms = [ax for ax in images if not ax.get_title()]
    assert [ax.get_title() for ax in tops] == ["ch 1", "ch 2"]
    for ax, ch in zip(tops, (1, 2), strict=True):
        _same(_image(ax), maps[ch])
        assert ax.images[0].get_clim() == pytest.approx((-0.5, 3.0))
    for ax, ch in zip(bottoms, (1, 2), strict=True):
        _same(_image(ax), templates[ch])


def test_a_class_circuit_figure_says_the_plural_of_its_class(monkeypatch):
    """Truth: English, and the summary's own plural(): the foxes' maps are "mean activation on the foxes"; a circuit
    of one channel is "1 conv2 channel" (singular), of more "channels"."""
    figs = captured(monkeypatch, F)
    study = pages_fixture.make_result().circuits
    F.class_circuit_fig(study.circuits[2], study, NAMES, np.ones((5, 3, 3)), None)
    assert figs[0].texts[0].get_text() == "mean activation on the foxes (top)"
    n = len(study.circuits[2].channels)
    assert figs[0].get_suptitle() == f"class fox: {n} {study.stage} channel{'' if n == 1 else 's'}"
    one = replace(study.circuits[2], channels=study.circuits[2].channels[:1])
    F.class_circuit_fig(one, study, NAMES, np.ones((5, 3, 3)), None)
    assert figs[1].get_suptitle() == f"class fox: 1 {study.stage} channel"


def _channel() -> dict:
    g = np.random.default_rng(7)
    return {
        "stage": "conv2", "channel": 4, "weights": g.normal(size=(3, 3)), "weights_title": "w",
        "template": g.normal(size=(6, 2, 2)), "mean_map": g.random((4, 4)),
        "profile": np.array([0.2, 0.9, 0.4, 0.1, 0.3, 0.5]), "zero": -np.arange(6) / 100, "mean": -np.arange(6) / 50,
        "examples": g.random((2, 1, 6, 6)), "labels": [2, 0], "boxes": [(0, 3, 1, 5), (2, 6, 0, 2)],
        "ixg": np.stack([np.full((6, 6), 0.1), np.full((6, 6), -0.7)]),
    }  # fmt: skip


def test_a_channel_figure_names_the_class_of_the_highest_mean_and_boxes_each_top_image(monkeypatch):
    """Truth: profile (0.2, 0.9, 0.4, 0.1, 0.3, 0.5) peaks at dog; the 6 class templates are tiled 5 per row; box j
    (y0, y1, x0, x1) is a rectangle of width x1 − x0 and height y1 − y0 at x = j·(6 + 2) + x0 − 0.5, y = y0 − 0.5;
    each image labelled with its own class; top images on the value range, input × gradient on ± its largest |value|
    of all images."""
    figs = captured(monkeypatch, F)
    ch = _channel()
    F.channel_fig(ch, (*NAMES, "owl", "eel", "yak"), (-1.0, 2.0))
    axes = figs[0].axes
    _same(_image(axes[1]), _tiled(ch["template"], 5))
    assert axes[2].get_title() == "mean activation on dog"
    ex, ixg = axes[5], axes[6]
    rects = [(p.get_x(), p.get_y(), p.get_width(), p.get_height()) for p in ex.patches]
    assert rects == [(0.5, -0.5, 4, 3), (7.5, 1.5, 2, 4)]
    assert [t.get_text() for t in ex.texts] == ["fox", "cat"]
    assert ex.images[0].get_clim() == (-1.0, 2.0)
    assert ixg.images[0].get_clim() == pytest.approx((-0.7, 0.7))


# ---- Building Blocks figures -----------------------------------------------------------------------------------------


def test_rgb_repeats_each_pixel_into_a_square_and_clips():
    """Truth: a 2 × 2 grey image (0.2, 1.5; 0.6, −1) at scale 2 is 4 × 4 pixels, each a 2 × 2 block of its value
    clipped to [0, 1] (a Kronecker product), in each of three channels; NaN tile gaps are drawn #f4f4f4."""
    out = BF.rgb(np.array([[0.2, 1.5], [0.6, -1.0]]), 2)
    assert out.shape == (4, 4, 3)
    _same(out[..., 1], np.kron([[0.2, 1.0], [0.6, 0.0]], np.ones((2, 2))))
    assert to_hex(F.cmap("Reds").get_bad()) == "#f4f4f4"


def test_a_dictionary_cell_is_scaled_to_the_where_panel_and_padded_white(monkeypatch):
    """Truth: a 2 × 2 input at scale 4 is 8 pixels high: a 4 × 4 cell is repeated 8 // 4 = 2 times; a 5 × 5 cell
    under a 3 × 3 input (12 high) 12 // 5 = 2 times, into 10 × 10, the rest white."""
    got = []
    monkeypatch.setattr(BF, "panel_fig", lambda panels, *a, **k: got.append(panels))
    for size, inp in ((4, 2), (5, 3)):
        cell = np.arange(size * size, dtype=float).reshape(size, size) / size**2
        row = {"input": np.zeros((inp, inp)), "box": (0, 1, 0, 1), "cell": cell, "cell_yx": (0, 0), "channels": []}
        BF.dictionary_fig([row], "conv1")
        shown = got[-1][0][1][..., 0]
        want = np.ones((4 * inp, 4 * inp))
        want[: 2 * size, : 2 * size] = cell.repeat(2, 0).repeat(2, 1)
        _same(shown, want)


def test_group_titles_head_only_the_first_row_and_each_map_keeps_its_orientation(monkeypatch):
    """Truth: titles only over the first group's row; a 2 × 3 heat map peaks (inferno at 1) at row 0, column 2."""
    from matplotlib import colormaps

    got = {}
    monkeypatch.setattr(BF, "panel_fig", lambda panels, labels, titles, *a, **k: got.update(p=panels, t=titles))
    heat = np.array([[0.0, 0.0, 2.0], [0.0, 0.0, 0.0]])
    g = {"examples": [], "boxes": [], "image": np.zeros((2, 3)), "map": heat, "label": "g"}
    BF.groups_fig("conv1", [g, g | {"label": "h"}], np.zeros((2, 3)), scale=1)
    assert got["t"] == [["direction", "where (this image)", "top test images"], []]
    _same(got["p"][0][1][0, 2], 0.6 * np.array(colormaps["inferno"](1.0)[:3]))


def test_the_grid_title_states_the_crop_size_and_flow_thumbnails_use_zero_to_one(monkeypatch):
    """Truth: crop rows 2–7, columns 1–5 (exclusive ends) is 5 × 4 pixels; a thumbnail with values 0.2–0.4 is drawn
    on the fixed scale 0–1 (not stretched); a link of value exactly 0 is not "for" (red)."""
    got = {}
    monkeypatch.setattr(BF, "panel_fig", lambda panels, labels, titles, title, **k: got.update(title=title))
    row = {"image": np.zeros((4, 4)), "norms": np.ones(4), "cells": np.zeros((4, 1, 1)), "label": "x"}
    BF.grid_fig([row], (2, 2), "conv1", (2, 7, 1, 5), size=8)
    assert "(5×4-pixel receptive field" in got["title"]
    monkeypatch.undo()
    figs = captured(monkeypatch, BF)
    cols = [{"name": "a", "nodes": [{"label": "n", "image": np.array([[0.2, 0.4]])}]},
            {"name": "b", "nodes": [{"label": "m", "image": None}]}]  # fmt: skip
    BF.flow_fig(cols, [{"col": 0, "src": 0, "dst": 0, "value": 0.0, "width": 0.5}], "t")
    ax = figs[0].axes[0]
    box = next(a for a in ax.artists if hasattr(a, "offsetbox"))
    assert box.offsetbox.get_children()[0].get_clim() == (0, 1)
    assert to_hex(ax.patches[0].get_edgecolor()) == BF.NEG
