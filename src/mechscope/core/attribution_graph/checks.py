"""Checking a graph against its model: edges against direct interventions, and interventions against predictions.

Both wings call these with small callables over their local replacement model:

* ``measure_direct(scale)`` -> (pre-activations of the active features [N], attributed logits [n_logits]) in the
  frozen replacement model with every source fixed, after scaling the source ``scale = (index, factor)`` (None:
  unchanged). Scaling a source by 2 must move every target by exactly its edge (the graph is linear);
* ``measure(mode, changes)`` -> the attributed logits (minus their mean) after setting features to new values.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise

import torch

from mechscope.core.attribution_graph.build import Built
from mechscope.core.attribution_graph.graph import AttributionGraph
from mechscope.core.attribution_graph.influence import Triplets
from mechscope.core.attribution_graph.predict import propagate
from mechscope.core.errors import MechscopeError
from mechscope.core.results import Result
from mechscope.core.validate import check_int, repeated

MEASURED = ("frozen", "recomputed", "model")
# the prediction and the measurements in the order that each releases one more thing the one before holds fixed:
# the graph holds each dictionary's active set fixed, the frozen run re-encodes the features downstream, the
# recomputed run lets the attention patterns and norms (a CNN's ReLU masks and max-pool choices) move too, and the
# model runs the layers the dictionaries replace (their error nodes no longer fixed)
STEPS = ("predicted_full", *MEASURED)
GAP_FACTOR = 2.0  # two steps disagree when they differ in sign or one is more than this times the other
GAP_FLOOR = 1e-3  # ... and by more than this (in logits): float noise around zero is no disagreement


def disagree(a: float, b: float, factor: float = GAP_FACTOR, floor: float = GAP_FLOOR) -> bool:
    """Whether two changes of a logit disagree: in sign or by more than ``factor``, and by more than ``floor``."""
    if abs(a - b) <= floor:
        return False
    return a * b <= 0 or max(abs(a), abs(b)) > factor * min(abs(a), abs(b))


def gaps(row: dict, factor: float = GAP_FACTOR, floor: float = GAP_FLOOR) -> list[tuple[str, str]]:
    """The neighbouring steps of :data:`STEPS` that disagree (:func:`disagree`) on one logit's row of a
    :class:`GraphIntervention`, as (step, next step); a step with no finite number in ``row`` is passed over."""
    have = [k for k in STEPS if isinstance(row.get(k), (int, float)) and math.isfinite(row[k])]
    return [(a, b) for a, b in pairwise(have) if disagree(row[a], row[b], factor, floor)]


def check_edges(built: Built, measure_direct: Callable, n: int, seed: int = 0) -> dict:
    """Scale ``n`` sources (features with rows, errors, inputs; drawn with ``seed``) by 2, one at a time; compare the
    measured change of every computed target (pre-activations of the features with rows, the logits) with the
    stored edges (an edge not stored counts as 0): the largest absolute and relative error."""
    t = built.triplets
    nf, ne, nt = built.n_features, built.n_errors, built.n_inputs
    g = torch.Generator().manual_seed(seed)
    feats = built.visited.nonzero().squeeze(1)
    pool = torch.cat([feats, torch.arange(nf, nf + ne + nt)])
    chosen = pool[torch.randperm(len(pool), generator=g)[:n]]
    pre0, out0 = measure_direct(None)
    worst = scale = 0.0
    for src in chosen.tolist():
        pre1, out1 = measure_direct((src, 2.0))
        col = t.cols == src
        pred = torch.zeros(built.n)
        pred[t.rows[col]] = t.values[col].float()
        got = torch.cat([(pre1 - pre0)[feats].float(), (out1 - out0).float()])
        want = torch.cat([pred[feats], pred[nf + ne + nt :]])
        if got.numel():
            worst = max(worst, float((got - want).abs().max()))
            scale = max(scale, float(want.abs().max()))
    return {
        "edges_sources_checked": len(chosen),
        "edges_max_abs_error": worst,
        "edges_largest": scale,
        "edges_max_rel_error": worst / scale if scale > 0 else 0.0,
    }


@dataclass(frozen=True)
class GraphIntervention(Result):
    """Features set to new values (``changes``: node id -> [old, new]) and the change of each attributed logit
    (minus the mean logit): ``predicted_full`` through every computed edge, ``predicted_pruned`` through the pruned
    graph alone (both hold every dictionary's active set fixed), then measured: ``frozen`` (attention patterns and
    norm scales, or a CNN's ReLU masks and max-pool choices, and the error nodes held at their values on the input;
    every dictionary's features downstream re-encoded from their inputs, so they can switch on or off),
    ``recomputed`` (the same with the attention and norms, or the masks and pools, live; errors still fixed) and
    ``model`` (the original network, the decoder change added where the dictionary writes). :meth:`summary` names
    the neighbouring steps that disagree (:func:`gaps`) on the first logit."""

    description: str
    changes: dict
    logits: tuple[dict, ...]

    def summary(self) -> str:
        top = self.logits[0]
        flags = "".join(
            f"; {a.replace('predicted_full', 'graph')} vs {b} disagree ({_how(top[a], top[b])}): "
            + GAP_SUMMARY.get((a, b), "what the graph holds fixed changes")
            for a, b in gaps(top)
        )
        return (
            f"{self.description}: logit {top['label']!r} moves {top['frozen']:+.3f} (frozen), "
            f"{top['recomputed']:+.3f} (recomputed), {top['model']:+.3f} (model); the graph predicts "
            f"{top['predicted_full']:+.3f} (all edges), {top['predicted_pruned']:+.3f} (pruned graph){flags}"
        )


GAP_SUMMARY = {  # the CLI line's short diagnosis of each step that disagrees (the page says more)
    ("predicted_full", "frozen"): "features downstream switch on or off (or have no row), which the linear graph "
    "holds fixed",
    ("frozen", "recomputed"): "what the frozen run freezes changes (a transformer's attention and norms, a CNN's "
    "ReLU masks and max pools)",
    ("recomputed", "model"): "the error nodes change (the layers the dictionaries replace respond otherwise)",
}


def _how(a: float, b: float) -> str:
    """How the change ``a`` of one step differs from ``b`` of the next: in sign, or by a ratio."""
    if a * b < 0:
        return "opposite signs"
    if a == 0 or b == 0:
        return "one does not move"
    return f"ratio {abs(a / b):.2g}"


def predict(
    graph: AttributionGraph, activation: torch.Tensor, source_id: Callable[[int], str], delta: dict[int, float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``graph`` predicts for source changes ``delta`` (source index -> change of activation): the change of
    each attributed logit through every computed edge (``graph.full``) and through the pruned graph's edges alone.
    ``activation`` [N]: every active feature's activation."""
    f = graph.full
    if f is None:
        raise MechscopeError("this graph keeps no unpruned edges (it was loaded from JSON): rebuild it to predict")
    sel = f["features"]
    gindex = {int(s): i for i, s in enumerate(sel.tolist())}
    n = len(f["kind"])
    act = torch.zeros(n)
    act[: len(sel)] = activation[sel].float()
    missing = [s for s in delta if s not in gindex]
    if missing:
        raise MechscopeError(f"{source_id(missing[0])} has no row in this graph (raise max_feature_nodes)")
    full = propagate(
        Triplets(f["rows"], f["cols"], f["values"], n), act, f["kind"] == 0, {gindex[s]: d for s, d in delta.items()}
    )
    nl = int((f["kind"] == 3).sum())
    idx = {nd["id"]: i for i, nd in enumerate(graph.nodes)}
    m = len(graph.nodes)
    src = torch.tensor([e[0] for e in graph.edges], dtype=torch.long)
    dst = torch.tensor([e[1] for e in graph.edges], dtype=torch.long)
    val = torch.tensor([e[2] for e in graph.edges], dtype=torch.float32)
    pact = torch.tensor([float(nd["activation"]) if nd["kind"] == "feature" else 0.0 for nd in graph.nodes])
    pf = torch.tensor([nd["kind"] == "feature" for nd in graph.nodes], dtype=torch.bool)
    pdelta = {idx[source_id(s)]: d for s, d in delta.items() if source_id(s) in idx}
    pr = propagate(Triplets(dst, src, val, m), pact, pf, pdelta) if pdelta else torch.zeros(m, dtype=torch.float64)
    logit_nodes = {nd["logit"]: i for i, nd in enumerate(graph.nodes) if nd["kind"] == "logit"}
    pruned = torch.tensor([float(pr[logit_nodes[j]]) if j in logit_nodes else 0.0 for j in range(nl)])
    return full[n - nl :].float(), pruned


def intervene(
    graph: AttributionGraph,
    rep,
    nodes,
    measure: Callable[[str, dict[int, float]], torch.Tensor],
    *,
    value: float | None = None,
    scale: float | None = 0.0,
    description: str = "",
) -> GraphIntervention:
    """Set the feature ``nodes`` (node ids; a supernode's members) of a wing's replacement model ``rep`` (its
    ``source_of``, ``n_features``, ``feature_activation``, ``source_id``) to ``value``, or to ``scale`` times their
    activation (default 0: ablation); measure the change of the attributed logits in every mode
    (``measure(mode, changes)``) and set it beside the graph's predictions."""
    nodes = [nodes] if isinstance(nodes, str) else list(nodes)
    if not nodes:
        raise MechscopeError("expected at least one feature node to intervene on")
    if value is None and scale is None:
        raise MechscopeError("give a value or a scale")
    sources = [_source(rep, n) for n in nodes]
    bad = [n for n, s in zip(nodes, sources, strict=True) if s >= rep.n_features]
    if bad:
        raise MechscopeError(f"{bad[0]}: only feature nodes can be steered or ablated")
    old = {s: float(rep.feature_activation[s]) for s in sources}
    new = {s: (float(value) if value is not None else old[s] * float(scale)) for s in sources}
    what = "ablate" if value is None and scale == 0 else ("steer" if value is not None else f"scale by {scale:g}")
    description = description or f"{what} {', '.join(nodes)}"
    activation, source_id = rep.feature_activation, rep.source_id
    changes = {}
    for mode in MEASURED:
        changes[mode] = measure(mode, new) - measure(mode, {})
    full, pruned = predict(graph, activation, source_id, {s: new[s] - old[s] for s in sources})
    labels = {nd["logit"]: nd.get("label", "") for nd in graph.nodes if nd["kind"] == "logit"}
    targets = graph.settings.get("targets", [])
    rows = []
    for j in range(len(full)):
        rows.append(
            {
                "logit": j,
                "token": targets[j] if j < len(targets) else j,
                "label": labels.get(j, str(j)),
                "predicted_full": float(full[j]),
                "predicted_pruned": float(pruned[j]),
                **{m: float(v[j]) for m, v in changes.items()},
            }
        )
    return GraphIntervention(
        description=description, changes={source_id(s): [old[s], new[s]] for s in sources}, logits=tuple(rows)
    )


FLAGS = {"batch_size": "--batch", "check_sources": "--check", "max_feature_nodes": "--max-features",
         "edges_per_row": "--edges-per-row", "node_threshold": "--node-threshold", "edge_threshold": "--edge-threshold"}


def check_graph_settings(s, thresholds=("node_threshold", "edge_threshold")) -> None:
    """The settings both wings' graphs share (``s``: their settings dataclass), one line naming the CLI's option
    and the field (``--max-features (max_feature_nodes)``) when one is out of range."""

    def name(field: str) -> str:  # a field with no option of its own (desired_logit_prob) by its name alone
        return f"{FLAGS[field]} ({field})" if field in FLAGS else field

    check_int(s.batch_size, name("batch_size"), 1, 4096)
    check_int(s.check_sources, name("check_sources"), 0, 10**6)
    if s.max_feature_nodes is not None:
        check_int(s.max_feature_nodes, name("max_feature_nodes"), 0, 10**9)
    if s.edges_per_row is not None:
        check_int(s.edges_per_row, name("edges_per_row"), 1, 10**9)
    for field in thresholds:
        v = getattr(s, field)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
            raise MechscopeError(f"{name(field)} must be between 0 and 1, got {v!r}")


def check_counts(**counts: int) -> None:
    """Counts a graph command takes (``paths``, ``dashboards``, ``examples``: 0 or more), each one line by its
    option (``--dashboards -1`` was taken as none)."""
    for field, v in counts.items():
        check_int(v, f"--{field}", 0, 10**9)


def _source(rep, node: str) -> int:
    """``rep.source_of(node)``; a node that is no source (a logit, another model's id) is named as not a feature."""
    try:
        return rep.source_of(node)
    except MechscopeError as e:
        raise MechscopeError(f"{node}: not a feature node of this graph ({e}); only feature nodes can be steered "
                             "or ablated") from None  # fmt: skip


STEER_LIMIT = 1e6  # far above any activation a graph reads; beyond it float32 arithmetic stops being meaningful


def parse_steer(text: str, example: str) -> tuple[str, float]:
    """``NODE=VALUE`` as (node, value), the value a finite number of at most :data:`STEER_LIMIT` in size; one line
    (naming ``example``, a node id of the wing) otherwise. NaN set a node to NaN, which the propagation then read
    as a cycle after minutes; inf could not be written to JSON."""
    node, _, value = text.partition("=")
    try:
        v = float(value)
    except ValueError:
        raise MechscopeError(f"--steer expects NODE=VALUE (for example {example}=3.0), got {text!r}") from None
    if not abs(v) <= STEER_LIMIT:
        raise MechscopeError(f"--steer {text!r}: the value must be a finite number of at most {STEER_LIMIT:g} in size")
    return node.strip(), v


FEATURE_ID = re.compile(r"\d+_\d+_\d+")  # LAYER_FEATURE_POS (node_id's feature form; errors have feature -1)


def check_asked(ablate=None, steer=None) -> None:
    """The interventions a graph command is asked for, checked before any work (a wing's graph trains its
    dictionaries first, which took minutes before a typo was named): each node a feature node's id, each steering
    value finite and in range, no group of ``ablate`` given twice. Whether the feature is active is for the graph."""
    for node, value in steer or []:  # the API's values, checked as the CLI's are
        parse_steer(f"{node}={value}", str(node))
    groups = [[g] if isinstance(g, str) else list(g) for g in ablate or []]  # a group may be one id (as intervene)
    for opt, nodes in [("--ablate", n) for g in groups for n in g] + [("--steer", node) for node, _ in steer or []]:
        if not isinstance(nodes, str) or not FEATURE_ID.fullmatch(nodes.strip()):
            raise MechscopeError(f"{opt} {nodes!r} is not a feature node's id LAYER_FEATURE_POS (for example 1_12_5): "
                                 "only feature nodes can be steered or ablated")  # fmt: skip
    twice = repeated(tuple(sorted(g)) for g in groups)
    if twice:  # the same intervention twice: one more row of the same numbers
        raise MechscopeError(f"--ablate {','.join(twice[0])} given more than once")


def auto_features(features: list[dict]) -> list[str]:
    """The features a graph checks itself on unasked (``features`` most influential first): the most influential,
    and, where that one is not in the earliest layer with features, that layer's most influential too. A feature of
    the last layer reaches the logits through a linear read-out, where the graph is exact by construction; one of
    the first layer reaches them through every later nonlinearity, which the graph holds fixed: the most the
    check can find."""
    if not features:
        return []
    picks = [features[0]["id"]]
    if any("layer" not in f for f in features):  # a hand-made list without layers: its first feature only
        return picks
    first = min(f["layer"] for f in features)
    if features[0]["layer"] != first:
        picks.append(next(f["id"] for f in features if f["layer"] == first))
    return picks


def asked_interventions(intervene_on, features: list[dict], auto: bool, ablate=None, steer=None) -> list:
    """The interventions a graph command was asked for, in order: with ``auto`` the features of
    :func:`auto_features` ablated one at a time, then each group of ``ablate`` (node ids) ablated, then each
    ``(node, value)`` of ``steer`` set to its value. ``intervene_on(nodes, **kw)`` is the wing's :func:`intervene` on
    its graph and replacement model."""
    check_asked(ablate, steer)
    checks = []
    for node in auto_features(features) if auto else []:
        checks.append(intervene_on([node]))
    for group in ablate or []:
        checks.append(intervene_on(group))
    for node, value in steer or []:
        checks.append(intervene_on([node], value=value, scale=None))
    return checks
