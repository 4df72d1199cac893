"""The vision wing's other pages (tuning, universality, discovery, solu-compare, blocks) checked against hand-made
results: each page is rendered, parsed with html.parser (``Page`` of test_cnn_pages_truths) and every table cell is
compared with the result's own field formatted by hand (×100 where a % is shown) under its own header; each figure's
artists (image arrays, line data, patches) are read back and compared with a computation written out here in numpy.

Distinct numbers are used wherever two fields could be swapped unnoticed.
"""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from matplotlib.colors import to_hex

from mechscope.cnn.methods.stimuli import Stimulus
from mechscope.cnn.methods.universality import MatchedPair
from mechscope.cnn.report import blocks_figures as BF
from mechscope.cnn.report import discovery as D
from mechscope.cnn.report import solu_cnn as S
from mechscope.cnn.report import tuning as T
from mechscope.cnn.report import universality as U
from mechscope.core.render.html import render_string
from tests.unit import test_sentences_blocks as blocks_fixture
from tests.unit import test_sentences_tuning as tuning_fixture
from tests.unit import test_sentences_universality as universality_fixture
from tests.unit.test_cnn_pages_truths import Page
from tests.unit.test_cnn_report_truths import tuning_result
from tests.unit.test_lm_report_truths import captured

CV, FALL = "circular variance", "size fall-off"


# ---- tuning ----------------------------------------------------------------------------------------------------


def _tuning_page():
    u = tuning_fixture.unit
    units = (
        replace(u(0, True, "edge", 0.91, 0.12, CV), preferred_response=1.234, dataset_max=2.345, blank=0.011),
        replace(u(1, False, "blob", 0.27, 0.44, FALL), preferred=Stimulus("blob", radius=3.5), preferred_response=0.5,
                dataset_max=1.875, blank=-0.25, reason="too weak"),
    )  # fmt: skip
    r = tuning_result(units)
    r = replace(r, stages=(replace(r.stages[0], receptive_field={"size": [5, 7]}),), seconds={"a": 1.25, "b": 2.0})
    html = render_string("mechscope.cnn", "tuning.html.j2", r=r, sections=[], stage_figs=[], stimuli_fig="s",
                         names=T.NAMES, thresholds={"cv": 0.3, "falloff": 0.5, "drive": 0.5})  # fmt: skip
    return r, html


def test_the_tuning_unit_table_puts_each_field_under_its_header():
    """Truth: each unit's fields as set by hand: 'CV 0.12' / 'fall-off 0.44', drive to 2 decimals, the preferred
    stimulus in words (NAMES: 'edges 45°', 'blobs r 3.5'), preferred_response, dataset_max and blank to 3 decimals."""
    _, html = _tuning_page()
    rows = Page(html).table("unit")
    assert [r["unit"] for r in rows] == ["0", "1"]
    a, b = rows
    assert (a["label"], a["sharpness"], a["drive"], a["preferred stimulus"]) == ("edge detector", "CV 0.12", "0.91",
                                                                                 "edges 45°")  # fmt: skip
    assert (a["its response"], a["test max"], a["black image"]) == ("1.234", "2.345", "0.011")
    assert (b["sharpness"], b["drive"], b["preferred stimulus"]) == ("fall-off 0.44", "0.27", "blobs r 3.5")
    assert (b["its response"], b["test max"], b["black image"], b["why"]) == ("0.500", "1.875", "-0.250", "too weak")


def test_the_tuning_stage_heading_counts_labelled_units_and_the_seconds_add_up():
    """Truth: 1 of the 2 units is tuned; receptive field 5×7 as set; 1.25 + 2.0 = 3.25 s, shown as 3.2 (%.1f)."""
    _, html = _tuning_page()
    assert "conv1 (1 of 2 labelled; receptive field 5×7 px)" in html
    assert "Computed in 3.2 s before" in html


def test_the_stimuli_mosaic_shows_each_familys_centred_stimuli_evenly_picked():
    """Truth: edge stimulus j (position 0) is the constant image j/20, line ones (40 + j)/100; a 2 × 2 pick of 5
    evenly spaced centred edges takes the 1st and the 5th (round(k·4/1)), at off-centre positions never."""
    stims = [Stimulus("edge", position=0)] * 5 + [Stimulus("edge", position=1)] + [Stimulus("line", position=0)] * 2
    vals = [j / 20 for j in range(5)] + [0.99] + [0.40, 0.41]
    images = torch.tensor(vals, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 1, 8, 8).contiguous()
    stim = SimpleNamespace(stimuli=stims, size=(8, 8), images=images)
    fig = T.stimuli_figure(stim, n_per_family=2)
    m = fig.axes[0].get_images()[0].get_array()
    pad = 1
    assert m.shape == (2 * 8 + pad, 2 * 8 + pad)
    np.testing.assert_allclose([m[0, 0], m[0, 9], m[9, 0], m[9, 9]], [0.0, 0.2, 0.40, 0.41], atol=1e-6)
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["edges", "lines"]


def test_a_one_stimulus_mosaic_shows_each_familys_first_centred_stimulus():
    """Truth: one per family is the first centred one (edge 0 is the constant image 0.0, line 0 is 0.40); the even
    spacing k·(n-1)/(per-1) has no spacing to divide by at per = 1 (it divided by zero)."""
    stims = [Stimulus("edge", position=0)] * 3 + [Stimulus("line", position=0)] * 2
    images = torch.tensor([0.0, 0.1, 0.2, 0.40, 0.41]).view(-1, 1, 1, 1).expand(-1, 1, 8, 8).contiguous()
    fig = T.stimuli_figure(SimpleNamespace(stimuli=stims, size=(8, 8), images=images), n_per_family=1)
    m = fig.axes[0].get_images()[0].get_array()
    assert m.shape == (2 * 8 + 1, 8)
    np.testing.assert_allclose([m[0, 0], m[9, 0]], [0.0, 0.40], atol=1e-6)


@pytest.mark.filterwarnings("ignore:No artists with labels")
def test_the_unit_figure_size_and_curvature_panels_divide_by_the_test_max():
    """Truth: curvature (curve family) and radius curves plotted as response / dataset_max = / 4 by hand, each in its
    own panel (panel 2: curvature, panel 3: radius)."""
    from mechscope.cnn.methods.tuning import Curve

    arc = Curve("curve", "curvature", (0.1, 0.2), (2.0, 1.0), (1.0, 1.0), {"angle": 90.0}, None)
    size = Curve("blob", "radius", (2.0, 4.0, 6.0), (4.0, 3.0, 1.0), (1.0, 1.0, 1.0), {}, None)
    u = replace(tuning_fixture.unit(0, True, "blob", 0.5, 0.6, FALL), dataset_max=4.0, curves=(arc, size),
                preferred_image=torch.zeros(1, 28, 28), label_image=None)  # fmt: skip
    fig = T.unit_figure(u)
    ax_curv, ax_rad = fig.axes[1], fig.axes[2]
    np.testing.assert_allclose(ax_curv.get_lines()[0].get_ydata(), [0.5, 0.25])
    np.testing.assert_allclose(ax_rad.get_lines()[0].get_ydata(), [1.0, 0.75, 0.25])
    np.testing.assert_allclose(ax_rad.get_lines()[0].get_xdata(), [2.0, 4.0, 6.0])
    assert "angle 90°" in ax_curv.get_legend().get_texts()[0].get_text()


# ---- universality ----------------------------------------------------------------------------------------------


def _pairs(*r):
    return tuple(MatchedPair(i, i, v) for i, v in enumerate(r))


def _universality():
    """Trained A–B: best_a 0.9, 0.8, 0.7 (median 0.80), best_b 0.95, 0.85, 0.6 (median 0.85), Hungarian 0.6, 0.55,
    0.3 (median 0.55; 2 of 3 ≥ 0.5); baselines: Hungarian (0.4, 0.1, 0.05) and (0.5, 0.1, 0.2) with B's twin's A
    unit 2 dead; CKA 0.9 trained, 0.1 and 0.15 random."""
    r = universality_fixture.make_result()
    tr, ba, bb = r.comparisons
    m = replace(tr.stages[0], best_b=torch.tensor([0.95, 0.85, 0.6]), matched=_pairs(0.6, 0.55, 0.3), dead_b=(),
                rows=1234, observations="image × position")  # fmt: skip
    tr = replace(tr, stages=(m,))
    ba = replace(ba, stages=(replace(ba.stages[0], matched=_pairs(0.4, 0.1, 0.05)),))
    bb = replace(bb, stages=(replace(bb.stages[0], matched=_pairs(0.5, 0.1, 0.2), cka=0.15, dead_a=(2,)),))
    runs = ({"label": "A", "channels": [3], "seed": 11, "test_accuracy": 0.98761, "feature_visualisations": "fa",
             "circuits": "ca", "path": "/p/a"},
            {"label": "B", "channels": [3], "seed": 12, "test_accuracy": 0.97, "feature_visualisations": "fb",
             "circuits": "cb", "path": "/p/b"})  # fmt: skip
    return replace(r, comparisons=(tr, ba, bb), runs=runs)


def _universality_page(r):
    html = render_string("mechscope.cnn", "universality.html.j2", result=r, numbers=U.stage_numbers(r),
                         totals=U.circuit_totals(r), histogram="h", cka="c", sections=[])  # fmt: skip
    p = Page(html)
    p.html = html
    return p


def test_the_stage_table_shows_trained_and_random_medians_shares_and_cka_each_in_its_column():
    """Truth: the medians of _universality's docstring by numpy; baseline best matches: A's twin 0.2 ×6, B's twin
    0.2 ×5 live (median 0.2); shares ×100: 2 of 3 = 67%, and the twins' median of 0 / 3 and 1 / 2 (B's twin's third
    pair has a dead A unit) = 25%."""
    p = _universality_page(_universality())
    (head, row) = next(t for t in p.tables if t[0][:2] == ["stage", "trained: median best match"])
    assert head[1:] == ["trained: median best match", "random: median best match", "trained: median Hungarian pair",
                        "random", "trained: pairs ≥ 0.5", "random", "trained: CKA (images × positions)",
                        "random"]  # fmt: skip
    med_best = np.median([0.9, 0.8, 0.7, 0.95, 0.85, 0.6])
    random_pairs = np.median([0.4, 0.1, 0.05, 0.5, 0.1])  # B's twin's pair 2 has a dead A unit: left out
    assert row == ["conv1", f"{med_best:.3f}", "0.200", "0.550", f"{random_pairs:.3f}", "67%", "25%", "0.900",
                   "0.100, 0.150"]  # fmt: skip


def test_every_pair_table_states_each_directions_median_and_the_dead_counts():
    """Truth: A in B median(0.9, 0.8, 0.7) = 0.800, B in A median(0.95, 0.85, 0.6) = 0.850; rows 1,234; B's twin has
    1 dead unit in its A side."""
    rows = _universality_page(_universality()).table("A", "B")
    assert [(r["A"], r["B"]) for r in rows] == [("A", "B"), ("A", "random A"), ("B", "random B")]
    tr = rows[0]
    assert (tr["median best: A's units in B"], tr["B's in A"], tr["median Hungarian pair"], tr["CKA"]) == (
        "0.800", "0.850", "0.550", "0.900")  # fmt: skip
    assert tr["rows"] == "1,234 (image × position)"
    assert [(r["dead in A"], r["dead in B"]) for r in rows] == [("0", "0"), ("0", "0"), ("1", "0")]


def test_the_runs_and_circuit_tables_hold_each_runs_and_cases_own_fields():
    """Truth: the runs as set by hand (accuracy to 4 decimals); the fixture's circuit cases (class cat: 0, 1 → 0, 1,
    overlap 2, chance 0.70, p 0.010; class dog: 2 → 2 against 1, 0, 0.30, 1.000), totals 2 against 0.7 + 0.3 = 1.0."""
    p = _universality_page(_universality())
    runs = p.table("run")
    assert [(r["run"], r["seed"], r["test accuracy"], r["path"]) for r in runs] == [
        ("A", "11", "0.9876", "/p/a"), ("B", "12", "0.9700", "/p/b")]  # fmt: skip
    cases = p.table("class")
    assert [list(c.values()) for c in cases] == [["cat", "0, 1", "0, 1", "0, 1", "2", "0.70", "0.010"],
                                                 ["dog", "2", "2", "1", "0", "0.30", "1.000"]]  # fmt: skip
    assert "In all: 2 shared channels against 1.0 by chance; 1 of 2 cases with p &lt; 0.05." in p.html


def test_a_unit_view_profile_is_each_class_mean_over_the_largest_absolute_one():
    """Truth: unit 1's class means by a plain loop over (means, labels): cat mean(2, 4) = 3, dog -1, fox 2; heights
    100·|v|/3 = 100, 33.3, 66.7; preferred the argmax (cat); selectivity (Morcos) (3 − 0.5) / (3 + 0.5), μ_rest the
    mean of -1 and 2; the top-2 test images by maximum (3.0 on image 1, 2.5 on image 3) are cat and fox."""
    means = torch.tensor([[0.0, 2.0], [0.0, 4.0], [0.0, -1.0], [0.0, 2.0]])
    maxima = torch.tensor([[9.0, 1.0], [0.0, 3.0], [0.0, 2.0], [0.0, 2.5]])
    y = torch.tensor([0, 0, 1, 2])
    feats = {"A": SimpleNamespace(means={"conv1": means}, maxima={"conv1": maxima})}
    vis = {("A", "conv1", 1): torch.zeros(1, 4, 4)}
    names = ["cat", "dog", "fox"]
    v = U.unit_view("A", "conv1", 1, vis, feats, torch.zeros(4, 1, 4, 4), y, names, (0.0, 1.0), k=2)
    pairs = list(zip([2.0, 4.0, -1.0, 2.0], [0, 0, 1, 2], strict=True))
    by_hand = [np.mean([m for m, c in pairs if c == k]) for k in range(3)]
    assert [p["value"] for p in v["profile"]] == pytest.approx(by_hand)
    assert [p["height"] for p in v["profile"]] == [100.0, 33.3, 66.7]
    assert v["preferred"] == "cat" and v["example_labels"] == ["cat", "fox"]
    assert v["selectivity"] == pytest.approx((3 - 0.5) / (3 + 0.5))


# ---- solu-compare ----------------------------------------------------------------------------------------------


LIVE = [0.32, 0.92, 0.12, 0.62]


def _solu_stage(name, median, q, share, silent, explain):
    return {"stage": name, "channels": 8, "median": median, "quartiles": q, "share_ge_0.5": share, "silent": silent,
            "explain_median": explain}  # fmt: skip


def _channels(stage: str):
    """Indices 0.32, 0.92, 0.12, 0.62, 0.72 with channel 4 silent; preferred classes 0, 1, 2, 0, 1."""
    return SimpleNamespace(stage=stage, index=torch.tensor(LIVE + [0.72]),
                           explain_index=torch.tensor([0.31, 0.91, 0.11, 0.61, 0.71]), preferred_class=(0, 1, 2, 0, 1),
                           silent=(4,), class_means=torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [1.0, 1.0, 1.5],
                                                                  [4.0, 0.0, 2.0], [1.0, 1.0, 1.0]]))  # fmt: skip


def test_the_solu_table_puts_each_stages_numbers_under_its_headers():
    """Truth: per activation and stage as set by hand: median 3 decimals, quartiles 2, share ×100, silent / channels,
    explain's median; an all-silent stage spans three cells."""
    models = [
        {"activation": "relu", "test_accuracy": 0.98765, "train_seconds": 12.4, "n_parameters": 12345, "dir": "d/relu",
         "stages": [_solu_stage("conv1", 0.412, (0.21, 0.63), 0.375, 1, 0.456)]},
        {"activation": "solu", "test_accuracy": 0.5, "train_seconds": 3.0, "n_parameters": 99, "dir": "d/solu",
         "stages": [_solu_stage("conv1", None, None, 0.0, 8, None)]},
    ]  # fmt: skip
    result = {"models": models, "shape": {"channels": 8}, "training": {"seed": 1, "epochs": 2, "batch_size": 3,
              "lr": 0.01}, "dataset": "toy", "test_images": 100, "test_set": 100, "seconds": {"total": 5.0},
              "summary": []}  # fmt: skip
    html = render_string("mechscope.cnn", "solu_cnn.html.j2", result=result, histogram="h", profiles="p", channels={})
    head, relu, solu = next(t for t in Page(html).tables if t[0][0] == "activation")
    assert head[:9] == ["activation", "test accuracy", "training", "parameters", "conv1: median selectivity",
                        "quartiles", "≥ 0.5", "silent", "explain's median"]  # fmt: skip
    assert relu == ["relu", "0.9877", "12 s", "12,345", "0.412", "0.21–0.63", "38%", "1 / 8", "0.456", "d/relu/"]
    assert solu == ["solu", "0.5000", "3 s", "99", "all silent", "8 / 8", "", "d/solu/"]


def test_solu_channel_rows_pair_the_most_with_the_least_selective_live_channels():
    """Truth: live channels sorted by index by hand: 1 (0.92), 3 (0.62), 0 (0.32), 2 (0.12); silent 4 left out; with n 2
    the most selective 1, 3 beside the least 2, 0, each with its own index, explain index and class name."""
    (row,) = S.channel_rows([_channels("conv2")], ["cat", "dog", "fox"], n=2)
    assert row["silent"] == [4]
    assert [(a["channel"], b["channel"]) for a, b in row["pairs"]] == [(1, 2), (3, 0)]
    a, b = row["pairs"][0]
    assert (a["index"], a["explain"], a["preferred"]) == pytest.approx((0.92, 0.91, "dog"))
    assert (b["index"], b["explain"], b["preferred"]) == pytest.approx((0.12, 0.11, "fox"))


def test_solu_histogram_counts_live_channels_only(monkeypatch):
    """Truth: the live indices 0.32, 0.92, 0.12, 0.62 counted into 20 bins of width 0.05 by numpy; silent 0.72 not."""
    figs = captured(monkeypatch, S)
    S.histogram_figure({"relu": [_channels("conv1")]})
    ax = figs[0].axes[0]
    counts, _ = np.histogram(LIVE, bins=np.linspace(0, 1, 21))
    (poly,) = ax.patches
    steps = poly.get_xy()[1:-1:2, 1]  # a step outline: the top of each bin once
    np.testing.assert_allclose(steps[: len(counts)], counts)
    assert ax.get_legend().get_texts()[0].get_text() == f"relu (median {np.median(LIVE):.2f})"


def test_solu_profiles_are_row_normalised_and_sorted_by_preferred_class(monkeypatch):
    """Truth: rows sorted by (argmax class, −index): class 0's channels 4 (equal means, index 0.72), 3 (0.62), 0 (0.32),
    then 1 (class 1), 2 (class 2); each row (m − min) / (max − min) written out by hand (0 for equal means)."""
    figs = captured(monkeypatch, S)
    first = SimpleNamespace(stage="conv1", index=torch.tensor([0.5]), class_means=torch.tensor([[0.0, 9.0, 1.0]]))
    S.profile_figure({"relu": [first, _channels("conv2")]}, ["cat", "dog", "fox"])
    assert figs[0].axes[0].get_title().startswith("relu: conv2")  # the last stage
    img = np.asarray(figs[0].axes[0].get_images()[0].get_array())
    expected = {4: [0, 0, 0], 3: [1, 0, 0.5], 0: [1, 1 / 3, 0], 1: [0, 1, 0.5], 2: [0, 0, 1]}
    np.testing.assert_allclose(img, [expected[c] for c in (4, 3, 0, 1, 2)], atol=1e-6)


# ---- discovery -------------------------------------------------------------------------------------------------


def test_the_discovery_edge_table_lists_the_strongest_edges_largest_first_with_signs():
    """Truth: scores (0.1, −0.5, 0.0, 0.3) sorted by |score| by hand: e1 −0.5, e3 +0.3, e0 +0.1; the zero edge is not
    listed and the note counts 1 of 4 edges."""
    scores = np.array([0.1, -0.5, 0.0, 0.3])
    edges = [("in", "conv1.c0"), ("conv1.c0", "conv2.c1"), ("conv1.c1", "conv2.c0"), ("conv2.c1", "logits")]
    es = SimpleNamespace(graph=SimpleNamespace(edges=edges, n_edges=4), scores=scores,
                         order=lambda: np.argsort(-np.abs(scores), kind="stable"))  # fmt: skip
    r = SimpleNamespace(scores=es)
    assert D.top_rows(r) == [["conv1.c0 → conv2.c1", "-0.5"], ["conv2.c1 → logits", "+0.3"], ["in → conv1.c0", "+0.1"]]
    ctx = {"result": SimpleNamespace(run="R", method="eap", task_description="t", hand=None), "settings": {"n": 5},
           "metric": "m", "summary": [], "score_words": "w", "curve_words": "", "circuit_uri": "c", "channel_uri": "h",
           "faithfulness_uri": None,
           "top_rows": D.top_rows(r), "zero_note": "1 of the 4 edges score exactly 0"}  # fmt: skip
    rows = Page(render_string("mechscope.cnn", "discovery.html.j2", **ctx)).table("edge")
    assert [(x["edge"], x["score"]) for x in rows] == [tuple(t) for t in D.top_rows(r)]


# ---- blocks figures --------------------------------------------------------------------------------------------


def test_the_mosaic_places_cells_row_major_and_fades_each_by_its_strength():
    """Truth: in a 2 × 3 grid cell i sits at row i // 3, column i % 3 (plain loop), faded as a·c + (1 − a)·white;
    the one-pixel gaps stay white."""
    cells = np.arange(12, dtype=float).reshape(6, 1, 2) / 12  # [6, 1, 2]
    strength = np.array([1.0, 0.5, 0.0, 0.25, 0.75, 0.1])
    out = BF.mosaic(cells, (2, 3), strength)
    expected = np.ones((3, 8))
    for i in range(6):
        y, x = 2 * (i // 3), 3 * (i % 3)
        expected[y, x : x + 2] = strength[i] * cells[i, 0] + (1 - strength[i])
    np.testing.assert_allclose(out, expected)


def test_a_box_outline_is_two_pixels_inside_the_scaled_box():
    """Truth: box rows 1–4, columns 2–5 (exclusive ends) at scale 2 cover pixels 2–7 × 4–9; the outline is the two
    outermost rows and columns of that rectangle, counted by hand: 2·6 + 2·6 + 2·2 + 2·2 = 32 pixels."""
    out = BF.boxed(np.zeros((20, 20, 3)), (1, 4, 2, 5), 2, colour=(1.0, 0.0, 0.0))
    on = {(int(y), int(x)) for y, x in zip(*np.nonzero(out[..., 0]), strict=True)}
    rect = {(y, x) for y in range(2, 8) for x in range(4, 10)}
    inner = {(y, x) for y in range(4, 6) for x in range(6, 8)}
    assert on == rect - inner and len(on) == 32


def test_the_curve_figure_plots_each_stages_curve_and_circles_its_chosen_k(monkeypatch):
    """Truth: conv1's curve (0.5, 0.8, 0.95) over k = 1, 2, 3 with k 2 circled at 0.8; conv2's (0.3, 0.6) with k 1
    circled at 0.3; the threshold line at 0.9."""
    figs = captured(monkeypatch, BF)
    BF.curve_fig({"conv1": (0.5, 0.8, 0.95), "conv2": (0.3, 0.6)}, {"conv1": 2, "conv2": 1}, 0.9)
    lines = figs[0].axes[0].get_lines()
    data = [(list(ln.get_xdata()), list(ln.get_ydata())) for ln in lines]
    assert data[:4] == [([1, 2, 3], [0.5, 0.8, 0.95]), ([2], [0.8]), ([1, 2], [0.3, 0.6]), ([1], [0.3])]
    assert list(lines[4].get_ydata()) == [0.9, 0.9]
    assert lines[1].get_color() == lines[0].get_color() and lines[3].get_color() == lines[2].get_color()


def test_flow_links_are_drawn_thinnest_first_with_width_and_sign_colours(monkeypatch):
    """Truth: links of width 0.9 (value −2, against: blue) and 0.2 (value +1, for: red) drawn as bands 0.5 + 11·w
    wide, the thinner first; each band ends at its own nodes' columns (0 → 1 starts at x 0.45, ends at 2.55)."""
    figs = captured(monkeypatch, BF)
    cols = [{"name": "conv1", "nodes": [{"label": "g1", "image": None}, {"label": "g2", "image": None}]},
            {"name": "classes", "nodes": [{"label": "cat", "image": None}]}]  # fmt: skip
    links = [{"col": 0, "src": 0, "dst": 0, "value": -2.0, "width": 0.9},
             {"col": 0, "src": 1, "dst": 0, "value": 1.0, "width": 0.2}]  # fmt: skip
    BF.flow_fig(cols, links, "t")
    bands = figs[0].axes[0].patches
    assert [b.get_linewidth() for b in bands] == pytest.approx([0.5 + 11 * 0.2, 0.5 + 11 * 0.9])
    assert [to_hex(b.get_edgecolor()) for b in bands] == [BF.POS, BF.NEG]
    ends = [(b.get_path().vertices[0][1], b.get_path().vertices[-1][1]) for b in bands]
    assert ends == [(0.0, 0.5), (1.0, 0.5)]  # y = (tallest − 1)/2 − (i − (n − 1)/2): g2 at 0, g1 at 1, cat at 0.5
    np.testing.assert_allclose(bands[0].get_path().vertices[[0, -1], 0], [0.45, 2.55])


def test_the_input_figure_shows_each_image_under_its_title(monkeypatch):
    """Truth: image k is the constant k/4 as given, titled as given, in order."""
    figs = captured(monkeypatch, BF)
    images = np.stack([np.full((3, 3), k / 4) for k in range(3)])
    BF.input_fig(images, ["#1 cat", "#5 dog", "#9 fox"])
    axes = figs[0].axes
    assert [ax.get_title() for ax in axes] == ["#1 cat", "#5 dog", "#9 fox"]
    assert [float(ax.get_images()[0].get_array().mean()) for ax in axes] == pytest.approx([0.0, 0.25, 0.5])


def test_the_activation_grid_fades_each_cell_by_its_norm_over_the_largest(monkeypatch):
    """Truth: black cells with norms 2, 1, 0, 4 fade to 1 − norm / 4 = 0.5, 0.75, 1, 0 (quadrant centres of the 8 × 8
    resized mosaic); the input (×2) gets the orange cell border at row and column 4."""
    got = {}
    monkeypatch.setattr(BF, "panel_fig", lambda panels, *a, **k: got.setdefault("panels", panels) and "")
    row = {"image": np.full((4, 4), 0.3), "norms": np.array([2.0, 1.0, 0.0, 4.0]), "cells": np.zeros((4, 1, 1)),
           "label": "#3 cat"}  # fmt: skip
    BF.grid_fig([row], (2, 2), "conv1", (0, 5, 0, 5), size=8)
    image, big = got["panels"][0]
    np.testing.assert_allclose([big[1, 1, 0], big[1, 6, 0], big[6, 1, 0], big[6, 6, 0]], [0.5, 0.75, 1.0, 0.0],
                               atol=1 / 255)  # fmt: skip
    np.testing.assert_allclose(image[4, 0], (1.0, 0.5, 0.05))
    np.testing.assert_allclose(image[:, 4][0], (1.0, 0.5, 0.05))
    np.testing.assert_allclose(image[0, 0], (0.3, 0.3, 0.3))


def test_the_dictionary_titles_name_each_channel_and_its_value(monkeypatch):
    """Truth: a row's channels 7 (1.234) and 2 (0.5) titled 'ch 7: 1.23', 'ch 2: 0.50' after 'where', 'cell'; the row
    label names the cell's (row, column)."""
    got = {}
    monkeypatch.setattr(BF, "panel_fig", lambda panels, labels, titles, *a, **k: got.update(t=titles, l=labels))
    chans = [{"channel": 7, "value": 1.234, "image": np.zeros((2, 2))},
             {"channel": 2, "value": 0.5, "image": np.ones((2, 2))}]  # fmt: skip
    row = {"input": np.zeros((2, 2)), "box": (0, 1, 0, 1), "cell": np.zeros((2, 2)), "cell_yx": (1, 0),
           "channels": chans}  # fmt: skip
    BF.dictionary_fig([row], "conv1")
    assert got["t"] == [["where", "cell", "ch 7: 1.23", "ch 2: 0.50"]] and got["l"] == ["cell (1, 0)"]


def test_an_overlay_scales_the_heat_to_its_maximum_through_inferno():
    """Truth: heat (0, 0.2, 0.4) normalised to (0, 0.5, 1): matplotlib's inferno there, mixed 0.6 with grey 0.5."""
    from matplotlib import colormaps

    out = BF.overlay(np.array([[0.5, 0.5, 0.5]]), np.array([[0.0, 0.2, 0.4]]), 1)
    for j, v in enumerate((0.0, 0.5, 1.0)):
        np.testing.assert_allclose(out[0, j], 0.4 * 0.5 + 0.6 * np.array(colormaps["inferno"](v)[:3]))


def test_panels_are_tiled_row_by_row_below_their_title_gap(monkeypatch):
    """Truth: 8 × 8 panels with gaps w // 8 = 1 across and round(0.3 / (1.05 / 8)) = 2 above each row: panel (i, j)
    starts at row i·10 + 2, column j·9; the gaps are white; a row's label sits at its middle (row i·10 + 2 + 4)."""
    figs = captured(monkeypatch, BF)
    rows = [[np.full((8, 8, 3), 0.1), np.full((8, 8, 3), 0.2)], [np.full((8, 8, 3), 0.3)]]
    BF.panel_fig(rows, ["a", "b"], [["t1", "t2"], []], "title")
    canvas = np.asarray(figs[0].axes[0].get_images()[0].get_array())
    assert canvas.shape == (2 * 10, 2 * 9, 3)
    for (i, j), v in {(0, 0): 0.1, (0, 1): 0.2, (1, 0): 0.3}.items():
        y, x = i * 10 + 2, j * 9
        np.testing.assert_allclose(canvas[y : y + 8, x : x + 8], v)
        np.testing.assert_allclose(canvas[y - 1, x], 1.0)
    np.testing.assert_allclose(canvas[12:20, 9:17], 1.0)  # no panel (1, 1)
    texts = [(t.get_text(), t.get_position()[1]) for t in figs[0].axes[0].texts]
    assert texts == [("t1", 0), ("t2", 0), ("a", 6), ("b", 16)]  # titles 2 above a panel, labels at its middle


def test_the_blocks_section_states_the_crop_inclusive_and_the_threshold_in_percent():
    """Truth: crop (1, 6, 2, 9) with exclusive ends is rows 1–5 and columns 2–8 inclusive; threshold 0.85 is 85%;
    a 2 × 2 grid over a 2 × 3 map says the positions are averaged into cells."""
    r = blocks_fixture.make_result()
    lb = replace(r.layers[0], crop=(1, 6, 2, 9), shape=(3, 2, 3))
    settings = {"run": None, "steps": 1, "seed": 0, "groups": None, "threshold": 0.85, "typical": None}
    r = replace(r, settings=settings)
    sec = {"lb": lb, "line": "L", "grids": ["g"], "dictionary": "d", "groups": "p"}
    html = render_string("mechscope.cnn", "blocks.html.j2", r=r, summary=[], inputs="i", curve="c", flow="f",
                         sections=[sec], classes=[0, 1], exact=[False, True])  # fmt: skip
    assert "(rows 1–5, columns 2–8, inclusive)" in html
    assert "the smallest k whose variance explained reaches 85%" in html
    assert "Grid of 2×2 cells (the 2×3 positions averaged into cells)" in html


def test_the_discovery_circuit_draws_the_strongest_edges_with_width_and_sign(monkeypatch):
    """Truth: edge scores 0.2, −0.8, 0.4 ranked by |score| by hand (−0.8, 0.4, 0.2), widths |s| / 0.8 = 1, 0.5, 0.25;
    red (#b2182b) for the negative one, blue for the others; with max_edges 2 the weakest is left out."""
    got = {}
    monkeypatch.setattr(D.CL, "draw_circuit", lambda ax, nodes, edges, *a, **k: got.update(nodes=nodes, edges=edges))
    monkeypatch.setattr(D, "figure_data_uri", lambda fig: "")
    layer = {"in": 0, "conv1.c0": 1, "conv1.c1": 1, "logits.c0": 2}
    g = SimpleNamespace(node=lambda n: SimpleNamespace(layer=layer[n], index=int(n[-1]) if "c" in n else 0,
                                                       kind="channel"), nodes=[SimpleNamespace(layer=2)])  # fmt: skip
    edges = (("in", "conv1.c0", 0), ("conv1.c1", "logits.c0", 0), ("conv1.c0", "logits.c0", 0))
    circuit = type("Circuit", (), {"edges": edges, "scores": (0.2, -0.8, 0.4), "__len__": lambda self: 3})()
    r = SimpleNamespace(scores=SimpleNamespace(graph=g), circuit=circuit, hand=None, method="eap")
    D.circuit_figure(r, max_edges=2)
    assert [(e["a"], e["b"], e["width"], e["colour"]) for e in got["edges"]] == [
        ("conv1.c1", "logits.c0", 1.0, "#b2182b"), ("conv1.c0", "logits.c0", 0.5, "#2166ac")]  # fmt: skip
    assert got["nodes"] == ["conv1.c0", "conv1.c1", "logits.c0"]
