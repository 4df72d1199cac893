"""Rank statistics on tensors, for both wings: ranks with ties averaged (as scipy.stats.rankdata) and Spearman's
rank correlation, row by row (tests check both against scipy)."""

from __future__ import annotations

import torch


def rankdata(x: torch.Tensor) -> torch.Tensor:
    """Ranks along the last dimension, ties sharing their average rank (as scipy.stats.rankdata)."""
    out = torch.empty_like(x, dtype=torch.float64)
    flat_x, flat_out = x.reshape(-1, x.shape[-1]), out.view(-1, x.shape[-1])
    for i, row in enumerate(flat_x):
        values, order = torch.sort(row, stable=True)
        _, inverse, counts = torch.unique_consecutive(values, return_inverse=True, return_counts=True)
        ends = counts.cumsum(0).double()
        average = ends - (counts.double() - 1) / 2  # 1-based average rank of each tie group
        ranks = torch.empty(len(row), dtype=torch.float64)
        ranks[order] = average[inverse]
        flat_out[i] = ranks
    return out


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation of each row of ``a`` with the same row of ``b``: [B]; NaN for rows of fewer than 2
    values (no ranks to correlate, as scipy gives NaN)."""
    if a.flatten(1).shape[1] < 2:
        return torch.full((len(a),), float("nan"), dtype=torch.float64)
    ra, rb = rankdata(a.flatten(1)), rankdata(b.flatten(1))
    ra = ra - ra.mean(1, keepdim=True)
    rb = rb - rb.mean(1, keepdim=True)
    denom = (ra.norm(dim=1) * rb.norm(dim=1)).clamp(min=1e-12)
    return (ra * rb).sum(1) / denom


def sample_sd(x, axis: int = -1):
    """The sample standard deviation (ddof 1, as a ± sd or a standard error over a few sequences needs) along
    ``axis`` of an array; 0 where there is one value. NumPy's default (ddof 0) is about 7% small over 8 values."""
    import numpy as np

    a = np.asarray(x, dtype=np.float64)
    if a.shape[axis] < 2:
        return np.zeros_like(a.mean(axis=axis))
    return a.std(axis=axis, ddof=1)
