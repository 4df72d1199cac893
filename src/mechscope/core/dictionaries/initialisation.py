"""Data-dependent initialisation: the normalisation factor and the decoder bias.

Both read a sample of rows taken from the first training batches (``[M, d]``), in float64.
"""

from __future__ import annotations

import torch

from mechscope.core.errors import MechscopeError


def norm_scale(sample: torch.Tensor) -> float:
    """The factor ``s = sqrt(d / mean_n ||x_n||^2)`` that makes the mean squared norm of ``s x`` equal ``d``
    (Anthropic's April 2024 update; SAELens' ``expected_average_only_in``). sample: ``[M, d]``."""
    mean_sq = float(sample.double().pow(2).sum(-1).mean())
    if not mean_sq > 0:
        raise MechscopeError("expected activations with a non-zero norm to estimate the normalisation factor")
    return (sample.shape[-1] / mean_sq) ** 0.5


def geometric_median(points: torch.Tensor, *, max_iter: int = 100, tol: float = 1e-7) -> torch.Tensor:
    """The point minimising ``sum_n ||p_n - m||``, by Weiszfeld's iterations from the mean.

    ``m_{t+1} = sum_n w_n p_n / sum_n w_n`` with ``w_n = 1 / max(||p_n - m_t||, 1e-12)``, stopped when
    ``||m_{t+1} - m_t|| <= tol * (1 + ||m_t||)`` or after ``max_iter`` steps (Weiszfeld 1937; Bricken et al.
    2023 and Gao et al. 2024 start the decoder bias here). points: ``[M, d]`` -> ``[d]`` float64.
    """
    p = points.double()
    m = p.mean(0)
    for _ in range(max_iter):
        w = 1.0 / (p - m).norm(dim=1).clamp_min(1e-12)
        new = (w[:, None] * p).sum(0) / w.sum()
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
