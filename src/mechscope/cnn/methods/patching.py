"""Activation patching between two classes, for every unit and every channel of every stage.

Pairs of correctly classified test images, one of the clean class and one of the corrupted
class: run the corrupted image with one unit (a channel at one position, or a whole channel)
taken from the clean image, and measure how much of the logit difference
LD = logit(clean) − logit(corrupted) comes back: (LD_patched − LD_corrupted) / (LD_clean −
LD_corrupted); 0: no change, 1: the clean image's decision fully restored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mechscope.cnn.config import resolve_pair
from mechscope.core import intervene as A
from mechscope.core.errors import MechscopeError
from mechscope.core.results import Result, figure_data
from mechscope.core.validate import check_int


@dataclass(frozen=True)
class TopUnit(Result):
    channel: int
    y: int
    x: int
    recovered: float


@dataclass(frozen=True)
class StagePatching(Result):
    stage: str
    top_units: tuple[TopUnit, ...]  # the five units that move the logit difference most
    position_mean: torch.Tensor  # [C, H, W] mean over pairs of the share recovered
    channel_mean: torch.Tensor  # [C]
    channel_std: torch.Tensor  # [C]


@dataclass(frozen=True)
class PatchingResult(Result):
    clean_class: int
    corrupted_class: int
    pairs: int
    clean_test_indices: tuple[int, ...]
    corrupted_test_indices: tuple[int, ...]
    metric: str
    logit_difference_clean_mean: float
    logit_difference_corrupted_mean: float
    stages: tuple[StagePatching, ...]
    clean_image: torch.Tensor = figure_data()  # [C, H, W] the first pair
    corrupted_image: torch.Tensor = figure_data()

    def stage(self, name: str) -> StagePatching:
        return next(s for s in self.stages if s.stage == name)


def default_pair(class_names: tuple[str, ...], confusion) -> tuple[int, int]:
    """8 and 3 on ten digit classes (the classic pair); otherwise the (true, predicted) pair confused most."""
    if tuple(class_names) == tuple("0123456789"):
        return 8, 3
    conf = torch.as_tensor(confusion)
    off = conf - torch.diag(conf.diag())
    t, p = divmod(int(off.argmax()), conf.shape[1])
    return (t, p) if t != p else (0, 1)


def patching_study(model, spec, data, acts, pair: tuple[int, int], n_pairs: int = 16, batch_size: int = 2048):
    clean_cls, corrupt_cls = resolve_pair(pair, data.class_names)
    n_pairs = check_int(n_pairs, "n_pairs", 1)  # 0 was "no correctly classified test images"
    ok = acts.pred == data.y
    clean_idx = ((data.y == clean_cls) & ok).nonzero().flatten()[:n_pairs]
    corrupt_idx = ((data.y == corrupt_cls) & ok).nonzero().flatten()[:n_pairs]
    n = min(len(clean_idx), len(corrupt_idx))
    if n == 0:
        names = data.class_names
        raise MechscopeError(
            f"no correctly classified test images of {names[clean_cls]} and {names[corrupt_cls]} to patch between; "
            "choose two classes the model gets right with --patch A,B"
        )
    clean_idx, corrupt_idx = clean_idx[:n], corrupt_idx[:n]
    lo = acts.logits
    ld_clean = (lo[clean_idx, clean_cls] - lo[clean_idx, corrupt_cls]).double()
    ld_corr = (lo[corrupt_idx, clean_cls] - lo[corrupt_idx, corrupt_cls]).double()
    gap = ld_clean - ld_corr  # [n]

    def recovered(out: torch.Tensor) -> torch.Tensor:  # [k, n, K] -> [k, n] share of the gap recovered
        ld = (out[..., clean_cls] - out[..., corrupt_cls]).double()
        return (ld - ld_corr) / gap

    stages = []
    for s in spec.stages:
        a = acts.out[s.name]
        shape = tuple(a.shape[1:])
        clean, corrupted = a[clean_idx], a[corrupt_idx]
        pos = A.intervene_at(spec, corrupted, s.hook_out, A.unit_masks(shape), clean, recovered, batch_size)
        ch = A.intervene_at(spec, corrupted, s.hook_out, A.channel_masks(shape), clean, recovered, batch_size)
        mean = pos.mean(1)  # [U]
        top = mean.abs().argsort(descending=True)[:5]
        h, w = shape[1], shape[2]
        units = tuple(TopUnit(int(u) // (h * w), int(u) // w % h, int(u) % w, float(mean[u])) for u in top)
        std = ch.std(1) if n > 1 else torch.zeros(shape[0], dtype=ch.dtype)
        stages.append(StagePatching(s.name, units, mean.view(shape), ch.mean(1), std))
    return PatchingResult(
        clean_class=clean_cls,
        corrupted_class=corrupt_cls,
        pairs=n,
        clean_test_indices=tuple(clean_idx.tolist()),
        corrupted_test_indices=tuple(corrupt_idx.tolist()),
        metric=f"(LD_patched − LD_corrupted) / (LD_clean − LD_corrupted), LD = logit {data.class_names[clean_cls]} "
        f"− logit {data.class_names[corrupt_cls]}; 0: no change, 1: the clean image's decision fully restored",
        logit_difference_clean_mean=float(ld_clean.mean()),
        logit_difference_corrupted_mean=float(ld_corr.mean()),
        stages=tuple(stages),
        clean_image=data.x[clean_idx[0]],
        corrupted_image=data.x[corrupt_idx[0]],
    )
