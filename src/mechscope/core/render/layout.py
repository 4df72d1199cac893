"""Laying out a circuit figure so that no edge passes through a node it does not join.

Nodes sit in columns (one per layer that has a node, in layer order) and are spread
vertically within a column. Each edge is a quadratic Bézier curve; its bend is the smallest
one (tried in order 0, ±0.2, ±0.4, …) whose curve keeps clear of every other node by a margin.
Everything is in data coordinates with equal aspect, so what is checked is what is drawn.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BENDS = (0.0, 0.2, -0.2, 0.4, -0.4, 0.6, -0.6, 0.8, -0.8, 1.0, -1.0)


@dataclass(frozen=True)
class Layout:
    pos: dict  # node -> (x, y)
    bends: dict  # (a, b) -> bend (control-point offset as a share of the edge's length)
    radius: float
    columns: list[int]  # the layer of each column


def columns_layout(nodes: list, layer_of, radius: float = 0.42, dx: float = 1.6, dy: float = 1.2) -> dict:
    """Positions: one column per layer present, nodes spread around y = 0 in the given order."""
    layers = sorted({layer_of(n) for n in nodes})
    col = {layer: i for i, layer in enumerate(layers)}
    by_col: dict[int, list] = {}
    for n in nodes:
        by_col.setdefault(col[layer_of(n)], []).append(n)
    pos = {}
    for c, ns in by_col.items():
        for i, n in enumerate(ns):
            pos[n] = (c * dx, (i - (len(ns) - 1) / 2) * dy)
    return pos


def bezier(a, b, bend: float, t: np.ndarray) -> np.ndarray:
    """Points [len(t), 2] of the quadratic curve from a to b bent by ``bend`` × |ab| to the left."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    mid = (a + b) / 2
    d = b - a
    ctrl = mid + bend * np.array([-d[1], d[0]])
    t = t[:, None]
    return (1 - t) ** 2 * a + 2 * (1 - t) * t * ctrl + t**2 * b


def clearance(a, b, bend: float, others: list, samples: int = 200) -> float:
    """Smallest distance from the curve to the centre of any node in ``others``."""
    if not others:
        return np.inf
    pts = bezier(a, b, bend, np.linspace(0, 1, samples))
    centres = np.asarray(others, float)
    return float(np.min(np.linalg.norm(pts[:, None] - centres[None], axis=-1)))


def route(pos: dict, edges: list[tuple], radius: float, margin: float = 0.15) -> dict:
    """A bend for each edge that keeps it ``radius + margin`` away from every node it does not join."""
    bends = {}
    for a, b in edges:
        others = [p for n, p in pos.items() if n not in (a, b)]
        best = max(BENDS, key=lambda k: clearance(pos[a], pos[b], k, others))
        for k in BENDS:  # the first (least bent) that clears; else the clearest
            if clearance(pos[a], pos[b], k, others) >= radius + margin:
                best = k
                break
        bends[(a, b)] = best
    return bends


def layout(nodes: list, edges: list[tuple], layer_of, radius: float = 0.42) -> Layout:
    pos = columns_layout(nodes, layer_of, radius)
    layers = sorted({layer_of(n) for n in nodes})
    return Layout(pos, route(pos, edges, radius), radius, layers)


def trimmed_curve(a, b, bend: float, radius: float, samples: int = 60) -> np.ndarray:
    """The edge's points from where it leaves node a's circle to where it enters node b's."""
    t = np.linspace(0, 1, 400)
    pts = bezier(a, b, bend, t)
    away_a = np.linalg.norm(pts - np.asarray(a), axis=1) > radius
    away_b = np.linalg.norm(pts - np.asarray(b), axis=1) > radius
    outside = away_a & away_b
    idx = np.nonzero(outside)[0]
    if len(idx) < 2:
        return pts[[0, -1]]
    t0, t1 = t[idx[0]], t[idx[-1]]
    return bezier(a, b, bend, np.linspace(t0, t1, samples))
