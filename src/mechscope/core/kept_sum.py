"""Which class a linear read-out picks with only some channels kept: fast, and the same answer bit for bit.

A circuit search asks thousands of times "with only the channels in S kept (the others at their
reference value), which class does the read-out pick for each input?". In closed form the logits are
``base + contrib[:, S].sum(1)`` (:func:`~mechscope.core.intervene.readout_channel_contributions`); that
gather-and-sum is the *reference*, and every number a search reports must equal what it gives.

:class:`KeptSum` answers faster by adding the kept channels' contiguous [K, N] slabs one after the other
and keeps the reference's answer exactly: two float32 sums of the same m = |S| + 1 terms in different
orders each lie within γ = m·u/(1 − m·u) · Σ|terms| of the exact sum (u = 2⁻²⁴, the standard bound for
any summation order), so they differ by at most 2γ·T per logit, with T = |base| + Σ_{c in S} |contrib| (the
largest over the classes, accumulated alongside and inflated by 1% for its own rounding). If, for every
input, the fast top logit beats the runner-up by more than 4γ·T, the reference picks the same class (and
has no tie); otherwise that evaluation falls back to the reference itself. ``fallbacks`` counts how often it
had to.
"""

from __future__ import annotations

import torch

U32 = 2.0**-24  # unit round-off of float32


class KeptSum:
    """``base`` [K] and ``contrib`` [N, C, K] float32: logits with only channels ``keep`` kept."""

    def __init__(self, base: torch.Tensor, contrib: torch.Tensor) -> None:
        self.base, self.contrib = base, contrib
        self.slabs = contrib.permute(1, 2, 0).contiguous()  # [C, K, N]: a channel's terms, class by class
        self.abs_slabs = self.slabs.abs()
        self.column, self.abs_column = base[:, None], base.abs()[:, None]  # [K, 1]
        self.classes = torch.arange(base.shape[0])[:, None]
        self.calls = self.fallbacks = 0

    def reference(self, keep: list[int]) -> torch.Tensor:
        """The logits [N, K], computed as the searches always have: ``base + contrib[:, keep].sum(1)``."""
        return self.base + self.contrib[:, keep].sum(1)

    def predict(self, keep: list[int]) -> torch.Tensor:
        """[N] the argmax of :meth:`reference` (first index on a tie), found without it when it is safe."""
        winners = self._winners(keep)
        if winners is None:
            return self.reference(keep).argmax(1)
        return (winners * self.classes).sum(0)

    def hits(self, keep: list[int], d: int) -> torch.Tensor:
        """[N] bool: where :meth:`reference`'s argmax is class ``d`` (what a search's margin needs)."""
        winners = self._winners(keep)
        if winners is None:
            return self.reference(keep).argmax(1) == d
        return winners[d]

    def _winners(self, keep: list[int]) -> torch.Tensor | None:
        """[K, N] bool, one winning class per input, when the fast sum's winner must be the reference's; else None
        (counted in ``fallbacks``). No index-returning reduction: those are the slow ones on CPU."""
        self.calls += 1
        if not keep or self.base.shape[0] < 2:
            self.fallbacks += 1
            return None
        acc = self.slabs[keep[0]] + self.column  # [K, N]
        size = self.abs_slabs[keep[0]] + self.abs_column
        for c in keep[1:]:
            acc += self.slabs[c]
            size += self.abs_slabs[c]
        best = acc.amax(0)
        winners = acc == best  # NaN: no winner in that column, so the count below fails
        runner_up = torch.where(winners, float("-inf"), acc).amax(0)
        m = len(keep) + 1
        bound = 4 * m * U32 / (1 - m * U32) * 1.01  # 4γ, and 1% for the rounding of T itself
        # a NaN column has no winner but fails the gap check below, so past it a total of N means one per column
        unique = int(winners.sum()) == winners.shape[1]
        if unique and bool((best - runner_up > bound * size.amax(0)).all()):
            return winners
        self.fallbacks += 1
        return None


class Rates:
    """For labels [N] and a class d: accuracy on d and the share of other classes' inputs called d.

    Equal bit for bit to ``(pred[labels == d] == d).double().mean()`` and the same over ``labels != d``
    (counts over counts in float64); NaN where a group is empty.
    """

    def __init__(self, labels: torch.Tensor, n_classes: int) -> None:
        self.labels = labels
        self.n = len(labels)
        self.counts = torch.bincount(labels, minlength=n_classes).tolist()

    def __call__(self, pred: torch.Tensor, d: int) -> tuple[float, float]:
        return self.of_hits(pred == d, d)

    def of_hits(self, hit: torch.Tensor, d: int) -> tuple[float, float]:
        """The same from ``hit`` [N] bool, where the prediction is ``d``."""
        called = int(hit.sum())
        right = int((hit & (self.labels == d)).sum())
        n_d = self.counts[d] if d < len(self.counts) else 0
        return _share(right, n_d), _share(called - right, self.n - n_d)


def _share(k: int, n: int) -> float:
    return k / n if n else float("nan")
