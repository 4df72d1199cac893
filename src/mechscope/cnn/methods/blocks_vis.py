"""Feature visualisation for Building Blocks: activation vectors, group directions and channels in one batch.

Every image of the batch has its own objective (built on :mod:`mechscope.cnn.methods.featvis`: its
parameterisation, transforms and loop):

* ``("centre", hook, v)`` — an activation vector v of one grid cell: dot · max(cos, 0.1)² of
  the activation at the layer's centre position with v (Lucid's ``direction_neuron`` with
  ``cossim_pow=2``); the figure shows the centre position's receptive field;
* ``("mean", hook, v)`` — a group direction: the same quantity averaged over every position;
* ``("channel", hook, c)`` — a channel: its mean over positions (as ``cnn visualize`` does).

Channel visualisations of ``cnn visualize`` are reused when its ``channel_images.npz`` was made
from the same weights (SHA-256 of the state dict, :func:`~mechscope.core.outputs.weights_hash`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mechscope.cnn.methods import featvis as FV
from mechscope.cnn.models.hooked import apply_layer
from mechscope.core.hooks import hook_points
from mechscope.core.outputs import weights_hash
from mechscope.core.torch_utils import evaluating

COSSIM_POW = 2.0
CHANNEL_IMAGES = "channel_images.npz"


def _dot_cos(act: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """dot · max(cos, 0.1)^COSSIM_POW over the channel axis: act [B, C, ...], v [B, C]."""
    shape = (v.shape[0], v.shape[1]) + (1,) * (act.dim() - 2)
    v = v.view(shape)
    dot = (act * v).sum(1)
    cos = dot / (act.norm(dim=1) * v.norm(dim=1) + 1e-6)
    return dot * cos.clamp(min=0.1) ** COSSIM_POW


def blocks_objective(entries: list[tuple[str, str, object]]) -> FV.Objective:
    """One objective value per image, image i for ``entries[i]`` (see the module docstring)."""
    keys = sorted({(kind, hook) for kind, hook, _ in entries})
    rows = {key: torch.tensor([i for i, e in enumerate(entries) if e[:2] == key]) for key in keys}
    targets = {}
    for key in keys:
        items = [e[2] for e in entries if e[:2] == key]
        targets[key] = torch.tensor(items) if key[0] == "channel" else torch.stack([torch.as_tensor(x) for x in items])

    def fn(a):
        out = torch.zeros(len(entries), dtype=next(iter(a.values())).dtype)
        for (kind, hook), idx in rows.items():
            act = a[hook][idx]
            t = targets[(kind, hook)].to(act)
            if kind == "channel":
                value = FV.unit_value(hook, act, t.long())
            elif kind == "centre":
                value = _dot_cos(act[:, :, act.shape[2] // 2, act.shape[3] // 2], t)
            else:
                value = _dot_cos(act, t).flatten(1).mean(1)
            out = out.index_put((idx,), value)
        return out

    return FV.Objective(fn, {hook for _, hook in keys}, f"{len(entries)} building blocks")


class Truncated(nn.Module):
    """The network of ``spec`` up to hook point ``stop``, with the same hook names (the same HookPoint objects).

    Registers nothing but the hook points: the layers run from a plain list, so the caller keeps the model in
    eval mode. Optimising for an early stage then skips the later ones.
    """

    def __init__(self, spec, stop: str) -> None:
        super().__init__()
        names = [name for name, _ in spec.plan]
        steps = spec.plan[: names.index(stop) + 1]
        self.steps = list(steps)
        self.input_shape = spec.input_shape
        for name, point in hook_points(spec.model).items():
            if name not in dict(steps):
                continue
            parent, *path, leaf = [self, *name.split(".")]
            for part in path:
                if not hasattr(parent, part):
                    parent.add_module(part, nn.Module())
                parent = getattr(parent, part)
            parent.add_module(leaf, point)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _, module in self.steps:
            x = apply_layer(module, x)
        return x


def render_entries(net, entries, steps: int, seed: int, vrange, param: str = "fourier") -> torch.Tensor:
    """Images [len(entries), C, H, W] in ``vrange``, one optimisation for all (total variation weight 1)."""
    if not entries:
        return torch.zeros(0, *net.input_shape)
    obj = blocks_objective(entries) - FV.total_variation() * 1.0
    return FV.render(net, obj, len(entries), steps, param, seed=seed, value_range=vrange).images


def distinct(vectors: torch.Tensor, rel: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices of the distinct rows, ascending; each row's position among them). Rows equal to within ``rel``
    of the largest norm (a plain background gives the same vector at every position) are visualised once."""
    scale = float(vectors.norm(dim=1).max()) * rel or 1.0
    _, inverse = torch.unique(torch.round(vectors / scale), dim=0, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,), len(vectors), dtype=torch.long)
    first = first.scatter_reduce(0, inverse, torch.arange(len(vectors)), reduce="amin")
    order = first.sort().values
    return order, torch.searchsorted(order, first)[inverse]


def save_channel_images(path: Path, sha: str, images: dict[str, torch.Tensor]) -> None:
    """``images``: hook name → [C, C_in, H, W] channel visualisations made from weights ``sha``."""
    meta = json.dumps({"weights_sha256": sha, "layers": list(images)})
    np.savez_compressed(path, meta=np.array(meta), **{f"l{i}": v.numpy() for i, v in enumerate(images.values())})


def load_channel_images(path: Path, sha: str, wanted: dict[str, int]) -> dict[str, torch.Tensor] | None:
    """The saved channel images of the hooks in ``wanted`` (hook → channel count) if made from weights ``sha``."""
    if not Path(path).is_file():
        return None
    try:
        with np.load(path) as z:
            meta = json.loads(str(z["meta"]))
            if meta.get("weights_sha256") != sha:
                return None
            saved = {hook: z[f"l{i}"] for i, hook in enumerate(meta["layers"])}
    except (OSError, ValueError, KeyError, json.JSONDecodeError):
        return None
    if any(hook not in saved or len(saved[hook]) != n for hook, n in wanted.items()):
        return None
    return {hook: torch.as_tensor(saved[hook]) for hook in wanted}


def visualise_blocks(spec, layers, steps: int, seed: int, vrange, channels: dict | None = None,
                     min_norm: float = 1e-3) -> dict:  # fmt: skip
    """Every cell vector (``cells``), group direction (``groups``) and, unless given, channel (``channels``).

    Returns {"cells": {stage: [shown, cells, C_in, h, w] crops, zeros for a cell of norm at most ``min_norm`` of
    the layer's largest}, "groups": {stage: [k, C_in, H, W]}, "channels": {stage: [C, C_in, H, W]}}. One
    optimisation per stage, through the network up to that stage only; equal cell vectors visualised once.
    """
    out: dict = {"cells": {}, "groups": {}, "channels": dict(channels or {})}
    with evaluating(spec.model):
        for lb in layers:
            stage = spec.stage(lb.stage)
            flat = lb.cells.reshape(-1, lb.cells.shape[-1])
            norms = flat.norm(dim=1)
            live = (norms > min_norm * float(norms.max())).nonzero().flatten() if len(norms) else norms.long()
            first, back = distinct(flat[live]) if len(live) else (live, live)
            entries = [("centre", lb.hook, flat[live[i]]) for i in first.tolist()]
            n_cells = len(entries)
            entries += [("mean", lb.hook, torch.as_tensor(d, dtype=torch.float32)) for d in lb.groups.directions]
            if channels is None:
                entries += [("channel", stage.hook_post, c) for c in range(lb.shape[0])]
            images = render_entries(Truncated(spec, stage.hook_out), entries, steps, seed, vrange)
            crops = images[:n_cells, :, lb.crop[0] : lb.crop[1], lb.crop[2] : lb.crop[3]]
            cells = torch.zeros(len(flat), *crops.shape[1:])
            cells[live] = crops[back]
            out["cells"][lb.stage] = cells.view(*lb.cells.shape[:2], *crops.shape[1:])
            out["groups"][lb.stage] = images[n_cells : n_cells + lb.groups.k]
            if channels is None:
                out["channels"][lb.stage] = images[n_cells + lb.groups.k :]
    return out


def save_for_blocks(out: Path, model, spec, assign: list[tuple[str, int]], images: torch.Tensor) -> None:
    """Called by ``cnn visualize``: its maximising images of every stage whose channels were all visualised
    (at hook_post), saved as ``channel_images.npz`` with the weights' hash for ``cnn blocks`` to reuse."""
    full = {}
    for s in spec.stages:
        rows = {u: i for i, (layer, u) in enumerate(assign) if layer == s.hook_post}
        if set(rows) == set(range(s.out_channels)):
            full[s.hook_post] = images[[rows[c] for c in range(s.out_channels)]].detach()
    if full:
        save_channel_images(out / CHANNEL_IMAGES, weights_hash(model), full)
