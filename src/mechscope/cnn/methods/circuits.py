"""Per-class circuits: the smallest set of channels that still does the job, and class selectivity.

**Circuit search.** For one class (a digit), keep a set S of a layer's channels, mean-ablate
every other channel of that layer, and measure the model. The circuit is a set S small enough
to read and good enough to meet a criterion, e.g. the class's accuracy stays within a point of
the full model's (and, so that "call everything a 7" does not count as a circuit for 7, other
classes are not labelled as the class more often than the full model does, within a point).
Finding the smallest such set exactly is a search over 2^C subsets, so we do what is standard
and say so:

1. rank the channels by attribution to the class (how far each channel moves the class logit
   away from its mean-ablated value, averaged over the class's inputs) and take the shortest
   prefix of that ranking that meets the criterion;
2. grow a set greedily, each step adding the channel that raises the criterion's margin most;
3. prune both: drop any channel whose removal still meets the criterion, and keep the smaller;
4. shrink it by swaps: replace two of its channels with one from outside whenever that still
   meets the criterion (and prune again), until no such swap exists.

Every set is then re-measured (sufficiency: accuracy with only the set; necessity: accuracy
with the set ablated and everything else intact). The result is *1-minimal* (no channel can be
removed) and *swap-minimal* (no two channels can be traded for one), not proven globally
smallest: an exhaustive check of every smaller set is C(32, k) evaluations.

The search calls an ``evaluate(keep: list[int]) -> float`` function returning the margin by
which the criterion is met, so it works for any layer and any criterion; the pipeline passes a
closed-form read-out evaluation for the CNN's last conv layer and verifies the winner with real
hooked forward passes.

**Selectivity** (Morcos et al. 2018, "On the importance of single directions for
generalization"): for a unit with class means μ, (μ_max − μ_rest) / (μ_max + μ_rest), where
μ_rest is the mean over the other classes. 0: the same for every class; 1: fires for one class
only (non-negative activations).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch

from mechscope.core.errors import MechscopeError

Evaluate = Callable[[list[int]], float]
EvaluateEach = Callable[[list[int], list[int]], Sequence[float]]  # (rest, extra) -> evaluate(rest + [c]) for c in extra


@dataclass
class Circuit:
    """A class's circuit in one layer, as found by :func:`find_circuit`."""

    target: int
    channels: list[int]  # in the order they were added
    margin: float  # evaluate(channels): ≥ 0 when the criterion is met
    meets_criterion: bool
    prefix_size: int | None  # shortest attribution-ranked prefix meeting the criterion (before pruning)
    greedy_size: int | None  # greedy set size (before pruning)
    pruned_size: int | None = None  # size of the smaller pruned candidate, before swaps
    greedy_order: list[int] = field(default_factory=list)  # the greedy run's channels, in the order added
    ranking: list[int] = field(default_factory=list)  # channels by attribution, strongest first
    method: str = ""  # which search produced ``channels``

    def to_dict(self) -> dict:
        return asdict(self)


def find_circuit(
    evaluate: Evaluate,
    n_channels: int,
    ranking: Sequence[int],
    target: int,
    max_size: int | None = None,
    swaps: bool = True,
    evaluate_each: EvaluateEach | None = None,
) -> Circuit:
    """Smallest (1-minimal and swap-minimal) channel set whose ``evaluate`` margin is ≥ 0.

    ``evaluate(keep)`` measures the model with only the channels in ``keep`` left intact and
    returns a margin: how far the measurement is above the criterion's threshold (negative
    when below). A plain criterion "accuracy ≥ full − tolerance" has margin accuracy − (full −
    tolerance); several criteria combine as the minimum of their margins. ``ranking`` orders all
    channels by attribution, strongest first. ``swaps=False`` skips step 4 (the set is then only
    1-minimal). ``evaluate_each(rest, extra)``, when given, returns ``evaluate(rest + [c])`` for every c in ``extra``
    at once (where one batched evaluation is cheaper than several): the greedy and swap steps then ask it for all
    their candidates, and the search finds the same sets.
    """
    if sorted(ranking) != list(range(n_channels)):
        raise MechscopeError(f"ranking must order all {n_channels} channels once each")
    max_size = n_channels if max_size is None else max_size
    cache: dict[tuple[int, ...], float] = {}

    def score(keep) -> float:
        key = tuple(sorted(keep))
        if key not in cache:
            cache[key] = float(evaluate(list(key)))
        return cache[key]

    def scores(rest: list[int], extra: list[int]) -> list[float]:
        """score(rest + [c]) for each c in ``extra``, the uncached ones in one ``evaluate_each`` call."""
        todo = [c for c in extra if tuple(sorted(rest + [c])) not in cache]
        if evaluate_each is not None and len(todo) > 1:
            for c, v in zip(todo, evaluate_each(sorted(rest), todo), strict=True):
                cache[tuple(sorted(rest + [c]))] = float(v)
        return [score(rest + [c]) for c in extra]

    # 1. shortest prefix of the attribution ranking
    prefix = None
    for k in range(1, n_channels + 1):
        if score(ranking[:k]) >= 0:
            prefix = list(ranking[:k])
            break

    # 2. greedy forward selection (ties broken by the attribution ranking)
    order = {c: i for i, c in enumerate(ranking)}
    greedy: list[int] = []
    while len(greedy) < max_size:
        rest = [c for c in ranking if c not in greedy]
        if not rest:
            break
        gains = dict(zip(rest, scores(greedy, rest), strict=True))
        greedy.append(max(rest, key=lambda c: (gains[c], -order[c])))
        if score(greedy) >= 0:
            break
    greedy_ok = bool(greedy) and score(greedy) >= 0

    # 3. prune: drop channels (weakest by attribution first) while the criterion holds
    def prune(chosen: list[int]) -> list[int]:
        chosen = list(chosen)
        changed = True
        while changed and len(chosen) > 1:
            changed = False
            for c in sorted(chosen, key=lambda c: -order[c]):
                trial = [x for x in chosen if x != c]
                if score(trial) >= 0:
                    chosen = trial
                    changed = True
                    break
        return chosen

    candidates = []
    if prefix is not None:
        candidates.append(("attribution prefix, pruned", prune(prefix)))
    if greedy_ok:
        candidates.append(("greedy, pruned", prune(greedy)))

    # 4. swaps: two channels out (weakest first), one in (strongest outside first), then prune again
    def swap(chosen: list[int]) -> list[int]:
        chosen = list(chosen)
        shrunk = True
        while shrunk and len(chosen) > 1:
            shrunk = False
            weakest_first = sorted(chosen, key=lambda c: -order[c])
            outside = [c for c in ranking if c not in chosen]
            pairs = ((a, b) for i, a in enumerate(weakest_first) for b in weakest_first[i + 1 :])
            for a, b in pairs:
                rest = [c for c in chosen if c not in (a, b)]
                found = next((c for c, v in zip(outside, scores(rest, outside), strict=True) if v >= 0), None)
                if found is not None:
                    chosen, shrunk = prune(rest + [found]), True
                    break
        return chosen

    pruned_size = None
    if not candidates:  # nothing meets the criterion (only possible with max_size < n_channels)
        chosen, method = greedy, "greedy (criterion not met)"
    else:
        method, chosen = min(candidates, key=lambda mc: (len(mc[1]), -score(mc[1])))
        pruned_size = len(chosen)
        if swaps:
            swapped = swap(chosen)
            if len(swapped) < len(chosen):
                chosen, method = swapped, f"{method}, then swaps"
    margin = score(chosen)
    return Circuit(
        target=target,
        channels=chosen,
        margin=margin,
        meets_criterion=margin >= 0,
        prefix_size=len(prefix) if prefix is not None else None,
        greedy_size=len(greedy) if greedy_ok else None,
        pruned_size=pruned_size,
        greedy_order=greedy,
        ranking=list(ranking),
        method=method,
    )


def circuit_membership(circuits: Sequence[dict]) -> dict[int, list[int]]:
    """Channel -> the targets whose circuit holds it, from circuits as dicts with "channels" and "digit"."""
    members: dict[int, list[int]] = {}
    for c in circuits:
        for ch in c["channels"]:
            members.setdefault(ch, []).append(c["digit"])
    return members


def class_means(values: torch.Tensor, labels: torch.Tensor, n_classes: int = 10) -> torch.Tensor:
    """Mean of each unit per class: ``values`` [N, U], ``labels`` [N] -> [U, n_classes]."""
    if values.shape[0] != labels.shape[0]:
        raise MechscopeError(f"{values.shape[0]} activations for {labels.shape[0]} labels")
    sums = torch.zeros(n_classes, values.shape[1], dtype=torch.float64)
    sums.index_add_(0, labels, values.double())
    counts = torch.bincount(labels, minlength=n_classes).clamp(min=1).double()
    return (sums / counts[:, None]).T.float()


def selectivity_index(means: torch.Tensor) -> torch.Tensor:
    """(μ_max − μ_rest) / (μ_max + μ_rest) per unit; ``means`` [U, classes] -> [U] (0 where all are 0)."""
    top, arg = means.max(1)
    rest = (means.sum(1) - top) / (means.shape[1] - 1)
    denom = top + rest
    return torch.where(denom > 0, (top - rest) / denom.clamp(min=1e-12), torch.zeros_like(top))


def order_by_profile(means: torch.Tensor) -> list[int]:
    """Units grouped by preferred class (0, 1, ...), most selective first within a group."""
    pref = means.argmax(1)
    sel = selectivity_index(means)
    return sorted(range(means.shape[0]), key=lambda u: (int(pref[u]), -float(sel[u])))
