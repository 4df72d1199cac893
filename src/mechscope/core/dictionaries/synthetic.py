"""Planted features: synthetic activations in superposition with known directions, and recovery scores.

Data (Elhage et al. 2022, "Toy Models of Superposition"; Sharkey et al. 2022, "Taking features out of
superposition"): ``n_features > d`` random unit directions ``F [n_features, d]``; each token ``x = c F`` with
sparse non-negative coefficients ``c_i = a_i m_i``, ``a_i ~ Bernoulli(p_i)`` (firing), ``m_i ~ U[low, high]``
(magnitude). Correlated firing: features come in groups of ``group_size``; feature i fires when
``sqrt(rho) s_g + sqrt(1 - rho) e_i > Phi^-1(1 - p_i)`` with ``s_g, e_i ~ N(0, 1)`` (a Gaussian copula: each
feature still fires with probability p_i, features of one group fire together more often when rho > 0).

Scores:

    MMCS = (1/n) sum_i max_j cos(F_i, D_j)        (D: the learned decoder rows; Sharkey et al. 2022)
    MCC  = (1/n') sum over matched (i, j) of |corr(c_i, f_j)|   (Pearson over tokens; one-to-one matching
           maximising the sum by the Hungarian method, n' = min(n, d_sae) pairs; Khemakhem et al. 2020)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from mechscope.core.errors import MechscopeError
from mechscope.core.results import Result


@dataclass(frozen=True)
class PlantedFeatures:
    """Ground truth: directions ``features [n, d]`` (unit rows), firing ``probabilities [n]``, the magnitude range,
    and the firing correlation ``rho`` within groups of ``group_size`` features."""

    features: torch.Tensor
    probabilities: torch.Tensor
    magnitude: tuple[float, float] = (0.0, 1.0)
    rho: float = 0.0
    group_size: int = 1

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x [n, d], coefficients [n, n_features])``, float32."""
        n_features = self.features.shape[0]
        noise = torch.randn(n, n_features, generator=generator)
        if self.rho > 0:
            groups = -(-n_features // self.group_size)
            shared = torch.randn(n, groups, generator=generator).repeat_interleave(self.group_size, dim=1)
            noise = self.rho**0.5 * shared[:, :n_features] + (1 - self.rho) ** 0.5 * noise
        cut = torch.distributions.Normal(0.0, 1.0).icdf(1 - self.probabilities)
        low, high = self.magnitude
        mags = low + (high - low) * torch.rand(n, n_features, generator=generator)
        coefficients = (noise > cut) * mags
        return coefficients @ self.features, coefficients

    def batches(self, n_batches: int, batch_size: int, seed: int = 0):
        """``n_batches`` tensors ``[batch_size, d]`` drawn from a generator seeded with ``seed``."""
        g = torch.Generator().manual_seed(seed)
        for _ in range(n_batches):
            yield self.sample(batch_size, g)[0]


def planted_features(
    n_features: int,
    d: int,
    *,
    probability: float = 0.05,
    magnitude: tuple[float, float] = (0.0, 1.0),
    rho: float = 0.0,
    group_size: int = 1,
    seed: int = 0,
) -> PlantedFeatures:
    """``n_features`` random unit directions in ``R^d`` that each fire with ``probability`` (see module doc)."""
    for name, value in (("n_features", n_features), ("d", d), ("group_size", group_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise MechscopeError(f"expected {name} to be a positive integer, got {value!r}")
    if not 0 < probability < 1:
        raise MechscopeError(f"expected 0 < probability < 1, got {probability!r}")
    if not 0 <= rho < 1:
        raise MechscopeError(f"expected 0 <= rho < 1, got {rho!r}")
    if not 0 <= magnitude[0] <= magnitude[1] or magnitude[1] == 0:
        raise MechscopeError(f"expected a magnitude range 0 <= low <= high, high > 0, got {magnitude!r}")
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(n_features, d, generator=g)
    features = features / features.norm(dim=1, keepdim=True)
    return PlantedFeatures(features, torch.full((n_features,), float(probability)), tuple(magnitude), rho, group_size)


def mmcs(learned: torch.Tensor, true: torch.Tensor) -> float:
    """Mean over the true features ``[n, d]`` of the best cosine with a learned direction ``[m, d]``."""
    if learned.ndim != 2 or true.ndim != 2 or learned.shape[1] != true.shape[1]:
        raise MechscopeError(
            f"expected learned [m, d] and true [n, d] directions, got {tuple(learned.shape)}, {tuple(true.shape)}"
        )
    a = true.double() / true.double().norm(dim=1, keepdim=True).clamp_min(1e-12)
    b = learned.double() / learned.double().norm(dim=1, keepdim=True).clamp_min(1e-12)
    return float((a @ b.T).max(dim=1).values.mean())


def correlations(true_coefficients: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """Pearson correlations ``[n, m]`` over tokens between each true coefficient and each latent (0 where
    either is constant)."""
    a = true_coefficients.double() - true_coefficients.double().mean(0)
    b = latents.detach().double() - latents.detach().double().mean(0)
    norms = a.norm(dim=0)[:, None] * b.norm(dim=0)[None, :]
    return torch.where(norms > 0, (a.T @ b) / norms.clamp_min(1e-300), torch.zeros_like(norms))


def mcc(true_coefficients: torch.Tensor, latents: torch.Tensor) -> float:
    """Mean |correlation| over a one-to-one matching of true features to latents (Hungarian; greedy without
    scipy). true_coefficients ``[N, n]``, latents ``[N, m]``."""
    if true_coefficients.ndim != 2 or latents.ndim != 2 or true_coefficients.shape[0] != latents.shape[0]:
        raise MechscopeError("expected true coefficients [N, n] and latents [N, m] over the same N tokens")
    c = correlations(true_coefficients, latents).abs()
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError:
        return _greedy_matching(c)
    rows, cols = linear_sum_assignment(c.numpy(), maximize=True)
    return float(c[rows, cols].mean())


def _greedy_matching(c: torch.Tensor) -> float:
    c = c.clone()
    picked = []
    for _ in range(min(c.shape)):
        flat = int(torch.argmax(c))
        i, j = divmod(flat, c.shape[1])
        picked.append(float(c[i, j]))
        c[i, :] = -1
        c[:, j] = -1
    return sum(picked) / len(picked)


@dataclass(frozen=True)
class RecoveryScores(Result):
    """How well a dictionary found planted features: MMCS, MCC, and the share of features whose best
    cosine is at least ``threshold``."""

    SCHEMA: ClassVar[str] = "mechscope.planted_recovery/1"

    mmcs: float
    mcc: float
    recovered_fraction: float
    threshold: float
    n_features: int
    d_sae: int
    tokens: int


@torch.no_grad()
def recovery(
    model, planted: PlantedFeatures, *, tokens: int = 8192, seed: int = 12345, threshold: float = 0.9
) -> RecoveryScores:
    """Score ``model`` (a SparseDictionary) against ``planted`` on ``tokens`` fresh tokens."""
    x, coefficients = planted.sample(tokens, torch.Generator().manual_seed(seed))
    was = model.training
    model.eval()
    latents = model.encode(x)
    model.train(was)
    directions = model.decoder_directions
    best = (planted.features.double() @ directions.double().T).max(dim=1).values
    return RecoveryScores(
        mmcs=mmcs(directions, planted.features),
        mcc=mcc(coefficients, latents),
        recovered_fraction=float((best >= threshold).double().mean()),
        threshold=threshold,
        n_features=planted.features.shape[0],
        d_sae=directions.shape[0],
        tokens=tokens,
    )
