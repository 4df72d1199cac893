"""Second truths for the tuning page (report/tuning.py), the sparse-dictionary pages (report/sae.py), the SoLU
comparison (report/solu_cnn.py) and layer attribution (methods/layer_attribution.py).

Pages and figures are built from hand-made results with distinct numbers; figures are read back through their
artists (line data, line widths, images, offsets, colours), sentences compared with strings written out by hand,
the tuning page parsed with html.parser (``Page`` of test_cnn_pages_truths). Layer attribution is checked against
a hand-built linear network whose attributions are known in closed form, and against Captum where installed.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from matplotlib.collections import PathCollection
from matplotlib.colors import to_hex

from mechscope.cnn.methods import layer_attribution as L
from mechscope.cnn.methods.stimuli import Stimulus
from mechscope.cnn.methods.tuning import Curve, StageTuning
from mechscope.cnn.models.cnn import CNN, CNNConfig
from mechscope.cnn.report import sae as R
from mechscope.cnn.report import solu_cnn as S
from mechscope.cnn.report import tuning as T
from mechscope.core.hooks import run_with_cache
from tests.unit import test_sentences_tuning as tuning_fixture
from tests.unit.test_cnn_pages_truths import Page
from tests.unit.test_cnn_report_truths import tuning_result
from tests.unit.test_cnn_sae_pages_truths import NAMES, VRANGE, dashboards, evaluation, ex, image
from tests.unit.test_lm_report_truths import captured

CV, FALL = "circular variance", "size fall-off"
unit = tuning_fixture.unit


# ---- tuning: the unit figure -----------------------------------------------------------------------------------


def _two_family_unit(**kw):
    """Labelled edge (CV 0.12), preferred a line (CV 0.57): the label family differs from the preferred one."""
    edge = Curve("edge", "angle", (0.0, 90.0, 180.0), (3.0, 1.0, 0.5), (1.5, 0.25, 0.0), {}, 0.12)
    line = Curve("line", "angle", (0.0, 90.0, 180.0), (1.0, 4.0, 2.0), (0.75, 2.0, 1.0), {}, 0.57)
    arc = Curve("curve", "curvature", (0.1, 0.2), (2.0, 1.0), (1.0, 1.0), {"opening": 60.0, "width": 2.5}, None)
    ring = Curve("ring", "radius", (2.0, 4.0), (1.0, 3.0), (1.0, 1.0), {}, None)
    fields = dict(dataset_max=4.0, curves=(edge, line, arc, ring), preferred=Stimulus("line", angle=90.0),
                  label_stimulus=Stimulus("edge", angle=0.0), preferred_image=torch.full((1, 28, 28), 0.25),
                  label_image=torch.full((1, 28, 28), 0.75))  # fmt: skip
    return replace(unit(5, True, "edge", 0.75, 0.12, CV), **(fields | kw))


def _solid(ax):
    return [ln for ln in ax.get_lines() if ln.get_linestyle() == "-" and len(ln.get_xdata()) > 2]


def test_the_labelled_family_is_drawn_thick_with_its_centred_curve():
    """Truth: the labelled family (edge) is drawn 2.4 wide with its centred curve dashed, (1.5, 0.25, 0) / 4; the
    preferred family (line) 1.1 wide without one; legends 'edges CV 0.12', 'lines CV 0.57'; the dotted line at
    the drive threshold 0.5."""
    ax = T.unit_figure(_two_family_unit()).axes[0]
    edge, line = _solid(ax)
    np.testing.assert_allclose(edge.get_ydata(), [0.75, 0.25, 0.125])
    np.testing.assert_allclose(line.get_ydata(), [0.25, 1.0, 0.5])
    assert (edge.get_linewidth(), line.get_linewidth()) == (2.4, 1.1)
    (dashed,) = [ln for ln in ax.get_lines() if ln.get_linestyle() == "--"]
    np.testing.assert_allclose(dashed.get_ydata(), [0.375, 0.0625, 0.0])
    assert to_hex(dashed.get_color()) == T.COLOURS["edge"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["edges CV 0.12", "lines CV 0.57"]
    dotted = [ln for ln in ax.get_lines() if ln.get_linestyle() == ":"]
    assert [list(ln.get_ydata()) for ln in dotted] == [[0.5, 0.5]]


def test_the_side_panels_name_degrees_and_take_every_size_family():
    """Truth: the arc's fixed opening is an angle (°), its width is not; the radius panel takes a ring's curve
    (any family with a radius axis), (1, 3) / 4."""
    fig = T.unit_figure(_two_family_unit())
    assert fig.axes[1].get_legend().get_texts()[0].get_text() == "arcs (opening 60°, width 2.5)"
    (ring,) = [ln for ln in fig.axes[2].get_lines() if ln.get_linestyle() == "-"]
    np.testing.assert_allclose(ring.get_ydata(), [0.25, 0.75])
    assert to_hex(ring.get_color()) == T.COLOURS["ring"]


def test_a_silent_unit_plots_its_raw_responses():
    """Truth: a unit that never responds to a test image (maximum 0) has no maximum to divide by: its curves are
    drawn as measured (3, 1, 0.5), not inf or nan."""
    ax = T.unit_figure(_two_family_unit(dataset_max=0.0)).axes[0]
    np.testing.assert_allclose(_solid(ax)[0].get_ydata(), [3.0, 1.0, 0.5])


def _pasted(fig) -> list[float]:
    """The centre pixel of each pasted stimulus (inside its grey frame)."""
    return [float(im.get_array()[43, 43, 0]) for im in fig.images]


def _captions(fig) -> list[str]:
    return [t.get_text() for t in fig.texts if t is not fig._suptitle]


def test_the_preferred_and_the_labelled_stimuli_are_pasted_in_that_order():
    """Truth: 28×28 stimuli zoomed 100 // 28 = 3 times in a one-pixel frame: 86 × 86; the preferred image (0.25)
    then the labelled one (0.75); when the labelled stimulus is the preferred one, only it is shown."""
    fig = T.unit_figure(_two_family_unit())
    assert [im.get_array().shape for im in fig.images] == [(86, 86, 3)] * 2
    assert _pasted(fig) == [0.25, 0.75]
    assert _captions(fig) == ["preferred", "labelled"]
    same = T.unit_figure(_two_family_unit(label_stimulus=Stimulus("line", angle=90.0)))
    assert _pasted(same) == [0.25] and _captions(same) == ["preferred"]


def test_the_title_gives_an_untuned_units_reason_only():
    """Truth: tuned: 'conv1 channel 5: edge detector'; untuned: the label then the reason in brackets, greyed."""
    assert T.unit_figure(_two_family_unit())._suptitle.get_text() == "conv1 channel 5: edge detector"
    weak = T.unit_figure(_two_family_unit(tuned=False, label="not tuned", reason="too weak"))._suptitle
    assert weak.get_text() == "conv1 channel 5: not tuned (too weak)" and to_hex(weak.get_color()) == "#666666"


# ---- tuning: the stage figure ----------------------------------------------------------------------------------


def _stage():
    """Unit 0 tuned edge (drive 0.9, CV 0.1) though preferring a line; unit 1 untuned line (0.4, 0.7); unit 2 a
    size unit (fall-off), which has no circular variance to plot."""
    best = {"edge": {"drive": 0.9, "sharpness": 0.1, "sharpness_kind": CV},
            "line": {"drive": 0.4, "sharpness": 0.7, "sharpness_kind": CV},
            "blob": {"drive": 0.8, "sharpness": 0.6, "sharpness_kind": FALL}}  # fmt: skip
    units = (replace(unit(0, True, "edge", 0.9, 0.1, CV), family_best=best, preferred=Stimulus("line", angle=0.0)),
             replace(unit(1, False, "line", 0.4, 0.7, CV), family_best=best),
             replace(unit(2, True, "blob", 0.8, 0.6, FALL), family_best=best, preferred=Stimulus("blob")))  # fmt: skip
    return StageTuning("conv1", "conv1.hook_post", {}, units)


def test_the_stage_figure_outlines_the_labelled_and_colours_the_label_family():
    """Truth: two dots only (the size unit left out): unit 0 at (0.9, 0.1) in the edge colour outlined black, unit 1
    at (0.4, 0.7) in the line colour, not outlined; annotated with their channels; the shaded corner runs from the
    drive threshold 0.5 up to circular variance 0.3."""
    ax = T.stage_figure(_stage()).axes[0]
    dots = [c for c in ax.collections if isinstance(c, PathCollection) and len(c.get_offsets()) == 1]
    assert [tuple(np.asarray(c.get_offsets())[0]) for c in dots] == [(0.9, 0.1), (0.4, 0.7)]
    assert [to_hex(c.get_facecolor()[0]) for c in dots] == [T.COLOURS["edge"], T.COLOURS["line"]]
    assert len(dots[0].get_edgecolor()) == 1 and to_hex(dots[0].get_edgecolor()[0]) == "#000000"
    assert len(dots[1].get_edgecolor()) == 0 or dots[1].get_edgecolor()[0][3] == 0
    assert [t.get_text() for t in ax.texts] == ["0", "1"]
    (shade,) = [c for c in ax.collections if not isinstance(c, PathCollection)]
    verts = shade.get_paths()[0].vertices
    assert verts[:, 1].max() == pytest.approx(0.3) and verts[:, 0].min() == pytest.approx(0.5)


# ---- tuning: sentences and the page ----------------------------------------------------------------------------


def _untuned_line(units) -> str:
    return next(s for s in T.summary_lines(tuning_result(units)) if "not tuned to these stimuli:" in s)


def test_silent_units_and_units_at_the_thresholds_are_counted_by_hand():
    """Truth: unit 1 never responds (test max 0), unit 2 has no sharpness at all, unit 3 sits exactly at CV 0.3 and
    unit 4 at fall-off 0.5 (both sharp: '≤ 0.3', '≥ 0.5'), each weak (drive 0.2): 0 too broad, 4 weak, 1 silent."""
    units = [unit(0, True, "edge", 0.9, 0.1, CV), replace(unit(1, False, "line", 0.2, 0.9, CV), dataset_max=0.0),
             unit(2, False, "line", 0.2, None, None), unit(3, False, "line", 0.2, 0.3, CV),
             unit(4, False, "blob", 0.2, 0.5, FALL)]  # fmt: skip
    units[1] = replace(units[1], sharpness=0.3)
    line = _untuned_line(units)
    assert line.startswith("4 units are not tuned to these stimuli: for their preferred family 0 are too broadly")
    assert " and 4 are driven to less than 0.5 of their test-set maximum (a unit can be both); 1 never respond" in line


def _stronger_unit(c: int, own: float, other: float):
    best = {"edge": {"response": own, "drive": own, "sharpness": 0.1, "sharpness_kind": CV},
            "corner": {"response": other, "drive": other, "sharpness": 0.6, "sharpness_kind": CV}}  # fmt: skip
    return replace(unit(c, True, "edge", own, 0.1 + c / 100, CV), family_best=best)


def test_labels_driven_harder_elsewhere_beyond_the_named_are_counted():
    """Truth: three labelled units each driven harder by corners; with n_named 2 the two sharpest are named
    (0: 0.41 against 0.83, 1: 0.52 against 0.94) and '1 more' is counted (3 − 2)."""
    units = [_stronger_unit(0, 0.41, 0.83), _stronger_unit(1, 0.52, 0.94), _stronger_unit(2, 0.63, 0.97)]
    line = next(s for s in T.summary_lines(tuning_result(units), n_named=2) if "respond more strongly" in s)
    assert line.startswith("3 of the 3 labelled units")
    assert line.endswith(": conv1 0 (edge 0.41 against corner 0.83); conv1 1 (edge 0.52 against corner 0.94) and "
                         "1 more.")  # fmt: skip


def test_ten_units_are_named_by_default_and_the_eleventh_counted():
    """Truth: the default names 10 tuned units; 11 leave '1 more in the table' and unit 10 (the least sharp, CV
    0.20) is not named."""
    units = [unit(c, True, "edge", 0.9, 0.1 + c / 100, CV) for c in range(11)]
    line = T.summary_lines(tuning_result(units))[1]
    assert line.endswith("conv1 9: edge detector (CV 0.19, drive 0.90); and 1 more in the table.")


def test_the_stimulus_sentence_gives_height_by_width():
    """Truth: stimuli 20 rows by 28 columns (size is (height, width), as the input's C×H×W): '20×28 pixels'."""
    r = tuning_result([unit(0, True, "edge", 0.9, 0.1, CV)])
    r = replace(r, stimuli=replace(r.stimuli, size=(20, 28)))
    assert T.summary_lines(r)[-1].startswith("6 stimulus images of 20×28 pixels (3 shapes")


def _row(c: int, kind: str, sharpness: float) -> dict:
    return {"tuned": True, "stage": "conv2", "channel": c, "label": f"L{c}", "sharpness_kind": kind,
            "sharpness": sharpness}  # fmt: skip


def test_the_microscope_sentence_orders_size_units_by_highest_fall_off_and_names_six():
    """Truth: oriented units by lowest CV (0.15 then 0.25), then size units by highest fall-off (0.95, 0.85, ...);
    7 tuned units: the default names 6 and counts '1 more'."""
    rows = [_row(0, CV, 0.25), _row(1, FALL, 0.55), _row(2, FALL, 0.95), _row(3, CV, 0.15), _row(4, FALL, 0.85),
            _row(5, FALL, 0.75), _row(6, FALL, 0.65)]  # fmt: skip
    s = T.microscope_sentence({"dir": "D", "units": {str(r["channel"]): r for r in rows}})
    assert s == (
        "Tuning curves on synthetic stimuli (from D): 7 of 7 units tuned, sharpest first: conv2 3 L3 (CV "
        "0.15); conv2 0 L0 (CV 0.25); conv2 2 L2 (size fall-off 0.95); conv2 4 L4 (size fall-off 0.85); "
        "conv2 5 L5 (size fall-off 0.75); conv2 6 L6 (size fall-off 0.65); 1 more in their sections."
    )


def test_the_written_page_states_each_threshold_and_names_each_units_figure(tmp_path, monkeypatch):
    """Truth: the thresholds of the method (CV ≤ 0.3, fall-off ≥ 0.5, drive ≥ 0.5) in the method text; one
    units/STAGE_CHANNEL.png per unit, shown under its own alt text (PNG encoding and the stimuli mosaic stubbed)."""
    monkeypatch.setattr(T, "png_bytes", lambda fig, dpi=80: b"PNG")
    monkeypatch.setattr(T, "stimuli_figure", lambda stim: None)  # the hand-made set has no images to draw
    units = [replace(_two_family_unit(), channel=c, family_best=_stage().units[0].family_best) for c in (3, 7)]
    r = tuning_result(units)
    T.write_report(replace(r, stages=(replace(r.stages[0], receptive_field={"size": [5, 5]}),)), tmp_path)
    assert sorted(p.name for p in (tmp_path / "units").iterdir()) == ["conv1_3.png", "conv1_7.png"]
    html = (tmp_path / "report.html").read_text()
    text = " ".join(html.split())
    assert "circular variance ≤ 0.3 (or fall-off ≥ 0.5) whose best image reaches ≥ 0.5 of" in text
    assert "the dotted line at 0.5 is the drive threshold" in text
    p = Page(html)
    assert {"tuning curves of conv1 channel 3", "tuning curves of conv1 channel 7"} <= set(p.imgs)


# ---- solu-compare ----------------------------------------------------------------------------------------------


def _solu_stage(name, median, share, silent):
    return {"stage": name, "channels": 8, "median": median, "share_ge_0.5": share, "silent": silent}


def test_each_activations_selectivity_sentence_uses_its_own_numbers():
    """Truth: relu (first) median 0.41, 3 of 6 live ≥ 0.5 (2 silent, 50%); gelu median 0.62, all 8 live, 6 of 8
    (75%): each count is its own share × its own live channels, worked out by hand."""
    rows = [
        {"activation": "relu", "test_accuracy": 0.98765, "stages": [_solu_stage("conv1", 0.41, 0.5, 2)]},
        {"activation": "gelu", "test_accuracy": 0.91234, "stages": [_solu_stage("conv1", 0.62, 0.75, 0)]},
    ]
    lines = S.summary_lines({"models": rows})
    assert lines[0] == "Test accuracy: relu 0.9877, gelu 0.9123."
    assert lines[1] == ("Class selectivity of conv1's 8 channels: relu median 0.41 (3 of the 6 that respond ≥ 0.5, "
                        "50%; 2 silent, left out); gelu median 0.62 (6 of the 8 ≥ 0.5, 75%).")  # fmt: skip


def _found(stage: str, index, silent=()):
    return type("Stage", (), {"stage": stage, "index": torch.tensor(index), "silent": tuple(silent)})


def test_the_histogram_has_a_panel_per_stage_and_a_colour_per_activation(monkeypatch):
    """Truth: stage j's panel counts stage j's live indices (numpy histogram, 20 bins of [0, 1]) in each activation's
    own colour; titles name their stages; medians by numpy."""
    figs = captured(monkeypatch, S)
    relu = [_found("conv1", [0.12, 0.14, 0.9]), _found("conv2", [0.55, 0.57, 0.61, 0.2], silent=(3,))]
    solu = [_found("conv1", [0.81, 0.83, 0.35]), _found("conv2", [0.05, 0.96, 0.97, 0.98])]
    S.histogram_figure({"relu": relu, "solu": solu})
    axes = figs[0].axes
    assert [ax.get_title() for ax in axes] == ["conv1: class selectivity of its channels",
                                               "conv2: class selectivity of its channels"]  # fmt: skip
    bins = np.linspace(0, 1, 21)
    for j, ax in enumerate(axes):
        for poly, (act, found) in zip(ax.patches, (("relu", relu), ("solu", solu)), strict=True):
            live = [v for i, v in enumerate(found[j].index.tolist()) if i not in found[j].silent]
            np.testing.assert_allclose(poly.get_xy()[1:-1:2, 1][:20], np.histogram(live, bins=bins)[0])
            assert to_hex(poly.get_edgecolor()) == S.COLOURS[act]
    assert [t.get_text() for t in axes[1].get_legend().get_texts()] == ["relu (median 0.57)", "solu (median 0.97)"]


def test_channel_rows_list_the_silent_channels_in_order():
    """Truth: channels 4 and 1 silent are listed as [1, 4]; the live ones 0, 2, 3 paired most with least."""
    s = type("Stage", (), {"stage": "conv1", "index": torch.tensor([0.3, 0.0, 0.9, 0.6, 0.0]), "silent": (4, 1),
                           "explain_index": torch.zeros(5), "preferred_class": (0, 1, 0, 1, 0)})  # fmt: skip
    (row,) = S.channel_rows([s], ["a", "b"], n=3)
    assert row["silent"] == [1, 4]
    assert [(a["channel"], b["channel"]) for a, b in row["pairs"]] == [(2, 0), (3, 3), (0, 2)]


# ---- sparse-dictionary pages -----------------------------------------------------------------------------------


def test_an_example_whose_image_was_not_kept_is_left_out(monkeypatch):
    """Truth: of two examples only the one whose image (5) is in the kept images is drawn: one tile, its own
    caption '4.56 · one · (1,3)' (value, class name, position)."""
    monkeypatch.setattr(R, "array_uri", lambda a, scale=3: "arr")
    examples = (ex(4.56, 5, 1, (1, 3), (1, 4, 2, 7)), ex(3.21, 99, 0, (2, 0), (0, 6, 0, 3)))
    tiles = R.example_tiles(examples, {5: image(5)}, NAMES, VRANGE)
    assert [t["caption"] for t in tiles] == ["4.56 · one · (1,3)"]


def test_a_splice_that_zeroing_cannot_hurt_states_the_clean_then_the_spliced_accuracy():
    """Truth: accuracy_recovered NaN (zeroing changes nothing): clean 99.35% and spliced 97.58%, each in its place."""
    e = evaluation(accuracy_recovered=float("nan")).effect
    assert R._splice_line(e) == ("Zeroing the activation does not change the test accuracy (99.35%), so no share of "
                                 "it can be recovered; spliced in: 97.58%.")  # fmt: skip


def test_without_densities_every_latent_is_binned(monkeypatch):
    """Truth: no densities recorded: all 16 latents (np.linspace(0.05, 0.95, 16)) are binned by numpy, 16 alive."""
    monkeypatch.setattr(R, "figure_data_uri", lambda fig, dpi: figs.append(fig) or "")
    figs = []
    R.comparison_fig(replace(dashboards(), densities=None))
    ax = figs[0].axes[0]
    want, _ = np.histogram(np.linspace(0.05, 0.95, 16), bins=np.linspace(0, 1, 21), density=True)
    np.testing.assert_allclose([p.get_height() for p in ax.patches[:20]], want)
    assert ax.get_legend().get_texts()[0].get_text() == "latents (16 alive)"


# ---- layer attribution -----------------------------------------------------------------------------------------


@pytest.fixture()
def flat_model():
    """A random CNN with a hidden linear layer: hook_hidden [B, 6] feeds the linear read-out fc directly."""
    torch.manual_seed(3)
    return CNN(CNNConfig(channels=(3, 4), image_size=16, kernel_size=3, n_classes=5, hidden=6)).eval()


def _hidden(model, x) -> np.ndarray:
    with torch.no_grad():
        _, cache = run_with_cache(model, x, names=["hook_hidden"])
    return cache["hook_hidden"].numpy()


def test_attribution_at_a_flat_layer_before_the_read_out_is_the_closed_form(flat_model):
    """Truth: logit_t = W[t]·h + b[t] is linear in h, so ∂logit_t/∂h = W[t] (numpy): a·gradient is h·W[t] and IG
    from the baseline image's h' is (h − h')·W[t] for any path, with no completeness gap; a flat layer has no
    positions, so per_channel is per_position itself."""
    x = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(4))
    t = torch.tensor([0, 3, 1, 4])
    w = flat_model.fc.weight.detach().numpy()[t.numpy()]
    h, h_ref = _hidden(flat_model, x), _hidden(flat_model, torch.full_like(x, 0.2))
    axg = L.layer_activation_x_gradient(flat_model, x, t, "hook_hidden")
    np.testing.assert_allclose(axg.per_channel.numpy(), h * w, rtol=1e-5, atol=1e-6)
    ig = L.layer_integrated_gradients(flat_model, x, t, "hook_hidden", baseline=0.2, n_steps=3, batch_size=5)
    assert ig.per_channel.shape == (4, 6)
    np.testing.assert_allclose(ig.per_channel.numpy(), (h - h_ref) * w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ig.delta.numpy(), np.zeros(4), atol=1e-5)
