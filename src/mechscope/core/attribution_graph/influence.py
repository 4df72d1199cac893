"""Influence, pruning and the graph scores on a sparse adjacency (Ameisen et al. 2025, "Circuit Tracing", §§ 3.5-3.6).

The adjacency is held as triplets ``(row, col, weight)``: ``row`` a target node, ``col`` a source node, ``weight``
the direct effect of the source on the target (columns: every node; rows: the nodes whose inputs were computed:
features and logits). Nothing here is dense in the number of nodes squared: every step is a sum over the stored
entries (``index_add``), so memory is the number of stored edges plus a few vectors over the nodes.

* **Normalised matrix** ``Â``: ``|A|`` with each row divided by its L1 norm (a row of zeros stays zero).
* **Influence**: ``w (Â + Â² + Â³ + …)`` for the logit weights ``w`` (each logit's probability); the graph is
  acyclic (a node only reads earlier layers), so the series ends after at most depth-many terms.
* **Pruning**: keep the nodes holding ``node_threshold`` of the cumulative influence (inputs and logits always),
  then the edges holding ``edge_threshold`` of the edge scores ``Â_ij (influence_i + w_i)`` on the pruned matrix,
  then drop, repeatedly, feature and error nodes with no kept outgoing edge and features with no kept incoming one.
* **Scores**: replacement = token influence / (token + error influence); completeness = the influence-weighted
  mean over nodes of the share of each node's input (L1) that does not come from error nodes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Triplets:
    """A sparse ``n × n`` matrix as entries: ``rows``, ``cols`` (int64) and ``values`` (float), all ``[nnz]``."""

    rows: torch.Tensor
    cols: torch.Tensor
    values: torch.Tensor
    n: int

    def mask(self, keep: torch.Tensor) -> Triplets:
        return Triplets(self.rows[keep], self.cols[keep], self.values[keep], self.n)


def normalised(t: Triplets, min_norm: float = 1e-10) -> torch.Tensor:
    """``|A_ij| / Σ_j |A_ij|`` per stored entry (rows whose L1 norm is below ``min_norm`` give zeros)."""
    a = t.values.abs().double()
    norm = torch.zeros(t.n, dtype=torch.float64).index_add_(0, t.rows, a)
    return torch.where(norm[t.rows] > min_norm, a / norm[t.rows].clamp_min(min_norm), torch.zeros_like(a))


def influence(t: Triplets, weights: torch.Tensor, normed: torch.Tensor | None = None, max_steps: int = 10_000):
    """``w (Â + Â² + …)`` [n]: how much of the output weight ``weights`` [n] flows through each node (float64)."""
    w = normalised(t) if normed is None else normed
    current = weights.double()
    total = torch.zeros(t.n, dtype=torch.float64)
    for _ in range(max_steps):
        current = torch.zeros(t.n, dtype=torch.float64).index_add_(0, t.cols, w * current[t.rows])
        if not bool((current != 0).any()):
            return total
        total += current
    raise RuntimeError("influence did not converge: the graph has a cycle")


def threshold_for(scores: torch.Tensor, fraction: float) -> float:
    """The score above which the largest scores hold ``fraction`` of their sum (circuit-tracer's find_threshold)."""
    if scores.numel() == 0:
        return 0.0
    s = torch.sort(scores.double(), descending=True).values
    total = s.sum()
    if total <= 0:
        return 0.0
    cum = torch.cumsum(s, 0) / total
    i = min(int(torch.searchsorted(cum, torch.tensor(fraction, dtype=cum.dtype)).item()), s.numel() - 1)
    return float(s[i])


@dataclass(frozen=True)
class Pruned:
    """Which nodes and stored edges a pruning keeps, and each node's influence and cumulative-influence rank."""

    nodes: torch.Tensor  # bool [n]
    edges: torch.Tensor  # bool [nnz]
    influence: torch.Tensor  # float64 [n]: influence on the weighted logits (before pruning)
    cumulative: torch.Tensor  # float64 [n]: share of the total influence held by nodes at least this influential


def prune(
    t: Triplets,
    weights: torch.Tensor,
    always: torch.Tensor,
    sources_only: torch.Tensor,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
) -> Pruned:
    """Prune as circuit-tracer's ``prune_graph``. ``always``: nodes kept whatever their influence (inputs and
    logits); ``sources_only``: nodes that need no incoming edge to stay (errors, inputs)."""
    for name, v in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= v <= 1.0:
            from mechscope.core.errors import MechscopeError

            raise MechscopeError(f"{name} must be between 0 and 1, got {v}")
    node_infl = influence(t, weights)
    keep = (node_infl >= threshold_for(node_infl, node_threshold)) | always
    entries = keep[t.rows] & keep[t.cols]
    sub = t.mask(entries)
    normed = normalised(sub)
    sub_infl = influence(sub, weights, normed) + weights.double()
    escore = normed * sub_infl[sub.rows]
    ekeep_sub = escore >= threshold_for(escore, edge_threshold)
    ekeep = torch.zeros(t.rows.numel(), dtype=torch.bool)
    ekeep[entries.nonzero().squeeze(1)] = ekeep_sub
    prunable = ~always
    while True:
        before = keep.clone()
        ekeep &= keep[t.rows] & keep[t.cols]
        has_out = torch.zeros(t.n, dtype=torch.bool)
        has_out[t.cols[ekeep]] = True
        has_in = torch.zeros(t.n, dtype=torch.bool)
        has_in[t.rows[ekeep]] = True
        keep &= ~prunable | has_out
        keep &= ~prunable | sources_only | has_in
        if torch.equal(keep, before):
            break
    order = torch.argsort(node_infl, descending=True)
    total = node_infl.sum()
    cum = torch.zeros_like(node_infl)
    if total > 0:
        cum[order] = torch.cumsum(node_infl[order], 0) / total
    return Pruned(keep, ekeep, node_infl, cum)


def graph_scores(t: Triplets, weights: torch.Tensor, errors: torch.Tensor, inputs: torch.Tensor) -> dict[str, float]:
    """circuit-tracer's ``compute_graph_scores``: ``replacement`` and ``completeness`` of the graph ``t``."""
    normed = normalised(t)
    infl = influence(t, weights, normed)
    tok, err = float(infl[inputs].sum()), float(infl[errors].sum())
    replacement = tok / (tok + err) if tok + err > 0 else float("nan")
    err_share = torch.zeros(t.n, dtype=torch.float64).index_add_(0, t.rows, normed * errors[t.cols].double())
    has_row = torch.zeros(t.n, dtype=torch.bool)
    has_row[t.rows] = True
    non_error = torch.where(has_row, 1.0 - err_share, torch.ones_like(err_share))
    out = infl + weights.double()
    completeness = float((non_error * out).sum() / out.sum()) if out.sum() > 0 else float("nan")
    return {"replacement": replacement, "completeness": completeness}
