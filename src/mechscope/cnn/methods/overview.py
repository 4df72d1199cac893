"""What a CNN does overall (accuracy, confusions) and what its weights say before any input.

* :func:`overview`: test accuracy, per class, the confusion matrix ([true][predicted]).
* :func:`weights_view`: the first stage's filters; between adjacent stages the "expanded
  weights" (Olah et al. 2020, Zoom In), here each kernel's norm and signed sum per pair of
  channels; and, when the read-out is linear, each class's read-out template over the last
  stage's output map (its logit is that template's dot product with the map, plus a bias).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mechscope.core import intervene as A
from mechscope.core.results import Result, figure_data


@dataclass(frozen=True)
class Overview(Result):
    n_test: int
    test_accuracy: float
    per_class_accuracy: tuple[float, ...]
    confusion_matrix: tuple[tuple[int, ...], ...]  # [true][predicted]


def overview(model, spec, data, acts) -> Overview:
    k = data.n_classes
    pred = acts.pred
    confusion = torch.zeros(k, k, dtype=torch.long)
    confusion.index_put_((data.y, pred), torch.ones_like(data.y), accumulate=True)
    per_class = A.class_accuracy(data.y, k)(acts.logits[None])[0]
    return Overview(
        n_test=len(data.y),
        test_accuracy=float((pred == data.y).double().mean()),
        per_class_accuracy=tuple(per_class.tolist()),
        confusion_matrix=tuple(tuple(r) for r in confusion.tolist()),
    )


@dataclass(frozen=True)
class Connection(Result):
    """Kernels from stage ``source`` into stage ``target``, summarised per channel pair."""

    source: str
    target: str
    kernel_norm: torch.Tensor  # [C_target, C_source]
    kernel_sum: torch.Tensor  # [C_target, C_source]
    kernels: torch.Tensor = figure_data()  # [C_target, C_source, k, k]


@dataclass(frozen=True)
class Weights(Result):
    first_filters: torch.Tensor  # [C_1, C_in, k, k] the first stage's filters
    connections: tuple[Connection, ...]  # between each pair of adjacent stages
    readout_templates: torch.Tensor | None  # [K, C, H, W] with a linear read-out, else None
    readout_class_channel_sum: torch.Tensor | None  # [K, C]


def weights_view(model, spec) -> Weights:
    convs = [s.conv for s in spec.stages]
    connections = []
    for a, b, conv in zip(spec.stages, spec.stages[1:], convs[1:], strict=False):
        w = conv.weight.detach()  # [C_b, C_a, k, k]
        connections.append(Connection(a.name, b.name, w.flatten(2).norm(dim=2), w.flatten(2).sum(2), w.clone()))
    templates = class_channel = None
    if spec.readout.linear:
        fc = spec.readout.fc.weight.detach()  # [K, C*H*W]
        templates = fc.view(spec.n_classes, *spec.last.shape_out).clone()
        class_channel = templates.flatten(2).sum(2)
    return Weights(convs[0].weight.detach().clone(), tuple(connections), templates, class_channel)
