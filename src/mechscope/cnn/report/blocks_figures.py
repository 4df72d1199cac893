"""Figures of the Building Blocks report: numpy in, a PNG data URI out. Nothing is computed here."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from mechscope.cnn.report.figures import show, to_display
from mechscope.core.render.figures import subplots
from mechscope.core.render.html import figure_data_uri

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


def grid_fig(rows: list[dict], grid, stage: str, crop, size: int = 224) -> str:
    """Per shown image: the input split into the grid's cells beside its activation grid (each cell: the
    visualisation of its activation vector, faded towards white by its norm relative to the largest)."""
    from PIL import Image

    gh, gw = grid
    panels, labels = [], []
    for row in rows:
        image = rgb(row["image"], size // row["image"].shape[0])
        h, w = image.shape[:2]
        for y in range(1, gh):
            image[int(y * h / gh), :] = (1.0, 0.5, 0.05)
        for x in range(1, gw):
            image[:, int(x * w / gw)] = (1.0, 0.5, 0.05)
        strength = row["norms"] / max(float(row["norms"].max()), 1e-12)
        tiles = mosaic(row["cells"], grid, strength)
        tiles = rgb(tiles, 1) if tiles.ndim == 2 else tiles
        big = Image.fromarray((tiles * 255).astype(np.uint8)).resize((w, h), Image.NEAREST)
        panels.append([image, np.asarray(big, dtype=np.float64) / 255])
        labels.append(row["label"])
    y0, y1, x0, x1 = crop
    first = "input in equal parts, one per cell\n(a guide: receptive fields are larger and overlap)"
    titles = [[first, "activation grid"]]
    titles += [[]] * (len(rows) - 1)
    return panel_fig(panels, labels, titles, f"{stage}: each cell's activation vector visualised\n"
                     f"({y1 - y0}×{x1 - x0}-pixel receptive field; faded by ‖vector‖)", label_width=0.9,
                     panel_inches=3.2)  # fmt: skip


def rgb(img: np.ndarray, scale: int) -> np.ndarray:
    """[H, W] grey or [H, W, 3] in [0, 1] → [H·scale, W·scale, 3], nearest-neighbour."""
    img = np.repeat(img[..., None], 3, -1) if img.ndim == 2 else img
    return np.clip(img, 0, 1).repeat(scale, 0).repeat(scale, 1)


def boxed(img: np.ndarray, box, scale: int, colour=(1.0, 0.5, 0.05)) -> np.ndarray:
    """``img`` (already scaled by ``scale``) with the outline of ``box`` (y0, y1, x0, x1) in input pixels."""
    out = img.copy()
    y0, y1, x0, x1 = (v * scale for v in box)
    y1, x1 = min(y1, out.shape[0]) - 1, min(x1, out.shape[1]) - 1
    for t in range(2):
        out[y0 + t, x0 : x1 + 1] = out[y1 - t, x0 : x1 + 1] = colour
        out[y0 : y1 + 1, x0 + t] = out[y0 : y1 + 1, x1 - t] = colour
    return out


def panel_fig(rows: list[list[np.ndarray]], labels: list[str], titles: list[list[str]], title: str,
              label_width: float = 1.0, panel_inches: float = 1.05) -> str:  # fmt: skip
    """Panels (RGB, all the same size) tiled into one image, one axes: row labels left, a title over each panel."""
    n, m = len(rows), max(len(r) for r in rows)
    h, w = rows[0][0].shape[:2]
    inch = panel_inches / w  # inches per canvas pixel
    gap_x, gap_y = w // 8, int(round(0.3 / inch))  # room for the panel titles: about 0.3 inch
    canvas = np.ones((n * (h + gap_y), m * (w + gap_x), 3))
    for i, row in enumerate(rows):
        for j, p in enumerate(row):
            y, x = i * (h + gap_y) + gap_y, j * (w + gap_x)
            canvas[y : y + h, x : x + w] = p
    top = 0.35 * (1 + title.count("\n"))
    fig = Figure(figsize=(canvas.shape[1] * inch + label_width, canvas.shape[0] * inch + top))
    ax = fig.add_axes((label_width / fig.get_figwidth(), 0, 1 - label_width / fig.get_figwidth(),
                       1 - top / fig.get_figheight()))  # fmt: skip
    ax.imshow(canvas, interpolation="nearest")
    for i, row in enumerate(titles):
        for j, t in enumerate(row):
            ax.text(j * (w + gap_x), i * (h + gap_y) + gap_y - 2, t, fontsize=7 if panel_inches < 2 else 9,
                    va="bottom")  # fmt: skip
    for i, label in enumerate(labels):
        ax.text(-gap_x, i * (h + gap_y) + gap_y + h / 2, label, fontsize=7, ha="right", va="center")
    ax.axis("off")
    fig.suptitle(title, fontsize=9, y=1 - 0.05 / fig.get_figheight())
    return figure_data_uri(fig)


def dictionary_fig(rows: list[dict], stage: str, scale: int = 4) -> str:
    """Semantic dictionary: per cell, where it is, the cell's visualisation and its strongest channels'."""
    panels, titles = [], []
    for row in rows:
        where = boxed(rgb(row["input"], scale), row["box"], scale)
        cell = rgb(row["cell"], max(1, where.shape[0] // max(row["cell"].shape[:2])))
        cell = _pad_to(cell, where.shape[:2])
        panels.append([where, cell] + [rgb(ch["image"], scale) for ch in row["channels"]])
        titles.append(["where", "cell"] + [f"ch {ch['channel']}: {ch['value']:.2f}" for ch in row["channels"]])
    labels = [f"cell {tuple(r['cell_yx'])}" for r in rows]
    return panel_fig(panels, labels, titles, f"{stage}: semantic dictionary of the strongest cells "
                     "(each cell's strongest channels, by activation)")  # fmt: skip


def _pad_to(img: np.ndarray, shape) -> np.ndarray:
    out = np.ones(tuple(shape) + (3,))
    h, w = min(img.shape[0], shape[0]), min(img.shape[1], shape[1])
    out[:h, :w] = img[:h, :w]
    return out


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


def overlay(image: np.ndarray, heat: np.ndarray, scale: int, alpha: float = 0.6) -> np.ndarray:
    """``image`` (scaled) under ``heat`` [H, W] in input pixels, inferno, normalised to its maximum."""
    from matplotlib import colormaps

    top = max(float(heat.max()), 1e-12)
    colour = colormaps["inferno"](np.clip(heat / top, 0, 1))[..., :3]
    return (1 - alpha) * rgb(image, scale) + alpha * rgb(colour, scale)


def groups_fig(stage: str, groups: list[dict], image: np.ndarray, scale: int = 4) -> str:
    """One row per group: its visualisation, its map over the input, its top test images."""
    panels, titles, labels = [], [], []
    for i, g in enumerate(groups):
        ex = [boxed(rgb(e, scale), box, scale) for e, box in zip(g["examples"], g["boxes"], strict=True)]
        panels.append([rgb(g["image"], scale), overlay(image, g["map"], scale), *ex])
        titles.append(["direction", "where (this image)", "top test images"] if i == 0 else [])
        labels.append(g["label"])
    return panel_fig(panels, labels, titles, f"{stage}: neuron groups (NMF)", label_width=1.2)


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
