"""Ablating every channel of every stage, each read-out input, and whole stages: the tables.

For each stage (at its ``hook_out``) and each channel, zero- and mean-ablation (see
:mod:`mechscope.core.intervene`) and the change in each class's test accuracy. Where the
read-out is linear, the last stage's channels and each of the read-out's inputs are ablated in
closed form; every other stage runs the rest of the network from cached activations
(:func:`~mechscope.core.intervene.intervene_at`). Whole-stage ablation shows what a stage's
replacement value "reads as": with every channel at its mean the network gives one answer to
every image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mechscope.core import intervene as A
from mechscope.core.results import Result

KINDS = ("zero", "mean")
CLOSED_FORM = "closed form through the linear read-out (checked against hooked forwards in the tests)"


@dataclass(frozen=True)
class StageAblation(Result):
    """One stage, one row per channel: change in each class's test accuracy (ablated − full)."""

    stage: str
    site: str  # the hook point ablated
    method: str
    zero: torch.Tensor  # [C, K]
    mean: torch.Tensor  # [C, K]
    zero_overall: torch.Tensor  # [C] change in test accuracy
    mean_overall: torch.Tensor  # [C]

    def of(self, kind: str) -> torch.Tensor:
        return self.zero if kind == "zero" else self.mean

    def overall(self, kind: str) -> torch.Tensor:
        return self.zero_overall if kind == "zero" else self.mean_overall


@dataclass(frozen=True)
class ReadoutAblation(Result):
    """Each read-out input (a last-stage channel at one position) ablated alone, in closed form."""

    units: tuple[str, ...]  # "c5 y1 x2"
    shape: tuple[int, int, int]
    zero: torch.Tensor  # [C*H*W, K]
    mean: torch.Tensor


@dataclass(frozen=True)
class WholeStage(Result):
    """Every channel of a stage ablated at once."""

    stage: str
    kind: str
    per_class: torch.Tensor  # [K] accuracy
    test_accuracy: float
    predicted_share: torch.Tensor  # [K] share of test images called each class
    reads_as: int  # the class the replacement value is read as


@dataclass(frozen=True)
class AblationResult(Result):
    metric: str
    baseline_per_class: torch.Tensor  # [K]
    mean_reference: str
    stages: tuple[StageAblation, ...]
    readout: ReadoutAblation | None
    whole: tuple[WholeStage, ...]

    def stage(self, name: str) -> StageAblation:
        return next(s for s in self.stages if s.stage == name)

    def whole_stage(self, name: str, kind: str) -> WholeStage:
        return next(w for w in self.whole if w.stage == name and w.kind == kind)


def ablation_study(model, spec, data, acts, batch_size: int = 2048, mean_reference: str = "") -> AblationResult:
    k = data.n_classes
    reduce = A.class_accuracy(data.y, k)
    base = reduce(acts.logits[None])[0]  # [K]
    counts = torch.bincount(data.y, minlength=k).double()
    test_acc = float((acts.pred == data.y).double().mean())

    def overall(per: torch.Tensor) -> torch.Tensor:  # [n, K] per-class accuracy -> [n] test accuracy
        return (per * counts).sum(1) / counts.sum()

    stages = []
    for s in spec.stages:
        shape = tuple(acts.out[s.name].shape[1:])
        closed = s is spec.last and spec.readout.linear
        rows = {}
        for kind in KINDS:
            rep = 0.0 if kind == "zero" else acts.means[s.name]
            if closed:
                rows[kind] = _closed(spec, acts, s.name, A.channel_masks(shape).flatten(1), rep, reduce)
            else:
                masks = A.channel_masks(shape)
                rows[kind] = A.intervene_at(spec, acts.out[s.name], s.hook_out, masks, rep, reduce, batch_size)
        what = data.description or "the test images"
        method = CLOSED_FORM if closed else f"the network after {s.hook_out} run on {what}"
        stages.append(
            StageAblation(s.name, s.hook_out, method, rows["zero"] - base, rows["mean"] - base,
                          overall(rows["zero"]) - test_acc, overall(rows["mean"]) - test_acc)
        )  # fmt: skip
    readout = None
    if spec.readout.linear:
        shape = spec.last.shape_out
        n = int(np.prod(shape))
        reps = {"zero": 0.0, "mean": acts.means[spec.last.name]}
        masks = A.unit_masks((n,))
        per = {kind: _closed(spec, acts, spec.last.name, masks, reps[kind], reduce) - base for kind in KINDS}
        units = tuple(f"c{c} y{i} x{j}" for c, i, j in np.ndindex(*shape))
        readout = ReadoutAblation(units, tuple(shape), per["zero"], per["mean"])
    whole = []
    for s in spec.stages:
        every = torch.ones(1, *acts.out[s.name].shape[1:], dtype=torch.bool)
        for kind in KINDS:
            rep = 0.0 if kind == "zero" else acts.means[s.name]
            out = A.intervene_at(spec, acts.out[s.name], s.hook_out, every, rep, batch_size=batch_size)[0]
            per = reduce(out[None])[0]
            share = torch.bincount(out.argmax(1), minlength=k).double() / len(data.y)
            whole.append(WholeStage(s.name, kind, per, float(overall(per[None])[0]), share, int(share.argmax())))
    return AblationResult(
        metric="change in test accuracy per class (ablated − full), fractions of 1",
        baseline_per_class=base,
        mean_reference=mean_reference,
        stages=tuple(stages),
        readout=readout,
        whole=tuple(whole),
    )


def _closed(spec, acts, stage: str, masks: torch.Tensor, replacement, reduce) -> torch.Tensor:
    """Per-class accuracy [N_masks, K] with the masked read-out inputs replaced, in closed form."""
    fc = spec.readout.fc
    a = acts.out[stage].flatten(1)  # [N, D]
    rep = replacement.flatten() if isinstance(replacement, torch.Tensor) else replacement
    return A.readout_intervene(fc.weight.detach(), _bias(fc), a, masks, rep, reduce, logits=acts.logits)


def _bias(fc):
    return fc.bias.detach() if fc.bias is not None else None
