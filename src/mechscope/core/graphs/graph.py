"""The component graph: typed nodes, their senders and receivers, and the edges between them.

A node is a component of the model (the embeddings, an attention head, an MLP, a conv channel, the logits).
It *sends* its output (unless it is an output node such as the logits) and *receives* on zero or more named
input slots (``q``/``k``/``v`` for a head, ``in`` for an MLP or a channel, ``out`` for the unembedding, as in
tracr's ``circuit.json``). A node without slots is an input node (its output is a fixed function of the
model's input). An edge runs from a node's sender to another node's receiver slot; edges are named by the
triple ``(sender, receiver node, slot)`` and written ``"sender->node<slot>"``.

Senders, receivers and edges are numbered: ``senders[i]`` is a node index, ``receivers[j]`` a
``(node index, slot)`` pair, and edge ``e`` runs from sender ``edge_sender[e]`` to receiver
``edge_receiver[e]``. Algorithms work on these index arrays; names are for people and files.
"""

from __future__ import annotations

import heapq
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import numpy as np

from mechscope.core.errors import MechscopeError
from mechscope.core.results import Result

Edge = tuple[str, str, str]

_RECEIVER = re.compile(r"^(?P<node>[^<>]+)<(?P<slot>[^<>]+)>$")


@dataclass(frozen=True)
class Node:
    """One component: its name, kind, drawing position (``layer`` = column, ``index`` = row), input slots, and
    whether it sends an output (``sends=False`` for output nodes such as the logits).

    ``reads`` names receivers of *other* nodes whose input this node's output also depends on: in grouped-query
    attention the query heads of a group share one key and one value input, which the graph gives to the group's
    first head (``blocks.L.attn.h3<k>``) and the others read (``reads=("blocks.L.attn.h3<k>", ...)``)."""

    name: str
    kind: str = "component"
    layer: int = 0
    index: int = 0
    slots: tuple[str, ...] = ()
    sends: bool = True
    reads: tuple[str, ...] = ()  # other nodes' receivers ("node<slot>") this node's output also depends on


def _derived():
    return field(init=False, repr=False, compare=False, metadata={"json": False})


@dataclass(frozen=True)
class ComponentGraph(Result):
    """Nodes and the edges between them, checked to be a DAG (see the module docstring for the numbering)."""

    SCHEMA: ClassVar[str] = "mechscope.component_graph/1"

    nodes: tuple[Node, ...]
    edges: tuple[Edge, ...]
    senders: tuple[int, ...] = _derived()
    receivers: tuple[tuple[int, str], ...] = _derived()
    edge_sender: np.ndarray = _derived()
    edge_receiver: np.ndarray = _derived()
    topological_order: tuple[int, ...] = _derived()
    _index: dict = _derived()
    _edge_nodes: tuple = _derived()

    def __post_init__(self) -> None:
        nodes = tuple(n if isinstance(n, Node) else Node(**n) for n in self.nodes)
        nodes = tuple(n if isinstance(n.reads, tuple) else replace(n, reads=tuple(n.reads)) for n in nodes)
        object.__setattr__(self, "nodes", nodes)
        object.__setattr__(self, "edges", tuple(tuple(e) for e in self.edges))
        node_id = _node_ids(nodes)
        senders = tuple(i for i, n in enumerate(nodes) if n.sends)
        receivers = tuple((i, s) for i, n in enumerate(nodes) for s in n.slots)
        sender_id = {nodes[i].name: k for k, i in enumerate(senders)}
        receiver_id = {(nodes[i].name, s): k for k, (i, s) in enumerate(receivers)}
        es, er, edge_id = _edge_arrays(self.edges, node_id, sender_id, receiver_id)
        set_ = object.__setattr__
        set_(self, "senders", senders)
        set_(self, "receivers", receivers)
        set_(self, "edge_sender", es)
        set_(self, "edge_receiver", er)
        reads, readers = _reads(nodes, receiver_id)
        index = {"node": node_id, "sender": sender_id, "receiver": receiver_id, "edge": edge_id}
        set_(self, "_index", index | {"reads": reads, "readers": readers})
        src = np.asarray(senders, dtype=np.int64)[es] if len(es) else np.zeros(0, dtype=np.int64)
        dst = np.asarray([n for n, _ in receivers], dtype=np.int64)[er] if len(er) else np.zeros(0, dtype=np.int64)
        set_(self, "_edge_nodes", (src, dst))
        # a reader depends on every sender into the receivers it reads
        extra = [(int(a), node) for node, rs in reads.items() for r in rs for a in src[er == r].tolist()]
        set_(self, "topological_order", _topological(nodes, src, dst, extra))

    # ---- building -----------------------------------------------------------------------------

    @classmethod
    def dense(cls, nodes: Sequence[Node]) -> ComponentGraph:
        """Every sender to every receiver slot of every node in a strictly later ``layer`` (the residual stream)."""
        edges = [
            (a.name, b.name, slot) for a in nodes if a.sends for b in nodes if b.layer > a.layer for slot in b.slots
        ]
        return cls(tuple(nodes), tuple(edges))

    # ---- sizes and names ----------------------------------------------------------------------

    @property
    def n_edges(self) -> int:
        return len(self.edges)

    @property
    def n_senders(self) -> int:
        return len(self.senders)

    @property
    def n_receivers(self) -> int:
        return len(self.receivers)

    def node_id(self, name: str) -> int:
        try:
            return self._index["node"][name]
        except (KeyError, TypeError):
            raise MechscopeError(f"unknown component {name!r} (not a node of the graph)") from None

    def node(self, name: str) -> Node:
        return self.nodes[self.node_id(name)]

    def receiver_node(self, receiver: int) -> int:
        return self.receivers[receiver][0]

    def receiver_name(self, receiver: int) -> str:
        node, slot = self.receivers[receiver]
        return f"{self.nodes[node].name}<{slot}>"

    def edge_name(self, e: int) -> str:
        s, n, slot = self.edges[e]
        return f"{s}->{n}<{slot}>"

    def sender_of(self, node: int) -> int | None:
        """The sender index of node ``node`` (None for an output node)."""
        return self._index["sender"].get(self.nodes[node].name)

    def edge_id(self, sender: str, node: str, slot: str) -> int:
        try:
            return self._index["edge"][(sender, node, slot)]
        except (KeyError, TypeError):
            a, b = self.node(sender), self.node(node)
            why = (
                f"{sender!r} is an output node"
                if not a.sends
                else f"{node!r} has no input slot {slot!r}"
                if slot not in b.slots
                else f"{sender!r} does not feed {node!r}"
            )
            raise MechscopeError(f"{sender}->{node}<{slot}> is not an edge of the graph ({why})") from None

    # ---- structure ----------------------------------------------------------------------------

    def input_nodes(self) -> tuple[int, ...]:
        """Nodes that send and receive nothing (the embeddings, the image)."""
        return tuple(i for i, n in enumerate(self.nodes) if n.sends and not n.slots)

    def output_nodes(self) -> tuple[int, ...]:
        """Nodes that do not send (the logits)."""
        return tuple(i for i, n in enumerate(self.nodes) if not n.sends)

    def internal_nodes(self) -> tuple[int, ...]:
        """Nodes that both send and receive (heads, MLPs, channels): the candidates of node-level scoring."""
        return tuple(i for i, n in enumerate(self.nodes) if n.sends and n.slots)

    def receivers_of(self, node: int) -> tuple[int, ...]:
        rid = self._index["receiver"]
        n = self.nodes[node]
        return tuple(rid[(n.name, s)] for s in n.slots)

    def inputs_of(self, node: int) -> tuple[int, ...]:
        """Every receiver the node's output depends on: its own slots and those it ``reads``."""
        return self.receivers_of(node) + self._index["reads"].get(node, ())

    def readers_of(self, receiver: int) -> tuple[int, ...]:
        """Nodes other than its owner that read ``receiver`` (grouped-query attention's key/value inputs)."""
        return self._index["readers"].get(receiver, ())

    def edges_into_inputs(self, node: int) -> np.ndarray:
        """Edges into every receiver the node depends on (its own and those it reads)."""
        return self.edges_into(self.inputs_of(node))

    def edges_into(self, receivers: Iterable[int]) -> np.ndarray:
        """Indices of the edges ending at any of ``receivers``."""
        return np.flatnonzero(np.isin(self.edge_receiver, np.fromiter(receivers, dtype=np.int64)))

    def edges_into_node(self, node: int) -> np.ndarray:
        return self.edges_into(self.receivers_of(node))

    def edges_from_node(self, node: int) -> np.ndarray:
        s = self.sender_of(node)
        return np.zeros(0, dtype=np.int64) if s is None else np.flatnonzero(self.edge_sender == s)

    def edge_nodes(self) -> tuple[np.ndarray, np.ndarray]:
        """Node indices ``(from, to)`` of every edge."""
        return self._edge_nodes

    def on_path(self, edge_ids: Iterable[int]) -> np.ndarray:
        """For each of ``edge_ids``, whether it lies on a path of those edges from an input node to an output node
        (its sender reached from an input, the node it feeds, or one reading its receiver, reaching an output)."""
        send, recv = self.edge_nodes()
        hops = [(int(send[e]), {int(recv[e]), *self.readers_of(int(self.edge_receiver[e]))}) for e in edge_ids]
        fwd, back = set(self.input_nodes()), set(self.output_nodes())
        for _ in range(len(self.nodes)):  # a fixed point: each round reaches at least one node further, or stops
            before = len(fwd) + len(back)
            for s, to in hops:
                fwd |= to if s in fwd else set()
                back |= {s} if to & back else set()
            if len(fwd) + len(back) == before:
                break
        return np.asarray([s in fwd and bool(to & back) for s, to in hops], dtype=bool)

    # ---- parsing names ------------------------------------------------------------------------

    def parse_receiver(self, spec: str) -> tuple[int, tuple[str, ...]]:
        """``"node<slot>"`` or ``"node"`` (every slot) as (node index, slots)."""
        m = _RECEIVER.match(spec) if isinstance(spec, str) else None
        if m is None:
            node = self.node_id(spec)
            return node, self.nodes[node].slots
        node = self.node_id(m["node"])
        if m["slot"] not in self.nodes[node].slots:
            raise MechscopeError(f"component {m['node']!r} has no input slot {m['slot']!r}")
        return node, (m["slot"],)

    def parse_edge(self, spec: Any) -> tuple[int, ...]:
        """Edge indices named by ``"s->n<slot>"``, ``"s->n"`` (every slot that ``s`` feeds) or ``[s, n(, slot)]``."""
        if isinstance(spec, str) and "->" in spec:
            sender, _, target = (p.strip() for p in spec.partition("->"))
        elif isinstance(spec, (list, tuple)) and len(spec) in (2, 3) and all(isinstance(p, str) for p in spec):
            sender, target = spec[0], spec[1] if len(spec) == 2 else f"{spec[1]}<{spec[2]}>"
        else:
            raise MechscopeError(f"malformed edge {spec!r}: expected 'sender->node<slot>' or [sender, node, slot]")
        self.node_id(sender)
        node, slots = self.parse_receiver(target)
        name = self.nodes[node].name
        found = tuple(self._index["edge"][k] for k in ((sender, name, s) for s in slots) if k in self._index["edge"])
        if not found:
            raise MechscopeError(f"no edge from {sender!r} to {target!r} in the graph")
        return found


def _node_ids(nodes: tuple[Node, ...]) -> dict[str, int]:
    ids: dict[str, int] = {}
    for i, n in enumerate(nodes):
        if not isinstance(n.name, str) or not n.name or "->" in n.name or "<" in n.name:
            raise MechscopeError(f"bad node name {n.name!r}: a non-empty string without '->' or '<'")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (n.layer, n.index)):
            raise MechscopeError(f"node {n.name!r}: layer and index must be integers, got {n.layer!r}, {n.index!r}")
        if n.name in ids:
            raise MechscopeError(f"node {n.name!r} appears twice in the graph")
        if len(set(n.slots)) != len(n.slots):
            raise MechscopeError(f"node {n.name!r} names an input slot twice: {list(n.slots)}")
        ids[n.name] = i
    return ids


def _edge_arrays(edges, node_id, sender_id, receiver_id):
    es = np.empty(len(edges), dtype=np.int64)
    er = np.empty(len(edges), dtype=np.int64)
    edge_id: dict[Edge, int] = {}
    for e, edge in enumerate(edges):
        if len(edge) != 3 or not all(isinstance(p, str) for p in edge):
            raise MechscopeError(f"malformed edge {list(edge)!r}: expected [sender, node, slot]")
        s, n, slot = edge
        if s not in sender_id:
            what = "is an output node (it sends nothing)" if s in node_id else "is not a node"
            raise MechscopeError(f"edge {s}->{n}<{slot}>: {s!r} {what}")
        if (n, slot) not in receiver_id:
            what = f"has no input slot {slot!r}" if n in node_id else "is not a node"
            raise MechscopeError(f"edge {s}->{n}<{slot}>: {n!r} {what}")
        if edge in edge_id:
            raise MechscopeError(f"edge {s}->{n}<{slot}> appears twice")
        es[e], er[e], edge_id[edge] = sender_id[s], receiver_id[(n, slot)], e
    return es, er, edge_id


def _reads(nodes, receiver_id) -> tuple[dict[int, tuple[int, ...]], dict[int, tuple[int, ...]]]:
    """(node -> receivers it reads, receiver -> nodes that read it), checked."""
    reads: dict[int, tuple[int, ...]] = {}
    readers: dict[int, list[int]] = {}
    for i, n in enumerate(nodes):
        ids = []
        for spec in n.reads:
            m = _RECEIVER.match(spec) if isinstance(spec, str) else None
            if m is None or (m["node"], m["slot"]) not in receiver_id:
                raise MechscopeError(
                    f"node {n.name!r} reads {spec!r}, which is not a receiver 'node<slot>' of the graph"
                )
            if m["node"] == n.name:
                raise MechscopeError(f"node {n.name!r} reads its own slot {spec!r}")
            ids.append(receiver_id[(m["node"], m["slot"])])
            readers.setdefault(ids[-1], []).append(i)
        if ids:
            reads[i] = tuple(ids)
    return reads, {r: tuple(v) for r, v in readers.items()}


def _topological(nodes, src: np.ndarray, dst: np.ndarray, extra=()) -> tuple[int, ...]:
    """Kahn's algorithm on the node-level edges (``src`` -> ``dst``, and ``extra`` pairs); a cycle is a user
    error."""
    children: list[set[int]] = [set() for _ in nodes]
    indegree = [0] * len(nodes)
    for a, b in set(zip(src.tolist(), dst.tolist(), strict=True)) | set(extra):
        if a == b:
            raise MechscopeError(f"edge from {nodes[a].name!r} to itself: the graph must be acyclic")
        children[a].add(b)
        indegree[b] += 1
    ready = [(nodes[i].layer, i) for i, d in enumerate(indegree) if d == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        _, i = heapq.heappop(ready)
        order.append(i)
        for c in children[i]:
            indegree[c] -= 1
            if indegree[c] == 0:
                heapq.heappush(ready, (nodes[c].layer, c))
    if len(order) != len(nodes):
        stuck = next(nodes[i].name for i, d in enumerate(indegree) if d > 0)
        raise MechscopeError(f"the graph has a cycle (through {stuck!r}): edges must run forward")
    return tuple(order)


def transformer_graph(
    n_layers: int,
    n_heads: int,
    *,
    pos_embed: bool = True,
    n_kv_heads: int | None = None,
    mlp: bool = True,
    parallel: bool = False,
) -> ComponentGraph:
    """The standard EAP/ACDC graph of a transformer, with TransformerLens/tracr names.

    Senders: ``embed``, ``pos_embed``, every ``blocks.L.attn.hH`` and ``blocks.L.mlp``; receivers: each head's
    ``q``/``k``/``v``, each MLP's ``in`` and ``unembed``'s ``out``; every sender feeds every later receiver
    (columns: embeddings 0, block L's heads 2L+1 and MLP 2L+2, unembed 2·n_layers+1). Naming only: no model code.

    Grouped-query attention (``n_kv_heads`` < ``n_heads``): a key or value receiver is per key/value head; it
    belongs to the group's first query head (``blocks.L.attn.h{g·G}<k>``) and the group's other heads read it
    (:attr:`Node.reads`). ``mlp=False``: attention-only models. ``parallel``: the MLP reads the block's input
    (GPT-NeoX, GPT-J), so it sits in its heads' column and receives nothing from them.
    """
    if not (isinstance(n_layers, int) and isinstance(n_heads, int) and n_layers >= 1 and n_heads >= 1):
        raise MechscopeError(f"a transformer graph needs n_layers, n_heads >= 1, got {n_layers}, {n_heads}")
    kv = n_heads if n_kv_heads is None else n_kv_heads
    if not isinstance(kv, int) or kv < 1 or n_heads % kv:
        raise MechscopeError(f"{n_heads} query heads cannot share {kv} key/value heads")
    group = n_heads // kv
    nodes = [Node("embed", "input", 0, 0)]
    if pos_embed:
        nodes.append(Node("pos_embed", "input", 0, 1))
    for L in range(n_layers):
        for h in range(n_heads):
            lead = h - h % group
            if h == lead:
                nodes.append(Node(f"blocks.{L}.attn.h{h}", "head", 2 * L + 1, h, ("q", "k", "v")))
            else:
                reads = (f"blocks.{L}.attn.h{lead}<k>", f"blocks.{L}.attn.h{lead}<v>")
                nodes.append(Node(f"blocks.{L}.attn.h{h}", "head", 2 * L + 1, h, ("q",), reads=reads))
        if mlp:
            nodes.append(Node(f"blocks.{L}.mlp", "mlp", 2 * L + (1 if parallel else 2), n_heads if parallel else 0,
                              ("in",)))  # fmt: skip
    nodes.append(Node("unembed", "output", 2 * n_layers + 1, 0, ("out",), sends=False))
    return ComponentGraph.dense(nodes)
