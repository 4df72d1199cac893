"""core.attribution_graph: the sparse influence, pruning and scores against dense reference formulas (circuit-tracer's
``compute_influence``, ``prune_graph``, ``compute_graph_scores`` written out here on dense matrices), the row
builder on a planted linear system (rows exact, storage bounded), predictions, the record's checks and the
circuit-tracer export."""

from __future__ import annotations

import json

import pytest
import torch

from mechscope.core.attribution_graph import (
    AttributionGraph,
    NodeInfo,
    Triplets,
    assemble,
    build,
    check_graph_record,
    graph_scores,
    influence,
    load_graph,
    propagate,
    prune,
)
from mechscope.core.errors import MechscopeError, RunError

# ---- dense references (circuit-tracer's formulas) -----------------------------------------------------------


def dense_norm(A):
    a = A.abs()
    s = a.sum(1, keepdim=True)
    return torch.where(s > 1e-10, a / s.clamp_min(1e-10), torch.zeros_like(a))


def dense_influence(A, w):
    N = dense_norm(A)
    cur, tot = w @ N, torch.zeros_like(w)
    while cur.abs().sum() > 0:
        tot = tot + cur
        cur = cur @ N
    return tot


def dense_threshold(scores, frac):
    s = torch.sort(scores, descending=True).values
    cum = torch.cumsum(s, 0) / s.sum()
    i = min(int(torch.searchsorted(cum, torch.tensor(frac, dtype=cum.dtype))), len(s) - 1)
    return s[i]


def random_dag(n_feat=30, n_err=6, n_in=4, n_logit=3, seed=0, density=0.5):
    """A graph in circuit-tracer's node order with features in layers (rows read only earlier columns)."""
    g = torch.Generator().manual_seed(seed)
    n = n_feat + n_err + n_in + n_logit
    A = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n_feat):
        A[i, :i] = torch.randn(i, generator=g, dtype=torch.float64) * (torch.rand(i, generator=g) < density)
        A[i, n_feat : n_feat + n_err + n_in] = torch.randn(n_err + n_in, generator=g, dtype=torch.float64)
    A[n - n_logit :, : n_feat + n_err + n_in] = torch.randn(
        n_logit, n_feat + n_err + n_in, generator=g, dtype=torch.float64
    )
    w = torch.zeros(n, dtype=torch.float64)
    w[n - n_logit :] = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)[:n_logit]
    return A, w


def triplets_of(A):
    r, c = A.nonzero(as_tuple=True)
    return Triplets(r, c, A[r, c], A.shape[0])


def test_influence_and_scores_match_dense_formulas():
    A, w = random_dag()
    t = triplets_of(A)
    assert torch.allclose(influence(t, w), dense_influence(A, w), atol=1e-12)
    nf, ne, nt = 30, 6, 4
    errors = torch.zeros(A.shape[0], dtype=torch.bool)
    errors[nf : nf + ne] = True
    inputs = torch.zeros_like(errors)
    inputs[nf + ne : nf + ne + nt] = True
    s = graph_scores(t, w, errors, inputs)
    infl = dense_influence(A, w)
    tok, err = infl[inputs].sum(), infl[errors].sum()
    Nm = dense_norm(A)
    non_err = 1 - Nm[:, errors].sum(1)
    out = infl + w
    assert s["replacement"] == pytest.approx(float(tok / (tok + err)), abs=1e-12)
    assert s["completeness"] == pytest.approx(float((non_err * out).sum() / out.sum()), abs=1e-12)


def test_prune_matches_dense_reference():
    A, w = random_dag(seed=3)
    n = A.shape[0]
    nf, ne = 30, 6
    always = torch.zeros(n, dtype=torch.bool)
    always[nf + ne :] = True
    src_only = torch.zeros(n, dtype=torch.bool)
    src_only[nf : nf + ne + 4] = True
    t = triplets_of(A)
    pr = prune(t, w, always, src_only, 0.7, 0.9)
    # dense reference (circuit-tracer's prune_graph)
    infl = dense_influence(A, w)
    keep = (infl >= dense_threshold(infl, 0.7)) | always
    P = A.clone()
    P[~keep] = 0
    P[:, ~keep] = 0
    Np = dense_norm(P)
    score = Np * (dense_influence(P, w) + w)[:, None]
    emask = score >= dense_threshold(score.flatten(), 0.9)
    emask &= P != 0
    while True:
        old = keep.clone()
        emask[~keep] = False
        emask[:, ~keep] = False
        keep[: nf + ne] &= emask[:, : nf + ne].any(0)
        keep[:nf] &= emask[:nf].any(1)
        if torch.equal(keep, old):
            break
    assert torch.equal(pr.nodes, keep)
    got = torch.zeros_like(A, dtype=torch.bool)
    got[t.rows[pr.edges], t.cols[pr.edges]] = True
    assert torch.equal(got, emask & keep[:, None] & keep[None, :])
    with pytest.raises(MechscopeError, match="node_threshold"):
        prune(t, w, always, src_only, 1.5, 0.9)


class Planted:
    """A linear system whose rows are a planted dense matrix (the builder must return it exactly)."""

    def __init__(self, A, nf, ne, nt, nl, batch=4):
        self.A, self.n_features, self.n_errors, self.n_inputs, self.batch_size = A.float(), nf, ne, nt, batch
        self.nl, self.calls = nl, 0
        self.src = nf + ne + nt

    def feature_rows(self, idx):
        self.calls += 1
        return self.A[idx, : self.src]

    def logit_rows(self, idx):
        self.calls += 1
        return self.A[self.src + idx, : self.src]


def test_build_returns_planted_rows_in_few_backward_passes():
    A, w = random_dag(seed=1)
    sysm = Planted(A, 30, 6, 4, 3)
    built = build(sysm, w[-3:])
    dense = torch.zeros_like(A, dtype=torch.float32)
    t = built.triplets
    dense[t.rows, t.cols] = t.values
    assert torch.allclose(dense, A.float())
    assert built.rows == 33 and built.batches == sysm.calls == 1 + 30 // 4 + 1  # ceil(30/4) + one logit batch


def test_partial_build_picks_influential_features_and_bounds_storage():
    A, w = random_dag(n_feat=40, seed=2, density=0.9)
    full = influence(triplets_of(A), w)[:40]
    built = build(Planted(A, 40, 6, 4, 3), w[-3:], max_feature_nodes=12, edges_per_row=5)
    assert int(built.visited.sum()) == 12
    # the most influential feature by the exact influence is among the chosen ones
    assert bool(built.visited[int(full.argmax())])
    # storage: at most edges_per_row feature entries per row, plus the error and input columns
    per_row = torch.bincount(built.triplets.rows, minlength=A.shape[0])
    assert int(per_row.max()) <= 5 + 6 + 4
    assert built.dropped > 0
    # kept entries are exact values
    t = built.triplets
    assert torch.allclose(t.values, A[t.rows, t.cols].float())


def test_propagate_follows_the_linear_graph():
    # f0 -> f1 -> logit, f0 -> logit; activations 2 and 3
    t = Triplets(torch.tensor([1, 2, 2]), torch.tensor([0, 1, 0]), torch.tensor([4.0, 6.0, 1.0]), 3)
    act = torch.tensor([2.0, 3.0, 0.0])
    isf = torch.tensor([True, True, False])
    out = propagate(t, act, isf, {0: -2.0})  # ablate f0
    # per unit: f0->f1 = 2, f1->logit = 2, f0->logit = 0.5: Δf1 = -4, Δlogit = -4*2 + -2*0.5 = -9
    assert out[1].item() == pytest.approx(-4.0) and out[2].item() == pytest.approx(-9.0)


def small_graph():
    A, w = random_dag(n_feat=6, n_err=2, n_in=2, n_logit=1, seed=5)
    built = build(Planted(A, 6, 2, 2, 1), torch.tensor([1.0]))
    info = NodeInfo(
        feature_layer=torch.tensor([0, 0, 0, 1, 1, 1]),
        feature_pos=torch.tensor([0, 1, 1, 0, 1, 1]),
        feature_index=torch.tensor([3, 4, 5, 6, 7, 8]),
        feature_activation=torch.ones(6),
        feature_ctx=torch.tensor([0.0, 1, 1, 0, 1, 1]),
        error_layer=torch.tensor([0, 1]),
        error_pos=torch.tensor([1, 1]),
        error_ctx=torch.tensor([1.0, 1.0]),
        error_norm=torch.ones(2),
        input_pos=torch.tensor([0, 1]),
        input_index=torch.tensor([11, 12]),
        input_ctx=torch.tensor([0.0, 1.0]),
        input_labels=["a", "b"],
        logit_index=torch.tensor([9]),
        logit_labels=["z"],
        logit_weights=torch.tensor([1.0]),
        logit_pos=1,
        logit_ctx=1.0,
        n_layers=2,
    )
    f = assemble(built, info, 0.9, 0.99)
    return AttributionGraph(
        kind="lm",
        model="m",
        title="a b",
        input_labels=("a", "b"),
        layer_names=("0", "1"),
        nodes=f["nodes"],
        edges=f["edges"],
        scores=f["scores"],
        counts=f["counts"],
        settings={"node_threshold": 0.9},
        full=f["full"],
    )


def test_record_round_trip_annotations_and_circuit_tracer_export(tmp_path):
    g = small_graph()
    ids = [n["id"] for n in g.nodes]
    assert {"E_11_0", "E_12_1", "3_9_1"} <= set(ids)  # inputs and the logit always kept
    feats = [n["id"] for n in g.nodes if n["kind"] == "feature"]
    a = g.annotated(pinned=feats[:2], supernodes=[{"label": "pair", "members": feats[:2]}])
    path = tmp_path / "graph.json"
    path.write_text(json.dumps(a.to_dict()))
    back = load_graph(path)
    assert back.pinned == tuple(feats[:2]) and back.supernodes[0]["label"] == "pair"
    assert back.edges == a.edges
    ct = a.to_circuit_tracer("s")
    assert set(ct) == {"metadata", "qParams", "nodes", "links"}
    assert ct["qParams"]["supernodes"] == [["pair", *feats[:2]]]
    kinds = {n["feature_type"] for n in ct["nodes"]}
    assert {"embedding", "logit"} <= kinds
    node_keys = {
        "node_id",
        "feature",
        "layer",
        "ctx_idx",
        "feature_type",
        "token_prob",
        "is_target_logit",
        "run_idx",
        "reverse_ctx_idx",
        "jsNodeId",
        "clerp",
        "influence",
        "activation",
    }
    assert all(set(n) == node_keys for n in ct["nodes"])
    assert all(set(link) == {"source", "target", "weight"} for link in ct["links"])


def test_inputs_and_outputs_of_read_the_edge_list_both_ways():
    g = small_graph()
    for i, n in enumerate(g.nodes):
        into = sorted((g.nodes[s]["id"], w) for s, t, w in g.edges if t == i)
        out = sorted((g.nodes[t]["id"], w) for s, t, w in g.edges if s == i)
        assert sorted((m["id"], w) for m, w in g.inputs_of(n["id"])) == into
        assert sorted((m["id"], w) for m, w in g.outputs_of(n["id"])) == out
        got = [abs(w) for _, w in g.outputs_of(n["id"])]
        assert got == sorted(got, reverse=True)  # largest first
        assert len(g.outputs_of(n["id"], 1)) == min(1, len(out))
    assert any(g.outputs_of(n["id"]) for n in g.nodes) and any(g.inputs_of(n["id"]) for n in g.nodes)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: d.pop("nodes"), "missing field 'nodes'"),
        (lambda d: d["edges"].append([0, 999, 1.0]), "names node 999"),
        (lambda d: d["edges"].append([0, 1, "x"]), "not a finite number"),
        (lambda d: d["nodes"].append(dict(d["nodes"][0])), "repeated id"),
        (lambda d: d.__setitem__("pinned", ["nope"]), "pinned names 'nope'"),
        (lambda d: d.__setitem__("supernodes", [{"label": "x", "members": ["nope"]}]), "names 'nope'"),
        (lambda d: d["nodes"][0].__setitem__("kind", "weird"), "kind must be one of"),
        (lambda d: d.__setitem__("kind", "rnn"), "'lm' or 'cnn'"),
        # Python's json writes NaN and Infinity, which the viewer's own JSON could not hold (a traceback in --view)
        (lambda d: d["nodes"][0].__setitem__("activation", float("nan")), "NaN is not JSON"),
        (lambda d: d["settings"].__setitem__("node_threshold", float("inf")), "Infinity is not JSON"),
    ],
)
def test_invalid_graph_json_is_one_line(tmp_path, damage, message):
    d = small_graph().to_dict()
    damage(d)
    p = tmp_path / "g.json"
    p.write_text(json.dumps(d))
    with pytest.raises(RunError, match=message) as e:
        load_graph(p)
    assert "\n" not in str(e.value)
    p.write_text("{not json")
    with pytest.raises(RunError, match="not a readable graph JSON"):
        load_graph(p)
    with pytest.raises(RunError, match="expected a JSON object"):
        check_graph_record([1, 2])


def test_asked_interventions_in_order_auto_then_ablations_then_steering():
    from mechscope.core.attribution_graph import asked_interventions

    calls = []

    def intervene_on(nodes, **kw):
        calls.append((nodes, kw))
        return len(calls)

    feats = [{"id": "1_7_3"}, {"id": "0_2_1"}]
    out = asked_interventions(intervene_on, feats, True, [["0_2_1", "1_7_3"]], [("1_7_3", 5.0)])
    assert out == [1, 2, 3]
    assert calls == [(["1_7_3"], {}), (["0_2_1", "1_7_3"], {}), (["1_7_3"], {"value": 5.0, "scale": None})]
    assert asked_interventions(intervene_on, [], True) == [] and len(calls) == 3  # no feature: nothing to ablate


def test_asked_interventions_take_a_group_as_one_id_or_a_list():
    """A group given as one id (as intervene takes it) had its characters sorted for the repeat check: ids with the
    same characters ('1_12_5', '1_21_5') read as the same group."""
    from mechscope.core.attribution_graph import check_asked

    check_asked(["1_12_5", "1_21_5"])
    check_asked([["1_12_5", "0_3_1"], "1_15_2"], [("2_4_0", 3.0)])
    with pytest.raises(MechscopeError, match="--ablate 1_12_5 given more than once"):
        check_asked(["1_12_5", ["1_12_5"]])
    with pytest.raises(MechscopeError, match="--ablate '1_-1_5' is not a feature node's id"):
        check_asked([["1_-1_5"]])
