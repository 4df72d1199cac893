"""Figures: numpy arrays in, matplotlib Figure out. No computation of results here."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


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
    fig, axes = plt.subplots(4, n, figsize=(1.25 * n + 1.2, 5.6), squeeze=False, layout="constrained")
    row_names = ["input", "|attribution|", "overlay", "signed"]
    signed_im = heat_im = None
    for j in range(n):
        img, att = images[j], attributions[j]
        axes[0, j].imshow(img, cmap="gray", vmin=0, vmax=1)
        heat_im = axes[1, j].imshow(np.abs(att), cmap="inferno", vmin=0, vmax=vmax)
        axes[2, j].imshow(img, cmap="gray", vmin=0, vmax=1)
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
    bar.set_label("red: for the target, blue: against", fontsize=7)
    fig.suptitle(f"{method}" + (f" — {subtitle}" if subtitle else ""), fontsize=11)
    return fig


def faithfulness_curves(
    fractions: np.ndarray,
    deletion: dict[str, np.ndarray],
    insertion: dict[str, np.ndarray],
) -> Figure:
    """Mean deletion and insertion curves per method (``random`` drawn dashed)."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
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
    plt.close(fig)
