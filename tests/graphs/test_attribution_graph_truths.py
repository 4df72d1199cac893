"""Attribution graphs (Ameisen et al. 2025, "Circuit Tracing") against outside truths: a hand-built linear system whose
every edge is written out here (3 features, one error, 2 inputs, 2 logits, all edge magnitudes distinct), its
influence as the plain power series ``w (Â + Â² + …)`` in numpy, the scores by their definitions, pruning at the
exact boundary of a cumulative share, predictions worked by hand, and the wings' node records against the model's
own tensors (the LM's error vectors and softmax, a CNN image's grid)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mechscope.core.attribution_graph import (
    AttributionGraph,
    NodeInfo,
    Triplets,
    assemble,
    build,
    check_edges,
    check_graph_record,
    intervene,
    prune,
)
from mechscope.core.attribution_graph.checks import auto_features, disagree, parse_steer
from mechscope.core.attribution_graph.influence import threshold_for
from mechscope.core.errors import RunError
from tests.unit.test_attribution_graph_core import Planted

# sources f0 f1 f2 | e | in0 in1, then logits L0 L1; A[target, source] = the direct effect (activation × per unit)
F0, F1, F2, E, IN0, IN1, L0, L1 = range(8)
EDGES = {  # (target, source): weight
    (F0, IN0): 2.0, (F0, E): 0.6,
    (F1, F0): 3.0, (F1, IN0): -1.0, (F1, E): 0.25,
    (F2, IN0): 0.05,
    (L0, F1): 4.0, (L0, F0): -0.5, (L0, E): 1.2, (L0, IN0): 0.1,
    (L1, F0): 1.5, (L1, E): 0.35, (L1, F2): 0.01,
}  # fmt: skip
PROBS = (0.7, 0.3)
ACT = (2.0, 1.5, 0.2)
IDS = {F0: "0_7_1", F1: "1_4_1", E: "0_-1_1", IN0: "E_11_0", IN1: "E_12_1", L0: "3_20_1", L1: "3_21_1"}
GRAPH = (F0, F1, E, IN0, IN1, L0, L1)  # f2 gets no row (max_feature_nodes=2): not a node of the graph


def dense() -> np.ndarray:
    A = np.zeros((8, 8))
    for (t, s), v in EDGES.items():
        A[t, s] = v
    return A


def hand_built(max_feature_nodes=2, edges_per_row=None):
    return build(Planted(torch.tensor(dense()), 3, 1, 2, 2), torch.tensor(PROBS), max_feature_nodes=max_feature_nodes,
                 edges_per_row=edges_per_row)  # fmt: skip


def info() -> NodeInfo:
    return NodeInfo(
        feature_layer=torch.tensor([0, 1, 0]), feature_pos=torch.tensor([1, 1, 0]),
        feature_index=torch.tensor([7, 4, 9]), feature_activation=torch.tensor(ACT),
        feature_ctx=torch.tensor([1.0, 1.0, 0.0]), error_layer=torch.tensor([0]), error_pos=torch.tensor([1]),
        error_ctx=torch.tensor([1.0]), error_norm=torch.tensor([0.9]), input_pos=torch.tensor([0, 1]),
        input_index=torch.tensor([11, 12]), input_ctx=torch.tensor([0.0, 2.4]), input_labels=["a", "b"],
        logit_index=torch.tensor([20, 21]), logit_labels=["x", "y"], logit_weights=torch.tensor(PROBS),
        logit_pos=1, logit_ctx=1.0, n_layers=2,
    )  # fmt: skip


def graph(node_threshold=1.0, edge_threshold=1.0, all_inputs=True, kind="lm") -> AttributionGraph:
    f = assemble(hand_built(), info(), node_threshold, edge_threshold, all_inputs)
    return AttributionGraph(kind=kind, model="m", title="a b", input_labels=("a", "b"), layer_names=("0", "1"),
                            nodes=f["nodes"], edges=f["edges"], scores=f["scores"], counts=f["counts"],
                            settings={"targets": [20, 21]}, full=f["full"])  # fmt: skip


def np_influence(A: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The power series w Â + w Â² + … by a plain loop (Â: |A| with rows L1-normalised)."""
    a = np.abs(A)
    s = a.sum(1, keepdims=True)
    N = np.divide(a, s, out=np.zeros_like(a), where=s > 0)
    total, cur = np.zeros(len(w)), w.copy()
    for _ in range(len(w) + 1):
        cur = cur @ N
        total += cur
    return total


def sub(A: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The graph's nodes only (f2 dropped), with the logit weights."""
    idx = list(GRAPH)
    w = np.zeros(len(idx))
    w[-2:] = PROBS
    return A[np.ix_(idx, idx)], w


def np_scores(A: np.ndarray, w: np.ndarray) -> tuple[float, float]:
    """Replacement: input influence / (input + error influence); completeness: influence-weighted share of each node's
    input (L1) not from error nodes (rows with no input count as complete), weights infl + w (paper § 3.6)."""
    infl = np_influence(A, w)
    err, inp = [GRAPH.index(E)], [GRAPH.index(IN0), GRAPH.index(IN1)]
    replacement = infl[inp].sum() / (infl[inp].sum() + infl[err].sum())
    a = np.abs(A)
    share = [1.0 - a[i, err].sum() / a[i].sum() if a[i].sum() > 0 else 1.0 for i in range(len(w))]
    out = infl + w
    return replacement, float(np.dot(share, out) / out.sum())


def test_every_edge_is_the_hand_written_one_largest_first_source_to_target():
    """Outside truth: the hand-written EDGES (f2 has no row, so its edges leave the graph), sorted by |weight|."""
    g = graph()
    got = [(g.nodes[s]["id"], g.nodes[t]["id"], round(w, 6)) for s, t, w in g.edges]
    want = sorted(((IDS[s], IDS[t], v) for (t, s), v in EDGES.items() if F2 not in (s, t)), key=lambda e: -abs(e[2]))
    assert got == want
    assert [n["id"] for n, _ in g.inputs_of("1_4_1")] == ["0_7_1", "E_11_0", "0_-1_1"]
    links = g.to_circuit_tracer()["links"]
    assert {"source": "0_7_1", "target": "1_4_1", "weight": pytest.approx(3.0)} in links


def test_node_records_name_their_sources_and_logits():
    """Outside truth: the source order [features | errors | inputs] (f0 f1 f2 | e | in0 in1) and each logit's own
    probability; the counts by hand (2 of 3 features got rows; 11 stored entries join graph nodes, 12 were stored)."""
    g = graph()
    by = {n["id"]: n for n in g.nodes}
    assert set(by) == set(IDS.values())
    assert [by[IDS[k]]["source"] for k in (F0, F1, E, IN0, IN1)] == [F0, F1, E, IN0, IN1]
    assert by["0_-1_1"]["activation"] == pytest.approx(0.9) and by["0_7_1"]["activation"] == pytest.approx(2.0)
    assert [by[i]["logit"] for i in ("3_20_1", "3_21_1")] == [0, 1]
    assert [by[i]["probability"] for i in ("3_20_1", "3_21_1")] == pytest.approx(PROBS)
    c = g.counts
    assert (c["active_features"], c["feature_nodes"], c["error_nodes"], c["input_nodes"]) == (3, 2, 1, 2)
    assert (c["edges_stored"], c["rows"], c["backward_passes"]) == (11, 4, 2)
    assert "E_12_1" not in {n["id"] for n in graph(all_inputs=False).nodes}  # in1 has no edge


def test_influence_and_its_cumulative_share_are_the_numpy_power_series():
    """Outside truth: w (Â + Â² + …) by a numpy loop; the cumulative share: sum of the influences at least as large
    as the node's, over the total; features() most influential first."""
    A, w = sub(dense())
    infl = np_influence(A, w)
    g = graph()
    by = {n["id"]: n for n in g.nodes}
    for k, node in enumerate(GRAPH):
        assert by[IDS[node]]["influence_raw"] == pytest.approx(infl[k], abs=1e-6)
        share = sum(v for v in infl if v >= infl[k]) / infl.sum()
        assert by[IDS[node]]["influence"] == pytest.approx(share, abs=1e-6)
    top = max((F0, F1), key=lambda k: infl[GRAPH.index(k)])
    assert [n["id"] for n in g.features()] == [IDS[top], IDS[F0 + F1 - top]]


def test_scores_of_the_whole_and_the_pruned_graph_are_the_papers_definitions():
    """Outside truth: replacement and completeness written out in numpy; for the pruned graph, on the edges it kept."""
    A, w = sub(dense())
    g = graph()
    rep, comp = np_scores(A, w)
    assert (g.scores["replacement"], g.scores["completeness"]) == pytest.approx((rep, comp), abs=1e-6)
    pruned = (g.scores["replacement_pruned"], g.scores["completeness_pruned"])  # thresholds 1: nothing pruned
    assert pruned == pytest.approx((rep, comp), abs=1e-6) and abs(rep - comp) > 1e-3
    p = graph(0.5, 0.8)
    assert 0 < len(p.edges) < len(g.edges)
    pos = {IDS[k]: i for i, k in enumerate(GRAPH)}
    P = np.zeros_like(A)
    for s, t, v in p.edges:
        P[pos[p.nodes[t]["id"]], pos[p.nodes[s]["id"]]] = v
    rep_p, comp_p = np_scores(P, w)
    assert (p.scores["replacement_pruned"], p.scores["completeness_pruned"]) == pytest.approx((rep_p, comp_p), abs=1e-6)
    assert abs(comp_p - comp) > 1e-3 and p.scores["completeness"] == pytest.approx(comp, abs=1e-6)


def test_threshold_keeps_the_smallest_top_set_reaching_the_share():
    """Outside truth: scores 4 3 2 1 (total 10): the top two hold exactly 70 %, so 0.7 stops at 3; 0.71 needs 2."""
    s = torch.tensor([1.0, 4.0, 2.0, 3.0])
    assert (threshold_for(s, 0.7), threshold_for(s, 0.71), threshold_for(s, 0.4)) == (3.0, 2.0, 4.0)


def _diamond():
    """L (w=1) reads f0 (3) and f1 (1); f0 reads in0 (1), f1 reads in1 (1). Â: L←f0 .75, L←f1 .25, f←in 1.
    Influence f0 = in0 = .75, f1 = in1 = .25 (total 2); edge scores .75 .25 .75 .25 (total 2)."""
    t = Triplets(torch.tensor([4, 4, 0, 1]), torch.tensor([0, 1, 2, 3]), torch.tensor([3.0, 1.0, 1.0, 1.0]), 5)
    w = torch.tensor([0, 0, 0, 0, 1.0], dtype=torch.float64)
    always = torch.tensor([False, False, True, True, True])
    return t, w, always, always & torch.tensor([False, False, True, True, False])


def test_pruning_keeps_the_node_and_the_edges_exactly_at_the_share():
    """Outside truth: the diamond's influences by hand; f0 and in0 hold exactly 75 % of the node influence, the edges
    L←f0 and f0←in0 exactly 75 % of the edge scores: both kept at threshold 0.75 (the share is reached, ≥)."""
    t, w, always, src = _diamond()
    pr = prune(t, w, always, src, node_threshold=0.75, edge_threshold=1.0)
    assert pr.nodes.tolist() == [True, False, True, True, True]
    assert pr.influence.tolist() == pytest.approx([0.75, 0.25, 0.75, 0.25, 0.0])
    pr = prune(t, w, always, src, node_threshold=1.0, edge_threshold=0.75)
    assert pr.edges.tolist() == [True, False, True, False]
    assert pr.nodes.tolist() == [True, False, True, True, True]


def test_an_error_node_needs_no_incoming_edge_to_stay():
    """Outside truth: an error node is a source (nothing computes its input); kept at node threshold 1 with its
    edges (the hand-built error reads nothing and feeds f0, f1 and both logits)."""
    g = graph()
    assert "0_-1_1" in {n["id"] for n in g.nodes}
    assert len(g.outputs_of("0_-1_1")) == 4 and g.inputs_of("0_-1_1") == []


def test_rows_keep_the_largest_magnitudes_and_count_the_rest():
    """Outside truth: a logit row over features (-5, 1, 2): the 2 largest in magnitude are -5 and 2; one dropped."""
    A = torch.zeros(5, 5)
    A[3, :3] = torch.tensor([-5.0, 1.0, 2.0])
    A[4, 1] = 0.5
    b = build(Planted(A, 3, 0, 0, 2), torch.tensor([0.6, 0.4]), max_feature_nodes=0, edges_per_row=2)
    t = b.triplets
    assert sorted(zip(t.rows.tolist(), t.cols.tolist(), t.values.tolist(), strict=True)) == [
        (3, 0, -5.0), (3, 2, 2.0), (4, 1, 0.5)]  # fmt: skip
    assert (b.dropped, b.stored, b.rows) == (1, 3, 2)


def test_the_rows_go_to_the_most_influential_features_first():
    """Outside truth: from the logits' rows alone f1 (4.0 into L0) and f0 outrank f2 (0.01 into L1)."""
    b = hand_built()
    assert b.visited.tolist() == [True, True, False]


def _direct(true: np.ndarray):
    """measure_direct of a plain linear model with the edges ``true``: targets' pre-activations and logits as sums of
    each source's effect (scaled by its factor)."""

    def measure(scale):
        m = np.ones(6)
        if scale is not None:
            m[scale[0]] = scale[1]
        out = true[:, :6] @ m
        return torch.tensor(out[:3]), torch.tensor(out[6:])

    return measure


def test_check_edges_finds_a_planted_error_of_the_hand_built_model():
    """Outside truth: the model's f1←in0 is -0.8 where the graph stored -1.0: the worst error is 0.2, relative to the
    largest edge checked, 4.0; all 5 sources of the graph (f0 f1 e in0 in1) checked."""
    true = dense()
    assert check_edges(hand_built(), _direct(true), 10) == pytest.approx(
        {"edges_sources_checked": 5, "edges_max_abs_error": 0.0, "edges_largest": 4.0, "edges_max_rel_error": 0.0}
    )
    true[F1, IN0] = -0.8
    got = check_edges(hand_built(), _direct(true), 10)
    assert (got["edges_max_abs_error"], got["edges_max_rel_error"]) == pytest.approx((0.2, 0.05))


class FakeRep:
    n_features = 3
    feature_activation = torch.tensor(ACT)

    def source_of(self, node):
        return {v: k for k, v in IDS.items()}[node]

    def source_id(self, s):
        return IDS[s]


def test_an_ablation_predicts_the_hand_propagated_change_of_each_logit():
    """Outside truth by hand: per unit f1←f0 3/2, L0←f1 4/1.5, L0←f0 -0.5/2, L1←f0 1.5/2. Ablating f0 (Δ -2): Δf1 =
    -3, ΔL0 = 4/1.5·(-3) + 0.25·2 = -8 + 0.5 = -7.5, ΔL1 = -1.5. Setting f0 and f1 both: f1 is held at its
    new value, so ΔL0 = 4/1.5·Δf1 - 0.25·Δf0."""
    g = graph()
    got = {"frozen": [1.0, 2.0], "recomputed": [3.0, 4.0], "model": [5.0, 6.0]}
    iv = intervene(g, FakeRep(), ["0_7_1"], lambda mode, ch: torch.tensor(got[mode]) if ch else torch.zeros(2))
    rows = iv.logits
    assert [r["predicted_full"] for r in rows] == pytest.approx([-7.5, -1.5])
    assert [r["predicted_pruned"] for r in rows] == pytest.approx([-7.5, -1.5])
    assert [(r["frozen"], r["recomputed"], r["model"]) for r in rows] == [(1, 3, 5), (2, 4, 6)]
    assert [(r["label"], r["token"]) for r in rows] == [("x", 20), ("y", 21)]
    iv = intervene(g, FakeRep(), ["0_7_1", "1_4_1"], lambda mode, ch: torch.zeros(2), value=1.0, scale=None)
    # Δf0 = -1, Δf1 = -0.5 (held): ΔL0 = 4/1.5·(-0.5) - 0.25·(-1), ΔL1 = 0.75·(-1)
    assert [r["predicted_full"] for r in iv.logits] == pytest.approx([-4 / 3 + 0.25, -0.75])


def test_auto_checks_add_the_earliest_layers_top_feature_and_steering_limit_is_inclusive():
    """Outside truth: auto_features' rule (the top feature, and the earliest layer's top one when it is elsewhere);
    parse_steer's documented limit, 'at most 1e6'."""
    feats = [{"id": "1_7_3", "layer": 1}, {"id": "1_2_0", "layer": 1}, {"id": "0_2_1", "layer": 0}]
    assert auto_features(feats) == ["1_7_3", "0_2_1"]
    assert auto_features(feats[2:] + feats[:2]) == ["0_2_1"]
    assert parse_steer("1_2_3=1e6", "1_2_3") == ("1_2_3", 1e6)


def test_two_steps_disagree_in_sign_or_by_more_than_twice():
    """Outside truth: the documented rule, in sign or by more than twice (exactly twice agrees), above 1e-3."""
    assert not disagree(1.0, 2.0) and not disagree(-2.0, -1.0)
    assert disagree(1.0, 2.01) and disagree(0.5, -0.5)
    assert not disagree(0.0, 0.0009)


def test_circuit_tracer_export_ids_and_edge_indices():
    """Outside truth: Cantor's pairing (l + f)(l + f + 1)/2 + f of layer and feature; only the first logit is the
    target; a CNN node's column is its rounded ctx; an edge naming node len(nodes) is refused."""
    g = graph()
    ct = {n["node_id"]: n for n in g.to_circuit_tracer()["nodes"]}
    assert (ct["0_7_1"]["feature"], ct["1_4_1"]["feature"]) == (28 + 7, 15 + 4)
    assert (ct["3_20_1"]["is_target_logit"], ct["3_21_1"]["is_target_logit"]) == (True, False)
    cnn = {n["node_id"]: n["ctx_idx"] for n in graph(kind="cnn").to_circuit_tracer()["nodes"]}
    assert (cnn["E_11_0"], cnn["E_12_1"], ct["E_12_1"]["ctx_idx"]) == (0, 2, 1)  # ctx 2.4 rounded; lm: the position
    d = g.to_dict()
    d["edges"] = [[0, len(d["nodes"]), 1.0]]
    with pytest.raises(RunError, match="not an index below"):
        check_graph_record(d)


def test_lm_nodes_read_the_models_own_errors_tokens_and_softmax():
    """Outside truth: each error node's activation is the norm (numpy) of the replacement's error vector at its
    (layer, position); input nodes carry the prompt's token ids; each logit's probability is the numpy softmax of
    the model's own logits at the last position (targets given, so the order is the caller's)."""
    from mechscope.lm.methods.attribution_graph import GraphSettings, attribution_graph
    from tests.unit.test_attribution_graph_lm import TOKENS, random_transcoders, tiny

    model = tiny("gpt2")
    s = GraphSettings(batch_size=8, check_sources=0, node_threshold=1.0, edge_threshold=1.0)
    g, rep = attribution_graph(model, random_transcoders(model), TOKENS, targets=[9, 5], settings=s)
    errs = rep.errors.detach().double().numpy()
    nodes = [n for n in g.nodes if n["kind"] == "error"]
    assert len({n["id"] for n in nodes}) > 4
    for n in nodes:
        assert n["activation"] == pytest.approx(np.linalg.norm(errs[n["layer"], n["pos"]]), rel=1e-5)
        assert n["source"] == rep.n_features + n["layer"] * len(TOKENS) + n["pos"]
    assert {n["id"] for n in g.nodes if n["kind"] == "input"} == {f"E_{t}_{p}" for p, t in enumerate(TOKENS.tolist())}
    with torch.no_grad():
        z = model(TOKENS[None])[0, -1].double().numpy()
    p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    logits = sorted((n for n in g.nodes if n["kind"] == "logit"), key=lambda n: n["logit"])
    assert [(n["feature"], n["probability"]) for n in logits] == [(9, pytest.approx(p[9])), (5, pytest.approx(p[5]))]


def test_cnn_nodes_sit_in_their_grid_cell():
    """Outside truth: a position p of a w-wide grid is row p // w, column p % w; an input pixel's column is x, and a
    feature's drawn column (ctx) is the x of its receptive-field centre (rf_centre [y, x])."""
    from mechscope.cnn.methods.attribution_graph import CnnGraphSettings, cnn_attribution_graph
    from tests.unit.test_attribution_graph_cnn import image, random_dicts, tiny_cnn

    model = tiny_cnn("plain")
    s = CnnGraphSettings(batch_size=16, check_sources=0, node_threshold=1.0, edge_threshold=1.0)
    g, rep = cnn_attribution_graph(model, random_dicts(model, "sae"), image(model), settings=s)
    W = model.config.image_size
    seen = {"input": 0, "feature": 0}
    for n in g.nodes:
        if n["kind"] == "input":
            y, x = divmod(n["pos"], W)
            assert (n["label"], n["ctx"]) == (f"pixel ({y},{x})", x)
        elif n["kind"] == "feature":
            y, x = divmod(n["pos"], rep.grid[n["layer"]][1])
            assert n["ctx_label"] == f"({y},{x})" and n["ctx"] == pytest.approx(n["rf_centre"][1])
            assert n["rf_centre"][0] != n["rf_centre"][1] or y == x
        seen[n["kind"]] = seen.get(n["kind"], 0) + 1
    assert seen["input"] > 3 and seen["feature"] > 3
    assert g.input_labels[W + 2] == "(1,2)"
