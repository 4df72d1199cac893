"""ACDC: automatic circuit discovery by exact, iterative edge removal.

Conmy, Mavor-Parker, Lynch, Heimersheim & Garriga-Alonso 2023, "Towards Automated Circuit Discovery for
Mechanistic Interpretability" (NeurIPS 2023, arXiv:2304.14997). Nodes are visited from the output backwards
(reverse topological order); at each node every incoming edge is removed in turn (it carries the corrupted, mean
or zero value from then on) and the removal is kept when the metric moves by less than the threshold tau from
the current circuit's value. ``better`` picks the comparison: None removes when ``|dM| < tau``, ``"lower"``
(a loss or KL, the paper's choice) when ``dM < tau``, ``"higher"`` (a logit difference) when ``-dM < tau``.
A node none of whose outgoing edges survives cannot affect the output; its incoming edges are removed without a
forward pass, as the paper's search never reaches it. Each edge's score is the ``dM`` measured when it was tried
(0 for edges never tried).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from mechscope.core.graphs.protocol import Term, ablation_values, check_model, edge_weight, metric_of, metric_value
from mechscope.core.graphs.results import EdgeScores, check_better, check_threshold


def _harm(delta: float, better) -> float:
    """How much a removal hurts, in the direction ``better`` says is worse (both ways when None)."""
    if better is None:
        return abs(delta)
    return -delta if better == "higher" else delta


def _incoming_order(graph, node: int) -> np.ndarray:
    """Edges into ``node``: later senders first (the paper's reverse order), then by slot."""
    eids = graph.edges_into_node(node)
    rank = {n: i for i, n in enumerate(graph.topological_order)}
    send, _ = graph.edge_nodes()
    return np.asarray(sorted(eids.tolist(), key=lambda e: (-rank[send[e]], graph.edge_receiver[e])), dtype=np.int64)


def _alive(graph, node: int, removed: np.ndarray, alive: np.ndarray) -> bool:
    """An output node, or a node with a surviving edge into a receiver some live node depends on."""
    if not graph.nodes[node].sends:
        return True
    out = graph.edges_from_node(node)
    return any(_live(graph, int(r), removed, alive) for r in graph.edge_receiver[out[~removed[out]]].tolist())


def _live(graph, receiver: int, removed: np.ndarray, alive: np.ndarray) -> bool:
    """Whether a live node depends on ``receiver``: its owner (decided) or a node that reads it (grouped-query
    attention's shared keys and values; decided here from its own outgoing edges, which are final by now)."""
    if alive[graph.receiver_node(receiver)]:
        return True
    return any(alive[n] or _alive(graph, n, removed, alive) for n in graph.readers_of(receiver))


def acdc(
    model,
    clean: Any,
    corrupted: Any = None,
    *,
    metric,
    threshold: float,
    ablation: str = "patch",
    better=None,
    progress: bool = False,
) -> EdgeScores:
    """ACDC (Conmy et al. 2023); the result's ``kept`` edges are the circuit, ``forward_passes`` its cost."""
    check_model(model)
    check_better(better)
    tau = check_threshold(threshold, "the ACDC threshold")
    t0 = time.perf_counter()
    g = model.graph
    source, corrupted_out, fwd = ablation_values(model, clean, corrupted, ablation)
    removed = np.zeros(g.n_edges, dtype=bool)
    tried = np.zeros(g.n_edges, dtype=bool)
    scores = np.zeros(g.n_edges)
    alive = np.zeros(len(g.nodes), dtype=bool)
    m_clean = m_cur = metric_of(model, clean, metric)
    fwd += 1
    bar = tqdm(total=g.n_edges, desc="ACDC", disable=not progress)
    for node in reversed(g.topological_order):
        alive[node] = _alive(g, node, removed, alive)
        incoming = _incoming_order(g, node)
        if not len(incoming):
            continue
        live = {r: _live(g, r, removed, alive) for r in set(g.edge_receiver[incoming].tolist())}
        for e in incoming:
            if not live[int(g.edge_receiver[e])]:
                removed[e] = True
                bar.update(1)
                continue
            removed[e] = True
            m_new = metric_of(model, clean, metric, [Term(_weights(model, source, removed), source)])
            fwd += 1
            scores[e], tried[e] = m_new - m_cur, True
            if _harm(m_new - m_cur, better) < tau:
                m_cur = m_new
            else:
                removed[e] = False
            bar.update(1)
    bar.close()
    kept = np.flatnonzero(~removed)
    return EdgeScores(
        method="acdc",
        graph=g,
        scores=scores,
        better=better,
        settings={"threshold": tau, "ablation": ablation, "edges_tried": int(tried.sum()), "metric_circuit": m_cur},
        forward_passes=fwd,
        metric_clean=m_clean,
        metric_corrupted=float("nan") if corrupted_out is None else float(metric_value(metric, corrupted_out)),
        seconds=time.perf_counter() - t0,
        kept=tuple(int(e) for e in kept),
    )


def _weights(model, source, removed: np.ndarray):
    w = edge_weight(model, source)
    w[torch.as_tensor(removed, device=w.device)] = 1.0
    return w
