"""The circuit-discovery graph core, second pass, against outside truths: tracr-style circuit.json files read with
json directly, transformer graphs enumerated by plain loops from the block formulas (sequential, parallel
GPT-NeoX blocks, grouped-query attention), rankings and cuts recomputed with Python's stable ``sorted``, and
scores against a true circuit counted by the plain loops of :mod:`tests.graphs.test_discovery_core_truths`."""

from __future__ import annotations

import itertools
import json
import math
from fractions import Fraction
from types import SimpleNamespace

import numpy as np
import pytest

from mechscope.core.errors import MechscopeError
from mechscope.core.graphs import (
    ComponentGraph,
    EdgeScores,
    Node,
    TopEdges,
    cut_circuit,
    drawn_against_truth,
    eap_ig,
    edge_patching,
    load_circuit,
    score_circuit,
    transformer_graph,
)
from mechscope.core.graphs.results import fraction_count, parse_size
from tests.graphs.test_discovery_core_truths import _by_hand, plain
from tests.graphs.test_ground_truth import _minimal, _write
from tests.graphs.toys import batches, logit_diff, planted_residual
from tests.unit.test_tracr import tracr_root


def _rng_scores(g, seed: int, better=None, ties: bool = False) -> EdgeScores:
    rng = np.random.default_rng(seed)
    values = rng.integers(-2, 3, size=g.n_edges).astype(float) if ties else rng.normal(size=g.n_edges)
    return EdgeScores(method="hand", graph=g, scores=values, better=better)


def _plain_order(values, key=abs) -> list[int]:
    """Edge indices by decreasing ``key(score)``, ties in graph order (Python's sort is stable)."""
    return sorted(range(len(values)), key=lambda e: -key(values[e]))


# ---- circuit.json ---------------------------------------------------------------------------------------------


def test_a_circuit_file_without_pos_embed_builds_a_graph_without_it(tmp_path):
    """Outside truth: the file read with json; an embed-only 1-block model has embed -> q, k, v, in, out (5), the
    head -> in, out (2) and the MLP -> out (1): 8 edges, and the circuit components in the file's own order."""
    data = _minimal()
    data["all_components"].remove("pos_embed")
    data["circuit_components"] = ["blocks.0.mlp", "blocks.0.attn.h0"]
    path = _write(tmp_path, data)
    known = load_circuit(path)
    raw = json.loads(path.read_text())
    assert known.pos_embed is False and known.nodes == tuple(raw["circuit_components"])
    g = known.graph()
    assert [n.name for n in g.nodes] == raw["all_components"] and g.n_edges == 8


# ---- transformer graphs ---------------------------------------------------------------------------------------


def _block_edges(n_layers: int, n_heads: int, parallel: bool) -> set:
    """Every edge by the block formulas: x += attn(x) then x += mlp(x) (sequential), or x += attn(x) + mlp(x)
    (parallel: the MLP reads the block's input); each reader reads every writer before it."""
    written, edges = ["embed", "pos_embed"], set()
    for L in range(n_layers):
        heads = [f"blocks.{L}.attn.h{h}" for h in range(n_heads)]
        edges |= {(s, h, slot) for s in written for h in heads for slot in "qkv"}
        mlp_reads = written if parallel else written + heads
        edges |= {(s, f"blocks.{L}.mlp", "in") for s in mlp_reads}
        written = written + heads + [f"blocks.{L}.mlp"]
    return edges | {(s, "unembed", "out") for s in written}


@pytest.mark.parametrize("parallel", [False, True])
def test_transformer_graph_edges_are_the_block_formulas(parallel):
    """Outside truth: the residual stream written out as a loop (GPT-NeoX's parallel block reads its input into
    both the heads and the MLP); drawing columns per the docstring (embeddings 0, heads 2L+1, the MLP 2L+2 or
    its heads' column when parallel, unembed 2n+1), and no two nodes on one drawing spot."""
    g = transformer_graph(2, 2, parallel=parallel)
    assert set(g.edges) == _block_edges(2, 2, parallel) and len(g.edges) == len(set(g.edges))
    col = {n.name: n.layer for n in g.nodes}
    assert col["unembed"] == 5 and col["blocks.1.attn.h1"] == 3 and col["blocks.1.mlp"] == (3 if parallel else 4)
    spots = [(n.layer, n.index) for n in g.nodes]
    assert len(set(spots)) == len(spots)


def test_grouped_query_heads_depend_on_their_groups_shared_key_and_value():
    """Outside truth: with 4 query heads sharing 2 key/value heads, query head h uses key/value head h // 2, whose
    receivers belong to the group's first head (2 * (h // 2)); its inputs are its own q and those k, v."""
    g = transformer_graph(1, 4, n_kv_heads=2, mlp=False, pos_embed=False)
    for h in range(4):
        lead = 2 * (h // 2)
        node = g.node_id(f"blocks.0.attn.h{h}")
        want = {f"blocks.0.attn.h{h}<q>", f"blocks.0.attn.h{lead}<k>", f"blocks.0.attn.h{lead}<v>"}
        assert {g.receiver_name(r) for r in g.inputs_of(node)} == want
        into = {g.edges[e] for e in g.edges_into_inputs(node)}
        assert into == {("embed", name.split("<")[0], name[-2]) for name in want}


# ---- rankings and circuits ------------------------------------------------------------------------------------


def test_ties_keep_the_graphs_order_and_a_full_size_circuit_is_every_edge():
    """Outside truth: Python's stable sort by -|score| on scores of five values (many ties across 43 edges)."""
    s = _rng_scores(planted_residual().graph, 3, ties=True)
    n = s.graph.n_edges
    assert s.order().tolist() == _plain_order(s.scores)
    assert [t[2] for t in s.table()] == [float(s.scores[e]) for e in _plain_order(s.scores)]
    assert set(s.circuit(n).edges) == set(s.graph.edges) == set(s.circuit(1.0).edges)


def test_signed_ranking_puts_the_most_helpful_edges_first_in_table_and_circuit():
    """Outside truth: with ``better='higher'`` an edge helps by how much its removal lowers the metric, so the most
    negative scores come first; the circuit keeps signed scores and records the ranking it was cut by."""
    g = planted_residual().graph
    s = _rng_scores(g, 9, better="higher")  # the top 4 by |score| hold two positive ones
    top = _plain_order(s.scores, key=lambda v: -v)[:4]
    assert s.table(4, ranking="signed") == [(g.edges[e][0], f"{g.edges[e][1]}<{g.edges[e][2]}>", s.scores[e])
                                            for e in top]  # fmt: skip
    c = s.circuit(4, ranking="signed")
    assert c.edges == tuple(g.edges[e] for e in top) and c.scores == tuple(s.scores[top])
    assert c.ranking == "signed" and max(c.scores) < 0


def test_a_kept_circuit_is_in_graph_order_and_a_size_may_take_every_kept_edge():
    """Outside truth: ACDC's kept edges (given out of order) listed in the graph's order; of them the top 3 by
    |score| (a plain sort) are all three, so a size of 3 is every kept edge, not an added pruned one."""
    g = planted_residual().graph
    values = np.zeros(g.n_edges)
    values[[9, 2, 5, 20]] = [0.3, -0.9, 0.6, 5.0]  # edge 20 scores most but was pruned
    s = EdgeScores(method="acdc", graph=g, scores=values, kept=(9, 2, 5))
    assert s.circuit().edges == (g.edges[2], g.edges[5], g.edges[9])
    assert s.circuit(3).edges == (g.edges[2], g.edges[5], g.edges[9]) and s.circuit(3).scores == (-0.9, 0.6, 0.3)


def test_circuit_nodes_follow_the_dependencies_not_the_listing():
    """Outside truth: a hand-built graph listed output first; its circuit's nodes in dependency order."""
    nodes = (Node("out", "output", 2, 0, ("in",), sends=False), Node("mid", layer=1, slots=("in",)), Node("inp"))
    g = ComponentGraph(nodes, (("inp", "mid", "in"), ("mid", "out", "in"), ("inp", "out", "in")))
    c = EdgeScores(method="hand", graph=g, scores=[1.0, 3.0, 2.0]).circuit(3)
    assert c.nodes == ("inp", "mid", "out") and c.edges == (g.edges[1], g.edges[2], g.edges[0])


def test_a_wing_records_top_thirty_edges_with_signed_scores():
    """Outside truth: the 30 largest |score| edges by a plain sort, with their signed scores."""
    s = _rng_scores(planted_residual().graph, 5)
    want = [[s.graph.edge_name(e), float(s.scores[e])] for e in _plain_order(s.scores)[:30]]
    got = TopEdges.json_extras(SimpleNamespace(scores=s))["top_edges"]
    assert got == want and min(v for _, v in got) < 0


# ---- scoring against a true circuit ---------------------------------------------------------------------------


def test_given_nodes_replace_the_known_circuits_components(tmp_path):
    """Outside truth: the plain-loop scores of test_discovery_core_truths with the given true node, not the file's."""
    data = _minimal()
    data["edges"].append({"source": "blocks.0.attn.h0", "target": "blocks.0.mlp", "slot": "in"})
    known = load_circuit(_write(tmp_path, data))
    s = _rng_scores(known.graph(), 2)
    res = score_circuit(s, known, nodes=["blocks.0.mlp"])
    _, node = _by_hand(s.graph, np.abs(s.scores).tolist(), set(known.edge_set()), {"blocks.0.mlp"}, "edge")
    assert res.n_true_nodes == 1
    assert (res.node_precision, res.node_recall, res.node_auroc, res.node_recall_at_size) == pytest.approx(node)


def test_true_nodes_default_to_every_internal_node_the_true_edges_touch():
    """Outside truth: embed -> 0.h0 and 0.h0 -> 1.h0 touch the heads 0.h0 (receiver, then sender) and 1.h0
    (receiver only); embed is an input node, not a candidate."""
    s = _rng_scores(planted_residual().graph, 4)
    truth = ["embed->blocks.0.h0<q>", ("blocks.0.h0", "blocks.1.h0", "q")]
    res = score_circuit(s, truth)
    _, node = _by_hand(s.graph, np.abs(s.scores).tolist(), {s.graph.edges[s.graph.parse_edge(t)[0]] for t in truth},
                       {"blocks.0.h0", "blocks.1.h0"}, "edge")  # fmt: skip
    assert res.n_true_nodes == 2
    assert (res.node_precision, res.node_recall, res.node_auroc, res.node_recall_at_size) == pytest.approx(node)


def test_a_size_of_every_candidate_has_the_base_rate_as_precision():
    """Outside truth: taking all n candidates finds every true one, so precision = n_true / n and recall = 1."""
    s = _rng_scores(planted_residual().graph, 6, better="lower")
    truth = [("embed", "blocks.0.h0", "q"), ("blocks.0.h0", "logits", "in"), ("embed", "blocks.2.h1", "k")]
    res = score_circuit(s, truth, size=s.graph.n_edges, ranking="signed")
    assert (res.edge_precision, res.edge_recall) == (pytest.approx(3 / 43), 1.0)
    assert (res.ranking, res.level, res.size, res.n_candidates) == ("signed", "edge", 43, 43)


@pytest.mark.parametrize("seed", range(4))
def test_pair_level_node_scores_counted_by_plain_loops(seed):
    """Outside truth: the plain-loop pair scores (a pair's key the best |score| of its slots; the circuit's nodes
    those of the top |truth| pairs) on distinct random scores of the planted toy's graph."""
    from tests.graphs.toys import PLANTED_EDGES, PLANTED_NODES

    s = _rng_scores(planted_residual().graph, 20 + seed)
    truth = {e[:2] for e in PLANTED_EDGES}
    edge, node = _by_hand(s.graph, np.abs(s.scores).tolist(), truth, PLANTED_NODES, "pair")
    res = score_circuit(s, PLANTED_EDGES, level="pair")
    assert (res.edge_precision, res.edge_recall, res.edge_auroc) == pytest.approx(edge)
    assert (res.node_precision, res.node_recall, res.node_auroc) == pytest.approx(node[:3])
    assert res.node_recall_at_size == pytest.approx(_recall_under_random_ties(s, PLANTED_NODES))
    assert res.level == "pair"


def _recall_under_random_ties(s: EdgeScores, true_nodes) -> float:
    """Recall of the top |true| internal nodes by key (the largest |score| of a node's edges), averaged over every
    order of the candidates (a stable sort then breaks ties each way equally often): two nodes joined by their
    strongest edge tie."""
    g = s.graph
    cand = [i for i, n in enumerate(g.nodes) if n.sends and n.slots]
    key = {i: max(abs(s.scores[e]) for e, (a, b, _) in enumerate(g.edges) if g.nodes[i].name in (a, b)) for i in cand}
    k = len(true_nodes)
    recalls = [sum(g.nodes[i].name in true_nodes for i in sorted(p, key=lambda i: -key[i])[:k]) / k
               for p in itertools.permutations(cand)]  # fmt: skip
    return sum(recalls) / len(recalls)


# ---- cuts ----------------------------------------------------------------------------------------------------


def test_the_default_cut_is_thirty_edges_or_the_whole_small_graph():
    """Outside truth: the documented default of 30 edges (the top 30 by a plain sort); a 1-block, 1-head graph has
    only 13 edges (counted by hand in test_graph), all of which the default cut takes."""
    s = _rng_scores(planted_residual().graph, 8)
    assert cut_circuit(s, "eap", None, None).edges == tuple(s.graph.edges[e] for e in _plain_order(s.scores)[:30])
    small = _rng_scores(transformer_graph(1, 1), 9)
    assert set(cut_circuit(small, "eap", None, None).edges) == set(small.graph.edges) and small.graph.n_edges == 13


def test_a_size_wins_over_a_threshold_for_a_ranking_method():
    """Outside truth: cut_circuit's docstring (a threshold applies only without a size); a threshold of 0 alone
    keeps every edge."""
    s = _rng_scores(planted_residual().graph, 10)
    assert cut_circuit(s, "eap", 3, 0.0).edges == tuple(s.graph.edges[e] for e in _plain_order(s.scores)[:3])
    assert len(cut_circuit(s, "eap", None, 0.0)) == 43


# ---- attribution records -------------------------------------------------------------------------------------


def test_attribution_records_the_corrupted_metric_and_eap_ig_patches():
    """Outside truth: the metric of the plain forward on the corrupted batch (not the clean one); EAP-IG
    interpolates towards the corrupted run, so it patches (Hanna et al. 2024)."""
    model, (clean, corrupted) = planted_residual("tanh"), batches(8)
    want = (float(logit_diff(plain(model, clean)[0])), float(logit_diff(plain(model, corrupted)[0])))
    ep = edge_patching(model, clean, corrupted, metric=logit_diff)
    ig = eap_ig(model, clean, corrupted, metric=logit_diff, steps=2)
    assert abs(want[0] - want[1]) > 0.1
    for res in (ep, ig):
        assert (res.metric_clean, res.metric_corrupted) == (pytest.approx(want[0]), pytest.approx(want[1]))
    assert ig.settings["ablation"] == "patch" and ep.settings["ablation"] == "patch"


@pytest.mark.parametrize("text", ["0.29", "0.57", "0.58"])
def test_a_fraction_of_the_edges_is_floored_exactly(text):
    """Outside truth: exact rational arithmetic, floor(Fraction(text) * 100) (29, 57 and 58 of 100 edges)."""
    nodes = [Node("a", "input")] + [Node(f"o{i}", "output", 1, i, ("in",), sends=False) for i in range(100)]
    s = EdgeScores(method="hand", graph=ComponentGraph.dense(nodes), scores=np.arange(100.0))
    assert len(s.circuit(parse_size(text))) == math.floor(Fraction(text) * 100)


@pytest.mark.parametrize("f, n, want", [(0.29, 100, 29), (0.58, 100, 58), (5 / 11, 11, 5), (0.5, 3, 1)])
def test_the_faithfulness_curve_counts_edges_as_the_circuit_does(f, n, want):
    """Outside truth: floor of the exact product by hand (0.29 of 100 is 29, 5/11 of 11 is 5, half of 3 is 1); the
    faithfulness curve's edge counts and ``circuit(size)`` share this one rule."""
    assert fraction_count(f, n) == want


@pytest.mark.parametrize("name, want", [("reverse-3", "reverse-3"), (None, "fold"), ("", "fold")])
def test_a_circuit_without_a_name_is_named_by_its_folder(tmp_path, name, want):
    """Outside truth: the folder the file lies in (``fold``), when "name" is null or empty as when it is absent; a
    null was read as the name "None"."""
    (tmp_path / "fold").mkdir()
    path = _write(tmp_path / "fold", {**_minimal(), "name": name})
    assert load_circuit(path).name == want


def test_a_circuit_name_that_is_not_text_is_refused(tmp_path):
    """Outside truth: circuit.json's "name" is a string (the tracr files' own); a number is named as the wrong type."""
    with pytest.raises(MechscopeError, match="'name' must be a str, got int"):
        load_circuit(_write(tmp_path, {**_minimal(), "name": 3}))


def test_a_drawn_circuit_is_not_scored_against_a_smaller_models_truth():
    """Outside truth: hist's circuit.json (1 block, 1 head) is of another model than reverse's (4 blocks), as
    score_circuit already says; every name of hist's resolves in reverse's graph, so without the check the drawn
    circuit was scored against it without a word."""
    root = tracr_root()
    if root is None:
        pytest.skip("tracr circuit.json files not found in $MECHSCOPE_DATA or ../shared/data")
    hist, reverse = load_circuit(root / "hist"), load_circuit(root / "reverse")
    scores = EdgeScores(method="eap", graph=reverse.graph(), scores=np.arange(reverse.graph().n_edges, dtype=float))
    with pytest.raises(MechscopeError, match="the known circuit 'hist' is of another model"):
        drawn_against_truth(scores, scores.circuit(5), hist)
    assert drawn_against_truth(scores, scores.circuit(5), reverse)["edges"] == 5
