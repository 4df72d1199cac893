"""Class selectivity of every channel of every stage (Morcos et al. 2018), and where it is active.

For each channel: its mean activation per class (the stage's output averaged over positions),
the selectivity index (μmax − μrest)/(μmax + μrest) (see :mod:`mechscope.cnn.methods.circuits`),
the preferred class, and where in the image its mean map on that class has its mass.

The index is defined for non-negative activations (after a ReLU). Where a stage's class means
can be negative (GELU, SoLU with its LayerNorm, no activation), each channel's class means are
first shifted so that the least active class is at 0 (``shifted``); the index then measures how
much one class stands out from the others' range, still in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mechscope.cnn.methods import circuits as C
from mechscope.core.results import Result, figure_data


@dataclass(frozen=True)
class StageSelectivity(Result):
    stage: str
    activation: str  # what was averaged
    class_means: torch.Tensor  # [C, K]
    index: torch.Tensor  # [C]
    preferred_class: tuple[int, ...]
    order: tuple[int, ...]  # channels grouped by preferred class, most selective first
    region_on_preferred_class: tuple[str, ...]
    shifted: bool = False  # class means shifted to a minimum of 0 before the index (signed activations)
    maps: torch.Tensor = figure_data()  # [K, C, H, W] mean hook_post map per class


def region(mean_map: np.ndarray) -> str:
    """Where a non-negative [H, W] map has its mass, in words (thirds of the image)."""
    mean_map = np.clip(mean_map, 0, None)
    total = mean_map.sum()
    if total <= 0:
        return "nowhere (never active)"
    h, w = mean_map.shape
    ys, xs = np.mgrid[0:h, 0:w]
    cy = (mean_map * ys).sum() / total / max(h - 1, 1)
    cx = (mean_map * xs).sum() / total / max(w - 1, 1)
    vert = "upper" if cy < 0.4 else "lower" if cy > 0.6 else "middle"
    horiz = "left" if cx < 0.4 else "right" if cx > 0.6 else "centre"
    return "centre" if (vert, horiz) == ("middle", "centre") else f"{vert} {horiz}"


def selectivity(model, spec, data, acts) -> tuple[StageSelectivity, ...]:
    out = []
    for s in spec.stages:
        cm = C.class_means(acts.out[s.name].flatten(2).mean(2), data.y, data.n_classes)  # [C, K]
        pref = cm.argmax(1)
        maps = acts.maps[s.name]  # [K, C, H, W]
        shifted = bool((cm < 0).any())
        base = cm - cm.min(1, keepdim=True).values if shifted else cm
        what = f"{s.hook_out}, mean over positions" + (", shifted per channel to a minimum of 0" if shifted else "")
        out.append(
            StageSelectivity(
                stage=s.name,
                activation=what,
                class_means=cm,
                index=C.selectivity_index(base),
                shifted=shifted,
                preferred_class=tuple(pref.tolist()),
                order=tuple(C.order_by_profile(cm)),
                region_on_preferred_class=tuple(region(maps[int(pref[c]), c].numpy()) for c in range(cm.shape[0])),
                maps=maps,
            )
        )
    return tuple(out)
