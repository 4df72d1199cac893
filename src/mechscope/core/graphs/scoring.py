"""Scoring a scored edge list against a known circuit: precision, recall and AUROC for edges and nodes.

Edges are ranked by importance (``|score|`` or signed, :mod:`.results`). Edge precision and recall are taken at
``size`` edges (default: as many as the true circuit has), counting a tie at the cut as the expected share under
a random tie break. AUROC is the probability that a true edge outranks a false one, ties counting one half
(Mann-Whitney U with average ranks), as ``sklearn.metrics.roc_auc_score`` computes it; Conmy et al. 2023 score
ACDC, and Mueller et al. 2025 (MIB) InterpBench circuits, by edge AUROC. A node's score is the largest
importance of the edges that touch it, so a node enters a circuit with its first edge; the candidate nodes are
the graph's internal nodes (heads and MLPs, channels), as tracr's README prescribes. Node precision and recall
are those of the nodes the top ``size`` edges touch; node recall at size is the recall of the top ``n`` nodes,
``n`` the true circuit's node count. ``level="pair"`` drops the slot (q/k/v) and deduplicates.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from mechscope.core.errors import MechscopeError
from mechscope.core.graphs.ground_truth import check_known
from mechscope.core.graphs.results import EdgeScores, importance, top_order
from mechscope.core.results import Result


@dataclass(frozen=True)
class CircuitScore(Result):
    """How well a scored edge list finds a known circuit."""

    SCHEMA: ClassVar[str] = "mechscope.circuit_score/1"

    method: str
    level: str
    ranking: str
    size: int
    n_candidates: int
    n_true_edges: int
    edge_precision: float
    edge_recall: float
    edge_auroc: float
    n_node_candidates: int
    n_true_nodes: int
    node_precision: float
    node_recall: float
    node_auroc: float
    node_recall_at_size: float


def average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n of ``x`` (ascending), tied values sharing their average rank."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return (ends - counts + (counts + 1) / 2.0)[inverse]


def auroc(scores, labels) -> float:
    """Area under the ROC curve of ``scores`` for binary ``labels`` (ties count 1/2); NaN without both classes."""
    s = np.asarray(scores, dtype=float).reshape(-1)
    y = np.asarray(labels, dtype=bool).reshape(-1)
    if s.shape != y.shape:
        raise MechscopeError(f"{s.size} scores for {y.size} labels")
    if np.isnan(s).any():
        raise MechscopeError("scores contain NaN: AUROC is undefined")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    u = average_ranks(s)[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def expected_hits(key: np.ndarray, positive: np.ndarray, k: int) -> float:
    """Positives among the top ``k`` by ``key``, ties at the cut shared as a random tie break would."""
    if k <= 0:
        return 0.0
    t = np.sort(key)[::-1][min(k, len(key)) - 1]
    above, tied = key > t, key == t
    slots = min(k, len(key)) - int(above.sum())
    return float((positive & above).sum() + slots * (positive & tied).sum() / tied.sum())


def _ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


def _edge_candidates(scores: EdgeScores, key: np.ndarray, level: str):
    """(names, keys) of the candidates: edges, or (sender, node) pairs with the best key over their slots."""
    g = scores.graph
    if level == "edge":
        return list(g.edges), key
    if level != "pair":
        raise MechscopeError(f"unknown level {level!r}: 'edge' or 'pair'")
    best: dict[tuple[str, str], float] = {}
    for (s, n, _), k in zip(g.edges, key.tolist(), strict=True):
        best[(s, n)] = max(best.get((s, n), -math.inf), k)
    return list(best), np.asarray(list(best.values()), dtype=float)


def _truth_edges(scores: EdgeScores, truth: Iterable, level: str) -> set:
    g = scores.graph
    ids = {e for spec in truth for e in g.parse_edge(spec)}
    edges = {g.edges[e] for e in ids}
    return edges if level == "edge" else {(s, n) for s, n, _ in edges}


def _node_keys(scores: EdgeScores, key: np.ndarray, candidates: tuple[int, ...]) -> np.ndarray:
    send, recv = scores.graph.edge_nodes()
    best = np.full(len(scores.graph.nodes), -np.inf)
    np.maximum.at(best, send, key)
    np.maximum.at(best, recv, key)
    return best[list(candidates)]


def score_circuit(
    scores: EdgeScores,
    truth,
    *,
    edge_set: str = "primary",
    nodes: Iterable[str] | None = None,
    size: int | None = None,
    ranking: str = "absolute",
    level: str = "edge",
) -> CircuitScore:
    """Score ``scores`` against ``truth``: a :class:`~.ground_truth.KnownCircuit` (its ``edge_set`` and
    circuit components) or the true edges (``"s->n<slot>"`` or ``[s, n, slot]``) with ``nodes``
    (default: the internal nodes those edges touch)."""
    if not isinstance(scores, EdgeScores):
        raise MechscopeError(f"expected an EdgeScores, got {type(scores).__name__}")
    g = scores.graph
    if hasattr(truth, "edge_set") and hasattr(truth, "nodes"):
        check_known(truth, g, "the scores' model")  # a smaller model's circuit names only edges a larger one has
        true_edges, nodes = truth.edge_set(edge_set), truth.nodes if nodes is None else nodes
    else:
        true_edges = list(truth)
    if not true_edges:
        raise MechscopeError("the true circuit has no edges")
    key = importance(scores.scores, ranking, scores.better)
    names, ckey = _edge_candidates(scores, key, level)
    positives = _truth_edges(scores, true_edges, level)
    is_pos = np.asarray([n in positives for n in names], dtype=bool)
    k = len(positives) if size is None else size
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= len(names):
        raise MechscopeError(f"size must be an integer from 0 to {len(names)}, got {size!r}")
    hits = expected_hits(ckey, is_pos, k)

    cand = g.internal_nodes()
    if nodes is None:
        send, recv = g.edge_nodes()
        ids = [e for spec in true_edges for e in g.parse_edge(spec)]
        true_nodes = (set(send[ids].tolist()) | set(recv[ids].tolist())) & set(cand)
    else:
        true_nodes = {g.node_id(n) for n in nodes}
    node_pos = np.asarray([i in true_nodes for i in cand], dtype=bool)
    nkey = _node_keys(scores, key, cand)
    found = _circuit_nodes(scores, key, k, level) & set(cand)
    node_hits = len(found & true_nodes)
    return CircuitScore(
        method=scores.method,
        level=level,
        ranking=ranking,
        size=k,
        n_candidates=len(names),
        n_true_edges=len(positives),
        edge_precision=_ratio(hits, k),
        edge_recall=_ratio(hits, len(positives)),
        edge_auroc=auroc(ckey, is_pos),
        n_node_candidates=len(cand),
        n_true_nodes=int(node_pos.sum()),
        node_precision=_ratio(node_hits, len(found)),
        node_recall=_ratio(node_hits, int(node_pos.sum())),
        node_auroc=auroc(nkey, node_pos),
        node_recall_at_size=_ratio(expected_hits(nkey, node_pos, int(node_pos.sum())), int(node_pos.sum())),
    )


def drawn_against_truth(scores: EdgeScores, circuit, truth, edge_set: str = "primary") -> dict:
    """The drawn circuit's own edges against ``truth`` (a KnownCircuit's ``edge_set``, or the true edges): how many
    it has, how many are true, its precision and recall (:func:`score_circuit` takes them at the true set's size)."""
    if hasattr(truth, "edge_set") and hasattr(truth, "nodes"):
        check_known(truth, scores.graph, "the scores' model")  # as score_circuit: a smaller model's circuit
    true_edges = truth.edge_set(edge_set) if hasattr(truth, "edge_set") else list(truth)
    positives = _truth_edges(scores, true_edges, "edge")
    hits = sum(tuple(e) in positives for e in circuit.edges)
    return {"edges": len(circuit.edges), "true": hits, "n_true_edges": len(positives),
            "precision": _ratio(hits, len(circuit.edges)), "recall": _ratio(hits, len(positives))}  # fmt: skip


def _circuit_nodes(scores: EdgeScores, key: np.ndarray, k: int, level: str) -> set[int]:
    """Nodes touched by the top ``k`` candidates (edges or pairs), in a stable order."""
    g = scores.graph
    send, recv = g.edge_nodes()
    if level == "edge":
        ids = top_order(key)[:k]
        return set(send[ids].tolist()) | set(recv[ids].tolist())
    names, ckey = _edge_candidates(scores, key, level)
    top = [names[i] for i in top_order(ckey)[:k]]
    return {g.node_id(n) for pair in top for n in pair}
