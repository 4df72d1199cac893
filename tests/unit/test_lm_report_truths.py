"""The language reports' numbers against outside truths: sentences and table cells formatted by hand from the
hand-made result's fields, figures read back from their matplotlib artists (bar heights, line data, image arrays,
scatter offsets, titles), HTML parsed with html.parser. The hand-made results are those of
``tests.unit.test_sentences_heads`` / ``test_sentences_neurons`` / ``test_sentences_toy``."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mechscope.lm.methods.ablation import HeadAblation
from mechscope.lm.methods.neurons import Concentration, LayerNeurons, NeuronsResult
from mechscope.lm.methods.path_patching import PathPatch
from mechscope.lm.report import circuits as C
from mechscope.lm.report import discovery as D
from mechscope.lm.report import heads as R
from mechscope.lm.report import heads_figures as F
from mechscope.lm.report import neurons as N
from mechscope.lm.report import sae as S
from mechscope.lm.report import toy as T
from tests.unit.test_sentences_heads import MEASURED, _composition, make_result, one
from tests.unit.test_sentences_neurons import BASELINE, SAMPLE, neurons
from tests.unit.test_sentences_neurons import row as compare_row
from tests.unit.test_sentences_toy import series


@pytest.fixture(scope="module")
def result():
    return make_result()


def captured(monkeypatch, module) -> list:
    """The matplotlib Figures ``module`` encodes, kept (not encoded)."""
    figures = []
    monkeypatch.setattr(module, "figure_data_uri", lambda fig, *a, **k: figures.append(fig) or "")
    return figures


# ---- heads: sentences ----------------------------------------------------------------------------------------


def test_previous_token_sentence_names_its_threshold_and_each_score():
    """Truth: the protocol's previous-token threshold (set to 0.55 here, unlike the induction one) and the hand-made
    previous-token scores 0.1 = 0.90, 0.0 = 0.60, strongest first."""
    base = make_result()
    protocol = base.protocol | {"thresholds": base.protocol["thresholds"] | {"previous_token": 0.55}}
    line = one(R.summary(make_result(protocol=protocol)), "2 previous-token heads")
    assert line.startswith("2 previous-token heads (previous-token score on random tokens ≥ 0.55): 0.1 (0.90), "
                           "0.0 (0.60); in brackets")  # fmt: skip


def test_top_k_sentence_states_the_random_controls_sd_and_draws():
    """Truth: top_k_ablation's fields by hand: +2.5 for the induction heads; random 0.1 ± 0.05 over 8 draws (3
    digits on the page's ablation section)."""
    k = make_result().top_k_ablation
    assert R.top_k_text(k) == ("raises the second-half loss by 2.500 nats; 2 random heads drawn from the other heads "
                               "change it by +0.100 ± 0.050 (mean ± sd over 8 draws)")  # fmt: skip
    k3 = k | {"random_heads_loss_increase_std": 0.07, "random_draws": [0.1] * 5}
    assert R.top_k_text(k3).endswith("change it by +0.100 ± 0.070 (mean ± sd over 5 draws)")


def test_table_rows_are_ordered_by_induction_score():
    """Truth: the induction scores set by hand (2.1 = 0.95 > 2.0 = 0.85 > 1.2 = 0.70), an order that differs from
    the prefix-matching one (2.0 > 1.2 > 2.1); each row's cells are the scores at its own head."""
    base = make_result()
    scores = dict(base.scores)
    scores["induction"] = base.scores["induction"].copy()
    scores["induction"][2, 1] = 0.95
    rows = R.table_rows(make_result(scores=scores))
    assert [r["head"] for r in rows[:3]] == ["2.1", "2.0", "1.2"]
    assert [r["induction"] for r in rows[:3]] == pytest.approx([0.95, 0.85, 0.70])
    assert [r["prefix_matching"] for r in rows[:3]] == pytest.approx([0.5, 0.9, 0.8])
    assert [r["copying"] for r in rows[:3]] == pytest.approx([-0.1, 0.5, 0.04])


def test_agreement_sentence_states_the_median_absolute_error(result):
    """Truth: median over the 7 measured heads of |measured_estimate − exact_mean|, computed here from the ablation's
    fields (not the agreement() summary)."""
    mean = result.ablation["mean"]
    err = np.median([abs(mean.measured_estimate[lh] - mean.exact_mean[lh]) for lh in mean.exact_mean])
    med = np.median([abs(v) for v in mean.exact_mean.values()])
    line = one(R.summary(result), "On the 7 heads measured exactly")
    assert f"median |error| {err:.3f} nats against a median |measured effect| of {med:.3f} nats" in line


def test_indistinct_costs_state_the_standard_error_of_the_mean():
    """Truth: per-sequence costs drawn here; the largest |mean| head's standard error is its sample sd (ddof 1)
    divided by √4, computed from the raw draws."""
    rng = np.random.default_rng(3)
    est = rng.normal(0, 1e-4, (3, 4, 4))
    raw = {(layer, h): rng.normal(0, 1e-3, 4) for layer in range(3) for h in range(4)}
    lh = max(raw, key=lambda k: abs(raw[k].mean()))
    se = raw[lh].std(ddof=1) / 2
    line = R._indistinct(HeadAblation.measured("mean", est, raw), 4)
    assert (
        f"is {abs(raw[lh].mean()):.4f} nats ({lh[0]}.{lh[1]}), against a standard error of {se:.4f} (sd over "
        "the 4 sequences / √4)" in line
    )


def test_a_zero_copying_score_is_prefix_matching_without_copying():
    """Truth: Olsson et al.'s rule as the code states it, copying score > 0 for a copy; 2.1 with copying exactly 0
    and prefix matching 0.50 is named among the heads that match prefixes without a positive copying score."""
    base = make_result()
    scores = dict(base.scores)
    scores["copying"] = base.scores["copying"].copy()
    scores["copying"][2, 1] = 0.0
    lines = R.induction_sentences(make_result(scores=scores))
    assert "2.1 (prefix matching 0.50, copying +0.00)" in one(lines, "Prefix matching (score ≥ 0.4) without")


def test_no_induction_head_names_the_highest_prefix_matching_score():
    """Truth: the hand-made prefix-matching scores, highest 0.90 at 2.0 (copying +0.50)."""
    none = [["none"] * 4 for _ in range(3)]
    lines = R.induction_sentences(make_result(labels=none))
    assert "the highest prefix-matching score is 0.90 (head 2.0, copying +0.50)." in one(lines, "No head is an induct")


# ---- heads: figures ------------------------------------------------------------------------------------------


def test_loss_plot_draws_the_loss_at_each_position(monkeypatch):
    """Truth: the list passed in, one point per position 0, 1, …; the copies' boundary between positions n and n + 1."""
    figs = captured(monkeypatch, F)
    loss = [5.0, 4.8, 4.9, 1.2, 0.9, 0.7]
    F.loss_plot(loss, 3)
    ax = figs[0].axes[0]
    data = [ln for ln in ax.get_lines() if len(ln.get_xdata()) == len(loss)]
    assert len(data) == 1
    assert list(data[0].get_xdata()) == [0, 1, 2, 3, 4, 5] and list(data[0].get_ydata()) == loss
    # the boundary: HeadsResult's second-half loss averages positions n + 1 … 2n − 1 (heads.py), so the line sits
    # between positions n and n + 1
    (edge,) = [ln for ln in ax.get_lines() if ln is not data[0]]
    assert list(edge.get_xdata()) == [3.5, 3.5]


def test_heatmaps_draw_each_score_with_layers_across_and_measured_dots(result, monkeypatch):
    """Truth: the image array is the score's [layer, head] values transposed (x axis "layer", y axis "head"); the
    mean-ablation map's dots sit at the 7 measured (layer, head) cells of MEASURED; a signed score (copying, min
    −0.1) is drawn on a diverging map symmetric about 0, an unsigned one (induction) from 0."""
    figs = captured(monkeypatch, F)
    F.heatmaps(result)
    by = {f.axes[0].get_title().split("\n")[0]: f.axes[0] for f in figs}
    ind = by[F.TITLES["induction"]]
    assert ind.get_xlabel() == "layer" and ind.get_ylabel() == "head"
    np.testing.assert_allclose(ind.get_images()[0].get_array(), result.scores["induction"].T)
    assert ind.get_images()[0].get_clim()[0] == 0
    dots = by[F.TITLES["ablation_loss_increase"]].collections[0].get_offsets()
    assert {(int(x), int(y)) for x, y in np.asarray(dots)} == set(MEASURED)
    cop = by[F.TITLES["copying"]].get_images()[0]
    assert cop.get_cmap().name == "RdBu_r"
    lo, hi = cop.get_clim()
    assert lo == -hi == pytest.approx(-0.5)  # the largest |copying| is 2.0's +0.5


def test_agreement_figure_plots_estimate_across_and_measurement_up(result, monkeypatch):
    """Truth: the axis labels say estimate on x and measurement on y; each point is (measured_estimate, exact_mean)
    of one measured head, from the ablation's fields."""
    figs = captured(monkeypatch, F)
    mean = result.ablation["mean"]
    F.agreement_figure(mean)
    ax = figs[0].axes[0]
    assert ax.get_xlabel().startswith("attribution-patching estimate") and ax.get_ylabel().startswith("measured")
    got = {tuple(np.round(p, 6)) for p in np.asarray(ax.collections[0].get_offsets())}
    want = {(round(mean.measured_estimate[lh], 6), round(mean.exact_mean[lh], 6)) for lh in mean.exact_mean}
    assert got == want


def test_edge_label_gives_the_largest_drop_of_the_heads_that_pass():
    """Truth: two confirmed query heads with drops 0.2 and 0.6 (0.7 → 0.5, 0.7 → 0.1): the label says 0.60, as
    edge_label's docstring and the figure's title say (the largest of their drops)."""
    pp = PathPatch((0, 1), 1, 1, (2, 3), (0.7, 0.7), (0.5, 0.1), (0.2, 0.6), (0.01, 0.01), (True, True), None, None)
    r = make_result(path_patches=(pp,))
    (edge,) = F.circuit_graph(r)[1]
    assert edge["drop"] == pytest.approx(0.6)
    assert F.edge_label(edge, 2) == "1.2/3\ndrop 0.60"


# ---- circuits: figures ---------------------------------------------------------------------------------------


def test_composition_figure_has_sources_as_rows_and_targets_as_columns(monkeypatch):
    """Truth: _composition()'s K score 0.10 for source 0.2 → target 2.0, baseline 0.04: the cell at row 0·4+2 = 2
    (y "source head"), column 2·4+0 = 8 (x "target head") holds 0.06; the reverse cell (a later source) is blank."""
    figs = captured(monkeypatch, C)
    C.composition_figure(_composition(), "K")
    ax = figs[0].axes[0]
    assert ax.get_ylabel().startswith("source") and ax.get_xlabel().startswith("target")
    img = np.asarray(ax.get_images()[0].get_array(), dtype=float)
    assert img[2, 8] == pytest.approx(0.06) and img[3, 6] == pytest.approx(0.02)  # 0.3 → 1.2: 0.06 − 0.04
    assert np.isnan(img[8, 2])
    assert "(0.040)" in ax.get_title()


def test_dla_figure_draws_each_heads_share_and_each_mlps_bar(monkeypatch):
    """Truth: the hand-made direct logit attribution: image = heads transposed (signed), bar heights = mlps in
    layer order."""
    figs = captured(monkeypatch, C)
    heads = np.array([[0.5, -1.0], [0.2, 0.0], [-0.3, 0.7]])
    mlps = np.array([0.4, -0.2, 1.1])
    C.dla_figure(SimpleNamespace(heads=heads, mlps=mlps))
    a, b = figs[0].axes[:2]
    np.testing.assert_allclose(a.get_images()[0].get_array(), heads.T)
    assert [p.get_height() for p in b.patches] == pytest.approx(list(mlps))
    assert [p.get_x() + p.get_width() / 2 for p in b.patches] == pytest.approx([0, 1, 2])


def test_positional_grid_tiles_each_heads_pattern_with_queries_as_rows(monkeypatch):
    """Truth: a lower-triangular pattern (query rows attend to earlier key columns) placed by hand at tile (layer 1,
    head 0): rows 1·(3+2)+1 … , columns 0·5+1 …"""
    figs = captured(monkeypatch, C)
    pat = np.zeros((2, 2, 3, 3))
    pat[1, 0] = [[1.0, 0, 0], [0.3, 0.7, 0], [0.1, 0.6, 0.3]]
    pat[0, 1] = [[1.0, 0, 0], [0.9, 0.1, 0], [0.5, 0.25, 0.25]]
    C.positional_grid(SimpleNamespace(patterns=pat))
    img = np.asarray(figs[0].axes[0].get_images()[0].get_array(), dtype=float)
    np.testing.assert_allclose(img[6:9, 1:4], pat[1, 0])
    np.testing.assert_allclose(img[1:4, 6:9], pat[0, 1])


# ---- neurons -------------------------------------------------------------------------------------------------


class _Spans(HTMLParser):
    """(text, class) of each <span>."""

    def __init__(self):
        super().__init__()
        self.spans: list[tuple[str, str | None]] = []
        self._cls: str | None = None
        self._inside = False

    def handle_starttag(self, tag, attrs):
        if tag == "span":
            self._cls, self._inside = dict(attrs).get("class"), True

    def handle_data(self, data):
        if self._inside:
            self.spans.append((data, self._cls))

    def handle_endtag(self, tag):
        if tag == "span":
            self._inside = False


def test_context_colours_each_token_by_its_activation_over_the_peak():
    """Truth: the module docstring's rule, level = activation / peak in 10 steps rounded to the nearest (nothing
    below a twentieth): 0.04 → none, 0.46 → a5, 0.74 → a7, 1.0 → a10 (outlined as the top position)."""
    ctx = {"seq": 0, "start": 0, "pos": 2, "acts": [0.04, 0.46, 1.0, 0.74], "act": 1.0}
    html = N.context_html(ctx, np.array([[1, 2, 3, 4]]), 1.0, N.Decoder(lambda i: f"t{i}"))
    p = _Spans()
    p.feed(str(html))
    assert p.spans == [("t1", None), ("t2", "a5"), ("t3", "a10 top"), ("t4", "a7")]


def test_neuron_row_cells_hold_the_neurons_own_fields():
    """Truth: the Concentration built here (top share 0.6, previous-token share 0.1, bigram share 0.1) and the
    layer's density and max."""
    r = neurons([0.0, 1.0], [1.0, 0.6], density=[0.3, 0.05])
    row = N.neuron_row(r, 0, 1, N.Decoder(str), r.tokens.numpy())
    assert row["id"] == "0.1" and row["entropy"] == 1.0
    assert row["top_share"] == 0.6 and row["prev_share"] == 0.1 and row["density"] == 0.05


def _with_prev_shares(prev) -> NeuronsResult:
    figs = tuple(Concentration(20, e, 1, s, 2, p, (2, 1), 0.1)
                 for e, s, p in zip([0.0, 1.0, 2.0, 3.0], [1.0, 0.6, 0.4, 0.2], prev, strict=True))  # fmt: skip
    lay = LayerNeurons(0, "blocks.0.mlp.hook_post", figs, (1.0,) * 4, (0.1,) * 4, ((),) * 4)
    return NeuronsResult("hand-made", 20, 10, SAMPLE, BASELINE, (lay,), tokens=torch.tensor([[1, 2, 1, 3]]))


def test_summary_shares_are_recounted_from_the_neurons():
    """Truth: 4 neurons with top shares 1.0, 0.6, 0.4, 0.2 and previous-token shares 0.1, 0.1, 0.1, 0.7: 2 of 4
    (50%) reach half on one token, 1 of 4 (25%) reach 90%, and 3 of 4 (75%) reach half counting the previous
    token."""
    line = N.summary_lines(_with_prev_shares([0.1, 0.1, 0.1, 0.7]))[2]
    assert line == ("50% of the neurons have at least half of their top contexts on one token, 25% at least 90%; "
                    "counting the previous token as a pattern too, 75% reach half.")  # fmt: skip


def test_distribution_figure_draws_the_top_shares_survival_curve(monkeypatch):
    """Truth: the hand-made top shares sorted (0.2, 0.4, 0.6, 1.0) against 1 − i/4 (share of neurons with at least
    that), on the axes labelled "share of the most common token"."""
    figs = captured(monkeypatch, N)
    N.distribution_figure({"gelu": neurons([0.0, 1.0, 2.0, 3.0], [1.0, 0.6, 0.4, 0.2])}, 4)
    ax = figs[0].axes[1]
    assert ax.get_xlabel().startswith("share of the most common token")
    (line,) = [ln for ln in ax.get_lines() if ln.get_label() == "gelu"]
    assert list(line.get_xdata()) == pytest.approx([0.2, 0.4, 0.6, 1.0])
    assert list(line.get_ydata()) == pytest.approx([1.0, 0.75, 0.5, 0.25])


def test_solu_against_gelu_shares_and_the_layernorm_line():
    """Truth: the rows built here: half on one token GELU 0.2 / SoLU 0.4, at least 90% half of those (0.1 / 0.2);
    after the LayerNorm median 0.9 bits and 0.3 at half."""
    rows = [compare_row("GELU", 1.5, 2.5, 0.2, 3), compare_row("SoLU", 1.6, 1.5, 0.4, 5),
            compare_row("SoLU after its LayerNorm", 1.6, 0.9, 0.3, 5)]  # fmt: skip
    lines = N.compare_lines(rows)
    assert lines[2] == ("Neurons with at least half of their top contexts on one token: GELU 20%, SoLU 40%; at least "
                        "90%: GELU 10%, SoLU 20%.")  # fmt: skip
    assert lines[-1] == ("Read after SoLU's LayerNorm (hook_post) instead of before it: median entropy 0.90 bits, "
                         "30% at least half on one token.")  # fmt: skip


# ---- sae -----------------------------------------------------------------------------------------------------


def test_density_figure_counts_the_dead_and_histograms_the_rest(monkeypatch):
    """Truth: 5 densities of which 2 are 0 (dead): the title says "2 of 5 dead"; the histogram holds the other 3."""
    figs = captured(monkeypatch, S)
    S.density_uri(np.array([0.0, 0.1, 0.0, 0.01, 0.5]))
    ax = figs[0].axes[0]
    assert ax.get_title().endswith(": 2 of 5 dead")
    assert sum(p.get_height() for p in ax.patches) == 3


def test_activation_histogram_bars_span_their_bins(monkeypatch):
    """Truth: counts (3, 5, 1) over edges (0, 0.5, 1.0, 2.0): each bar from its bin's left edge, its width the bin's,
    its height the count."""
    figs = captured(monkeypatch, S)
    S.histogram_uri([3, 5, 1], [0.0, 0.5, 1.0, 2.0], "t")
    bars = figs[0].axes[0].patches
    got = np.array([(b.get_x(), b.get_width(), b.get_height()) for b in bars])
    np.testing.assert_allclose(got, [(0.0, 0.5, 3), (0.5, 0.5, 5), (1.0, 1.0, 1)])


def test_training_curves_plot_each_titled_series(monkeypatch):
    """Truth: the history built here; the panel titled "loss" plots the loss, "L0" the l0, "explained variance" the
    explained variance, each against the steps."""
    figs = captured(monkeypatch, S)
    hist = [{"step": s, "loss": 10.0 - s, "l0": 100.0 + s, "explained_variance": 0.1 * s} for s in (1, 2, 3)]
    S.training_curve_uri(hist)
    want = {"loss": "loss", "L0": "l0", "explained variance": "explained_variance"}
    for ax in figs[0].axes:
        (line,) = ax.get_lines()
        assert list(line.get_xdata()) == [1, 2, 3]
        assert list(line.get_ydata()) == [h[want[ax.get_title()]] for h in hist]


# ---- toy -----------------------------------------------------------------------------------------------------


def test_toy_run_figure_plots_each_series_under_its_label(monkeypatch):
    """Truth: training.json's series built by hand: "held out" = held_out_loss, "train" = train_loss from step 10,
    "prev-token 0.h" = layer 0's previous-token score of head h, "induction 1.h" = layer 1's induction score."""
    figs = captured(monkeypatch, T)
    s = series(True)
    for i, r in enumerate(s["series"]):
        r["train_loss"] = 4.0 - 0.5 * i
    T.run_figure(s, "t")
    axes = figs[0].axes
    lines = {ln.get_label(): ln for ax in axes[:3] for ln in ax.get_lines()}
    rows = s["series"]
    assert list(lines["held out"].get_ydata()) == [r["held_out_loss"] for r in rows]
    assert list(lines["train"].get_ydata()) == [r["train_loss"] for r in rows[1:]]
    assert list(lines["train"].get_xdata()) == [10, 100, 1000]
    assert list(lines["held out"].get_xdata()) == [0.8, 10, 100, 1000]
    for h in (0, 1):
        assert list(lines[f"prev-token 0.{h}"].get_ydata()) == [r["previous_token"][0][h] for r in rows]
        assert list(lines[f"induction 1.{h}"].get_ydata()) == [r["induction"][1][h] for r in rows]


def test_toy_final_line_states_the_final_fields():
    """Truth: training.json's "final" built by hand (0.95, 0.60, held-out 0.5, ICL −0.9)."""
    line = next(s for s in T.summary_lines(series(True)) if s.startswith("At the end"))
    assert line == ("At the end: highest induction score 0.95 (layer 1), highest previous-token score 0.60 (layer 0), "
                    "held-out loss 0.500 nats, in-context-learning score -0.900.")  # fmt: skip


# ---- discovery -----------------------------------------------------------------------------------------------


def _truth_result():
    sc = SimpleNamespace(n_true_edges=12, edge_auroc=0.91, edge_precision=0.75, edge_recall=0.5, size=12,
                         node_auroc=0.8, n_true_nodes=4, n_node_candidates=9, node_precision=0.6, node_recall=0.3,
                         node_recall_at_size=0.25)  # fmt: skip
    drawn = {"edges": 20, "true": 7, "precision": 0.35, "recall": 0.58}
    return SimpleNamespace(ground_truth={"primary": sc}, drawn_vs_truth={"primary": drawn}), sc


def test_truth_sentence_states_precision_and_recall():
    """Truth: the scores built here: precision 0.75, recall 0.50 of the top 12 edges."""
    r, _ = _truth_result()
    r.drawn_vs_truth = None
    line = D.truth_sentence(r, "primary")
    assert "edge AUROC 0.910; precision 0.75 and recall 0.50 of the top 12 edges" in line
    assert "node AUROC 0.800, node recall of the top 4 nodes (as many as it has) 0.25." in line


def test_ground_truth_table_cells_sit_under_their_headers():
    """Truth: the discovery page's own header row (parsed from the template) names each column; every cell holds the
    hand-made field of that name; the drawn circuit's cell reads "7 of 20" (true edges of drawn edges)."""
    r, sc = _truth_result()
    template = Path(D.__file__).parent / "templates" / "discovery.html.j2"
    header = re.search(r"<h2>Against the known circuit</h2>\s*<table><tr>(.*?)</tr>", template.read_text()).group(1)
    names = re.findall(r"<th>(.*?)</th>", header)
    (cells,) = D.ground_truth_rows(r)
    got = dict(zip(names, cells, strict=True))
    assert got["edge precision"] == "0.75" and got["edge recall"] == "0.50"
    assert got["node precision"] == "0.60" and got["node recall"] == "0.30"
    assert got["node recall, top nodes as many as the set's"] == "0.25"
    assert got["true edges"] == 12 and got["edge AUROC"] == "0.910" and got["node AUROC"] == "0.800"
    assert got["drawn circuit: true edges (precision / recall)"] == "7 of 20 (0.35 / 0.58)"


def test_edge_colours_follow_the_known_circuit():
    """Truth: the circuit figure's title: green when every slot is in the known circuit, red when none is, orange
    when some are."""
    assert D._truth_colour([True, True]) == "#1b9e77"
    assert D._truth_colour([False, False]) == "#d62728"
    assert D._truth_colour([True, False]) == "#e6ab02"


# ---- tables on the pages -------------------------------------------------------------------------------------


class _Tables(HTMLParser):
    """Every <table> as a list of rows, each a list of its cells' text (th and td alike)."""

    def __init__(self):
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr" and self.tables:
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None


def _tables(html: str, first: list[str]) -> list[dict[str, dict[str, str]]]:
    """The tables whose header starts with ``first``, each {first cell: {header: cell}}."""
    p = _Tables()
    p.feed(html)
    found = [t for t in p.tables if t and t[0][: len(first)] == first]
    return [{r[0]: dict(zip(t[0], r, strict=True)) for r in t[1:]} for t in found]


def test_heads_table_cells_sit_under_their_headers(result, tmp_path):
    """Truth: the hand-made scores and measurements: 2.0's induction score 0.850, its measured mean-ablation cost
    +1.12 ± the sample sd of ±0.1, ±0.05 around it (0.091); 1.0 was not measured, so its cell is an estimate."""
    html = R.write_report(result, tmp_path / "r.html").read_text()
    (rows,) = _tables(html, ["head", "label"])
    sd = np.std([-0.1, 0.1, -0.05, 0.05], ddof=1)
    assert rows["2.0"]["induction"] == "0.850" and rows["2.0"]["prefix matching"] == "0.900"
    assert rows["2.0"]["mean-ablation Δloss"] == f"+1.120 ± {sd:.3f}"
    assert rows["2.0"]["mean-ablation Δloss is"] == "measured"
    assert rows["1.0"]["mean-ablation Δloss"].endswith("(est.)") and rows["1.0"]["mean-ablation Δloss is"] == "estimate"


def test_neuron_table_cells_sit_under_their_headers():
    """Truth: the Concentrations built here: neuron 0.1's top-token share 0.60 and previous-token share 0.10, its
    entropy 1.00 bits and density 0.050, each in the column of that name."""
    from mechscope.core.render.html import render_string

    r = neurons([0.0, 1.0], [1.0, 0.6], density=[0.3, 0.05])
    html = render_string("mechscope.lm", "neurons.html.j2", **N.report_context(r, str))
    tables = _tables(html, ["neuron", "entropy (bits)"])
    assert len(tables) == 2  # the most and the least monosemantic, both holding 0.1
    for rows in tables:
        assert rows["0.1"]["top token (share)"].endswith("(0.60)")
        assert rows["0.1"]["previous token (share)"].endswith("(0.10)")
        assert rows["0.1"]["entropy (bits)"] == "1.00" and rows["0.1"]["density"] == "0.050"
