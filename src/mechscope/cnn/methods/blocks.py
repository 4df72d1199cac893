"""Building Blocks for a CNN (Olah et al. 2018, "The Building Blocks of Interpretability", Distill).

For chosen test images and every conv stage (at its output, ``hook_out``):

* the **activation grid**: each spatial cell's activation vector (cells averaged into a grid of
  at most ``max_side`` × ``max_side`` when the map is larger), feature-visualised (see
  :mod:`mechscope.cnn.methods.blocks_vis`) and cropped to the receptive field of the position it is
  optimised at;
* the **semantic dictionary**: each cell's strongest channels, to be shown as their channel
  visualisations;
* **neuron groups**: NMF of the stage's activations, positions × channels, of all the chosen
  images (:mod:`mechscope.cnn.methods.nmf_groups`); per group its direction's visualisation, its map
  on each image and its top test images (the largest projection max_p ⟨a⁺[:, p], d_g⟩ over
  positions p, d_g the unit direction);
* **attribution** group → group of adjacent stages and last stage → class
  (:mod:`mechscope.cnn.methods.group_attribution`).

Image choice: ``--image I`` one test image; ``--typical K`` the K most typical test images of
each class: those the model classifies correctly with the highest softmax probability of their
class (the most typical of each class gets the grid and dictionary; all of them feed NMF and
the attribution averages).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from mechscope.cnn.methods.group_attribution import GroupFlow, average_flows, components, flows_for_image
from mechscope.cnn.methods.nmf_groups import NMFGroups, nmf_groups
from mechscope.core.errors import MechscopeError
from mechscope.core.hooks import run_with_cache
from mechscope.core.results import Result, figure_data
from mechscope.core.torch_utils import evaluating
from mechscope.core.validate import check_finite


@dataclass(frozen=True)
class Selection(Result):
    images: tuple[int, ...]  # test indices analysed
    shown: tuple[int, ...]  # those with an activation grid and dictionary
    labels: tuple[int, ...]
    predictions: tuple[int, ...]
    probabilities: tuple[float, ...]  # softmax probability of the true class
    how: str


@dataclass(frozen=True)
class LayerBlocks(Result):
    stage: str
    hook: str
    shape: tuple[int, int, int]  # [C, H, W] of the stage output
    grid: tuple[int, int]  # cells of the activation grid
    groups: NMFGroups
    top_channels: np.ndarray  # [shown, cells, n_top] strongest channels per cell
    top_values: np.ndarray  # [shown, cells, n_top] their activations
    cell_norms: np.ndarray  # [shown, cells] ‖activation vector‖
    example_images: np.ndarray  # [k, n_examples] test indices projecting most on each group
    example_values: np.ndarray  # [k, n_examples]
    example_boxes: np.ndarray  # [k, n_examples, 4] receptive field (y0, y1, x0, x1) of the best position
    crop: tuple[int, int, int, int]  # the centre position's receptive field: what a grid cell shows
    acts: torch.Tensor = figure_data()  # [n_images, C, H, W]
    cells: torch.Tensor = figure_data()  # [shown, cells, C] activation vectors of the grid


def select_images(spec, x: torch.Tensor, labels: torch.Tensor, image: int | None, typical: int | None) -> Selection:
    """The test images to analyse (see the module docstring); one forward pass over ``x`` for ``typical``."""
    n = len(labels)
    if typical is None:
        i = 0 if image is None else image
        if not 0 <= i < n:
            raise MechscopeError(f"--image {i} out of range: the test set has {n} images (0..{n - 1})")
    elif image is not None:
        raise MechscopeError("--image and --typical exclude each other")
    rows = torch.arange(n) if typical is not None else torch.tensor([i])
    logits, _ = stage_activations(spec, x[rows])
    prob = torch.full((n,), float("nan"))
    pred = torch.full((n,), -1, dtype=torch.long)
    prob[rows] = torch.softmax(logits, 1)[torch.arange(len(rows)), labels[rows]]
    pred[rows] = logits.argmax(1)
    n_classes = spec.n_classes
    if typical is None:
        idx, shown, how = [i], [i], f"test image {i}"
    else:
        idx, shown = [], []
        for c in range(n_classes):
            ok = ((labels == c) & (pred == c)).nonzero().flatten()
            if len(ok) < typical:
                raise MechscopeError(f"--typical {typical}: class {c} has only {len(ok)} correctly classified images")
            best = ok[prob[ok].argsort(descending=True, stable=True)[:typical]].tolist()
            idx += best
            shown.append(best[0])
        how = (f"the {typical} most typical test images of each class (correctly classified, highest softmax "
               "probability of their class)")  # fmt: skip
    return Selection(tuple(idx), tuple(shown), tuple(int(labels[i]) for i in idx), tuple(int(pred[i]) for i in idx),
                     tuple(float(prob[i]) for i in idx), how)  # fmt: skip


def check_groups(spec, n_images: int, groups: int | None) -> None:
    """--groups against every stage before any work: 1 ≤ K ≤ min(positions, channels)."""
    if groups is None:
        return
    if groups < 1:
        raise MechscopeError(f"--groups must be at least 1, got {groups}")
    for s in spec.stages:
        c, h, w = s.shape_out
        if groups > min(c, n_images * h * w):
            raise MechscopeError(
                f"--groups {groups}: stage {s.name} has only {c} channels and {n_images * h * w} positions; "
                f"at most {min(c, n_images * h * w)} groups"
            )


def grid_cells(act: torch.Tensor, max_side: int) -> torch.Tensor:
    """[C, H, W] → cell vectors [gh·gw, C], averaged into at most max_side × max_side cells."""
    c, h, w = act.shape
    if h > max_side or w > max_side:
        act = F.adaptive_avg_pool2d(act[None], (min(h, max_side), min(w, max_side)))[0]
    return act.flatten(1).T


def group_examples(spec, x_test: torch.Tensor, directions: dict[str, np.ndarray], k: int = 6,
                   batch: int = 1000) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:  # fmt: skip
    """Per stage: (top test indices [G, k], values [G, k], best positions [G, k, 2]) by max projection."""
    hooks = {spec.stage(name).hook_out: name for name in directions}
    d = {name: torch.as_tensor(v, dtype=torch.float32) for name, v in directions.items()}
    vals: dict[str, list] = {n: [] for n in directions}
    where: dict[str, list] = {n: [] for n in directions}
    with evaluating(spec.model), torch.no_grad():
        for s in range(0, len(x_test), batch):
            _, cache = run_with_cache(spec.model, x_test[s : s + batch], names=list(hooks))
            for hook, name in hooks.items():
                a = cache[hook].clamp(min=0)
                proj = torch.einsum("bchw,gc->bghw", a, d[name]).flatten(2)  # [B, G, H·W]
                v, i = proj.max(2)
                vals[name].append(v)
                where[name].append(torch.stack([i // a.shape[3], i % a.shape[3]], -1))
    out = {}
    for name in directions:
        v, w = torch.cat(vals[name]).T, torch.cat(where[name]).transpose(0, 1)  # [G, N], [G, N, 2]
        top_v, top_i = v.topk(min(k, v.shape[1]), dim=1)
        out[name] = (top_i, top_v, w.gather(1, top_i[..., None].expand(-1, -1, 2)))
    return out


def analyse_layer(spec, stage, acts: torch.Tensor, shown: list[int], groups: int | None, threshold: float,
                  seed: int, max_side: int, n_top: int) -> LayerBlocks:  # fmt: skip
    """NMF and the activation grid of one stage; ``acts`` [n_images, C, H, W]; ``shown``: rows with a grid."""
    c, h, w = acts.shape[1:]
    flat = acts.permute(0, 2, 3, 1).reshape(-1, c).numpy()  # [n·H·W, C]: positions × channels
    found = nmf_groups(flat, stage.hook_out, groups, threshold, seed)
    cells = torch.stack([grid_cells(acts[i], max_side) for i in shown])  # [shown, cells, C]
    nt = min(n_top, c)
    top_v, top_c = cells.topk(nt, dim=2)
    gh, gw = (min(h, max_side), min(w, max_side)) if (h > max_side or w > max_side) else (h, w)
    crop = stage.rf_out.box(h // 2, w // 2, *spec.input_shape[1:])
    empty = np.zeros((found.k, 0))
    return LayerBlocks(
        stage=stage.name, hook=stage.hook_out, shape=(c, h, w), grid=(gh, gw), groups=found,
        top_channels=top_c.numpy(), top_values=top_v.numpy(), cell_norms=cells.norm(dim=2).numpy(),
        example_images=empty.astype(int), example_values=empty, example_boxes=np.zeros((found.k, 0, 4), int),
        crop=crop, acts=acts, cells=cells,
    )  # fmt: skip


def attach_examples(spec, layers: list[LayerBlocks], x_test: torch.Tensor, k: int = 6) -> list[LayerBlocks]:
    """Each layer with its groups' top test images (one pass over ``x_test`` for every stage)."""
    from dataclasses import replace

    found = group_examples(spec, x_test, {lb.stage: lb.groups.directions for lb in layers}, k)
    out = []
    for lb in layers:
        top_i, top_v, pos = found[lb.stage]
        rf = spec.stage(lb.stage).rf_out
        boxes = np.array([[rf.box(int(y), int(x), *spec.input_shape[1:]) for y, x in row] for row in pos.tolist()])
        out.append(replace(lb, example_images=top_i.numpy(), example_values=top_v.numpy(), example_boxes=boxes))
    return out


def image_flows(spec, layers: list[LayerBlocks], sel: Selection, class_names) -> list[GroupFlow]:
    """Attribution flows per analysed image, averaged (see :func:`average_flows`); group scores divided by
    ‖V'_h‖² averaged over the images."""
    per_comps = []
    for i in range(len(sel.images)):
        comps = {}
        for lb in layers:
            _, h, w = lb.shape
            comps[lb.stage] = components(lb.groups.spatial[i * h * w : (i + 1) * h * w], lb.groups.directions, lb.shape)
        per_comps.append(comps)
    norms = {lb.stage: torch.stack([c[lb.stage].flatten(1).pow(2).sum(1) for c in per_comps]).mean(0)
             for lb in layers}  # fmt: skip
    per_image = [flows_for_image(spec, {lb.stage: lb.acts[i] for lb in layers}, comps, tuple(class_names), norms)
                 for i, comps in enumerate(per_comps)]  # fmt: skip
    return average_flows(per_image, list(sel.labels))


def stage_activations(spec, x: torch.Tensor, batch: int = 1000) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(logits, stage name → hook_out activations) of ``x``, in eval mode, ``batch`` images at a time."""
    logits, acts = [], {s.name: [] for s in spec.stages}
    with evaluating(spec.model), torch.no_grad():
        for i in range(0, len(x), batch):
            lo, cache = run_with_cache(spec.model, x[i : i + batch], names=[s.hook_out for s in spec.stages])
            logits.append(lo)
            for s in spec.stages:
                check_finite(cache[s.hook_out], f"{s.name}'s activations on the test images")
                acts[s.name].append(cache[s.hook_out])
    return torch.cat(logits), {name: torch.cat(v) for name, v in acts.items()}


@dataclass(frozen=True)
class BlocksResult(Result):
    """Everything ``cnn blocks`` measured; ``to_dict()`` is blocks.json. The images are figure data (the report
    draws them); ``summary`` holds the report's sentences."""

    SCHEMA = "mechscope.blocks/3"
    FILE = "blocks.json"

    selection: Selection
    layers: tuple[LayerBlocks, ...]
    flows: tuple[GroupFlow, ...]
    class_names: tuple[str, ...]
    settings: dict
    channel_source: str  # where the channel visualisations came from
    seconds: dict = field(default_factory=dict)
    summary: tuple[str, ...] = ()
    work: dict | None = None  # forward and backward passes, in passes over the test images (WorkCounter)
    images: dict = figure_data()  # from blocks_vis.visualise_blocks: cells, groups, channels
    inputs: torch.Tensor = figure_data()  # [n_images, C, H, W] the analysed test images

    @property
    def weights_sha256(self) -> str | None:
        """The weights hash of the model analysed (:func:`~mechscope.core.outputs.weights_hash`)."""
        return self.settings.get("weights_sha256")
