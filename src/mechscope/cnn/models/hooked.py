"""A user's conv stack seen with mechscope's hook points, without changing it (see :mod:`mechscope.cnn.models.spec`).

:func:`wrap` builds the plan of a :class:`HookedCNN`: the model's layers in order with hook
points between them; :func:`check_replay` checks that the plan gives the model's own outputs;
:func:`probe_shapes` runs a plan on a zero image and records every step's shapes.
"""

from __future__ import annotations

import torch
from torch import nn

from mechscope.cnn.models.cnn import check_image_input
from mechscope.core.errors import MechscopeError
from mechscope.core.hooks import HookPoint
from mechscope.core.torch_utils import evaluating


def apply_layer(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(module, nn.Linear) and x.dim() > 2:
        x = x.flatten(1)  # a forward that flattens with view() or torch.flatten
    return module(x)


def probe_shapes(plan: tuple, shape: tuple) -> dict[str, tuple]:
    """Output shape (per image) after every step of ``plan`` on a zero image, and each step's input shape."""
    shapes: dict[str, tuple] = {}
    x = torch.zeros(2, *shape)
    module = None
    try:
        with evaluating(*[m for _, m in plan]), torch.no_grad():
            for name, module in plan:
                shapes[f"{name}:in"] = tuple(x.shape[1:])
                x = apply_layer(module, x)
                shapes[name] = tuple(x.shape[1:])
    except RuntimeError as e:
        where = next(n for n, m in plan if m is module)
        raise MechscopeError(
            f"images of {shape[1]}×{shape[2]} do not fit the network: {where} "
            f"({type(module).__name__}) fails on {list(shapes[f'{where}:in'])} ({str(e).splitlines()[0]})"
        ) from None
    return shapes


def hook_positions(layers: list) -> tuple[int, int, int]:
    """Indices in a stage's layers *before which* hook_pre, hook_post and hook_out go."""
    kinds = [layer.kind for layer in layers]
    i_act = kinds.index("act") if "act" in kinds else None
    i_pool = kinds.index("pool", (i_act or 0)) if "pool" in kinds[(i_act or 0) :] else None
    if i_act is not None:
        pre, post = i_act, i_act + 1
    else:
        pre = post = i_pool if i_pool is not None else len(layers)
    out = i_pool + 1 if i_pool is not None else len(layers)
    return pre, post, max(out, post)


class _StageHooks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hook_pre, self.hook_post, self.hook_out = HookPoint(), HookPoint(), HookPoint()


class HookedCNN(nn.Module):
    """A user's conv stack seen with mechscope's hook points; holds the model, changes nothing in it.

    The forward replays the model's layers in order (``steps``) with hook points between them;
    :func:`walk` checks that it gives the model's own outputs.
    """

    def __init__(self, net: nn.Module, n_stages: int, input_shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.net = net
        self.input_shape = input_shape
        self.hook_input = HookPoint()
        for i in range(1, n_stages + 1):
            self.add_module(f"conv{i}", _StageHooks())
        self.hook_logits = HookPoint()
        self.steps: list[tuple[str, nn.Module]] = []  # filled by _wrap; not registered twice
        for name, m in self.named_modules():  # the view starts in the model's mode, without changing the model
            if name != "net" and not name.startswith("net."):
                m.training = net.training

    def check_input(self, x: torch.Tensor) -> None:
        check_image_input(x, self.input_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _, module in self.steps:
            x = apply_layer(module, x)
        return x


def wrap(model, pre, stage_layers, readout_layers, shape) -> tuple[HookedCNN, list]:
    hooked = HookedCNN(model, len(stage_layers), shape)
    plan: list[tuple[str, nn.Module]] = [("hook_input", hooked.hook_input)]
    plan += [(layer.path, layer.module) for layer in pre]
    for i, sl in enumerate(stage_layers, 1):
        hooks = getattr(hooked, f"conv{i}")
        at = dict(zip(("pre", "post", "out"), hook_positions(sl), strict=True))
        for j in range(len(sl) + 1):
            for h in ("pre", "post", "out"):
                if at[h] == j:
                    plan.append((f"conv{i}.hook_{h}", getattr(hooks, f"hook_{h}")))
            if j < len(sl):
                plan.append((sl[j].path, sl[j].module))
    plan += [(layer.path, layer.module) for layer in readout_layers]
    plan.append(("hook_logits", hooked.hook_logits))
    hooked.steps = plan
    return hooked, plan


def check_replay(model: nn.Module, spec, readable: str) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, *spec.input_shape, generator=g)
    with evaluating(model), torch.no_grad():
        ours, theirs = spec.model(x), model(x)
    if not isinstance(theirs, torch.Tensor) or theirs.shape != ours.shape:
        raise MechscopeError(
            f"the model returns {getattr(theirs, 'shape', type(theirs).__name__)}; its layers in order give "
            f"{list(ours.shape)}: mechscope reads models whose forward applies their layers in order"
        )
    scale = float(theirs.abs().max()) or 1.0
    gap = float((ours - theirs).abs().max())
    if gap > 1e-4 * scale:
        raise MechscopeError(
            f"the model's forward is not its layers applied in order (they differ by {gap:.3g}); mechscope reads "
            f"{readable} applied in the order forward calls them (functional calls such as F.relu in forward are "
            "invisible to it)"
        )
