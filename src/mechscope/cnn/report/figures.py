"""Figures: numpy arrays in, matplotlib Figure out. No computation of results here.

Figures are built as :class:`matplotlib.figure.Figure` objects, never through pyplot: nothing
here selects a backend or keeps global figure state. Images are [N, H, W] (grey) or
[N, H, W, 3] (colour, values in [0, 1]).
"""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from mechscope.core.render.figures import subplots


def to_display(x, vrange: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
    """Images [N, C, H, W] in ``vrange`` for figures: [N, H, W] grey or [N, H, W, 3] colour, scaled into [0, 1]."""
    lo, hi = vrange
    x = (x - lo) / max(hi - lo, 1e-12) if (lo, hi) != (0.0, 1.0) else x
    return x[:, 0].numpy() if x.shape[1] == 1 else x.permute(0, 2, 3, 1).numpy()


def show(ax, img: np.ndarray, **kwargs) -> None:
    """An image: grey [H, W] in [0, 1] unless ``vmin``/``vmax`` say otherwise, or colour [H, W, 3]."""
    if img.ndim == 2:
        ax.imshow(img, cmap="gray", vmin=kwargs.get("vmin", 0), vmax=kwargs.get("vmax", 1))
    else:
        ax.imshow(np.clip(img, 0, 1))


def _robust_max(values: np.ndarray, q: float = 99.5) -> float:
    m = float(np.percentile(np.abs(values), q)) if values.size else 0.0
    return m if m > 0 else float(np.abs(values).max() or 1.0)


def attribution_grid(
    images: np.ndarray,
    attributions: np.ndarray,
    method: str,
    column_titles: list[str],
    subtitle: str = "",
) -> Figure:
    """Rows: input, |attribution| heat map, overlay, signed map (shared colour scale + bar).

    ``images`` and ``attributions`` are [N, H, W]. One colour scale for the whole figure (the
    99.5th percentile of |attribution|), so columns can be compared.
    """
    n = len(images)
    vmax = _robust_max(attributions)
    fig, axes = subplots(4, n, figsize=(1.25 * n + 1.2, 5.6), squeeze=False, layout="constrained")
    unsigned = float(np.min(attributions)) >= 0  # saliency, SmoothGrad: |gradient|, no sign to show
    row_names = ["input", "|attribution|", "overlay", "signed\n(none below 0)" if unsigned else "signed"]
    signed_im = heat_im = None
    for j in range(n):
        img, att = images[j], attributions[j]
        show(axes[0, j], img)
        heat_im = axes[1, j].imshow(np.abs(att), cmap="inferno", vmin=0, vmax=vmax)
        show(axes[2, j], img)
        axes[2, j].imshow(np.abs(att), cmap="inferno", vmin=0, vmax=vmax, alpha=0.6)
        signed_im = axes[3, j].imshow(att, cmap="RdBu_r", vmin=-vmax, vmax=vmax)
        axes[0, j].set_title(column_titles[j], fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    for i, name in enumerate(row_names):
        axes[i, 0].set_ylabel(name, fontsize=8)
    fig.colorbar(heat_im, ax=axes[1, :].tolist(), shrink=0.9, pad=0.01)
    bar = fig.colorbar(signed_im, ax=axes[3, :].tolist(), shrink=0.9, pad=0.01)
    bar.set_label("red: for the target\nblue: against", fontsize=7)
    fig.suptitle(f"{method}" + (f" — {subtitle}" if subtitle else ""), fontsize=11)
    return fig


def faithfulness_curves(
    fractions: np.ndarray,
    deletion: dict[str, np.ndarray],
    insertion: dict[str, np.ndarray],
) -> Figure:
    """Mean deletion and insertion curves per method (``random`` drawn dashed)."""
    fig, (a, b) = subplots(1, 2, figsize=(11, 4.2), layout="constrained")
    for ax, curves, title in (
        (a, deletion, "deletion (lower area is better)"),
        (b, insertion, "insertion (higher is better)"),
    ):
        for name, curve in curves.items():
            style = dict(color="black", linestyle="--") if name == "random" else {}
            ax.plot(fractions, curve, label=name, **style)
        ax.set_xlabel("fraction of pixels removed" if ax is a else "fraction of pixels inserted")
        ax.set_ylabel("target class probability")
        ax.set_title(title)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    b.legend(fontsize=7, loc="lower right")
    return fig


def save(fig: Figure, path) -> None:
    fig.savefig(path, dpi=110)


def featvis_grid(
    layer: str,
    rows: list[dict],
    images: dict[str, np.ndarray],
    examples: np.ndarray,
    boxes: list[list[tuple[int, int, int, int]]] | None,
) -> Figure:
    """One row per unit: positive, negative, the diverse set, then top dataset examples.

    ``rows[i]`` has the unit's label text; ``images`` maps "positive" [N, H, W(, 3)], "negative"
    and "diverse" [N, D, H, W(, 3)]; ``examples`` is [N, K, H, W(, 3)]; ``boxes`` the
    receptive field (y0, y1, x0, x1) of each example's most active position.
    """
    from matplotlib.patches import Rectangle

    n, d, k = len(rows), images["diverse"].shape[1], examples.shape[1]
    cols = 2 + d + k
    fig, axes = subplots(n, cols, figsize=(0.9 * cols + 1.6, 0.95 * n + 0.8), squeeze=False)
    titles = ["maximise", "minimise"] + ["diverse"] * d + ["top test images"] + [""] * (k - 1)
    for i, row in enumerate(rows):
        panels = [images["positive"][i], images["negative"][i], *images["diverse"][i], *examples[i]]
        for j, img in enumerate(panels):
            ax = axes[i, j]
            show(ax, img)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(titles[j], fontsize=7, loc="left")
            if boxes is not None and j >= 2 + d:
                y0, y1, x0, x1 = boxes[i][j - 2 - d]
                ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, ec="#ff7f0e", lw=1))
        axes[i, 0].set_ylabel(row["label"], fontsize=7, rotation=0, ha="right", va="center")
    spatial = boxes is not None
    fig.suptitle(
        f"{layer}: feature visualisation beside the test images it is largest on"
        + (" (at any position; orange: that position's receptive field)" if spatial else "")
        + "\n×: the unit's value on the visualisation over its largest on a test image"
        + (" (both its mean over positions)" if spatial else ""),
        fontsize=8,
    )
    fig.subplots_adjust(left=0.14, right=0.99, top=1 - 0.75 / (0.95 * n + 0.8), bottom=0.01, wspace=0.05, hspace=0.15)
    return fig
