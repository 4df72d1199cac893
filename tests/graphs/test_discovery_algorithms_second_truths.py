"""Circuit discovery's algorithms, second pass, against outside truths: closed forms on hand-built linear toys
(each head's path adds ``c_i · x0`` to the logit, so removing it moves the metric by exactly ``-c_i``), EAP-IG's
Riemann sum on a quadratic metric written out in numpy, the models' own forward counters, and counts by hand of
what a circuit and a known circuit hold."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mechscope.core.graphs import (
    EdgeScores,
    acdc,
    circuit_faithfulness,
    eap,
    eap_ig,
    edge_patching,
    find_circuit,
    score_circuit,
)
from tests.graphs.test_discovery_core_truths import m_removed, plain
from tests.graphs.toys import PLANTED_EDGES, ResidualToy, _head, batches, logit_diff, planted_residual

WEIGHTS = (0.9, 0.05, 0.4, 0.013, 0.27)  # distinct: a swapped edge or a shifted cut shows


def weighted_heads(weights=WEIGHTS):
    """One layer of heads, head i adding ``weights[i] · x0`` to the one logit (linear): clean x0 = 2, corrupted
    x0 = -1, so the head's path carries ``3 · weights[i]`` of the metric (the mean logit)."""
    d = 3
    W_E = torch.eye(2, d, dtype=torch.float64)
    heads = [[_head(d, q=[(0, 1.0)], o=[(2, w)]) for w in weights]]
    W_U = torch.zeros(d, 1, dtype=torch.float64)
    W_U[2, 0] = 1.0
    clean = torch.tensor([[2.0, 0.0]] * 3, dtype=torch.float64)
    corrupted = torch.tensor([[-1.0, 0.0]] * 3, dtype=torch.float64)
    return ResidualToy(W_E, heads, W_U), clean, corrupted, lambda out: out[:, 0].mean()


def _edge(model, h: int, into: bool) -> int:
    g = model.graph
    return g.edge_id("embed", f"blocks.0.h{h}", "q") if into else g.edge_id(f"blocks.0.h{h}", "logits", "in")


# ---- ACDC, EAP and edge patching: closed forms on the linear toy ----------------------------------------------


@pytest.mark.parametrize("tau", [0.1, 0.5, 1.25])  # away from any 3 w_i: no float ties
def test_acdc_keeps_exactly_the_paths_worth_at_least_tau(tau):
    """Outside truth: in the linear toy, removing head i's output edge (the corrupted x0 = -1 against the clean
    2) lowers the mean logit by exactly ``3 · w_i``, independent of the other removals; with ``better=None`` ACDC
    removes it iff ``3 · w_i < tau``, and a removed head's input edges then go untried. A live head's q edge moves
    the metric by the same ``-3 w_i``; its k edge and the direct embed -> logits edge carry nothing (0, removed).
    Each tried edge costs one forward, after the corrupted and the clean runs (the toy's own counter)."""
    model, clean, corrupted, metric = weighted_heads()
    model.forwards = 0
    res = acdc(model, clean, corrupted, metric=metric, threshold=tau)
    live = sum(3 * w >= tau for w in WEIGHTS)
    tried = 1 + len(WEIGHTS) + 2 * live  # into logits: every edge; into a head: its q and k if it is live
    assert res.settings["edges_tried"] == tried and res.forward_passes == model.forwards == 2 + tried
    want_kept = {
        e for h, w in enumerate(WEIGHTS) if 3 * w >= tau for e in (_name(model, h, True), _name(model, h, False))
    }
    assert {model.graph.edges[e] for e in res.kept} == want_kept
    for h, w in enumerate(WEIGHTS):
        assert res.scores[_edge(model, h, False)] == pytest.approx(-3 * w, abs=1e-12)
        want_in = -3 * w if 3 * w >= tau else 0.0  # a dead head's input edge is never tried
        assert res.scores[_edge(model, h, True)] == pytest.approx(want_in, abs=1e-12)
    lost = sum(3 * w for w in WEIGHTS if 3 * w < tau)
    assert res.settings["metric_circuit"] == pytest.approx(res.metric_clean - lost, abs=1e-12)
    assert res.scores[model.graph.edge_id("embed", "logits", "in")] == 0.0
    assert (res.metric_clean, res.metric_corrupted) == (pytest.approx(2 * sum(WEIGHTS)), pytest.approx(-sum(WEIGHTS)))


def _name(model, h: int, into: bool):
    return model.graph.edges[_edge(model, h, into)]


def test_acdc_directions_judge_the_signed_change():
    """Outside truth: each removal lowers the metric by ``3 w_i > 0``. ``better='higher'`` counts that drop as
    harm (remove iff 3 w_i < tau, as None here); ``better='lower'`` counts it as a gain, so every edge goes, and
    the empty circuit's metric is the corrupted run's ``-sum(w)``."""
    model, clean, corrupted, metric = weighted_heads()
    higher = acdc(model, clean, corrupted, metric=metric, threshold=0.5, better="higher")
    kept = {model.graph.edges[e] for e in higher.kept}
    assert kept == {_name(model, h, into) for h in (0, 2, 4) for into in (True, False)}
    lower = acdc(model, clean, corrupted, metric=metric, threshold=0.5, better="lower")
    assert lower.kept == ()
    assert lower.settings["metric_circuit"] == pytest.approx(-sum(WEIGHTS), abs=1e-12)


@pytest.mark.parametrize("ablation", ["patch", "zero", "mean"])
def test_eap_and_edge_patching_equal_the_closed_form_on_the_linear_toy(ablation):
    """Outside truth: the metric is linear in every edge's value, so the first-order term is exact: both methods
    give ``w_i · (x0_source - 2)`` for head i's q and output edges (x0_source = -1 patched, 0 zeroed, -1 the
    corrupted batch's mean), and 0 for the k edges and the direct embed -> logits edge, which carry nothing."""
    model, clean, corrupted, metric = weighted_heads()
    src = {"patch": -1.0, "zero": 0.0, "mean": -1.0}[ablation]
    want = np.zeros(model.graph.n_edges)
    for h, w in enumerate(WEIGHTS):
        want[_edge(model, h, True)] = want[_edge(model, h, False)] = w * (src - 2)
    for method in (eap, edge_patching):
        got = method(model, clean, corrupted, metric=metric, ablation=ablation).scores
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


# ---- EAP-IG: the Riemann sum on a quadratic metric -----------------------------------------------------------


def test_eap_ig_is_the_right_endpoint_riemann_sum_on_a_quadratic():
    """Outside truth: with one head (the logit y = a·x0, through it alone) and M = mean(y²), the gradient at the
    logit is 2y/n, linear along the path; EAP-IG's mean over alpha = k/steps, k = 1..steps, of the gradient at
    ``corrupted + alpha (clean - corrupted)`` is the gradient at the point ``(steps + 1) / (2 steps)`` of the way
    (the mean of k/steps), times the sender's difference, in numpy. It is not the exact integral (the midpoint),
    which the test also tells apart."""
    model, clean, corrupted, _ = weighted_heads((0.7,))
    clean = clean + torch.tensor([[0.0], [0.5], [-1.5]], dtype=torch.float64) * torch.tensor([[1.0, 0.0]])
    metric = lambda out: (out[:, 0] ** 2).mean()  # noqa: E731
    x1, x0 = clean[:, 0].numpy(), corrupted[:, 0].numpy()
    steps, n, a = 4, len(x1), 0.7
    t = (steps + 1) / (2 * steps)
    y_t = a * (x0 + t * (x1 - x0))  # the logit at the averaged point; dM/dy = 2 y / n
    g = model.graph
    want = {
        ("embed", "logits", "in"): 0.0,
        ("blocks.0.h0", "logits", "in"): np.sum(2 * y_t / n * a * (x0 - x1)),
        ("embed", "blocks.0.h0", "q"): np.sum(2 * y_t / n * a * (x0 - x1)),
    }
    got = eap_ig(model, clean, corrupted, metric=metric, steps=steps).scores
    for edge, value in want.items():
        assert got[g.edge_id(*edge)] == pytest.approx(value, abs=1e-12)
    integral = np.sum(2 * a * (x0 + 0.5 * (x1 - x0)) / n * a * (x0 - x1))
    assert got[g.edge_id("blocks.0.h0", "logits", "in")] != pytest.approx(integral, abs=1e-6)


# ---- circuit_faithfulness: edges and passes counted by hand -----------------------------------------------


def test_a_circuit_given_twice_over_counts_each_edge_once_and_is_patched_by_hand():
    """Outside truth: the distinct edges of a list naming some twice (index, triple and name), and the plain
    forward of the toy (tests.graphs.test_discovery_core_truths) with every other edge carrying the corrupted run's
    value, normalised by hand."""
    model, (clean, corrupted) = planted_residual("tanh"), batches(8)
    g = model.graph
    e1, e2 = g.edge_id("embed", "blocks.0.h0", "q"), g.edge_id("blocks.0.h0", "logits", "in")
    spec = [e1, list(g.edges[e1]), g.edge_name(e1), e2, e2]
    res = circuit_faithfulness(model, spec, clean, corrupted, metric=logit_diff)
    _, corr = plain(model, corrupted)
    others = set(g.edges) - {g.edges[e1], g.edges[e2]}
    m = m_removed(model, clean, corr, others)
    full, empty = m_removed(model, clean, corr, set()), m_removed(model, clean, corr, set(g.edges))
    assert res["edges"] == 2
    assert res["metric"] == pytest.approx(m, abs=1e-12)
    assert res["faithfulness"] == pytest.approx((m - empty) / (full - empty), abs=1e-12)


def test_circuit_faithfulness_counts_the_forwards_the_model_ran():
    """Outside truth: the toy's own forward counter (one corrupted run, then the full model, the empty circuit and
    the circuit; with a curve's full and empty metrics, the corrupted run and the circuit)."""
    model, (clean, corrupted) = planted_residual(), batches(8)
    ids = sorted(model.graph.edge_id(*e) for e in PLANTED_EDGES)
    model.forwards = 0
    alone = circuit_faithfulness(model, ids, clean, corrupted, metric=logit_diff)
    assert alone["forward_passes"] == model.forwards == 4

    class Curve:
        ablation, metric_full, metric_empty = "patch", alone["metric_full"], alone["metric_empty"]

    model.forwards = 0
    reused = circuit_faithfulness(model, ids, clean, corrupted, metric=logit_diff, curve=Curve())
    assert reused["forward_passes"] == model.forwards == 2
    assert reused["faithfulness"] == pytest.approx(alone["faithfulness"], abs=1e-12)


# ---- scoring: true nodes counted among the candidates ---------------------------------------------------


def test_given_true_nodes_outside_the_candidates_are_not_counted():
    """Outside truth: the candidate nodes are the internal ones (heads, not embed or logits); of the given true
    nodes {embed, logits, blocks.0.h0, blocks.2.h0} two are candidates, counted by hand, and the perfect ranking
    of the planted edges finds both (node recall 1)."""
    model = planted_residual()
    g = model.graph
    values = np.zeros(g.n_edges)
    for i, e in enumerate(sorted(PLANTED_EDGES)):
        values[g.edge_id(*e)] = 1.0 + i
    nodes = ["embed", "logits", "blocks.0.h0", "blocks.2.h0"]
    internal = {n.name for n in g.nodes if n.sends and n.slots}
    res = score_circuit(EdgeScores(method="hand", graph=g, scores=values), sorted(PLANTED_EDGES), nodes=nodes)
    assert res.n_true_nodes == len(internal & set(nodes)) == 2
    assert res.node_recall == 1.0 and res.node_precision == pytest.approx(2 / 3)


# ---- find_circuit: the curve it draws -------------------------------------------------------------------


def test_find_circuit_draws_the_curve_at_mibs_fractions():
    """Outside truth: MIB's edge fractions (Mueller et al. 2025), written out here, and int(f · 43) edges at each
    (43: the planted toy's edge count, by hand: 3 x 2 heads with q and k, one logits receiver)."""
    model, (clean, corrupted) = planted_residual(), batches(8)
    found = find_circuit(model, clean, corrupted, metric=logit_diff, better="higher", metric_name="logit_diff",
                         differentiable=True, method="eap", n_random=0)  # fmt: skip
    mib = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
    assert found.faithfulness.fractions == mib
    assert found.faithfulness.edge_counts == (0, 0, 0, 0, 0, 2, 4, 8, 21, 43)


# ---- the language wing's comparison with hand-found edges -----------------------------------------------


def test_compare_edges_ranks_tied_scores_as_scipy_does():
    """Outside truth: scipy.stats.rankdata with method='min' (tied edges share the best rank: 1 + how many are
    strictly larger) of -|score| over the edges into the hand edges' slots and over every edge (the rank and the
    count in the top 5), on scores with many ties; and
    sklearn's roc_auc_score of |score| within those slots."""
    stats = pytest.importorskip("scipy.stats")
    metrics = pytest.importorskip("sklearn.metrics")
    from mechscope.core.graphs import transformer_graph
    from mechscope.lm.methods.discovery import compare_edges

    g = transformer_graph(2, 2)
    values = np.random.default_rng(7).integers(-3, 4, size=g.n_edges).astype(float)  # 7 values: ties everywhere
    slot = np.array([e[2] for e in g.edges])
    k_edges = np.flatnonzero(slot == "k")
    hand = [int(k_edges[1]), int(k_edges[4]), int(k_edges[6])]
    c = compare_edges(EdgeScores(method="hand", graph=g, scores=values), [g.edges[e] for e in hand], 5)
    in_slot = np.flatnonzero(slot == "k")
    ranks = stats.rankdata(-np.abs(values[in_slot]), method="min")
    want = [int(ranks[list(in_slot).index(e)]) for e in hand]
    assert [row["rank_in_slot"] for row in c["edges"]] == want
    overall = stats.rankdata(-np.abs(values), method="min")  # among every edge: the same rule, not graph order
    assert [row["rank"] for row in c["edges"]] == [int(overall[e]) for e in hand]
    assert c["in_top"] == sum(int(overall[e]) <= 5 for e in hand)
    assert len(set(np.abs(values[in_slot]).tolist())) < len(in_slot)  # not vacuous: the slot has ties
    labels = np.isin(in_slot, hand)
    assert c["auroc_in_slot"] == pytest.approx(metrics.roc_auc_score(labels, np.abs(values[in_slot])), abs=1e-12)


def test_discover_on_tracr_hist_draws_the_compiled_circuit_and_counts_it_per_edge_set():
    """Outside truth: tracr's compiled ``hist`` (shared/data/tracr; its circuit.json read here with json): the
    default cut has as many edges as the primary set and EAP-IG's top edges are exactly that set (the compiler
    chose every weight), and the drawn circuit's hits in each edge set are counted by a plain loop. A hand edge
    from the primary set is compared within the top ``len(primary)`` edges, where it sits."""
    import json

    from mechscope.lm.methods.discovery import discover
    from mechscope.lm.methods.tasks import make_task
    from mechscope.lm.models.convert.tracr import check_circuit
    from mechscope.lm.models.loading import load_model
    from tests.unit.test_tracr import tracr_root

    folder = tracr_root() / "hist"
    raw = json.loads((folder / "circuit.json").read_text())["edge_sets"]
    sets = {k: {tuple(e) for e in v} for k, v in raw.items() if k != "note"}
    model = load_model(folder, device="cpu")[0]
    known = check_circuit(model.tracr.directory, model.cfg)
    hand = sorted(sets["primary"])[:1]
    res = discover(model, make_task(model), "eap-ig", known=known, curve=False, hand_edges=hand)
    drawn = set(res.circuit.edges)
    assert drawn == sets["primary"] and len(sets["all"]) > len(sets["primary"])
    for name, true in sets.items():
        hits = sum(1 for e in drawn if e in true)
        want = {"edges": len(drawn), "true": hits, "n_true_edges": len(true), "precision": hits / len(drawn),
                "recall": hits / len(true)}  # fmt: skip
        assert res.drawn_vs_truth[name] == pytest.approx(want)
        assert res.ground_truth[name].n_true_edges == len(true)
    assert (res.comparison["top"], res.comparison["in_top"]) == (len(sets["primary"]), 1)
