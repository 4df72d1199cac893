"""Circuit discovery on transformers (tasks: :mod:`mechscope.lm.methods.tasks`).

:func:`discover` runs EAP, EAP-IG, ACDC or exact edge patching (:mod:`mechscope.core.graphs`) through
:class:`~mechscope.lm.methods.graph.TransformerEdges`, cuts a circuit, draws the faithfulness curve and, for a
tracr model, scores the edges against ``circuit.json`` (every edge set). :func:`compare_edges` ranks edges found
by hand (:func:`heads_edges`: the heads report's path patching) among the discovered scores.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from mechscope.core.errors import MechscopeError
from mechscope.core.graphs import (
    MIB_FRACTIONS,
    Circuit,
    CircuitScore,
    EdgeScores,
    FaithfulnessCurve,
    TopEdges,
    acdc,
    auroc,
    check_method,
    check_threshold,
    circuit_faithfulness,
    eap,
    eap_ig,
    edge_patching,
    faithfulness_curve,
    score_circuit,
)
from mechscope.core.results import Result
from mechscope.core.torch_utils import evaluating
from mechscope.lm.methods.graph import TransformerEdges
from mechscope.lm.methods.tasks import NOT_DIFFERENTIABLE, Task
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


# ---- discovery ----------------------------------------------------------------------------------------


def _circuit(scores: EdgeScores, method: str, size, threshold, default: int) -> Circuit:
    if method == "acdc" and size is None:
        return scores.circuit()
    if size is None and threshold is not None:
        return scores.circuit(int(np.sum(np.abs(scores.scores) >= threshold)))
    return scores.circuit(min(default, scores.graph.n_edges) if size is None else size)


def discover(
    model: HookedTransformer,
    task: Task,
    method: str = "eap-ig",
    *,
    size: int | float | None = None,
    threshold: float | None = None,
    steps: int = 5,
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
    check_method(method)
    threshold = None if threshold is None else check_threshold(threshold)
    if method in ("eap", "eap-ig") and task.metric_name in NOT_DIFFERENTIABLE:
        raise MechscopeError(f"{method} needs a differentiable metric; {task.metric_name!r} is not (use acdc)")
    if method == "eap" and task.metric_name == "kl":
        raise MechscopeError("eap scores nothing with kl: its gradient is 0 at the clean run (use eap-ig or acdc)")
    edges = TransformerEdges(model)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    args = (edges, task.clean, task.corrupted)
    kw = {"metric": task.metric, "better": task.better}
    with evaluating(model):
        if method == "eap":
            scores = eap(*args, ablation=ablation, **kw)
        elif method == "eap-ig":
            scores = eap_ig(*args, steps=steps, **kw)
        elif method == "edge-patching":
            scores = edge_patching(*args, ablation=ablation, progress=progress, **kw)
        else:
            if threshold is None:
                with torch.no_grad():
                    m0 = float(task.metric(edges.forward(task.clean)[0]))
                    m1 = float(task.metric(edges.forward(task.corrupted)[0]))
                threshold = 0.01 * abs(m0 - m1)
            scores = acdc(*args, threshold=threshold, ablation=ablation, progress=progress, **kw)
        seconds["discovery"] = time.perf_counter() - t0
        default = len(known.edge_set("primary")) if known is not None else 30
        circuit = _circuit(scores, method, size, threshold if method != "acdc" else None, default)
        faith = drawn = None
        if curve:
            t1 = time.perf_counter()
            faith_ablation = "patch" if method == "eap-ig" else ablation
            faith = faithfulness_curve(edges, scores, task.clean, task.corrupted, metric=task.metric,
                                       ablation=faith_ablation, n_random=n_random, seed=seed, fractions=MIB_FRACTIONS,
                                       progress=progress)  # fmt: skip
            drawn = circuit_faithfulness(edges, circuit, task.clean, task.corrupted, metric=task.metric,
                                         ablation=faith_ablation, curve=faith)  # fmt: skip
            seconds["faithfulness"] = time.perf_counter() - t1
    truth = {}
    if known is not None:
        truth = {s: score_circuit(scores, known, edge_set=s) for s in known.edge_sets}
    settings = {"steps": steps if method == "eap-ig" else None, "ablation": ablation, "size": size,
                "threshold": threshold, "n_random": n_random, "seed": seed, **task.settings}  # fmt: skip
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
        circuit=circuit,
        faithfulness=faith,
        circuit_faithfulness=drawn,
        ground_truth=truth,
        known_nodes=tuple(known.nodes) if known is not None else (),
        known_edges=tuple(known.edge_set("primary")) if known is not None else (),
        comparison=compare_edges(scores, hand_edges, len(circuit)) if hand_edges else None,
        seconds=seconds,
    )


def compare_edges(scores: EdgeScores, hand: list[tuple[str, str, str]], top: int) -> dict:
    """Where edges found by hand rank among the discovered scores: rank of each (by |score|, 1 = first, among
    every edge and among the edges into the same kind of slot), AUROC of the hand edges against every other
    edge and against the other edges into the same slots, and how many sit in the top ``top``."""
    g = scores.graph
    key = np.abs(scores.scores)
    order = np.argsort(-key, kind="stable")
    rank = np.empty(len(key), dtype=np.int64)
    rank[order] = np.arange(1, len(key) + 1)
    ids = [g.edge_id(*e) for e in hand]
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
                "rank": int(rank[e]),
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
