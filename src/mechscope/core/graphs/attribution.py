"""Edge attribution: EAP, EAP-IG, and the exact single-edge patching they approximate.

* EAP (Syed, Rager & Conmy 2023, "Attribution Patching Outperforms Automated Circuit Discovery",
  arXiv:2310.10348): ``score(s->r) = (out'_s - out_s) . dM/d in_r``, summed over the batch and positions, the
  first-order estimate of the metric's change when edge s->r carries the corrupted value. One forward on the
  corrupted input, one on the clean input, one backward.
* EAP-IG (Hanna, Pezzelle & Belinkov 2024, "Have Faith in Faithfulness", arXiv:2403.17806): the same with the
  gradient averaged over ``steps`` points ``alpha = k/steps`` (k = 1..steps) on the straight line from the
  corrupted to the clean input (the input nodes' outputs, or the adapter's ``interpolate``); one step is EAP.
* Edge patching: the exact change of the metric when each edge alone is removed (one forward per edge), the
  quantity EAP estimates (Nanda 2023, "Attribution Patching"; Conmy et al. 2023 use it inside ACDC).

Each score is ``M(without e) - M(clean)`` (estimated or exact); see :mod:`.results` for rankings.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from mechscope.core.errors import MechscopeError
from mechscope.core.graphs.protocol import (
    Term,
    ablation_values,
    capture,
    check_model,
    edge_attribution,
    edge_weight,
    gradients,
    metric_of,
    metric_value,
)
from mechscope.core.graphs.results import EdgeScores, check_better
from mechscope.core.validate import check_int


def _metric_or_nan(metric, output) -> float:
    return float("nan") if output is None else float(metric_value(metric, output))


def _differences(source, clean_s) -> list:
    """``source - clean`` per sender (a batch of 1 broadcasts); other batch sizes are a user error."""
    out = []
    for v, c in zip(source, clean_s, strict=True):
        if v is None or c is None:
            out.append(None)
            continue
        if v.dim() == c.dim() and v.shape[0] not in (1, c.shape[0]):
            raise MechscopeError(
                f"the replacement activations have batch size {v.shape[0]}, the run {c.shape[0]}: "
                "pass clean and corrupted batches of the same size"
            )
        out.append(v - c)
    return out


def eap(model, clean: Any, corrupted: Any = None, *, metric, ablation: str = "patch", better=None) -> EdgeScores:
    """Edge attribution patching (Syed et al. 2023): every edge's score from two forwards and one backward.

    ``score(s->r) = (out'_s - out_s) . dM/d in_r``: the gradient of the metric with respect to every receiver's
    input on the clean run, then one product with the senders' differences (:func:`edge_attribution`)."""
    check_model(model)
    check_better(better)
    t0 = time.perf_counter()
    source, corrupted_out, fwd = ablation_values(model, clean, corrupted, ablation)
    m_clean, grads, clean_s = gradients(model, clean, metric)
    scores = edge_attribution(model, _differences(source, clean_s), grads)
    return EdgeScores(
        method="eap",
        graph=model.graph,
        scores=scores.cpu().double().numpy(),
        better=better,
        settings={"ablation": ablation},
        forward_passes=fwd + 1,
        backward_passes=1,
        metric_clean=m_clean,
        metric_corrupted=_metric_or_nan(metric, corrupted_out),
        seconds=time.perf_counter() - t0,
    )


def eap_ig(model, clean: Any, corrupted: Any, *, metric, steps: int = 5, better=None) -> EdgeScores:
    """EAP with integrated gradients (Hanna et al. 2024): gradients averaged over ``steps`` interpolations."""
    check_model(model)
    check_better(better)
    steps = check_int(steps, "EAP-IG steps", 1, 1_000)  # a backward pass each: 10**8 ran without end
    if corrupted is None:
        raise MechscopeError("EAP-IG needs corrupted inputs to interpolate towards")
    t0 = time.perf_counter()
    clean_out, clean_s = capture(model, clean)
    corrupted_out, corrupted_s = capture(model, corrupted)
    diff = _differences(corrupted_s, clean_s)
    total = None
    for k in range(1, steps + 1):
        inputs, terms = _interpolation(model, clean, corrupted, corrupted_s, k / steps)
        _, grads, _ = gradients(model, inputs, metric, terms)
        total = grads if total is None else [a.add_(b) for a, b in zip(total, grads, strict=True)]
        del grads
    scores = edge_attribution(model, diff, [g / steps for g in total])
    return EdgeScores(
        method="eap-ig",
        graph=model.graph,
        scores=scores.cpu().double().numpy(),
        better=better,
        settings={"steps": steps, "ablation": "patch", "interpolate": _how(model)},
        forward_passes=2 + steps,
        backward_passes=steps,
        metric_clean=float(metric_value(metric, clean_out)),
        metric_corrupted=float(metric_value(metric, corrupted_out)),
        seconds=time.perf_counter() - t0,
    )


def _how(model) -> str:
    return "adapter" if callable(getattr(model, "interpolate", None)) else "input nodes"


def _interpolation(model, clean, corrupted, corrupted_s, alpha: float):
    """Inputs and patch terms for the point ``corrupted + alpha (clean - corrupted)``."""
    if callable(getattr(model, "interpolate", None)):
        return model.interpolate(clean, corrupted, alpha), []
    g = model.graph
    from_inputs = np.isin(g.edge_sender, [g.sender_of(n) for n in g.input_nodes()])
    w = edge_weight(model, corrupted_s)
    w[torch.as_tensor(from_inputs, device=w.device)] = 1.0 - alpha
    return clean, ([Term(w, corrupted_s)] if alpha < 1.0 else [])


def edge_patching(
    model, clean: Any, corrupted: Any = None, *, metric, ablation: str = "patch", better=None, progress=False
) -> EdgeScores:
    """The exact ``M(without e) - M(clean)`` of every edge, one forward each (what EAP approximates)."""
    check_model(model)
    check_better(better)
    t0 = time.perf_counter()
    source, corrupted_out, fwd = ablation_values(model, clean, corrupted, ablation)
    m_clean = metric_of(model, clean, metric)
    scores = np.zeros(model.graph.n_edges)
    for e in tqdm(range(model.graph.n_edges), desc="edge patching", disable=not progress):
        w = edge_weight(model, source)
        w[e] = 1.0
        scores[e] = metric_of(model, clean, metric, [Term(w, source)]) - m_clean
    return EdgeScores(
        method="edge-patching",
        graph=model.graph,
        scores=scores,
        better=better,
        settings={"ablation": ablation},
        forward_passes=fwd + 1 + model.graph.n_edges,
        metric_clean=m_clean,
        metric_corrupted=_metric_or_nan(metric, corrupted_out),
        seconds=time.perf_counter() - t0,
    )
