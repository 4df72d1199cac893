"""Data-dependent initialisation: the normalisation factor and the decoder bias.

Both read a sample of rows taken from the first training batches (``[M, d]``), in float64.
"""

from __future__ import annotations

import math

import torch

from mechscope.core.errors import MechscopeError


def norm_scale(sample: torch.Tensor) -> float:
    """The factor ``s = sqrt(d / mean_n ||x_n||^2)`` that makes the mean squared norm of ``s x`` equal ``d``
    (Anthropic's April 2024 update; SAELens' ``expected_average_only_in``). sample: ``[M, d]``."""
    mean_sq = float(sample.double().pow(2).sum(-1).mean())
    if not math.isfinite(mean_sq):  # NaN or infinite activations (or squares past float64): no factor to estimate
        raise MechscopeError("expected finite activations to estimate the normalisation factor, got NaN or infinite "
                             "values (or values too large to square)")  # fmt: skip
    if not mean_sq > 0:
        raise MechscopeError("expected activations with a non-zero norm to estimate the normalisation factor")
    return (sample.shape[-1] / mean_sq) ** 0.5


def geometric_median(points: torch.Tensor, *, max_iter: int = 100, tol: float = 1e-7) -> torch.Tensor:
    """The point minimising ``sum_n ||p_n - m||``, by Weiszfeld's iterations from the mean.

    ``m_{t+1} = sum_n w_n p_n / sum_n w_n`` with ``w_n = 1 / ||p_n - m_t||``, stopped when
    ``||m_{t+1} - m_t|| <= tol * (1 + ||m_t||)`` or after ``max_iter`` steps (Weiszfeld 1937; Bricken et al.
    2023 and Gao et al. 2024 start the decoder bias here). Where ``m_t`` is itself one of the points (the mean can
    be), the step is Vardi and Zhang's (2000): stop if the pull of the other points, ``||sum (p_n - m)/||p_n - m||||``,
    is at most the number of points at ``m`` (then ``m`` is the minimiser), else move part way to their Weiszfeld
    point (plain Weiszfeld would stay stuck there). points: ``[M, d]`` -> ``[d]`` float64.
    """
    p = points.double()
    m = p.mean(0)
    for _ in range(max_iter):
        dist = (p - m).norm(dim=1)
        at = dist <= 1e-12 * (1 + m.norm())  # points at m: no direction, no weight
        if bool(at.all()):
            break
        w = torch.where(at, torch.zeros_like(dist), 1.0 / dist.clamp_min(1e-300))
        new = (w[:, None] * p).sum(0) / w.sum()
        if bool(at.any()):
            pull = float((w[:, None] * (p - m)).sum(0).norm())
            here = int(at.sum())
            if pull <= here:
                break
            new = (1 - here / pull) * new + (here / pull) * m
        done = (new - m).norm() <= tol * (1 + m.norm())
        m = new
        if done:
            break
    return m


def decoder_bias_init(sample: torch.Tensor, how: str) -> torch.Tensor:
    """The decoder bias's starting value from target rows ``[M, d_out]``: ``"geometric_median"``, ``"mean"`` or
    ``"zeros"``."""
    if how == "geometric_median":
        return geometric_median(sample)
    if how == "mean":
        return sample.double().mean(0)
    if how == "zeros":
        return torch.zeros(sample.shape[-1], dtype=torch.float64)
    raise MechscopeError(f"expected b_dec_init 'geometric_median', 'mean' or 'zeros', got {how!r}")
