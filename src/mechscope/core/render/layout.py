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


# ---- drawing a discovered circuit (circuit discovery's reports, both wings) ----------------------------


def circuit_layout(
    nodes: list, edges: list[tuple], layer_of, radius: float = 0.42, dy: float = 1.2, sweeps: int = 4
) -> Layout:
    """:func:`layout` for a discovered circuit: within each column the nodes are ordered by the mean height of
    their neighbours in the other columns (barycentric sweeps left to right and back, which untangles a CNN's
    channel-to-channel edges), and the columns are set wide enough apart for the tallest one that an edge to its
    end need not bend round the nodes next to it."""
    layers = sorted({layer_of(n) for n in nodes})
    cols: dict = {layer: [n for n in nodes if layer_of(n) == layer] for layer in layers}
    nbrs: dict = {n: [] for n in nodes}
    for a, b in edges:
        if a in nbrs and b in nbrs and layer_of(a) != layer_of(b):
            nbrs[a].append(b)
            nbrs[b].append(a)

    def heights() -> dict:
        return {n: i - (len(ns) - 1) / 2 for ns in cols.values() for i, n in enumerate(ns)}

    for sweep in range(sweeps):
        for layer in layers if sweep % 2 == 0 else layers[::-1]:
            y = heights()
            key = {n: float(np.mean([y[m] for m in nbrs[n]])) if nbrs[n] else y[n] for n in cols[layer]}
            cols[layer] = sorted(cols[layer], key=lambda n: key[n])  # stable: ties keep their order
    tallest = max(len(ns) for ns in cols.values())
    dx = _column_spacing(tallest, dy)
    order = [n for layer in layers for n in cols[layer]]
    pos = columns_layout(order, layer_of, radius, dx=dx, dy=dy)
    return Layout(pos, route(pos, edges, radius), radius, layers)


def _column_spacing(tallest: int, dy: float) -> float:
    """Columns 1.6 apart, more when a column is taller than 5 nodes (0.4 row heights per extra node)."""
    return max(1.6, 0.4 * dy * (tallest - 5))


def circuit_figsize(nodes: list, layer_of, max_width: float = 16, max_height: float = 12) -> tuple[float, float]:
    """A figure size (inches) for :func:`draw_circuit`'s layout of these nodes: its aspect, within the bounds."""
    cols, rows = circuit_extent(nodes, layer_of)
    dx = _column_spacing(rows, 1.2)
    width, height = (cols - 1) * dx + 2.4, (rows - 1) * 1.2 + 2.4  # data units, with the margins
    scale = min(max_width / width, max_height / height, 0.7)  # at most 0.7 inch per unit: a node 0.6 inch across
    return max(4.0, width * scale + 0.6), max(2.0, height * scale + 1.0)


def draw_circuit(
    ax,
    nodes: list,
    edges: list[dict],
    layer_of,
    label_of=str,
    node_colour=None,
    radius: float = 0.42,
    column_labels: dict | None = None,
) -> None:
    """Draw a circuit on ``ax``: nodes in layer columns (:func:`circuit_layout`: no edge crosses a node it does
    not join), each edge ``{"a", "b", "width" (0..1), "colour", "label"}`` as an arrow whose width grows with
    ``width``. ``node_colour(node)`` colours the discs (default grey); ``column_labels`` maps a layer to its tick."""
    from matplotlib.patches import Circle, FancyArrowPatch
    from matplotlib.path import Path as MPath

    lay = circuit_layout(nodes, [(e["a"], e["b"]) for e in edges], layer_of, radius)
    curves = [trimmed_curve(lay.pos[e["a"]], lay.pos[e["b"]], lay.bends[(e["a"], e["b"])], lay.radius + 0.03)
              for e in edges]  # fmt: skip
    for e, pts in zip(edges, curves, strict=True):
        path = MPath(pts, [MPath.MOVETO] + [MPath.LINETO] * (len(pts) - 1))
        ax.add_patch(FancyArrowPatch(path=path, arrowstyle="-|>", mutation_scale=10, lw=0.6 + 5.0 * e["width"],
                                     color=e.get("colour", "#777"), alpha=0.8, zorder=1))  # fmt: skip
        if e.get("label"):
            mid = pts[len(pts) // 2]
            ax.text(mid[0], mid[1] + 0.1, e["label"], fontsize=6, ha="center", color="#444", zorder=2)
    for node, (x, y) in lay.pos.items():
        colour = node_colour(node) if node_colour else "#888"
        ax.add_patch(Circle((x, y), lay.radius, color=colour, zorder=3))
        ax.text(x, y, label_of(node), ha="center", va="center", fontsize=6, color="white", zorder=4)
    every = np.concatenate([np.asarray(list(lay.pos.values()))] + curves) if curves else np.asarray(
        list(lay.pos.values()))  # fmt: skip
    lo, hi = every.min(0) - 0.8, every.max(0) + 0.8
    ax.set_aspect("equal")
    ax.set_xlim(lo[0], hi[0])
    ax.set_ylim(lo[1], hi[1])
    xs = sorted({p[0] for p in lay.pos.values()})
    ax.set_xticks(xs)
    ax.set_xticklabels([(column_labels or {}).get(layer, str(layer)) for layer in lay.columns], fontsize=7)
    ax.set_yticks([])
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)


def circuit_extent(nodes: list, layer_of) -> tuple[int, int]:
    """(columns, largest column height) of a circuit's layout: for sizing its figure."""
    per: dict = {}
    for n in nodes:
        per[layer_of(n)] = per.get(layer_of(n), 0) + 1
    return len(per), max(per.values()) if per else 0


def same_curve(a, b) -> bool:
    """Whether two faithfulness curves coincide (then the |score| ranking's is not drawn beside the method's)."""
    return bool(np.allclose(np.asarray(a, float), np.asarray(b, float), equal_nan=True))


def draw_faithfulness(ax, fractions, faithfulness, random_mean=None, random_sd=None, absolute=None,
                      label: str = "circuit", ranked: str | None = None) -> None:  # fmt: skip
    """A faithfulness curve over the fraction of edges kept (log axis): the circuit, by |score| when different,
    and the random baseline's mean ± sd; 1 = the full model, 0 = the empty circuit."""
    x = np.asarray(fractions, dtype=float) * 100
    ax.plot(x, faithfulness, "o-", color="#1b9e77", label=f"{label}, ranked by {ranked}" if ranked else label,
            zorder=3)
    if absolute is not None and not same_curve(absolute, faithfulness):
        ax.plot(x, absolute, "s--", color="#7570b3", label=f"{label}, ranked by |score|", zorder=2)
    if random_mean is not None and len(random_mean) == len(x) and np.isfinite(np.asarray(random_mean, float)).any():
        m = np.asarray(random_mean, dtype=float)
        ax.plot(x, m, "^-", color="#d95f02", label="random circuits", zorder=2)
        if random_sd is not None:
            sd = np.nan_to_num(np.asarray(random_sd, dtype=float))
            ax.fill_between(x, m - sd, m + sd, color="#d95f02", alpha=0.15, zorder=1)
    ax.axhline(1.0, color="#999", lw=0.8, ls=":")
    ax.axhline(0.0, color="#999", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_xlabel("edges kept (%, log scale)")
    ax.set_ylabel("faithfulness (1 = full model, 0 = empty circuit)")
    ax.legend(fontsize=7)
