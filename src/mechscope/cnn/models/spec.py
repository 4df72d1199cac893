"""The spec of a conv stack: its stages, read-out and receptive fields, walked from the module tree.

:func:`walk` turns a model into a :class:`CNNSpec`, the one description every CNN analysis
works from (as TransformerLens' config drives its transformer analyses). It reads the model's
leaf modules in the order its forward calls them (traced once on blank images; a layer without weights may be
called more than once, as one ``nn.ReLU`` after every convolution is; a layer never called is left out):

* ``Conv2d`` starts a **stage**; the norms (``BatchNorm2d``...), activation and pooling that
  follow it belong to it, until the next ``Conv2d`` or the read-out;
* ``Flatten`` or the first ``Linear`` starts the **read-out** (``Linear``, activations, dropout).
  It is *linear* when it is one ``Linear`` after the flatten: then the logits are a closed-form
  function of the last stage's output and ablations there need no forward passes.

Every stage ``conv{i}`` has three hook points: ``hook_pre`` (the activation's input, after any
norm), ``hook_post`` (after the activation) and ``hook_out`` (after the pooling; the same values
as ``hook_post`` without one), plus ``hook_input`` and ``hook_logits``. mechscope's own
:class:`~mechscope.cnn.models.cnn.CNN` carries them as modules. A user's model (an ``nn.Sequential``
or an ordinary module with these children) is not changed: :class:`HookedCNN` is a view that
holds it, replays its layers in order with hook points between them, and is checked to give the
model's own outputs. Hooks are only ever attached through :mod:`mechscope.core.hooks`, so they are
temporary as always.

Receptive fields (Araujo, Norris & Sim 2019, "Computing receptive fields of convolutional
neural networks", Distill): through a layer of kernel k, stride s, padding p and dilation d,
with k' = d(k − 1) + 1, the field of one position grows to size + (k' − 1)·jump, the step
between neighbouring positions becomes jump·s, and the first window starts p·jump pixels
earlier. A layer the walk cannot read is an error naming its module path and type.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

from mechscope.cnn.models.cnn import CNN, ChannelNorm, Normalize, SoLU
from mechscope.cnn.models.hooked import apply_layer, check_replay, hook_positions, probe_shapes, wrap
from mechscope.core.errors import MechscopeError
from mechscope.core.hooks import HookPoint, module_hooks
from mechscope.core.torch_utils import evaluating

CONV = (nn.Conv2d,)
NORM = (nn.BatchNorm2d, nn.GroupNorm, nn.InstanceNorm2d, ChannelNorm)
ACT = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.Softplus,
    nn.Mish, nn.Hardswish, SoLU, nn.Softmax, nn.LogSoftmax,
)  # fmt: skip
POOL = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
IDENTITY = (nn.Identity, nn.Dropout, nn.Dropout2d)
KINDS: tuple[tuple[str, tuple[type, ...]], ...] = (
    ("hook", (HookPoint,)),
    ("input", (Normalize,)),
    ("conv", CONV),
    ("norm", NORM),
    ("act", ACT),
    ("pool", POOL),
    ("identity", IDENTITY),
    ("flatten", (nn.Flatten,)),
    ("linear", (nn.Linear,)),
    ("norm1d", (nn.BatchNorm1d,)),
)
READABLE = "Conv2d, BatchNorm2d, activations, MaxPool2d/AvgPool2d, Dropout, Flatten and Linear"


def kind_of(module: nn.Module) -> str | None:
    for kind, types in KINDS:
        if isinstance(module, types):
            return kind
    return None


@dataclass(frozen=True)
class Layer:
    path: str  # module path in the model the user gave (``conv1.conv``, ``features.3``)
    kind: str
    module: nn.Module = field(repr=False, compare=False)

    @property
    def type(self) -> str:
        return type(self.module).__name__


@dataclass(frozen=True)
class ReceptiveField:
    """Input pixels seen by one position: (rows, cols) ``size``, ``jump`` between positions, ``start`` of position 0."""

    size: tuple[int, int] = (1, 1)
    jump: tuple[int, int] = (1, 1)
    start: tuple[int, int] = (0, 0)

    def box(self, y: int, x: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(y0, y1, x0, x1) of position (y, x) in the input, clipped to the image."""
        y0 = self.start[0] + y * self.jump[0]
        x0 = self.start[1] + x * self.jump[1]
        return (max(y0, 0), min(y0 + self.size[0], height), max(x0, 0), min(x0 + self.size[1], width))

    def through(self, kernel, stride, padding, dilation=(1, 1)) -> ReceptiveField:
        size, jump, start = [], [], []
        for a in range(2):
            k_eff = dilation[a] * (kernel[a] - 1) + 1
            size.append(self.size[a] + (k_eff - 1) * self.jump[a])
            start.append(self.start[a] - padding[a] * self.jump[a])
            jump.append(self.jump[a] * stride[a])
        return ReceptiveField(tuple(size), tuple(jump), tuple(start))

    def to_dict(self) -> dict:
        return {"size": list(self.size), "jump": list(self.jump), "start": list(self.start)}


@dataclass(frozen=True)
class Stage:
    name: str  # conv1, conv2, ...: the prefix of its hook names
    index: int
    layers: tuple[Layer, ...]
    in_channels: int
    out_channels: int
    shape_post: tuple[int, int, int]  # [C, H, W] at hook_pre / hook_post
    shape_out: tuple[int, int, int]  # [C, H, W] at hook_out
    rf_post: ReceptiveField
    rf_out: ReceptiveField

    @property
    def hook_pre(self) -> str:
        return f"{self.name}.hook_pre"

    @property
    def hook_post(self) -> str:
        return f"{self.name}.hook_post"

    @property
    def hook_out(self) -> str:
        return f"{self.name}.hook_out"

    def first(self, kind: str) -> Layer | None:
        return next((layer for layer in self.layers if layer.kind == kind), None)

    @property
    def conv(self) -> nn.Conv2d:
        return self.layers[0].module

    def describe(self) -> str:
        """``Conv2d 1→16 5×5, ReLU, MaxPool2d 2×2``."""
        c = self.conv
        parts = [f"Conv2d {c.in_channels}→{c.out_channels} {'×'.join(map(str, c.kernel_size))}"]
        for layer in self.layers[1:]:
            k = getattr(layer.module, "kernel_size", None)
            if layer.kind == "pool" and k is not None:
                k = k if isinstance(k, tuple) else (k, k)
                parts.append(f"{layer.type} {'×'.join(map(str, k))}")
            elif layer.kind != "identity":
                parts.append(layer.type)
        return ", ".join(parts)


@dataclass(frozen=True)
class Readout:
    layers: tuple[Layer, ...]  # after the last stage's hook_out: any leftover stage layers, flatten, linears
    in_shape: tuple[int, int, int]  # [C, H, W] of the last stage's output
    linear: bool  # exactly one Linear after the flatten: logits = W · flatten(out) + b

    @property
    def fc(self) -> nn.Linear:
        return [layer for layer in self.layers if layer.kind == "linear"][-1].module

    @property
    def hidden(self) -> int | None:
        linears = [layer.module for layer in self.layers if layer.kind == "linear"]
        return linears[0].out_features if len(linears) > 1 else None


@dataclass(frozen=True)
class CNNSpec:
    """What every CNN analysis needs to know about a model (see the module docstring)."""

    model: nn.Module = field(repr=False)  # the model with hook points: the user's own CNN or a HookedCNN view
    source: str  # "mechscope" (our CNN) or "wrapped" (a user's module, seen through HookedCNN)
    input_shape: tuple[int, int, int]
    n_classes: int
    stages: tuple[Stage, ...]
    readout: Readout
    plan: tuple[tuple[str, nn.Module], ...] = field(repr=False)  # (hook name or module path, module) in order

    @property
    def stage_names(self) -> list[str]:
        return [s.name for s in self.stages]

    @property
    def last(self) -> Stage:
        return self.stages[-1]

    def stage(self, name: str) -> Stage:
        """A stage by name (``conv2``), one of its hook names, or its number (``2``)."""
        key = str(name).split(".")[0]
        if key.isdigit():
            key = f"conv{key}"
        for s in self.stages:
            if s.name == key:
                return s
        raise MechscopeError(f"unknown layer {name!r}; the stages are {', '.join(self.stage_names)}")

    def hook_names(self) -> list[str]:
        return [name for name, m in self.plan if isinstance(m, HookPoint)]

    def work_counter(self):
        """A :class:`~mechscope.core.torch_utils.WorkCounter` over the stages' convolutions, counting images."""
        from mechscope.core.torch_utils import WorkCounter

        return WorkCounter([s.conv for s in self.stages], "images")

    def run_from(self, hook: str, x: torch.Tensor, inclusive: bool = False) -> torch.Tensor:
        """The rest of the forward pass from hook point ``hook`` given its activation ``x``.

        ``inclusive`` runs the hook point itself first, so that hooks attached to it act on ``x``.
        """
        names = [name for name, _ in self.plan]
        if hook not in names:
            raise MechscopeError(f"unknown hook point {hook!r}; valid names: {', '.join(self.hook_names())}")
        for _, module in self.plan[names.index(hook) + (0 if inclusive else 1) :]:
            x = apply_layer(module, x)
        return x

    def parameter_groups(self) -> list[tuple[str, list[str]]]:
        """(label, module paths in ``self.model``) of each parameterised layer, read-out first (top-down)."""
        prefix = "net." if self.source == "wrapped" else ""
        linears = [layer for layer in self.readout.layers if layer.kind == "linear"]
        groups = [(layer.path, [prefix + layer.path]) for layer in reversed(linears)]
        for s in reversed(self.stages):
            paths = [prefix + layer.path for layer in s.layers if any(True for _ in layer.module.parameters())]
            groups.append((s.name, paths))
        return groups

    def architecture(self) -> list[dict]:
        """Rows of the architecture table: layer, output shape, parameters, hook."""
        c, h, w = self.input_shape
        rows = [{"layer": "input", "shape": [c, h, w], "parameters": 0, "hook": "hook_input", "modules": []}]
        for s in self.stages:
            n = sum(p.numel() for layer in s.layers for p in layer.module.parameters())
            paths = [layer.path for layer in s.layers]
            rows.append(
                {"layer": f"{s.name}: {s.describe()}", "shape": list(s.shape_out), "parameters": n,
                 "hook": s.hook_out, "modules": paths}
            )  # fmt: skip
        ro = self.readout
        linears = [layer.module for layer in ro.layers if layer.kind == "linear"]
        text = " → ".join(f"{m.in_features}→{m.out_features}" for m in linears)
        rows.append(
            {"layer": f"read-out: Linear {text}" + ("" if ro.linear else " (non-linear)"),
             "shape": [self.n_classes], "parameters": sum(p.numel() for m in linears for p in m.parameters()),
             "hook": "hook_logits", "modules": [layer.path for layer in ro.layers]}
        )  # fmt: skip
        return rows

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "input_shape": list(self.input_shape),
            "n_classes": self.n_classes,
            "stages": [
                {
                    "name": s.name,
                    "hooks": [s.hook_pre, s.hook_post, s.hook_out],
                    "modules": {layer.path: layer.type for layer in s.layers},
                    "shape_post": list(s.shape_post),
                    "shape_out": list(s.shape_out),
                    "receptive_field_post": s.rf_post.to_dict(),
                    "receptive_field_out": s.rf_out.to_dict(),
                }
                for s in self.stages
            ],
            "readout": {
                "modules": {layer.path: layer.type for layer in self.readout.layers},
                "linear": self.readout.linear,
                "hidden": self.readout.hidden,
            },
        }


# ---- walking ---------------------------------------------------------------------------------


def leaves(model: nn.Module) -> list[Layer]:
    """The model's layers in registration order (:func:`in_call_order` then orders them as forward calls them); an
    unreadable one raises naming its path and type."""
    if list(model.named_parameters(recurse=False)):
        raise MechscopeError(
            f"cannot read the model ({type(model).__name__}): it holds parameters of its own; "
            f"mechscope walks {READABLE}"
        )
    out: list[Layer] = []

    def visit(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            path = f"{prefix}.{name}" if prefix else name
            kind = kind_of(child)
            if kind is not None:
                out.append(Layer(path, kind, child))
                continue
            has_children = next(child.children(), None) is not None
            if not has_children or list(child.named_parameters(recurse=False)):
                raise MechscopeError(
                    f"cannot read layer {path} ({type(child).__name__}): mechscope walks {READABLE}, "
                    "and containers of them"
                )
            visit(path, child)

    visit("", model)
    return out


def in_call_order(model: nn.Module, layers: list[Layer], shape: tuple[int, int, int]) -> list[Layer]:
    """``layers`` in the order the model's forward calls them, traced once on blank images: a layer without weights
    may be called more than once (one ``nn.ReLU`` after every convolution) and a layer never called is left out.
    Registration order when the forward fails on blank images (the walk then says why); a layer with weights called
    twice is refused (two stages would share its weights)."""
    by_module = {layer.module: layer for layer in layers}
    seen: list[Layer] = []

    def record(module, args, output) -> None:
        if module in by_module:
            seen.append(by_module[module])

    try:
        with evaluating(model), torch.no_grad(), module_hooks(model, (nn.Module,), forward=record):
            model(torch.zeros(2, *shape))
    except Exception:  # noqa: BLE001  (whatever the forward raises, the walk's own checks name it)
        return layers
    for layer, n in Counter(seen).items():
        if n > 1 and any(True for _ in layer.module.parameters()):
            raise MechscopeError(
                f"layer {layer.path} ({layer.type}) holds weights and is called {n} times in forward; mechscope "
                "reads a weighted layer once (give each use its own module)"
            )
    return seen or layers


def _split(layers: list[Layer]) -> tuple[list[Layer], list[list[Layer]], list[Layer]]:
    """(layers before the first conv, one list per stage, the read-out) from the structural layers."""
    pre: list[Layer] = []
    stages: list[list[Layer]] = []
    readout: list[Layer] = []
    for layer in layers:
        k = layer.kind
        if k == "conv":
            if readout:
                raise _misplaced(layer, "after the read-out began")
            stages.append([layer])
        elif k in ("flatten", "linear", "norm1d") or readout:
            if not stages:
                raise MechscopeError(f"no Conv2d before layer {layer.path} ({layer.type}); mechscope reads conv stacks")
            if k not in ("flatten", "linear", "norm1d", "act", "identity"):
                raise _misplaced(layer, "after the read-out began")
            readout.append(layer)
        elif stages:
            if k not in ("norm", "act", "pool", "identity"):
                raise _misplaced(layer, "inside a conv stage")
            stages[-1].append(layer)
        else:
            if k not in ("input", "identity"):
                raise _misplaced(layer, "before the first Conv2d")
            pre.append(layer)
    if not stages:
        raise MechscopeError(f"the model has no Conv2d layer; mechscope walks {READABLE}")
    if not any(layer.kind == "linear" for layer in readout):
        raise MechscopeError("the model has no Linear read-out after its conv stages")
    return pre, stages, readout


def _misplaced(layer: Layer, where: str) -> MechscopeError:
    return MechscopeError(f"cannot read layer {layer.path} ({layer.type}) {where}; mechscope walks {READABLE}")


def walk(model: nn.Module, input_shape: tuple[int, int, int] | None = None) -> CNNSpec:
    """The :class:`CNNSpec` of ``model`` for images shaped ``input_shape`` [C, H, W].

    ``input_shape`` defaults to ``model.input_shape`` (mechscope's CNN has one); a user's model
    needs it from the data. Raises :class:`MechscopeError` for a layer the walk cannot read, an
    image too small for the network, or a forward that is not the layers applied in order.
    """
    if not isinstance(model, nn.Module):
        raise MechscopeError(f"walk takes a torch nn.Module, got {type(model).__name__}")
    shape = tuple(input_shape) if input_shape is not None else ()
    shape = shape or tuple(getattr(model, "input_shape", None) or ())
    if len(shape) != 3:
        raise MechscopeError("the images' shape [channels, height, width] is needed to walk the model")
    if not all(hasattr(v, "__index__") and not isinstance(v, bool) and int(v) > 0 for v in shape):
        raise MechscopeError(f"the images' shape [channels, height, width] must be positive integers, got {shape}")
    shape = tuple(int(v) for v in shape)
    layers = leaves(model)
    if not isinstance(model, CNN):
        layers = in_call_order(model, layers, shape)
    structural = [layer for layer in layers if layer.kind != "hook"]
    pre, stage_layers, readout_layers = _split(structural)
    first = stage_layers[0][0].module
    if first.in_channels != shape[0]:
        raise MechscopeError(
            f"the first convolution ({stage_layers[0][0].path}) takes {first.in_channels} channel(s); "
            f"the images have {shape[0]}"
        )
    if isinstance(model, CNN):
        hooked, source = model, "mechscope"
        plan = [(layer.path, layer.module) for layer in layers]
        _check_own_hooks(plan, len(stage_layers))
    else:
        hooked, plan = wrap(model, pre, stage_layers, readout_layers, shape)
        source = "wrapped"
    spec_plan = tuple(plan)
    shapes = probe_shapes(spec_plan, shape)
    stages, rf = [], ReceptiveField()
    for i, sl in enumerate(stage_layers, 1):
        name = f"conv{i}"
        _, at_post, at_out = hook_positions(sl)
        stages.append(
            Stage(name, i, tuple(sl), sl[0].module.in_channels, sl[0].module.out_channels,
                  shapes[f"{name}.hook_post"], shapes[f"{name}.hook_out"],
                  _rf_prefix(rf, sl[:at_post], shapes), _rf_prefix(rf, sl[:at_out], shapes))
        )  # fmt: skip
        rf = _rf_prefix(rf, sl, shapes)
    at_out = hook_positions(stage_layers[-1])[2]
    tail = stage_layers[-1][at_out:]
    kinds = [layer.kind for layer in readout_layers if layer.kind != "identity"]
    linear = not tail and kinds in (["linear"], ["flatten", "linear"])
    readout = Readout(tuple(tail) + tuple(readout_layers), stages[-1].shape_out, linear)
    n_classes = readout.fc.out_features
    if shapes["hook_logits"] != (n_classes,):
        raise MechscopeError(f"the model's output is shaped {list(shapes['hook_logits'])}; expected [{n_classes}]")
    spec = CNNSpec(hooked, source, shape, n_classes, tuple(stages), readout, spec_plan)
    if source == "wrapped":
        check_replay(model, spec, READABLE)
    return spec


def _rf_prefix(rf: ReceptiveField, layers: list[Layer], shapes: dict) -> ReceptiveField:
    for layer in layers:
        rf = _through(rf, layer, shapes.get(f"{layer.path}:in"))
    return rf


def _pair(v) -> tuple[int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _through(rf: ReceptiveField, layer: Layer, in_shape: tuple | None) -> ReceptiveField:
    m = layer.module
    if layer.kind == "conv":
        k, d = _pair(m.kernel_size), _pair(m.dilation)
        if isinstance(m.padding, str):  # "same": PyTorch pads (d(k-1)) // 2 before; "valid": nothing
            p = tuple(d[a] * (k[a] - 1) // 2 for a in range(2)) if m.padding == "same" else (0, 0)
        else:
            p = _pair(m.padding)
        if m.padding_mode == "circular" and any(p):  # reflect/replicate read inside the box; circular wraps round
            raise MechscopeError(f"cannot read layer {layer.path} ({layer.type}) with circular padding: a unit at the "
                                 "edge reads the opposite edge, which a receptive-field box cannot show")  # fmt: skip
        return rf.through(k, _pair(m.stride), p, d)
    if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
        k = _pair(m.kernel_size)
        s = _pair(m.stride if m.stride is not None else m.kernel_size)
        return rf.through(k, s, _pair(m.padding), _pair(getattr(m, "dilation", 1)))
    if isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
        if _pair(m.output_size) != (1, 1):
            raise MechscopeError(f"cannot read layer {layer.path} ({layer.type}): only global (1×1) adaptive pooling")
        h, w = in_shape[-2:]
        return rf.through((h, w), (h, w), (0, 0))
    return rf  # norms, activations, dropout: elementwise or per position


def _check_own_hooks(plan: list, n_stages: int) -> None:
    names = {name for name, m in plan if isinstance(m, HookPoint)}
    stages = range(1, n_stages + 1)
    need = {"hook_input", "hook_logits"} | {f"conv{i}.hook_{h}" for i in stages for h in ("pre", "post", "out")}
    missing = sorted(need - names)
    if missing:
        raise MechscopeError(f"the model's hook points lack {', '.join(missing)}")
