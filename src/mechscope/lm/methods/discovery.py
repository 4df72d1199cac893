"""Circuit discovery on transformers (tasks: :mod:`mechscope.lm.methods.tasks`).

:func:`discover` runs EAP, EAP-IG, ACDC or exact edge patching (:mod:`mechscope.core.graphs`) through
:class:`~mechscope.lm.methods.graph.TransformerEdges`, cuts a circuit, draws the faithfulness curve and, for a
tracr model, scores the edges against ``circuit.json`` (every edge set). :func:`compare_edges` ranks edges found
by hand (:func:`heads_edges`: the heads report's path patching) among the discovered scores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from mechscope.core.errors import MechscopeError
from mechscope.core.graphs import (
    DEFAULT_SIZE,
    Circuit,
    CircuitScore,
    EdgeScores,
    FaithfulnessCurve,
    TopEdges,
    auroc,
    check_known,
    check_task_model,
    drawn_against_truth,
    find_circuit,
    score_circuit,
)
from mechscope.core.results import Result
from mechscope.core.torch_utils import evaluating
from mechscope.lm.methods.graph import TransformerEdges
from mechscope.lm.methods.tasks import NOT_DIFFERENTIABLE, Task, check_model, check_task
from mechscope.lm.models.transformer import HookedTransformer

# ---- results --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LMDiscovery(TopEdges, Result):
    """One circuit-discovery run on a transformer: the scored edges, the circuit, its faithfulness curve, and
    (tracr) the scores against the known circuit; ``discovery.json``."""

    SCHEMA: ClassVar[str] = "mechscope.lm_discovery/1"
    FILE: ClassVar[str] = "discovery.json"

    model: str
    task: str
    task_description: str
    metric: str
    better: str | None
    method: str
    settings: dict
    n_examples: int
    scores: EdgeScores
    circuit: Circuit
    faithfulness: FaithfulnessCurve | None
    ground_truth: dict[str, CircuitScore]  # edge set -> score (tracr)
    known_nodes: tuple[str, ...]
    known_edges: tuple[tuple[str, str, str], ...]  # the known circuit's primary edges (drawn for tracr)
    comparison: dict | None  # against the heads report's path-patched edges
    seconds: dict[str, float]
    # forward and backward passes, in passes over the task's clean batch of tokens (batch x positions, tracr's padding
    # included; WorkCounter over the blocks): the method's own forward_passes and backward_passes (scores and
    # faithfulness), plus the task's clean run (induction; tracr: clean and corrupted) and ACDC's two runs that set
    # its default threshold
    work: dict | None = None
    # the drawn circuit alone (every other edge ablated as for the curve): circuit_faithfulness's dict
    circuit_faithfulness: dict | None = None
    # edge set -> the drawn circuit's own edges against it (tracr): edges, true, n_true_edges, precision, recall
    # (ground_truth's precision and recall are at the set's size; drawn_against_truth)
    drawn_vs_truth: dict[str, dict] | None = None


# ---- discovery ----------------------------------------------------------------------------------------


def discover(
    model: HookedTransformer,
    task: Task,
    method: str = "eap-ig",
    *,
    size: int | float | None = None,
    threshold: float | None = None,
    steps: int | None = None,
    ablation: str = "patch",
    curve: bool = True,
    n_random: int = 5,
    seed: int = 0,
    known=None,
    hand_edges: list[tuple[str, str, str]] | None = None,
    name: str = "",
    progress: bool = False,
) -> LMDiscovery:
    """Discover the circuit of ``task`` on ``model`` (see the module docstring). ``size``: edges (int) or a
    fraction of them in the circuit (default: the known circuit's primary edges, ACDC's own, or 30);
    ``threshold``: ACDC's tau (default 1% of |M(clean) − M(corrupted)|) or, for the others, a cut on |score|;
    ``known``: a :class:`~mechscope.core.graphs.KnownCircuit` to score against; ``hand_edges``: edges found by
    hand (the heads report's path patching) to compare with."""
    check_model(model)
    check_task(task)
    check_task_model(task.made_on, model)
    edges = TransformerEdges(model)
    check_known(known, edges.graph, name or model.cfg.name)
    if hand_edges:
        hand_edge_ids(edges.graph, hand_edges)  # before the search, not after it
    default = len(known.edge_set("primary")) if known is not None else DEFAULT_SIZE
    with evaluating(model):
        found = find_circuit(edges, task.clean, task.corrupted, metric=task.metric,
                             better=task.better, metric_name=task.metric_name,
                             differentiable=task.metric_name not in NOT_DIFFERENTIABLE, method=method, size=size,
                             threshold=threshold, steps=steps, ablation=ablation, curve=curve, n_random=n_random,
                             seed=seed, default_size=default, progress=progress)  # fmt: skip
    scores = found.scores
    truth, drawn = {}, None
    if known is not None:
        truth = {s: score_circuit(scores, known, edge_set=s) for s in known.edge_sets}
        drawn = {s: drawn_against_truth(scores, found.circuit, known, edge_set=s) for s in known.edge_sets}
    settings = {"steps": found.scores.settings.get("steps"), "ablation": ablation, "size": size,
                "threshold": found.threshold, "n_random": n_random, "seed": seed, **task.settings}  # fmt: skip
    return LMDiscovery(
        model=name or model.cfg.name,
        task=task.kind,
        task_description=task.description,
        metric=task.metric_name,
        better=task.better,
        method=method,
        settings=settings,
        n_examples=task.n_examples,
        scores=scores,
        circuit=found.circuit,
        faithfulness=found.faithfulness,
        circuit_faithfulness=found.circuit_faithfulness,
        ground_truth=truth,
        drawn_vs_truth=drawn,
        known_nodes=tuple(known.nodes) if known is not None else (),
        known_edges=tuple(known.edge_set("primary")) if known is not None else (),
        comparison=compare_edges(scores, hand_edges, len(found.circuit)) if hand_edges else None,
        seconds=found.seconds,
    )


def compare_edges(scores: EdgeScores, hand: list[tuple[str, str, str]], top: int) -> dict:
    """Where edges found by hand rank among the discovered scores: rank of each (by |score|, 1 = first, among
    every edge and among the edges into the same kind of slot; tied edges share the best rank, 1 + how many score
    more), AUROC of the hand edges against every other edge and against the other edges into the same slots, and
    how many sit in the top ``top``."""
    g = scores.graph
    key = np.abs(scores.scores)
    ids = hand_edge_ids(g, hand)
    rank = {e: int(np.sum(key > key[e])) + 1 for e in ids}  # tied edges share the best rank, as in the slot
    slots = {g.edges[e][2] for e in ids}
    same = np.asarray([g.edges[e][2] in slots for e in range(g.n_edges)], dtype=bool)
    labels = np.zeros(g.n_edges, dtype=bool)
    labels[ids] = True
    in_slot = np.flatnonzero(same)
    slot_rank = {e: int(np.sum(key[in_slot] > key[e])) + 1 for e in ids}
    return {
        "edges": [
            {
                "edge": g.edge_name(e),
                "score": float(scores.scores[e]),
                "rank": rank[e],
                "rank_in_slot": slot_rank[e],
            }
            for e in ids
        ],  # fmt: skip
        "slots": sorted(slots),
        "n_edges": g.n_edges,
        "n_slot_edges": int(same.sum()),
        "auroc": auroc(key, labels),
        "auroc_in_slot": auroc(key[in_slot], labels[in_slot]),
        "top": top,
        "in_top": int(sum(rank[e] <= top for e in ids)),
    }


def hand_edge_ids(graph, hand) -> list[int]:
    """The graph's indices of edges found by hand (triples or ``"s->n<slot>"``), each once; one line for a
    list that is empty or names what is not an edge of this graph."""
    if not isinstance(hand, (list, tuple)) or not hand:
        raise MechscopeError(f"hand edges must be a non-empty list of edges, got {hand!r}")
    return list(dict.fromkeys(i for e in hand for i in graph.parse_edge(e)))


def heads_edges(heads, kv_groups: int | None = None) -> list[tuple[str, str, str]]:
    """The key-side edges the heads report confirmed by path patching, in the graph's names: source head ->
    the key input of the target key/value head (on its group's first query head)."""
    g = kv_groups or heads.kv_groups
    out = []
    for pp in heads.path_patches:
        if any(pp.confirmed):
            src = f"blocks.{pp.source[0]}.attn.h{pp.source[1]}"
            out.append((src, f"blocks.{pp.layer}.attn.h{pp.kv_head * g}", "k"))
    return list(dict.fromkeys(out))
