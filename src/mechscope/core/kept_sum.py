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
had to. :meth:`KeptSum.hits_each` asks the same of many sets at once (a fixed set plus each of several channels),
with a band from a bound that holds for every set.

:func:`unit_ablation_accuracy` does the same for ablating one read-out input at a time: only the inputs whose
verdict that unit could change are recomputed, with the reference's own float operations.
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
        self._total: torch.Tensor | None = None  # [N] max over classes of |base| + every channel's |term|

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

    def hits_each(self, rest: list[int], extra: list[int], d: int, chunk: int = 1 << 22) -> torch.Tensor:
        """[len(extra), N] bool: row i is ``hits(sorted(rest + [extra[i]]), d)``, bit for bit, for all of ``extra`` at
        once (a search's "which channel to add" step).

        Per input, the fast gap g = logit_d − max over the other classes decides: g > 0 is a hit and g < 0 is not,
        whenever |g| exceeds 4γ·T with T the keep-independent bound max_k (|base_k| + Σ_c |contrib_c,k|) ≥ the T
        of the sets asked about. A row with any input inside that band falls back to :meth:`reference` of the row's
        sorted set."""
        if self.base.shape[0] < 2:
            return torch.stack([self.hits(sorted(rest + [c]), d) for c in extra]) if extra else self._none()
        if self._total is None:
            self._total = (self.abs_slabs.sum(0) + self.abs_column).amax(0)  # summed in any order: see the 1%
        m = len(rest) + 2
        band = 4 * m * U32 / (1 - m * U32) * 1.01 * self._total  # [N]
        acc = self.column + sum((self.slabs[c] for c in rest), torch.zeros_like(self.slabs[0]))  # [K, N]
        step = max(1, chunk // acc.numel())  # at most ``chunk`` floats per [M, K, N] block
        rows, safe = [], []
        for i in range(0, len(extra), step):
            block = acc + self.slabs[extra[i : i + step]]  # [M, K, N]
            mine = block[:, d].clone()
            block[:, d] = float("-inf")
            gap = mine - block.amax(1)  # [M, N]; NaN fails the check below
            rows.append(gap > 0)
            safe.append((gap.abs() > band).all(1))
        hits, ok = (torch.cat(rows), torch.cat(safe).tolist()) if rows else (self._none(), [])
        self.calls += len(extra)
        for i in (i for i, fine in enumerate(ok) if not fine):
            self.fallbacks += 1
            hits[i] = self.reference(sorted(rest + [extra[i]])).argmax(1) == d
        return hits

    def _none(self) -> torch.Tensor:
        return torch.zeros(0, self.slabs.shape[2], dtype=torch.bool)

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


def unit_ablation_accuracy(
    logits: torch.Tensor, diff: torch.Tensor, weight: torch.Tensor, units: torch.Tensor, labels: torch.Tensor,
    n_classes: int, chunk: int = 1 << 24,
) -> torch.Tensor | None:  # fmt: skip
    """Per-class accuracy [U, n_classes] (float64) with one read-out input each changed by ``diff``, bit for bit what
    the reference computes: ``out = logits + diff[:, u, None] * weight[:, u]`` per input, then the share of each
    class's inputs whose ``out.argmax()`` is their label (:func:`mechscope.core.intervene.class_accuracy`).

    One unit moves input n's logit k by d_k = diff[n, u]·weight[k, u], so it can change input n's verdict only where
    the label's logit and the best other one are within 2·max_k |d_k| of each other (inflated by 1% and by 8u of the
    logits' size for float32 rounding). Only those (input, unit) pairs are computed, with the same float operations as
    the reference; every other input keeps the full model's verdict. ``logits`` [B, K], ``diff`` [B, D], ``weight``
    [K, D], ``units`` [U]. Returns None when anything is not finite (the caller then runs the reference).
    """
    if not all(bool(torch.isfinite(t).all()) for t in (logits, diff, weight)):
        return None
    correct = logits.argmax(1) == labels  # [B]
    mine = logits.gather(1, labels[:, None])[:, 0]
    others = logits.scatter(1, labels[:, None], float("-inf")).amax(1)
    gap = (mine - others).abs()
    slack = 8 * U32 * logits.abs().amax(1)  # [B]
    w = weight[:, units]  # [K, U]
    reach = w.abs().amax(0)  # [U]
    counts = torch.bincount(labels, minlength=n_classes).clamp(min=1).double()
    base = torch.bincount(labels[correct], minlength=n_classes).double()
    change = torch.zeros(len(units), n_classes, dtype=torch.float64)
    step = max(1, chunk // max(1, len(labels)))
    for u0 in range(0, len(units), step):
        d = diff[:, units[u0 : u0 + step]]  # [B, u]
        r = d.abs() * reach[u0 : u0 + step]
        n_idx, u_idx = (2.02 * r + slack[:, None] >= gap[:, None]).nonzero(as_tuple=True)
        u_idx = u_idx + u0
        out = logits[n_idx] + diff[n_idx, units[u_idx], None] * weight[:, units[u_idx]].T  # [P, K], as the reference
        flip = (out.argmax(1) == labels[n_idx]).double() - correct[n_idx].double()
        change.index_put_((u_idx, labels[n_idx]), flip, accumulate=True)
    return (base + change) / counts
