"""Precision, recall and AUROC against a known circuit; AUROC checked against scikit-learn with ties."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from mechscope.core.errors import MechscopeError
from mechscope.core.graphs import CircuitScore, EdgeScores, auroc, score_circuit
from mechscope.core.graphs.scoring import expected_hits
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
