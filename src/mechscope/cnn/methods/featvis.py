"""Feature visualisation for small CNNs, grey or colour (Olah, Mordvintsev & Schubert 2017).

An input is optimised to excite a unit. Three small parts compose, after Lucid/Lucent:

* a parameterisation: ``pixel`` (a sigmoid over free pixels) or ``fourier`` (a spectrum scaled
  by 1/frequency, Lucid's trick for low-frequency images), squashed into the model's own input
  range ([0, 1] pixels by default) at the model's own size and number of channels; no ImageNet
  assumption anywhere;
* transformations for robustness (pad, jitter, scale, rotate), every random draw from one
  seeded ``torch.Generator``;
* objectives that add, subtract and scale: ``neuron``, ``channel``, ``class_logit``,
  ``direction``, ``diversity``, and the regularisers ``l1``, ``l2``, ``total_variation``.

Every objective returns one value per image, so many units are optimised in one batch (image i
for unit i). Hooks are attached only through :func:`mechscope.core.hooks.hooks` and removed at the
end of a run, however it ends.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from mechscope.core.errors import MechscopeError
from mechscope.core.hooks import hook_points, hooks
from mechscope.core.torch_utils import evaluating
from mechscope.core.validate import check_int

# ---- parameterisations --------------------------------------------------------------------


def pixel_image(shape: tuple[int, ...], generator: torch.Generator, sd: float = 0.01):
    """Free pixels through a sigmoid: params [B, C, H, W] -> images in (0, 1)."""
    params = (torch.randn(shape, generator=generator) * sd).requires_grad_(True)
    return [params], lambda: torch.sigmoid(params)


def fourier_image(shape: tuple[int, ...], generator: torch.Generator, sd: float = 0.01, decay: float = 1.0):
    """A spectrum scaled by 1/frequency^decay (Lucid), inverse FFT, then a sigmoid into (0, 1)."""
    b, c, h, w = shape
    fy = torch.fft.fftfreq(h)[:, None]
    fx = torch.fft.rfftfreq(w)[None, :]
    freqs = (fx**2 + fy**2).sqrt()  # [H, W//2+1]
    scale = 1.0 / freqs.clamp(min=1.0 / max(h, w)) ** decay
    scale = scale * math.sqrt(h * w) / scale.mean()  # comparable contrast at start for any size
    params = (torch.randn(b, c, h, w // 2 + 1, 2, generator=generator) * sd).requires_grad_(True)

    def image():
        spectrum = torch.view_as_complex(params) * scale
        return torch.sigmoid(torch.fft.irfft2(spectrum, s=(h, w), norm="ortho"))

    return [params], image


PARAMETERISATIONS = {"pixel": pixel_image, "fourier": fourier_image}


# ---- transformations ----------------------------------------------------------------------

Transform = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def pad(n: int, value: float = 0.0) -> Transform:
    return lambda x, g: F.pad(x, (n, n, n, n), value=value)


def jitter(d: int) -> Transform:
    """Random translation by up to ``d`` pixels (one draw per image), by cropping."""

    def t(x, g):
        b, c, h, w = x.shape
        oy, ox = torch.randint(0, 2 * d + 1, (2,), generator=g).tolist()
        return F.pad(x, (d, d, d, d))[..., oy : oy + h, ox : ox + w]

    return t


def random_affine(scales: tuple[float, float] = (0.9, 1.1), degrees: float = 10.0) -> Transform:
    """Random scaling and rotation about the centre (bilinear, zero fill), one draw per image."""

    def t(x, g):
        b = x.shape[0]
        s = torch.empty(b).uniform_(*scales, generator=g)
        a = torch.empty(b).uniform_(-degrees, degrees, generator=g) * math.pi / 180
        cos, sin = torch.cos(a) / s, torch.sin(a) / s
        theta = torch.stack(
            [torch.stack([cos, -sin, torch.zeros(b)], 1), torch.stack([sin, cos, torch.zeros(b)], 1)], 1
        )
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")

    return t


def crop_to(h: int, w: int) -> Transform:
    """Centre crop back to the model's size."""

    def t(x, g):
        y0, x0 = (x.shape[-2] - h) // 2, (x.shape[-1] - w) // 2
        return x[..., y0 : y0 + h, x0 : x0 + w]

    return t


def compose(*ts: Transform) -> Transform:
    def t(x, g):
        for f in ts:
            x = f(x, g)
        return x

    return t


def default_transforms(h: int, w: int) -> Transform:
    """Pad 2, jitter 2, scale 0.9-1.1, rotate ±10°, jitter 1, crop back: sized for 28×28 digits."""
    return compose(pad(2), jitter(2), random_affine((0.9, 1.1), 10.0), jitter(1), crop_to(h, w))


# ---- objectives ---------------------------------------------------------------------------


class Objective:
    """Maps activations {hook name: tensor} (and the input image) to a value per image, [B]."""

    def __init__(self, fn: Callable[[dict[str, torch.Tensor]], torch.Tensor], names: set[str], label: str) -> None:
        self.fn, self.names, self.label = fn, set(names), label

    def __call__(self, acts: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.fn(acts)

    def __add__(self, other: Objective) -> Objective:
        return Objective(lambda a: self(a) + other(a), self.names | other.names, f"{self.label} + {other.label}")

    def __sub__(self, other: Objective) -> Objective:
        return Objective(lambda a: self(a) - other(a), self.names | other.names, f"{self.label} - {other.label}")

    def __neg__(self) -> Objective:
        return Objective(lambda a: -self(a), self.names, f"-({self.label})")

    def __mul__(self, k: float) -> Objective:
        if not isinstance(k, (int, float)):
            return NotImplemented
        return Objective(lambda a: k * self(a), self.names, f"{k} * {self.label}")

    __rmul__ = __mul__

    def __repr__(self) -> str:
        return f"Objective({self.label})"


INPUT = "hook_input"


def _units(units, act: torch.Tensor, layer: str) -> torch.Tensor:
    """``units`` (one index, or one per image) as indices into dim 1 of ``act`` [B, C, ...], checked: a channel past
    the layer's was an IndexError, -1 the last channel, 1.5 channel 1, two units for three images a shape error."""
    t = torch.as_tensor(units)
    b, c = act.shape[:2]
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool or t.numel() not in (1, b):
        raise MechscopeError(f"{layer}: expected one unit index or one per image ({b}), got {units!r}")
    t = t.long().reshape(-1)
    bad = t[(t < 0) | (t >= c)]
    if len(bad):
        raise MechscopeError(f"{layer}: unit {int(bad[0])} out of range 0..{c - 1}")
    return (t.expand(b) if t.numel() == 1 else t).to(act.device)


def channel(layer: str, units) -> Objective:
    """Mean activation of a channel over positions; ``units`` one index or one per image."""

    def fn(a):
        act = a[layer]  # [B, C, H, W]
        idx = _units(units, act, layer)
        return act[torch.arange(act.shape[0]), idx].flatten(1).mean(1)

    return Objective(fn, {layer}, f"channel {layer}:{units}")


def neuron(layer: str, units, y: int | None = None, x: int | None = None) -> Objective:
    """One position of a channel (the centre by default)."""

    def fn(a):
        act = a[layer]
        yy = act.shape[2] // 2 if y is None else check_int(y, "y", 0, act.shape[2] - 1)  # y 99 was an IndexError
        xx = act.shape[3] // 2 if x is None else check_int(x, "x", 0, act.shape[3] - 1)
        idx = _units(units, act, layer)
        return act[torch.arange(act.shape[0]), idx, yy, xx]

    return Objective(fn, {layer}, f"neuron {layer}:{units}@({y},{x})")


def class_logit(units, layer: str = "hook_logits") -> Objective:
    def fn(a):
        act = a[layer]
        idx = _units(units, act, layer)
        return act[torch.arange(act.shape[0]), idx]

    return Objective(fn, {layer}, f"logit {units}")


def direction(layer: str, vector: torch.Tensor) -> Objective:
    """Dot product of the activation (averaged over positions for a conv layer) with ``vector``."""

    def fn(a):
        act = a[layer]
        act = act.flatten(2).mean(2) if act.dim() == 4 else act
        return act @ vector.to(act)

    return Objective(fn, {layer}, f"direction {layer}")


def diversity(layer: str, group: int) -> Objective:
    """−(mean cosine similarity of Gram matrices) within each group of ``group`` images
    (Olah et al. 2017): pushes a group of images for the same unit apart in style."""
    group = check_int(group, "a diversity group", 2)  # 0 was a ZeroDivisionError, 1 a NaN objective

    def fn(a):
        act = a[layer]
        b, c = act.shape[:2]
        if b % group:
            raise MechscopeError(f"diversity: {b} images do not split into groups of {group}")
        flat = act.reshape(b, c, -1)
        gram = flat @ flat.transpose(1, 2) / flat.shape[-1]  # [B, C, C]
        gram = F.normalize(gram.reshape(b // group, group, -1), dim=-1)
        sim = gram @ gram.transpose(1, 2)  # [G, g, g]
        off = (sim.sum((1, 2)) - sim.diagonal(dim1=1, dim2=2).sum(1)) / (group * (group - 1))
        return -off.repeat_interleave(group)

    return Objective(fn, {layer}, f"diversity {layer}")


def l1(target: float = 0.0) -> Objective:
    return Objective(lambda a: (a[INPUT] - target).abs().flatten(1).mean(1), {INPUT}, "l1")


def l2(target: float = 0.0) -> Objective:
    return Objective(lambda a: (a[INPUT] - target).pow(2).flatten(1).mean(1), {INPUT}, "l2")


def total_variation() -> Objective:
    def fn(a):
        x = a[INPUT]
        return (x[..., 1:, :] - x[..., :-1, :]).abs().flatten(1).mean(1) + (
            x[..., :, 1:] - x[..., :, :-1]
        ).abs().flatten(1).mean(1)

    return Objective(fn, {INPUT}, "total_variation")


# ---- the optimisation loop ----------------------------------------------------------------


@dataclass
class Render:
    images: torch.Tensor  # [B, C, H, W] in [0, 1]
    history: list[float] = field(default_factory=list)  # mean objective per logged step
    final: torch.Tensor | None = None  # objective per image on the final, untransformed images
    first: torch.Tensor | None = None  # objective per image at step 0 (its starting image, transformed)


def render(
    model: nn.Module,
    objective: Objective,
    batch: int,
    steps: int = 512,
    param: str = "fourier",
    lr: float = 0.05,
    seed: int = 0,
    transforms: Transform | None = None,
    log_every: int = 16,
    value_range: tuple[float, float] = (0.0, 1.0),
) -> Render:
    """Optimise ``batch`` images to maximise ``objective``; returns the images and the history.

    Images lie in ``value_range`` (the model's input range: [0, 1] pixels for mechscope's CNN).
    """
    if steps < 1:
        raise MechscopeError(f"steps must be at least 1, got {steps}")
    check_int(batch, "batch", 1)  # 0 was an MKL FFT error
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not 0 < lr < math.inf:  # NaN was Adam's error
        raise MechscopeError(f"lr must be a positive finite number, got {lr!r}")
    lo, hi = value_range
    if not lo < hi:  # (1, 0) rendered images outside the model's range
        raise MechscopeError(f"value_range must be (low, high) with low below high, got {value_range!r}")
    if param not in PARAMETERISATIONS:
        raise MechscopeError(f"unknown parameterisation {param!r}; expected one of {', '.join(PARAMETERISATIONS)}")
    shape = getattr(model, "input_shape", None)
    if shape is None:
        raise MechscopeError("the model does not state its input shape (input_shape)")
    points = hook_points(model)
    unknown = sorted(objective.names - set(points))
    if unknown:
        from mechscope.core.hooks import describe_names

        raise MechscopeError(f"unknown layer {unknown[0]!r}; valid layers: {describe_names(points)}")
    g = torch.Generator().manual_seed(seed)
    params, unit_image = PARAMETERISATIONS[param]((batch, *shape), g)
    image_fn = unit_image if (lo, hi) == (0.0, 1.0) else (lambda: lo + (hi - lo) * unit_image())
    t = transforms if transforms is not None else default_transforms(shape[1], shape[2])
    with evaluating(model):
        return _optimise(model, objective, t, image_fn, params, lr, steps, g, log_every)


def _optimise(model, objective, t, image_fn, params, lr, steps, g, log_every) -> Render:
    history: list[float] = []
    first = None
    opt = torch.optim.Adam(params, lr=lr)
    acts: dict[str, torch.Tensor] = {}

    def store(x, hook):
        acts[hook.name] = x

    try:
        with hooks(model, fwd=[(n, store) for n in objective.names]):
            for step in range(steps):
                acts.clear()
                model(t(image_fn(), g))
                value = objective(acts)
                opt.zero_grad(set_to_none=True)
                (-value.sum()).backward()
                opt.step()
                if step == 0:
                    first = value.detach().clone()
                if step % log_every == 0 or step == steps - 1:
                    history.append(value.mean().item())
            with torch.no_grad():
                images = image_fn().detach()
                acts.clear()
                model(images)
                final = objective(acts).detach()
    finally:
        acts.clear()
    return Render(images, history, final, first)


# ---- dataset examples ---------------------------------------------------------------------


@dataclass
class UnitExamples:
    """Per unit: the top-k and bottom-k test images by the unit's activation."""

    layer: str
    values: torch.Tensor  # [n_units, n] activation per image (channels: max over positions)
    top: torch.Tensor  # [n_units, k] image indices, highest first
    top_values: torch.Tensor
    bottom: torch.Tensor  # [n_units, k] lowest first
    positions: torch.Tensor | None  # [n_units, k, 2] argmax (y, x) for the top images (conv layers)
    value_max: torch.Tensor | None = None  # [n_units] max over images of unit_value (channel mean, logit)

    @property
    def max(self) -> torch.Tensor:
        return self.top_values[:, 0]


def dataset_examples(
    model: nn.Module, images: torch.Tensor, layers: list[str], k: int = 8, batch_size: int = 1000
) -> dict[str, UnitExamples]:
    """Top/bottom-k test images for every unit of ``layers``, in one pass over ``images``.

    Memory is bounded by one batch of activations plus one number per (image, unit): a conv
    channel is summarised by its maximum over positions and where it occurs.
    """
    per = {name: [] for name in layers}
    where = {name: [] for name in layers}
    value_max: dict[str, torch.Tensor] = {}

    def summarise(x, hook):
        v = (x.flatten(2).mean(2) if x.dim() == 4 else x).max(0).values  # unit_value, max over the batch
        value_max[hook.name] = v if hook.name not in value_max else torch.maximum(value_max[hook.name], v)
        if x.dim() == 4:
            flat = x.flatten(2)  # [B, C, H*W]
            v, i = flat.max(2)
            per[hook.name].append(v)
            where[hook.name].append(torch.stack([i // x.shape[3], i % x.shape[3]], -1))
        else:
            per[hook.name].append(x)

    with evaluating(model), torch.no_grad(), hooks(model, fwd=[(n, summarise) for n in layers]):
        for s in range(0, len(images), batch_size):
            model(images[s : s + batch_size])
    out = {}
    for name in layers:
        values = torch.cat(per[name]).T  # [units, N]
        kk = min(k, values.shape[1])  # a dataset of fewer images than k gives them all
        top_v, top_i = values.topk(kk, dim=1)
        _, bot_i = values.topk(kk, dim=1, largest=False)
        pos = None
        if where[name]:
            w = torch.cat(where[name]).transpose(0, 1)  # [units, N, 2]
            pos = w.gather(1, top_i[..., None].expand(-1, -1, 2))
        out[name] = UnitExamples(name, values, top_i, top_v, bot_i, pos, value_max[name])
    return out


def receptive_field(model: nn.Module, layer: str, y: int, x: int) -> tuple[int, int, int, int]:
    """Input rows/cols (y0, y1, x0, x1) seen by position (y, x) of a stage's hook ``layer``.

    Computed from the model's kernels, strides, padding and dilation by its spec
    (:func:`mechscope.cnn.models.spec.walk`); pass a :class:`~mechscope.cnn.models.spec.CNNSpec` to
    avoid walking the model at every call.
    """
    from mechscope.cnn.models.spec import CNNSpec, walk

    spec = model if isinstance(model, CNNSpec) else walk(model)
    if layer in ("hook_logits", "hook_input") or not layer.startswith("conv"):
        raise MechscopeError(f"no receptive field for {layer}")
    stage = spec.stage(layer)
    rf = stage.rf_out if layer.endswith("hook_out") else stage.rf_post
    return rf.box(y, x, *spec.input_shape[1:])


# ---- many units at once -------------------------------------------------------------------

LAYER_ALIASES = {"conv1": "conv1.hook_post", "conv2": "conv2.hook_post", "logits": "hook_logits", "fc": "hook_logits"}


def resolve_layers(spec, layers: list[str] | None) -> list[str]:
    """Hook names for ``--layer`` values: a stage (``conv3``: its hook_post), ``logits``, or a hook name."""
    valid = spec.hook_names()
    out = []
    for layer in layers or [*spec.stage_names, "logits"]:
        name = {"logits": "hook_logits", "fc": "hook_logits"}.get(layer, layer)
        name = f"{name}.hook_post" if name in spec.stage_names else name
        if name not in valid or name == "hook_input":
            raise MechscopeError(
                f"unknown layer {layer!r}; valid layers: {', '.join(spec.stage_names)}, logits, or a hook name "
                f"({', '.join(n for n in valid if n != 'hook_input')})"
            )
        if name in out:
            raise MechscopeError(f"layer {layer!r} given twice")
        out.append(name)
    return out


def short_layer_name(layer: str) -> str:
    """The name a layer's figures are filed under: conv1.hook_post -> conv1, hook_logits -> logits."""
    return layer.replace(".hook_post", "").replace("hook_", "")


def unit_value(layer: str, acts: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
    """The quantity a unit is visualised by: a channel's mean over positions, or a logit."""
    rows = torch.arange(acts.shape[0])
    return acts[rows, units].flatten(1).mean(1) if acts.dim() == 4 else acts[rows, units]


def units_objective(assignment: list[tuple[str, int]]) -> Objective:
    """Image i excites unit assignment[i] = (layer, index); layers may differ across the batch."""
    layers = sorted({layer for layer, _ in assignment})
    rows = {layer: torch.tensor([i for i, (lay, _) in enumerate(assignment) if lay == layer]) for layer in layers}
    idx = {layer: torch.tensor([u for lay, u in assignment if lay == layer]) for layer in layers}

    def fn(a):
        out = torch.zeros(len(assignment), dtype=a[layers[0]].dtype)
        for layer in layers:
            out = out.index_put((rows[layer],), unit_value(layer, a[layer][rows[layer]], idx[layer]))
        return out

    return Objective(fn, set(layers), f"{len(assignment)} units")


def dataset_means_max(model: nn.Module, images: torch.Tensor, layers: list[str], batch_size: int = 1000) -> dict:
    """For every unit, the maximum over the images of :func:`unit_value` (for the honesty ratio)."""
    ex = dataset_examples(model, images, layers, k=1, batch_size=batch_size)
    return {name: ex[name].value_max for name in layers}
