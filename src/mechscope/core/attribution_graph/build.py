"""Building an attribution graph by backward Jacobians, one row (a target node's inputs) per injected gradient.

A wing adapts its model to :class:`LinearSystem`: the local replacement model (frozen nonlinearities, sparse
dictionaries in place of the layers they replace, error nodes) is linear in its sources, so the direct effect
of every source on one target is one backward pass with the target's input direction injected as gradient (its
encoder vector at the dictionary's input, or a logit's unembedding direction after the final norm), read where
each source writes (its decoder vector times its activation, the error vector, the input vector). A batch of
targets is one backward pass through a batch of copies of the prompt.

The order (Ameisen et al. 2025, § 3.5; circuit-tracer's ``attribute``): first the logits' rows, then features in
order of their influence on the logits estimated from the rows so far, ``update_interval`` batches at a time,
until ``max_feature_nodes`` features have rows (or every active feature). The cost is one backward row per
target kept, never one per pair.

Memory: circuit-tracer keeps a dense ``rows × every node`` matrix, which grows with the square of the number of
active features when every feature gets a row. Here each row is stored sparsely: its error and input columns in
full (a number per layer and position, not per feature) and its feature columns as the ``edges_per_row`` largest
in magnitude (``None``: every nonzero entry, exact but dense-sized); so memory grows with rows × edges_per_row.
Kept entries are exact; a dropped entry is one smaller than every kept entry of its row.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from mechscope.core.attribution_graph.influence import Triplets, influence
from mechscope.core.errors import MechscopeError

log = logging.getLogger(__name__)


class LinearSystem(Protocol):
    """What a wing provides. Sources are ordered ``[features (n_features) | errors (n_errors) | inputs
    (n_inputs)]``; ``*_rows`` return the direct effects of every source on each target, ``[b, n_sources]``."""

    n_features: int
    n_errors: int
    n_inputs: int
    batch_size: int

    def feature_rows(self, idx: torch.Tensor) -> torch.Tensor: ...

    def logit_rows(self, idx: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class Built:
    """The rows computed: ``triplets`` over the node space ``[features | errors | inputs | logits]``; ``visited``
    [n_features] marks the features that got a row (the graph's feature nodes), in ``order``."""

    triplets: Triplets
    visited: torch.Tensor
    order: torch.Tensor
    n_features: int
    n_errors: int
    n_inputs: int
    n_logits: int
    rows: int  # rows computed (targets)
    batches: int  # backward passes (each over up to batch_size copies)
    stored: int  # entries stored
    dropped: int  # feature entries left out by edges_per_row
    seconds: float

    @property
    def n(self) -> int:
        return self.n_features + self.n_errors + self.n_inputs + self.n_logits


class _Rows:
    """The growing sparse store of computed rows."""

    def __init__(self, n_features: int, edges_per_row: int | None) -> None:
        self.nf, self.k = n_features, edges_per_row
        self.parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.stored = self.dropped = 0

    def add(self, node_ids: torch.Tensor, dense: torch.Tensor) -> None:
        dense = dense.detach().float().cpu()
        feat, rest = dense[:, : self.nf], dense[:, self.nf :]
        if self.k is not None and self.nf > self.k:
            top = feat.abs().topk(self.k, dim=1).indices  # [b, k]
            vals = feat.gather(1, top)
            r = torch.arange(feat.shape[0])[:, None].expand_as(top)
            nz = vals != 0
            self.dropped += int((feat != 0).sum()) - int(nz.sum())
            fr, fc, fv = r[nz], top[nz], vals[nz]
        else:
            fr, fc = feat.nonzero(as_tuple=True)
            fv = feat[fr, fc]
        rr, rc = rest.nonzero(as_tuple=True)
        rows = torch.cat([fr, rr])
        cols = torch.cat([fc, rc + self.nf])
        vals = torch.cat([fv, rest[rr, rc]])
        self.parts.append((node_ids[rows], cols, vals))
        self.stored += int(vals.numel())

    def triplets(self, n: int) -> Triplets:
        if not self.parts:
            e = torch.zeros(0, dtype=torch.long)
            return Triplets(e, e, torch.zeros(0), n)
        r, c, v = (torch.cat(x) for x in zip(*self.parts, strict=True))
        return Triplets(r.long(), c.long(), v, n)


def build(
    system: LinearSystem,
    logit_weights: torch.Tensor,
    *,
    max_feature_nodes: int | None = None,
    edges_per_row: int | None = None,
    update_interval: int = 4,
    progress: Callable[[int, int], None] | None = None,
) -> Built:
    """The rows of the logits and of the most influential features (see the module docstring)."""
    start = time.perf_counter()
    nf, ne, nt = system.n_features, system.n_errors, system.n_inputs
    nl = int(logit_weights.numel())
    if nl == 0:
        raise MechscopeError("expected at least one logit to attribute")
    n = nf + ne + nt + nl
    if edges_per_row is not None and edges_per_row < 1:
        raise MechscopeError(f"edges_per_row must be at least 1 (or None for all), got {edges_per_row}")
    if max_feature_nodes is not None and max_feature_nodes < 0:
        raise MechscopeError(f"max_feature_nodes must be 0 or more, got {max_feature_nodes}")
    limit = nf if max_feature_nodes is None else min(max_feature_nodes, nf)
    bs = max(1, int(system.batch_size))
    store = _Rows(nf, edges_per_row)
    weights = torch.zeros(n, dtype=torch.float64)
    weights[nf + ne + nt :] = logit_weights.double()
    batches = 0
    logit_ids = torch.arange(nl)
    for i in range(0, nl, bs):
        idx = logit_ids[i : i + bs]
        store.add(idx + nf + ne + nt, system.logit_rows(idx))
        batches += 1
    visited = torch.zeros(nf, dtype=torch.bool)
    order: list[torch.Tensor] = []
    done = 0
    while done < limit:
        if limit == nf:
            pending = torch.arange(nf)
        else:
            infl = influence(store.triplets(n), weights)[:nf]
            rank = torch.argsort(infl, descending=True)
            pending = rank[~visited[rank]][: min(update_interval * bs, limit - done)]
        for i in range(0, len(pending), bs):
            idx = pending[i : i + bs]
            store.add(idx, system.feature_rows(idx))
            visited[idx] = True
            order.append(idx)
            done += len(idx)
            batches += 1
            if progress is not None:
                progress(done, limit)
    log.info(
        "attribution graph: %d rows in %d backward passes, %d entries stored (%d dropped)",
        nl + done,
        batches,
        store.stored,
        store.dropped,
    )
    return Built(
        triplets=store.triplets(n),
        visited=visited,
        order=torch.cat(order) if order else torch.zeros(0, dtype=torch.long),
        n_features=nf,
        n_errors=ne,
        n_inputs=nt,
        n_logits=nl,
        rows=nl + done,
        batches=batches,
        stored=store.stored,
        dropped=store.dropped,
        seconds=time.perf_counter() - start,
    )
