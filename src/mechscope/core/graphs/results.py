"""Scored edge lists and the circuits cut from them.

Every discovery method returns an :class:`EdgeScores`: one score per edge of its graph, the estimated (EAP,
EAP-IG) or measured (edge patching, ACDC) change of the metric when that edge alone is removed,
``M(without e) - M``. ``better`` says which way the metric moves with more of the behaviour (``"higher"`` for a
logit difference or an accuracy, ``"lower"`` for a loss or a KL divergence, None when unknown): an edge *helps*
when removing it moves the metric the other way. Rankings are by ``|score|`` (``"absolute"``) or by how much the
edge helps (``"signed"``, which needs ``better``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from mechscope.core.errors import MechscopeError
from mechscope.core.graphs.graph import ComponentGraph
from mechscope.core.graphs.protocol import check_ablation
from mechscope.core.results import Result

RANKINGS = ("absolute", "signed")
BETTER = ("higher", "lower", None)


def check_better(better) -> None:
    if better not in BETTER:
        raise MechscopeError(f"better must be 'higher', 'lower' or None, got {better!r}")


MAX_RANDOM = 10_000  # random orders of a faithfulness curve's baseline (the CLI's --random has the same bound)
METHODS = ("eap", "eap-ig", "acdc", "edge-patching")


def check_method(method: str) -> str:
    """One of :data:`METHODS` (both wings' ``discover``)."""
    if method not in METHODS:
        raise MechscopeError(f"unknown method {method!r}: one of {', '.join(METHODS)}")
    return method


def check_discovery_counts(seed, n_random) -> None:
    """``--seed`` and ``--random`` (both wings' ``discover``), checked before any work whether or not the curve that
    reads them runs (a negative seed was recorded; one beyond 64 bits raised an overflow)."""
    from mechscope.core.validate import check_int, check_seed

    check_seed(seed)
    check_int(n_random, "--random", 0, MAX_RANDOM)


DEFAULT_STEPS, DEFAULT_RANDOM = 5, 5  # both wings' defaults of --steps and --random


def check_method_ablation(method: str, ablation: str, cli: bool = True) -> None:
    """Refuse an ablation the method does not read: EAP-IG integrates from the corrupted input's activations to the
    clean ones and its curve patches them, so a mean or zero ablation was recorded but never applied. ``cli``: the
    message names the command's option, else the Python argument."""
    check_ablation(ablation)
    if method == "eap-ig" and ablation != "patch":
        given = f"--ablation {ablation}" if cli else f"ablation={ablation!r}"
        raise MechscopeError(f"eap-ig integrates from the corrupted input's activations: it does not read {given} "
                             "(eap, acdc and edge-patching take a mean or zero ablation)")  # fmt: skip


def check_method_steps(method: str, steps, cli: bool = True) -> int | None:
    """EAP-IG's interpolation steps (None: the default), refused for a method that does not read them (they were
    recorded as unread, silently); returns the steps for EAP-IG, else None."""
    if steps is not None and method != "eap-ig":
        given, by = ("--steps", f"--method {method}") if cli else ("steps", f"method={method!r}")
        raise MechscopeError(f"{given} is EAP-IG's interpolation steps; {by} does not read it: leave it out")
    return (DEFAULT_STEPS if steps is None else steps) if method == "eap-ig" else None


def check_discovery_settings(method: str, seed, n_random, size, threshold, steps=None,
                             curve: bool = True, ablation: str = "patch") -> tuple[int, int]:  # fmt: skip
    """Both wings' ``discover`` settings, checked before any work: the method, ``--seed`` and ``--random``,
    ``--size`` with ``--threshold`` only for ACDC (for a method that ranks edges one cuts the ranking and the
    other was ignored), and no setting given that another makes unread (``--steps`` for a method other than
    EAP-IG, ``--random`` with ``--no-curve``, ``--ablation`` other than patch with EAP-IG: all were silently
    ignored). Returns (steps, n_random) with their
    defaults for those not given (None; steps stays None for a method other than EAP-IG)."""
    check_method(method)
    check_method_ablation(method, ablation)
    steps = check_method_steps(method, steps)
    if n_random is not None and not curve:
        raise MechscopeError("--random is the number of random circuits of the faithfulness curve's baseline, "
                             "which --no-curve skips: leave one of them out")  # fmt: skip
    n_random = DEFAULT_RANDOM if n_random is None else n_random
    check_discovery_counts(seed, n_random)
    if threshold is not None and size is not None and method != "acdc":
        raise MechscopeError(f"{method} ranks edges: give --size or --threshold to cut the ranking, not both "
                             "(ACDC takes both: its threshold prunes, the size cuts what is left)")  # fmt: skip
    if threshold is not None:
        check_threshold(threshold)
    if type(size) is int and size < 1:  # a circuit of no edge was written (the curve measures the empty one already)
        raise MechscopeError(f"--size as an edge count must be at least 1, got {size}")
    return steps, n_random


def check_threshold(threshold, what: str = "--threshold") -> float:
    """A finite number >= 0 (ACDC's tau; for the attribution methods a cut on |score|)."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
        raise MechscopeError(f"{what} must be a finite number >= 0, got {threshold!r}")
    if threshold < 0:
        raise MechscopeError(f"{what} must be >= 0, got {threshold:g}")
    return float(threshold)


def parse_size(text: str | None):
    """``--size`` of a circuit (both wings' ``discover``): an edge count (``30``) or a fraction of the edges
    (``0.01``), as :meth:`EdgeScores.circuit` takes it; None: the method's default."""
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        pass
    try:
        f = float(text)
    except ValueError:
        raise MechscopeError(f"--size expects an edge count or a fraction in (0, 1], got {text!r}") from None
    if not 0 < f <= 1:
        raise MechscopeError(f"--size as a fraction must be in (0, 1], got {text}")
    return f


def fraction_count(f: float, n: int) -> int:
    """floor(f · n), a product within 1e-9 below an integer taken as that integer (float rounding: 0.29 of 100
    edges is 29, where the product 28.999999999999996 would truncate to 28; 5/11 of 11 stays 5)."""
    return math.floor(float(f) * n + 1e-9)


def edge_count(size, n: int) -> int:
    """A circuit size (an edge count, or a fraction in [0, 1]) as a count of the graph's ``n`` edges."""
    if isinstance(size, bool) or not isinstance(size, (int, float, np.integer, np.floating)):
        raise MechscopeError(f"circuit size must be an edge count or a fraction, got {size!r}")
    if isinstance(size, (float, np.floating)):
        if not 0.0 <= size <= 1.0:
            raise MechscopeError(f"circuit fraction must be in [0, 1], got {size}")
        return fraction_count(size, n)
    if not 0 <= size <= n:
        raise MechscopeError(f"circuit size {size} is more than the graph's {n:,} edges" if size > n else
                             f"circuit size must be at least 0 edges, got {size}")  # fmt: skip
    return int(size)


class TopEdges:
    """For a result with a ``scores`` field (:class:`EdgeScores`): its 30 strongest edges written into its JSON, and
    :meth:`table`."""

    def json_extras(self) -> dict:
        s = self.scores
        return {"top_edges": [[s.graph.edge_name(int(e)), float(s.scores[e])] for e in s.order()[:30]]}

    def table(self, k: int = 20):
        """The top ``k`` edges: (sender, receiver, score)."""
        return self.scores.table(k)


def importance(scores: np.ndarray, ranking: str, better: str | None) -> np.ndarray:
    """The key edges are ranked by (larger first): ``|score|``, or how much removing the edge hurts."""
    if ranking not in RANKINGS:
        raise MechscopeError(f"unknown ranking {ranking!r}: 'absolute' or 'signed'")
    if ranking == "absolute":
        return np.abs(scores)
    if better is None:
        raise MechscopeError("a signed ranking needs to know which way the metric is better (better='higher'/'lower')")
    return -scores if better == "higher" else scores


def top_order(key: np.ndarray) -> np.ndarray:
    """Edge indices by decreasing ``key``; ties keep the graph's order (a stable sort)."""
    return np.argsort(-key, kind="stable")


@dataclass(frozen=True)
class Circuit(Result):
    """A set of edges and the nodes they touch (in topological order)."""

    method: str
    ranking: str
    edges: tuple[tuple[str, str, str], ...]
    nodes: tuple[str, ...]
    scores: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.scores) != len(self.edges):  # a record edited by hand: its figures zip the two
            raise MechscopeError(f"a circuit of {len(self.edges)} edges with {len(self.scores)} scores")

    def __len__(self) -> int:
        return len(self.edges)


@dataclass(frozen=True)
class EdgeScores(Result):
    """One score per edge of ``graph`` from a discovery method, with its settings and cost."""

    SCHEMA: ClassVar[str] = "mechscope.edge_scores/1"

    method: str
    graph: ComponentGraph
    scores: np.ndarray = field(compare=False)
    better: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    forward_passes: int = 0
    backward_passes: int = 0
    metric_clean: float = math.nan
    metric_corrupted: float = math.nan
    seconds: float = math.nan
    kept: tuple[int, ...] | None = None  # edges a thresholded method (ACDC) keeps

    def __post_init__(self) -> None:
        scores = np.asarray(self.scores, dtype=float).reshape(-1)
        if scores.shape[0] != self.graph.n_edges:
            raise MechscopeError(f"{scores.shape[0]} scores for a graph of {self.graph.n_edges} edges")
        object.__setattr__(self, "scores", scores)
        check_better(self.better)

    def json_extras(self) -> dict:
        order = top_order(np.abs(self.scores))[:20]
        return {"top_edges": [[self.graph.edge_name(e), float(self.scores[e])] for e in order]}

    def table(self, k: int | None = None, *, ranking: str = "absolute") -> list[tuple[str, str, float]]:
        """``(sender, receiver "node<slot>", score)`` of the top ``k`` edges (all when None), most important first."""
        ids = self.order(ranking)[: self._count(k) if k is not None else None]
        g = self.graph
        return [(g.edges[e][0], g.receiver_name(int(g.edge_receiver[e])), float(self.scores[e])) for e in ids]

    def order(self, ranking: str = "absolute") -> np.ndarray:
        """Every edge index, most important first."""
        return top_order(importance(self.scores, ranking, self.better))

    def circuit(self, size: int | float | None = None, *, ranking: str = "absolute") -> Circuit:
        """The top ``size`` edges (an int), the top fraction (a float in (0, 1]), or (None) the edges the
        method kept (ACDC). For a method that keeps edges, the top ``size`` of those it kept: the others it pruned
        (an untried edge scores 0, so a ranking of every edge would bring them back)."""
        if size is None:
            if self.kept is None:
                raise MechscopeError(f"{self.method} keeps no edge set of its own: pass a size (edges or fraction)")
            ids = np.asarray(sorted(self.kept), dtype=np.int64)
        else:
            ids = self.order(ranking)[: self._count(size)]
            if self.kept is not None:
                if len(ids) > len(self.kept):
                    raise MechscopeError(f"{self.method} kept {len(self.kept)} edges: a circuit of {len(ids)} would "
                                         f"add edges it pruned (give a size of at most {len(self.kept)}, or none)")
                kept = set(self.kept)
                ids = np.asarray([e for e in self.order(ranking) if e in kept][: len(ids)], dtype=np.int64)
        return self._circuit(ids, ranking)

    def _count(self, size) -> int:
        return edge_count(size, self.graph.n_edges)

    def _circuit(self, ids: np.ndarray, ranking: str) -> Circuit:
        g = self.graph
        send, recv = g.edge_nodes()
        touched = set(send[ids].tolist()) | set(recv[ids].tolist())
        nodes = tuple(g.nodes[i].name for i in g.topological_order if i in touched)
        return Circuit(
            method=self.method,
            ranking=ranking,
            edges=tuple(g.edges[e] for e in ids.tolist()),
            nodes=nodes,
            scores=tuple(float(self.scores[e]) for e in ids.tolist()),
        )
