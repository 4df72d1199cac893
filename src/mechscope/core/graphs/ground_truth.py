"""Known circuits: the ground truth of compiled transformers (tracr's ``circuit.json``) in the graph's naming.

A ``circuit.json`` (Lindner et al. 2023, "Tracr: Compiled Transformers as a Laboratory for Interpretability",
arXiv:2301.05062; the files under ``shared/data/tracr``) names components ``embed``, ``pos_embed``,
``blocks.L.attn.hH``, ``blocks.L.mlp`` and ``unembed``, and edges ``(source, target, slot)`` with slots
``q``/``k``/``v`` (heads), ``in`` (MLPs) and ``out`` (unembed): exactly the node names, slots and edge triples of
:func:`~mechscope.core.graphs.graph.transformer_graph`. Its ``edge_sets`` (``primary``: input-dependent edges,
``functional``: edges whose zero-ablation changes an output, ``all``) and ``circuit_components`` are the
positives of :func:`~mechscope.core.graphs.scoring.score_circuit`.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from mechscope.core.errors import MechscopeError
from mechscope.core.graphs.graph import ComponentGraph, transformer_graph
from mechscope.core.results import Result

_COMPONENT = re.compile(r"^(embed|pos_embed|unembed|blocks\.(\d+)\.mlp|blocks\.(\d+)\.attn\.h(\d+))$")

Triple = tuple[str, str, str]


@dataclass(frozen=True)
class KnownCircuit(Result):
    """A ground-truth circuit: its model's components, the circuit's components and its edge sets."""

    SCHEMA: ClassVar[str] = "mechscope.known_circuit/1"

    name: str
    n_layers: int
    n_heads: int
    pos_embed: bool
    components: tuple[str, ...]
    nodes: tuple[str, ...]
    edges: tuple[Triple, ...]
    edge_sets: dict[str, tuple[Triple, ...]]

    def graph(self) -> ComponentGraph:
        """The model's full edge graph (every edge a discovery method scores)."""
        return transformer_graph(self.n_layers, self.n_heads, pos_embed=self.pos_embed)

    def edge_set(self, which: str = "primary") -> tuple[Triple, ...]:
        if which not in self.edge_sets:
            raise MechscopeError(f"unknown edge set {which!r} of {self.name}: one of {', '.join(self.edge_sets)}")
        return self.edge_sets[which]


def check_known(known, graph: ComponentGraph, model: str = "the model") -> None:
    """Refuse a known circuit whose components or edges are not in ``graph`` (``model``'s): one of another model.
    ``None`` passes."""
    if known is None:
        return
    if not isinstance(known, KnownCircuit):
        raise MechscopeError(f"known must be a KnownCircuit (load_circuit reads one), got {type(known).__name__}")
    try:
        for name in known.nodes:
            graph.node_id(name)
        for edges in known.edge_sets.values():
            for edge in edges:
                graph.parse_edge(list(edge))
    except MechscopeError as e:
        raise MechscopeError(f"the known circuit {known.name!r} is of another model than {model}: {e}") from None
    theirs, ours = {n.name for n in known.graph().nodes}, {n.name for n in graph.nodes}
    if theirs != ours:  # every name exists in a larger model: its own circuit names only some of them
        raise MechscopeError(f"the known circuit {known.name!r} is of another model than {model}: its model has "
                             f"{known.n_layers} block(s) of {known.n_heads} head(s), {len(theirs)} components against "
                             f"{len(ours)} here")  # fmt: skip


def load_circuit(path) -> KnownCircuit:
    """The ``circuit.json`` at ``path`` (the file, or the model's folder), checked against its own graph."""
    if not isinstance(path, (str, os.PathLike)):
        raise MechscopeError(f"load_circuit takes a path (a tracr folder, its circuit.json), not {type(path).__name__}")
    path = Path(path)
    if path.is_dir():
        path = path / "circuit.json"
    data = _read(path)
    try:
        return _parse(data, path)
    except MechscopeError as e:
        raise MechscopeError(f"{path}: {e}") from None


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MechscopeError(f"{path}: not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise MechscopeError(f"{path}: not a readable circuit.json ({type(e).__name__})") from None
    if not isinstance(data, dict):
        raise MechscopeError(f"{path}: not a circuit.json (expected a JSON object)")
    return data


def _field(data: dict, key: str, kind: type):
    if key not in data:
        raise MechscopeError(f"not a circuit.json: no {key!r}")
    if not isinstance(data[key], kind):
        raise MechscopeError(f"{key!r} must be a {kind.__name__}, got {type(data[key]).__name__}")
    return data[key]


def _shape(components: list) -> tuple[int, int, bool]:
    """(n_layers, n_heads, has pos_embed) from the component names."""
    layers, heads = [-1], [-1]
    for c in components:
        m = _COMPONENT.match(c) if isinstance(c, str) else None
        if m is None:
            raise MechscopeError(
                f"unknown component name {c!r} (embed, pos_embed, blocks.L.attn.hH, blocks.L.mlp, unembed)"
            )
        layers.append(int(m[2] or m[3] or -1))
        heads.append(int(m[4]) if m[4] else -1)
    if max(layers) < 0 or max(heads) < 0:
        raise MechscopeError("all_components names no attention head")
    return max(layers) + 1, max(heads) + 1, "pos_embed" in components


def _triple(spec, where: str) -> Triple:
    if isinstance(spec, dict):
        spec = [spec.get("source"), spec.get("target"), spec.get("slot")]
    if not (isinstance(spec, (list, tuple)) and len(spec) == 3 and all(isinstance(p, str) for p in spec)):
        raise MechscopeError(f"malformed edge in {where}: {spec!r} (expected source, target, slot)")
    return tuple(spec)


def _check_edges(graph: ComponentGraph, triples, where: str) -> tuple[Triple, ...]:
    out = tuple(_triple(t, where) for t in triples)
    for s, n, slot in out:
        try:
            graph.edge_id(s, n, slot)
        except MechscopeError as e:
            raise MechscopeError(f"{where}: {e}") from None
    return out


def _parse(data: dict, path: Path) -> KnownCircuit:
    components = _field(data, "all_components", list)
    n_layers, n_heads, pos = _shape(components)
    graph = transformer_graph(n_layers, n_heads, pos_embed=pos)
    expected = {n.name for n in graph.nodes}
    if set(components) != expected:
        odd = sorted(expected ^ set(components))
        raise MechscopeError(f"all_components is not a full {n_layers}-block, {n_heads}-head model (see {odd[0]!r})")
    nodes = tuple(_field(data, "circuit_components", list))
    for n in nodes:
        if n not in expected:
            raise MechscopeError(f"circuit component {n!r} is not in all_components")
    edges = _check_edges(graph, _field(data, "edges", list), "edges")
    listed = set(edges)
    sets: dict[str, tuple[Triple, ...]] = {}
    for key, value in _field(data, "edge_sets", dict).items():
        if key == "note" or isinstance(value, str):
            continue
        if not isinstance(value, list):
            raise MechscopeError(f"edge_sets.{key} must be a list of edges")
        sets[key] = _check_edges(graph, value, f"edge_sets.{key}")
        extra = [t for t in sets[key] if t not in listed]
        if extra:
            raise MechscopeError(f"edge_sets.{key} lists {'->'.join(extra[0][:2])}<{extra[0][2]}>, which edges lacks")
    if "primary" not in sets:
        raise MechscopeError("edge_sets has no 'primary' set")
    if not isinstance(data.get("name") or "", str):
        raise MechscopeError(f"'name' must be a str, got {type(data['name']).__name__}")
    return KnownCircuit(
        name=data.get("name") or path.parent.name,  # absent, null or empty: the folder's name
        n_layers=n_layers,
        n_heads=n_heads,
        pos_embed=pos,
        components=tuple(components),
        nodes=nodes,
        edges=edges,
        edge_sets=sets,
    )
