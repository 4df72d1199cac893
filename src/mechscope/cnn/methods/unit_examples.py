"""The test images that excite each channel most, where, and which pixels drive it there.

For every channel of every stage (at ``hook_post``): its top-k test images by the channel's
maximum over positions, the receptive field of that most active position (from the spec), and
the input × gradient of the activation there, a map of the pixels that raise it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mechscope.cnn.methods import featvis as FV
from mechscope.core.hooks import run_with_cache
from mechscope.core.results import Result, figure_data
from mechscope.core.torch_utils import evaluating


@dataclass(frozen=True)
class StageExamples(Result):
    stage: str
    layer: str
    top: torch.Tensor  # [C, k] test-image indices, most active first
    top_labels: torch.Tensor  # [C, k]
    positions: torch.Tensor  # [C, k, 2] (y, x) of the most active position
    boxes: torch.Tensor  # [C, k, 4] its receptive field (y0, y1, x0, x1) in the input
    images: torch.Tensor = figure_data()  # [C, k, C_in, H, W]
    input_x_gradient: torch.Tensor = figure_data()  # [C, k, H, W] summed over input channels


def unit_examples(model, spec, data, k: int = 8) -> tuple[StageExamples, ...]:
    net = spec.model
    layers = [s.hook_post for s in spec.stages]
    with evaluating(net):
        ex = FV.dataset_examples(net, data.x, layers, k=k)
        out = []
        for s in spec.stages:
            e = ex[s.hook_post]
            n_units, kk = e.top.shape
            idx = e.top.flatten()  # [U*k]
            xs = data.x[idx].clone().requires_grad_(True)
            unit = torch.arange(n_units).repeat_interleave(kk)
            py, px = e.positions[..., 0].flatten(), e.positions[..., 1].flatten()
            with torch.enable_grad():
                _, cache = run_with_cache(net, xs, names=[s.hook_post], grad=True)
                val = cache[s.hook_post][torch.arange(len(idx)), unit, py, px]  # each row's unit at its top position
                (g,) = torch.autograd.grad(val.sum(), xs)
            ixg = (xs.detach() * g).sum(1).view(n_units, kk, *data.x.shape[2:])
            h, w = data.x.shape[2:]
            boxes = torch.tensor(
                [[s.rf_post.box(int(y), int(x), h, w) for y, x in row] for row in e.positions.tolist()]
            )
            out.append(
                StageExamples(s.name, s.hook_post, e.top, data.y[e.top], e.positions, boxes,
                              data.x[e.top], ixg)
            )  # fmt: skip
    return tuple(out)
