"""What a graph predicts for an intervention, and how a measured change compares with it.

The graph is linear: an edge ``A[t, s] = a_s · w_st`` is the source's activation times its per-unit effect on the
target's pre-activation (or on a logit). Setting sources to new values ``a_s + Δ_s`` changes every feature that
reads them by ``Σ_s w_st Δ_s``; a feature of the graph that is active passes the change on unchanged (it stays
active in the linear model; a measured run can switch it off or on), the changed sources keep their new values,
and error and input nodes do not move (they are constants of the local replacement model). The changes reach the
logits through the graph's edges in order of depth (the graph is acyclic).
"""

from __future__ import annotations

import torch

from mechscope.core.attribution_graph.influence import Triplets


def propagate(
    t: Triplets,
    activation: torch.Tensor,
    is_feature: torch.Tensor,
    delta: dict[int, float],
    max_steps: int = 10_000,
) -> torch.Tensor:
    """The change of every node [n] (features' activations, logits) when the nodes in ``delta`` change by the given
    amounts, through the edges ``t`` (``activation`` [n]: each feature node's value; others unused)."""
    n = t.n
    a = activation.double()
    src_feature = is_feature[t.cols]
    per_unit = torch.where(
        src_feature & (a[t.cols] != 0),
        t.values.double() / a[t.cols].where(a[t.cols] != 0, 1.0),
        torch.zeros_like(t.values, dtype=torch.float64),
    )
    fixed = torch.zeros(n, dtype=torch.bool)
    change = torch.zeros(n, dtype=torch.float64)
    for node, d in delta.items():
        fixed[node] = True
        change[node] = float(d)
    for _ in range(max_steps):
        new = torch.zeros(n, dtype=torch.float64).index_add_(0, t.rows, per_unit * change[t.cols])
        new = torch.where(fixed, change, new)
        if torch.allclose(new, change, rtol=0, atol=0):
            return change
        change = new
    raise RuntimeError("propagation did not settle: the graph has a cycle")
