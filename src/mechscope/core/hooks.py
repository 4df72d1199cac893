"""Named hook points: the one way mechscope reads or changes activations.

A model marks each activation worth looking at with a :class:`HookPoint`, an identity module.
Its name is its dotted module path (``conv2.hook_out``, ``blocks.5.attn.hook_pattern``), so the
names follow the model's structure and need no registry of their own.

Two entry points use them, and both always remove what they added, on success or on error:

* :func:`hooks` is a context manager that attaches forward hooks (read or replace an
  activation) and backward hooks (read or replace its gradient) for the duration of a block;
* :func:`run_with_cache` runs the model once and returns the activations asked for, and only
  those.

A hook function has the signature ``fn(tensor, hook) -> tensor | None``: ``hook`` is the
:class:`HookPoint` (``hook.name`` is its name); returning a tensor replaces the activation (or
the gradient), returning ``None`` leaves it as it was.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Union

import torch
from torch import nn

from mechscope.core.errors import HookError

HookFn = Callable[[torch.Tensor, "HookPoint"], torch.Tensor | None]
NameFilter = Union[str, Sequence[str], Callable[[str], bool], None]


class HookPoint(nn.Module):
    """An identity module that marks a named activation."""

    def __init__(self) -> None:
        super().__init__()
        self.name: str = ""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def extra_repr(self) -> str:
        return self.name


def hook_points(model: nn.Module) -> dict[str, HookPoint]:
    """All hook points of ``model`` by dotted name, in forward order of definition."""
    points: dict[str, HookPoint] = {}
    for name, module in model.named_modules():
        if isinstance(module, HookPoint):
            module.name = name
            points[name] = module
    return points


def describe_names(names: Iterable[str]) -> str:
    """A compact, readable list of hook names: per-layer names collapse to ``blocks.{0..11}.x``."""
    groups: dict[str, list[int]] = {}
    order: list[str] = []
    for name in names:
        m = re.search(r"\.(\d+)\.", name)
        key = name if m is None else name[: m.start()] + ".{L}." + name[m.end() :]
        if key not in groups:
            groups[key] = []
            order.append(key)
        if m is not None:
            groups[key].append(int(m.group(1)))
    parts = []
    for key in order:
        layers = groups[key]
        if layers:
            lo, hi = min(layers), max(layers)
            parts.append(key.replace("{L}", f"{{{lo}..{hi}}}" if hi > lo else str(lo)))
        else:
            parts.append(key)
    return ", ".join(parts)


def select(model: nn.Module, names: NameFilter) -> dict[str, HookPoint]:
    """The hook points named by ``names``: one name, a list of names, a predicate, or all (None).

    An unknown name raises :class:`HookError` listing the valid names.
    """
    points = hook_points(model)
    if names is None:
        return points
    if callable(names):
        return {n: p for n, p in points.items() if names(n)}
    if isinstance(names, str):
        names = [names]
    if not hasattr(names, "__iter__"):  # 5 was "'int' object is not iterable"
        raise HookError(f"names: a hook point's name, a list of them, a predicate or None, got {names!r}")
    chosen: dict[str, HookPoint] = {}
    for name in names:
        if not isinstance(name, str):
            raise HookError(f"a hook point is named by a string, got {name!r}")
        if name not in points:
            raise HookError(f"unknown hook point {name!r}; valid names: {describe_names(points)}")
        chosen[name] = points[name]
    return chosen


@contextmanager
def hooks(
    model: nn.Module,
    fwd: Iterable[tuple[str, HookFn]] = (),
    bwd: Iterable[tuple[str, HookFn]] = (),
) -> Iterator[nn.Module]:
    """Attach forward and backward hooks by name for the duration of a ``with`` block.

    ``fwd`` hooks see each activation as it is computed; ``bwd`` hooks see the gradient of the
    loss with respect to it. Every hook is removed when the block exits, however it exits, and a
    backward hook on a tensor that outlives the block stops acting when the block exits.
    """
    fwd, bwd = list(fwd), list(bwd)
    for pair in fwd + bwd:  # names without functions were "too many values to unpack"
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and isinstance(pair[0], str) and callable(pair[1])):
            raise HookError(f"each hook is a (name, function) pair, e.g. ('blocks.0.hook_resid_post', fn), got "
                            f"{pair!r}")  # fmt: skip
    # Resolve every name before attaching anything, so an unknown name attaches nothing.
    points = select(model, [n for n, _ in fwd] + [n for n, _ in bwd])
    handles: list[Any] = []
    active = [True]

    def forward_hook(fn: HookFn) -> Callable:
        def hook(module: HookPoint, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            return _returned(fn(output, module), output, module, "activation")

        return hook

    def backward_hook(fn: HookFn) -> Callable:
        def hook(module: HookPoint, args: tuple, output: torch.Tensor) -> None:
            if not output.requires_grad:
                return

            def on_grad(grad: torch.Tensor) -> torch.Tensor | None:
                return _returned(fn(grad, module), grad, module, "gradient") if active[0] else None

            output.register_hook(on_grad)

        return hook

    try:
        for name, fn in fwd:
            handles.append(points[name].register_forward_hook(forward_hook(fn)))
        for name, fn in bwd:
            handles.append(points[name].register_forward_hook(backward_hook(fn)))
        yield model
    finally:
        active[0] = False
        for handle in handles:
            handle.remove()


def _returned(out: Any, x: torch.Tensor, point: HookPoint, what: str) -> torch.Tensor | None:
    """A hook's return value when it can stand for ``x``: None (``x`` kept) or a tensor that broadcasts to ``x``'s
    shape (mechscope's own hooks give [P, D] for [1, P, D], or one row for a batch). Anything else raised deep
    inside the model: a string "no attribute 'shape'", a wrong width a matmul's error."""
    if out is None or (isinstance(out, torch.Tensor) and (out.shape == x.shape or _broadcasts(out.shape, x.shape))):
        return out
    got = f"shape {list(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
    raise HookError(
        f"the hook on {point.name or 'a hook point'} returned {got}; a hook returns None or a tensor of its {what}'s "
        f"shape, {list(x.shape)} (or one that broadcasts to it)"
    )


def _broadcasts(shape: torch.Size, to: torch.Size) -> bool:
    try:
        return torch.broadcast_shapes(shape, to) == to
    except RuntimeError:
        return False


def run_with_cache(
    model: nn.Module,
    *args: Any,
    names: NameFilter = None,
    grad: bool = False,
    **kwargs: Any,
) -> tuple[Any, dict[str, torch.Tensor]]:
    """Run ``model(*args, **kwargs)`` once; return its output and the activations named.

    Only the named activations are stored (``names=None`` stores every hook point). With
    ``grad=False`` (the default) the forward runs without autograd and the cache holds plain
    tensors; with ``grad=True`` the cached tensors stay in the graph.
    """
    points = select(model, names)
    named = names is not None and not callable(names)  # names the caller chose: each must fire
    cache: dict[str, torch.Tensor] = {}

    def store(x: torch.Tensor, hook: HookPoint) -> None:
        cache[hook.name] = x if grad else x.detach()

    with hooks(model, fwd=[(n, store) for n in points]), torch.set_grad_enabled(grad and torch.is_grad_enabled()):
        out = model(*args, **kwargs)
    silent = [n for n in points if n not in cache]
    if named and silent:  # only then a second pass with every hook point watched, to name the ones that fire
        alive = firing_hooks(model, *args, **kwargs)
        raise HookError(
            f"hook point {silent[0]!r} does not fire for this model (it exists but this model never computes it); "
            f"hooks that fire: {describe_names(alive)}"
        )
    return out, cache


def firing_hooks(model: nn.Module, *args: Any, **kwargs: Any) -> list[str]:
    """The hook points that fire in one forward pass ``model(*args, **kwargs)`` (a name is valid only if it
    fires: GPT-2 has ``attn.hook_rot_q`` modules but learned positions never call them)."""
    fired: list[str] = []

    def seen(x: torch.Tensor, hook: HookPoint) -> None:
        fired.append(hook.name)

    with hooks(model, fwd=[(n, seen) for n in hook_points(model)]), torch.no_grad():
        model(*args, **kwargs)
    return [n for n in hook_points(model) if n in set(fired)]


def attached_hooks(model: nn.Module) -> list[str]:
    """Names of modules that still carry a forward, pre-forward or backward hook (for tests)."""
    found = []
    for name, module in model.named_modules():
        if (
            module._forward_hooks
            or module._forward_pre_hooks
            or module._backward_hooks
            or getattr(module, "_backward_pre_hooks", None)
        ):
            found.append(name or "<root>")
    return found


@contextmanager
def module_hooks(
    model: nn.Module,
    types: tuple[type[nn.Module], ...],
    forward: Callable | None = None,
    backward: Callable | None = None,
) -> Iterator[list[nn.Module]]:
    """Attach hooks to every submodule of the given types for the duration of a block.

    For methods that change how a kind of module propagates gradients (guided backprop and
    DeepLIFT override ReLU and max-pooling): ``forward(module, args, output)`` is a forward
    hook and ``backward(module, grad_input, grad_output)`` a full backward hook. Yields the
    modules found; everything attached is removed when the block exits, however it exits.
    """
    modules = [m for m in model.modules() if isinstance(m, types)]
    handles: list[Any] = []
    try:
        for m in modules:
            if forward is not None:
                handles.append(m.register_forward_hook(forward))
            if backward is not None:
                handles.append(m.register_full_backward_hook(backward))
        yield modules
    finally:
        for handle in handles:
            handle.remove()
