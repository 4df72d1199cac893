"""The induction-heads report's figures: the [layer, head] maps, the loss per position, the path-patching
circuit and the estimate-against-measurement scatter (PNG data URIs; no computation).
"""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Circle, FancyArrowPatch
from matplotlib.path import Path as MPath

from mechscope.core.render import layout as CL
from mechscope.core.render.html import figure_data_uri
from mechscope.lm.methods.heads import ABLATION_SCORES

TITLES = {
    "induction": "induction score (repeated random tokens)",
    "prefix_matching": "prefix matching (Olsson et al.)",
    "previous_token": "previous-token score (random tokens)",
    "previous_token_text": "previous-token score (real text)",
    "duplicate_token": "duplicate-token score",
    "copying": "copying: centred direct effect on the attended token's logit",
    "ov_eigen_positivity": "OV eigenvalue positivity Σλ/Σ|λ| (folded weights)",
    "ablation_loss_increase": "mean-ablation: second-half loss increase",
    "zero_ablation_loss_increase": "zero-ablation: second-half loss increase",
    "resample_ablation_loss_increase": "resample-ablation: second-half loss increase",
}
MARGINAL_SE = 2.0  # a confirmed pass whose drop is within this many standard errors of the threshold is marginal


def layer_head_figure(values: np.ndarray, title: str, signed: bool | None = None, measured=None,
                      unit: str = "") -> str:  # fmt: skip
    """A [layers, heads] map; diverging colours around 0 when the values are signed. ``measured`` [layers, heads]
    (bool): the cells whose value is a measurement, marked with a black dot (the others are estimates). ``unit``:
    the colour bar's label (the quantity and its unit)."""
    s = np.asarray(values, dtype=float)
    signed = bool(np.nanmin(s) < 0) if signed is None else signed
    fig = Figure(figsize=(max(4.0, 0.28 * s.shape[0] + 1.8), max(2.2, 0.3 * s.shape[1] + 1.2)), layout="constrained")
    ax = fig.subplots()
    vmax = float(np.nanmax(np.abs(s))) or 1.0
    im = ax.imshow(s.T, aspect="auto", cmap="RdBu_r" if signed else "viridis", vmin=-vmax if signed else 0, vmax=vmax)
    ax.set_xlabel("layer")
    ax.set_ylabel("head")
    ax.set_xticks(range(0, s.shape[0], max(1, s.shape[0] // 15)))
    ax.set_yticks(range(s.shape[1]))
    if measured is not None:
        ls, hs = np.nonzero(np.asarray(measured, dtype=bool))
        ax.scatter(ls, hs, s=9, c="black", marker="o", linewidths=0)
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, shrink=0.9).set_label(unit, fontsize=8)
    return figure_data_uri(fig)


ABLATION_KINDS = {v: k for k, v in ABLATION_SCORES.items()}  # score name -> ablation kind
# what an ablation map holds (HeadAblation.best): per head, the mean over the protocol's sequences of the rise in the
# loss on the second copy of the repeated tokens when that head alone is ablated
UNITS = dict.fromkeys(ABLATION_KINDS, "second-half loss increase (nats, mean over sequences)")
ATTENTION = "attention on the score's keys (mean over queries and sequences)"
UNITS |= dict.fromkeys(("induction", "prefix_matching", "previous_token", "previous_token_text", "duplicate_token"),
                       ATTENTION)  # fmt: skip
UNITS |= {"copying": "logit, centred over the vocabulary (mean over positions)", "ov_eigen_positivity": "Σλ/Σ|λ|"}


def heatmap_title(name: str, ablation) -> str:
    """A map's title; an ablation map says that its values are estimates except at the dots."""
    title = TITLES[name]
    if name in ABLATION_KINDS:
        a = ablation.get(ABLATION_KINDS[name])
        n = len(a.exact_mean) if a is not None else 0
        title += f"\nestimates, except ● measured ({n} heads)"
    return title


def heatmaps(result) -> list[tuple[str, str]]:
    """Every score that was measured, as a [layers, heads] map; ablation maps mark their measured cells."""
    scores = result.scores
    out = []
    for name in TITLES:
        if name not in scores or np.isnan(np.asarray(scores[name], dtype=float)).all():
            continue
        a = result.ablation.get(ABLATION_KINDS.get(name, ""))
        title = heatmap_title(name, result.ablation)
        mask = a.measured_mask() if a else None
        out.append((title, layer_head_figure(scores[name], title, measured=mask, unit=UNITS.get(name, ""))))
    return out


def loss_plot(loss: list[float], n: int) -> str:
    fig = Figure(figsize=(8, 3.2), layout="constrained")
    ax = fig.subplots()
    ax.plot(range(len(loss)), loss, marker=".", lw=1)
    ax.axvline(n + 0.5, color="grey", ls="--")
    # x in data units, y as a fraction of the axes: placed the same whatever the loss values are
    ax.text(n * 0.5, 0.92, "first copy", ha="center", color="grey", transform=ax.get_xaxis_transform())
    ax.text(n * 1.5, 0.92, "second copy", ha="center", color="grey", transform=ax.get_xaxis_transform())
    ax.set_xlabel("position (predicting the next token)")
    ax.set_ylabel("loss (nats)")
    ax.set_title("loss per position on repeated random tokens")
    ax.grid(alpha=0.3)
    return figure_data_uri(fig)


def group_label(layer: int, heads: list[int]) -> str:
    return f"{layer}." + "/".join(str(h) for h in heads)


def circuit_graph(result) -> tuple[list, list[dict]]:
    """Nodes ("src", layer, head) and ("kv", layer, kv_head), and one edge per confirmed path patch; an edge is
    ``marginal`` (dashed) when every query head it passes for has its drop within MARGINAL_SE standard errors of the
    criterion's threshold; ``marginal_heads``: those query heads."""
    edges = []
    for pp in result.path_patches:
        if not any(pp.confirmed):
            continue
        confirmed = [h for h, ok in zip(pp.query_heads, pp.confirmed, strict=True) if ok]
        drops = [float(d) for d, ok in zip(pp.drop, pp.confirmed, strict=True) if ok]
        margins = [m for m, ok in zip(result.edge_margin(pp), pp.confirmed, strict=True) if ok]
        marginal = [h for h, m in zip(confirmed, margins, strict=True) if m < MARGINAL_SE]
        edges.append(
            {
                "a": ("src", *pp.source),
                "b": ("kv", pp.layer, pp.kv_head),
                "confirmed": confirmed,
                "drop": max(drops),
                "loss": pp.loss_increase,
                "marginal": len(marginal) == len(confirmed),
                "marginal_heads": marginal,
                "patch": pp,
            }
        )
    nodes = list(dict.fromkeys([e["a"] for e in edges] + [e["b"] for e in edges]))
    return nodes, edges


def node_text(node, result) -> str:
    """A source head's name; for a key/value head, the query heads of its group that some confirmed edge passes
    the criterion for (not every head of the group)."""
    kind, layer, idx = node
    if kind == "src":
        return f"{layer}.{idx}"
    heads = sorted({h for pp in result.path_patches if (pp.layer, pp.kv_head) == (layer, idx)
                    for h, ok in zip(pp.query_heads, pp.confirmed, strict=True) if ok})  # fmt: skip
    g = result.kv_groups
    return group_label(layer, heads or list(range(idx * g, (idx + 1) * g)))


def edge_label(edge: dict, kv_groups: int) -> str:
    """The query heads an edge passes for (when a key/value head serves several) over its drop, a positive number as
    in the text ("drop 0.82": the target's induction score falls by 0.82); for several heads the largest of their
    drops (the text gives each), as the figure's title says."""
    heads = [f"{h}*" if h in edge["marginal_heads"] else str(h) for h in edge["confirmed"]]
    who = f"{edge['patch'].layer}.{'/'.join(heads)}\n" if kv_groups > 1 or edge["marginal_heads"] else ""
    return f"{who}drop {edge['drop']:.2f}"


def label_spots(pts: np.ndarray, half: np.ndarray) -> list[np.ndarray]:
    """Where an edge's label may go: at the middle of the edge and further along it, just beside it on either side
    (its box clear of the line), then on it."""
    out = []
    for t in (0.5, 0.4, 0.6, 0.3, 0.7, 0.2, 0.8):
        i = min(int(t * (len(pts) - 1)), len(pts) - 2)
        d = pts[i + 1] - pts[i]
        normal = np.array([-d[1], d[0]]) / (np.linalg.norm(d) or 1.0)
        gap = float(np.abs(normal) @ half) + 0.06  # the box's reach across the line, and a margin
        out += [pts[i] + normal * gap, pts[i] - normal * gap]
    return out + [pts[len(pts) // 2]]


def spot_cost(c, half, centres, radius, boxes, curves, limits) -> tuple:
    """(nodes hit, labels hit, outside the axes, line points covered) for a label box centred at ``c``."""
    near = np.clip(centres, c - half, c + half)  # each node centre's nearest point of the box
    nodes = int((np.linalg.norm(near - centres, axis=1) < radius + 0.04).sum())
    hits = sum(bool(np.all(np.abs(c - b) < half + h + 0.04)) for b, h in boxes)
    (lo, hi) = limits
    outside = bool(np.any(c - half < lo) or np.any(c + half > hi))
    covered = sum(int(np.all(np.abs(p - c) < half, axis=1).sum()) for p in curves)
    return nodes, hits, outside, covered


def place_labels(ax, labels: list, curves: list[np.ndarray], centres: list, radius: float) -> None:
    """Move each edge label to the first of its :func:`label_spots` whose box (measured as drawn) overlaps no node
    and no label placed before it, stays inside the axes and covers the fewest lines; the least bad otherwise."""
    fig = ax.get_figure()
    fig.draw_without_rendering()  # the constrained layout, so that sizes in data units are the drawn ones
    to_data = ax.transData.inverted()
    limits = (np.array([ax.get_xlim()[0], ax.get_ylim()[0]]), np.array([ax.get_xlim()[1], ax.get_ylim()[1]]))
    boxes: list = []
    for text, pts in zip(labels, curves, strict=True):
        ext = text.get_window_extent()
        half = np.abs(to_data.transform([ext.x1, ext.y1]) - to_data.transform([ext.x0, ext.y0])) / 2 + 0.03
        spots = label_spots(pts, half)
        costs = [spot_cost(c, half, np.asarray(centres), radius, boxes, curves, limits) for c in spots]
        best = spots[min(range(len(spots)), key=lambda i: (*costs[i], i))]
        text.set_position(best)
        boxes.append((best, half))


def circuit_figure(result) -> str:
    """Path-patching-confirmed edges only; width = drop in the target's induction score."""
    nodes, edges = circuit_graph(result)
    if not nodes:
        fig = Figure(figsize=(6, 1.5), layout="constrained")
        ax = fig.subplots()
        ax.axis("off")
        why = ("no edge confirmed by path patching" if result.path_patches
               else "no path-patching test: no head is labelled induction, and a test needs one as its target")
        ax.text(0.5, 0.5, why, ha="center", va="center")
        return figure_data_uri(fig)
    lay = CL.layout(nodes, [(e["a"], e["b"]) for e in edges], layer_of=lambda n: n[1])
    curves = [
        CL.trimmed_curve(lay.pos[e["a"]], lay.pos[e["b"]], lay.bends[(e["a"], e["b"])], lay.radius + 0.03)
        for e in edges
    ]
    xs = [p[0] for p in lay.pos.values()]
    every = np.concatenate([np.asarray(list(lay.pos.values()))] + curves)
    lo, hi = every.min(0) - 0.8, every.max(0) + 0.8
    w, h = hi - lo
    fig = Figure(figsize=(min(14, max(6.5, 1.0 + 0.9 * w)), 1.6 + 0.9 * h), layout="constrained")
    ax = fig.subplots()
    for e, pts in zip(edges, curves, strict=True):
        path = MPath(pts, [MPath.MOVETO] + [MPath.LINETO] * (len(pts) - 1))
        ax.add_patch(FancyArrowPatch(path=path, arrowstyle="-|>", mutation_scale=12, lw=0.8 + 5 * e["drop"],
                                     color="#bbb" if e["marginal"] else "#777", alpha=0.85, zorder=1,
                                     linestyle="--" if e["marginal"] else "-"))  # fmt: skip
    labels = [ax.text(0, 0, edge_label(e, result.kv_groups), fontsize=7, ha="center", va="center", color="#444",
                      zorder=2, bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.85})
              for e in edges]  # fmt: skip
    for node, (x, y) in lay.pos.items():
        colour = "#1b9e77" if node[0] == "src" else "#d95f02"
        ax.add_patch(Circle((x, y), lay.radius, color=colour, zorder=3))
        ax.text(x, y, node_text(node, result), ha="center", va="center", fontsize=7, color="white", zorder=4)
    ax.set_aspect("equal")
    ax.set_xlim(lo[0], hi[0])
    ax.set_ylim(lo[1], hi[1])
    ax.set_xticks(sorted(set(xs)))
    ax.set_xticklabels([str(layer) for layer in lay.columns])
    ax.set_xlabel("layer")
    ax.set_yticks([])
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    ax.set_title(
        "edges confirmed by key-side path patching:\nsource head (green) → key/value head (orange), named by the query "
        "heads that pass;\nlabel and width: the largest drop in their induction score;\n* a head that passes within "
        f"{MARGINAL_SE:g} s.e. of the threshold (marginal); dashed: marginal for every head",
        fontsize=8,
    )
    place_labels(ax, labels, curves, list(lay.pos.values()), lay.radius)  # last: measured in the final layout
    return figure_data_uri(fig)


def agreement_figure(ablation) -> str | None:
    """Attribution-patching estimate against the exact measurement, for the heads measured both ways."""
    keys = sorted(ablation.exact_mean)
    if len(keys) < 2:
        return None
    est = [ablation.measured_estimate[lh] for lh in keys]
    ex = [ablation.exact_mean[lh] for lh in keys]
    fig = Figure(figsize=(4.4, 4), layout="constrained")
    ax = fig.subplots()
    ax.scatter(est, ex, s=18)
    for (layer, h), a, b in zip(keys, est, ex, strict=True):
        ax.annotate(f"{layer}.{h}", (a, b), fontsize=6, xytext=(2, 2), textcoords="offset points")
    lo, hi = min(est + ex), max(est + ex)
    ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls="--")
    ax.set_xlabel("attribution-patching estimate (nats)")
    ax.set_ylabel("measured exactly (nats)")
    ax.set_title(f"{ablation.kind}-ablation: estimate vs measurement", fontsize=10)
    ax.grid(alpha=0.3)
    return figure_data_uri(fig)
