"""The pages of ``cnn sae`` (cnn/report/sae.py and its templates) checked against hand-made results: the HTML parsed
with html.parser (``Page`` of test_cnn_pages_truths), each cell compared with its field formatted by hand (×100
where a % is shown), the inline SVG bars read back and compared with heights computed by hand, the example tiles'
PNG arrays captured and compared with numpy slices, the matplotlib figures' artists read back, and the control's
verdict at each threshold's boundary. Every number is distinct wherever two fields could be swapped unnoticed.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mechscope.cnn.methods.sae import (
    CnnLatentDashboard,
    CnnSaeDashboards,
    CnnSaeEvaluation,
    CnnSaeTraining,
    ImageExample,
    SpliceAccuracy,
    UnitTuningSummary,
)
from mechscope.cnn.report import cnn_figures as F
from mechscope.cnn.report import sae as R
from tests.unit.test_cnn_pages_truths import Page

NAMES = ("zero", "one", "two")
VRANGE = (-1.0, 3.0)


class Svgs(HTMLParser):
    """Each <svg>: its bars (x, y, height, fill, tooltip), its lines and its texts, in order."""

    def __init__(self, html: str):
        super().__init__()
        self.svgs, self._text, self._in = [], None, False
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "svg":
            self._in = True
            self.svgs.append({"rects": [], "texts": [], "lines": []})
        elif tag == "rect":
            self.svgs[-1]["rects"].append({k: a[k] for k in ("x", "y", "height", "fill")} | {"tip": ""})
        elif tag == "line":
            self.svgs[-1]["lines"].append(a)
        elif tag in ("text", "title") and self._in:
            self._text = tag

    def handle_endtag(self, tag):
        self._text = None
        self._in = self._in and tag != "svg"

    def handle_data(self, data):
        if self._text == "title":
            self.svgs[-1]["rects"][-1]["tip"] += data
        elif self._text == "text":
            self.svgs[-1]["texts"].append(data)


def heights(svg) -> list[float]:
    return [float(r["height"]) for r in svg["rects"]]


# ---- bars_svg -----------------------------------------------------------------------------------------------


def test_bars_heights_positions_and_colours_by_hand():
    """Truth: height 80 leaves 54 px to plot; values 2, -1, 0.5 span 3, so the bars are 36, 18 and 9 px, the zero
    line at 12 + 54·2/3 = 48, up bars ending on it (y 12 and 39) in blue, the down bar starting on it in red."""
    svg = Svgs(R.bars_svg([2.0, -1.0, 0.5], ["a", "bb", "ccc"], "T<&>", width=230, height=80)).svgs[0]
    assert heights(svg) == [36.0, 18.0, 9.0]
    assert [float(r["y"]) for r in svg["rects"]] == [12.0, 48.0, 39.0]
    assert [r["fill"] for r in svg["rects"]] == ["#3182bd", "#de2d26", "#3182bd"]
    assert [float(r["x"]) for r in svg["rects"]] == [5.0, 78.3, 151.7]  # 5 + i·220/3, to a tenth
    assert [r["tip"] for r in svg["rects"]] == ["a: 2", "bb: -1", "ccc: 0.5"]
    assert float(svg["lines"][0]["y1"]) == 48.0
    assert svg["texts"] == ["T<&>", "a", "bb", "ccc"]  # the title escaped, read back as itself


def test_bars_all_positive_or_all_negative_keep_the_zero_line_at_an_edge():
    """Truth: all values up: the zero line is at the bottom of the plot (12 + 54); all down: at its top (12)."""
    up = Svgs(R.bars_svg([1.0, 3.0], None, height=80)).svgs[0]
    assert heights(up) == [18.0, 54.0] and float(up["lines"][0]["y1"]) == 66.0
    down = Svgs(R.bars_svg([-1.0, -3.0], None, height=80)).svgs[0]
    assert heights(down) == [18.0, 54.0] and float(down["lines"][0]["y1"]) == 12.0
    assert [r["tip"] for r in up["rects"]] == ["0: 1", "1: 3"]  # no labels: the index


def test_bar_labels_are_cut_to_six_characters_and_shown_up_to_forty():
    """Truth: 40 labels are written under the bars (6 characters each), 41 are not; without labels a histogram's
    first and last edges label the axis."""
    forty = Svgs(R.bars_svg(np.ones(40), [f"label{i:02d}" for i in range(40)], "t")).svgs[0]
    assert forty["texts"][1:] == [f"label{i:02d}"[:6] for i in range(40)]
    many = Svgs(R.bars_svg(np.ones(41), [f"l{i}" for i in range(41)], "t")).svgs[0]
    assert many["texts"] == ["t"]  # the title, no labels
    hist = Svgs(R.bars_svg([3, 5], None, "h", edges=[0.25, 0.5, 0.75])).svgs[0]
    assert hist["texts"] == ["h", "0.25", "0.75"]


# ---- a hand-made dashboards result ------------------------------------------------------------------------------


def image(seed: int) -> np.ndarray:
    """[1, 6, 8] input values in VRANGE (not square: rows and columns cannot be swapped unnoticed)."""
    return np.random.default_rng(seed).uniform(*VRANGE, size=(1, 6, 8))


def ex(value, img, label, pos, box) -> ImageExample:
    return ImageExample(value=value, image=img, label=label, position=pos, box=box)


def board(latent: int, **kw) -> CnnLatentDashboard:
    fields = dict(
        latent=latent, density=0.0123, max=4.56, mean_when_active=1.78,
        top=(ex(4.56, 5, 1, (1, 3), (1, 4, 2, 7)), ex(3.21, 9, 0, (2, 0), (0, 6, 0, 3))),
        band_edges=(0.2, 1.1, 4.56),
        bands=((ex(0.7, 9, 0, (0, 1), (0, 2, 1, 3)),), (ex(2.5, 5, 2, (1, 2), (2, 5, 4, 8)),)),
        hist_counts=(1200, 30, 4), hist_edges=(0.2, 1.5, 3.0, 4.56), class_means=(0.1, 0.9, 0.3),
        selectivity=0.62, preferred_class=1, tuning=UnitTuningSummary(False, "edge 45°", "too weak"),
        class_effect=(0.4, -0.1, -0.3), mixes=((2, -0.75), (0, 0.5)), why="asked", featvis=torch.tensor(image(7)),
    )  # fmt: skip
    return CnnLatentDashboard(**(fields | kw))


def dashboards() -> CnnSaeDashboards:
    comparison = {
        "threshold": 0.45,
        "channels": {"units": 4, "selective": 1, "median_index": 0.31, "tuned": 3, "selective_or_tuned": 2},
        "latents": {"units": 12, "selective": 5, "median_index": 0.52, "tuned": 6, "selective_or_tuned": 9},
        "random_sparse": {"units": 11, "selective": 2, "median_index": 0.27, "k": 3, "tuned": 7},
    }  # fmt: skip
    other = board(3, density=0.25, max=9.87, mean_when_active=6.54, selectivity=0.11, preferred_class=2,
                  tuning=None, class_effect=None, mixes=(), why="random", featvis=None)  # fmt: skip
    return CnnSaeDashboards(
        run="RUN", dictionary="DICT", hook="conv2.hook_out", architecture="topk", d_in=4, d_sae=16, dataset="toy",
        class_names=NAMES, images=1234, dead_fraction=0.25, comparison=comparison,
        channel_selectivity=(0.11, 0.62, 0.33, 0.74), channel_preferred=(2, 0, 1, 1),
        channel_tuning=tuple(UnitTuningSummary(t, lab, "") for t, lab in ((True, "edge"), (False, "blob"),
                                                                         (True, "loop"), (False, "line"))),
        latent_selectivity=tuple(np.linspace(0.05, 0.95, 16)), latent_preferred=(0,) * 16, latent_tuned=(),
        latents=(board(7), other), summary=("first line", "second line"), seconds={"latents": 1.25},
        value_range=VRANGE, densities=np.array([0.0] * 4 + [0.1] * 12), example_images={5: image(5), 9: image(9)},
    )  # fmt: skip


@pytest.fixture(scope="module")
def dash():
    """The dashboards page with every figure and image captured: figures as ``fig:N``, PNG arrays as ``arr:N``."""
    mp = pytest.MonkeyPatch()
    figures, arrays = [], []
    mp.setattr(R, "figure_data_uri", lambda fig, dpi: figures.append(fig) or f"fig:{len(figures) - 1}")
    mp.setattr(R, "array_uri", lambda a, scale=3: arrays.append((np.array(a), scale)) or f"arr:{len(arrays) - 1}")
    r = dashboards()
    try:
        html = R.dashboards_page(r)
    finally:
        mp.undo()
    p = Page(html)
    p.r, p.figures, p.arrays, p.html, p.svgs = r, figures, arrays, html, Svgs(html).svgs
    return p


def test_the_comparison_table_puts_each_count_under_its_header(dash):
    """Truth: the comparison dict written out in the test, one row per side, 0.45 in the header."""
    rows = dash.table("")
    sel = "class-selective (index ≥ 0.45)"
    got = [(r["units"], r[sel], r["median index"], r["stroke-tuned"], r["selective or tuned"]) for r in rows]
    assert got == [("4", "1", "0.31", "3", "2"), ("12", "5", "0.52", "6", "9"), ("11", "2", "0.27", "7", "")]


def test_the_channel_table_names_each_channels_own_class_and_tuning(dash):
    """Truth: channel_preferred (2, 0, 1, 1) names two, zero, one, one; tuned channels 0 and 2 show their label."""
    rows = dash.table("channel", "preferred class")
    got = [(r["channel"], r["preferred class"], r["selectivity"], r["tuning"]) for r in rows]
    assert got == [("0", "two", "0.11", "edge"), ("1", "zero", "0.62", "—"), ("2", "one", "0.33", "loop"),
                   ("3", "one", "0.74", "—")]  # fmt: skip


def test_the_decoder_table_names_each_channels_class_and_selectivity(dash):
    """Truth: mixes (2, −0.75), (0, +0.5); channel_preferred (2, 0, 1, 1): channel 2 prefers class 1, one
    (selectivity 0.33), channel 0 class 2, two (0.11)."""
    rows = dash.table("channel", "weight")
    assert [list(r.values()) for r in rows] == [["2", "-0.750", "one", "0.33"], ["0", "+0.500", "two", "0.11"]]


def test_each_board_states_its_own_numbers(dash):
    """Truth: latent 7's density 0.0123, max 4.56, mean 1.78, class one, 0.62, an untuned label with its reason;
    latent 3's 0.2500, 9.87, 6.54, class two, 0.11 (the fields set in board())."""
    text = " ".join(dash.html.split())
    assert ("density 0.0123 · max 4.56 · mean when active 1.78 · prefers one (selectivity 0.62) · tuning: edge 45° "
            "(too weak)") in text  # fmt: skip
    assert "density 0.2500 · max 9.87 · mean when active 6.54 · prefers two (selectivity 0.11)</p>" in text
    assert 'Latent 7 <span class="muted">(asked)</span>' in text and "(random)" in text


def test_the_profile_bars_are_the_class_means_the_histogram_and_the_effect(dash):
    """Truth: latent 7's SVGs in order: class means (0.1, 0.9, 0.3) over a span of 0.9, the histogram 1200, 30, 4
    (1,234 in all, edges 0.2 to 4.56), the effect (0.4, −0.1, −0.3) over 0.7, the decoder (−0.75, 0.5) over 1.25;
    heights 54·|v|/span on the 80-px charts (the decoder's too)."""
    means, hist, effect, dec = dash.svgs[:4]
    assert means["texts"][0] == "mean per class (selectivity 0.62)" and means["texts"][1:] == list(NAMES)
    assert np.allclose(heights(means), [6.0, 54.0, 18.0], atol=0.051)
    assert hist["texts"] == ["activations where it fires (1,234)", "0.2", "4.56"]
    assert np.allclose(heights(hist), [54.0, 54 * 30 / 1200, 54 * 4 / 1200], atol=0.051)
    assert effect["texts"][0] == "direct effect on the logits (centred)"
    assert np.allclose(heights(effect), [30.9, 7.7, 23.1], atol=0.051)
    assert [r["fill"] for r in effect["rects"]] == ["#3182bd", "#de2d26", "#de2d26"]
    assert dec["texts"] == ["decoder: largest channel weights", "ch2", "ch0"]
    assert np.allclose(heights(dec), [32.4, 21.6], atol=0.051)
    second = dash.svgs[4]  # latent 3: no effect, no decoder
    assert second["texts"][0] == "mean per class (selectivity 0.11)" and len(dash.svgs) == 6


def grey(seed: int) -> np.ndarray:
    """[6, 8, 3] the image in [0, 1] by hand: (v + 1) / 4 for VRANGE (−1, 3), the one channel thrice."""
    g = (image(seed)[0] + 1.0) / 4.0
    return np.stack([g, g, g], axis=-1)


def test_each_tile_outlines_its_box_and_enlarges_its_patch(dash):
    """Truth: the first top example (image 5, box rows 1–4, columns 2–7): its PNG is the grey image ×3 with the
    box's edges orange and every other pixel untouched; its patch is the numpy slice [1:4, 2:7], zoomed 84 // 3."""
    first = dash.html.split("Top activations")[1]
    n = int(first.split('src="arr:')[1].split('"')[0])  # the first top tile's image, then its patch
    big, scale = dash.arrays[n]
    want = grey(5).repeat(3, 0).repeat(3, 1)
    edge = np.zeros(want.shape[:2], bool)
    edge[3:12, [6, 20]] = edge[[3, 11], 6:21] = True
    assert scale == 1 and np.allclose(big[edge], [1.0, 0.5, 0.05]) and np.allclose(big[~edge], want[~edge])
    patch, zoom = dash.arrays[n + 1]
    assert np.allclose(patch, grey(5)[1:4, 2:7]) and zoom == 28
    captions = first.split("<figcaption>")[1:3]
    assert [c.split("<")[0] for c in captions] == ["4.56 · one · (1,3)", "3.21 · zero · (2,0)"]


def test_the_feature_visualisation_is_drawn_in_the_datasets_value_range(dash):
    """Truth: latent 7's featvis, image(7) in VRANGE (−1, 3), drawn as (v + 1) / 4, enlarged ×3; latent 3 has none.
    The summary lines are the result's own, one item each."""
    n = int(dash.imgs["feature visualisation"][4:])
    got, scale = dash.arrays[n]
    assert scale == 3 and np.allclose(got, grey(7))
    assert dash.html.count('alt="feature visualisation"') == 1
    assert "<ul><li>first line</li><li>second line</li></ul>" in dash.html


def test_the_bands_come_highest_first_with_their_edges(dash):
    """Truth: band_edges (0.2, 1.1, 4.56): the higher band (1.1, 4.56] holds the 2.5 example and comes first, open."""
    html = dash.html.split("Latent 3")[0]
    hi, lo = html.index("(1.1, 4.56]"), html.index("(0.2, 1.1]")
    assert hi < lo and html[:hi].endswith("<details open><summary>quantile band ")
    assert html.index("2.5 · two · (1,2)") < lo < html.index("0.7 · zero · (0,1)")


def test_the_comparison_figure_bins_alive_latents_and_channels(dash):
    """Truth: densities zero for latents 0–3: the 12 alive latents' selectivity (np.linspace(0.05, 0.95, 16)[4:])
    and the 4 channels', density histograms on 20 bins of [0, 1]; the dashed line at the threshold 0.45."""
    (fig,) = dash.figures
    ax = fig.axes[0]
    bins = np.linspace(0, 1, 21)
    want_lt, _ = np.histogram(np.linspace(0.05, 0.95, 16)[4:], bins=bins, density=True)
    got_lt = [p.get_height() for p in ax.patches[:20]]
    assert np.allclose(got_lt, want_lt)
    want_ch, _ = np.histogram([0.11, 0.62, 0.33, 0.74], bins=bins, density=True)
    step = ax.patches[20].get_xy()[:, 1]  # the channels' outline: the top of each bin, twice
    assert np.allclose(step[1:41:2], want_ch)
    assert ax.lines[0].get_xdata()[0] == 0.45
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["latents (12 alive)", "channels (4)"]


def test_an_rgb_image_keeps_its_channels_in_order_and_rows_as_rows():
    """Truth: a [3, 2, 4] image with channel c, row y, column x holding c + 10y + 100x over vrange (0, 400): pixel
    (y, x) of the [2, 4, 3] result is ((0, 1, 2) + 10y + 100x) / 400 (numpy indexing by hand)."""
    c, y, x = np.meshgrid(range(3), range(2), range(4), indexing="ij")
    img = c + 10.0 * y + 100.0 * x
    got = R._grey_rgb(img, (0.0, 400.0))
    assert got.shape == (2, 4, 3)
    for yy in range(2):
        for xx in range(4):
            assert np.allclose(got[yy, xx], (np.arange(3) + 10 * yy + 100 * xx) / 400)


# ---- evaluation and training pages --------------------------------------------------------------------------


def evaluation(**effect) -> CnnSaeEvaluation:
    e = dict(images=500, acc_clean=0.9935, acc_spliced=0.9758, acc_ablated=0.0982, accuracy_recovered=0.9802,
             kl_spliced=0.0421, kl_ablated=2.3456, kl_recovered=0.9821) | effect  # fmt: skip
    metrics = {"tokens": 12345, "l0": 7.89, "mse": 0.001234, "squared_error": 1.5, "explained_variance": 0.8765,
               "cosine_similarity": 0.9432, "l2_ratio": 1.0567, "relative_reconstruction_bias": 1.0,
               "dead_fraction": 0.125, "dense_fraction": 0.0625, "dense_threshold": 0.1}  # fmt: skip
    return CnnSaeEvaluation(run="RUN", dictionary="DICT", hook="conv2.hook_out", architecture="topk", d_in=32,
                            d_sae=1024, dataset="toy", effect=SpliceAccuracy(**e), metrics=metrics,
                            seconds=3.21)  # fmt: skip


def test_the_evaluation_tables_put_each_metric_under_its_header():
    """Truth: the metrics and effect written in evaluation(), dead 12.5% and dense 6.2% (×100), 12,345 positions."""
    p = Page(R.evaluation_page(evaluation()))
    (row,) = p.table("positions")
    assert row == {"positions": "12,345", "L0": "7.89", "explained variance": "0.8765", "MSE": "0.001234",
                   "cosine": "0.9432", "l2 ratio": "1.0567", "dead": "12.5%", "dense (> 10%)": "6.2%"}  # fmt: skip
    rows = [list(r.values()) for r in p.table("", "test accuracy")]
    assert rows == [["clean", "0.9935", "0"], ["SAE spliced in", "0.9758", "0.0421"],
                    ["activation zeroed", "0.0982", "2.3456"]]  # fmt: skip
    text = " ".join(R.evaluation_page(evaluation()).split())
    assert "= <b>0.9802</b>; KL recovered 0.9821." in text


def test_the_evaluation_page_prints_no_nan_where_zeroing_changes_nothing():
    """Truth: 0/0 has no value: accuracy_recovered and kl_recovered NaN (zeroing changes neither) were printed
    "= <b>nan</b>; KL recovered nan"; each now says why it is undefined. Finite shares print as before."""
    nan = float("nan")
    text = " ".join(R.evaluation_page(evaluation(accuracy_recovered=nan, kl_recovered=nan)).split())
    assert ("= <b>undefined (zeroing the activation does not change the accuracy)</b>; KL recovered undefined "
            "(zeroing leaves the logits' KL at 0).") in text
    assert not re.search(r"\bnan\b", text.lower())


def test_the_evaluation_names_a_kl_share_of_nothing():
    """Truth: a finite accuracy share with kl_recovered NaN (zeroing leaves the KL at 0) says so, no nan%."""
    line = R.evaluation_lines(SimpleNamespace(explained_variance=0.9, cosine_similarity=0.9, l2_ratio=1.0),
                              evaluation(kl_recovered=float("nan")).effect)[1]  # fmt: skip
    assert line.endswith("9.82% zeroed); zeroing leaves the logits' KL at 0, so no KL share.") and "nan" not in line
    ok = R.evaluation_lines(SimpleNamespace(explained_variance=0.9, cosine_similarity=0.9, l2_ratio=1.0),
                            evaluation().effect)[1]  # fmt: skip
    assert "KL recovered 98.2% (1 − the logits' KL" in ok


@pytest.mark.parametrize(("ev", "caution"), [(0.4999, True), (0.5, False)])
def test_the_caution_stops_at_half_the_variance(ev, caution):
    """Truth: the documented threshold: explained variance under 0.5 (LOW_VARIANCE) with ≥ 90% recovered; at
    exactly 0.5 the reconstruction no longer 'misses most of the activation'."""
    mt = SimpleNamespace(explained_variance=ev, cosine_similarity=0.9, l2_ratio=1.0)
    assert (len(R.evaluation_lines(mt, evaluation().effect)) == 3) is caution


def training(history) -> CnnSaeTraining:
    return CnnSaeTraining(
        model="RUN", hook="conv2.hook_out", target=None, store="S", architecture="topk", d_in=32, d_sae=1024,
        d_out=32, config={"k": 8}, train_config={"lr": 0.0004}, batch_size=4096, epochs=1, steps=30, rows=122880,
        seconds=12.5, rows_per_second=9830.4, world_size=1, resumed_from_step=0,
        final={"loss": 0.01234, "l0": 7.5, "explained_variance": 0.8123, "dead_fraction": 0.0625}, history=history,
    )  # fmt: skip


def test_the_training_page_states_the_last_metrics_and_plots_each_series(monkeypatch):
    """Truth: final dead 6.2% (×100) and the other fields as written; three curves over steps 10, 20, 30, each the
    history's own key (distinct values per key)."""
    figures = []
    monkeypatch.setattr(F, "figure_data_uri", lambda fig, dpi: figures.append(fig) or "fig:0")
    hist = tuple({"step": s, "loss": 1.0 / s, "l0": 20.0 - s / 10, "explained_variance": s / 40} for s in (10, 20, 30))
    html = R.training_page(training(hist))
    text = " ".join(html.split())
    assert "Last logged: loss 0.01234, L0 7.50, explained variance 0.8123, dead 6.2%." in text
    assert "32 → 1,024 latents; 30 steps of 4096 rows (122,880 rows) in 12.5 s (9,830 rows/s, 1 process(es))" in text
    assert "SAE on conv2.hook_out</h1>" in text and "resumed" not in text
    (fig,) = figures
    for ax, key in zip(fig.axes, ("loss", "l0", "explained_variance"), strict=True):
        (line,) = ax.lines
        assert ax.get_title() == key.replace("_", " ")
        assert list(line.get_xdata()) == [10, 20, 30]
        assert np.allclose(line.get_ydata(), [h[key] for h in hist])
    rows = [r for t in Page(html).tables for r in t]
    assert rows == [["k", "8"], ["lr", "0.0004"]]


# ---- the summary and the control's verdict ------------------------------------------------------------------


def test_the_summary_states_each_sides_counts_and_shares():
    """Truth: 25% dead; 5 of 12 = 41.7%, 1 of 4 = 25.0%, 2 of 11 = 18.2%, tuned 6 of 12 = 50.0% and 3 of 4 = 75.0%;
    the control (18.2%) below the channels (25.0%): the gain 41.7 − 25.0 = +16.7 points is training's."""
    lines = R.summary_lines(dashboards())
    assert lines[0] == "topk SAE of 16 latents on conv2.hook_out (4 channels): 25.0% never fire on 1,234 test images"
    assert lines[1] == ("class-selective (index >= 0.45): 5 of 12 alive latents (41.7%) against 1 of 4 channels "
                        "(25.0%); median index 0.52 against 0.31")  # fmt: skip
    assert lines[2] == ("control, an untrained TopK dictionary of the same size and L0 (3): 2 of 11 alive latents "
                        "class-selective (18.2%, median index 0.27), 7 stroke-tuned: the control is no more selective "
                        "than the channels, so the trained dictionary's gain (+16.7 points) comes from training, not "
                        "from sparsity alone")  # fmt: skip
    assert lines[3] == ("stroke-tuned (a tuning label): 6 latents (50.0%) against 3 channels (75.0%); selective or "
                        "tuned: 9 latents, 2 channels")  # fmt: skip


def side(selective: int, units: int) -> dict:
    return {"selective": selective, "units": units}


ALL = "the untrained control is at least as selective as the trained dictionary"
NONE = "the trained dictionary is no more selective than the channels, so there is no gain to account for"


@pytest.mark.parametrize(
    ("ch", "lt", "rc", "start"),
    [
        (side(1, 4), side(2, 4), side(4, 8), ALL),  # control share = trained share (1/2)
        (side(1, 4), side(1, 4), side(3, 4), ALL),  # no gain, but the control above both: still all of it
        (side(1, 4), side(2, 8), side(1, 8), NONE),  # trained share = channels' share (1/4)
        (side(1, 4), side(3, 4), side(2, 8), "the control is no more selective than the channels, so the trained "
                                             "dictionary's gain (+50.0 points) comes from training"),  # control = 1/4
        (side(1, 4), side(3, 4), side(3, 6), "sparsity alone gives 50% of the trained dictionary's gain over the "
                                             "channels (+25.0 of +50.0 points"),  # 1/2 − 1/4 of 3/4 − 1/4
    ],
)  # fmt: skip
def test_the_control_verdict_at_each_boundary(ch, lt, rc, start):
    """Truth: shares worked out by hand as fractions (given beside each case); a share equal to its bound falls on
    the documented side: 'matches or beats' is ≥, 'no more selective' is ≤."""
    assert R.control_verdict(ch, lt, rc).startswith(start)


def test_a_dictionary_with_no_alive_latent_reads_zero_shares():
    """Truth: 0 of 0 units is a share of 0 (0.0%), not a division error; with no alive latent there is nothing for
    the control to account for (not "at least as selective": 0 of 0 against 0 of 0 is no comparison)."""
    r = SimpleNamespace(architecture="topk", d_sae=8, hook="h", d_in=4, dead_fraction=1.0, images=10, comparison={
        "threshold": 0.5, "channels": {"selective": 1, "units": 4, "median_index": 0.3},
        "latents": {"selective": 0, "units": 0, "median_index": float("nan")},
        "random_sparse": {"selective": 0, "units": 0, "median_index": float("nan"), "k": 1}})  # fmt: skip
    lines = R.summary_lines(r)
    assert lines[0].endswith("100.0% never fire on 10 test images")
    assert "0 of 0 alive latents (0.0%) against 1 of 4 channels (25.0%)" in lines[1]
    assert lines[2].endswith(
        "0 of 0 alive latents class-selective (0.0%, median index nan): the trained "
        "dictionary has no alive latent, so there is no selectivity to account for"
    )
