"""Faithfulness of circuits: how much of the model's behaviour the top edges alone keep.

A circuit C keeps its edges; every other edge carries the corrupted (or mean, or zero) value. Its normalised
faithfulness is ``f(C) = (M(C) - M(empty)) / (M(full) - M(empty))``: 1 for the full model, 0 for the empty
circuit (Wang et al. 2023; Mueller et al. 2025). The curve takes the top ``k`` edges for each fraction ``k``
(default the MIB fractions 0.1%, 0.2%, 0.5%, ..., 50%, 100%, log-spaced; ``int(k * n_edges)`` edges as in
MIB's code). The MIB circuit-track summaries (Mueller et al. 2025, "MIB: A Mechanistic Interpretability
Benchmark", ICML 2025, arXiv:2504.13151) are areas over the fraction of edges kept, by the trapezoidal rule on a
linear axis between the first and last fraction, as MIB's evaluation code integrates them:

* CPR (circuit performance ratio, higher is better): the area under ``f``, with edges ranked by how much they
  help (signed scores; by ``|score|`` when the direction of the metric is unknown);
* CMD (circuit-model distance, 0 is best): the area between ``f`` and 1, ``integral |1 - f|``, with edges ranked
  by ``|score|``.

The random baseline ranks the edges in ``n_random`` seeded random orders: mean and standard deviation of ``f``
at each fraction and of both areas.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from tqdm import tqdm

from mechscope.core.errors import MechscopeError
from mechscope.core.graphs.protocol import Term, ablation_values, check_model, edge_weight, metric_of
from mechscope.core.graphs.results import MAX_RANDOM, EdgeScores, fraction_count, importance, top_order
from mechscope.core.results import Result
from mechscope.core.validate import check_int, check_seed

MIB_FRACTIONS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


@dataclass(frozen=True)
class FaithfulnessCurve(Result):
    """Faithfulness of the top-k% circuits of one scored edge list, its MIB areas and a random baseline."""

    SCHEMA: ClassVar[str] = "mechscope.faithfulness/1"

    method: str
    ablation: str
    fractions: tuple[float, ...]
    edge_counts: tuple[int, ...]
    metric_full: float
    metric_empty: float
    cpr_ranking: str
    metric_values: tuple[float, ...]  # M(C_k), edges ranked as for CPR
    faithfulness: tuple[float, ...]
    faithfulness_absolute: tuple[float, ...]  # edges ranked by |score| (CMD)
    cpr: float
    cmd: float
    random_mean: tuple[float, ...]
    random_sd: tuple[float, ...]
    random_cpr: float
    random_cpr_sd: float
    random_cmd: float
    random_cmd_sd: float
    n_random: int
    seed: int
    forward_passes: int
    seconds: float = math.nan


def normalised(m: float, m_full: float, m_empty: float) -> float:
    """``(M(C) - M(empty)) / (M(full) - M(empty))``."""
    return (m - m_empty) / (m_full - m_empty)


def area(fractions: Sequence[float], values: Sequence[float]) -> float:
    """Trapezoidal area of ``values`` over ``fractions`` (linear axis, as MIB)."""
    x, y = np.asarray(fractions, dtype=float), np.asarray(values, dtype=float)
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2))


def mib_areas(fractions, f_for_cpr, f_for_cmd) -> tuple[float, float]:
    """(CPR, CMD): the area under the first curve and the area between the second and 1."""
    return area(fractions, f_for_cpr), area(fractions, np.abs(1.0 - np.asarray(f_for_cmd, dtype=float)))


def _check_fractions(fractions) -> tuple[float, ...]:
    try:
        fr = tuple(float(f) for f in fractions)
    except (TypeError, ValueError):
        raise MechscopeError(f"fractions must be numbers in (0, 1], got {fractions!r}") from None
    if len(fr) < 2 or any(not 0.0 < f <= 1.0 for f in fr) or any(b <= a for a, b in zip(fr, fr[1:], strict=False)):
        raise MechscopeError(f"fractions must be at least two increasing numbers in (0, 1], got {list(fr)}")
    return fr


class _Evaluator:
    """M(C) of circuits given as kept-edge index arrays, counting forward passes."""

    def __init__(self, model, clean, metric, source) -> None:
        self.model, self.clean, self.metric, self.source = model, clean, metric, source
        self.forwards = 0

    def __call__(self, kept: np.ndarray) -> float:
        w = edge_weight(self.model, self.source, 1.0)
        w[torch.as_tensor(kept, dtype=torch.long, device=w.device)] = 0.0
        self.forwards += 1
        return metric_of(self.model, self.clean, self.metric, [Term(w, self.source)])

    def curve(self, order: np.ndarray, counts: Sequence[int]) -> list[float]:
        return [self(order[:k]) for k in counts]


def faithfulness_curve(
    model,
    scores: EdgeScores,
    clean: Any,
    corrupted: Any = None,
    *,
    metric,
    fractions: Sequence[float] = MIB_FRACTIONS,
    ablation: str = "patch",
    n_random: int = 5,
    seed: int = 0,
    progress: bool = False,
) -> FaithfulnessCurve:
    """Faithfulness of the top-k% circuits of ``scores`` on ``model``, CPR/CMD and the random baseline."""
    check_model(model)
    if not isinstance(scores, EdgeScores) or scores.graph != model.graph:
        raise MechscopeError("scores must be the EdgeScores of a discovery run on this model's graph")
    fr = _check_fractions(fractions)
    n_random = check_int(n_random, "n_random", 0, MAX_RANDOM)  # one curve per random order: 2**64 ran without end
    check_seed(seed, "seed")
    t0 = time.perf_counter()
    source, _, fwd = ablation_values(model, clean, corrupted, ablation)
    ev = _Evaluator(model, clean, metric, source)
    n = model.graph.n_edges
    m_full, m_empty = ev(np.arange(n)), ev(np.zeros(0, dtype=np.int64))
    if not math.isfinite(m_full - m_empty) or m_full == m_empty:
        raise MechscopeError(
            f"the full model and the empty circuit give the same metric ({m_full:g}): faithfulness is undefined"
        )
    counts = [fraction_count(f, n) for f in fr]
    norm = lambda ms: [normalised(m, m_full, m_empty) for m in ms]  # noqa: E731
    cpr_ranking = "signed" if scores.better is not None else "absolute"
    abs_order = top_order(importance(scores.scores, "absolute", None))
    cpr_order = top_order(importance(scores.scores, cpr_ranking, scores.better))
    m_abs = ev.curve(abs_order, counts)
    m_cpr = m_abs if np.array_equal(abs_order, cpr_order) else ev.curve(cpr_order, counts)
    f_cpr, f_abs = norm(m_cpr), norm(m_abs)
    cpr, cmd = mib_areas(fr, f_cpr, f_abs)
    rng = np.random.default_rng(seed)
    rand = [norm(ev.curve(rng.permutation(n), counts)) for _ in tqdm(range(n_random), disable=not progress)]
    r = np.asarray(rand, dtype=float).reshape(n_random, len(fr))
    areas = np.asarray([mib_areas(fr, f, f) for f in r], dtype=float).reshape(n_random, 2)
    return FaithfulnessCurve(
        method=scores.method,
        ablation=ablation,
        fractions=fr,
        edge_counts=tuple(counts),
        metric_full=m_full,
        metric_empty=m_empty,
        cpr_ranking=cpr_ranking,
        metric_values=tuple(m_cpr),
        faithfulness=tuple(f_cpr),
        faithfulness_absolute=tuple(f_abs),
        cpr=cpr,
        cmd=cmd,
        random_mean=tuple(_mean(r)),
        random_sd=tuple(_sd(r)),
        random_cpr=float(_mean(areas[:, 0])),
        random_cpr_sd=float(_sd(areas[:, 0])),
        random_cmd=float(_mean(areas[:, 1])),
        random_cmd_sd=float(_sd(areas[:, 1])),
        n_random=n_random,
        seed=seed,
        forward_passes=fwd + ev.forwards,
        seconds=time.perf_counter() - t0,
    )


def _mean(a: np.ndarray):
    return np.full(a.shape[1:], np.nan) if len(a) == 0 else a.mean(0)


def _sd(a: np.ndarray):
    return np.full(a.shape[1:], np.nan) if len(a) < 2 else a.std(0, ddof=1)


def circuit_faithfulness(
    model, edges, clean: Any, corrupted: Any = None, *, metric, ablation: str = "patch", curve=None
) -> dict[str, float]:
    """``{"metric", "metric_full", "metric_empty", "faithfulness", "edges", "forward_passes"}`` of one circuit,
    given as edge names (``"s->n<slot>"`` or ``[s, n, slot]``), a :class:`~mechscope.core.graphs.results.Circuit`, or
    indices.
    ``curve``: a :class:`FaithfulnessCurve` made with the same ablation on the same batch, whose full model and empty
    circuit are taken instead of being run again (one forward pass then, not three)."""
    check_model(model)
    g = model.graph
    if hasattr(edges, "edges") and not isinstance(edges, np.ndarray):
        edges = edges.edges
    ids = sorted({e for spec in edges for e in ((int(spec),) if _is_index(spec) else g.parse_edge(spec))})
    if any(not 0 <= e < g.n_edges for e in ids):
        raise MechscopeError(f"edge index out of range 0..{g.n_edges - 1}")
    source, _, fwd = ablation_values(model, clean, corrupted, ablation)
    ev = _Evaluator(model, clean, metric, source)
    if curve is not None and curve.ablation != ablation:
        raise MechscopeError(f"the curve was made with {curve.ablation} ablation, not {ablation}")
    if curve is None:
        m_full, m_empty = ev(np.arange(g.n_edges)), ev(np.zeros(0, dtype=np.int64))
    else:
        m_full, m_empty = curve.metric_full, curve.metric_empty
    m = ev(np.asarray(ids, dtype=np.int64))
    f = normalised(m, m_full, m_empty) if m_full != m_empty else math.nan
    return {"metric": m, "metric_full": m_full, "metric_empty": m_empty, "faithfulness": f, "edges": len(ids),
            "forward_passes": fwd + ev.forwards}


def _is_index(spec) -> bool:
    return isinstance(spec, (int, np.integer)) and not isinstance(spec, bool)
