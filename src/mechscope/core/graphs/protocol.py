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

    Optional ``residual_stream = True``: ``edge_mix`` is :func:`residual_edge_mix` (every ``c_e`` the identity and
    every receiver's input of one shape); the core then mixes without it, through a buffer of the senders'
    values and one matrix product per call (what makes a 70,000-edge graph affordable).

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
    """One additive patch term: per-edge ``weight`` [E] and per-sender ``values`` (see the module docstring).

    ``index`` (optional, per sender): the sender's value is gathered from the run's own output of that sender,
    ``current[s][index[s]]`` (rows [N]) or ``current[s][index[s], p]`` at each position p (rows per position
    [N, P]): what causal scrubbing's one-forward treeification uses."""

    weight: torch.Tensor
    values: Sequence[torch.Tensor | None]
    relative: bool = True
    index: Sequence[torch.Tensor | None] | None = None


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
    fast = bool(getattr(model, "residual_stream", False))  # the adapter's edge_mix is residual_edge_mix
    states = [_ResidualState() for _ in terms]
    # the receivers each term can change (every receiver when its weight needs a gradient)
    touched = [None if t.weight.requires_grad else set(graph.edge_receiver[(t.weight != 0).cpu().numpy()].tolist())
               for t in terms]  # fmt: skip

    def edit(ids, ins, current):
        ids = list(ids)
        eids = graph.edges_into(ids)
        out = list(ins)
        for t, state, rs in zip(terms, states, touched, strict=True):
            if rs is not None and rs.isdisjoint(ids):
                continue
            if fast and not t.weight.requires_grad:
                deltas = _residual_mix(graph, t, state, ids, eids, ins, current)
            else:
                used = _used_senders(graph, t, eids)
                if not used:
                    continue
                vals = [_term_value(t, s, current) if s in used else None for s in range(graph.n_senders)]
                deltas = model.edge_mix(vals, t.weight, ids)
            for i, d in enumerate(deltas):
                if d is not None:
                    out[i] = out[i] + d
        return out

    return edit


class _ResidualState:
    """Per forward and term: each sender's value (``value - current`` for a relative term) computed once, and
    a buffer of them [S, N] for the matrix product when many senders feed a receiver."""

    SMALL = 8  # up to this many senders: sum them one by one

    def __init__(self) -> None:
        self.values: dict[int, torch.Tensor] = {}
        self.buffer: torch.Tensor | None = None
        self.filled: np.ndarray | None = None

    def value(self, t: Term, s: int, current, like: torch.Tensor) -> torch.Tensor | None:
        if s not in self.values:
            v = _term_value(t, s, current)
            if v is None:
                return None
            self.values[s] = v.to(like.dtype).expand_as(like)
        return self.values[s]

    def rows(self, t: Term, k: int, current, like: torch.Tensor, n_senders: int) -> torch.Tensor:
        """The buffer's first ``k`` rows (senders 0..k-1), filled as the senders become available."""
        if self.buffer is None:
            self.buffer = torch.zeros(n_senders, like.numel(), dtype=like.dtype, device=like.device)
            self.filled = np.zeros(n_senders, dtype=bool)
        for s in np.flatnonzero(~self.filled[:k]).tolist():
            v = self.values.get(s)
            if v is None and (current[s] is not None or not t.relative) and _has_value(t, s):
                v = self.value(t, s, current, like)
            if v is not None:
                self.buffer[s] = v.reshape(-1)
                self.filled[s] = True
                self.values.pop(s, None)  # the buffer holds it now
        return self.buffer[:k]


def _residual_mix(graph, t: Term, state: _ResidualState, ids, eids, ins, current) -> list:
    """``edge_mix`` of a residual stream (``c_e`` = identity) without a stack per call: few senders are summed,
    many go through one matrix product with the term's buffer of sender values (see :class:`_ResidualState`)."""
    if not len(eids):
        return [None] * len(ids)
    w = t.weight[torch.as_tensor(eids, device=t.weight.device)]
    nz = (w != 0).cpu().numpy()
    eids, w = eids[nz], w[torch.as_tensor(nz, device=w.device)]
    senders = graph.edge_sender[eids]
    ok = np.asarray([_has_value(t, s) and (current[s] is not None or not (t.relative or t.index is not None))
                     for s in senders], dtype=bool)  # fmt: skip
    eids, senders, w = eids[ok], senders[ok], w[torch.as_tensor(ok, device=w.device)]
    if not len(eids):
        return [None] * len(ids)
    like = ins[0]
    rpos = {r: i for i, r in enumerate(ids)}
    rows = np.asarray([rpos[r] for r in graph.edge_receiver[eids].tolist()], dtype=np.int64)
    if len(np.unique(senders)) <= _ResidualState.SMALL:
        out: list = [None] * len(ids)
        for e_w, s, i in zip(w.tolist(), senders.tolist(), rows.tolist(), strict=True):
            v = state.value(t, s, current, like) * e_w
            out[i] = v if out[i] is None else out[i] + v
        return out
    k = int(senders.max()) + 1
    buf = state.rows(t, k, current, like, graph.n_senders)
    mix = torch.zeros(len(ids), k, dtype=like.dtype, device=like.device)
    mix.index_put_((torch.as_tensor(rows, device=like.device), torch.as_tensor(senders, device=like.device)),
                   w.to(like.device, like.dtype), accumulate=True)  # fmt: skip
    out = (mix @ buf).view(len(ids), *like.shape)
    has = set(rows.tolist())
    return [out[i] if i in has else None for i in range(len(ids))]


def _used_senders(graph: ComponentGraph, t: Term, eids: np.ndarray) -> set[int]:
    """Senders whose edges into these receivers the term touches (all of them when its weight needs a gradient)."""
    if not t.weight.requires_grad:
        eids = eids[(t.weight[torch.as_tensor(eids, device=t.weight.device)] != 0).cpu().numpy()]
    return set(graph.edge_sender[eids].tolist())


def _has_value(t: Term, s: int) -> bool:
    return t.values[s] is not None or (t.index is not None and t.index[s] is not None)


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x`` [N, ...] at rows ``index`` [M], or at rows per position ``index`` [M, P] (``x[index[m, p], p]``)."""
    if index.dim() == 1:
        return x[index.to(x.device)]
    return x[index.to(x.device), torch.arange(index.shape[1], device=x.device)]


def _term_value(t: Term, s: int, current) -> torch.Tensor | None:
    if t.index is not None and t.index[s] is not None:
        c = current[s]
        if c is None:
            return None
        v = gather_rows(c, t.index[s])
        return v - c if t.relative else v
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
    if not grad:  # a view of a parameter made under no_grad can still say it requires grad
        senders = [None if x is None else x.detach() for x in senders]
        output = output.detach() if torch.is_tensor(output) else output
    return output, list(senders)


def receiver_gradients(model: EdgeModel, inputs: Any, metric) -> tuple[float, list[torch.Tensor]]:
    """The metric and its gradient with respect to every receiver's input (one forward, one backward)."""
    m, grads, _ = gradients(model, inputs, metric)
    return m, grads


def gradients(model: EdgeModel, inputs: Any, metric, terms: Sequence[Term] = ()):
    """``(metric, gradient per receiver input, sender outputs)`` of one forward with the patch ``terms`` and one
    backward."""
    tracked: dict[int, torch.Tensor] = {}
    base = _editor(model, terms) if terms else None

    def edit(ids, ins, current):
        ins = base(ids, ins, current) if base is not None else ins
        # each receiver's input as its own node of the autograd graph (a view: no copy), so that the gradient
        # with respect to it is that receiver's alone even when an adapter passes one tensor twice
        out = [x.view_as(x) if x.requires_grad else x.detach().requires_grad_() for x in ins]
        tracked.update(zip(ids, out, strict=True))
        return out

    with torch.enable_grad():
        output, senders = model.forward(inputs, edit)
        m = metric_value(metric, output, grad=True)
        order = sorted(tracked)
        grads = torch.autograd.grad(m, [tracked[r] for r in order], allow_unused=True)
    by_id = {r: (torch.zeros_like(tracked[r]) if g is None else g) for r, g in zip(order, grads, strict=True)}
    if len(by_id) != model.graph.n_receivers:
        raise MechscopeError(
            f"the adapter passed {len(by_id)} of the graph's {model.graph.n_receivers} receivers through edit"
        )
    senders = [None if s is None else s.detach() for s in senders]
    return float(m.detach()), [by_id[r] for r in range(model.graph.n_receivers)], senders


def edge_attribution(
    model: EdgeModel, values: Sequence[torch.Tensor | None], grads: Sequence[torch.Tensor]
) -> torch.Tensor:
    """Per edge ``e = s->r``: ``<c_e(values[s]), grads[r]>`` summed over every axis (the adjoint of
    :meth:`EdgeModel.edge_mix`); the adapter's own ``edge_attribution`` when it has one (residual streams:
    :func:`residual_edge_attribution`), else one autograd pass through ``edge_mix`` over every receiver."""
    own = getattr(model, "edge_attribution", None)
    if callable(own):
        return own(values, grads)
    w = edge_weight(model, values, grad=True)
    with torch.enable_grad():
        mixed = model.edge_mix(values, w, list(range(model.graph.n_receivers)))
        total = sum((m * g).sum() for m, g in zip(mixed, grads, strict=True) if m is not None)
        if not torch.is_tensor(total):
            return torch.zeros_like(w).detach()
        (gw,) = torch.autograd.grad(total, w, allow_unused=True)
    return torch.zeros_like(w).detach() if gw is None else gw.detach()


def residual_edge_attribution(
    graph: ComponentGraph, values: Sequence[torch.Tensor | None], grads: Sequence[torch.Tensor], chunk: int = 64
) -> torch.Tensor:
    """:func:`edge_attribution` where ``c_e`` is the identity: products of the senders' values [S, N] with the
    receivers' gradients [R, N], receivers grouped by the last sender that feeds them, so that a dense residual
    graph's receivers are multiplied only with the senders before them (half the work of the full product);
    senders in chunks, so that memory stays bounded."""
    ref = grads[0]
    er_np, es_np = graph.edge_receiver, graph.edge_sender
    last = np.full(len(grads), -1, dtype=np.int64)
    np.maximum.at(last, er_np, es_np)
    dots = torch.zeros(graph.n_senders, len(grads), dtype=torch.float64, device=ref.device)
    present = np.asarray([v is not None for v in values], dtype=bool)
    for k in np.unique(last[last >= 0]).tolist():
        rs = np.flatnonzero(last == k)
        G = torch.stack([grads[r].reshape(-1) for r in rs.tolist()])  # [r, N]
        ids = np.flatnonzero(present[: k + 1]).tolist()
        for i in range(0, len(ids), chunk):
            part = ids[i : i + chunk]
            V = torch.stack([values[s].to(ref.dtype).expand_as(ref).reshape(-1) for s in part])  # [s, N]
            dots[np.ix_(part, rs.tolist())] = (V @ G.T).double()
    es = torch.as_tensor(es_np, device=ref.device)
    er = torch.as_tensor(er_np, device=ref.device)
    return dots[es, er]


def capture(model: EdgeModel, inputs: Any):
    """``(output, senders)`` of the plain model, without gradients."""
    return run(model, inputs)


def check_ablation(ablation) -> None:
    """One of :data:`ABLATIONS`, or a one-line error naming them."""
    if ablation not in ABLATIONS:
        raise MechscopeError(f"unknown ablation {ablation!r}: one of {', '.join(ABLATIONS)}")


def ablation_values(model: EdgeModel, clean: Any, corrupted: Any, ablation: str):
    """What a removed edge carries: the sender outputs on ``corrupted`` (``patch``), their batch mean
    (``mean``, over ``corrupted`` or else ``clean``), or zeros (``zero``). Returns (values, output on corrupted or
    None, forward passes made)."""
    check_ablation(ablation)
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
        return torch.tensor(float(m), dtype=torch.float64)  # a Python float, not rounded to float32
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
            f"{type(model).__name__} is not an EdgeModel: it needs a graph (a ComponentGraph), forward(inputs, edit) "
            "and edge_mix"
        )
