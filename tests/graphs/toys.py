"""Hand-made tiny models that implement the EdgeModel protocol, with planted circuits (pure torch, float64)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mechscope.core.graphs import ComponentGraph, Node, residual_edge_mix

ACTS = {"linear": lambda t: t, "tanh": torch.tanh}


class ResidualToy:
    """A residual stream with a transformer's edge structure: ``embed`` (x @ W_E), layers of components with
    slots ``q`` and ``k`` (out = act(in_q Wq + in_k Wk) Wo), and ``logits`` (in @ W_U)."""

    def __init__(self, W_E, heads, W_U, act: str = "linear") -> None:
        self.W_E, self.heads, self.W_U, self.act = W_E, heads, W_U, ACTS[act]
        nodes = [Node("embed", "input", 0)]
        for L, layer in enumerate(heads):
            nodes += [Node(f"blocks.{L}.h{h}", "head", L + 1, h, ("q", "k")) for h in range(len(layer))]
        nodes.append(Node("logits", "output", len(heads) + 1, 0, ("in",), sends=False))
        self.graph = ComponentGraph.dense(nodes)
        self.forwards = 0

    def forward(self, x, edit=None):
        self.forwards += 1
        g = self.graph
        senders = [None] * g.n_senders
        resid = x @ self.W_E
        senders[0] = resid
        for L, layer in enumerate(self.heads):
            names = [f"blocks.{L}.h{h}" for h in range(len(layer))]
            ids = [r for n in names for r in g.receivers_of(g.node_id(n))]
            ins = [resid + 0 for _ in ids]
            if edit is not None:
                ins = edit(ids, ins, senders)
            outs = [self.act(ins[2 * h] @ p["Wq"] + ins[2 * h + 1] @ p["Wk"]) @ p["Wo"] for h, p in enumerate(layer)]
            for n, o in zip(names, outs, strict=True):
                senders[g.sender_of(g.node_id(n))] = o
            resid = resid + sum(outs)
        ids = list(g.receivers_of(g.node_id("logits")))
        ins = [resid + 0]
        if edit is not None:
            ins = edit(ids, ins, senders)
        return ins[0] @ self.W_U, senders

    def edge_mix(self, values, weight, receivers):
        return residual_edge_mix(self.graph, values, weight, receivers)


def _head(d, m=1, q=(), k=(), o=()):
    """A component reading ``q``/``k`` dims (dim, weight) and writing ``o`` dims, width ``m``."""
    p = {n: torch.zeros(*s, dtype=torch.float64) for n, s in (("Wq", (d, m)), ("Wk", (d, m)), ("Wo", (m, d)))}
    for dim, w in q:
        p["Wq"][dim, 0] = w
    for dim, w in k:
        p["Wk"][dim, 0] = w
    for dim, w in o:
        p["Wo"][0, dim] = w
    return p


PLANTED_EDGES = {
    ("embed", "blocks.0.h0", "q"),
    ("embed", "blocks.0.h0", "k"),
    ("blocks.0.h0", "blocks.1.h0", "q"),
    ("blocks.1.h0", "blocks.2.h0", "q"),
    ("embed", "blocks.2.h0", "k"),
    ("blocks.2.h0", "logits", "in"),
    ("blocks.0.h0", "logits", "in"),
}
PLANTED_NODES = {"blocks.0.h0", "blocks.1.h0", "blocks.2.h0"}


def planted_residual(act: str = "linear") -> ResidualToy:
    """3 layers x 2 components, 43 edges; the circuit PLANTED_EDGES reads and writes its own residual dims; the
    other components read dims nothing input-dependent writes to them, write dims nothing reads, or write zero."""
    d = 12
    W_E = torch.zeros(4, d, dtype=torch.float64)
    W_E[range(4), range(4)] = 1.0
    heads = [
        [_head(d, q=[(0, 1.0)], k=[(1, 0.8)], o=[(4, 1.0)]), _head(d, q=[(2, 1.0)], k=[(3, 0.5)], o=[(10, 1.0)])],
        [_head(d, q=[(4, 1.2)], o=[(5, 1.0)]), _head(d, q=[(0, 1.0)], k=[(4, 1.0)])],  # the second writes zero
        [_head(d, q=[(5, 1.5)], k=[(0, -0.7)], o=[(6, 1.0)]), _head(d, q=[(3, 1.0)], o=[(11, 1.0)])],
    ]
    W_U = torch.zeros(d, 2, dtype=torch.float64)
    W_U[6] = torch.tensor([1.0, -1.0], dtype=torch.float64)
    W_U[4, 0] = 0.5
    return ResidualToy(W_E, heads, W_U, act)


def logit_diff(output):
    return (output[:, 0] - output[:, 1]).mean()


def batches(n: int = 32, seed: int = 0, scale: float = 1.5):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randn(n, 4, generator=g, dtype=torch.float64) * scale
    corrupted = torch.randn(n, 4, generator=g, dtype=torch.float64) * scale
    return clean, corrupted


class ConvToy:
    """``input`` (1 x 6 x 6) -> 3 channels (3x3 conv) -> 2 channels (3x3 conv) -> 2 logits (linear read-out).
    Edges: input -> conv1.cj, conv1.ci -> conv2.cj (contribution conv(a_i, W2[j, i])), conv2.cj -> logits."""

    def __init__(self, W1, b1, W2, b2, R, bR, act: str = "linear") -> None:
        self.W1, self.b1, self.W2, self.b2, self.R, self.bR = W1, b1, W2, b2, R, bR
        self.act = F.relu if act == "relu" else ACTS[act]
        nodes = [Node("input", "input", 0)]
        nodes += [Node(f"conv1.c{j}", "channel", 1, j, ("in",)) for j in range(W1.shape[0])]
        nodes += [Node(f"conv2.c{j}", "channel", 2, j, ("in",)) for j in range(W2.shape[0])]
        nodes.append(Node("logits", "output", 3, 0, ("in",), sends=False))
        edges = [("input", f"conv1.c{j}", "in") for j in range(W1.shape[0])]
        edges += [(f"conv1.c{i}", f"conv2.c{j}", "in") for j in range(W2.shape[0]) for i in range(W1.shape[0])]
        edges += [(f"conv2.c{j}", "logits", "in") for j in range(W2.shape[0])]
        self.graph = ComponentGraph(tuple(nodes), tuple(edges))

    def _stage(self, x, W, b, stage, senders, edit):
        g = self.graph
        pre = F.conv2d(x, W, b)
        ids = [g.receivers_of(g.node_id(f"conv{stage}.c{j}"))[0] for j in range(W.shape[0])]
        ins = [pre[:, j] for j in range(W.shape[0])]
        if edit is not None:
            ins = edit(ids, ins, senders)
        acts = [self.act(t) for t in ins]
        for j, a in enumerate(acts):
            senders[g.sender_of(g.node_id(f"conv{stage}.c{j}"))] = a
        return torch.stack(acts, 1)

    def forward(self, x, edit=None):
        g = self.graph
        senders = [None] * g.n_senders
        senders[0] = x[:, 0]
        a1 = self._stage(x, self.W1, self.b1, 1, senders, edit)
        a2 = self._stage(a1, self.W2, self.b2, 2, senders, edit)
        ins = [a2.flatten(1) @ self.R + self.bR]
        if edit is not None:
            ins = edit(list(g.receivers_of(g.node_id("logits"))), ins, senders)
        return ins[0], senders

    def _contribution(self, e, v):
        s, n, _ = self.graph.edges[e]
        if n == "logits":
            j, block = int(s.split(".c")[1]), v[0].numel()
            return v.flatten(1) @ self.R[j * block : (j + 1) * block]
        i, j = (0 if s == "input" else int(s.split(".c")[1])), int(n.split(".c")[1])
        W = self.W1 if n.startswith("conv1") else self.W2
        return F.conv2d(v[:, None], W[j : j + 1, i : i + 1])[:, 0]

    def edge_mix(self, values, weight, receivers):
        out = []
        for r in receivers:
            acc = None
            for e in self.graph.edges_into([r]).tolist():
                v = values[self.graph.edge_sender[e]]
                if v is not None:
                    term = weight[e] * self._contribution(e, v)
                    acc = term if acc is None else acc + term
            out.append(acc)
        return out


CONV_PLANTED = {
    ("input", "conv1.c0", "in"),
    ("input", "conv1.c1", "in"),
    ("conv1.c0", "conv2.c0", "in"),
    ("conv1.c1", "conv2.c0", "in"),
    ("conv2.c0", "logits", "in"),
}


def planted_conv(act: str = "linear") -> ConvToy:
    """conv1.c2 feeds nothing (zero weights), conv2.c1 is never read: the circuit is CONV_PLANTED."""
    g = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    W1, b1, W2, b2 = r(3, 1, 3, 3), r(3) * 0.1, r(2, 3, 3, 3), r(2) * 0.1
    W2[:, 2] = 0.0
    R = r(8, 2)
    R[4:] = 0.0
    return ConvToy(W1, b1, W2, b2, R, r(2), act)


def conv_batches(n: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(n, 1, 6, 6, generator=g, dtype=torch.float64) for _ in range(2))


def two_paths(u: float = 1.0, v: float = 2.0):
    """y = u·a + v·b through two components (A reads a, B reads b) plus an irrelevant C, on every (a, b) in
    {0, 1}² repeated 100 times. Returns (model, inputs, mse metric, b per row)."""
    d = 5
    W_E = torch.zeros(2, d, dtype=torch.float64)
    W_E[0, 0] = W_E[1, 1] = 1.0
    heads = [
        [
            _head(d, q=[(0, 1.0)], o=[(2, 1.0)]),
            _head(d, q=[(1, 1.0)], o=[(3, 1.0)]),
            _head(d, q=[(0, 1.0)], k=[(1, 1.0)], o=[(4, 1.0)]),
        ]
    ]
    W_U = torch.zeros(d, 1, dtype=torch.float64)
    W_U[2, 0], W_U[3, 0] = u, v
    ab = torch.tensor([[a, b] for a in (0, 1) for b in (0, 1)], dtype=torch.float64).repeat(100, 1)
    target = u * ab[:, 0] + v * ab[:, 1]
    return ResidualToy(W_E, heads, W_U), ab, lambda out: ((out[:, 0] - target) ** 2).mean(), ab[:, 1]


def redundant_or():
    """Two heads that each alone carry the input's signal to a saturating reader (an OR): h0 and h1 both write
    tanh(3·x0) (dims 2 and 3), g = tanh(5·(dim 2 + dim 3)) writes dim 4, read by the logits. Clean x0 = 3 gives
    g ≈ tanh(10); patching one of h0 or h1 to the corrupted x0 = 0 leaves g ≈ tanh(5) (a change of 1e-4), both
    g = 0. Returns (model, clean, corrupted, metric: the mean logit)."""
    d = 5
    W_E = torch.eye(2, d, dtype=torch.float64)
    heads = [[_head(d, q=[(0, 3.0)], o=[(2, 1.0)]), _head(d, q=[(0, 3.0)], o=[(3, 1.0)])],
             [_head(d, q=[(2, 5.0), (3, 5.0)], o=[(4, 1.0)])]]  # fmt: skip
    W_U = torch.zeros(d, 1, dtype=torch.float64)
    W_U[4, 0] = 1.0
    clean = torch.tensor([[3.0, 0.0]] * 4, dtype=torch.float64)
    return ResidualToy(W_E, heads, W_U, "tanh"), clean, torch.zeros_like(clean), lambda out: out[:, 0].mean()


def small_contributions(n: int = 5, c: float = 0.004):
    """``n`` heads that each add ``c``·x0 to the one logit (linear): clean x0 = 1, corrupted 0, so removing any one
    head's path costs ``c`` and all of them n·c. Returns (model, clean, corrupted, metric: the mean logit)."""
    d = 3
    W_E = torch.eye(2, d, dtype=torch.float64)
    heads = [[_head(d, q=[(0, 1.0)], o=[(2, c)]) for _ in range(n)]]
    W_U = torch.zeros(d, 1, dtype=torch.float64)
    W_U[2, 0] = 1.0
    clean = torch.tensor([[1.0, 0.0]] * 4, dtype=torch.float64)
    return ResidualToy(W_E, heads, W_U), clean, torch.zeros_like(clean), lambda out: out[:, 0].mean()
