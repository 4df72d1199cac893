"""Class selectivity of every conv channel, comparable across activation functions.

For the CNN half of the SoLU comparison (``cnn solu-compare``): each channel's mean activation per
class (its stage output ``hook_out`` averaged over positions and over the test images of the class,
as :func:`mechscope.cnn.methods.selectivity.selectivity` computes it for ``cnn explain``), and the
class selectivity index of Morcos et al. (2018), (μmax − μrest) / (μmax + μrest), on those
means *shifted so that the channel's least active class is at 0*, for every network alike.

Why shift for all: the index is defined for non-negative activations. ReLU's are; GELU's and
SoLU's (whose LayerNorm centres each position over the channels) are not. ``cnn explain`` shifts
only where a mean is negative, which would compare ReLU's unshifted index with GELU's shifted
one; here every network gets the same treatment (and ``explain_index`` keeps explain's figure).
A channel whose class means are all equal (a dead ReLU channel) scores 0 and is counted as
*silent*.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mechscope.cnn.methods import circuits as C
from mechscope.core.results import Result, figure_data


def shifted_index(class_means: torch.Tensor) -> torch.Tensor:
    """The selectivity index [C] of class means [C, K], each row shifted to a minimum of 0."""
    return C.selectivity_index(class_means - class_means.min(1, keepdim=True).values)


@dataclass(frozen=True)
class StageChannels(Result):
    stage: str
    hook: str
    class_means: torch.Tensor  # [C, K]
    index: torch.Tensor  # [C], shifted for every network
    explain_index: torch.Tensor  # [C], as cnn explain reports it
    preferred_class: tuple[int, ...]
    silent: tuple[int, ...]  # channels whose class means do not differ


def channel_selectivity(model, spec, data, acts, tolerance: float = 1e-6) -> tuple[StageChannels, ...]:
    """Every stage's channels (see the module docstring); ``data``/``acts`` as for ``cnn explain``."""
    from mechscope.cnn.methods.selectivity import selectivity

    out = []
    for s, st in zip(spec.stages, selectivity(model, spec, data, acts), strict=True):
        cm = st.class_means  # [C, K]
        spread = cm.max(1).values - cm.min(1).values
        out.append(
            StageChannels(
                stage=s.name,
                hook=s.hook_out,
                class_means=cm,
                index=shifted_index(cm),
                explain_index=st.index,
                preferred_class=st.preferred_class,
                silent=tuple(int(c) for c in torch.nonzero(spread <= tolerance).flatten()),
            )
        )
    return tuple(out)


@dataclass(frozen=True)
class ActivationComparison(Result):
    """``cnn solu-compare``: the same CNN trained once per activation, compared by test accuracy and by the class
    selectivity of its conv channels; ``to_dict()`` is compare.json. ``stages``: activation -> each stage's
    :class:`StageChannels` (in memory, for the report; ``channels`` holds them as JSON)."""

    SCHEMA = "mechscope.cnn-solu-compare/1"
    FILE = "compare.json"

    dataset: str
    class_names: list[str]
    test_images: int
    training: dict
    shape: dict
    models: list[dict]
    channels: dict[str, list]
    seconds: dict[str, float]
    summary: list[str] = field(default_factory=list)
    stages: dict | None = figure_data()
    work: dict | None = None  # forward and backward passes of the selectivity readings, all networks together, in
    # passes over the test_images (WorkCounter; ``parts``: each network's); the trainings are not counted
    test_set: int | None = None  # the dataset's test images (test accuracy: all of them; test_images: --test-limit)
