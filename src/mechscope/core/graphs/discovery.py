"""One discovery run on any :class:`~mechscope.core.graphs.protocol.EdgeModel`: the wings' ``discover`` share it.

:func:`find_circuit` checks the method against the metric, scores the edges (EAP, EAP-IG, exact edge patching or
ACDC, whose default threshold is 1% of |M(clean) - M(corrupted)|), cuts the circuit (:func:`cut_circuit`) and, if
asked, draws the faithfulness curve and measures the drawn circuit alone. Each wing wraps the
:class:`CircuitSearch` it returns in its own result with its own task and comparisons.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mechscope.core.errors import MechscopeError
from mechscope.core.graphs.acdc import acdc
from mechscope.core.graphs.attribution import eap, eap_ig, edge_patching
from mechscope.core.graphs.faithfulness import (
    MIB_FRACTIONS,
    FaithfulnessCurve,
    circuit_faithfulness,
    faithfulness_curve,
)
from mechscope.core.graphs.protocol import check_model
from mechscope.core.graphs.results import (
    MAX_RANDOM,
    Circuit,
    EdgeScores,
    check_method,
    check_method_ablation,
    check_method_steps,
    check_threshold,
    edge_count,
)
from mechscope.core.validate import check_int, check_seed

DEFAULT_SIZE = 30  # edges in a circuit cut from scores when neither --size nor --threshold says


@dataclass(frozen=True)
class CircuitSearch:
    """What :func:`find_circuit` found: the scores, the circuit, the curve and the drawn circuit's own
    faithfulness (``None`` without the curve), the threshold used (ACDC's default filled in) and seconds."""

    scores: EdgeScores
    circuit: Circuit
    faithfulness: FaithfulnessCurve | None
    circuit_faithfulness: dict | None
    threshold: float | None
    seconds: dict[str, float]


def check_method_metric(method: str, metric_name: str, differentiable: bool) -> None:
    """Refuse a method the metric cannot serve: EAP and EAP-IG need gradients; EAP's are all 0 under ``kl``."""
    if method in ("eap", "eap-ig") and not differentiable:
        raise MechscopeError(f"{method} needs a differentiable metric; {metric_name!r} is not (use acdc)")
    if method == "eap" and metric_name == "kl":
        raise MechscopeError("eap scores nothing with kl: its gradient is 0 at the clean run (use eap-ig or acdc)")


def check_task_model(made_on, model) -> None:
    """Refuse a task made on another model: its metric holds that model's outputs (clean log-probabilities, the
    corrupted run's predictions). ``made_on``: the weak reference such a task keeps (None: its metric reads no
    model's outputs)."""
    if made_on is not None and made_on() is not model:
        raise MechscopeError("the task was made on another model (its metric compares with that model's outputs): "
                             "make it on this one")  # fmt: skip


def cut_circuit(scores: EdgeScores, method: str, size, threshold, default: int = DEFAULT_SIZE) -> Circuit:
    """The circuit of ``scores``: ``size`` edges (or a fraction of them); without a size, ACDC's own edges, or
    the edges whose |score| reaches ``threshold``, or the ``default`` top edges."""
    if method == "acdc" and size is None:
        return scores.circuit()
    if size is None and threshold is not None:
        return scores.circuit(int(np.sum(np.abs(scores.scores) >= threshold)))
    return scores.circuit(min(default, scores.graph.n_edges) if size is None else size)


def _finite(name: str, m0: float, m1: float, corrupted_run: bool) -> None:
    """The metric on the clean inputs, and on the corrupted ones where they run (patching, EAP-IG's baseline, ACDC's
    threshold), is a number: NaN was said as "the same metric (nan)", or as an ACDC threshold of nan never given."""
    if not math.isfinite(m0) or (corrupted_run and not math.isfinite(m1)) or math.isinf(m1):
        raise MechscopeError(f"the {name} is not finite on the clean or the corrupted inputs ({m0:g}, {m1:g})")


def _scores(edges, clean, corrupted, metric, better, method, threshold, steps, ablation, progress, name="metric"):
    args = (edges, clean, corrupted)
    kw = {"metric": metric, "better": better}
    if method == "eap":
        return eap(*args, ablation=ablation, **kw), threshold
    if method == "eap-ig":
        return eap_ig(*args, steps=steps, **kw), threshold
    if method == "edge-patching":
        return edge_patching(*args, ablation=ablation, progress=progress, **kw), threshold
    if threshold is None:
        with torch.no_grad():
            m0 = float(metric(edges.forward(clean)[0]))
            m1 = float(metric(edges.forward(corrupted)[0]))
        _finite(name, m0, m1, True)
        threshold = 0.01 * abs(m0 - m1)
    return acdc(*args, threshold=threshold, ablation=ablation, progress=progress, **kw), threshold


def find_circuit(
    edges,
    clean: Any,
    corrupted: Any,
    *,
    metric: Callable,
    better: str | None,
    metric_name: str,
    differentiable: bool,
    method: str = "eap-ig",
    size: int | float | None = None,
    threshold: float | None = None,
    steps: int | None = None,
    ablation: str = "patch",
    curve: bool = True,
    n_random: int = 5,
    seed: int = 0,
    default_size: int = DEFAULT_SIZE,
    progress: bool = False,
) -> CircuitSearch:
    """Score ``edges`` (an EdgeModel) on clean against corrupted inputs by ``method``, cut the circuit and (``curve``)
    measure the faithfulness curve and the drawn circuit; ``threshold``: ACDC's tau or, for the other methods, a cut
    on |score| (ignored for ACDC's cut, which is its own); ``steps``: EAP-IG's (None: 5; refused for the other
    methods); ``default_size``: the cut without size or threshold."""
    check_model(edges)  # a string: "'str' object has no attribute..."
    if not (isinstance(curve, (bool, np.bool_)) or (isinstance(curve, int) and curve in (0, 1))):  # "no" is true
        raise MechscopeError(f"curve must be True or False, got {curve!r}")
    n_clean, n_corrupted = (len(x) if isinstance(x, torch.Tensor) else None for x in (clean, corrupted))
    if ablation == "patch" and None not in (n_clean, n_corrupted) and n_clean != n_corrupted:  # torch's size error;
        raise MechscopeError(f"{n_clean} clean inputs and {n_corrupted} corrupted ones: patching takes one corrupted "
                             "input for each")  # mean and zero ablation read the corrupted batch as a reference set
    check_method(method)
    check_method_ablation(method, ablation, cli=False)
    steps = check_method_steps(method, steps, cli=False)
    if size is not None:
        edge_count(size, edges.graph.n_edges)  # before the scoring, not after it
    threshold = None if threshold is None else check_threshold(threshold, "threshold")
    check_method_metric(method, metric_name, differentiable)
    check_int(n_random, "n_random", 0, MAX_RANDOM)  # before the scoring, and whether or not the curve reads them
    check_seed(seed, "seed")
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    scores, threshold = _scores(edges, clean, corrupted, metric, better, method, threshold, steps, ablation, progress,
                                metric_name)  # fmt: skip
    seconds["discovery"] = time.perf_counter() - t0
    m0, m1 = scores.metric_clean, scores.metric_corrupted
    _finite(metric_name, m0, m1, ablation == "patch" or method == "eap-ig")  # else NaN: no corrupted run
    if math.isfinite(m0) and m0 == m1:  # no gap to recover (the curve divides by it; ACDC's threshold was 0): a
        # circuit of nothing was written, exit 0. Checked after the scoring, whose own passes measure the two
        raise MechscopeError(f"the clean and the corrupted inputs give the same {metric_name} ({m0:g}): nothing to "
                             "recover; choose inputs or a metric that tell them apart")  # fmt: skip
    circuit = cut_circuit(scores, method, size, threshold if method != "acdc" else None, default_size)
    faith = drawn = None
    if curve:
        t1 = time.perf_counter()
        faith = faithfulness_curve(edges, scores, clean, corrupted, metric=metric, ablation=ablation,
                                   n_random=n_random, seed=seed, fractions=MIB_FRACTIONS,
                                   progress=progress)  # fmt: skip
        drawn = circuit_faithfulness(edges, circuit, clean, corrupted, metric=metric, ablation=ablation,
                                     curve=faith)  # fmt: skip
        seconds["faithfulness"] = time.perf_counter() - t1
    return CircuitSearch(scores, circuit, faith, drawn, threshold, seconds)
