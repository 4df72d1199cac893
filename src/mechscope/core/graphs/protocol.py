"""The adapter protocol (:class:`EdgeModel`) and the one patched forward every algorithm uses.

An edge patch is a list of :class:`Term` s. A term holds a weight per edge and a value per sender; at each
receiver ``r`` the run adds ``sum over edges e = s->r of weight[e] * c_e(value[s] - current[s])`` (a *relative*
term: edge ``e`` carries ``value`` instead of the run's own ``current`` sender output when its weight is 1) or
``weight[e] * c_e(value[s])`` (an *absolute* term), where ``c_e`` is the edge's linear map (identity in a residual
stream, a convolution by ``W[j, i]`` in a CNN) that the adapter's :meth:`EdgeModel.edge_mix` applies.
Gradients with respect to the weights at 0 are edge attributions (Syed et al. 2023), so no algorithm needs the
adapter's gradients, hooks or internals.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from mechscope.core.errors import MechscopeError
from mechscope.core.graphs.graph import ComponentGraph

Edit = Callable[[Sequence[int], list[torch.Tensor], Sequence["torch.Tensor | None"]], list[torch.Tensor]]
ABLATIONS = ("patch", "mean", "zero")


@runtime_checkable
class EdgeModel(Protocol):
    """What an adapter implements (see the package docstring for the transformer and CNN mappings).

    ``graph``: the :class:`ComponentGraph`.

    ``forward(inputs, edit=None) -> (output, senders)``: run the model on ``inputs`` (any batch the adapter
    understands). ``senders`` is a list with one tensor per sender (``graph.senders`` order), with the full batch
    first (mean ablation averages dim 0, scrubbing indexes rows).
    Just before the receivers ``ids`` (receiver indices) are consumed, and after every sender with an edge into
    them has been computed, the adapter calls ``ins = edit(ids, ins, senders_so_far)`` when ``edit`` is given:
    ``ins`` are those receivers' inputs (one tensor each, batch first), ``senders_so_far`` the list of senders
    with None for those not computed yet; it uses the returned tensors. Each receiver's input must depend on the
    model's input only through its edges (plus constants), and every receiver must go through ``edit`` exactly
    once per forward. The adapter must not disable gradients itself.

    ``edge_mix(values, weight, receivers) -> list``: for each receiver index in ``receivers``, the sum over its
    incoming edges ``e = s->r`` of ``weight[e] * c_e(values[s])`` shaped as that receiver's input, or None when
    no edge contributes. ``values`` has one entry per sender (None: contributes nothing; a batch of 1
    broadcasts), ``weight`` is a float tensor ``[n_edges]`` that may require grad. It must be linear in ``values``
    and ``weight``. Residual-stream adapters can return :func:`residual_edge_mix`.

    Optional ``interpolate(clean, corrupted, alpha) -> inputs`` for EAP-IG; without it EAP-IG interpolates the
    outputs of the graph's input nodes (the embeddings, the image).
    """

    graph: ComponentGraph

    def forward(self, inputs: Any, edit: Edit | None = None) -> tuple[Any, list[torch.Tensor]]: ...

    def edge_mix(
        self, values: Sequence[torch.Tensor | None], weight: torch.Tensor, receivers: Sequence[int]
    ) -> list[torch.Tensor | None]: ...


@dataclass(frozen=True)
class Term:
    """One additive patch term: per-edge ``weight`` [E] and per-sender ``values`` (see the module docstring)."""

    weight: torch.Tensor
    values: Sequence[torch.Tensor | None]
    relative: bool = True


def residual_edge_mix(
    graph: ComponentGraph, values: Sequence[torch.Tensor | None], weight: torch.Tensor, receivers: Sequence[int]
) -> list[torch.Tensor | None]:
    """:meth:`EdgeModel.edge_mix` where each edge adds its sender's output as it is (``c_e`` = identity)."""
    eids = graph.edges_into(receivers)
    eids = eids[[values[s] is not None for s in graph.edge_sender[eids]]] if len(eids) else eids
    if not len(eids):
        return [None] * len(receivers)
    used = np.unique(graph.edge_sender[eids])
    stack = torch.broadcast_tensors(*[values[s] for s in used])
    stack = torch.stack(stack)
    rpos = {r: i for i, r in enumerate(receivers)}
    spos = {s: i for i, s in enumerate(used.tolist())}
    ri = torch.tensor([rpos[r] for r in graph.edge_receiver[eids].tolist()], device=stack.device)
    si = torch.tensor([spos[s] for s in graph.edge_sender[eids].tolist()], device=stack.device)
    w = weight[torch.as_tensor(eids, device=weight.device)].to(stack.device, stack.dtype)
    mix = torch.zeros(len(receivers), len(used), device=stack.device, dtype=stack.dtype).index_put((ri, si), w)
    out = torch.einsum("rs,s...->r...", mix, stack)
    has = set(ri.tolist())
    return [out[i] if i in has else None for i in range(len(receivers))]


# ---- running ------------------------------------------------------------------------------------


def _editor(model: EdgeModel, terms: Sequence[Term]) -> Edit:
    graph = model.graph

    def edit(ids, ins, current):
        ids = list(ids)
        eids = graph.edges_into(ids)
        out = list(ins)
        for t in terms:
            used = _used_senders(graph, t, eids)
            if not used:
                continue
            vals = [_term_value(t, s, current) if s in used else None for s in range(graph.n_senders)]
            for i, d in enumerate(model.edge_mix(vals, t.weight, ids)):
                if d is not None:
                    out[i] = out[i] + d
        return out

    return edit


def _used_senders(graph: ComponentGraph, t: Term, eids: np.ndarray) -> set[int]:
    """Senders whose edges into these receivers the term touches (all of them when its weight needs a gradient)."""
    if not t.weight.requires_grad:
        eids = eids[(t.weight[torch.as_tensor(eids, device=t.weight.device)] != 0).cpu().numpy()]
    return set(graph.edge_sender[eids].tolist())


def _term_value(t: Term, s: int, current) -> torch.Tensor | None:
    v = t.values[s]
    if v is None or not t.relative:
        return v
    c = current[s]
    if c is None:
        return None
    if v.dim() == c.dim() and v.shape[0] not in (1, c.shape[0]):
        raise MechscopeError(
            f"the replacement activations have batch size {v.shape[0]}, the run {c.shape[0]}: "
            "pass clean and corrupted batches of the same size"
        )
    return v - c


def run(model: EdgeModel, inputs: Any, terms: Sequence[Term] = (), *, grad: bool = False):
    """``(output, senders)`` of one forward with the patch ``terms`` (none: the plain model)."""
    edit = _editor(model, terms) if terms else None
    with torch.set_grad_enabled(grad):
        output, senders = model.forward(inputs, edit)
    if len(senders) != model.graph.n_senders:
        raise MechscopeError(
            f"the adapter returned {len(senders)} sender outputs for a graph of {model.graph.n_senders} senders"
        )
    return output, list(senders)


def receiver_gradients(model: EdgeModel, inputs: Any, metric) -> tuple[float, list[torch.Tensor]]:
    """The metric and its gradient with respect to every receiver's input (one forward, one backward)."""
    zeros: dict[int, torch.Tensor] = {}

    def edit(ids, ins, current):
        zeros.update({r: torch.zeros_like(x, requires_grad=True) for r, x in zip(ids, ins, strict=True)})
        return [x + zeros[r] for r, x in zip(ids, ins, strict=True)]

    with torch.enable_grad():
        output, _ = model.forward(inputs, edit)
        m = metric_value(metric, output, grad=True)
        order = sorted(zeros)
        grads = torch.autograd.grad(m, [zeros[r] for r in order], allow_unused=True)
    by_id = {r: (torch.zeros_like(zeros[r]) if g is None else g) for r, g in zip(order, grads, strict=True)}
    return float(m.detach()), [by_id[r] for r in range(model.graph.n_receivers)]


def capture(model: EdgeModel, inputs: Any):
    """``(output, senders)`` of the plain model, without gradients."""
    return run(model, inputs)


def ablation_values(model: EdgeModel, clean: Any, corrupted: Any, ablation: str):
    """What a removed edge carries: the sender outputs on ``corrupted`` (``patch``), their batch mean
    (``mean``, over ``corrupted`` or else ``clean``), or zeros (``zero``). Returns (values, output on corrupted or
    None, forward passes made)."""
    if ablation not in ABLATIONS:
        raise MechscopeError(f"unknown ablation {ablation!r}: one of {', '.join(ABLATIONS)}")
    if ablation == "patch" and corrupted is None:
        raise MechscopeError("ablation 'patch' needs corrupted inputs (or use ablation 'mean' or 'zero')")
    source = corrupted if corrupted is not None else clean
    output, senders = capture(model, source)
    if ablation == "patch":
        return senders, output, 1
    if ablation == "mean":
        return [s.mean(0, keepdim=True) for s in senders], None, 1
    return [torch.zeros_like(s[:1]) for s in senders], None, 1


def edge_weight(model: EdgeModel, like: Sequence[torch.Tensor], fill: float = 0.0, *, grad=False) -> torch.Tensor:
    """A weight per edge, on the device and in the float dtype of the activations ``like``."""
    ref = next((v for v in like if v is not None and v.is_floating_point()), None)
    dtype = ref.dtype if ref is not None else torch.get_default_dtype()
    device = ref.device if ref is not None else None
    w = torch.full((model.graph.n_edges,), float(fill), dtype=dtype, device=device)
    return w.requires_grad_(grad)


def metric_value(metric: Callable[[Any], Any], output: Any, *, grad: bool = False) -> torch.Tensor:
    """``metric(output)`` as a 0-d tensor; a non-scalar, or (``grad``) one without a gradient, is a user error."""
    if not callable(metric):
        raise MechscopeError(f"the metric must be a callable on the model's output, got {type(metric).__name__}")
    m = metric(output)
    if isinstance(m, (int, float)) and not isinstance(m, bool) and not grad:
        return torch.tensor(float(m))
    if not torch.is_tensor(m):
        raise MechscopeError(f"the metric must return a scalar tensor, got {type(m).__name__}")
    if m.numel() != 1:
        raise MechscopeError(f"the metric must return a scalar, got a tensor of shape {tuple(m.shape)}")
    if not m.is_floating_point():
        raise MechscopeError(f"the metric must return a float, got {m.dtype}")
    if grad and not m.requires_grad:
        raise MechscopeError("the metric's value has no gradient: gradient methods need a differentiable metric")
    return m.reshape(())


def metric_of(model: EdgeModel, inputs: Any, metric, terms: Sequence[Term] = ()) -> float:
    """The metric of one (patched) forward, as a float."""
    output, _ = run(model, inputs, terms)
    return float(metric_value(metric, output))


def check_model(model: Any) -> None:
    if not isinstance(model, EdgeModel) or not isinstance(getattr(model, "graph", None), ComponentGraph):
        raise MechscopeError(
            f"{type(model).__name__} is not an EdgeModel: it needs graph, forward(inputs, edit) and edge_mix"
        )
