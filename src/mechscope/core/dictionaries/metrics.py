"""Evaluation metrics of a sparse dictionary, each with its formula, and a streaming accumulator.

Notation: N tokens, ``x [N, d]`` the activations the dictionary should reproduce (the target, for a
transcoder), ``x_hat [N, d]`` its output, ``f [N, d_sae]`` its latents, ``mean(x)`` the per-dimension mean over
the N tokens. Batch functions return Python floats; :class:`StreamingMetrics` gives the same numbers over
many batches (float64 sums; the variance by Chan et al.'s pairwise update).

    l0                      = (1/N) sum_n #{i : f_ni != 0}
    mse                     = (1/(N d)) sum_n ||x_n - x_hat_n||^2                     (per element)
    squared_error           = (1/N) sum_n ||x_n - x_hat_n||^2            (per token; SAELens' "mse")
    explained_variance      = 1 - sum_n ||x_n - x_hat_n||^2 / sum_n ||x_n - mean(x)||^2   (against the mean)
    cosine_similarity       = (1/N) sum_n <x_n, x_hat_n> / (||x_n|| ||x_hat_n||)   (0 where a norm is 0)
    l2_ratio                = (1/N) sum_n ||x_hat_n|| / ||x_n||   (SAELens; ||x_n|| < 1e-4 counts as 1)
    relative_reconstruction_bias = mean_n ||x_hat_n||^2 / mean_n <x_n, x_hat_n>   (Rajamanoharan et al. 2024a, eq. 10)
    dead latents            = latents with f_ni == 0 on every one of the tokens seen (a window of N tokens)
    dense latents           = latents with f_ni != 0 on more than ``dense_threshold`` (default 10%) of them

Spliced-in effects (the wings run the model three ways and pass the numbers here):

    ce_loss_recovered = (L_zero_ablated - L_spliced) / (L_zero_ablated - L_clean)
    kl_divergence     = mean over positions of KL(P_clean || P_spliced),
                        KL(P || Q) = sum_v p_v (log p_v - log q_v)
    kl_recovered      = (KL_zero_ablated - KL_spliced) / KL_zero_ablated        (SAELens' kl_div_score)
    accuracy_recovered = (acc_spliced - acc_ablated) / (acc_clean - acc_ablated)

A recovered fraction whose denominator is 0 is NaN (the ablation changed nothing, so there is nothing to
recover).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from mechscope.core.errors import MechscopeError
from mechscope.core.results import Result, figure_data


def _pair(x: torch.Tensor, x_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(x, torch.Tensor) or not isinstance(x_hat, torch.Tensor) or x.shape != x_hat.shape:
        raise MechscopeError("expected x and x_hat tensors of one shape [N, d]")
    if x.ndim != 2 or x.shape[0] == 0:
        raise MechscopeError(f"expected x of shape [N, d] with N > 0, got {tuple(x.shape)}")
    return x.detach().double(), x_hat.detach().double()


def l0(f: torch.Tensor) -> float:
    """Mean number of non-zero latents per token. f: ``[N, d_sae]``."""
    return float((f.detach() != 0).sum(-1).double().mean())


def mse(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Mean squared error per element."""
    x, x_hat = _pair(x, x_hat)
    return float((x - x_hat).pow(2).mean())


def squared_error(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Mean over tokens of ``||x - x_hat||^2`` (SAELens reports this as "mse")."""
    x, x_hat = _pair(x, x_hat)
    return float((x - x_hat).pow(2).sum(-1).mean())


def explained_variance(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """``1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2``: against the mean, not against zero (NaN if x is
    constant)."""
    x, x_hat = _pair(x, x_hat)
    total = (x - x.mean(0)).pow(2).sum()
    return float(1 - (x - x_hat).pow(2).sum() / total) if total > 0 else math.nan


def cosine_similarity(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Mean cosine similarity of each token's x and x_hat (0 for a zero vector)."""
    x, x_hat = _pair(x, x_hat)
    return float(_cosines(x, x_hat).mean())


def l2_ratio(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Shrinkage: mean of ``||x_hat|| / ||x||`` per token, as SAELens' "l2_ratio" (``||x|| < 1e-4`` -> 1)."""
    x, x_hat = _pair(x, x_hat)
    return float(_ratios(x, x_hat).mean())


def relative_reconstruction_bias(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """``mean ||x_hat||^2 / mean <x, x_hat>`` (1 for an unbiased reconstruction, below 1 for shrinkage; NaN where
    ``mean <x, x_hat>`` is 0)."""
    x, x_hat = _pair(x, x_hat)
    dot = (x * x_hat).sum(-1).mean()
    return float(x_hat.pow(2).sum(-1).mean() / dot) if dot != 0 else math.nan  # as the streaming sums do


def _cosines(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    norms = x.norm(dim=-1) * x_hat.norm(dim=-1)
    dots = (x * x_hat).sum(-1)
    return torch.where(norms > 0, dots / norms.clamp_min(1e-300), torch.zeros_like(dots))


def _ratios(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    n_in = x.norm(dim=-1)
    n_in = torch.where(n_in.abs() < 1e-4, torch.ones_like(n_in), n_in)
    return x_hat.norm(dim=-1) / n_in


def dead_latents(fire_counts: torch.Tensor) -> torch.Tensor:
    """Indices of latents that never fired. fire_counts ``[d_sae]``: tokens each latent fired on."""
    return torch.nonzero(fire_counts == 0).flatten()


def dense_latents(fire_counts: torch.Tensor, tokens: int, threshold: float = 0.1) -> torch.Tensor:
    """Indices of latents that fired on more than ``threshold`` of ``tokens`` tokens."""
    if tokens <= 0:
        raise MechscopeError(f"expected tokens > 0, got {tokens}")
    return torch.nonzero(fire_counts.double() / tokens > threshold).flatten()


# ---- spliced-in effects ------------------------------------------------------------------------------


def _recovered(ablated: float, spliced: float, clean: float) -> float:
    ablated, spliced, clean = float(ablated), float(spliced), float(clean)
    return (ablated - spliced) / (ablated - clean) if ablated != clean else math.nan


def ce_loss_recovered(clean: float, spliced: float, zero_ablated: float) -> float:
    """``(L_zero_ablated - L_spliced) / (L_zero_ablated - L_clean)``: 1 when splicing costs nothing, 0 when it
    is as bad as zeroing the activations."""
    return _recovered(zero_ablated, spliced, clean)


def accuracy_recovered(clean: float, spliced: float, ablated: float) -> float:
    """``(acc_spliced - acc_ablated) / (acc_clean - acc_ablated)`` for classifiers."""
    return _recovered(ablated, spliced, clean)


def kl_divergence(clean_logits: torch.Tensor, spliced_logits: torch.Tensor, reduction: str = "mean"):
    """``KL(P_clean || P_spliced)`` over the last (vocabulary) dimension, in nats, computed in float64.

    Logits ``[..., vocab]``. reduction "mean": a float, the mean over positions; "none": a ``[...]`` tensor.
    """
    if clean_logits.shape != spliced_logits.shape or clean_logits.ndim < 1:
        raise MechscopeError("expected clean and spliced logits of one shape [..., vocab]")
    log_p = torch.log_softmax(clean_logits.detach().double(), dim=-1)
    log_q = torch.log_softmax(spliced_logits.detach().double(), dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    if reduction == "none":
        return kl
    if reduction != "mean":
        raise MechscopeError(f"expected reduction 'mean' or 'none', got {reduction!r}")
    return float(kl.mean())


def kl_recovered(kl_spliced: float, kl_zero_ablated: float) -> float:
    """``(KL_zero_ablated - KL_spliced) / KL_zero_ablated`` (SAELens' ``kl_div_score``)."""
    return _recovered(kl_zero_ablated, kl_spliced, 0.0)


# ---- streaming --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DictionaryMetrics(Result):
    """A dictionary's reconstruction and sparsity over ``tokens`` tokens (formulas in the module docstring)."""

    SCHEMA: ClassVar[str] = "mechscope.dictionary_metrics/1"

    tokens: int
    l0: float
    mse: float
    squared_error: float
    explained_variance: float
    cosine_similarity: float
    l2_ratio: float
    relative_reconstruction_bias: float
    dead_fraction: float
    dense_fraction: float
    dense_threshold: float
    latent_frequency: np.ndarray | None = figure_data()


class StreamingMetrics:
    """Accumulates :class:`DictionaryMetrics` over batches: ``update(x, x_hat, f)`` then ``result()``.

    Holds O(d + d_sae) float64 numbers whatever the number of tokens. Dead latents are those that never fired
    over all the tokens seen (the window is what was fed), dense ones fired on more than ``dense_threshold``.
    """

    def __init__(self, d: int, d_sae: int, dense_threshold: float = 0.1) -> None:
        self.d, self.d_sae, self.dense_threshold = d, d_sae, dense_threshold
        self.n = 0
        self.mean = torch.zeros(d, dtype=torch.float64)
        self.m2 = torch.zeros(d, dtype=torch.float64)
        self.sums = dict.fromkeys(("sq_err", "l0", "cos", "ratio", "out_sq", "dot"), 0.0)
        self.fire_counts = torch.zeros(d_sae, dtype=torch.float64)

    def update(self, x: torch.Tensor, x_hat: torch.Tensor, f: torch.Tensor) -> None:
        """Add a batch: x, x_hat ``[N, d]``, f ``[N, d_sae]``."""
        x, x_hat = _pair(x, x_hat)
        if x.shape[1] != self.d or f.shape != (x.shape[0], self.d_sae):
            raise MechscopeError(
                f"expected x [N, {self.d}] and f [N, {self.d_sae}], got {tuple(x.shape)}, {tuple(f.shape)}"
            )
        self._update_variance(x)
        fired = f.detach() != 0
        s = self.sums
        s["sq_err"] += float((x - x_hat).pow(2).sum())
        s["l0"] += float(fired.sum())
        s["cos"] += float(_cosines(x, x_hat).sum())
        s["ratio"] += float(_ratios(x, x_hat).sum())
        s["out_sq"] += float(x_hat.pow(2).sum())
        s["dot"] += float((x * x_hat).sum())
        self.fire_counts += fired.sum(0).double().cpu()

    def _update_variance(self, x: torch.Tensor) -> None:
        nb = x.shape[0]
        mean_b = x.mean(0).cpu()
        m2_b = (x - x.mean(0)).pow(2).sum(0).cpu()
        n = self.n + nb
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (nb / n)
        self.m2 = self.m2 + m2_b + delta.pow(2) * (self.n * nb / n)
        self.n = n

    def result(self) -> DictionaryMetrics:
        """The metrics over every token fed so far."""
        if self.n == 0:
            raise MechscopeError("expected at least one batch before result()")
        n, s, total = self.n, self.sums, float(self.m2.sum())
        freq = self.fire_counts / n
        return DictionaryMetrics(
            tokens=n,
            l0=s["l0"] / n,
            mse=s["sq_err"] / (n * self.d),
            squared_error=s["sq_err"] / n,
            explained_variance=1 - s["sq_err"] / total if total > 0 else math.nan,
            cosine_similarity=s["cos"] / n,
            l2_ratio=s["ratio"] / n,
            relative_reconstruction_bias=s["out_sq"] / s["dot"] if s["dot"] != 0 else math.nan,
            dead_fraction=float((self.fire_counts == 0).double().mean()),
            dense_fraction=float((freq > self.dense_threshold).double().mean()),
            dense_threshold=self.dense_threshold,
            latent_frequency=freq.numpy(),
        )


@torch.no_grad()
def evaluate(model, batches, *, dense_threshold: float = 0.1) -> DictionaryMetrics:
    """:class:`DictionaryMetrics` of ``model`` (a SparseDictionary, in eval mode) over ``batches``: tensors
    ``x [N, d_in]`` for an SAE, or ``(x, y)`` pairs for a transcoder."""
    acc = StreamingMetrics(model.cfg.d_out, model.cfg.d_sae, dense_threshold)
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            x, y = batch if isinstance(batch, (tuple, list)) else (batch, batch)
            out, f = model(x)
            acc.update(y, out, f)
    finally:
        model.train(was_training)
    return acc.result()
