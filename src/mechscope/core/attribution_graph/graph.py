"""The attribution graph as a result: its nodes, pruned edges, scores and annotations; circuit-tracer's JSON.

Node ids follow circuit-tracer (so that annotations and exports line up with the tools people use):

* a feature ``"{layer}_{feature}_{pos}"``, an error node ``"{layer}_-1_{pos}"``;
* an input (a token embedding, a pixel) ``"E_{index}_{pos}"``;
* a logit ``"{n_layers + 1}_{index}_{pos}"``.

``layer`` is the dictionary's layer (a transformer block, a CNN stage), ``pos`` the position in that layer's grid
(a token; a CNN map's ``y * width + x``), ``ctx`` the column the viewer draws it in (the token position; the
receptive field's centre column in pixels). Every number a node shows is a field of its record.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch

from mechscope.core.attribution_graph.build import Built
from mechscope.core.attribution_graph.influence import Triplets, graph_scores, prune
from mechscope.core.errors import MechscopeError, RunError
from mechscope.core.results import Result, figure_data

KINDS = ("feature", "error", "input", "logit")


@dataclass(frozen=True)
class NodeInfo:
    """What a wing knows of each source and logit, column by column (tensors; ``*_ctx`` floats)."""

    feature_layer: torch.Tensor
    feature_pos: torch.Tensor
    feature_index: torch.Tensor
    feature_activation: torch.Tensor
    feature_ctx: torch.Tensor
    error_layer: torch.Tensor
    error_pos: torch.Tensor
    error_ctx: torch.Tensor
    error_norm: torch.Tensor
    input_pos: torch.Tensor
    input_index: torch.Tensor
    input_ctx: torch.Tensor
    input_labels: list[str]
    logit_index: torch.Tensor
    logit_labels: list[str]
    logit_weights: torch.Tensor
    logit_pos: int
    logit_ctx: float
    n_layers: int
    pos_labels: dict = field(default_factory=dict)  # (layer, pos) -> a readable position, when not the input's


def node_id(kind: str, layer: int, index: int, pos: int, n_layers: int) -> str:
    if kind == "feature":
        return f"{layer}_{index}_{pos}"
    if kind == "error":
        return f"{layer}_-1_{pos}"
    if kind == "input":
        return f"E_{index}_{pos}"
    return f"{n_layers + 1}_{index}_{pos}"


def target_title(target: str, label: str = "") -> str:
    """A target (a logit or a feature node) as a reader names it: a logit by its token text (quoted), a feature by
    its id; the id where no label was given."""
    return repr(label) if label and label != target else target


def assemble(
    built: Built, info: NodeInfo, node_threshold: float = 0.8, edge_threshold: float = 0.98, all_inputs: bool = True
) -> dict:
    """The graph's fields from the computed rows: the feature nodes that got rows, every error, input and logit;
    scores of the whole graph and of the pruned one; the pruned graph's nodes and edges (exact weights).
    ``all_inputs``: show every input node (a prompt's tokens), or only those with a kept edge (an image's pixels)."""
    nf, ne, nt, nl = built.n_features, built.n_errors, built.n_inputs, built.n_logits
    sel = built.visited.nonzero().squeeze(1)  # graph features, in index order
    ns = len(sel)
    gmap = torch.full((built.n,), -1, dtype=torch.long)
    gmap[sel] = torch.arange(ns)
    gmap[nf:] = torch.arange(ns, ns + ne + nt + nl)
    t = built.triplets
    keep = (gmap[t.rows] >= 0) & (gmap[t.cols] >= 0)
    n = ns + ne + nt + nl
    full = Triplets(gmap[t.rows[keep]], gmap[t.cols[keep]], t.values[keep].float(), n)
    weights = torch.zeros(n, dtype=torch.float64)
    weights[ns + ne + nt :] = info.logit_weights.double()
    kind = torch.zeros(n, dtype=torch.long)  # 0 feature, 1 error, 2 input, 3 logit
    kind[ns : ns + ne] = 1
    kind[ns + ne : ns + ne + nt] = 2
    kind[ns + ne + nt :] = 3
    errors, inputs = kind == 1, kind == 2
    scores = graph_scores(full, weights, errors, inputs)
    pr = prune(
        full,
        weights,
        always=kind >= 2,
        sources_only=(kind == 1) | (kind == 2),
        node_threshold=node_threshold,
        edge_threshold=edge_threshold,
    )
    pruned = full.mask(pr.edges)
    pruned_scores = graph_scores(pruned, weights, errors & pr.nodes, inputs)
    has_edge = torch.zeros(n, dtype=torch.bool)
    has_edge[pruned.rows] = True
    has_edge[pruned.cols] = True
    shown = pr.nodes & (has_edge | (kind == 3) | ((kind == 2) if all_inputs else torch.zeros_like(has_edge)))
    nodes, index = [], {}
    for g in shown.nonzero().squeeze(1).tolist():
        rec = _node(g, int(kind[g]), sel, ns, ne, nt, info)
        rec["influence"] = float(pr.cumulative[g])
        rec["influence_raw"] = float(pr.influence[g])
        index[g] = len(nodes)
        nodes.append(rec)
    edges = [
        (index[int(c)], index[int(r)], float(v))
        for r, c, v in zip(pruned.rows.tolist(), pruned.cols.tolist(), pruned.values.tolist(), strict=True)
        if int(r) in index and int(c) in index
    ]
    edges.sort(key=lambda e: -abs(e[2]))
    return {
        "nodes": tuple(nodes),
        "edges": tuple(edges),
        "scores": {
            "replacement": scores["replacement"],
            "completeness": scores["completeness"],
            "replacement_pruned": pruned_scores["replacement"],
            "completeness_pruned": pruned_scores["completeness"],
        },
        "counts": {
            "active_features": nf,
            "feature_nodes": ns,
            "error_nodes": ne,
            "input_nodes": nt,
            "logit_nodes": nl,
            "nodes_pruned": len(nodes),
            "edges_stored": int(full.values.numel()),
            "edges_pruned": len(edges),
            "rows": built.rows,
            "backward_passes": built.batches,
            "entries_dropped": built.dropped,
        },
        "full": {
            "rows": full.rows,
            "cols": full.cols,
            "values": full.values,
            "kind": kind,
            "features": sel,
            "influence": pr.influence.float(),
            "kept": pr.nodes,
        },
    }


def _node(g: int, kind: int, sel: torch.Tensor, ns: int, ne: int, nt: int, info: NodeInfo) -> dict:
    if kind == 0:
        f = int(sel[g])
        layer, pos, idx = int(info.feature_layer[f]), int(info.feature_pos[f]), int(info.feature_index[f])
        return {
            "id": node_id("feature", layer, idx, pos, info.n_layers),
            "kind": "feature",
            "layer": layer,
            "pos": pos,
            "ctx": float(info.feature_ctx[f]),
            "feature": idx,
            "activation": float(info.feature_activation[f]),
            "source": f,
        }
    if kind == 1:
        e = g - ns
        layer, pos = int(info.error_layer[e]), int(info.error_pos[e])
        return {
            "id": node_id("error", layer, -1, pos, info.n_layers),
            "kind": "error",
            "layer": layer,
            "pos": pos,
            "ctx": float(info.error_ctx[e]),
            "feature": -1,
            "activation": float(info.error_norm[e]),
            "source": g - ns + len(info.feature_layer),
        }
    if kind == 2:
        i = g - ns - ne
        pos, idx = int(info.input_pos[i]), int(info.input_index[i])
        return {
            "id": node_id("input", -1, idx, pos, info.n_layers),
            "kind": "input",
            "layer": -1,
            "pos": pos,
            "ctx": float(info.input_ctx[i]),
            "feature": idx,
            "activation": None,
            "label": info.input_labels[i],
            "source": i + len(info.feature_layer) + len(info.error_layer),
        }
    j = g - ns - ne - nt
    idx = int(info.logit_index[j])
    return {
        "id": node_id("logit", info.n_layers, idx, info.logit_pos, info.n_layers),
        "kind": "logit",
        "layer": info.n_layers,
        "pos": info.logit_pos,
        "ctx": float(info.logit_ctx),
        "feature": idx,
        "activation": None,
        "label": info.logit_labels[j],
        "probability": float(info.logit_weights[j]),
        "logit": j,
    }


# ---- the result ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttributionGraph(Result):
    """One attribution graph (Ameisen et al. 2025): the pruned nodes and edges with exact weights, the scores of
    the whole and of the pruned graph, the settings and the checks made, and the annotations (pinned nodes,
    supernodes) a person added in the viewer. ``edges``: (source node index, target node index, weight) with the
    weight the direct effect of the source on the target (a feature's pre-activation, a logit minus the mean
    logit). ``full`` (not in the JSON; saved beside as ``graph_full.safetensors``) is the unpruned graph."""

    SCHEMA: ClassVar[str | None] = None  # each wing's subclass names its own (mechscope.lm_graph/1, ...)
    FILE: ClassVar[str] = "graph.json"

    kind: str  # "lm" or "cnn"
    model: str
    title: str
    input_labels: tuple[str, ...]
    layer_names: tuple[str, ...]
    nodes: tuple[dict, ...]
    edges: tuple[tuple[int, int, float], ...]
    scores: dict
    counts: dict
    settings: dict
    exactness: dict = field(default_factory=dict)
    checks: tuple[dict, ...] = ()
    dictionaries: dict = field(default_factory=dict)
    dashboards: dict = field(default_factory=dict)
    qk: tuple[dict, ...] = ()
    paths: tuple[dict, ...] = ()
    seconds: dict = field(default_factory=dict)
    pinned: tuple[str, ...] = ()
    supernodes: tuple[dict, ...] = ()
    full: Any = figure_data()
    work: dict | None = None  # forward and backward passes through the model's layers, in passes over the one input
    # (a prompt's tokens, one image), by phase, beside the graph's own count of its backward passes (see PhaseWork)

    def __post_init__(self) -> None:
        check_graph_record(self.to_dict(), "attribution graph", self.SCHEMA)

    # ---- reading --------------------------------------------------------------------------------

    def node(self, node_id: str) -> dict:
        for n in self.nodes:
            if n["id"] == node_id:
                return n
        raise MechscopeError(f"no node {node_id!r} in this graph (pruned nodes are not kept)")

    def index_of(self, node_id: str) -> int:
        for i, n in enumerate(self.nodes):
            if n["id"] == node_id:
                return i
        raise MechscopeError(f"no node {node_id!r} in this graph (pruned nodes are not kept)")

    def inputs_of(self, node_id: str, n: int | None = None) -> list[tuple[dict, float]]:
        """The kept edges into ``node_id``, largest first: (source node, weight)."""
        i = self.index_of(node_id)
        out = [(self.nodes[s], w) for s, t, w in self.edges if t == i]
        return sorted(out, key=lambda x: -abs(x[1]))[:n]

    def outputs_of(self, node_id: str, n: int | None = None) -> list[tuple[dict, float]]:
        """The kept edges out of ``node_id``, largest first: (target node, weight)."""
        i = self.index_of(node_id)
        out = [(self.nodes[t], w) for s, t, w in self.edges if s == i]
        return sorted(out, key=lambda x: -abs(x[1]))[:n]

    def features(self) -> list[dict]:
        """The feature nodes, most influential first."""
        return sorted((n for n in self.nodes if n["kind"] == "feature"), key=lambda n: n["influence"])

    def annotated(self, pinned=(), supernodes=()) -> AttributionGraph:
        """A copy with these annotations (each supernode ``{"label": str, "members": [node ids]}``)."""
        return replace(self, pinned=tuple(pinned), supernodes=tuple(dict(s) for s in supernodes))

    @classmethod
    def from_dict(cls, data: dict):
        check_graph_record(data, "graph JSON", cls.SCHEMA)
        return super().from_dict(data)

    # ---- export ---------------------------------------------------------------------------------

    def to_circuit_tracer(self, slug: str = "graph") -> dict:
        """This graph in circuit-tracer's graph JSON (its frontend's ``Model``: metadata, qParams, nodes, links)."""
        n_layers = len(self.layer_names)
        out_nodes = []
        for n in self.nodes:
            k, layer, pos = n["kind"], n["layer"], n["pos"]
            ctx = int(n["pos"]) if self.kind == "lm" else int(round(n["ctx"]))
            base = {
                "node_id": n["id"],
                "ctx_idx": ctx,
                "token_prob": 0.0,
                "is_target_logit": False,
                "run_idx": 0,
                "reverse_ctx_idx": 0,
                "clerp": n.get("label", "") or "",
                "influence": n.get("influence"),
                "activation": n.get("activation"),
            }
            if k == "feature":
                f = n["feature"]
                base |= {
                    "feature": (layer + f) * (layer + f + 1) // 2 + f,
                    "layer": str(layer),
                    "feature_type": "cross layer transcoder",
                    "jsNodeId": f"{layer}_{f}-0",
                }
            elif k == "error":
                base |= {
                    "feature": -1,
                    "layer": str(layer),
                    "feature_type": "mlp reconstruction error",
                    "jsNodeId": f"{layer}_-1-{pos}",
                    "activation": None,
                }
            elif k == "input":
                base |= {
                    "feature": pos,
                    "layer": "E",
                    "feature_type": "embedding",
                    "jsNodeId": f"E_{n['feature']}-{pos}",
                }
            else:
                p = n.get("probability", 0.0)
                base |= {
                    "feature": n["feature"],
                    "layer": str(n_layers + 1),
                    "feature_type": "logit",
                    "token_prob": p,
                    "is_target_logit": n.get("logit", 0) == 0,
                    "jsNodeId": f"L_{n['feature']}-{pos}",
                    "clerp": f'Output "{n.get("label", "")}" (p={p:.3f})',
                }
            out_nodes.append(base)
        links = [{"source": self.nodes[s]["id"], "target": self.nodes[t]["id"], "weight": w} for s, t, w in self.edges]
        return {
            "metadata": {
                "slug": slug,
                "scan": f"mechscope-{self.model}",
                "transcoder_list": list(self.dictionaries.get("paths", [])),
                "prompt_tokens": list(self.input_labels) if self.kind == "lm" else [],
                "prompt": self.title,
                "node_threshold": self.settings.get("node_threshold"),
                "schema_version": 1,
            },
            "qParams": {
                "pinnedIds": list(self.pinned),
                "supernodes": [[s["label"], *s["members"]] for s in self.supernodes],
                "linkType": "both",
                "clickedId": "",
                "sg_pos": "",
            },
            "nodes": out_nodes,
            "links": links,
        }


# ---- the work a graph command did ------------------------------------------------------------------------


class PhaseWork:
    """One :class:`~mechscope.core.torch_utils.WorkCounter`'s counts, in total and split by the phases of a graph
    command (``with work.phase("graph"): ...``; a phase entered twice adds up), and with a ``timer`` each phase
    timed as a section of the same name.

    What the counter sees of a graph: its layers (a transformer's blocks, a CNN's stage convolutions) run for the
    model's own passes and for every run of the replacement model, which is the model with hooks (nonlinearities
    frozen, each dictionary's output in place of the part it replaces); the kept pass the rows are read from is
    ``batch_size`` copies of the input. Each of the graph's backward passes (``counts["backward_passes"]``, one per
    batch of rows, always over those copies) counts only the layers whose output its gradient reaches, and the
    gradient stops at the dictionaries' outputs. In a transformer: every block for a logit's row, and for a
    feature's row the blocks below the feature's layer (the residual stream carries the gradient past the replaced
    MLPs; the attention of the feature's own block, which its gradient crosses too, is not counted). In a CNN, whose
    stages are chained through their replaced outputs: no convolution for a logit's row, the feature's own stage's
    for a feature's row (more where a dictionary has a skip path, which passes the gradient on to its input). Not
    counted at all: the dictionaries' encoders and decoders, the read-out (unembedding, fully connected layers), and
    the training steps of dictionaries trained in the command (the harvest of their activations is counted).
    """

    def __init__(self, counter, timer=None) -> None:
        self.counter = counter
        self.timer = timer  # a Timer: each phase is timed as a section of the same name too
        self.rows: dict[str, tuple[int, int]] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        c = self.counter
        f, b = c.forward_rows, c.backward_rows
        try:
            with self.timer.section(name) if self.timer is not None else nullcontext():
                yield
        finally:
            pf, pb = self.rows.get(name, (0, 0))
            self.rows[name] = (pf + c.forward_rows - f, pb + c.backward_rows - b)

    def report(self, what: str, rows_per_pass: int, counts: dict, batch_size: int, not_counted: str) -> dict:
        """The counter's :meth:`~mechscope.core.torch_utils.WorkCounter.report` (the log line included), with
        ``phases`` (each phase's passes) and ``graph`` (the graph's own count of its rows and backward passes, and the
        copies of the input each backward pass runs over)."""
        work = self.counter.report(what, rows_per_pass)
        n = max(len(self.counter.layers), 1) * max(rows_per_pass, 1)
        work["phases"] = {
            k: {"forward_passes": round(f / n, 3), "backward_passes": round(b / n, 3)}
            for k, (f, b) in self.rows.items()
        }
        work["graph"] = {"rows": counts["rows"], "backward_passes": counts["backward_passes"], "copies": batch_size}
        work["not_counted"] = not_counted
        return work


# ---- checking a record ---------------------------------------------------------------------------


def _fail(what: str, msg: str):
    raise RunError(f"{what}: {msg}")


def check_graph_record(d: Any, what: str = "graph JSON", schema: str | None = None) -> None:
    """Refuse, in one line naming the field, a graph record that the viewer or the loader could not use
    (``schema``: the header it must carry, when it carries one)."""
    if not isinstance(d, dict):
        _fail(what, f"expected a JSON object, got {type(d).__name__}")
    got = d.get("schema")
    if (
        schema is not None
        and got is not None
        and (not isinstance(got, str) or got.split("/")[0] != schema.split("/")[0])
    ):
        _fail(what, f"expected schema {schema}, got {got!r}")
    if got is None and not {"nodes", "edges"} & set(d):  # another JSON altogether (a run's config.json, say)
        _fail(what, "not a graph JSON (no schema, nodes or edges): give a graph.json that lm/cnn graph wrote")
    for key, tp in (
        ("kind", str),
        ("model", str),
        ("title", str),
        ("nodes", (list, tuple)),
        ("edges", (list, tuple)),
        ("layer_names", (list, tuple)),
        ("input_labels", (list, tuple)),
        ("scores", dict),
        ("counts", dict),
        ("settings", dict),
    ):
        if key not in d:
            _fail(what, f"missing field {key!r}")
        if not isinstance(d[key], tp):
            _fail(what, f"field {key!r} has the wrong type ({type(d[key]).__name__})")
    if d["kind"] not in ("lm", "cnn"):
        _fail(what, f"field 'kind' must be 'lm' or 'cnn', got {d['kind']!r}")
    ids = set()
    for i, n in enumerate(d["nodes"]):
        if not isinstance(n, dict):
            _fail(what, f"nodes[{i}] is not an object")
        for key in ("id", "kind", "layer", "pos", "ctx", "feature", "influence"):
            if key not in n:
                _fail(what, f"nodes[{i}] has no {key!r}")
        if not isinstance(n["id"], str) or n["id"] in ids:
            _fail(what, f"nodes[{i}] has a missing or repeated id {n['id']!r}")
        if n["kind"] not in KINDS:
            _fail(what, f"nodes[{i}].kind must be one of {', '.join(KINDS)}, got {n['kind']!r}")
        for key in ("layer", "pos", "feature"):
            if isinstance(n[key], bool) or not isinstance(n[key], int):
                _fail(what, f"nodes[{i}].{key} must be an integer, got {n[key]!r}")
        for key in ("ctx", "influence"):
            if not _number(n[key]):
                _fail(what, f"nodes[{i}].{key} must be a finite number, got {n[key]!r}")
        ids.add(n["id"])
    count = len(d["nodes"])
    for i, e in enumerate(d["edges"]):
        if not isinstance(e, (list, tuple)) or len(e) != 3:
            _fail(what, f"edges[{i}] must be [source, target, weight]")
        s, t, w = e
        for v in (s, t):
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < count:
                _fail(what, f"edges[{i}] names node {v!r}, not an index below {count}")
        if not _number(w):
            _fail(what, f"edges[{i}] has weight {w!r}, not a finite number")
    pinned = d.get("pinned", [])
    if not isinstance(pinned, (list, tuple)) or any(p not in ids for p in pinned):
        bad = next((p for p in pinned if p not in ids), pinned) if isinstance(pinned, (list, tuple)) else pinned
        _fail(what, f"pinned names {bad!r}, not a node of this graph")
    sup = d.get("supernodes", [])
    if not isinstance(sup, (list, tuple)):
        _fail(what, "supernodes must be a list")
    for i, s in enumerate(sup):
        if not isinstance(s, dict) or not isinstance(s.get("label"), str) or not isinstance(s.get("members"), list):
            _fail(what, f'supernodes[{i}] must be {{"label": text, "members": [node ids]}}')
        bad = [m for m in s["members"] if m not in ids]
        if bad:
            _fail(what, f"supernodes[{i}] ({s['label']!r}) names {bad[0]!r}, not a node of this graph")


def _number(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)


def load_graph(path, cls: type[AttributionGraph] = AttributionGraph) -> AttributionGraph:
    """A graph JSON (ours, as written by a command or downloaded from the viewer), checked field by field, as
    ``cls`` (a wing's subclass checks its schema header too)."""
    from pathlib import Path

    p = Path(path)
    if p.is_dir():
        p = p / AttributionGraph.FILE
    from mechscope.core.validate import read_strict_json

    data = read_strict_json(p, "graph JSON")
    try:
        check_graph_record(data, str(p), cls.SCHEMA)
        return cls.from_dict(data)
    except RunError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise RunError(f"{p}: not a readable graph JSON ({type(e).__name__}: {e})") from None
