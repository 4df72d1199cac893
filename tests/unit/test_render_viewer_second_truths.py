"""The shared render layer, second pass, against truths outside the code: circuit layouts whose node heights are
worked out by hand from the documented barycentric rule, figures read back from their artists, notebook fragments
and pages read by html.parser (reusing :class:`tests.unit.test_cnn_pages_truths.Page`), JSON in scripts read back by
json, and sentences written out by hand from the records they describe (distinct values, so no swap goes unseen)."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import numpy as np
import pytest
from matplotlib.figure import Figure

from mechscope.core.render import discovery as D
from mechscope.core.render import fragment as F
from mechscope.core.render import graph_sections as gs
from mechscope.core.render import graph_viewer as gv
from mechscope.core.render import html as RH
from mechscope.core.render import layout as CL
from mechscope.core.render.viewer import AttentionViewer, Table
from tests.unit.test_cnn_pages_truths import Page
from tests.unit.test_render_truths import EVIL, PAGE, Doc

# ---- layout.py: barycentric ordering by hand, figures read back from their artists -------------------------------


def _heights(lay) -> dict:
    return {n: round(y, 9) for n, (_, y) in lay.pos.items()}


def test_crossed_edges_are_untangled_by_the_neighbours_mean_height():
    """By hand: a0→b1 and a1→b0 cross in the given order. Sweep 1 orders column a by its neighbours' heights (a0's
    b1 at +½, a1's b0 at −½: a1 below a0), then column b by the new heights (b0 below b1): both edges level."""
    lay = CL.circuit_layout(["a0", "a1", "b0", "b1"], [("a0", "b1"), ("a1", "b0")], lambda n: n[0])
    h = _heights(lay)
    assert h == {"a1": -0.6, "a0": 0.6, "b0": -0.6, "b1": 0.6}
    for a, b in (("a0", "b1"), ("a1", "b0")):
        assert h[a] == h[b] and lay.bends[(a, b)] == 0.0


def test_an_edge_within_a_column_does_not_move_its_nodes():
    """The documented rule counts neighbours in the *other* columns only. With a0—a1 (same column) and a1→b2, by
    hand the given order is already sorted: a0 has none (keeps −½), a1 has b2 at +1; b0 and b1 have none (−1, 0),
    b2 has a1 at +½. So nothing moves: heights −0.6, 0.6 and −1.2, 0, 1.2."""
    nodes = ["a0", "a1", "b0", "b1", "b2"]
    lay = CL.circuit_layout(nodes, [("a0", "a1"), ("a1", "b2")], lambda n: n[0])
    assert _heights(lay) == {"a0": -0.6, "a1": 0.6, "b0": -1.2, "b1": 0.0, "b2": 1.2}


def _drawn_circuit(**kw):
    fig = Figure()
    ax = fig.subplots()
    edges = [{"a": "x", "b": "y", "width": 0.1}, {"a": "y", "b": "z", "width": 0.9, "label": "e2"}]
    CL.draw_circuit(ax, ["x", "y", "z"], edges, {"x": 0, "y": 3, "z": 7}.__getitem__, **kw)
    return ax


def test_each_arrow_is_as_wide_as_its_edge_and_each_column_ticked_by_its_label():
    """Read back from the artists: the arrows' widths are 0.6 + 5·width (1.1 and 5.1, in edge order), the discs sit
    at the layout's centres, and the ticks read the labels the caller gave each layer (a layer without one: its
    number)."""
    from matplotlib.patches import Circle, FancyArrowPatch

    ax = _drawn_circuit(column_labels={0: "embed", 7: "logits"})
    arrows = [p for p in ax.patches if isinstance(p, FancyArrowPatch)]
    assert [a.get_linewidth() for a in arrows] == pytest.approx([1.1, 5.1])
    discs = [p.center for p in ax.patches if isinstance(p, Circle)]
    assert discs == [(0.0, 0.0), (1.6, 0.0), (3.2, 0.0)]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["embed", "3", "logits"]
    assert "e2" in [t.get_text() for t in ax.texts]


def test_the_faithfulness_curve_plots_percentages_and_the_random_band_is_mean_plus_minus_sd():
    """Read back from the lines: x is each fraction ×100 (1, 10, 100); the circuit's curve is drawn once when the
    |score| ranking gives the same values; the band spans mean − sd to mean + sd (numpy, by hand)."""
    fig = Figure()
    ax = fig.subplots()
    frac, faith = [0.01, 0.1, 1.0], [0.2, 0.7, 1.0]
    mean, sd = np.array([0.05, 0.3, 1.0]), np.array([0.01, 0.1, 0.0])
    CL.draw_faithfulness(ax, frac, faith, mean, sd, absolute=list(faith), label="eap", ranked="signed score")
    lines = [ln for ln in ax.lines if len(ln.get_xdata()) == 3]
    assert [ln.get_label() for ln in lines] == ["eap, ranked by signed score", "random circuits"]
    np.testing.assert_allclose(lines[0].get_xdata(), [1, 10, 100])
    np.testing.assert_allclose(lines[0].get_ydata(), faith)
    (band,) = ax.collections
    ys = band.get_paths()[0].vertices[:, 1]
    assert ys.min() == pytest.approx(0.04) and ys.max() == pytest.approx(1.0)
    np.testing.assert_allclose(sorted(set(np.round(ys, 9))), sorted({*np.round(mean - sd, 9), *np.round(mean + sd, 9)}))
    ax2 = Figure().subplots()
    CL.draw_faithfulness(ax2, frac, faith, absolute=[0.1, 0.5, 1.0], label="eap")
    assert [ln.get_label() for ln in ax2.lines if len(ln.get_xdata()) == 3] == ["eap", "eap, ranked by |score|"]


# ---- fragment.py: a fragment read by html.parser ------------------------------------------------------------------


def _css(frag: str) -> str:
    (css,) = re.findall(r"<style>(.*?)</style>", frag, re.S)
    return css


def test_the_pages_body_style_becomes_the_roots_own_and_id_selectors_follow_the_renamed_ids():
    """Written out by hand: "body { color: red; }" styles the root element itself ("#uid {"), and "#tokens td"
    becomes "#uid #uid-tokens td", the id html.parser finds on the renamed paragraph."""
    frag = F.page_to_fragment(PAGE)
    doc = Doc(frag)
    root = doc.tags[0][1]["id"]
    css = _css(frag)
    assert f"#{root} {{ color: red; }}" in css
    assert f"#{root} #{root}-tokens td {{ color: blue; }}" in css
    assert f"{root}-tokens" in doc.ids()


def test_aria_references_point_at_the_renamed_ids_and_links_out_of_the_fragment_keep_its_prefix():
    """html.parser: aria-labelledby names an id of the fragment; a link to an id that is not on the page gets the
    fragment's prefix (the documented rule), not the bare name another cell could own."""
    page = ('<html><body><h2 id="s">S</h2><p id="lab">L</p><div aria-labelledby="lab">x</div>'
            '<a href="#nowhere">n</a></body></html>')  # fmt: skip
    doc = Doc(F.page_to_fragment(page))
    root = doc.tags[0][1]["id"]
    (div,) = [a for a in doc.all("div") if "aria-labelledby" in a]
    assert div["aria-labelledby"] == f"{root}-lab" and div["aria-labelledby"] in doc.ids()
    (a,) = doc.all("a")
    assert a["href"] == f"#{root}-nowhere"


def test_keep_open_sections_are_not_folded_and_the_note_names_what_was_left_out():
    """html.parser: keep_open=("Three",) leaves one <details> (Two); with a size cap, the note names the caller's
    omitted part and the section cut, and the caller's own call for the whole report."""
    doc = Doc(F.page_to_fragment(PAGE, keep_open=("Three",)))
    assert len(doc.all("details")) == 1
    frag = F.page_to_fragment(PAGE, max_chars=5000, omitted=["the heads"], full_report="r.save_html('x.html')")
    text = Doc(frag).joined()
    assert "Not shown here, to keep the notebook light: the heads, Three." in text
    assert "The whole report: r.save_html('x.html')." in text


def test_keep_open_names_a_section_by_its_title_as_read():
    """html.parser reads the title "Three & four" from "Three &amp; four": keep_open given that text leaves the
    section open (one <details>, Two's)."""
    page = PAGE.replace(">Three<", ">Three &amp; four<")
    assert len(Doc(F.page_to_fragment(page, keep_open=("Three & four",))).all("details")) == 1


def test_each_kept_script_runs_in_its_own_function():
    """The documented scoping read off the scripts html.parser sees: each is one function expression, called."""
    for js in Doc(F.page_to_fragment(PAGE)).scripts:
        assert js.startswith("(function () {\n") and js.endswith("\n})();")


# ---- html.py ----------------------------------------------------------------------------------------------------


def test_script_json_has_no_character_html_reads_inside_a_script():
    """json.loads reads it back to the input, and none of <, > or & is left as itself (each a \\u escape)."""
    data = {"a": EVIL, "b": "x & y > z"}
    out = RH.script_json(data)
    assert json.loads(out) == data
    assert not set("<>&") & set(out)


def test_the_footer_goes_before_the_last_body_close_or_at_the_end():
    """html.parser: a "</body>" inside a comment is not the closing one (the footer is still a tag of the body,
    after the paragraph); a fragment without </body> ends with the footer."""
    doc = Doc(RH.with_footer("<html><body><!-- </body> --><p>x</p></body></html>"))
    tags = [t for t, _, _ in doc.tags]
    assert tags.index("footer") > tags.index("p")
    assert Doc(RH.with_footer("<p>x</p>")).tags[-1][0] == "footer"


# ---- graph_viewer.py / graph_sections.py --------------------------------------------------------------------------


def test_a_table_marks_only_its_first_left_columns_as_text():
    """html.parser over the cells' class attributes: left=2 puts class "l" on the first two cells of each row."""
    doc = Doc(gv.table_html(["a", "b", "c"], [["x", "y", 1.5]], left=2))
    assert [a["class"] for a in doc.all("td")] == ["l", "l", ""]
    assert [a["class"] for a in doc.all("th")] == ["l", "l", ""]


COUNTS = {"active_features": 101, "feature_nodes": 57, "rows": 1234, "backward_passes": 9, "error_nodes": 12,
          "input_nodes": 5, "nodes_pruned": 33, "edges_pruned": 77}  # fmt: skip


def _record(kind="cnn"):
    return {"kind": kind, "nodes": [{"id": "L", "kind": "logit", "label": "cat", "probability": 0.625}],
            "scores": {"replacement": 0.61, "replacement_pruned": 0.52, "completeness": 0.93,
                       "completeness_pruned": 0.84}, "counts": COUNTS,
            "settings": {"node_threshold": 0.7, "edge_threshold": 0.95},
            "exactness": {"logits_max_abs_diff": 0.0021, "logit_scale": 7.5, "edges_sources_checked": 4,
                          "edges_max_abs_error": 0.0031, "edges_largest": 2.25}}  # fmt: skip


def test_the_summary_puts_every_count_score_and_check_where_the_record_has_it():
    """html.parser, sentences written from the record by hand (every count distinct): no two fields swapped; the
    cnn record gets the cnn's scope (ReLU gates), not the lm's."""
    html = gv.summary_html(_record())
    page, text = Page(html), Doc(html).joined()
    assert page.table("score", "whole graph") == [
        {"score": "replacement score", "whole graph": "0.61", "pruned graph": "0.52"},
        {"score": "completeness score", "whole graph": "0.93", "pruned graph": "0.84"}]  # fmt: skip
    assert (
        "101 active features, 57 with rows (1,234 rows in 9 backward passes), 12 error nodes (0 kept by the "
        "pruning), 5 inputs; pruned to 33 nodes and 77 edges (node threshold 0.7, edge threshold 0.95)."
    ) in text
    assert "max |difference| 0.0021 (largest |logit| 7.5)" in text
    assert (
        "4 sources scaled by 2 in the frozen model: every computed target moved by its edge to 0.0031 (the "
        "largest of those sources' edges 2.25)" in text
    )
    assert "ReLU and max-pool gates are frozen" in text and "attention patterns" not in text
    ones = dict.fromkeys(COUNTS, 1)
    one = Doc(gv.summary_html({**_record(), "counts": ones, "scores": dict.fromkeys(_record()["scores"])})).joined()
    assert (
        "1 active feature, 1 with rows (1 row in 1 backward pass), 1 error node (0 kept by the pruning), 1 input; "
        "pruned to 1 node and 1 edge (" in one
    )


def test_the_ratio_of_two_steps_names_which_one_does_not_move():
    """By hand: 0 then 2: the first does not move; 2 then 0: the second; −1 then 2: opposite signs; 4.5 / 1.5 = 3."""
    assert gs._ratio(0.0, 2.0) == "the first does not move"
    assert gs._ratio(2.0, 0.0) == "the second does not move"
    assert gs._ratio(-1.0, 2.0) == "the opposite sign"
    assert gs._ratio(4.5, 1.5) == "3.0× as large"


def test_what_the_prediction_leaves_out_is_counted_from_the_record():
    """By hand: 101 active features, 57 with rows → 44 without; 6 entries dropped; none of either → nothing said."""
    assert gs._left_out({**COUNTS, "entries_dropped": 6}) == (
        " (and in this graph 44 active features have no row and 6 row entries were dropped, which the prediction "
        "leaves out)")  # fmt: skip
    assert gs._left_out({"active_features": 3, "feature_nodes": 3}) == ""


def test_the_frozen_to_recomputed_gap_names_each_wings_own_nonlinearity():
    """The cnn freezes ReLU masks and max pools; the lm attention patterns and normalisation scales."""
    assert "ReLU masks and max-pool choices" in gs._gap_reason(("frozen", "recomputed"), "cnn", {})
    assert "attention patterns and normalisation scales" in gs._gap_reason(("frozen", "recomputed"), "lm", {})


def test_dictionary_entries_read_as_text_and_long_lists_say_they_go_on():
    """By hand: nine items show eight and an ellipsis, eight show all eight; 12345 reads 12,345; True stays True."""
    assert gs._readable(list(range(9))) == "0, 1, 2, 3, 4, 5, 6, 7 …"
    assert gs._readable(list(range(8))) == "0, 1, 2, 3, 4, 5, 6, 7"
    assert gs._readable({"batch_size": 12345, "flag": True}) == "batch size 12,345, flag True"


def test_stage_quality_rows_and_the_largest_error_share_wherever_it_is_listed():
    """html.parser: a cnn's quality rows are by stage; 1 dead of 8 is 12.5% (not 1/9); the largest error share is
    stage "b" (0.7), listed first, not the last-listed stage."""
    q = [{"stage": "b", "explained_variance": 0.4, "l0": 2.0, "error_share": 0.7, "dead": 1, "d_sae": 8},
         {"stage": "c", "explained_variance": 0.9, "l0": 5.0, "error_share": 0.1, "dead": 0, "d_sae": 16}]  # fmt: skip
    html = gs._quality_html(q, None)
    rows = Page(html).table("stage", "explained variance")
    assert [r["dead features"] for r in rows] == ["1 of 8 (12.5%)", "0 of 16 (0.0%)"]
    assert "The largest error share is stage b's: the error's mean norm is 70.0% of the output's" in Doc(html).joined()


def _paths(heads):
    return {"target": "0_1_0", "label": "", "max_abs_residual": 0.0, "heads": heads, "rows": []}


def test_the_heads_table_lists_only_heads_that_carried_anything():
    """html.parser: of heads with |parts| 2, 0 and 0.5, the table lists "1.2" and "0.3" (not the one at 0)."""
    heads = [{"head": "1.2", "total": 2.0, "abs": 2.0}, {"head": "0.0", "total": 0.0, "abs": 0.0},
             {"head": "0.3", "total": -0.5, "abs": 0.5}]  # fmt: skip
    html = gs.sections_html({"nodes": [], "settings": {}, "paths": [_paths(heads)]})
    assert [r["head"] for r in Page(html).table("head", "total")] == ["1.2", "0.3"]


def test_one_attributed_logit_is_named_in_the_singular_and_image_pixels_stay_in_the_json():
    """A record with one logit per intervention says "the attributed logit"; the image_pixels setting reads as the
    documented pointer to graph.json, not its values."""
    r = {"label": "x", "predicted_full": 1.0, "predicted_pruned": 0.5, "frozen": 1.0, "recomputed": 1.0, "model": 1.0}
    d = {"kind": "lm", "nodes": [], "checks": [{"description": "ablate f", "logits": [r]}],
         "settings": {"image_pixels": [[0, 255]]}}  # fmt: skip
    text = Doc(gs.sections_html(d)).joined()
    assert "Change of the attributed logit minus the mean logit" in text
    assert "the image above (its grey values are in graph.json)" in text and "255" not in text


# ---- viewer.py ---------------------------------------------------------------------------------------------------


def test_a_long_sequence_says_how_many_of_its_positions_are_shown():
    """html.parser: 300 tokens show 256 token spans and the sentence "The first 256 of 300 positions are shown."."""
    p = np.tril(np.ones((300, 300)))
    p /= p.sum(1, keepdims=True)
    html = AttentionViewer([f"t{i}" for i in range(300)], p, 0, 1)._repr_html_()
    doc = Doc(html)
    assert len([s for s in doc.all("span") if s.get("class") == "tok"]) == 256
    assert "The first 256 of 300 positions are shown." in doc.joined()


def test_invisible_tokens_are_shown_as_signs_and_a_wrong_pattern_is_refused():
    """html.parser: a tab reads "⇥", an empty token "∅"; a 3×3 pattern for 2 tokens raises ValueError."""
    p = np.array([[1.0, 0, 0], [0.5, 0.5, 0], [0.2, 0.3, 0.5]])
    html = AttentionViewer(["\t", "", "a"], p, 0, 0)._repr_html_()
    texts = re.findall(r'<span class="tok"[^>]*>(.*?)</span>', html)
    assert texts == ["⇥", "∅", "a"]
    with pytest.raises(ValueError, match=r"does not match 2 tokens"):
        AttentionViewer(["a", "b"], p, 0, 0)


def test_a_table_heads_its_columns_in_words_and_its_text_form_is_right_aligned():
    """html.parser: column "mean_loss" is headed "mean loss"; the repr right-aligns each column (by hand, with
    str.rjust to the widest cell) and says how many rows it left out."""
    t = Table([{"mean_loss": 0.5, "n": 3}, {"mean_loss": 12.25, "n": 1000}, {"mean_loss": 1.0, "n": 7}], max_rows=2)
    assert Page(t._repr_html_()).tables[0][0] == ["mean loss", "n"]
    assert repr(t).splitlines() == ["mean_loss     n", "    0.500     3", "   12.250  1000", "... 1 more rows"]


# ---- discovery.py --------------------------------------------------------------------------------------------------


def test_a_numbers_spread_at_rounding_level_reads_as_zero_relative_to_its_size():
    """By hand: sd 1e-11 of a value 500 is below 1e-12 × 500 = 5e-10 (rounding, 0); sd 1e-11 of 1.0 is not."""
    assert D._pm(500.0, 1e-11) == "500 ± 0"
    assert D._pm(1.0, 1e-11) == "1 ± 1e-11"


def test_the_ends_of_the_metric_and_the_metrics_way():
    """Written by hand: a NaN corrupted metric is said to be absent; the metric words carry the better direction."""
    s = SimpleNamespace(metric_clean=1.5, metric_corrupted=float("nan"))
    assert D._ends(s).startswith("clean 1.5 (no corrupted metric")
    assert D._ends(SimpleNamespace(metric_clean=1.5, metric_corrupted=-0.25)) == "clean 1.5, corrupted -0.25"
    assert D.metric_words("kl", "lower") == ("kl (KL divergence of the output distribution from the clean run's, in "
                                             "nats; lower is better)")  # fmt: skip
    assert "estimated, to first order," in D.score_words(SimpleNamespace(method="eap", settings={}))


class _Circuit(list):
    """``n`` edges (i, i), each scoring ``score``: len() is the edge count, as a Circuit's."""

    def __init__(self, n: int, score: float):
        super().__init__((i, i) for i in range(n))
        self.edges, self.scores = list(self), np.full(n, score)


def _circuit_result(on_path, method="eap", top=1.0, gap=1.0):
    graph = SimpleNamespace(edge_id=lambda a, b: a, on_path=lambda ids: np.asarray(on_path, bool))
    scores = SimpleNamespace(graph=graph, scores=np.array([top, 0.5 * top]), metric_clean=1.0,
                             metric_corrupted=1.0 - gap)  # fmt: skip
    return SimpleNamespace(scores=scores, circuit=_Circuit(len(on_path), top), method=method)


def test_the_dangling_edges_are_counted_and_the_eap_warning_waits_for_one_percent():
    """By hand: 1 of 3 edges off every path is named as 1; with a metric gap of 1, a largest |score| of 0.05 (5%)
    gets no EAP warning, and 0.005 (0.5%) does."""
    assert D._dangling(_circuit_result([True, False, True])).startswith(" 1 of its edges lie on no path")
    assert D._caveats(_circuit_result([True], top=0.05)) == []
    (warn,) = D._caveats(_circuit_result([True], top=0.005))
    assert warn.startswith("EAP's largest |score| is 0.005, 0.50% of the change")


def test_the_scrub_figure_draws_unrun_claims_hollow_with_errors_as_shares_of_the_span(monkeypatch):
    """Read back from the bars: the hypothesis and a measured claim are filled, an unrun claim hollow; the
    measured claim's error bar is its sd over |clean − random| (0.2 / 4 = 0.05), by hand."""
    figs = []
    monkeypatch.setattr(D, "figure_data_uri", lambda fig: figs.append(fig) or "fig")
    claim = SimpleNamespace(name="run", recovered=0.5, metric_sd=0.2, measured=True)
    unrun = SimpleNamespace(name="not run", recovered=1.0, metric_sd=0.0, measured=False)
    scrub = SimpleNamespace(claims=[claim, unrun], unclaimed=None, recovered=0.75, recovered_sd=0.01,
                            metric_clean=5.0, metric_random=1.0)  # fmt: skip
    D.scrub_figure(scrub)
    ax = figs[0].axes[0]
    bars = ax.patches
    assert [b.get_width() for b in bars] == pytest.approx([0.75, 0.5, 1.0])
    assert [b.get_facecolor()[3] for b in bars] == [1.0, 1.0, 0.0]  # "none": transparent
    (err,) = [c for c in ax.collections if len(c.get_segments()) == 3]
    half = [abs(s[1][0] - s[0][0]) / 2 for s in err.get_segments()]
    assert half == pytest.approx([0.01, 0.05, 0.0])
