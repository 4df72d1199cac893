"""Per-class circuits in one stage: the search of :mod:`mechscope.cnn.methods.circuits`, then re-measured.

For each class, the smallest set of the stage's channels that, with every other channel of the
stage mean-ablated, keeps the class's accuracy within ``tolerance`` of the full model's and does
not call other classes that class more often than the full model does (within ``tolerance``).
The search runs on the read-out's closed form when the stage is the last and the read-out is
linear, otherwise on the rest of the network run from cached activations; in closed form each
candidate's predictions come from :class:`~mechscope.core.kept_sum.KeptSum`, which returns the
gather-and-sum's argmax bit for bit. Sufficiency and necessity (mean- and resample-ablated) are
then re-measured with hooked forward passes of the network after the stage, from the stage's
activations cached in the same batches as a pass from the pixels would compute them (so the
numbers equal that pass's, without recomputing the layers before the stage). Resample-ablation
takes each image's circuit channels from another test image drawn at random from the whole test
set (the data distribution, as causal scrubbing resamples; seeded), so that some donors are of the
image's own class (``resample_same_class_share``); the held-out check repeats sufficiency on
training images outside the mean's reference set; the feeders are the previous stage's channels that drive the set most.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mechscope.cnn.methods import circuits as C
from mechscope.cnn.methods.activations import logits_and_activations
from mechscope.cnn.methods.layer_attribution import class_channel_to_channel
from mechscope.core import intervene as A
from mechscope.core.errors import MechscopeError
from mechscope.core.kept_sum import KeptSum, Rates
from mechscope.core.results import Result
from mechscope.core.torch_utils import evaluating


@dataclass(frozen=True)
class GrowthPoint(Result):
    size: int
    accuracy: float
    other_classes_called: float


@dataclass(frozen=True)
class Feeder(Result):
    channel: int
    contribution: float
    share: float


@dataclass(frozen=True)
class ClassCircuit(Result):
    target: int
    channels: tuple[int, ...]  # in the order they were added
    method: str
    margin: float
    prefix_size: int | None
    greedy_size: int | None
    pruned_size: int | None
    greedy_order: tuple[int, ...]
    ranking: tuple[int, ...]
    full_accuracy: float
    sufficiency: float  # accuracy on the class with only the circuit (hooked forwards)
    necessity: float  # with the circuit mean-ablated
    necessity_resample: float  # with the circuit resample-ablated
    other_classes_called_full: float
    other_classes_called_circuit: float
    meets_criterion: bool
    accuracy_criterion_met: bool
    per_class_accuracy_circuit_only: torch.Tensor  # [K]
    per_class_accuracy_circuit_ablated: torch.Tensor
    per_class_accuracy_circuit_resampled: torch.Tensor
    held_out_full_accuracy: float | None
    held_out_sufficiency: float | None
    held_out_other_classes_called_full: float | None
    held_out_other_classes_called_circuit: float | None
    growth: tuple[GrowthPoint, ...]
    attribution: torch.Tensor  # [C] each channel's mean pull on the class's logit, restored from its mean
    readout_weight_to_class: tuple[float, ...] | None  # per circuit channel, with a linear read-out
    feeders: tuple[Feeder, ...]
    feeders_all: torch.Tensor | None  # [C_previous]

    @property
    def size(self) -> int:
        return len(self.channels)


@dataclass(frozen=True)
class CircuitStudy(Result):
    stage: str
    site: str
    closed_form: bool
    tolerance: float
    criterion: str
    search: str
    necessity: str
    necessity_resample: str
    resample_seed: int
    held_out_check: str
    feeder_stage: str | None
    circuits: tuple[ClassCircuit, ...]
    # "data": any other test image (the data distribution); "other_class": only images of another class (what a
    # mechanisms.json written before this field meant)
    resample_donors: str = "other_class"
    resample_same_class_share: float | None = None  # share of the test images whose donor is of their own class
    feeder_method: str = ""  # how the feeders' contributions are computed (an estimate, not an ablation)

    def membership(self) -> dict[int, list[int]]:
        """Channel -> the classes whose circuit holds it."""
        return C.circuit_membership([{"channels": c.channels, "digit": c.target} for c in self.circuits])

    def get(self, target: int) -> ClassCircuit | None:
        """The circuit found for class ``target``, or None for a class the study did not search."""
        return next((c for c in self.circuits if c.target == target), None)

    def of(self, target: int) -> ClassCircuit:
        """The circuit found for class ``target``; a one-line error for a class the study did not search."""
        found = self.get(target)
        if found is None:
            have = ", ".join(str(c.target) for c in self.circuits) or "none"
            shown = int(target) if isinstance(target, (int, np.integer)) else repr(target)
            raise MechscopeError(f"no circuit for class {shown}: this study searched class(es) {have}")
        return found

    def held_out_met(self, c: ClassCircuit) -> bool | None:
        """The criterion (both halves, the same tolerance) on the held-out images the search never saw; None
        without them. The circuits are searched on the test images, so their margin there is small by design."""
        if c.held_out_sufficiency is None or c.held_out_full_accuracy is None:
            return None
        tol = self.tolerance
        accuracy = c.held_out_sufficiency >= c.held_out_full_accuracy - tol
        return bool(accuracy and c.held_out_other_classes_called_circuit <= c.held_out_other_classes_called_full + tol)


class _Keeper:
    """Logits with only some channels of a stage kept (the others at their mean), on a set of activations."""

    def __init__(self, spec, stage, a: torch.Tensor, ref: torch.Tensor, closed: bool, batch_size: int) -> None:
        self.spec, self.stage, self.a, self.ref, self.closed, self.bs = spec, stage, a, ref, closed, batch_size
        if closed:
            fc = spec.readout.fc
            self.base, self.contrib = A.readout_channel_contributions(
                fc.weight.detach(), a.flatten(2), ref.flatten(1), fc.bias.detach() if fc.bias is not None else None
            )  # [K], [N, C, K]
            self.kept = KeptSum(self.base, self.contrib)

    def predict(self, keep: list[int]) -> torch.Tensor:
        """[N] the class picked with only ``keep`` intact: ``logits(keep).argmax(1)``, bit for bit."""
        return self.kept.predict(keep) if self.closed else self.logits(keep).argmax(1)

    def hits(self, keep: list[int], d: int) -> torch.Tensor:
        """[N] bool: ``predict(keep) == d``."""
        return self.kept.hits(keep, d) if self.closed else self.predict(keep) == d

    def logits(self, keep: list[int], rows: torch.Tensor | None = None) -> torch.Tensor:
        if self.closed:
            c = self.contrib if rows is None else self.contrib[rows]
            return self.base + c[:, keep].sum(1)
        a = self.a if rows is None else self.a[rows]
        others = ~A.group_mask(tuple(a.shape[1:]), keep) if keep else torch.ones(1, *a.shape[1:], dtype=torch.bool)
        return A.intervene_at(self.spec, a, self.stage.hook_out, others, self.ref, batch_size=self.bs)[0]

    def attribution(self, target: int, rows: torch.Tensor) -> torch.Tensor:
        """[C] mean over ``rows`` of logit[target] with channel c alone restored minus with none."""
        if self.closed:
            return self.contrib[rows][:, :, target].mean(0)
        a = self.a[rows]
        shape = tuple(a.shape[1:])
        masks = ~A.channel_masks(shape)  # channel c kept, the others at the mean
        kept = A.intervene_at(self.spec, a, self.stage.hook_out, masks, self.ref, batch_size=self.bs)[..., target]
        return (kept - self.logits([], rows)[:, target]).mean(1)


def circuit_study(
    model, spec, data, acts, classes: list[int], stage: str | None = None, tolerance: float = 0.01,
    resample_seed: int = 0, batch_size: int = 2048, held_out_note: str = "",
) -> CircuitStudy:  # fmt: skip
    s = spec.stage(stage) if stage else spec.last
    net = spec.model
    closed = s is spec.last and spec.readout.linear
    a, ref = acts.out[s.name], acts.means[s.name]
    keeper = _Keeper(spec, s, a, ref, closed, batch_size)
    with evaluating(net):
        held = None
        if len(data.y_held):
            held_logits, held_acts = logits_and_activations(net, data.x_held, s.hook_out, batch_size)
            held = (_Keeper(spec, s, held_acts, ref, closed, batch_size), held_logits.argmax(1))
        prev = spec.stages[s.index - 2] if s.index > 1 else None
        feeders = None
        if prev is not None:
            feed_idx = [(data.y == d).nonzero().flatten()[:200] for d in classes]  # up to 200 images per class
            labels = torch.cat([torch.full((len(ix),), i) for i, ix in enumerate(feed_idx)])
            feeders = class_channel_to_channel(
                net, data.x[torch.cat(feed_idx)], labels, prev.hook_out, s.hook_post, n_classes=len(classes)
            )  # [classes, C, C_prev]
    donors = A.resample_donors(data.y, seed=resample_seed, other_class=False)  # the data distribution
    a_donor = a[donors]
    reduce = A.class_accuracy(data.y, data.n_classes)
    rates = (Rates(data.y, data.n_classes), Rates(data.y_held, data.n_classes))
    circuits = []
    for i, d in enumerate(classes):
        args = (keeper, held, feeders, i, d, tolerance, a_donor, reduce, rates, batch_size)
        circuits.append(_one(spec, s, acts, *args))
    return CircuitStudy(
        stage=s.name,
        site=s.hook_out,
        closed_form=closed,
        tolerance=tolerance,
        criterion=f"with only the circuit's {s.name} channels (every other {s.name} channel mean-ablated): accuracy "
        f"on the class ≥ the full model's − {tolerance:g}, and the share of other classes' test images labelled as "
        f"the class ≤ the full model's + {tolerance:g}",
        search="attribution-ranked prefix and greedy forward selection, each pruned to 1-minimal; the smaller kept "
        "and shrunk by 2-for-1 swaps while one exists; searched "
        + ("with the closed-form read-out" if closed else f"by running the network after {s.hook_out}")
        + ", verified with hooked forward passes",
        necessity="accuracy on the class with the circuit's channels mean-ablated (the rest intact)",
        necessity_resample="accuracy on the class with the circuit's channels replaced by their values on another "
        f"test image drawn at random from the whole test set (seed {resample_seed}; the data distribution, as causal "
        "scrubbing resamples, so some donors are of the image's own class); free of the mean's bias towards the "
        "class the mean activation is read as",
        resample_seed=resample_seed,
        held_out_check=held_out_note,
        feeder_stage=prev.name if prev is not None else None,
        circuits=tuple(circuits),
        resample_donors="data",
        resample_same_class_share=float((data.y[donors] == data.y).double().mean()),
        feeder_method="" if prev is None else f"activation × gradient of {prev.hook_out} into the total of each "
        f"{s.hook_post} channel, summed over the circuit's channels and averaged over up to 200 test images of the "
        "class: a linear decomposition at those images (a first-order estimate of each channel's effect), not an "
        "ablation",
    )


def _one(spec, s, acts, keeper, held, feeders, i, d, tol, a_donor, reduce, rates, bs) -> ClassCircuit:
    rate, held_rate = rates
    y = rate.labels
    full_acc, full_fp = rate(acts.pred, d)

    def margin_of(hits: torch.Tensor) -> float:
        acc_d, fp_d = rate.of_hits(hits, d)
        return min(acc_d - (full_acc - tol), (full_fp + tol) - fp_d)

    def margin(keep: list[int]) -> float:
        return margin_of(keeper.hits(keep, d))

    def margins(rest: list[int], extra: list[int]) -> list[float]:
        return [margin_of(h) for h in keeper.kept.hits_each(rest, extra, d)]

    attribution = keeper.attribution(d, (y == d).nonzero().flatten())
    ranking = attribution.argsort(descending=True).tolist()
    each = margins if keeper.closed else None  # batched only where a set costs no forward pass
    found = C.find_circuit(margin, a_donor.shape[1], ranking, target=d, evaluate_each=each)
    chosen = found.channels
    in_set = A.group_mask(tuple(a_donor.shape[1:]), chosen)
    a, ref = acts.out[s.name], acts.means[s.name]
    only = A.intervene_at(spec, a, s.hook_out, ~in_set, ref, batch_size=bs)[0]
    without = A.intervene_at(spec, a, s.hook_out, in_set, ref, batch_size=bs)[0]
    resampled = A.intervene_at(spec, a, s.hook_out, in_set, a_donor, batch_size=bs)[0]
    suff, fp = rate(only.argmax(1), d)
    h_acc = h_fp = h_suff = h_cfp = None
    if held is not None:
        held_keeper, held_pred = held
        h_acc, h_fp = held_rate(held_pred, d)
        h_suff, h_cfp = held_rate(held_keeper.predict(chosen), d)
    growth = tuple(
        GrowthPoint(k, *rate(keeper.predict(found.greedy_order[:k]), d)) for k in range(1, len(found.greedy_order) + 1)
    )
    feed = fed = None
    if feeders is not None:
        fed = feeders[i][chosen].sum(0)  # [C_prev] each previous channel's contribution to the set
        total = float(fed.abs().sum()) or 1.0
        top = fed.abs().argsort(descending=True)[:3].tolist()
        feed = tuple(Feeder(c, float(fed[c]), float(fed[c].abs()) / total) for c in top)
    w = None
    if spec.readout.linear and s is spec.last:
        tmpl = spec.readout.fc.weight.detach().view(spec.n_classes, *s.shape_out)[d]  # [C, H, W]
        w = tuple(float(tmpl[c].sum()) for c in chosen)
    return ClassCircuit(
        target=d, channels=tuple(chosen), method=found.method, margin=found.margin, prefix_size=found.prefix_size,
        greedy_size=found.greedy_size, pruned_size=found.pruned_size, greedy_order=tuple(found.greedy_order),
        ranking=tuple(found.ranking), full_accuracy=full_acc, sufficiency=suff,
        necessity=rate(without.argmax(1), d)[0], necessity_resample=rate(resampled.argmax(1), d)[0],
        other_classes_called_full=full_fp, other_classes_called_circuit=fp,
        meets_criterion=suff >= full_acc - tol and fp <= full_fp + tol, accuracy_criterion_met=suff >= full_acc - tol,
        per_class_accuracy_circuit_only=reduce(only[None])[0],
        per_class_accuracy_circuit_ablated=reduce(without[None])[0],
        per_class_accuracy_circuit_resampled=reduce(resampled[None])[0],
        held_out_full_accuracy=h_acc, held_out_sufficiency=h_suff, held_out_other_classes_called_full=h_fp,
        held_out_other_classes_called_circuit=h_cfp, growth=growth, attribution=attribution,
        readout_weight_to_class=w, feeders=feed or (), feeders_all=fed,
    )  # fmt: skip
