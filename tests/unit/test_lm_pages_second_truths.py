"""The language wing's heads, circuits and neurons pages, second pass, against outside truths: thresholds met exactly
at their boundaries (the report's own stated rules), counts and orders worked out by hand from hand-made results
with distinct values, figures read back from their matplotlib artists, and the rendered HTML parsed with
html.parser (``Page`` of ``tests.unit.test_cnn_pages_truths``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib.patches import Circle, FancyArrowPatch

from mechscope.core.render.html import render_string
from mechscope.lm.methods.ablation import HeadAblation
from mechscope.lm.methods.composition import Baseline, CompositionResult
from mechscope.lm.methods.neurons import Concentration, LayerNeurons, NeuronsResult
from mechscope.lm.report import circuits as C
from mechscope.lm.report import heads as R
from mechscope.lm.report import heads_figures as F
from mechscope.lm.report import neurons as N
from tests.unit.test_cnn_pages_truths import Page
from tests.unit.test_lm_report_truths import captured
from tests.unit.test_sentences_heads import ESTIMATED, LABELS, MEASURED, B, _ablation, _patch, _scores, make_result, one
from tests.unit.test_sentences_neurons import BASELINE, SAMPLE, neurons
from tests.unit.test_sentences_neurons import row as compare_row


@pytest.fixture(scope="module")
def result():
    return make_result()


# ---- heads: the summary's thresholds at their boundaries ----------------------------------------------------


def test_a_second_copy_loss_of_exactly_half_is_not_use():
    """Truth: the page's rule, "below 50% counts as using it": 2.0 / 4.0 = 50% exactly is not below."""
    line = R.loss_sentence(make_result(loss_first_half=4.0, loss_second_half=2.0))
    assert "falls from 4.00 nats on the first copy to 2.00 on the second (50% of the first" in line
    assert line.endswith("by this measure it does not use the earlier copy much.")


def test_a_prefix_matching_score_at_the_threshold_meets_it():
    """Truth: the sentence's own "score ≥ 0.4": 2.1 at exactly 0.4 (copying −0.10) is a prefix-matching head."""
    scores = _scores()
    scores["prefix_matching"][2, 1] = 0.4
    line = one(R.induction_sentences(make_result(scores=scores)), "Prefix matching (score ≥ 0.4) without")
    assert "2.1 (prefix matching 0.40, copying -0.10)" in line.replace("−", "-")


def test_a_copying_score_of_exactly_the_weak_threshold_is_not_weak():
    """Truth: "above 0 but below 0.1" is weak: 1.2 at exactly 0.1 is not, so no head is called weak."""
    scores = _scores()
    scores["copying"][1, 2] = 0.1
    lines = R.induction_sentences(make_result(scores=scores))
    assert not any("weak copying score" in s for s in lines)
    assert "1.2 (prefix matching 0.80, copying +0.10)" in one(lines, "2 heads are induction heads")


def _many_induction_heads():
    """8 induction heads (layers 1 and 2), prefix-matching scores 0.41 … 0.97 in a shuffled order."""
    scores = _scores()
    pm = np.array([0.41, 0.97, 0.55, 0.83, 0.62, 0.49, 0.90, 0.76])
    scores["prefix_matching"][1:] = pm.reshape(2, 4)
    scores["copying"][1:] = 0.5
    scores["ov_eigen_positivity"][1:] = 0.5
    labels = [["previous_token", "previous_token", "none", "none"], ["induction"] * 4, ["induction"] * 4]
    return make_result(scores=scores, labels=labels), pm


def test_past_six_induction_heads_the_rest_are_counted():
    """Truth: 8 heads sorted by hand (numpy argsort of the prefix-matching scores, highest first): the first six
    named, "and 2 more" (8 − 6)."""
    r, pm = _many_induction_heads()
    order = np.argsort(-pm)
    names = [f"{1 + i // 4}.{i % 4} (prefix matching {pm[i]:.2f}" for i in order]
    line = one(R.induction_sentences(r), "8 heads are induction heads")
    assert all(n in line for n in names[:6]) and not any(n in line for n in names[6:])
    assert [line.index(n) for n in names[:6]] == sorted(line.index(n) for n in names[:6])
    assert line.endswith("copying +0.50) and 2 more; in brackets: the two scores the label rests on.")


def test_the_cost_ranking_names_the_three_largest_measured_costs():
    """Truth: MEASURED sorted by hand: 0.1 (+4.55), 2.0 (+1.12), 1.2 (+0.50), each ± the sample sd of ±0.1, ±0.05
    (0.091); the fourth, 2.1 (+0.30), is not named."""
    sd = np.std([-0.1, 0.1, -0.05, 0.05], ddof=1)
    line = one(R.summary(make_result()), "One head at a time")
    want = f"for 0.1 (+4.55 ± {sd:.2f}), 2.0 (+1.12 ± {sd:.2f}), 1.2 (+0.50 ± {sd:.2f}) nats of second-half loss"
    assert want in line and "2.1 (" not in line


def test_a_negative_top_k_change_lowers_the_loss_by_its_size():
    """Truth: a change of −0.3 nats lowers the loss by 0.3 (a positive size with the verb carrying the sign); 0.005
    is not under half of the last digit shown (0.005 at 2 digits), so it is stated."""
    k = make_result().top_k_ablation | {"induction_heads_loss_increase": -0.3}
    assert R.top_k_text(k).startswith("lowers the second-half loss by 0.300 nats;")
    assert R._change(0.005, 2) == "raises the second-half loss by 0.01 nats"
    assert R._change(0.0049, 2).startswith("leaves the second-half loss within 0.005 nats")


def test_estimate_failures_are_named_largest_error_first():
    """Truth: errors by hand, estimate − measured: 0.1 (−0.02 − 4.55 = −4.57) and 2.1 (−0.5 − 0.3 = −0.8) both off
    by ≥ 0.1 and ≥ 50%; 2.0 (1.0 − 1.12 = −0.12) is off by 11% only. |−4.57| > |−0.8|: 0.1 first."""
    est = ESTIMATED | {(2, 1): -0.5}
    r = make_result(ablation=make_result().ablation | {"mean": _ablation("mean", MEASURED, est)})
    line = one(R.summary(r), "On the 7 heads measured exactly").replace("−", "-")
    assert "on 2 of them: 0.1 (previous-token; estimate -0.02, measured +4.55), 2.1 (estimate -0.50, measured +0.30)." \
        in line  # fmt: skip


def test_an_estimate_off_by_exactly_the_thresholds_fails():
    """Truth: the page's rule "off by at least 0.1 nats and by at least 50%": measured +0.25 and +0.5, estimated
    +0.125 and +0.75 (binary fractions, exact as floats): errors −0.125 and +0.25, each exactly 50% of its measured
    value, both fail; the larger error first."""
    exact = {(0, 0): np.full(4, 0.25), (0, 1): np.full(4, 0.5)}
    est = np.zeros((3, 4, 4))
    est[0, 0], est[0, 1] = 0.125, 0.75
    a = HeadAblation.measured("mean", est, exact)
    assert R.estimate_failures(a) == [(0, 1), (0, 0)]


def test_an_eigenvalue_positivity_of_zero_disagrees_with_a_positive_copying_score():
    """Truth: the sentence compares signs, positive against not positive: 2.0 with copying +0.50 and eigenvalue
    positivity exactly 0 disagrees, beside 1.2 (+0.04 against −0.30): 2 of the 3 heads."""
    scores = _scores()
    scores["ov_eigen_positivity"][2, 0] = 0.0
    line = one(R.induction_sentences(make_result(scores=scores)), "Two measures of whether a head copies")
    assert "disagree in sign on 2 of the 3 heads" in line and "2.0 (copying +0.50, eigenvalue positivity +0.00)" in line


def test_more_than_five_previous_token_heads_are_counted():
    """Truth: 7 previous-token heads (scores 0.93 … 0.61, set by hand): five named, highest first, "and 2 more"."""
    scores = _scores()
    prev = [0.61, 0.93, 0.72, 0.88, 0.65, 0.8, 0.7]
    scores["previous_token"][0] = prev[:4]
    scores["previous_token"][1, :3] = prev[4:]
    labels = [["previous_token"] * 4, ["previous_token"] * 3 + ["none"], LABELS[2]]
    line = one(R.induction_sentences(make_result(scores=scores, labels=labels)), "7 previous-token heads")
    assert "0.1 (0.93), 0.3 (0.88), 1.1 (0.80), 0.2 (0.72), 1.2 (0.70) and 2 more; in brackets" in line


def test_one_measured_head_is_too_few_to_judge_the_estimate():
    """Truth: a correlation needs two points: with 0.1 alone measured (+4.55), the page says only 1 head was."""
    r = make_result(ablation=make_result().ablation | {"mean": _ablation("mean", {(0, 1): 4.55}, ESTIMATED)})
    assert one(R.summary(r), "Only 1 head was measured exactly").endswith("too few to judge the attribution-patching "
                                                                          "estimate.")  # fmt: skip


def test_a_small_cost_many_standard_errors_from_zero_is_ranked():
    """Truth: 2.0 alone measured, +0.03 ± 0.00091 (sd of ±0.001, ±0.0005 around it): 66 standard errors from 0 and
    above 0.005 nats, so it is told from zero and ranked."""
    exact = {(2, 0): 0.03 + np.array([-0.001, 0.001, -0.0005, 0.0005])}
    mean = HeadAblation.measured("mean", np.zeros((3, 4, 4)), exact)
    lines = R.summary(make_result(ablation=make_result().ablation | {"mean": mean}))
    assert "for 2.0 (+0.03 ± 0.00) nats" in one(lines, "One head at a time")
    assert not any(s.startswith("No head's cost") for s in lines)


def test_an_unmeasured_sources_total_is_its_own_estimate():
    """Truth: with no head measured, 0.1's total effect is ESTIMATED[(0, 1)] = −0.02 (its own cell, not 1.0's)."""
    r = make_result(ablation=make_result().ablation | {"mean": _ablation("mean", {}, ESTIMATED)})
    line = one(R.circuit_sentences(r), "Path patching 0.1 →").replace("−", "-")
    assert "mean-ablating 0.1 on every path costs -0.02 nats (attribution-patching estimate; not measured)" in line


def test_a_marginal_fail_is_said_of_induction_heads_only():
    """Truth: the page's marginal fails are tests of an induction head: 1.3 (label none) falls short by 0.5 standard
    errors (drop 0.04 against 0.05, s.e. 0.04 / √4) and is not named; 1.2 fails by far (−24 s.e.): no sentence."""
    near = _patch((0, 1), 1, 1, (0.7, 0.2), (0.69, 0.16), (0.01, 0.04), (False, False))
    base = make_result()
    r = make_result(path_patches=(near, *base.path_patches[1:]))
    assert R.marginal_fails(r) == []
    assert not any(s.startswith("Marginal fails") for s in R.summary(r))


def test_a_fail_exactly_two_standard_errors_short_is_not_marginal():
    """Truth: "below the threshold by less than 2 standard errors": 0.1 → 1.2, clean 0.5 (threshold 20% = 0.1),
    drop 0.05, sd 0.05 over 4 sequences (s.e. 0.025): exactly 2 standard errors short, so not marginal."""
    from mechscope.lm.methods.path_patching import PathPatch

    pp = PathPatch((0, 1), 1, 1, (2, 3), (0.5, 0.2), (0.45, 0.2), (0.05, 0.0), (0.05, 0.01), (False, False), None, None)
    r = make_result(path_patches=(pp,))
    assert r.edge_margin(pp)[0] == -2.0
    assert R.marginal_fails(r) == []


def _all_rejected(k_scores: dict) -> object:
    """The hand-made result with every path-patching test failing and K-composition scores ``k_scores`` {(source,
    induction head): score} over the baseline 0.04."""
    from mechscope.lm.methods.heads import circuit_rows

    k = np.zeros((3, 4, 3, 4))
    for (src, tgt), v in k_scores.items():
        k[src + tgt] = v
    z = np.zeros_like(k)
    comp = CompositionResult.of({"Q": z, "K": k, "V": z}, Baseline(mean=0.04, std=0.002, samples=200, seed=0), True, 20)
    base = make_result()
    patches = tuple(_patch(pp.source, pp.layer, pp.kv_head, pp.induction_clean,
                           tuple(c - 0.01 for c in pp.induction_clean), (0.01, 0.01), (False, False))
                    for pp in base.path_patches)  # fmt: skip
    rows = circuit_rows(base.scores, LABELS, comp, patches, 2, B)
    return make_result(composition=comp, path_patches=patches, circuit_rows=rows)


def test_both_strongest_sources_are_judged_and_twice_the_baseline_is_high():
    """Truth: the sentence's "two strongest" and "≥ 2× … is high": into 2.0, 0.2 at 0.08 = 2.0× the baseline 0.04
    exactly (high) and 0.0 at 0.05 (1.25×, not high); into 1.2, 0.3 at 0.06 and 0.1 at 0.07 (neither high)."""
    r = _all_rejected({((0, 2), (2, 0)): 0.08, ((0, 0), (2, 0)): 0.05, ((0, 3), (1, 2)): 0.06,
                       ((0, 1), (1, 2)): 0.07})  # fmt: skip
    lines = R.composition_sentences(r)
    assert "for one pair: 0.2 → 2.0 (K-composition 0.080, 2.0× the baseline" in one(lines, "A high K-composition")
    low = one(lines, "Path patching also rejects 3 pairs")
    assert all(f"{s} → {t} (K-composition" in low for s, t in (("0.0", "2.0"), ("0.3", "1.2"), ("0.1", "1.2")))


def test_past_three_rejected_pairs_the_rest_are_counted():
    """Truth: 4 rejected pairs, none high (scores 0.045 … 0.07 under 0.08): three listed, "and 1 more" (4 − 3)."""
    r = _all_rejected({((0, 2), (2, 0)): 0.05, ((0, 0), (2, 0)): 0.045, ((0, 3), (1, 2)): 0.06,
                       ((0, 1), (1, 2)): 0.07})  # fmt: skip
    low = one(R.composition_sentences(r), "Path patching also rejects 4 pairs")
    assert low.count("(K-composition") == 3 and low.endswith("; and 1 more in the tables below.")


# ---- heads: the page -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def heads_page():
    """The heads page rendered with every figure captured (its src is ``fig:N``)."""
    mp = pytest.MonkeyPatch()
    figures: list = []
    mp.setattr(F, "figure_data_uri", lambda fig, *a, **k: figures.append(fig) or f"fig:{len(figures) - 1}")
    try:
        html = render_string("mechscope.lm", "heads.html.j2", **R.report_context(make_result()))
    finally:
        mp.undo()
    p = Page(html)
    p.figures, p.html = figures, html
    return p


def fig_of(page, alt: str):
    return page.figures[int(page.imgs[alt][4:])]


def test_the_heads_table_lists_every_head_up_to_twenty(heads_page):
    """Truth: the model has 3 × 4 = 12 heads, fewer than the table's 20: all 12 rows, each head once."""
    rows = heads_page.table("head", "label")
    assert sorted(r["head"] for r in rows) == sorted(f"{layer}.{h}" for layer in range(3) for h in range(4))


def test_the_circuit_figure_widths_and_dashes_follow_the_drops(heads_page):
    """Truth: the figure's title, "width: the largest drop" and "dashed: marginal for every head": edges 0.1 → 1.2
    (drop 0.5, not marginal) and 0.0 → 2.0 (drop 0.06, marginal): widths 0.8 + 5 · drop = 3.3 and 1.1, the second
    dashed; sources green, key/value heads orange."""
    ax = fig_of(heads_page, "circuit").axes[0]
    arrows = [p for p in ax.patches if isinstance(p, FancyArrowPatch)]
    assert [a.get_linewidth() for a in arrows] == pytest.approx([3.3, 1.1])
    assert [a.get_linestyle() for a in arrows] == ["-", "--"]
    colours = {t.get_text(): c.get_facecolor()[:3] for c, t in zip(
        [p for p in ax.patches if isinstance(p, Circle)], [t for t in ax.texts if t.get_bbox_patch() is None],
        strict=True)}  # fmt: skip
    assert colours["0.1"] == pytest.approx((0x1B / 255, 0x9E / 255, 0x77 / 255))
    assert colours["1.2"] == pytest.approx((0xD9 / 255, 0x5F / 255, 0x02 / 255))


def test_the_mean_ablation_map_counts_its_measured_heads(heads_page):
    """Truth: MEASURED holds 7 heads; the zero-ablation map's result measured 1."""
    titles = [t for t in heads_page.imgs if t and "ablation" in t and "estimates" in t]
    assert any(t.startswith(F.TITLES["ablation_loss_increase"]) and t.endswith("(7 heads)") for t in titles)
    assert any(t.startswith(F.TITLES["zero_ablation_loss_increase"]) and t.endswith("(1 heads)") for t in titles)


def test_a_signed_map_is_symmetric_about_its_largest_magnitude(monkeypatch):
    """Truth: values −0.9 … +0.3: the colour scale spans ±0.9 (the largest |value|, not the largest value)."""
    figs = captured(monkeypatch, F)
    F.layer_head_figure(np.array([[-0.9, 0.3], [0.1, 0.2]]), "t")
    assert figs[0].axes[0].get_images()[0].get_clim() == pytest.approx((-0.9, 0.9))


def test_a_score_with_one_missing_cell_is_still_drawn(monkeypatch):
    """Truth: previous-token on text with one NaN cell (3 × 4 heads, 11 measured) is a score that was measured."""
    scores = _scores()
    scores["previous_token_text"][1, 1] = np.nan
    captured(monkeypatch, F)  # the maps drawn, not encoded
    titles = [t for t, _ in F.heatmaps(make_result(scores=scores))]
    assert F.TITLES["previous_token_text"] in titles


def test_the_loss_plot_names_each_copy_at_its_middle(monkeypatch):
    """Truth: with n = 4 the first copy's positions are 0 … 4 and the second's 5 … 8: labels at 2 and 6."""
    figs = captured(monkeypatch, F)
    F.loss_plot([5.0] * 9, 4)
    where = {t.get_text(): t.get_position()[0] for t in figs[0].axes[0].texts}
    assert where == {"first copy": 2.0, "second copy": 6.0}


def test_an_edge_dashed_only_when_every_head_it_passes_for_is_marginal():
    """Truth: the circuit_graph docstring; 0.0 → key/value head 1 of layer 2, query heads 2.2 (drop 0.5, far above
    its threshold 0.1) and 2.3 (drop 0.06 against 0.05, s.e. 0.02: marginal): not dashed; 2.3 starred."""
    from mechscope.lm.methods.path_patching import PathPatch

    pp = PathPatch((0, 0), 2, 1, (2, 3), (0.5, 0.25), (0.0, 0.19), (0.5, 0.06), (0.02, 0.04), (True, True), None, None)
    (edge,) = F.circuit_graph(make_result(path_patches=(pp,)))[1]
    assert edge["marginal_heads"] == [3] and edge["marginal"] is False
    assert F.edge_label(edge, 2) == "2.2/3*\ndrop 0.50"


def test_a_key_value_node_with_no_passing_head_is_named_by_its_group(result):
    """Truth: 2 query heads per key/value head, so key/value head 1 of layer 0 serves query heads 0.2 and 0.3."""
    assert F.node_text(("kv", 0, 1), result) == "0.2/3"


def test_the_agreement_figures_diagonal_spans_both_axes(monkeypatch):
    """Truth: estimates (−1.0, 0.5) against measurements (0.25, 2.0): the y = x line runs from −1.0 to 2.0; the
    title names the ablation's own kind."""
    est = np.zeros((1, 2, 2))
    est[0, 0], est[0, 1] = -1.0, 0.5
    a = HeadAblation.measured("resample", est, {(0, 0): np.full(2, 0.25), (0, 1): np.full(2, 2.0)})
    figs = captured(monkeypatch, F)
    F.agreement_figure(a)
    ax = figs[0].axes[0]
    (diag,) = ax.get_lines()
    assert list(diag.get_xdata()) == [-1.0, 2.0] == list(diag.get_ydata())
    assert ax.get_title().startswith("resample-ablation")


# ---- circuits ------------------------------------------------------------------------------------------------


def _comp(k_value: float, low: float = 0.0) -> CompositionResult:
    k = np.zeros((3, 4, 3, 4))
    k[0, 2, 2, 0], k[1, 0, 2, 3] = k_value, low
    z = np.zeros_like(k)
    return CompositionResult.of({"Q": z, "K": k, "V": z}, Baseline(mean=0.25, std=0.01, samples=50, seed=0), True, 20)


def test_a_composition_of_exactly_twice_the_baseline_is_high():
    """Truth: the sentence's own "high means at least 2×": 0.5 against a baseline of 0.25 (2.0× exactly)."""
    from mechscope.lm.methods.circuits import CircuitsResult

    r = CircuitsResult("hand-made", "folded", _comp(0.5), ((2, 0),), unavailable={"induction_circuit": "no"})
    line = one(C.summary(r), "The strongest K-composition")
    assert line.startswith("The strongest K-composition is 0.2 → 2.0: 0.500, 2.0× the random baseline 0.250 (high;")


def test_the_composition_figure_is_symmetric_and_ticks_name_layers(monkeypatch):
    """Truth: above-baseline values 0.5 − 0.25 = +0.25 and 0 − 0.25 = −0.25 … and one at −0.25 + (−0.6) = −0.85
    (a score of −0.6, hand-made): the colour scale spans ±0.85; ticks every 4 heads name layers 0, 1, 2."""
    figs = captured(monkeypatch, C)
    C.composition_figure(_comp(0.5, low=-0.6), "K")
    ax = figs[0].axes[0]
    assert ax.get_images()[0].get_clim() == pytest.approx((-0.85, 0.85))
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "1", "2"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0", "1", "2"]


def test_the_logit_lens_rows_name_the_embeddings_then_each_block():
    """Truth: LogitLens' rows, row 0 the embeddings and row i after block i − 1 (3 rows: embed, after 0, after 1),
    then the input tokens."""
    from mechscope.lm.methods.circuits import CircuitsResult
    from mechscope.lm.methods.direct import LogitLens

    top = np.array([[1, 2, 3], [2, 3, 1], [3, 1, 2]])
    lens = LogitLens([1, 2, 3], top, np.full((3, 3), 0.5), np.zeros((3, 2)))
    r = CircuitsResult("hand-made", "folded", _comp(0.5), (), lens=lens, decoder=lambda i: "xyz"[i - 1],
                       prompt_text=("x", "y", "z"))  # fmt: skip
    rows = C.report_context(r)["lens_rows"]
    assert [row["layer"] for row in rows] == ["embed", "after 0", "after 1", "input"]
    assert [list(row["tokens"]) for row in rows] == [["x", "y", "z"], ["y", "z", "x"], ["z", "x", "y"], ["x", "y", "z"]]


# ---- neurons -------------------------------------------------------------------------------------------------


def _layer(figs, density, layer=0, contexts=None) -> NeuronsResult:
    contexts = contexts or ((),) * len(figs)
    lay = LayerNeurons(layer, f"blocks.{layer}.mlp.hook_post", tuple(figs), (2.0,) * len(figs), tuple(density),
                       contexts)  # fmt: skip
    return NeuronsResult("hand-made", 20, 10, SAMPLE, BASELINE, (lay,), tokens=torch.tensor([[5, 6, 7, 8, 9]]))


def test_the_dense_line_counts_the_neurons_left_out():
    """Truth: densities 0.9, 0.1, 0.2, 0.3: one of the 4 counted neurons is positive on at least half the positions."""
    r = neurons([0.0, 1.0, 2.0, 3.0], [1.0, 0.6, 0.4, 0.2], density=[0.9, 0.1, 0.2, 0.3])
    assert N.dense_line(r).startswith("1 of the 4 counted neurons are positive on at least 50% of the positions")


def _decode(i: int) -> str:
    return {5: " a", 6: "b\n", 7: "c", 8: "d", 9: "e"}[i]


def test_a_neuron_row_decodes_its_tokens_in_order():
    """Truth: the hand-made decoder: top token 5 = " a" (space shown ␣), previous token −1 = the window's start,
    bigram (6, 7) = "b\\n" then "c" (newline shown ↵), the previous token first."""
    f = Concentration(12, 1.0, 5, 0.6, -1, 0.3, (6, 7), 0.2)
    r = _layer([f], [0.1])
    row = N.neuron_row(r, 0, 0, N.Decoder(_decode), r.tokens.numpy())
    assert (row["top_token"], row["prev_token"], row["bigram"]) == ("␣a", "⟨start⟩", "b↵c")


def test_a_context_starts_at_its_own_position_and_titles_its_top():
    """Truth: a context from position 2 of the row [5, 6, 7, 8, 9] shows tokens 7, 8, 9 ("c", "d", "e"); its top
    (position 3, activation 1.5) carries the activation as its title."""
    ctx = {"seq": 0, "start": 2, "pos": 3, "acts": [0.3, 1.5, 0.9], "act": 1.5}
    html = str(N.context_html(ctx, np.array([[5, 6, 7, 8, 9]]), 1.5, N.Decoder(_decode)))
    assert ">c</span>" in html and ">e</span>" in html and ">a</span>" not in html
    assert '<span class="a10 top" title="1.5">d</span>' in html


def test_a_neuron_firing_exactly_min_count_times_is_counted():
    """Truth: the page's rule, "fewer than 10" is rarely active: n = 10 is counted, n = 9 is not."""
    figs = [Concentration(n, 1.0, 5, 0.6, 6, 0.3, (6, 7), 0.2) for n in (10, 9)]
    r = _layer(figs, [0.1, 0.1])
    dec = N.Decoder(_decode)
    assert [N.neuron_row(r, 0, i, dec, r.tokens.numpy())["counted"] for i in (0, 1)] == [True, False]


def test_the_asked_neurons_table_holds_the_asked_neuron(monkeypatch):
    """Truth: asked (layer 0, neuron 1): its row is 0.1, entropy 1.00 bits, density 0.050."""
    captured(monkeypatch, N)  # the figure drawn, not encoded
    r = neurons([0.0, 1.0, 2.0], [1.0, 0.6, 0.4], density=[0.3, 0.05, 0.2])
    ctx = N.report_context(r, str, asked=((0, 1),))
    assert [row["id"] for row in ctx["asked"]] == ["0.1"]
    assert ctx["asked"][0]["entropy"] == 1.0 and ctx["asked"][0]["density"] == 0.05


def test_the_distribution_figure_draws_the_baselines_band_and_line(monkeypatch):
    """Truth: BASELINE's entropy 5–95% band (2.9 to 3.5 bits) and top-share mean (0.2); a rarely active neuron
    (n = 3 < 10) with entropy 9 bits is left out of the histogram: the legend's median is that of 0.5 and 1.5."""
    figs = captured(monkeypatch, N)
    f = [Concentration(20, 0.5, 5, 0.9, 6, 0.1, (6, 7), 0.1), Concentration(20, 1.5, 5, 0.6, 6, 0.1, (6, 7), 0.1),
         Concentration(3, 9.0, 5, 0.3, 6, 0.1, (6, 7), 0.1)]  # fmt: skip
    N.distribution_figure({"gelu": _layer(f, [0.1] * 3)}, 5)
    a, b = figs[0].axes[:2]
    band = [p for p in a.patches if p.get_label().startswith("random positions")]
    assert [(p.get_x(), p.get_x() + p.get_width()) for p in band] == [pytest.approx((2.9, 3.5))]
    (vline,) = [ln for ln in b.get_lines() if ln.get_label() == "random positions (mean)"]
    assert list(vline.get_xdata()) == pytest.approx([0.2, 0.2])
    assert "median 1.00" in a.get_legend().get_texts()[0].get_text()  # median of 0.5 and 1.5, not of 0.5, 1.5, 9


def test_one_layer_is_labelled_by_its_own_index():
    """Truth: a result holding only layer 3."""
    r = _layer([Concentration(20, 0.5, 5, 0.9, 6, 0.1, (6, 7), 0.1)], [0.1], layer=3)
    assert list(N.by_layer(r)) == ["layer 3"]


def test_no_counted_neuron_in_either_model_names_both():
    """Truth: neither GELU nor SoLU has a counted neuron: "No neuron of GELU or SoLU"."""
    rows = [compare_row("GELU", 1.5, 0, 0, 16, neurons=0), compare_row("SoLU", 1.6, 0, 0, 9, neurons=0)]
    lines = N.compare_lines(rows)
    assert lines[1].startswith("No neuron of GELU or SoLU has at least 10 positive activations")
    assert lines[-1] == "Rarely active neurons (fewer than 10 positive activations): GELU 16, SoLU 9."


def _layers(n_layers: int, per_layer: int = 1) -> NeuronsResult:
    f = (Concentration(20, 1.0, 5, 0.5, 6, 0.1, (6, 7), 0.1),) * per_layer
    lays = tuple(LayerNeurons(i, f"blocks.{i}.mlp.hook_post", f, (1.0,) * per_layer, (0.1,) * per_layer,
                              ((),) * per_layer) for i in range(n_layers))  # fmt: skip
    return NeuronsResult("hand-made", 20, 10, SAMPLE, BASELINE, lays, tokens=torch.tensor([[5, 6, 7, 8, 9]]))


def test_a_page_of_exactly_max_listed_neurons_lists_them_all(monkeypatch):
    """Truth: the page's own words, "more than the 4,096 a page lists one by one": 2 layers × 2,048 = 4,096 neurons
    are listed, every one."""
    captured(monkeypatch, N)
    ctx = N.report_context(_layers(2, 2048), _decode, n_ranked=1)
    assert [len(rows) for _, rows in ctx["listed"]] == [2048, 2048]


def test_every_layer_of_a_six_layer_model_is_drawn(monkeypatch):
    """Truth: lm neurons reads every MLP layer by default; 6 layers, each one neuron: the top-share panel has one
    curve per layer, labelled layer 0 … layer 5, in six different colours (the docstring: one colour per model or
    layer)."""
    from matplotlib.colors import to_hex

    figs = captured(monkeypatch, N)
    N.distribution_figure(N.by_layer(_layers(6)), 5)
    curves = [ln for ln in figs[0].axes[1].get_lines() if ln.get_label().startswith("layer")]
    assert [ln.get_label() for ln in curves] == [f"layer {i}" for i in range(6)]
    assert len({to_hex(ln.get_color()) for ln in curves}) == 6


@pytest.mark.parametrize(
    "n_edges, tail", [(8, None), (9, "One more confirmed path is"), (10, "2 more confirmed paths are")]
)
def test_past_eight_confirmed_paths_the_rest_are_counted(n_edges, tail):
    """Truth: edges counted by hand: sources 0.0-0.3 into the four key/value heads of layers 1 and 2, every test
    confirmed: eight told one sentence each, the rest counted (none when there are exactly eight)."""
    pairs = [((0, h), layer, kv) for layer in (1, 2) for kv in (0, 1) for h in range(4)][:n_edges]
    patches = tuple(_patch(s, layer, kv, (0.8, 0.8), (0.1, 0.1), (0.01, 0.01), (True, True)) for s, layer, kv in pairs)
    lines = R.circuit_sentences(make_result(path_patches=patches))
    assert sum(s.startswith("Path patching 0.") for s in lines) == 8  # one per told edge (sources 0.x)
    counted = [s for s in lines if "drawn in the circuit figure" in s]
    assert counted == ([] if tail is None else [f"{tail} drawn in the circuit figure and listed in the path-patching "
                                                "tables below."])  # fmt: skip
