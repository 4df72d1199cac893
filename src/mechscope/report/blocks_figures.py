"""Figures of the Building Blocks report: numpy in, a PNG data URI out. Nothing is computed here."""

from __future__ import annotations

import numpy as np
from matplotlib.patches import Rectangle

from mechscope.report.figures import show, subplots, to_display
from mechscope.report.html import figure_data_uri

POS, NEG = "#c0392b", "#2471a3"


def _clean(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


def _disp(x, vrange) -> np.ndarray:
    """[N, C, H, W] tensor → [N, H, W] or [N, H, W, 3] in [0, 1]."""
    return np.clip(to_display(x, vrange), 0, 1)


def mosaic(cells: np.ndarray, grid: tuple[int, int], strength: np.ndarray, gap: int = 1) -> np.ndarray:
    """Cell images [n, h, w(, 3)] in a gh × gw mosaic on white, each faded towards white by ``strength`` in [0, 1]."""
    gh, gw = grid
    h, w = cells.shape[1:3]
    out = np.ones((gh * (h + gap) - gap, gw * (w + gap) - gap) + cells.shape[3:])
    for i in range(gh * gw):
        y, x = divmod(i, gw)
        a = float(strength[i])
        out[y * (h + gap) : y * (h + gap) + h, x * (w + gap) : x * (w + gap) + w] = 1 - a * (1 - cells[i])
    return out


def grid_fig(image: np.ndarray, cells: np.ndarray, grid, norms: np.ndarray, stage: str, crop) -> str:
    """The input beside its activation grid (each cell: the visualisation of its activation vector)."""
    fig, (a, b) = subplots(1, 2, figsize=(8.4, 4.2), layout="constrained", gridspec_kw={"width_ratios": [1, 1.1]})
    show(a, image)
    gh, gw = grid
    h, w = image.shape[:2]
    for y in range(1, gh):
        a.axhline(y * h / gh - 0.5, color="#ff7f0e", lw=0.3)
    for x in range(1, gw):
        a.axvline(x * w / gw - 0.5, color="#ff7f0e", lw=0.3)
    a.set_title("input, split into the grid's cells", fontsize=9)
    strength = norms / max(float(norms.max()), 1e-12)
    grey = cells if cells.ndim == 4 else cells
    b.imshow(mosaic(grey, grid, strength), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    y0, y1, x0, x1 = crop
    b.set_title(f"{stage} activation grid: each cell's activation vector visualised\n"
                f"({y1 - y0}×{x1 - x0}-pixel receptive field; faded by ‖vector‖)", fontsize=9)  # fmt: skip
    _clean(a)
    _clean(b)
    return figure_data_uri(fig)


def dictionary_fig(rows: list[dict], stage: str) -> str:
    """Semantic dictionary: per cell, input crop, the cell's visualisation and its strongest channels'."""
    n, k = len(rows), len(rows[0]["channels"])
    fig, axes = subplots(n, 2 + k, figsize=(1.15 * (2 + k) + 0.6, 1.2 * n + 0.5), squeeze=False)
    for i, row in enumerate(rows):
        show(axes[i, 0], row["input"])
        y0, y1, x0, x1 = row["box"]
        axes[i, 0].add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, ec="#ff7f0e", lw=1.2))
        show(axes[i, 1], row["cell"])
        axes[i, 0].set_ylabel(f"cell {row['cell_yx']}", fontsize=7)
        for j, ch in enumerate(row["channels"]):
            show(axes[i, 2 + j], ch["image"])
            axes[i, 2 + j].set_title(f"ch {ch['channel']}: {ch['value']:.2f}", fontsize=7)
        for ax in axes[i]:
            _clean(ax)
    axes[0, 0].set_title("where", fontsize=7)
    axes[0, 1].set_title("cell", fontsize=7)
    fig.suptitle(f"{stage}: semantic dictionary of the strongest cells (channels by activation)", fontsize=9)
    fig.subplots_adjust(left=0.06, right=0.99, top=1 - 0.45 / (1.2 * n + 0.5), bottom=0.01, wspace=0.08, hspace=0.35)
    return figure_data_uri(fig)


def curve_fig(curves: dict[str, tuple], chosen: dict[str, int], threshold: float) -> str:
    """Explained variance against the number of groups, one line per stage, the chosen k marked."""
    fig, ax = subplots(figsize=(5.6, 3.2), layout="constrained")
    for name, curve in curves.items():
        ks = np.arange(1, len(curve) + 1)
        (line,) = ax.plot(ks, curve, marker="o", ms=3, label=name)
        k = chosen[name]
        ax.plot([k], [curve[k - 1]], marker="o", ms=9, mfc="none", color=line.get_color())
    ax.axhline(threshold, color="#777", ls="--", lw=0.8)
    ax.set_xlabel("number of groups k")
    ax.set_ylabel("variance explained (1 − ‖A − WH‖²/‖A‖²)")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("NMF of each stage's activations (circle: the k used)", fontsize=9)
    return figure_data_uri(fig)


def groups_fig(stage: str, groups: list[dict], image: np.ndarray, extent) -> str:
    """One row per group: its visualisation, its map over the input, its top test images."""
    n, k = len(groups), len(groups[0]["examples"])
    fig, axes = subplots(n, 2 + k, figsize=(1.15 * (2 + k) + 1.0, 1.2 * n + 0.5), squeeze=False)
    for i, g in enumerate(groups):
        show(axes[i, 0], g["image"])
        show(axes[i, 1], image)
        axes[i, 1].imshow(g["map"], cmap="inferno", alpha=0.6, extent=extent, interpolation="bilinear",
                          vmin=0, vmax=max(float(g["map"].max()), 1e-12))  # fmt: skip
        axes[i, 1].set_xlim(-0.5, image.shape[1] - 0.5)
        axes[i, 1].set_ylim(image.shape[0] - 0.5, -0.5)
        for j, (ex, box) in enumerate(zip(g["examples"], g["boxes"], strict=True)):
            show(axes[i, 2 + j], ex)
            y0, y1, x0, x1 = box
            axes[i, 2 + j].add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, ec="#ff7f0e"))
        axes[i, 0].set_ylabel(g["label"], fontsize=7, rotation=0, ha="right", va="center")
        for ax in axes[i]:
            _clean(ax)
    for j, t in enumerate(["direction", "where (this image)", "top test images"]):
        axes[0, j].set_title(t, fontsize=7, loc="left")
    fig.suptitle(f"{stage}: neuron groups (NMF)", fontsize=9)
    fig.subplots_adjust(left=0.16, right=0.99, top=1 - 0.45 / (1.2 * n + 0.5), bottom=0.01, wspace=0.06, hspace=0.2)
    return figure_data_uri(fig)


def flow_fig(columns: list[dict], links: list[dict], title: str) -> str:
    """Sankey-like flow: columns of nodes (thumbnail + label), links as bands of width ∝ |attribution|.

    ``columns``: [{"name", "nodes": [{"label", "image" or None}]}]; ``links``: [{"col", "src", "dst", "value",
    "width"}] between column ``col`` and ``col + 1``, ``width`` in [0, 1] (normalised per column pair).
    """
    from matplotlib.offsetbox import AnnotationBbox, OffsetImage
    from matplotlib.patches import PathPatch
    from matplotlib.path import Path as MPath

    n_cols = len(columns)
    tallest = max(len(c["nodes"]) for c in columns)
    fig, ax = subplots(figsize=(3.2 * n_cols + 1, 0.85 * tallest + 1.2), layout="constrained")

    def pos(c: int, i: int) -> tuple[float, float]:
        n = len(columns[c]["nodes"])
        return c * 3.0, (tallest - 1) / 2 - (i - (n - 1) / 2)

    for link in sorted(links, key=lambda lk: lk["width"]):
        (x0, y0), (x1, y1) = pos(link["col"], link["src"]), pos(link["col"] + 1, link["dst"])
        x0, x1 = x0 + 0.45, x1 - 0.45
        path = MPath([(x0, y0), ((x0 + x1) / 2, y0), ((x0 + x1) / 2, y1), (x1, y1)],
                     [MPath.MOVETO, MPath.CURVE4, MPath.CURVE4, MPath.CURVE4])  # fmt: skip
        colour = POS if link["value"] > 0 else NEG
        ax.add_patch(PathPatch(path, fc="none", ec=colour, lw=0.5 + 11 * link["width"], alpha=0.55, capstyle="butt"))
    for c, col in enumerate(columns):
        for i, node in enumerate(col["nodes"]):
            x, y = pos(c, i)
            if node.get("image") is not None:
                img = node["image"]
                box = OffsetImage(img, zoom=28 / max(img.shape[:2]), cmap="gray" if img.ndim == 2 else None)
                box.get_children()[0].set_clim(0, 1)
                ax.add_artist(AnnotationBbox(box, (x, y), frameon=True, pad=0.1))
                ax.text(x, y - 0.5, node["label"], ha="center", va="top", fontsize=7)
            else:
                ax.text(x, y, node["label"], ha="center", va="center", fontsize=10,
                        bbox={"boxstyle": "round", "fc": "#f4f4f4", "ec": "#999"})  # fmt: skip
        ax.text(c * 3.0, tallest - 0.3, col["name"], ha="center", fontsize=9, weight="bold")
    ax.set_xlim(-0.8, 3.0 * (n_cols - 1) + 0.8)
    ax.set_ylim(-1.0, tallest)
    ax.axis("off")
    ax.set_title(title, fontsize=9)
    return figure_data_uri(fig)


def input_fig(images: np.ndarray, titles: list[str]) -> str:
    """The analysed images in a row."""
    n = len(images)
    fig, axes = subplots(1, n, figsize=(1.3 * n + 0.4, 1.7), squeeze=False, layout="constrained")
    for ax, img, t in zip(axes[0], images, titles, strict=True):
        show(ax, img)
        ax.set_title(t, fontsize=7)
        _clean(ax)
    return figure_data_uri(fig)
