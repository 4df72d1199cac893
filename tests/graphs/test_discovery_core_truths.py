"""The shared circuit-discovery core against outside truths: every number recomputed by a plain forward of the
toys written out here (each receiver's input the sum of what its edges carry), not through the core's patched
forward, weights or gradients. Edge patching is that forward with one edge's sender value swapped; EAP is the
directional derivative of the metric along ``corrupted - clean`` on one edge (central finite differences); EAP-IG
is the same averaged over the points ``alpha = k/steps``, k = 1..steps, written as a loop; ACDC is Conmy et al.
2023's greedy pass written as a loop in the documented order; the faithfulness curve is each circuit patched by
hand; scores against tracr's compiled ground truth are counted by plain loops."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from mechscope.core.graphs import (
    EdgeScores,
    acdc,
    circuit_faithfulness,
    cut_circuit,
    eap,
    eap_ig,
    edge_patching,
    faithfulness_curve,
    load_circuit,
    residual_edge_attribution,
    score_circuit,
)
from tests.graphs.test_ground_truth import tracr_root
from tests.graphs.toys import (
    ResidualToy,
    _head,
    batches,
    logit_diff,
    planted_residual,
    redundant_or,
    small_contributions,
)

EPS = 1e-6


class FastToy(ResidualToy):
    """The same toy declaring a residual stream: the core mixes through its buffer and uses
    :func:`residual_edge_attribution`."""

    residual_stream = True

    def edge_attribution(self, values, grads):
        return residual_edge_attribution(self.graph, values, grads)


def wide_toy(fast: bool, seed: int = 4):
    """2 layers x 5 heads (11 senders: more than the 8 the core sums one by one), random weights, tanh."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64) * 0.6  # noqa: E731
    d = 6
    heads = [[{"Wq": r(d, 2), "Wk": r(d, 2), "Wo": r(2, d)} for _ in range(5)] for _ in range(2)]
    return (FastToy if fast else ResidualToy)(r(3, d), heads, r(d, 2), "tanh")


def wide_batches(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(8, 3, generator=g, dtype=torch.float64) for _ in range(2))


# ---- the plain forward -------------------------------------------------------------------------


def plain(model, x, carry=None):
    """(output, {sender: output}) of the toy, each receiver's input the sum over its edges of
    ``carry(edge, sender output)`` (default: the sender's own output)."""
    carry = carry or (lambda e, v: v)
    sent = {"embed": x @ model.W_E}
    for L, layer in enumerate(model.heads):
        outs = {}
        for h, p in enumerate(layer):
            name = f"blocks.{L}.h{h}"
            q, k = (sum(carry((s, name, slot), v) for s, v in sent.items()) for slot in ("q", "k"))
            outs[name] = model.act(q @ p["Wq"] + k @ p["Wk"]) @ p["Wo"]
        sent |= outs
    return sum(carry((s, "logits", "in"), v) for s, v in sent.items()) @ model.W_U, sent


def m_removed(model, clean, source, removed, metric=logit_diff) -> float:
    """The metric on ``clean`` with the edges ``removed`` carrying ``source``'s sender values."""
    return float(metric(plain(model, clean, lambda e, v: source[e[0]] if e in removed else v)[0]))


def directional(model, x, edge, d, metric=logit_diff) -> float:
    """d/dt M at t = 0 when ``edge`` carries its sender's output ``+ t * d`` (central difference)."""
    ms = [float(metric(plain(model, x, lambda e, v, s=s: v + (s * EPS * d if e == edge else 0))[0]))
          for s in (1, -1)]  # fmt: skip
    return (ms[0] - ms[1]) / (2 * EPS)


def _toy(name):
    return (planted_residual("tanh"), *batches(8)) if name == "planted" else (wide_toy(name == "fast"), *wide_batches())


# ---- attribution ---------------------------------------------------------------------------------


@pytest.mark.parametrize("toy", ["planted", "slow", "fast"])
def test_edge_patching_is_one_edge_swapped_in_a_plain_forward(toy):
    """Outside truth: the plain forward with that edge alone carrying the corrupted sender output, minus clean."""
    model, clean, corrupted = _toy(toy)
    _, corr = plain(model, corrupted)
    m0 = m_removed(model, clean, corr, set())
    want = [m_removed(model, clean, corr, {e}) - m0 for e in model.graph.edges]
    got = edge_patching(model, clean, corrupted, metric=logit_diff).scores
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("ablation", ["mean", "zero"])
def test_mean_and_zero_ablation_carry_the_corrupted_batch_mean_or_zero(ablation):
    """Outside truth: the plain forward with the edge carrying the corrupted run's batch mean (or 0)."""
    model, clean, corrupted = _toy("fast")
    _, corr = plain(model, corrupted)
    corr = {s: (v.mean(0, keepdim=True) if ablation == "mean" else 0 * v[:1]) for s, v in corr.items()}
    m0 = m_removed(model, clean, corr, set())
    want = [m_removed(model, clean, corr, {e}) - m0 for e in model.graph.edges]
    got = edge_patching(model, clean, corrupted, metric=logit_diff, ablation=ablation).scores
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("toy", ["planted", "fast"])
def test_eap_is_the_directional_derivative_along_the_senders_difference(toy):
    """Outside truth: EAP(s->r) = (out'_s - out_s) . dM/d in_r, by central finite differences on the plain forward."""
    model, clean, corrupted = _toy(toy)
    _, cl = plain(model, clean)
    _, corr = plain(model, corrupted)
    want = [directional(model, clean, e, corr[e[0]] - cl[e[0]]) for e in model.graph.edges]
    got = eap(model, clean, corrupted, metric=logit_diff).scores
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize(("toy", "steps"), [("planted", 3), ("fast", 4)])
def test_eap_ig_is_the_right_riemann_sum_of_directional_derivatives(toy, steps):
    """Outside truth: Hanna et al. 2024's sum, (1/steps) sum_k over alpha = k/steps (k = 1..steps) of the
    derivative along ``corrupted - clean`` at the input ``corrupted + alpha (clean - corrupted)``, as a loop."""
    model, clean, corrupted = _toy(toy)
    _, cl = plain(model, clean)
    _, corr = plain(model, corrupted)
    want = np.zeros(model.graph.n_edges)
    for k in range(1, steps + 1):
        x = corrupted + k / steps * (clean - corrupted)
        for i, e in enumerate(model.graph.edges):
            want[i] += directional(model, x, e, corr[e[0]] - cl[e[0]]) / steps
    got = eap_ig(model, clean, corrupted, metric=logit_diff, steps=steps).scores
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-8)


# ---- ACDC ----------------------------------------------------------------------------------------


def harm(delta: float, better) -> float:
    return abs(delta) if better is None else (-delta if better == "higher" else delta)


def plain_acdc(model, clean, corrupted, tau, better=None, metric=logit_diff):
    """Conmy et al. 2023's pass: nodes from the output back (later layer first, then higher index), each node's
    incoming edges later sender first then by slot; an edge goes when its removal harms the current circuit by
    less than tau. A node with no surviving outgoing edge loses its incoming edges untried."""
    g = model.graph
    _, corr = plain(model, corrupted)
    removed, scores = set(), {}
    m_cur = m_removed(model, clean, corr, removed, metric)
    pos = {n.name: (n.layer, n.index) for n in g.nodes}
    for node in sorted(g.nodes, key=lambda n: (n.layer, n.index), reverse=True):
        incoming = sorted((e for e in g.edges if e[1] == node.name),
                          key=lambda e: (tuple(-p for p in pos[e[0]]), node.slots.index(e[2])))  # fmt: skip
        if node.sends and all(e in removed for e in g.edges if e[0] == node.name):
            removed |= set(incoming)
            continue
        for e in incoming:
            m = m_removed(model, clean, corr, removed | {e}, metric)
            scores[e] = m - m_cur
            if harm(m - m_cur, better) < tau:
                removed.add(e)
                m_cur = m
    return set(g.edges) - removed, scores, m_cur


def slot_toy():
    """One head reading x0 through both q and k into a saturating tanh: either slot alone carries it."""
    W_E = torch.eye(2, 4, dtype=torch.float64)
    W_U = torch.zeros(4, 1, dtype=torch.float64)
    W_U[2, 0] = 1.0
    model = ResidualToy(W_E, [[_head(4, q=[(0, 3.0)], k=[(0, 3.0)], o=[(2, 1.0)])]], W_U, "tanh")
    clean = torch.tensor([[3.0, 0.0]] * 2, dtype=torch.float64)
    return model, clean, torch.zeros_like(clean), lambda out: out[:, 0].mean()


def _acdc_cases():
    yield "redundant", *redundant_or(), 0.01, None
    yield "slots", *slot_toy(), 0.01, None
    for better in (None, "higher", "lower"):  # removals cost exactly 0.25 = tau: '<' keeps them (but 'lower')
        yield f"boundary-{better}", *small_contributions(5, 0.25), 0.25, better
    yield "planted", planted_residual("tanh"), *batches(8), logit_diff, 0.05, None
    yield "planted-lower", planted_residual("tanh"), *batches(8), logit_diff, 0.01, "lower"


@pytest.mark.parametrize("case", list(_acdc_cases()), ids=lambda c: c[0])
def test_acdc_is_the_papers_greedy_pass_written_as_a_loop(case):
    """Outside truth: :func:`plain_acdc` (kept edges, every tried edge's dM against the circuit so far, and the
    final circuit's metric)."""
    _, model, clean, corrupted, metric, tau, better = case
    kept, scores, m_cur = plain_acdc(model, clean, corrupted, tau, better, metric)
    res = acdc(model, clean, corrupted, metric=metric, threshold=tau, better=better)
    g = model.graph
    assert {g.edges[e] for e in res.kept} == kept
    want = [scores.get(e, 0.0) for e in g.edges]
    np.testing.assert_allclose(res.scores, want, rtol=1e-9, atol=1e-12)
    assert res.settings["metric_circuit"] == pytest.approx(m_cur, abs=1e-12)
    assert res.settings["edges_tried"] == len(scores)


def test_acdc_threshold_boundary_and_slot_order_are_what_the_loop_predicts():
    """The cases above are not vacuous: at tau = 0.25 the 0.25-removals stay (strict '<'), and of the slot toy's
    two redundant slots q is tried first and goes, k stays."""
    model, clean, corrupted, metric = small_contributions(5, 0.25)
    kept = acdc(model, clean, corrupted, metric=metric, threshold=0.25).kept
    assert sum(model.graph.edges[e] == (f"blocks.0.h{h}", "logits", "in") for e in kept for h in range(5)) == 5
    model, clean, corrupted, metric = slot_toy()
    kept = {model.graph.edges[e] for e in acdc(model, clean, corrupted, metric=metric, threshold=0.01).kept}
    assert ("embed", "blocks.0.h0", "k") in kept and ("embed", "blocks.0.h0", "q") not in kept


# ---- faithfulness --------------------------------------------------------------------------------


@pytest.mark.parametrize(("toy", "better"), [("planted", "higher"), ("planted", "lower"), ("planted", None),
                                             ("fast", "higher")])  # fmt: skip
def test_faithfulness_curve_points_and_areas_by_hand(toy, better):
    """Outside truth: each top-k circuit (k = int(f * n), ranked by how much an edge helps, or |score|) patched
    by hand, normalised by the full model and the empty circuit, and the trapezoid areas as a loop (on the fast
    toy, many removed edges into one receiver go through the core's buffer of sender values)."""
    model, clean, corrupted = _toy(toy)
    g, n = model.graph, model.graph.n_edges
    values = np.random.default_rng(5).normal(size=n)
    scores = EdgeScores(method="hand", graph=g, scores=values, better=better)
    fr = (0.1, 0.25, 0.5, 0.8, 1.0)
    curve = faithfulness_curve(model, scores, clean, corrupted, metric=logit_diff, fractions=fr, n_random=0)
    _, corr = plain(model, corrupted)
    full, empty = m_removed(model, clean, corr, set()), m_removed(model, clean, corr, set(g.edges))
    helps = {"higher": lambda e: -values[e], "lower": lambda e: values[e], None: lambda e: abs(values[e])}[better]
    counts = [int(f * n) for f in fr]

    def f_of(key):
        order = sorted(range(n), key=lambda e: -key(e))
        ms = [m_removed(model, clean, corr, {g.edges[e] for e in order[k:]}) for k in counts]
        return ms, [(m - empty) / (full - empty) for m in ms]

    ms, f = f_of(helps)
    _, f_abs = f_of(lambda e: abs(values[e]))
    trap = lambda y: sum((fr[i + 1] - fr[i]) * (y[i] + y[i + 1]) / 2 for i in range(len(fr) - 1))  # noqa: E731
    assert curve.edge_counts == tuple(counts) and counts[-1] == n and (n != 43 or counts == [4, 10, 21, 34, 43])
    assert (curve.metric_full, curve.metric_empty) == (pytest.approx(full, abs=1e-12), pytest.approx(empty, abs=1e-12))
    assert curve.metric_values == pytest.approx(ms, abs=1e-12) and curve.faithfulness == pytest.approx(f, abs=1e-12)
    assert curve.faithfulness_absolute == pytest.approx(f_abs, abs=1e-12)
    assert curve.cpr == pytest.approx(trap(f), abs=1e-12)
    assert curve.cmd == pytest.approx(trap([abs(1 - v) for v in f_abs]), abs=1e-12)
    top = sorted(range(n), key=lambda e: -helps(e))[: counts[1]]
    one = circuit_faithfulness(model, top, clean, corrupted, metric=logit_diff, curve=curve)
    assert one["faithfulness"] == pytest.approx(f[1], abs=1e-12) and one["edges"] == len(top)


# ---- cuts and scores -----------------------------------------------------------------------------


def test_a_threshold_cut_keeps_the_edges_whose_score_reaches_it():
    """Outside truth: cut_circuit's documented rule, |score| reaching the threshold (>=), counted by hand."""
    g = planted_residual().graph
    values = np.zeros(g.n_edges)
    values[[3, 7, 11]] = [0.5, -0.5, 0.25]
    cut = cut_circuit(EdgeScores(method="eap", graph=g, scores=values), "eap", None, 0.5)
    assert set(cut.edges) == {g.edges[3], g.edges[7]}


def test_acdc_circuit_of_a_size_is_the_largest_kept_by_score():
    """Outside truth: of ACDC's kept edges, the top ``size`` by |score| (a stable sort written by hand)."""
    model, clean, corrupted = _toy("planted")
    res = acdc(model, clean, corrupted, metric=logit_diff, threshold=0.05)
    assert len(res.kept) == 5
    top = sorted(res.kept, key=lambda e: -abs(res.scores[e]))[:3]
    assert res.circuit(3).edges == tuple(model.graph.edges[e] for e in top)


def _auroc(keys, positive) -> float:
    pairs = [(a, b) for a, b in itertools.product(range(len(keys)), repeat=2) if positive[a] and not positive[b]]
    return sum(1.0 if keys[a] > keys[b] else 0.5 if keys[a] == keys[b] else 0.0 for a, b in pairs) / len(pairs)


def _by_hand(g, key, truth, true_nodes, level):
    """(precision, recall, AUROC) of candidates and (precision, recall, AUROC, recall at size) of nodes."""
    names = list(g.edges) if level == "edge" else sorted({e[:2] for e in g.edges}, key=[e[:2] for e in g.edges].index)
    ckey = [max(key[i] for i, e in enumerate(g.edges) if (e if level == "edge" else e[:2]) == c) for c in names]
    pos = [c in truth for c in names]
    top = sorted(range(len(names)), key=lambda i: -ckey[i])[: len(truth)]
    hits = sum(pos[i] for i in top)
    internal = [i for i in range(len(g.nodes)) if g.nodes[i].sends and g.nodes[i].slots]
    found = {g.node_id(x) for i in top for x in names[i][:2]} & set(internal)
    nkey = [max(key[i] for i, e in enumerate(g.edges) if g.nodes[n].name in e[:2]) for n in internal]
    npos = [g.nodes[n].name in true_nodes for n in internal]
    ntop = sorted(range(len(internal)), key=lambda i: -nkey[i])[: sum(npos)]
    n_hits = len({g.nodes[i].name for i in found} & set(true_nodes))
    edge = (hits / len(truth), hits / len(truth), _auroc(ckey, pos))
    return edge, (n_hits / len(found), n_hits / sum(npos), _auroc(nkey, npos), sum(npos[i] for i in ntop) / sum(npos))


@pytest.mark.parametrize("level", ["edge", "pair"])
@pytest.mark.parametrize("name", ["reverse", "frac_prevs"])
def test_scores_against_tracr_ground_truth_counted_by_plain_loops(name, level):
    """Outside truth: tracr's compiled circuits (shared/data/tracr), scored by hand: top-|truth| candidates by key
    (a pair's key the best of its slots), AUROC as the share of (true, false) pairs ordered right (ties 1/2), a
    node's key the largest |score| of its edges, over the internal nodes."""
    root = tracr_root()
    if root is None:
        pytest.skip("tracr circuit.json files not found in $MECHSCOPE_DATA or ../shared/data")
    known = load_circuit(root / name)
    g = known.graph()
    values = np.random.default_rng(11).normal(size=g.n_edges)
    truth = {tuple(e) if level == "edge" else tuple(e)[:2] for e in known.edge_set("primary")}
    edge, node = _by_hand(g, np.abs(values).tolist(), truth, set(known.nodes), level)
    res = score_circuit(EdgeScores(method="hand", graph=g, scores=values), known, level=level)
    assert (res.edge_precision, res.edge_recall, res.edge_auroc) == pytest.approx(edge, abs=1e-12)
    assert (res.node_precision, res.node_recall, res.node_auroc, res.node_recall_at_size) == pytest.approx(node)
    assert res.n_true_edges == len(truth) and res.size == len(truth)


def test_the_records_top_edges_are_the_largest_by_magnitude():
    """Outside truth: the 20 largest |score| edges, sorted by hand, with their signed scores (a negative score is
    as strong as a positive one of the same size)."""
    g = planted_residual().graph
    values = np.random.default_rng(2).normal(size=g.n_edges)
    top = sorted(range(g.n_edges), key=lambda e: -abs(values[e]))[:20]
    got = EdgeScores(method="eap", graph=g, scores=values).to_dict()["top_edges"]
    assert got == [[g.edge_name(e), float(values[e])] for e in top] and min(values[top]) < 0
