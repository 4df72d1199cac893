"""The sparsifying nonlinearities of the dictionary family, each with the paper it comes from.

Shapes: ``pre`` is ``[N, d_sae]`` (the encoder's pre-activations of N tokens); every function returns the
latents ``f`` of the same shape. ``group`` is a ``torch.distributed`` process group (or ``None``): BatchTopK
chooses its kept set over the whole global batch, so data-parallel ranks agree with one process.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def topk_relu(pre: torch.Tensor, k: int) -> torch.Tensor:
    """``ReLU(TopK(pre))``: keep each row's k largest pre-activations, rectified (Gao et al. 2024, eq. 2)."""
    values, indices = torch.topk(pre, k, dim=-1, sorted=False)
    return torch.zeros_like(pre).scatter(-1, indices, values.relu())


def batch_topk(pre: torch.Tensor, k: int, group=None) -> torch.Tensor:
    """BatchTopK (Bussmann et al. 2024, eq. 3): keep the ``k * B`` largest of ``ReLU(pre)`` over the batch.

    ``B`` is the global batch (all ranks of ``group``). The kept set is ``ReLU(pre) >= t`` with ``t`` the
    ``k * B``-th largest value of the global batch, found from each rank's own top candidates, so one process
    and several ranks keep the same entries (ties included). Gradients flow through the kept entries.
    """
    acts = pre.relu()
    world = dist.get_world_size(group) if group is not None else 1
    keep = k * pre.shape[0] * world
    flat = acts.detach().flatten()
    candidates = torch.topk(flat, min(keep, flat.numel()), sorted=False).values
    if world > 1:
        gathered = [torch.empty_like(candidates) for _ in range(world)]
        dist.all_gather(gathered, candidates, group=group)
        candidates = torch.cat(gathered)
    threshold = torch.topk(candidates, min(keep, candidates.numel()), sorted=False).values.min()
    mask = (acts >= threshold) & (acts > 0)
    return acts * mask


def rectangle(u: torch.Tensor) -> torch.Tensor:
    """The rectangle kernel ``K(u) = 1[-1/2 < u < 1/2]`` of the JumpReLU pseudo-derivatives."""
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class JumpReLUFunction(torch.autograd.Function):
    """``JumpReLU_theta(z) = z * H(z - theta)`` with the straight-through estimator of Rajamanoharan et al. 2024.

    Backward (eqs. 11-12 of "Jumping Ahead"): ``d/dz = H(z - theta)`` (exact); ``d/dtheta = -(theta / eps) *
    K((z - theta) / eps)`` (pseudo-derivative, rectangle kernel of bandwidth eps), summed over tokens.
    z: ``[N, d_sae]``; theta: ``[d_sae]``.
    """

    @staticmethod
    def forward(ctx, z: torch.Tensor, theta: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = bandwidth
        return z * (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        z, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_z = (z > theta).to(z.dtype) * grad
        kernel = rectangle((z - theta) / eps)
        grad_theta = (-(theta / eps) * kernel * grad).reshape(-1, theta.shape[-1]).sum(0)
        return grad_z, grad_theta, None


class StepFunction(torch.autograd.Function):
    """``H(z - theta)``, whose sum over latents is the L0 norm, with the pseudo-derivative of "Jumping Ahead".

    Backward: ``d/dz = 0``; ``d/dtheta = -(1 / eps) * K((z - theta) / eps)`` summed over tokens (eq. 13).
    """

    @staticmethod
    def forward(ctx, z: torch.Tensor, theta: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = bandwidth
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        z, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_theta = (-(1.0 / eps) * rectangle((z - theta) / eps) * grad).reshape(-1, theta.shape[-1]).sum(0)
        return None, grad_theta, None


def jumprelu(pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """``pre * H(pre - threshold)`` (threshold ``[d_sae]`` kept >= 0), differentiable in the threshold."""
    return JumpReLUFunction.apply(pre, threshold, bandwidth)


def step(pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """``H(pre - threshold)`` with the L0 pseudo-derivative for the threshold."""
    return StepFunction.apply(pre, threshold, bandwidth)


class GatherPre(torch.autograd.Function):
    """Pre-activations ``z = x W + b`` at chosen entries only, with a sparse backward (TopK training's fast path).

    forward(x ``[N, d]``, W ``[d, S]``, b ``[S]``, pre ``[N, S]`` = x W + b computed without autograd, indices
    ``[N, m]``) returns ``pre.gather(1, indices)``. Backward, for the gradient g ``[N, m]`` of those entries:
    ``dx = sum_j g_nj W[:, i_nj]``, ``dW[:, i] += x_n g_nj`` (sparse-dense products of the ``N m`` nonzero
    gradients) and ``db[i] += g_nj``: O(N m d) instead of the dense ``x^T (scatter g)`` O(N S d). The same gradient
    as autograd
    through ``(x W + b).gather(1, indices)``, up to the order of float additions (EleutherAI's sparsify trains
    TopK SAEs with the same idea).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, pre: torch.Tensor, indices: torch.Tensor):
        ctx.save_for_backward(x, w, indices)
        return pre.gather(1, indices)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, w, indices = ctx.saved_tensors
        gx = gw = gb = None
        n, m = indices.shape
        flat = indices.reshape(-1)
        rows = torch.arange(n, device=indices.device).repeat_interleave(m)
        g = grad.reshape(-1).to(w.dtype)
        if ctx.needs_input_grad[0]:  # [N, S] sparse @ W^T [S, d]
            sp = torch.sparse_coo_tensor(torch.stack([rows, flat]), g, (n, w.shape[1]), check_invariants=False)
            gx = torch.sparse.mm(sp, w.T.contiguous())
        if ctx.needs_input_grad[1]:  # ([S, N] sparse @ x [N, d])^T
            sp = torch.sparse_coo_tensor(torch.stack([flat, rows]), g, (w.shape[1], n), check_invariants=False)
            gw = torch.sparse.mm(sp, x.to(w.dtype)).T
        if ctx.needs_input_grad[2]:
            gb = torch.zeros(w.shape[1], dtype=w.dtype, device=w.device).index_add_(0, flat, g)
        return gx, gw, gb, None, None


def sparse_decode(indices: torch.Tensor, values: torch.Tensor, w_dec: torch.Tensor) -> torch.Tensor:
    """``sum_j values[n, j] W_dec[indices[n, j]]`` ``[N, d_out]`` without the dense ``[N, d_sae]`` latents (an embedding
    bag: its backward touches only the chosen rows)."""
    return torch.nn.functional.embedding_bag(indices, w_dec, per_sample_weights=values.to(w_dec.dtype), mode="sum")
