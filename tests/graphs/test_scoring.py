"""Precision, recall and AUROC against a known circuit; AUROC checked against scikit-learn with ties."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from mechscope.core.errors import MechscopeError
from mechscope.core.graphs import CircuitScore, EdgeScores, auroc, score_circuit
from mechscope.core.graphs.scoring import drawn_against_truth, expected_hits
from tests.graphs.toys import PLANTED_EDGES, PLANTED_NODES, planted_residual


@pytest.mark.parametrize("seed", range(6))
def test_auroc_matches_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 200))
    scores = rng.integers(0, 4, size=n).astype(float)  # few values: many ties
    labels = rng.random(n) < 0.3
    labels[:2] = [True, False]
    assert auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    cont = rng.normal(size=n)
    assert auroc(cont, labels) == pytest.approx(roc_auc_score(labels, cont), abs=1e-12)


def test_auroc_edge_cases():
    assert auroc([1.0, 1.0, 1.0], [True, False, False]) == 0.5
    assert np.isnan(auroc([1.0, 2.0], [True, True]))
    with pytest.raises(MechscopeError, match="NaN"):
        auroc([np.nan, 1.0], [True, False])
    with pytest.raises(MechscopeError, match="labels"):
        auroc([1.0, 2.0], [True])


def test_expected_hits_shares_ties():
    key = np.array([3.0, 2.0, 2.0, 2.0, 1.0])
    pos = np.array([False, True, False, False, True])
    assert expected_hits(key, pos, 2) == pytest.approx(1 / 3)
    assert expected_hits(key, pos, 4) == pytest.approx(1.0)
    assert expected_hits(key, pos, 0) == 0.0


def _scores(values: dict, better=None) -> EdgeScores:
    g = planted_residual().graph
    s = np.zeros(g.n_edges)
    for edge, v in values.items():
        s[g.edge_id(*edge)] = v
    return EdgeScores(method="hand", graph=g, scores=s, better=better)


def test_perfect_and_partial_scores():
    perfect = score_circuit(_scores(dict.fromkeys(PLANTED_EDGES, 1.0)), PLANTED_EDGES)
    assert (perfect.edge_precision, perfect.edge_recall, perfect.edge_auroc) == (1.0, 1.0, 1.0)
    assert (perfect.node_precision, perfect.node_recall, perfect.node_recall_at_size) == (1.0, 1.0, 1.0)
    assert perfect.n_true_nodes == 3 and perfect.n_node_candidates == 6
    wrong = ("embed", "blocks.1.h1", "q")
    values = dict.fromkeys(sorted(PLANTED_EDGES)[:5], -2.0) | {wrong: 3.0}
    partial = score_circuit(_scores(values), PLANTED_EDGES, size=6)
    assert partial.edge_precision == pytest.approx(5 / 6) and partial.edge_recall == pytest.approx(5 / 7)
    assert partial.node_precision == pytest.approx(len(_touched(values) & PLANTED_NODES) / len(_touched(values)))
    signed = score_circuit(_scores(values, better="lower"), PLANTED_EDGES, ranking="signed", size=1)
    assert signed.edge_precision == 0.0  # "lower" is better: the +3 edge hurts most and ranks first
    pairs = score_circuit(_scores(values), PLANTED_EDGES, level="pair")
    assert pairs.n_true_edges == 6 and pairs.n_candidates == 25  # 7 + 2·5 + 2·3 + 2 (sender, node) pairs
    back = CircuitScore.from_dict(json.loads(json.dumps(perfect.to_dict())))
    assert back == perfect


def test_node_scores_and_the_drawn_circuit_by_hand():
    """Node AUROC, node recall at size, node precision/recall and the drawn circuit's precision/recall, worked by
    hand on distinct scores (only the perfect case checked them: recall over every candidate, swapped precision and
    recall, an AUROC of 1 passed). A node's key is the largest |score| of its edges: 0.h0 5, 1.h0 4, 1.h1 3,
    2.h0 2, 0.h1 1, 2.h1 0; the h0s are the true nodes."""
    values = {("embed", "blocks.0.h0", "q"): 5.0, ("blocks.0.h0", "blocks.1.h0", "q"): -4.0,
              ("embed", "blocks.1.h1", "q"): 3.0, ("blocks.1.h0", "blocks.2.h0", "q"): 2.0,
              ("embed", "blocks.0.h1", "k"): 1.0}  # fmt: skip
    scores = _scores(values)
    res = score_circuit(scores, PLANTED_EDGES, size=3)
    # top 3 edges: 5, 4 (true) and 3 (false); they touch 0.h0, 1.h0 (true) and 1.h1
    assert (res.edge_precision, res.edge_recall) == (pytest.approx(2 / 3), pytest.approx(2 / 7))
    assert (res.node_precision, res.node_recall) == (pytest.approx(2 / 3), pytest.approx(2 / 3))
    # true nodes 5, 4, 2 against false 3, 1, 0: 8 of the 9 pairs ordered right; the top 3 nodes hold 2 true ones
    assert res.node_auroc == pytest.approx(8 / 9) and res.node_recall_at_size == pytest.approx(2 / 3)
    keys, truth = [5, 1, 4, 3, 2, 0], [True, False, True, False, True, False]  # 0.h0, 0.h1, 1.h0, 1.h1, 2.h0, 2.h1
    assert res.node_auroc == pytest.approx(roc_auc_score(truth, keys))
    g = scores.graph
    is_true = [e in PLANTED_EDGES for e in g.edges]
    assert res.edge_auroc == pytest.approx(roc_auc_score(is_true, np.abs(scores.scores)))
    drawn = drawn_against_truth(scores, scores.circuit(4), PLANTED_EDGES)  # 5, 4, 3, 2: three true of four
    assert drawn == {"edges": 4, "true": 3, "n_true_edges": 7, "precision": 0.75, "recall": pytest.approx(3 / 7)}


def _touched(values) -> set:
    g = planted_residual().graph
    internal = {g.nodes[i].name for i in g.internal_nodes()}
    return {n for s, t, _ in values for n in (s, t)} & internal


@pytest.mark.parametrize(
    ("truth", "kwargs", "match"),
    [
        ([("embed", "blocks.9.h0", "q")], {}, "unknown component"),
        ([("blocks.2.h0", "blocks.0.h0", "q")], {}, "no edge"),
        ([], {}, "no edges"),
        (PLANTED_EDGES, {"size": 99}, "size"),
        (PLANTED_EDGES, {"level": "node"}, "level"),
        (PLANTED_EDGES, {"ranking": "signed"}, "better"),
        (PLANTED_EDGES, {"nodes": ["blocks.7.h0"]}, "unknown component"),
    ],
)
def test_bad_truth_raises(truth, kwargs, match):
    with pytest.raises(MechscopeError, match=match):
        score_circuit(_scores({}), truth, **kwargs)
    with pytest.raises(MechscopeError, match="EdgeScores"):
        score_circuit({}, PLANTED_EDGES)
