"""The words of an attribution graph's page and of its CLI line, on records with known numbers: which steps of an
intervention (graph, frozen, recomputed, model) disagree and why, what each measured column holds fixed, which
logits the table shows, the dictionaries' quality in labelled units, the grid a CNN node's position is in, the
largest |logit|, the axes' units and the settings without the image's pixels."""

from __future__ import annotations

import html

from mechscope.cnn.report.attribution_graph import _grids
from mechscope.core.attribution_graph.checks import GraphIntervention, disagree, gaps
from mechscope.core.render import graph_sections as gs
from mechscope.core.render import graph_viewer as gv


def row(label, pred, frozen, recomputed, model, pruned=None):
    return {"logit": 0, "token": 0, "label": label, "predicted_full": pred,
            "predicted_pruned": pred if pruned is None else pruned, "frozen": frozen, "recomputed": recomputed,
            "model": model}  # fmt: skip


# lm graph on the 2-layer toy transformer, ablate 0_126_42 (the review's graph.json): the graph predicts the
# opposite sign to the frozen run, and the model the opposite sign to the recomputed run
Y = row("y", -0.19928404688835144, 0.3541145324707031, 0.28748416900634766, -0.353909969329834, -0.20674961805343628)
N = row("n", -0.28006187081336975, 0.03952646255493164, 0.14121150970458984, -0.033089637756347656)
R = row("r", -0.07056896388530731, 0.15140533447265625, 0.1260666847229004, 0.02546977996826172)
# cnn graph of image 0 with the CNN's own channels (docs/cnn): frozen masks -1.541, the original CNN -0.152
POOL = row("7", -1.541, -1.541, -0.1524, -0.1524)
EXACT = row("7", -1.383, -1.383, -1.383, -1.383)


def page_text(s: str) -> str:
    return html.unescape(s)


def test_steps_disagree_in_sign_or_by_more_than_twice():
    assert gaps(Y) == [("predicted_full", "frozen"), ("recomputed", "model")]
    assert gaps(POOL) == [("frozen", "recomputed")]
    assert gaps(EXACT) == []
    assert disagree(1.0, 2.1) and not disagree(1.0, 1.9) and disagree(0.01, -0.01) and disagree(0.0, 0.5)
    assert not disagree(1e-4, -1e-4)  # float noise around zero
    # a step with no number is passed over: an old record's graph and model are compared directly
    assert gaps({"predicted_full": -1.541, "model": -0.1524}) == [("predicted_full", "model")]
    assert gaps({"predicted_full": float("nan"), "model": 1.0}) == []


def test_the_cli_line_flags_the_graph_against_the_frozen_run():
    line = GraphIntervention(description="ablate 0_126_42", changes={}, logits=(Y,)).summary()
    assert line.startswith("ablate 0_126_42: logit 'y' moves +0.354 (frozen), +0.287 (recomputed), -0.354 (model)")
    assert "graph vs frozen disagree (opposite signs): features downstream switch on or off" in line
    assert "recomputed vs model disagree (opposite signs): the error nodes change" in line
    assert "frozen vs recomputed" not in line
    pool = GraphIntervention(description="ablate 1_9_1", changes={}, logits=(POOL,)).summary()
    assert "frozen vs recomputed disagree (ratio 10): what the frozen run freezes changes" in pool
    assert "graph vs frozen" not in pool
    assert "disagree" not in GraphIntervention(description="ablate 1_18_4", changes={}, logits=(EXACT,)).summary()


def lm_record(**kw) -> dict:
    others = [row(t, 0.1, 0.1, 0.1, 0.1) for t in "ilmkubd"]
    d = {"kind": "lm", "nodes": [], "settings": {}, "dictionaries": {},
         "counts": {"active_features": 1344, "feature_nodes": 1344, "entries_dropped": 0},
         "checks": [{"description": "ablate 0_126_42", "logits": [Y, N, R, *others]}]}  # fmt: skip
    return d | kw


def test_the_interventions_name_each_step_that_disagrees_and_why():
    text = page_text(gs.sections_html(lm_record()))
    assert "Change of the first 3 of the 10 attributed logits, in the order listed above, each minus the mean" in text
    assert (
        "ablate 0_126_42, logit 'y': the graph (all edges) -0.1993 vs the frozen run +0.3541 (the opposite sign); "
        "the recomputed run +0.2875 vs the model -0.3539 (the opposite sign)." in text
    )
    assert (
        "logit 'n': the graph (all edges) -0.2801 vs the frozen run +0.03953 (the opposite sign); the frozen run "
        "+0.03953 vs the recomputed run +0.1412 (0.3× as large); the recomputed run +0.1412 vs the model -0.03309 "
        "(the opposite sign)." in text
    )
    assert "logit 'i'" not in text  # the rows not shown are not named
    assert "the frozen run re-encodes the features downstream: where they disagree, the intervention switches " in text
    assert "holding each dictionary's active set fixed, cannot follow." in text  # no rows left out in this graph
    assert "differ only in the attention patterns and normalisation scales" in text
    assert "differ only in the error nodes" in text
    # the columns' caption says what each run holds and recomputes, not "nonlinearities frozen, ... re-encoded"
    assert "nonlinearities frozen" not in text
    assert "Frozen: the attention patterns, normalisation scales and error nodes held at their values" in text
    assert "Recomputed: the same with the attention patterns and normalisation scales live; the error nodes" in text


def test_a_graph_with_rows_left_out_says_so_and_the_cnn_names_its_masks():
    counts = {"active_features": 1344, "feature_nodes": 300, "entries_dropped": 12}
    text = page_text(gs.sections_html(lm_record(counts=counts)))
    assert "(and in this graph 1,044 active features have no row and 12 row entries were dropped" in text
    cnn = lm_record(kind="cnn", checks=[{"description": "ablate 1_9_1", "logits": [POOL]}])
    text = page_text(gs.sections_html(cnn))
    assert "Change of the attributed logit minus the mean logit: predicted" in text
    assert "the frozen run -1.541 vs the recomputed run -0.1524 (10.1× as large)" in text
    assert "Frozen and recomputed differ only in the ReLU masks and max-pool choices" in text
    assert "Frozen: every ReLU mask, max-pool choice and error node held at its value on the image" in text
    exact = page_text(gs.sections_html(lm_record(checks=[{"description": "ablate 1_18_4", "logits": [EXACT]}])))
    assert "No neighbouring columns disagree." in exact and "<li>" not in exact


def test_the_lm_scope_says_the_active_sets_are_held_fixed():
    assert "each transcoder's active set (which of its features are active on the prompt) held fixed" in gv.SCOPE["lm"]
    assert "switches features downstream on or off" in gv.SCOPE["lm"]
    assert "not what set their patterns (QK)" in gv.SCOPE["lm"] and "--qk" in gv.SCOPE["lm"]
    assert "ReLU and max-pool gates are frozen" in gv.SCOPE["cnn"] and "active set" in gv.SCOPE["cnn"]


def test_dictionaries_read_as_labelled_quantities():
    dic = {
        "source": "trained here",
        "widths": [256, 256],
        "trained": {"tokens": 30000, "eval_tokens": 4096, "architecture": "topk", "layers": None},
        "quality": [
            {"layer": 0, "explained_variance": 0.4761326313018799, "l0": 16.0, "error_share": 0.7320438623428345,
             "dead": 0},
            {"layer": 1, "explained_variance": 0.42981499433517456, "l0": 16.0, "error_share": 0.7018470168113708,
             "dead": 1},
        ],
    }  # fmt: skip
    text = page_text(gs.sections_html({"nodes": [], "settings": {}, "dictionaries": dic}))
    assert "{'" not in text and "explained_variance" not in text and "error_share" not in text
    assert "trained with</td><td class=\"l\">tokens 30,000, eval tokens 4,096, architecture topk</td>" in text
    assert "<td class=\"l\">0</td><td class=\"\">47.6%</td><td class=\"\">16.0</td><td class=\"\">73.2%</td>" in text
    assert "1 of 256 (0.4%)" in text and "error share (‖error‖ / ‖output‖)" in text
    assert "The largest error share is layer 0's: the error's mean norm is 73.2% of the output's" in text
    assert "Much of what that layer writes reaches the graph through error nodes" in text
    cnn = {"quality": [{"stage": "conv2", "explained_variance": 0.888760507106781, "l0": 4.0,
                        "error_share": 0.2909318208694458, "dead": 11, "d_sae": 128}]}  # fmt: skip
    text = page_text(gs.sections_html({"nodes": [], "settings": {}, "dictionaries": cnn}))
    assert "11 of 128 (8.6%)" in text and "stage conv2's: the error's mean norm is 29.1%" in text
    assert "Much of what" not in text  # a small error share gets no warning


def test_a_cnn_graph_says_which_grid_its_positions_are_in():
    """The SAE reads each stage's pooled output (the default CNN's 12x12, 4x4); a transcoder and the channels read
    the convolution output before pooling (24x24, 8x8)."""
    names = ["conv1", "conv2"]
    sae = {"settings": {"grids": [[12, 12], [4, 4]]}, "layer_names": names, "dictionaries": {"kind": "sae"}}
    assert _grids(sae) == (
        "Feature positions are (row, column) in each stage's output after its ReLU and any max-pool "
        "(conv{i}.hook_out, which the SAE reads): conv1 12×12, conv2 4×4."
    )
    tc = {"settings": {"grids": [[24, 24], [8, 8]], "dictionary_kind": "transcoder"}, "layer_names": names}
    assert "before its ReLU and max-pool (conv{i}.hook_pre, which the transcoder reads): conv1 24×24" in _grids(tc)
    assert "before pooling" not in _grids(sae)


def test_summary_names_the_largest_absolute_logit_and_the_page_its_axes():
    d = {"scores": {}, "counts": {k: 0 for k in ("active_features", "feature_nodes", "rows", "backward_passes",
                                                  "error_nodes", "input_nodes", "nodes_pruned", "edges_pruned")},
         "nodes": [], "settings": {}, "kind": "cnn",
         "exactness": {"logits_max_abs_diff": 0.0, "logit_scale": 18.67535972595215}}  # fmt: skip
    text = gv.summary_html(d)
    assert "(largest |logit| 18.7)" in text and "largest logit" not in text
    page = gv.graph_page(d | {"edges": []}, {}, "t")
    assert "columns: the x of each node's receptive-field centre, in pixels of the input image (px)" in page
    assert 'Number(c).toFixed(1) + " px"' in page  # the column labels carry the unit


def test_the_settings_leave_the_image_pixels_to_the_json():
    pixels = [[0.0] * 28 for _ in range(28)]
    text = gs.sections_html({"nodes": [], "settings": {"image_pixels": pixels, "grids": [[12, 12]]}})
    assert "0.0, 0.0" not in text and "the image above (its grey values are in graph.json)" in text
    assert "[[12, 12]]" in text


def test_a_graph_checks_itself_through_the_nonlinearities_too():
    from mechscope.core.attribution_graph.checks import asked_interventions, auto_features

    feats = [{"id": "1_18_4", "layer": 1}, {"id": "1_3_2", "layer": 1}, {"id": "0_7_5", "layer": 0}]
    assert auto_features(feats) == ["1_18_4", "0_7_5"]  # the last stage's reaches the logit linearly: exact
    assert auto_features(feats[2:]) == ["0_7_5"] and auto_features([]) == []
    done = asked_interventions(lambda nodes, **kw: nodes, feats, True, ablate=[["1_3_2"]])
    assert done == [["1_18_4"], ["0_7_5"], ["1_3_2"]]
