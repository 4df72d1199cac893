"""Training losses of the dictionary family, in the normalised space the model trains in.

For a batch of N tokens (``x [N, d_in]``, ``y [N, d_out]``, ``y = x`` for an SAE), every architecture pays
the reconstruction error ``L_rec = mean_n ||y'_n - y_hat'_n||^2`` (summed over dimensions, averaged over
tokens, SAELens' convention) plus its own term:

``relu``      ``lambda_1 * s * mean_n sum_i f_ni ||W_dec,i||`` (Bricken et al. 2023; the rows are unit norm,
              so this is the plain L1 norm of f).
``jumprelu``  ``lambda_0 * s * mean_n sum_i H(z_ni - theta_i)`` (Rajamanoharan et al. 2024, eq. 10), through
              the step function's pseudo-derivative (activations.StepFunction).
``topk``, ``batchtopk``  ``alpha * mean_n ||e_n - e_hat_n||^2`` (AuxK, Gao et al. 2024 section A.2): ``e = y' - y_hat'``
              (detached), ``e_hat = ReLU(TopK_aux(z restricted to dead latents)) W_dec`` (no bias), with
              ``k_aux`` latents and ``alpha = 1/32``. Gao et al. normalise both MSE terms by the data's
              variance; this keeps the plain sums as SAELens does (the same ratio alpha).

``s`` is the sparsity warm-up factor in [0, 1].
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from mechscope.core.dictionaries.activations import GatherPre, sparse_decode, step
from mechscope.core.dictionaries.sae import SparseDictionary


class StepLoss(NamedTuple):
    """One training step's loss and what it was computed from (normalised space).

    total, reconstruction, sparsity, aux: scalars. latents ``[N, d_sae]``, output ``[N, d_out]`` (normalised
    reconstruction), target ``[N, d_out]`` (normalised), pre ``[N, d_sae]``.
    """

    total: torch.Tensor
    reconstruction: torch.Tensor
    sparsity: torch.Tensor
    aux: torch.Tensor
    latents: torch.Tensor
    output: torch.Tensor
    target: torch.Tensor
    pre: torch.Tensor


def step_loss(
    model: SparseDictionary,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    sparsity_scale: float = 1.0,
    dead_mask: torch.Tensor | None = None,
    group=None,
) -> StepLoss:
    """The loss of one batch (see the module docstring). x ``[N, d_in]``, y ``[N, d_out]`` raw units;
    dead_mask ``[d_sae]`` bool (latents the AuxK loss may revive); group: the data-parallel process group."""
    x_norm = model.normalise_input(x)
    target = model.normalise_target(y)
    if model.cfg.architecture == "topk" and model.W_enc.dtype in (torch.float32, torch.float64):
        return _topk_step(model, x_norm, target, dead_mask)  # the sparse fast path (half precision: the dense one)
    pre = model.pre_activations(x_norm)
    f = model.activate(pre, group=group)
    out = model.decode_normalised(f, x_norm)
    rec = (out - target).pow(2).sum(-1).mean()
    sparsity = sparsity_loss(model, f, pre) * sparsity_scale
    aux = aux_k_loss(model, pre, out, target, dead_mask)
    return StepLoss(rec + sparsity + aux, rec, sparsity, aux, f, out, target, pre)


def sparsity_loss(model: SparseDictionary, f: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """The architecture's sparsity penalty (before warm-up), a scalar: L1 for relu, L0 for jumprelu, else 0."""
    cfg = model.cfg
    if cfg.architecture == "relu":
        return cfg.l1_coefficient * (f.abs() * model.W_dec.norm(dim=1)).sum(-1).mean()
    if cfg.architecture == "jumprelu":
        return cfg.l0_coefficient * step(pre, model.threshold.clamp_min(0), cfg.bandwidth).sum(-1).mean()
    return f.new_zeros(())


def aux_k_loss(
    model: SparseDictionary,
    pre: torch.Tensor,
    out: torch.Tensor,
    target: torch.Tensor,
    dead_mask: torch.Tensor | None,
) -> torch.Tensor:
    """AuxK (Gao et al. 2024, A.2): the dead latents' top ``k_aux`` pre-activations reconstruct the residual.

    pre ``[N, d_sae]``, out/target ``[N, d_out]``; zero for other architectures or with no dead latent.
    """
    cfg = model.cfg
    if cfg.architecture not in ("topk", "batchtopk") or cfg.aux_k_coefficient == 0 or dead_mask is None:
        return pre.new_zeros(())
    n_dead = int(dead_mask.sum())
    if n_dead == 0:
        return pre.new_zeros(())
    residual = (target - out).detach()
    k_aux = min(cfg.k_aux, n_dead)
    masked = torch.where(dead_mask, pre, torch.full_like(pre, -torch.inf))
    values, indices = torch.topk(masked, k_aux, dim=-1, sorted=False)
    acts = torch.zeros_like(pre).scatter(-1, indices, values.relu())
    return cfg.aux_k_coefficient * (acts @ model.W_dec - residual).pow(2).sum(-1).mean()


def _topk_step(model: SparseDictionary, x_norm: torch.Tensor, target: torch.Tensor, dead_mask) -> StepLoss:
    """:func:`step_loss` for TopK without the dense latents in the graph: the pre-activations are computed once
    without autograd, the kept (and AuxK's) entries re-enter it through :class:`GatherPre`, and the decoder is an
    embedding bag over the kept rows. The same loss and, up to float summation order, the same gradients as the
    dense path; the training step costs O(N k d) beyond the encoder's forward instead of O(N d_sae d)."""
    cfg = model.cfg
    x_in = x_norm - model.b_dec if cfg.apply_b_dec_to_input else x_norm
    with torch.no_grad():
        pre = torch.addmm(model.b_enc, x_in, model.W_enc)
        indices = torch.topk(pre, cfg.k, dim=-1, sorted=False).indices
    values = GatherPre.apply(x_in, model.W_enc, model.b_enc, pre, indices).relu()
    out = sparse_decode(indices, values, model.W_dec) + model.b_dec
    if cfg.skip:
        out = out + x_norm @ model.W_skip.T
    rec = (out - target).pow(2).sum(-1).mean()
    aux = pre.new_zeros(())
    n_dead = 0 if dead_mask is None or cfg.aux_k_coefficient == 0 else int(dead_mask.sum())
    if n_dead:
        residual = (target - out).detach()
        with torch.no_grad():
            masked = torch.where(dead_mask, pre, torch.full_like(pre, -torch.inf))
            aux_idx = torch.topk(masked, min(cfg.k_aux, n_dead), dim=-1, sorted=False).indices
        aux_v = GatherPre.apply(x_in, model.W_enc, model.b_enc, pre, aux_idx).relu()
        aux = cfg.aux_k_coefficient * (sparse_decode(aux_idx, aux_v, model.W_dec) - residual).pow(2).sum(-1).mean()
    f = torch.zeros_like(pre).scatter_(-1, indices, values.detach())
    return StepLoss(rec + aux, rec, pre.new_zeros(()), aux, f, out, target, pre)
