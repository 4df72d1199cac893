"""Universality across networks: do two CNNs trained apart learn the same units? (Olah et al. 2020, "Zoom In",
claim 3.)

Three measures, each between a stage of network A and a stage of network B:

* **Per-unit best match** (Li, Yosinski, Clune, Lipson & Hopcroft 2015, "Convergent learning: do different
  neural networks learn the same representations?"): the Pearson correlation of every channel of A with every
  channel of B across all images × positions (a channel's activation at one position of one image is one
  observation; the stage's output, after the activation and pooling), and each unit's best partner.
* **One-to-one matching**: the pairing of A's and B's channels that maximises the summed correlation, found with
  the Hungarian algorithm (``scipy.optimize.linear_sum_assignment``); with different widths only the narrower
  network's channels are all paired.
* **Linear CKA** (Kornblith, Norouzi, Lee & Hinton 2019, "Similarity of neural network representations
  revisited"): with X, Y the centred features (rows: observations), ||YᵀX||_F² / (||XᵀX||_F ||YᵀY||_F). 1 for
  the same representation up to a rotation and a scale; blind to which channel holds what.

All three come from one set of second moments (sums, XᵀX, YᵀY, XᵀY, in float64), accumulated batch by batch
(:class:`Moments`), so the test set never has to sit in memory at every position. The class circuits of
``cnn explain`` are compared through the matching in :func:`circuit_reuse`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field

import numpy as np
import torch

from mechscope.core.errors import MechscopeError
from mechscope.core.hooks import run_with_cache
from mechscope.core.results import Result, figure_data
from mechscope.core.torch_utils import evaluating
from mechscope.core.validate import check_finite

DEAD_VARIANCE = 1e-10  # a channel whose variance over the observations is below this never varies: "dead"


@dataclass(frozen=True)
class Moments:
    """Second moments of paired features a [rows, Ca], b [rows, Cb], summed over rows (float64)."""

    n: int
    sum_a: torch.Tensor  # [Ca]
    sum_b: torch.Tensor  # [Cb]
    aa: torch.Tensor  # [Ca, Ca]
    bb: torch.Tensor  # [Cb, Cb]
    ab: torch.Tensor  # [Ca, Cb]

    @classmethod
    def of(cls, a: torch.Tensor, b: torch.Tensor) -> Moments:
        if a.shape[0] != b.shape[0]:
            raise MechscopeError(f"paired features need the same rows, got {a.shape[0]} and {b.shape[0]}")
        a, b = a.double(), b.double()
        return cls(a.shape[0], a.sum(0), b.sum(0), a.T @ a, b.T @ b, a.T @ b)

    def __add__(self, o: Moments) -> Moments:
        return Moments(self.n + o.n, self.sum_a + o.sum_a, self.sum_b + o.sum_b, self.aa + o.aa, self.bb + o.bb,
                       self.ab + o.ab)  # fmt: skip

    def covariances(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(C_aa, C_bb, C_ab): the covariances of the centred features (divided by n)."""
        ma, mb = self.sum_a / self.n, self.sum_b / self.n
        return (self.aa / self.n - ma[:, None] * ma, self.bb / self.n - mb[:, None] * mb,
                self.ab / self.n - ma[:, None] * mb)  # fmt: skip

    def correlation(self) -> torch.Tensor:
        """[Ca, Cb] Pearson correlations; 0 in the row or column of a dead channel."""
        caa, cbb, cab = self.covariances()
        va, vb = caa.diagonal().clamp(min=0), cbb.diagonal().clamp(min=0)
        r = cab / (va.sqrt()[:, None] * vb.sqrt()).clamp(min=1e-300)
        r[va <= DEAD_VARIANCE] = 0.0
        r[:, vb <= DEAD_VARIANCE] = 0.0
        return r.clamp(-1.0, 1.0)

    def dead(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        caa, cbb, _ = self.covariances()
        return (tuple((caa.diagonal() <= DEAD_VARIANCE).nonzero().flatten().tolist()),
                tuple((cbb.diagonal() <= DEAD_VARIANCE).nonzero().flatten().tolist()))  # fmt: skip

    def cka(self) -> float:
        """Linear CKA: ||C_ab||_F² / (||C_aa||_F ||C_bb||_F) (the 1/n factors cancel)."""
        caa, cbb, cab = self.covariances()
        den = float(torch.linalg.matrix_norm(caa) * torch.linalg.matrix_norm(cbb))
        return float(cab.pow(2).sum()) / den if den > 0 else float("nan")


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of features x [n, p] and y [n, q] (rows: the same n observations)."""
    return Moments.of(x, y).cka()


def hungarian(corr: torch.Tensor) -> list[tuple[int, int]]:
    """The one-to-one pairing (a, b) maximising the summed correlation (min(Ca, Cb) pairs), by a's index."""
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(corr.numpy(), maximize=True)
    return [(int(a), int(b)) for a, b in zip(rows, cols, strict=True)]


@dataclass(frozen=True)
class MatchedPair(Result):
    a: int
    b: int
    correlation: float


def _median_live(best, dead) -> float:
    v = np.delete(np.asarray(best, dtype=float), np.asarray(dead, dtype=int))
    return float(np.median(v)) if len(v) else float("nan")


@dataclass(frozen=True)
class UnitMatching(Result):
    """Stage ``stage`` of network A against the same stage of network B."""

    stage: str
    observations: str  # what a row is: "image × position" or "image (spatial mean)"
    rows: int
    best_a: torch.Tensor  # [Ca] each A channel's best correlation with a B channel
    best_a_partner: torch.Tensor  # [Ca]
    best_b: torch.Tensor  # [Cb]
    best_b_partner: torch.Tensor  # [Cb]
    matched: tuple[MatchedPair, ...]  # Hungarian pairs of live channels, strongest first
    dead_a: tuple[int, ...]
    dead_b: tuple[int, ...]
    cka: float
    correlation: torch.Tensor = figure_data()  # [Ca, Cb]

    def best_matches(self) -> np.ndarray:
        """Best-match correlations of the live channels of both networks (A's in B, then B's in A)."""
        la = np.setdiff1d(np.arange(len(self.best_a)), self.dead_a)
        lb = np.setdiff1d(np.arange(len(self.best_b)), self.dead_b)
        return np.concatenate([self.best_a.numpy()[la], self.best_b.numpy()[lb]])

    def matched_live(self) -> np.ndarray:
        """Hungarian correlations of the pairs in which both channels are live."""
        return np.array([p.correlation for p in self.matched if p.a not in self.dead_a and p.b not in self.dead_b])

    @property
    def median_best(self) -> float:
        v = self.best_matches()
        return float(np.median(v)) if len(v) else float("nan")

    @property
    def median_best_a(self) -> float:
        """The median best match of A's live channels in B (numpy's median: the mean of the two middle values)."""
        return _median_live(self.best_a, self.dead_a)

    @property
    def median_best_b(self) -> float:
        """The median best match of B's live channels in A."""
        return _median_live(self.best_b, self.dead_b)

    @property
    def median_matched(self) -> float:
        v = self.matched_live()
        return float(np.median(v)) if len(v) else float("nan")

    def mapping(self) -> dict[int, int]:
        """A's channel -> its Hungarian partner in B."""
        return {p.a: p.b for p in self.matched}


def _best_live(corr: torch.Tensor, dead_other: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's best correlation with a live column, and that column. A dead channel's 0 is no match: a channel
    whose correlations with every live channel are negative has that negative best (0 and column 0 where every
    column is dead)."""
    live = corr.clone()
    live[:, list(dead_other)] = float("-inf")
    best, partner = live.max(1)
    none = torch.isinf(best)
    return torch.where(none, torch.zeros_like(best), best), torch.where(none, torch.zeros_like(partner), partner)


def _live_pairs(corr: torch.Tensor, dead_a: tuple[int, ...], dead_b: tuple[int, ...]) -> list[tuple[int, int]]:
    """The Hungarian pairing of the live channels only (a dead channel's 0 would outbid every negative pair)."""
    la = [i for i in range(corr.shape[0]) if i not in dead_a]
    lb = [j for j in range(corr.shape[1]) if j not in dead_b]
    if not la or not lb:
        return []
    return [(la[i], lb[j]) for i, j in hungarian(corr[la][:, lb])]


def match_units(m: Moments, stage: str, observations: str) -> UnitMatching:
    corr = m.correlation().float()
    dead_a, dead_b = m.dead()
    best_a, part_a = _best_live(corr, dead_b)
    best_b, part_b = _best_live(corr.T, dead_a)
    pairs = sorted((MatchedPair(a, b, float(corr[a, b])) for a, b in _live_pairs(corr, dead_a, dead_b)),
                   key=lambda p: -p.correlation)  # fmt: skip
    return UnitMatching(stage, observations, m.n, best_a, part_a, best_b, part_b, tuple(pairs), dead_a, dead_b,
                        m.cka(), corr)  # fmt: skip


# ---- one pass over the images for every network --------------------------------------------------------------


@dataclass(frozen=True)
class NetFeatures:
    """Per image and channel of every stage's output: its mean and its maximum over positions; and the logits."""

    means: dict[str, torch.Tensor]  # stage -> [N, C]
    maxima: dict[str, torch.Tensor]  # stage -> [N, C]
    logits: torch.Tensor  # [N, K]


def _rows(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B·H·W, C]: one row per image and position."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def collect_pairs(
    specs: Mapping[str, object], pairs: Sequence[tuple[str, str]], x: torch.Tensor, batch_size: int = 500
) -> tuple[dict[str, NetFeatures], dict[tuple[str, str], list[tuple[Moments, str]]]]:
    """Run every network over ``x`` once; per pair, the moments of each stage against the same stage.

    ``specs``: name -> :class:`~mechscope.cnn.models.spec.CNNSpec`. Rows are images × positions where the two
    stages' maps have the same size, else images (each channel's spatial mean).
    """
    names = {k: [s.hook_out for s in spec.stages] for k, spec in specs.items()}
    feats: dict[str, dict[str, list]] = {k: {"means": [], "maxima": [], "logits": []} for k in specs}
    moments: dict[tuple[str, str], list] = {p: [] for p in pairs}
    with torch.no_grad(), ExitStack() as stack:
        for spec in specs.values():
            stack.enter_context(evaluating(spec.model))
        for s in range(0, len(x), batch_size):
            cache = {}
            for k, spec in specs.items():
                logits, c = run_with_cache(spec.model, x[s : s + batch_size], names=names[k])
                for n in names[k]:
                    check_finite(c[n], f"{k}: {n} on the test images")
                cache[k] = [c[n] for n in names[k]]
                feats[k]["logits"].append(logits)
                feats[k]["means"].append([a.flatten(2).mean(2) for a in cache[k]])
                feats[k]["maxima"].append([a.flatten(2).amax(2) for a in cache[k]])
            for a, b in pairs:
                batch = [_pair_moments(fa, fb) for fa, fb in zip(cache[a], cache[b], strict=False)]
                moments[(a, b)] = batch if not moments[(a, b)] else [
                    (m0 + m1, how) for (m0, how), (m1, _) in zip(moments[(a, b)], batch, strict=True)
                ]  # fmt: skip
    return {k: _stack(specs[k], f) for k, f in feats.items()}, moments


def _pair_moments(fa: torch.Tensor, fb: torch.Tensor) -> tuple[Moments, str]:
    if fa.shape[2:] == fb.shape[2:]:
        return Moments.of(_rows(fa), _rows(fb)), "image × position"
    return Moments.of(fa.flatten(2).mean(2), fb.flatten(2).mean(2)), "image (spatial mean)"


def _stack(spec, f: dict) -> NetFeatures:
    stages = spec.stage_names
    return NetFeatures(
        means={st: torch.cat([row[i] for row in f["means"]]) for i, st in enumerate(stages)},
        maxima={st: torch.cat([row[i] for row in f["maxima"]]) for i, st in enumerate(stages)},
        logits=torch.cat(f["logits"]),
    )


def cka_matrix(features: Sequence[torch.Tensor]) -> torch.Tensor:
    """[F, F] linear CKA between every two feature sets [N, C_i] (rows: the same N images)."""
    n = len(features)
    out = torch.ones(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(i + 1, n):
            out[i, j] = out[j, i] = linear_cka(features[i], features[j])
    return out


# ---- class circuits through the matching ---------------------------------------------------------------------


def circuit_channels(
    spec, acts: torch.Tensor, reference: torch.Tensor, labels: torch.Tensor, classes: Sequence[int],
    tolerance: float = 0.01,
) -> dict[int, tuple[int, ...]]:  # fmt: skip
    """Class -> a circuit in the last stage by ``cnn explain``'s criterion, found by the first and third steps of its
    search (:mod:`mechscope.cnn.methods.circuits`): the shortest prefix of the attribution ranking that meets the
    criterion, pruned until no channel can be dropped (1-minimal). Explain's greedy search and 2-for-1 swaps, which
    can only make a set smaller, cost most of its time and are left out. On the read-out's closed form: ``acts``
    [N, C, H, W] the last stage's output on the test images, ``reference`` [C, H, W] its mean (explain's: over the
    first 10,000 training images). Needs a linear read-out."""
    from mechscope.core.intervene import readout_channel_contributions

    if not spec.readout.linear:
        raise MechscopeError("the closed-form circuit search needs a linear read-out after the last stage")
    fc = spec.readout.fc
    bias = fc.bias.detach() if fc.bias is not None else None
    base, contrib = readout_channel_contributions(fc.weight.detach(), acts.flatten(2), reference.flatten(1), bias)
    base, per = base.numpy(), contrib.permute(1, 0, 2).contiguous().numpy()  # per: [C, N, K]
    y = labels.numpy()
    pred = (base + per.sum(0)).argmax(1)  # the full model's predictions
    out = {}
    for d in (d for d in classes if (y == d).any()):  # a class with no test image has no circuit
        full_acc, full_fp = _rates(pred, y, d)

        def margin(keep, d=d, full_acc=full_acc, full_fp=full_fp) -> float:
            acc, fp = _rates((base + per[list(keep)].sum(0)).argmax(1), y, d)
            return min(acc - (full_acc - tolerance), (full_fp + tolerance) - fp)

        ranking = [int(c) for c in np.argsort(-per[:, y == d, d].mean(1), kind="stable")]
        prefix = next(ranking[:k] for k in range(1, len(ranking) + 1) if margin(ranking[:k]) >= 0)
        out[d] = tuple(_prune(prefix, margin))
    return out


def _prune(chosen: list[int], margin) -> list[int]:
    """Drop channels, the last-ranked first, while the criterion still holds (explain's pruning step)."""
    chosen, changed = list(chosen), True
    while changed and len(chosen) > 1:
        changed = False
        for c in reversed(chosen):
            trial = [x for x in chosen if x != c]
            if margin(trial) >= 0:
                chosen, changed = trial, True
                break
    return chosen


def _rates(pred: np.ndarray, labels: np.ndarray, d: int) -> tuple[float, float]:
    """(accuracy on class d, share of the other classes' images labelled d)."""
    is_d = labels == d
    return float((pred[is_d] == d).mean()), float((pred[~is_d] == d).mean())


@dataclass(frozen=True)
class CircuitReuse(Result):
    """Class ``target``: A's circuit channels mapped through the matching, against B's circuit."""

    target: int
    circuit_a: tuple[int, ...]
    circuit_b: tuple[int, ...]
    mapped: tuple[int, ...]  # B's partners of A's circuit channels (those the matching pairs)
    overlap: int  # how many of them are in B's circuit
    expected: float  # by chance: |mapped| · |circuit_b| / C_b
    p_value: float  # P(overlap ≥ observed) for a random set of |mapped| of B's channels (hypergeometric)


def circuit_reuse(
    mapping: Mapping[int, int], circuits_a: Mapping[int, Sequence[int]], circuits_b: Mapping[int, Sequence[int]],
    n_b: int,
) -> tuple[CircuitReuse, ...]:  # fmt: skip
    """Per class both networks have a circuit for: the overlap of A's circuit, mapped, with B's."""
    from scipy.stats import hypergeom

    out = []
    for k in sorted(set(circuits_a) & set(circuits_b)):
        ca, cb = tuple(circuits_a[k]), tuple(circuits_b[k])
        mapped = tuple(mapping[c] for c in ca if c in mapping)
        overlap = len(set(mapped) & set(cb))
        p = float(hypergeom.sf(overlap - 1, n_b, len(cb), len(mapped)))
        out.append(CircuitReuse(k, ca, cb, mapped, overlap, len(mapped) * len(cb) / n_b, p))
    return tuple(out)


# ---- the whole comparison ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Comparison(Result):
    """Network ``a`` against network ``b``: ``kind`` "trained" (two trained runs) or "baseline" (a run against a
    randomly initialised network of its shape)."""

    a: str
    b: str
    kind: str
    stages: tuple[UnitMatching, ...]  # stage i of a against stage i of b
    circuit_stage: str | None = None
    circuits: tuple[CircuitReuse, ...] = ()

    def stage(self, name: str) -> UnitMatching:
        return next(s for s in self.stages if s.stage == name)


@dataclass(frozen=True)
class UniversalityResult(Result):
    """What ``cnn universality`` measured; ``to_dict()`` is universality.json."""

    SCHEMA = "mechscope.universality/2"
    FILE = "universality.json"

    dataset: str
    class_names: tuple[str, ...]
    test_images: int
    runs: tuple[dict, ...]  # label, path, shape, seed, test accuracy measured here, featvis and circuit sources
    baselines: tuple[dict, ...]  # label, the run whose shape it has, seed
    comparisons: tuple[Comparison, ...]
    cka_labels: tuple[str, ...]  # "net stage" of each row and column of ``cka``
    cka: torch.Tensor  # [F, F] linear CKA on each image's channel means (spatially averaged)
    settings: dict
    summary: tuple[str, ...] = ()
    seconds: dict | None = None
    # per stage: the summary's test of trained against random best matches (one-sided Mann-Whitney p, the
    # probability of superiority U / (n m), n and m; best_match_test)
    best_match_tests: dict = field(default_factory=dict)
    # per network (each run's label, and "random <label>" for its baseline): forward and backward passes, in passes
    # over the test_images (WorkCounter over the network's stages' convolutions): the one pass over the test images
    # every network makes; for a run, what else ran it: the class circuits' search when RUN/explain could not be
    # reused (the last stage's mean over training images, a second pass over the test images) and the feature
    # visualisations rendered here, none where RUN/featvis holds these weights' channel images
    # (feature_visualisation_steps + 1 forward and that many backward passes of a batch of one image per unit
    # rendered, the backward through the stages up to the deepest such unit's)
    work: dict | None = None

    def trained(self) -> list[Comparison]:
        return [c for c in self.comparisons if c.kind == "trained"]

    def baseline(self) -> list[Comparison]:
        return [c for c in self.comparisons if c.kind == "baseline"]

    @property
    def stage_names(self) -> list[str]:
        return [s.stage for s in self.comparisons[0].stages]

    def stage_tests(self) -> dict:
        """Per stage, the best-match test: the recorded ones, or computed from the comparisons where none are."""
        if self.best_match_tests:
            return self.best_match_tests
        return {st: best_match_test([c.stage(st).best_matches() for c in self.trained()],
                                    [c.stage(st).best_matches() for c in self.baseline()])
                for st in self.stage_names}  # fmt: skip


def best_match_test(trained, baseline) -> dict:
    """Whether the trained pairs' best-match correlations (live units, both directions, pooled) are larger than the
    random baseline's: one-sided Mann–Whitney U, with the probability of superiority U / (n m) as the effect size
    (0.5: no difference). A unit's best match is not independent of its network's other units', so p is a guide."""
    from scipy.stats import mannwhitneyu

    a = np.concatenate([np.asarray(v, dtype=float) for v in trained]) if trained else np.array([])
    b = np.concatenate([np.asarray(v, dtype=float) for v in baseline]) if baseline else np.array([])
    if not len(a) or not len(b):
        return {"p": float("nan"), "superiority": float("nan"), "n": len(a), "m": len(b)}
    u, p = mannwhitneyu(a, b, alternative="greater")
    return {"p": float(p), "superiority": float(u) / (len(a) * len(b)), "n": len(a), "m": len(b)}
