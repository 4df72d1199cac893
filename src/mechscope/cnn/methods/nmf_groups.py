"""Neuron groups: non-negative matrix factorisation of a layer's activations (Olah et al. 2018).

"The Building Blocks of Interpretability" splits a layer's activations A (positions × channels,
non-negative after a ReLU) into k groups, A ≈ W·H with W, H ≥ 0: row g of H is the group's
direction in channel space, column g of W where in the image it is active. Fewer, more
meaningful units than channels, each still a direction the network can read.

* Explained variance of a factorisation: 1 − ‖A − W·H‖²_F / ‖A‖²_F (uncentred: NMF models A
  itself, not A minus its mean).
* The curve over k = 1, 2, … is non-decreasing by construction: each k takes a fresh fit
  (``init="nndsvda"``, coordinate descent, seeded); where that explains less than k − 1 did (a
  worse local optimum), the better of it and a warm start from k − 1 plus one new group
  (coordinate descent never raises the error of its start, and the start is no worse than
  k − 1). At full rank, min(positions, channels), the exact factorisation (A·I or I·A) is
  taken if the fit falls short, so the full curve ends at 1. The report's curve stops at the
  first k reaching 0.95 (or the threshold if higher; and at least the k used).
* k is the smallest k whose explained variance reaches ``threshold`` (0.9 by default), or the
  one the user gives.

Signed activations (GELU's small negative tail, SoLU's LayerNorm) are clipped at 0 first; the
share of the squared activation clipped away is reported with the groups.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from mechscope.core.errors import MechscopeError
from mechscope.core.results import Result

THRESHOLD = 0.9
STOP_AT = 0.95  # the curve is computed until it reaches this (or full rank), and at least to the k used


@dataclass(frozen=True)
class NMFGroups(Result):
    """The k groups of one layer: A ≈ spatial · directions, groups ordered by their share of A."""

    layer: str
    k: int
    chosen_by: str  # "threshold" or "--groups"
    threshold: float
    curve: tuple[float, ...]  # explained variance for k = 1, 2, ...
    explained: float  # at the chosen k
    negative_share: float  # share of Σ a² clipped away (negative activations)
    directions: np.ndarray  # [k, C] unit-norm channel directions (rows of H, normalised)
    spatial: np.ndarray  # [P, k] each group's strength per position (W, with the directions' norms moved in)
    share: tuple[float, ...] = ()  # ‖W_g H_g‖² of each group over the sum of them (the order of the groups)


def explained_variance(a: np.ndarray, w: np.ndarray, h: np.ndarray) -> float:
    """1 − ‖A − WH‖² / ‖A‖² (1 for an all-zero A)."""
    total = float((a.astype(np.float64) ** 2).sum())
    if total == 0.0:
        return 1.0
    return 1.0 - float(((a - w @ h) ** 2).sum()) / total


def _fit(a: np.ndarray, k: int, seed: int, init=None, max_iter: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.decomposition import NMF

    custom = init is not None
    model = NMF(n_components=k, init="custom" if custom else "nndsvda", solver="cd", tol=1e-6,
                max_iter=max_iter, random_state=seed)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning at max_iter: the curve reports what was reached
        w = model.fit_transform(a, W=init[0].copy(), H=init[1].copy()) if custom else model.fit_transform(a)
    return w, model.components_


def _grow(a: np.ndarray, w: np.ndarray, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(W, H) with one more group, no worse than (W, H): the residual's leading non-negative rank-1 part,
    scaled by the least-squares factor (≥ 0), so the error of the start is at most the old error."""
    r = a - w @ h
    u, s, vt = np.linalg.svd(np.maximum(r, 0), full_matrices=False)
    x, y = np.abs(u[:, 0]) * np.sqrt(s[0]), np.abs(vt[0]) * np.sqrt(s[0])
    outer = np.outer(x, y)
    norm = float((outer**2).sum())
    alpha = max(0.0, float((r * outer).sum()) / norm) if norm > 0 else 0.0
    x, y = x * np.sqrt(alpha), y * np.sqrt(alpha)
    eps = 1e-12  # coordinate descent leaves exact zeros where they are; start them just above
    return np.column_stack([w, x + eps]), np.vstack([h, y + eps])


def _exact(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p, c = a.shape
    return (a.copy(), np.eye(c)) if c <= p else (np.eye(p), a.copy())


def nmf_curve(
    a: np.ndarray, k_max: int | None = None, seed: int = 0, stop_at: float | None = None, k_min: int = 1
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(W, H) for k = 1, 2, …, explained variance non-decreasing in k.

    Up to ``k_max`` (default min(P, C), full rank); with ``stop_at``, stops at the first k ≥ ``k_min``
    whose explained variance reaches it.
    """
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != 2 or (a < 0).any():
        raise MechscopeError("NMF needs a non-negative matrix [positions, channels]")
    full = min(a.shape)
    k_max = full if k_max is None else min(k_max, full)
    fits: list[tuple[np.ndarray, np.ndarray]] = []
    for k in range(1, k_max + 1):
        fit = _fit(a, k, seed)
        value = explained_variance(a, *fit)
        if fits and value < explained_variance(a, *fits[-1]):  # a worse local optimum: warm start instead
            fit = max([fit, _fit(a, k, seed, init=_grow(a, *fits[-1]))], key=lambda f: explained_variance(a, *f))
            value = explained_variance(a, *fit)
        if k == full and value < 1.0:
            fit, value = _exact(a), 1.0
        fits.append(fit)
        if stop_at is not None and k >= k_min and value >= stop_at:
            break
    return fits


def _normalise(w: np.ndarray, h: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit-norm directions (the scale moved into W), groups sorted by ‖W_g‖·‖H_g‖, and their shares."""
    norms = np.linalg.norm(h, axis=1)
    keep = np.where(norms > 0, norms, 1.0)
    w, h = w * keep[None, :], h / keep[:, None]
    size = (w**2).sum(0)  # ‖w_g h_gᵀ‖² with ‖h_g‖ = 1
    order = np.argsort(-size, kind="stable")
    total = size.sum() or 1.0
    return w[:, order], h[order], size[order] / total


def nmf_groups(
    acts: np.ndarray, layer: str, k: int | None = None, threshold: float = THRESHOLD, seed: int = 0,
    k_max: int | None = None,
) -> NMFGroups:  # fmt: skip
    """Groups of ``acts`` [P, C] (positions × channels; negatives clipped) for hook ``layer``.

    ``k``: the number of groups (else the smallest k reaching ``threshold`` on the curve).
    """
    given = k is not None
    a = np.asarray(acts, dtype=np.float64)
    sq = float((a**2).sum())
    negative_share = float((np.minimum(a, 0) ** 2).sum()) / sq if sq > 0 else 0.0
    a = np.maximum(a, 0)
    if not a.any():
        raise MechscopeError(f"{layer}: no positive activation on the chosen image(s); nothing to factorise")
    full = min(a.shape)
    if k is not None and not 1 <= k <= full:
        raise MechscopeError(
            f"--groups {k} for {layer}: between 1 and {full} (min of its {a.shape[0]} positions and {a.shape[1]} "
            "channels)"
        )
    fits = nmf_curve(a, k_max, seed, stop_at=max(STOP_AT, threshold), k_min=k or 1)
    curve = tuple(explained_variance(a, *f) for f in fits)
    if k is None:
        k = next((i + 1 for i, v in enumerate(curve) if v >= threshold), len(curve))
    w, h, share = _normalise(*fits[k - 1])
    return NMFGroups(
        layer=layer, k=k, chosen_by="--groups" if given else "threshold", threshold=threshold,
        curve=curve, explained=explained_variance(a, *fits[k - 1]), negative_share=negative_share,
        directions=h, spatial=w, share=tuple(float(s) for s in share),
    )  # fmt: skip
