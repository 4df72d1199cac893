"""The heads report's sentences, rendered from a hand-made result where each claim is known true or false.

A 3-layer, 4-head model with 2 query heads per key/value head (kv head = head // 2):

* 0.1 previous-token head: exact mean-ablation cost +4.55 (the largest measured), estimate −0.02 (fails);
* 0.0 previous-token head: total cost +0.15, but its key path into 2.0 alone costs +1.87 (a marginal edge);
* 1.2 induction head with a weak copying score (+0.04) whose OV eigenvalue positivity is negative;
* 2.0 induction head, copying and eigenvalue positivity agree;
* 2.1 prefix matching without copying; 2.3 has the largest estimate of all and is never measured;
* K-composition: 0.3 → 1.2 at 1.5× the random baseline, 0.2 → 2.0 at 2.5×, both rejected by path patching.
"""

from __future__ import annotations

import numpy as np
import pytest

from mechscope.lm.methods.ablation import HeadAblation
from mechscope.lm.methods.composition import Baseline, CompositionResult
from mechscope.lm.methods.heads import HeadProtocol, HeadsResult, circuit_rows
from mechscope.lm.methods.path_patching import Criterion, PathPatch
from mechscope.lm.report import heads as R
from mechscope.lm.report import heads_figures as F

L, H, B = 3, 4, 4


def _scores() -> dict[str, np.ndarray]:
    z = np.zeros((L, H))
    s = {k: z.copy() for k in ("induction", "prefix_matching", "previous_token", "previous_token_text",
                               "duplicate_token", "copying", "ov_eigen_positivity")}  # fmt: skip
    s["previous_token"][0, 1], s["previous_token"][0, 0] = 0.9, 0.6
    s["prefix_matching"][1, 2], s["copying"][1, 2], s["ov_eigen_positivity"][1, 2] = 0.8, 0.04, -0.3
    s["prefix_matching"][2, 0], s["copying"][2, 0], s["ov_eigen_positivity"][2, 0] = 0.9, 0.5, 0.6
    s["prefix_matching"][2, 1], s["copying"][2, 1], s["ov_eigen_positivity"][2, 1] = 0.5, -0.1, -0.2
    s["induction"][1, 2], s["induction"][2, 0], s["induction"][2, 1] = 0.7, 0.85, 0.45
    return s


LABELS = [
    ["previous_token", "previous_token", "none", "none"],
    ["none", "none", "induction", "none"],
    ["induction", "none", "none", "none"],
]


def _ablation(kind: str, exact_means: dict, estimates: dict) -> HeadAblation:
    rng = np.random.default_rng(0)
    est = rng.normal(0, 0.002, (L, H, B))
    for lh, v in estimates.items():
        est[lh] = v + np.array([-0.01, 0.01, -0.005, 0.005])  # mean exactly v
    exact = {lh: v + np.array([-0.1, 0.1, -0.05, 0.05]) for lh, v in exact_means.items()}
    return HeadAblation.measured(kind, est, exact)


MEASURED = {(0, 1): 4.55, (0, 0): 0.15, (1, 2): 0.5, (2, 0): 1.12, (2, 1): 0.3, (0, 3): 0.01, (0, 2): 0.02}
ESTIMATED = {(0, 1): -0.02, (0, 0): 0.14, (1, 2): 0.45, (2, 0): 1.0, (2, 1): 0.25, (2, 3): 9.0}


def _patch(source, layer, kv, clean, patched, drop_std, confirmed, loss=None) -> PathPatch:
    q = (2 * kv, 2 * kv + 1)
    drop = tuple(c - p for c, p in zip(clean, patched, strict=True))
    sd = None if loss is None else 0.1
    return PathPatch(source, layer, kv, q, clean, patched, drop, drop_std, confirmed, loss, sd)


def _composition() -> CompositionResult:
    k = np.zeros((L, H, L, H))
    k[:1, :, 1, 2] = 0.01
    k[:2, :, 2, 0] = 0.01
    k[0, 3, 1, 2], k[0, 1, 1, 2] = 0.06, 0.05  # 0.06: 1.5× the baseline
    k[0, 2, 2, 0], k[0, 0, 2, 0] = 0.10, 0.05  # 0.10: 2.5× the baseline
    scores = {"Q": np.zeros_like(k), "K": k, "V": np.zeros_like(k)}
    return CompositionResult.of(scores, Baseline(mean=0.04, std=0.002, samples=200, seed=0), True, 20)


def make_result(**changes) -> HeadsResult:
    scores = _scores()
    ablation = {
        "mean": _ablation("mean", MEASURED, ESTIMATED),
        "zero": _ablation("zero", {(2, 3): 2.0}, {(2, 3): 1.9}),
        "resample": _ablation("resample", {(2, 3): 1.0}, {(2, 3): 0.9}),
    }
    for kind, a in ablation.items():
        scores[F.ABLATION_SCORES[kind]] = a.best()
    patches = (
        _patch((0, 1), 1, 1, (0.7, 0.2), (0.2, 0.19), (0.1, 0.01), (True, False), loss=1.0),
        _patch((0, 3), 1, 1, (0.7, 0.2), (0.69, 0.2), (0.01, 0.01), (False, False)),
        # 0.0 → 2.0: drop 0.06 against a threshold of 0.05, standard error 0.04 / √4 = 0.02: marginal
        _patch((0, 0), 2, 0, (0.25, 0.45), (0.19, 0.45), (0.04, 0.01), (True, False), loss=1.87),
        _patch((0, 2), 2, 0, (0.85, 0.45), (0.84, 0.45), (0.01, 0.01), (False, False)),
    )
    comp = _composition()
    protocol = HeadProtocol(batch=B).to_dict() | {"token_range": [10, 100]}
    fields = dict(
        model="hand-made", protocol=protocol, scores=scores, labels=LABELS,
        loss_per_position=[5.0] * 10, loss_first_half=5.0, loss_second_half=1.0,
        top_k_ablation={"k": 2, "heads": [{"layer": 2, "head": 0}, {"layer": 1, "head": 2}], "ablation": "mean",
                        "induction_heads_loss_increase": 2.5, "random_heads_loss_increase_mean": 0.1,
                        "random_heads_loss_increase_std": 0.05, "random_draws": [0.1] * 8},
        ablation=ablation, composition=comp, path_patches=patches,
        circuit_rows=circuit_rows(scores, LABELS, comp, patches, 2, B), criterion=Criterion(), kv_groups=2,
        seconds={"total": 1.0},
    )  # fmt: skip
    return HeadsResult(**(fields | changes))


@pytest.fixture(scope="module")
def result() -> HeadsResult:
    return make_result()


def one(lines: list[str], start: str) -> str:
    found = [s for s in lines if s.startswith(start)]
    assert len(found) == 1, (start, lines)
    return found[0]


def test_the_cost_ranking_names_the_measured_previous_token_head_first_and_no_estimate(result):
    line = one(R.summary(result), "One head at a time")
    # ± the sample sd (ddof 1) of the measurements ±0.1, ±0.05 around the mean
    assert "costs most, among the 7 heads measured exactly, for 0.1 (+4.55 ± 0.09)" in line
    assert "2.3" not in line  # its estimate (+9.0) is the largest of all, but it was never measured
    assert "the other 5 heads have only an attribution-patching estimate and are not ranked" in line


def test_the_agreement_names_where_the_estimate_fails(result):
    line = one(R.summary(result), "On the 7 heads measured exactly")
    assert "2 of them previous-token heads" in line
    assert "fails (off by ≥ 0.1 nats and ≥ 50% of the measured value) on 1 of them: 0.1 (previous-token; " \
           "estimate -0.02, measured +4.55)." in line.replace("−", "-")
    good = make_result(ablation=result.ablation | {"mean": _ablation("mean", MEASURED, MEASURED)})
    assert "on none of them" in one(R.summary(good), "On the 7 heads measured exactly")


def test_nothing_measured_ranks_nothing(result):
    none = make_result(ablation=result.ablation | {"mean": _ablation("mean", {}, ESTIMATED)})
    lines = R.summary(none)
    assert not any(s.startswith("One head at a time") for s in lines)
    assert one(lines, "No head was mean-ablated alone exactly")
    # the circuit's total effects are then estimates, and say so
    assert "(attribution-patching estimate; not measured)" in one(lines, "Path patching 0.1 →")


def test_copying_disagreement_is_stated_and_weak_copying_named(result):
    lines = R.summary(result)
    line = one(lines, "Two measures of whether a head copies")
    assert "disagree in sign on 1 of the 3 heads with prefix-matching score ≥ 0.4" in line
    assert "1.2 (copying +0.04, eigenvalue positivity -0.30)" in line.replace("−", "-")
    assert "2.0 (" not in line and "2.1 (" not in line  # they agree (both positive; both negative)
    assert "1.2 (copying +0.040)" in one(lines, "1 of the 2 induction heads rest on a weak copying score")
    agreeing = _scores()
    agreeing["ov_eigen_positivity"][1, 2] = 0.2
    other = R.summary(make_result(scores=agreeing))
    assert one(other, "On all 3 heads with prefix-matching score ≥ 0.4")
    assert not any(s.startswith("Two measures") for s in other)


def test_each_bracket_says_what_it_holds(result):
    lines = R.summary(result)
    ind = one(lines, "2 heads are induction heads")
    assert "2.0 (prefix matching 0.90, copying +0.50), 1.2 (prefix matching 0.80, copying +0.04)" in ind
    assert "2.1 (prefix matching 0.50, copying -0.10)" in one(lines, "Prefix matching (score").replace("−", "-")
    assert "in brackets: the previous-token score" in one(lines, "2 previous-token heads")


def test_a_path_effect_comes_with_the_total_effect(result):
    lines = R.summary(result)
    line = one(lines, "Path patching 0.0 →")
    assert "mean-ablated only on the path into the keys of key/value head 0 of layer 2" in line
    assert "this one path raises the second-half loss by 1.87 ± 0.10 nats" in line
    assert "mean-ablating 0.0 on every path costs +0.15 ± 0.09 nats (measured)" in line
    assert "less than this path alone" in line
    line = one(lines, "Path patching 0.1 →")  # total 4.55 > path 1.00: no such clause
    assert "costs +4.55 ± 0.09 nats (measured)" in line and "less than this path" not in line


def test_a_key_value_node_is_named_by_the_heads_that_pass(result):
    nodes, edges = F.circuit_graph(result)
    assert F.node_text(("kv", 1, 1), result) == "1.2"  # not "1.2/3": 1.3 does not pass the criterion
    assert F.node_text(("kv", 2, 0), result) == "2.0"
    assert [e["marginal"] for e in edges] == [False, True] and [e["marginal_heads"] for e in edges] == [[], [0]]
    line = one(R.summary(result), "Marginal passes")
    assert "0.0 → 2.0 (drop 0.060 against the threshold 0.050, standard error 0.020" in line
    assert "0.1 →" not in line
    assert not any(s.startswith("Marginal fails") for s in R.summary(result))  # 0.3 → 1.2 fails by 26 s.e.


def test_a_marginal_fail_is_said_and_marked_in_the_tables(tmp_path):
    # 0.3 → 1.2: drop 0.12 against a threshold of 0.14 (20% of 0.7), standard error 0.04 / √4 = 0.02: −1.0 s.e.
    near = _patch((0, 3), 1, 1, (0.7, 0.2), (0.58, 0.2), (0.04, 0.01), (False, False))
    base = make_result()
    patches = (base.path_patches[0], near, *base.path_patches[2:])
    r = make_result(path_patches=patches, circuit_rows=circuit_rows(base.scores, LABELS, base.composition,
                                                                     patches, 2, B))  # fmt: skip
    line = one(R.summary(r), "Marginal fails")
    assert "0.3 → 1.2 (drop 0.120 against the threshold 0.140, standard error 0.020, -1.0 standard errors)" in line
    assert "1.3" not in line  # not an induction head
    row = next(t for t in r.circuit()[0]["path_patching"] if t["source"] == "0.3")
    assert row["margin_se"] == pytest.approx(-1.0) and row["drop_std"] == pytest.approx(0.04)
    html = R.write_report(r, tmp_path / "r.html").read_text()
    assert "<td class=\"l\">no*</td><td>-1.0</td>" in html


def drawn(monkeypatch, draw, *args) -> list:
    """The figures ``draw`` makes, drawn (not encoded)."""
    figures = []
    monkeypatch.setattr(F, "figure_data_uri", lambda fig: figures.append(fig) or fig.draw_without_rendering() or "")
    draw(*args)
    return figures


def _confirmed(source, layer, kv, heads) -> PathPatch:
    n = len(heads)
    return PathPatch(source, layer, kv, heads, (0.7,) * n, (0.2,) * n, (0.5,) * n, (0.1,) * n, (True,) * n, None, None)


def test_circuit_edge_labels_print_the_drop_and_sit_clear_of_nodes_and_lines(result, monkeypatch):
    from matplotlib.patches import Circle, FancyArrowPatch

    _, edges = F.circuit_graph(result)
    assert F.edge_label(edges[0], 2) == "1.2\ndrop 0.50"  # positive, as the text's "drop 0.50"; not "−0.50"
    assert F.edge_label(edges[1], 1) == "2.0*\ndrop 0.06"
    # the smollm2 report's circuit, three query heads per key/value head: a short edge into a node beside another
    patches = (_confirmed((0, 0), 1, 1, (3, 4, 5)), _confirmed((0, 0), 2, 2, (6, 7)), _confirmed((1, 8), 2, 2, (6, 7)),
               _confirmed((0, 0), 4, 2, (6,)), _confirmed((3, 3), 4, 2, (6,)))  # fmt: skip
    (fig,) = drawn(monkeypatch, F.circuit_figure, make_result(path_patches=patches, kv_groups=3))
    ax = fig.axes[0]
    to_px = ax.transData.transform
    discs = [(to_px(c.center), to_px((c.radius, 0))[0] - to_px((0, 0))[0]) for c in ax.patches if isinstance(c, Circle)]
    lines = [a.get_transform().transform(a.get_path().vertices) for a in ax.patches if isinstance(a, FancyArrowPatch)]
    labels = [t.get_window_extent() for t in ax.texts if t.get_bbox_patch() is not None]
    assert len(labels) == len(lines) == 5 and len(discs) == 6
    for box, line in zip(labels, lines, strict=True):
        for centre, r in discs:
            assert np.linalg.norm(np.clip(centre, [box.x0, box.y0], [box.x1, box.y1]) - centre) >= r, (box, centre)
        assert not box.count_contains(line), box  # beside its own arrow, not on it
    assert not any(a.overlaps(b) for i, a in enumerate(labels) for b in labels[i + 1 :])


def test_ablation_maps_say_what_their_colours_are(result, monkeypatch):
    figures = drawn(monkeypatch, F.heatmaps, result)
    units = {fig.axes[0].get_title().split("\n")[0]: fig.axes[1].get_ylabel() for fig in figures}
    assert units["mean-ablation: second-half loss increase"] == "second-half loss increase (nats, mean over sequences)"
    assert units["zero-ablation: second-half loss increase"].endswith("(nats, mean over sequences)")
    assert units["induction score (repeated random tokens)"] == F.ATTENTION
    assert all(units.values())  # every map says what its colours are


def test_composition_is_called_high_only_at_twice_the_baseline(result):
    lines = R.summary(result)
    high = one(lines, "A high K-composition")
    assert "0.2 → 2.0 (K-composition 0.100, 2.5× the baseline" in high and "0.3 →" not in high
    assert "is not by itself evidence of use" in high and "does not pass the edge criterion" in high
    assert "induction 0.850 → 0.840, drop 0.010 against the threshold 0.170)" in high  # 20% of 0.85, above 0.05
    assert "for one pair: 0.2 → 2.0" in high and "more in the tables below" not in high
    low = one(lines, "Path patching also rejects one pair of the induction heads' two strongest K-composition sources")
    assert "0.3 → 1.2 (K-composition 0.060, 1.5× the baseline" in low and "0.2 →" not in low


def test_loss_sentence_uses_its_threshold(result):
    assert "(20% of the first; below 50% counts as using it): it uses the earlier copy" in R.loss_sentence(result)
    weak = make_result(loss_second_half=4.0)
    line = R.loss_sentence(weak)
    assert "(80% of the first" in line and "does not use the earlier copy much" in line
    perfect = R.loss_sentence(make_result(loss_first_half=0.0, loss_second_half=0.0))
    assert "nan" not in perfect and perfect.endswith("this measure cannot tell.")  # was "(nan% of the first...)"
    assert "loss is 0.00 nats on the first copy and 0.00 on the second:" in perfect


def test_tables_and_maps_mark_estimates(result):
    rows = {r["head"]: r for r in R.table_rows(result)}
    assert rows["2.0"]["ablation_value"] == "measured" and rows["2.0"]["measured"]
    assert rows["1.0"]["ablation_value"] == "estimate"
    for name in ("ablation_loss_increase", "zero_ablation_loss_increase", "resample_ablation_loss_increase"):
        assert "estimates, except ● measured" in F.heatmap_title(name, result.ablation)
    assert "estimate" not in F.heatmap_title("induction", result.ablation)
    assert result.ablation["mean"].measured_mask().sum() == len(MEASURED)


def test_the_page_renders_with_every_sentence(result, tmp_path):
    out = R.write_report(result, tmp_path / "report.html")
    html = out.read_text()
    for line in R.summary(result):
        assert line.replace("&", "&amp;").replace("'", "&#39;").replace(">", "&gt;") in html
    assert "the estimate fails on 0.1" in html


def test_the_estimate_is_compared_not_said_to_agree(result):
    """r = 0.15 read as "agrees" in the demo; the sentence gives Pearson's r beside Spearman's ρ (one head far off
    moves r alone) and the median error beside the median measured effect it is to be read against."""
    mean = result.ablation["mean"]
    ag = mean.agreement()
    keys = sorted(mean.exact_mean)
    est = np.array([mean.measured_estimate[k] for k in keys])
    ex = np.array([mean.exact_mean[k] for k in keys])
    from scipy import stats

    assert ag["spearman"] == pytest.approx(stats.spearmanr(est, ex).statistic, abs=1e-6)
    assert ag["median_abs_measured"] == pytest.approx(float(np.median(np.abs(ex))), abs=1e-6)
    line = one(R.summary(result), "On the 7 heads measured exactly")
    assert f"compared with the measurement: Pearson r = {ag['pearson']:.2f}, Spearman ρ = {ag['spearman']:.2f}" in line
    assert f"against a median |measured effect| of {ag['median_abs_measured']:.3f} nats" in line
    assert "agrees" not in line


def test_a_path_larger_than_its_heads_total_says_how_much_is_offset(result):
    line = one(R.summary(result), "Path patching 0.0 → 2.0")
    assert "offsets 92% of the key path's effect (inferred from the two measurements)" in line  # (1.87 − 0.15) / 1.87


def test_the_measured_set_follows_the_protocol(result):
    """lm circuits' protocol measures only the confirmed edges' sources: its summary (a HeadsResult shown in a
    notebook) listed the labelled heads, the table's rows and random others as measured."""
    protocol = result.protocol | {"per_head_ablation": False, "exact_path_sources": True}
    line = one(R.summary(make_result(protocol=protocol)), "One head at a time")
    assert "Measured: the source of each confirmed path-patching edge; the other" in line
    assert "random others" not in line and "random others" in one(R.summary(result), "One head at a time")


def test_a_model_without_induction_heads_is_not_read_as_having_them(tmp_path):
    """A random model (the review's tiny Llama): the loss rose, no head is labelled, no pair was tested, and every
    head's measured cost is noise around zero; the page says each of these instead of ranking it."""
    none = [["none"] * H for _ in range(L)]
    rng = np.random.default_rng(1)
    est = rng.normal(0, 1e-4, (L, H, B))
    exact = {(layer, h): rng.normal(0, 1e-3, B) for layer in range(L) for h in range(H)}
    mean = HeadAblation.measured("mean", est, exact)
    top_k = make_result().top_k_ablation | {"induction_heads_loss_increase": -0.001}
    ablation = make_result().ablation | {"mean": mean}
    r = make_result(labels=none, loss_first_half=10.7959, loss_second_half=10.8055, path_patches=(),
                    circuit_rows=(), ablation=ablation, top_k_ablation=top_k)  # fmt: skip
    lines = R.summary(r)
    assert lines[0].startswith("On repeated random tokens the model's loss rises from 10.80 nats")
    assert "(no head is labelled induction: these are the highest scores)" in one(lines, "Mean-ablating")
    assert "leaves the second-half loss within 0.005 nats (-0.001)" in one(lines, "Mean-ablating")
    noise = one(lines, "No head's cost, mean-ablated alone, is told from zero")
    assert f"among the {L * H} heads measured exactly" in noise
    assert not any(s.startswith("One head at a time") or s.startswith(f"On the {L * H} heads") for s in lines)
    assert lines[-1].startswith("No pair was tested by path patching")
    html = R.write_report(r, tmp_path / "r.html").read_text()
    assert "the tables below list every pair tested" not in html
