"""Second-pass truths for report pages: ``lm train-toy`` (lm/report/toy.py), ``lm discover`` and ``cnn discover``
(lm/report/discovery.py, cnn/report/discovery.py), ``cnn universality`` (cnn/report/universality.py), ``cnn
solu-compare`` (cnn/report/solu_cnn.py) and the microscope (cnn/report/microscope.py).

Each test checks a sentence, a cell or a figure's artists against hand-made results with distinct values (numbers
that cannot be swapped unnoticed), recomputed by hand or by numpy, at the boundaries the pages state.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mechscope.cnn.report import discovery as CD
from mechscope.cnn.report import microscope as M
from mechscope.cnn.report import universality as U
from mechscope.core.render.html import png_uri
from mechscope.lm.report import discovery as LD
from mechscope.lm.report import toy as T
from tests.unit import test_cnn_pages_truths as pages_fixture
from tests.unit import test_sentences_universality as universality_fixture
from tests.unit.test_lm_report_truths import captured
from tests.unit.test_sentences_toy import series

# ---- toy (lm train-toy) ------------------------------------------------------------------------------------------


def _toy(detected: bool = True) -> dict:
    """test_sentences_toy's training.json with K-composition matrices of distinct entries: comp[t][i][j] =
    t + 0.1 i + 0.01 j (layer-1 head i reading layer-0 head j), and the induction head 1.1, previous-token head 0.0."""
    s = series(detected)
    for t, r in enumerate(s["series"]):
        r["k_composition"] = [[t + 0.1 * i + 0.01 * j for j in range(2)] for i in range(2)]
    s["circuit"] |= {"induction_head": [1, 1], "previous_token_head": [0, 0]}
    return s


def test_toy_k_composition_panel_highlights_the_pair_from_the_previous_token_head_into_the_induction_head(monkeypatch):
    """Truth: the hand-made matrices: the highlighted (labelled) line is layer-1 head 1 reading layer-0 head 0, so its
    values are t + 0.10 (0.10, 1.10, 2.10, 3.10), and the three grey lines are the other (i, j) entries."""
    figs = captured(monkeypatch, T)
    T.run_figure(_toy(), "t")
    ax = figs[0].axes[3]
    strong = [ln for ln in ax.get_lines() if not ln.get_label().startswith("_")]
    assert [ln.get_label() for ln in strong] == ["0.0 → 1.1"]
    np.testing.assert_allclose(strong[0].get_ydata(), [0.10, 1.10, 2.10, 3.10])
    grey = sorted(round(float(ln.get_ydata()[0]), 2) for ln in ax.get_lines() if ln.get_label().startswith("_"))
    assert grey == [0.0, 0.01, 0.11]


def test_toy_phase_band_starts_at_step_zero_drawn_at_0_8(monkeypatch):
    """Truth: the x axis is logarithmic and step 0 is drawn at 0.8 (the axis label says so): a phase change in the
    window 0–10 is shaded from 0.8 to 10 on every panel; the title names the window."""
    figs = captured(monkeypatch, T)
    s = _toy()
    s["phase_change"]["window"] = [0, 10]
    T.run_figure(s, "two layers")
    for ax in figs[0].axes:
        (band,) = ax.patches
        assert (band.get_x(), band.get_x() + band.get_width()) == pytest.approx((0.8, 10))
    assert figs[0]._suptitle.get_text() == "two layers — phase change at steps 0–10 (shaded)"


def test_toy_control_figure_draws_the_control_run_not_the_main_one(monkeypatch):
    """Truth: a hand-made 1-layer control whose held-out losses (9, 8, 7, 6) differ from the main run's (3, 2, 1, 0):
    the second figure is the control's, titled as such, with three panels and no phase band."""
    figs = captured(monkeypatch, T)
    s = series(True)
    ctl = copy.deepcopy(s)
    ctl["config"] = s["config"] | {"layers": 1}
    ctl["phase_change"] = {"detected": False, "share_of_range": 0.01, "induction_jump": 0.0, "icl_jump": 0.0}
    for i, r in enumerate(ctl["series"]):
        r["held_out_loss"], r["induction"] = 9.0 - i, [[0.5, 0.25]]
    s["control"] = ctl
    T.report_context(s)
    main, control = figs
    assert len(main.axes) == 4 and len(control.axes) == 3
    assert control._suptitle.get_text() == "1-layer control — no phase change detected"
    held = {ln.get_label(): list(ln.get_ydata()) for ln in control.axes[0].get_lines()}["held out"]
    assert held == [9.0, 8.0, 7.0, 6.0]
    assert not control.axes[0].patches


def test_toy_no_phase_change_at_exactly_the_share_names_the_jump_that_failed():
    """Truth: the criterion as the page states it, at its boundaries: a share of exactly 20% meets "at least 20%",
    so an induction rise of 0.05 is named as the condition that failed; a rise of exactly 0.1 meets "at least 0.1"."""
    s = series(False)
    s["phase_change"] |= {"share_of_range": 0.2, "induction_jump": 0.05}
    assert "20% of their range, induction +0.05, under the 0.1 the induction score must rise)." in T.summary_lines(s)[0]
    s["phase_change"] |= {"share_of_range": 0.5, "induction_jump": 0.1}
    assert T.summary_lines(s)[0].endswith("50% of their range, induction +0.10).")


def test_toy_k_composition_range_is_recomputed_from_the_series_when_not_stored():
    """Truth: the hand-made series 0.1, 0.12, 0.3, 0.31: its range max − min = 0.21, by hand."""
    s = series(False)
    del s["circuit"]["k_composition_range"]
    text = " ".join(T.summary_lines(s))
    assert "their K-composition ranged over 0.210 during the run" in text


# ---- lm discover -------------------------------------------------------------------------------------------------


def _lm_graph():
    """embed (layer 0) → heads 0.0, 0.1 (layer 1) → logits (layer 3): a hand-made two-layer graph's nodes."""
    layer = {"embed": 0, "blocks.0.attn.hook_result.0": 1, "blocks.0.attn.hook_result.1": 1, "unembed": 3}
    kind = {"embed": "input", "unembed": "output"}
    return SimpleNamespace(node=lambda n: SimpleNamespace(layer=layer[n], index=int(n[-1]) if "result" in n else 0,
                                                          kind=kind.get(n, "head")),
                           nodes=[SimpleNamespace(layer=v) for v in layer.values()])  # fmt: skip


def _lm_circuit_result(edges, scores, known):
    circuit = type("Circuit", (), {"edges": edges, "scores": scores, "__len__": lambda self: len(edges)})()
    return SimpleNamespace(scores=SimpleNamespace(graph=_lm_graph()), circuit=circuit, known_edges=known, method="eap")


def test_lm_circuit_figure_draws_the_strongest_edges_by_absolute_score_and_colours_them_by_the_known_circuit(
    monkeypatch,
):
    """Truth: scores 0.2, −0.9, 0.5 ranked by |score| by hand (−0.9, 0.5, 0.2); with max_edges 2 the 0.2 edge is left
    out; widths |s| / 0.9; the −0.9 edge (two slots q, k, one of them known) is orange, the 0.5 edge (unknown) red."""
    got = {}
    monkeypatch.setattr(LD.CL, "draw_circuit", lambda ax, nodes, edges, *a, **k: got.update(edges=edges))
    figs = captured(monkeypatch, LD)
    h0, h1 = "blocks.0.attn.hook_result.0", "blocks.0.attn.hook_result.1"
    edges = (("embed", h0, "q"), ("embed", h1, "q"), ("embed", h1, "k"), (h0, "unembed", "resid"))
    r = _lm_circuit_result(edges, (0.2, -0.9, 0.3, 0.5), [("embed", h1, "q"), ("embed", h0, "v")])
    LD.circuit_figure(r, max_edges=3)
    assert [(e["b"], e["colour"], e["label"]) for e in got["edges"]] == [
        (h1, "#e6ab02", "q,k"),
        ("unembed", "#d62728", ""),
    ]
    assert [e["width"] for e in got["edges"]] == pytest.approx([1.0, 0.5 / 0.9])
    assert "4 edges (the 3 strongest drawn)" in figs[0].axes[0].get_title()


def test_lm_circuit_figure_title_says_nothing_is_left_out_when_every_edge_is_drawn(monkeypatch):
    """Truth: a circuit of exactly max_edges (2) edges has all of them drawn: no "strongest drawn" in the title."""
    monkeypatch.setattr(LD.CL, "draw_circuit", lambda *a, **k: None)
    figs = captured(monkeypatch, LD)
    h0 = "blocks.0.attn.hook_result.0"
    LD.circuit_figure(_lm_circuit_result((("embed", h0, "q"), (h0, "unembed", "resid")), (0.4, -0.1), []), 2)
    title = figs[0].axes[0].get_title()
    assert title.startswith("eap circuit: 2 edges; width") and "strongest drawn" not in title and "green" not in title


def test_lm_edge_table_says_which_edges_are_in_the_known_circuit():
    """Truth: the known circuit built by hand holds only a → b<q>; the table lists edges by |score| (−0.7, +0.3) and
    says yes only for that one."""
    scores = np.array([0.3, -0.7])
    graph = SimpleNamespace(edges=[("a", "b", "q"), ("a", "c", "v")], n_edges=2)
    es = SimpleNamespace(graph=graph, scores=scores, order=lambda: np.argsort(-np.abs(scores), kind="stable"))
    r = SimpleNamespace(scores=es, known_edges=[("a", "b", "q")])
    assert LD.top_rows(r) == [["a → c<v>", "-0.7", "no"], ["a → b<q>", "+0.3", "yes"]]


def _truth(**kw):
    sc = dict(
        n_true_edges=12,
        edge_auroc=0.91,
        edge_precision=0.75,
        edge_recall=0.5,
        size=12,
        node_auroc=0.8,
        n_true_nodes=4,
        n_node_candidates=9,
        node_precision=0.6,
        node_recall=0.3,
        node_recall_at_size=0.25,
    )
    return SimpleNamespace(**(sc | kw))


def test_lm_summary_notes_fractional_precision_only_when_precision_times_size_is_not_whole(monkeypatch):
    """Truth: 0.75 × 12 = 9 edges is whole (recall 0.55 × 12 = 6.6 is not: the note is about the top-k count); then
    precision 0.7 × 12 = 8.4 is not whole. The comparison sentence states each AUROC and count under its own words."""
    monkeypatch.setattr(LD, "discovery_lines", lambda result, name: [])
    cmp = {"edges": [1, 2, 3], "auroc": 0.812, "auroc_in_slot": 0.634, "n_edges": 1234, "n_slot_edges": 567,
           "slots": ["q", "k"], "in_top": 2, "top": 30}  # fmt: skip
    r = SimpleNamespace(model="m", ground_truth={"primary": _truth(edge_recall=0.55)}, drawn_vs_truth=None,
                        comparison=cmp)  # fmt: skip
    lines = LD.summary(r)
    assert not any("tied at the cut" in s for s in lines)
    assert lines[-1] == (
        "The 3 edges the heads report confirmed by path patching: AUROC 0.812 among all 1,234 edges, "
        "0.634 among the 567 edges into q/k inputs; 2 of them in the top 30."
    )
    r.ground_truth = {"primary": _truth(edge_precision=0.7)}
    assert any(s.startswith("Edges tied at the cut") for s in LD.summary(r))


def test_lm_node_auroc_is_undefined_with_its_reason_only_when_every_node_is_known():
    """Truth: with 9 of 9 candidate nodes in the circuit nothing ranks below them (the reason is given); with 4 of 9
    and a NaN AUROC, plainly "undefined"; the table cell drops the reason."""
    assert LD._node_auroc(_truth(node_auroc=float("nan"), n_true_nodes=9)) == (
        "undefined (every head and MLP is in the known circuit)")  # fmt: skip
    assert LD._node_auroc(_truth(node_auroc=float("nan"))) == "undefined"
    r = SimpleNamespace(ground_truth={"p": _truth(node_auroc=float("nan"), n_true_nodes=9)}, drawn_vs_truth=None)
    assert LD.ground_truth_rows(r)[0][5] == "undefined" and LD.ground_truth_rows(r)[0][9] == "–"


# ---- cnn discover ------------------------------------------------------------------------------------------------


def test_cnn_circuit_edge_of_score_zero_is_drawn_blue_as_the_title_reads_it_not_below_zero(monkeypatch):
    """Truth: the figure's key: red is for scores < 0 only, so an edge of score exactly 0 is drawn blue (#2166ac);
    width 0 / 0.5 = 0."""
    got = {}
    monkeypatch.setattr(CD.CL, "draw_circuit", lambda ax, nodes, edges, *a, **k: got.update(edges=edges))
    captured(monkeypatch, CD)
    layer = {"in": 0, "conv1.c0": 1, "logits.c0": 2}
    g = SimpleNamespace(node=lambda n: SimpleNamespace(layer=layer[n], index=0, kind="channel"),
                        nodes=[SimpleNamespace(layer=2)])  # fmt: skip
    circuit = type("Circuit", (), {"edges": (("in", "conv1.c0", 0), ("conv1.c0", "logits.c0", 0)),
                                   "scores": (-0.5, 0.0), "__len__": lambda self: 2})()  # fmt: skip
    CD.circuit_figure(SimpleNamespace(scores=SimpleNamespace(graph=g), circuit=circuit, hand=None, method="eap"))
    assert [(e["b"], e["width"], e["colour"]) for e in got["edges"]] == [
        ("conv1.c0", 1.0, "#b2182b"),
        ("logits.c0", 0.0, "#2166ac"),
    ]


def test_cnn_scrub_where_names_the_metric_images_only_when_fewer_than_all():
    """Truth: the metric averages over 7 of class 3's images of 60: said; over all 60 (k = n): nothing to say."""
    r = SimpleNamespace(target=3, settings={"metric_images": 7, "n": 60})
    assert CD._read_by_metric(r) == "; the metric averages over the 7 of class 3"
    r.settings["metric_images"] = 60
    assert CD._read_by_metric(r) == ""


# ---- cnn universality --------------------------------------------------------------------------------------------


def _cka_two_stages():
    """Runs A, B, C (pairs A–B and A–C), two stages, each with its random twin: CKA(i, j) = 0.01 (i + 1) (j + 1) for
    i ≠ j over the 12 labels, 1 on the diagonal, so every entry is distinct up to symmetry."""
    runs = [{"label": x} for x in "ABC"]
    stages = ["s1", "s2"]
    labels = [f"{p}{r} {s}" for p in ("", "random ") for r in "ABC" for s in stages]
    n = len(labels)
    cka = np.fromfunction(lambda i, j: 0.01 * (i + 1) * (j + 1), (n, n))
    np.fill_diagonal(cka, 1.0)
    trained = [SimpleNamespace(a="A", b="B"), SimpleNamespace(a="A", b="C")]
    r = SimpleNamespace(cka_labels=labels, cka=torch.tensor(cka), runs=runs, stage_names=stages,
                        trained=lambda: trained)  # fmt: skip
    return r, {lab: i for i, lab in enumerate(labels)}, cka


def test_cka_matrix_numbers_average_trained_pairs_twins_and_other_stages_of_other_networks():
    """Truth: plain loops over the hand-made matrix: trained = mean over the two pairs at the same stage; twin = mean
    over the three networks and their own random twins; other = mean over ordered pairs of different networks at the
    other stage (a network against itself is left out)."""
    r, at, cka = _cka_two_stages()
    got = U.cka_matrix_numbers(r)
    for row, st, other in zip(got, ["s1", "s2"], ["s2", "s1"], strict=True):
        trained = [cka[at[f"A {st}"], at[f"{b} {st}"]] for b in "BC"]
        twin = [cka[at[f"{x} {st}"], at[f"random {x} {st}"]] for x in "ABC"]
        others = []
        for a in "ABC":
            for b in "ABC":
                if a != b:
                    others.append(cka[at[f"{a} {st}"], at[f"{b} {other}"]])
        assert row["trained"] == pytest.approx(sum(trained) / 2)
        assert row["random_twin"] == pytest.approx(sum(twin) / 3)
        assert row["other_stages"] == pytest.approx(sum(others) / 6)


def test_the_best_match_verdict_at_exactly_p_five_percent_is_not_above_the_baseline():
    """Truth: the verdict's threshold is a one-sided p < 0.05 (P_ABOVE): p = 0.05 itself is not below it."""
    test = {"n": 6, "m": 12, "p": 0.05, "superiority": 0.7}
    assert U._verdict(test).startswith("not clearly above that baseline: one-sided Mann–Whitney p = 0.05")
    assert U._verdict(test | {"p": 0.0499}).startswith("above that baseline")


def test_a_cka_range_states_min_max_and_the_mean_not_the_median():
    """Truth: 0.1, 0.2, 0.6 (a NaN left out): min 0.10, max 0.60, mean 0.9 / 3 = 0.30 (the median would be 0.20)."""
    assert U._range([0.6, float("nan"), 0.1, 0.2]) == "0.10–0.60 (mean 0.30)"
    assert U._range([float("nan")]) == "n/a"


def _histogram_steps(monkeypatch, best_a, best_b):
    """The trained step outline's bin heights, drawn for the fixture with A's and B's best matches replaced."""
    figs = captured(monkeypatch, U)
    r = universality_fixture.make_result()
    tr = r.comparisons[0]
    m = replace(tr.stages[0], best_a=torch.tensor(best_a), best_b=torch.tensor(best_b))
    U.histogram_figure(replace(r, comparisons=(replace(tr, stages=(m,)), *r.comparisons[1:])))
    poly = figs[0].axes[0].patches[0]  # the trained step outline, drawn first
    return poly.get_xy()[1:-1:2, 1][:24]


def test_the_universality_histogram_is_numpys_density_of_the_best_matches(monkeypatch):
    """Truth: numpy.histogram (density) of A's and B's best matches, values exact in float32 and off the bin edges,
    on 24 bins from −0.2 to 1."""
    a, b = [0.375, 0.625, 0.875], [0.8125, 0.5625, 0.375]
    dens, _ = np.histogram(a + b, bins=np.linspace(-0.2, 1, 25), density=True)
    np.testing.assert_allclose(_histogram_steps(monkeypatch, a, b), dens)


def test_the_universality_histogram_clips_best_matches_below_its_range_into_the_first_bin(monkeypatch):
    """Truth: the code clips to [−0.2, 1] so that every unit is drawn: numpy.histogram (density) of the values clipped
    by hand, where −0.5 counts in the first bin (−0.2 … −0.15) and the six units share the density."""
    a, b = [-0.5, 0.625, 0.875], [0.8125, 0.5625, 0.375]
    dens, _ = np.histogram(np.clip(a + b, -0.2, 1), bins=np.linspace(-0.2, 1, 25), density=True)
    np.testing.assert_allclose(_histogram_steps(monkeypatch, a, b), dens)


def test_cka_cell_text_is_black_on_bright_cells_and_white_on_dark_ones(monkeypatch):
    """Truth: viridis is bright near 1 and dark near 0: the fixture's 1.00 and 0.80 cells get black text, 0.10 white."""
    figs = captured(monkeypatch, U)
    U.cka_figure(universality_fixture.make_result())
    colour = {(t.get_position(), t.get_text()): t.get_color() for t in figs[0].axes[0].texts}
    assert colour[((0, 0), "1.00")] == "black" and colour[((1, 0), "0.80")] == "black"
    assert colour[((2, 0), "0.10")] == "white"


def test_lm_truth_sentence_states_the_drawn_circuits_precision_and_recall_each_under_its_word(monkeypatch):
    """Truth: the hand-made drawn circuit: 7 true of its 20 edges, precision 0.35 (7 / 20), recall 0.58 (7 / 12);
    with 3 edges at rounding level the sentence says so."""
    monkeypatch.setattr(LD, "rounding_level", lambda result: 3)
    r = SimpleNamespace(
        ground_truth={"primary": _truth()},
        drawn_vs_truth={"primary": {"edges": 20, "true": 7, "precision": 7 / 20, "recall": 7 / 12}},
    )
    line = LD.truth_sentence(r, "primary")
    assert line.endswith(" The drawn circuit's 20 edges hold 7 of them (precision 0.35, recall 0.58; 3 of its edges "
                         "score at rounding level, so which of them it holds is arbitrary).")  # fmt: skip


# ---- microscope (cnn explain) --------------------------------------------------------------------------------------


def test_microscope_channel_mean_map_is_the_preferred_class_map_and_circuits_only_at_the_circuit_stage():
    """Truth: test_cnn_pages_truths' hand-made result: each channel's mean map is maps[k, c] for the class k of its
    largest class mean (found by a plain loop); the circuits' stage is conv2 with membership {1: cat, 2: cat, 0: dog,
    3: dog, 4: fox}, so conv1's channels list no circuit even where their index is a conv2 member's; the read-out
    templates (class × conv2 channel) are shown for conv2's channels only, each its own column."""
    r = pages_fixture.make_result()
    sections, jobs = M.channel_sections(r, {}, (0.0, 1.0))
    names = list(r.class_names)
    member = {1: ["cat"], 2: ["cat"], 0: ["dog"], 3: ["dog"], 4: ["fox"]}
    for sec, (ch, _, _) in zip(sections, jobs, strict=True):
        sel = r.selectivity_of(sec["stage"])
        means = sel.class_means[sec["channel"]].tolist()
        k = max(range(len(means)), key=lambda i: means[i])
        np.testing.assert_array_equal(ch["mean_map"], sel.maps[k, sec["channel"]].numpy())
        assert sec["preferred"] == names[k]
        assert sec["circuits"] == (member[sec["channel"]] if sec["stage"] == "conv2" else [])
        if sec["stage"] == "conv2":  # the read-out templates weigh the last stage's channels only
            np.testing.assert_array_equal(ch["template"], r.weights.readout_templates[:, sec["channel"]].numpy())
        else:
            assert ch["template"] is None


def test_microscope_attribution_shows_the_two_best_ranked_methods_that_have_a_figure(monkeypatch, tmp_path):
    """Truth: a hand-made attribution ranking (ixg, ig, saliency) with a PNG for each: the page shows the first two,
    in ranking order, each from its own file."""
    monkeypatch.setattr(M, "draw_all", lambda fn, jobs, meanwhile: ([], ({}, {})))
    pngs = {}
    for i, name in enumerate(("ixg", "ig", "saliency")):
        pngs[name] = tmp_path / f"{name}.png"
        pngs[name].write_bytes(b"png" + bytes([i]))
    linked = {"attribution": {"dir": tmp_path, "ranking": ["ixg", "ig", "saliency"], "pngs": pngs}}
    ctx = M.report_context(pages_fixture.make_result(), linked, channels=False)
    figures = ctx["attribution"]["figures"]
    assert [name for name, _ in figures] == ["ixg", "ig"]
    assert [uri for _, uri in figures] == [png_uri(b"png\x00"), png_uri(b"png\x01")]


def test_microscope_links_each_channel_to_its_own_feature_visualisation_and_tuning_curves(tmp_path):
    """Truth: hand-made linked outputs: a feature visualisation only for conv1 channel 2 (ratio 1.7) and tuning rows
    for conv2 channels 1 (with a PNG, label "curved") and 3 (no PNG: nothing to show); every other section has none."""
    fv_png, tune_png = tmp_path / "fv.png", tmp_path / "tune.png"
    fv_png.write_bytes(b"fv")
    tune_png.write_bytes(b"tune")
    linked = {
        "featvis": {"units": {"conv1_2": {"png": fv_png, "ratio_to_dataset_max": 1.7}}},
        "tuning": {"units": {"conv2_1": {"png": tune_png, "label": "curved", "tuned": True, "reason": "r1"},
                             "conv2_3": {"png": None, "label": "flat", "tuned": False, "reason": "r3"}}},
    }  # fmt: skip
    sections, _ = M.channel_sections(pages_fixture.make_result(), linked, (0.0, 1.0))
    by = {(s["stage"], s["channel"]): s for s in sections}
    assert {k for k, s in by.items() if s["featvis"]} == {("conv1", 2)}
    assert by[("conv1", 2)]["featvis"] == png_uri(b"fv") and by[("conv1", 2)]["featvis_ratio"] == 1.7
    assert {k for k, s in by.items() if s["tuning"]} == {("conv2", 1)}
    assert by[("conv2", 1)]["tuning"] == {"uri": png_uri(b"tune"), "label": "curved", "tuned": True, "reason": "r1"}
