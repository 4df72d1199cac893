"""Attribution between neuron groups of adjacent layers, and from groups to classes (Olah et al. 2018).

Definition (as "The Building Blocks of Interpretability" computes it, gradient × activation
along the group directions). The activation a of a layer for one image, [C, H, W], is split by
that layer's NMF groups into components V_g[c, y, x] = W[(y, x), g] · H[g, c] (the group's part
of the factorisation) and a residual r = a − Σ_g V_g (what the groups leave out, negatives
included). For a scalar f of a, evaluated at a,

    attr(g → f) = Σ_{c,y,x} V_g[c, y, x] · ∂f/∂a[c, y, x],      attr(residual → f) = ⟨r, ∂f/∂a⟩,

so the groups and the residual sum to the layer's whole gradient × activation ⟨a, ∂f/∂a⟩.
When f is linear in a (the linear read-out: f(a) = w·a + b) that sum is exactly f(a) − f(0),
the change when the layer is set to zero, and each group's attribution is exactly
f(a) − f(a − V_g), the change when the group is removed. Otherwise (through a convolution, a
ReLU, a pooling) it is the first-order estimate; :class:`GroupFlow` holds both actual changes
beside it so the gap is visible.

The targets f: a logit, or a group of the next layer, read as s_h(b) = ⟨b⁺, V'_h⟩ / ‖V'_h‖²
with b the next layer's activation (computed from a by the network), b⁺ its positive part (what
NMF factorised) and V'_h that group's component on the same image: the least-squares
coefficient of b⁺ on the group, 1 when b⁺ is the group's component alone. A group with no
component on the image has s_h = 0. With several images the divisor is ‖V'_h‖² averaged over
them, so that an image on which the group is faint does not inflate its attributions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from mechscope.cnn.models.hooked import apply_layer
from mechscope.core.results import Result
from mechscope.core.torch_utils import evaluating


@dataclass(frozen=True)
class GroupFlow(Result):
    """Attribution from the groups of ``source`` to the scalars ``targets`` (mean over ``n_images``)."""

    source: str  # stage name
    target: str  # stage name or "logits"
    targets: tuple[str, ...]  # one name per target scalar (next layer's groups, or classes)
    attribution: np.ndarray  # [k, T] gradient × activation along each group
    residual: np.ndarray  # [T] along what the groups leave out
    grad_x_act: np.ndarray  # [T] ⟨a, ∇f⟩ = attribution.sum(0) + residual
    actual_change: np.ndarray  # [T] f(a) − f(0): the layer set to zero
    removal: np.ndarray  # [k, T] f(a) − f(a − V_g): each group removed on its own
    n_images: int = 1

    @property
    def completeness_gap(self) -> np.ndarray:
        """[T] actual change − (Σ groups + residual): 0 for a linear f."""
        return self.actual_change - self.grad_x_act


def components(spatial: np.ndarray, directions: np.ndarray, shape: tuple[int, int, int]) -> torch.Tensor:
    """V [k, C, H, W] from one image's spatial factors [H·W, k] and the directions [k, C]."""
    c, h, w = shape
    v = np.einsum("pk,kc->kcp", spatial, directions).reshape(len(directions), c, h, w)
    return torch.as_tensor(v, dtype=torch.float32)


def group_flow(
    f: Callable[[torch.Tensor], torch.Tensor], a: torch.Tensor, comps: torch.Tensor, source: str, target: str,
    names: tuple[str, ...],
) -> GroupFlow:  # fmt: skip
    """Attributions of the components ``comps`` [k, C, H, W] of ``a`` [C, H, W] to ``f``: batch [B, C, H, W] → [B, T].

    ``f`` must treat batch rows independently (eval mode); one backward pass gives all T gradients.
    """
    a = a.detach().float()
    with torch.no_grad():
        f_a = f(a[None])[0]
    t = f_a.shape[0]
    rep = a.expand(t, *a.shape).clone().requires_grad_(True)
    with torch.enable_grad():
        out = f(rep)  # [T, T]: row i is f at a, differentiated for target i only
        (grad,) = torch.autograd.grad(out.diagonal().sum(), rep)  # [T, C, H, W] = ∂f_t/∂a
    with torch.no_grad():
        f_0 = f(torch.zeros_like(a)[None])[0]
        f_minus = f(a[None] - comps)  # [k, T]
    attr = torch.einsum("kchw,tchw->kt", comps, grad)
    resid = torch.einsum("chw,tchw->t", a - comps.sum(0), grad)
    gxa = torch.einsum("chw,tchw->t", a, grad)
    return GroupFlow(
        source=source, target=target, targets=tuple(names), attribution=attr.numpy(), residual=resid.numpy(),
        grad_x_act=gxa.numpy(), actual_change=(f_a - f_0).numpy(), removal=(f_a[None] - f_minus).numpy(),
    )  # fmt: skip


def run_between(spec, start: str, x: torch.Tensor, stop: str | None = None) -> torch.Tensor:
    """The network from hook point ``start`` (given its activation ``x``) up to hook ``stop`` (the logits if None)."""
    names = [name for name, _ in spec.plan]
    end = names.index(stop) + 1 if stop is not None else len(names)
    for _, module in spec.plan[names.index(start) + 1 : end]:
        x = apply_layer(module, x)
    return x


def group_scores(b: torch.Tensor, comps: torch.Tensor, norm: torch.Tensor | None = None) -> torch.Tensor:
    """s_h(b) = ⟨b⁺, V'_h⟩ / ‖V'_h‖² for a batch b [B, C, H, W] and components [k, C, H, W] → [B, k]
    (``norm`` [k]: the divisor instead of ‖V'_h‖²)."""
    norm = comps.flatten(1).pow(2).sum(1) if norm is None else norm
    dots = torch.einsum("bchw,kchw->bk", b.clamp(min=0), comps)
    return torch.where(norm > 0, dots / norm.clamp(min=1e-30), torch.zeros_like(dots))


def flows_for_image(spec, acts: dict, comps: dict, class_names: tuple[str, ...], norms: dict | None = None
                    ) -> list[GroupFlow]:  # fmt: skip
    """Group → group for each pair of adjacent stages, and last stage → classes, for one image.

    ``acts``: stage name → its hook_out activation [C, H, W]; ``comps``: stage name → its components;
    ``norms``: stage name → the divisors of its group scores (default ‖V'_h‖² on this image).
    """
    stages = spec.stages
    out = []
    with evaluating(spec.model):
        for s, nxt in zip(stages, stages[1:], strict=False):
            v_next, n_next = comps[nxt.name], (norms or {}).get(nxt.name)

            def f(x, s=s, nxt=nxt, v_next=v_next, n_next=n_next):
                return group_scores(run_between(spec, s.hook_out, x, nxt.hook_out), v_next, n_next)

            names = tuple(f"{nxt.name} group {h + 1}" for h in range(len(v_next)))
            out.append(group_flow(f, acts[s.name], comps[s.name], s.name, nxt.name, names))
        last = stages[-1]
        out.append(
            group_flow(lambda x: run_between(spec, last.hook_out, x), acts[last.name], comps[last.name], last.name,
                       "logits", class_names)
        )  # fmt: skip
    return out


def average_flows(per_image: list[list[GroupFlow]], labels: list[int]) -> list[GroupFlow]:
    """The mean over images of each flow; towards class c, over the images labelled c where there are any."""
    out = []
    labels_arr = np.asarray(labels)
    for j, first in enumerate(per_image[0]):
        rows = [flows[j] for flows in per_image]
        weights = np.ones((len(rows), len(first.targets)))
        if first.target == "logits":
            for c in range(len(first.targets)):
                if (labels_arr == c).any():
                    weights[:, c] = labels_arr == c
        weights /= weights.sum(0, keepdims=True)

        def mean(field: str, weights=weights, rows=rows) -> np.ndarray:
            stack = np.stack([getattr(r, field) for r in rows])  # [n, ..., T]
            return (stack * weights.reshape(len(rows), *([1] * (stack.ndim - 2)), -1)).sum(0)

        out.append(
            GroupFlow(first.source, first.target, first.targets, mean("attribution"), mean("residual"),
                      mean("grad_x_act"), mean("actual_change"), mean("removal"), len(rows))
        )  # fmt: skip
    return out
