"""Input attribution: which pixels make the model give its answer.

Every method is a small class configured in its constructor and called the same way::

    attr = IntegratedGradients(n_steps=64).attribute(model, inputs, target)   # shaped like inputs

``inputs`` is a float tensor [B, C, H, W]; ``target`` a class index or a LongTensor [B]. The
attributed quantity is the target logit. The methods, with their papers:

* :class:`Saliency` |∂f/∂x| (Simonyan et al. 2014)
* :class:`InputXGradient` x·∂f/∂x (Shrikumar et al. 2016)
* :class:`IntegratedGradients` (Sundararajan et al. 2017), with the completeness delta
* :class:`SmoothGrad` noise around any gradient method (Smilkov et al. 2017)
* :class:`Occlusion` sliding-window occlusion (Zeiler & Fergus 2014)
* :class:`GradCAM` for any conv layer, upsampled to the input (Selvaraju et al. 2017)
* :class:`DeepLift` rescale rule (Shrikumar et al. 2017)
* :class:`GuidedBackprop` (Springenberg et al. 2015)

Where Captum has the same method, the defaults match Captum's numerics (tests/parity checks
this to 1e-5). Every hook a method attaches is removed before it returns or raises.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mechscope.cnn.models.cnn import ChannelNorm, SoLU
from mechscope.core.errors import MechscopeError
from mechscope.core.hooks import describe_names, hook_points, module_hooks, run_with_cache

# ---------------------------------------------------------------------------------------------
# shared checks and helpers


def check_inputs(model: nn.Module, inputs: torch.Tensor) -> None:
    """Raise :class:`MechscopeError` for inputs the model cannot take (shape, dtype, NaN)."""
    check = getattr(model, "check_input", None)
    if check is not None:
        check(inputs)
        return
    if not isinstance(inputs, torch.Tensor) or not inputs.is_floating_point():
        raise MechscopeError("expected a floating-point input tensor")
    if torch.isnan(inputs).any():
        raise MechscopeError("input contains NaN")


def n_outputs(model: nn.Module, inputs: torch.Tensor) -> int:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "n_classes"):
        return int(config.n_classes)
    with torch.no_grad():
        return int(model(inputs[:1]).shape[1])


def as_target(model: nn.Module, inputs: torch.Tensor, target: int | torch.Tensor | list[int]) -> torch.Tensor:
    """A LongTensor [B] of class indices, checked against the model's number of outputs."""
    b = inputs.shape[0]
    t = torch.as_tensor(target)
    if t.is_floating_point() or t.dtype == torch.bool:
        raise MechscopeError(f"target must be integer class indices, got dtype {t.dtype}")
    t = t.long().reshape(-1)
    if t.numel() == 1:
        t = t.expand(b)
    if t.numel() != b:
        raise MechscopeError(f"target has {t.numel()} entries for {b} inputs")
    k = n_outputs(model, inputs)
    if (t < 0).any() or (t >= k).any():
        bad = int(t[(t < 0) | (t >= k)][0])
        raise MechscopeError(f"target {bad} out of range; the model has classes 0..{k - 1}")
    return t.to(inputs.device)


def target_logits(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The target logit of each row: [B]."""
    return model(x).gather(1, target[:, None]).squeeze(1)


def gradient(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """∂ logit[target] / ∂x for each row, [B, ...]; parameters get no gradient."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(target_logits(model, x, target).sum(), x)
    return g


def _chunks(n: int, size: int | None):
    size = n if not size or size <= 0 else size
    for start in range(0, n, size):
        yield start, min(n, start + size)


class Attribution:
    """Base class: ``attribute(model, inputs, target) -> tensor shaped like inputs``."""

    name = "attribution"
    #: gradient-based methods can be wrapped by SmoothGrad
    gradient_based = False

    def attribute(self, model: nn.Module, inputs: torch.Tensor, target) -> torch.Tensor:
        check_inputs(model, inputs)
        return self._attribute(model, inputs.detach(), as_target(model, inputs, target))

    def _attribute(self, model: nn.Module, inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


# ---------------------------------------------------------------------------------------------
# gradient methods


class Saliency(Attribution):
    """|∂f/∂x| (Simonyan, Vedaldi & Zisserman 2014). ``abs=False`` keeps the sign."""

    name = "saliency"
    gradient_based = True

    def __init__(self, abs: bool = True) -> None:
        self.abs = abs

    def _attribute(self, model, inputs, target):
        g = gradient(model, inputs, target)
        return g.abs() if self.abs else g


class InputXGradient(Attribution):
    """x · ∂f/∂x (Shrikumar et al. 2016)."""

    name = "input_x_gradient"
    gradient_based = True

    def _attribute(self, model, inputs, target):
        return inputs * gradient(model, inputs, target)


def path_points(n_steps: int, method: str) -> tuple[list[float], list[float]]:
    """Points α in [0, 1] and weights for integrating along a straight path.

    Gauss–Legendre and the left, right and middle Riemann sums use Captum's points and weights.
    The trapezoid rule here is the textbook one (n points 1/(n−1) apart, weights summing to 1);
    Captum's weights its n points 1/n each and so sums to (n−1)/n, which breaks completeness.
    """
    if n_steps < 1:
        raise MechscopeError(f"n_steps must be at least 1, got {n_steps}")
    if method == "gausslegendre":
        x, w = np.polynomial.legendre.leggauss(n_steps)
        return list(0.5 * (x + 1)), list(0.5 * w)
    if method == "riemann_trapezoid":
        if n_steps < 2:
            raise MechscopeError("riemann_trapezoid needs at least 2 steps")
        alphas = list(np.linspace(0, 1, n_steps))
        weights = [1 / (n_steps - 1)] * n_steps
        weights[0] = weights[-1] = 0.5 / (n_steps - 1)
        return alphas, weights
    offsets = {"riemann_left": 0.0, "riemann_right": 1.0, "riemann_middle": 0.5}
    if method not in offsets:
        raise MechscopeError(
            f"unknown integration method {method!r}; expected gausslegendre, riemann_trapezoid, "
            "riemann_left, riemann_right or riemann_middle"
        )
    return [(i + offsets[method]) / n_steps for i in range(n_steps)], [1 / n_steps] * n_steps


def _baseline_like(baseline: float | torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    b = torch.as_tensor(baseline, dtype=inputs.dtype, device=inputs.device)
    try:
        return b.expand_as(inputs)  # a full batch stays as it is; one of another size is refused
    except RuntimeError:
        raise MechscopeError(
            f"baseline of shape {list(b.shape)} does not match inputs of shape {list(inputs.shape)}"
        ) from None


class IntegratedGradients(Attribution):
    """Integrated Gradients (Sundararajan, Taly & Yan 2017).

    (x − x') · ∫₀¹ ∂f(x' + α(x − x'))/∂x dα, the integral by ``method`` (Gauss–Legendre by
    default, as in Captum). ``baseline`` is a number or a tensor broadcastable to the inputs
    (0: a black image). ``batch_size`` bounds how many path points (images) run at once, and so
    memory; the default 512 is also about twice as fast on CPU as one batch of every point
    (the activations stay in cache; bench/attribution.py).
    Completeness: the attributions sum to f(x) − f(x'); :meth:`attribute_with_delta` returns
    the difference f(x) − f(x') − Σ attributions per input.
    """

    name = "integrated_gradients"
    gradient_based = True

    def __init__(
        self,
        n_steps: int = 50,
        baseline: float | torch.Tensor = 0.0,
        method: str = "gausslegendre",
        batch_size: int | None = 512,
    ) -> None:
        self.alphas, self.weights = path_points(n_steps, method)
        self.n_steps, self.baseline, self.method, self.batch_size = n_steps, baseline, method, batch_size

    def _attribute(self, model, inputs, target):
        return self._integrate(model, inputs, target)

    def _integrate(self, model, inputs, target):
        base = _baseline_like(self.baseline, inputs)
        diff = inputs - base
        total = torch.zeros_like(inputs)
        b = inputs.shape[0]
        # path points for whole images at a time: [k * B, ...], step-major like Captum
        per_chunk = max(1, (self.batch_size or b * self.n_steps) // b)
        for s0, s1 in _chunks(self.n_steps, per_chunk):
            alphas = torch.tensor(self.alphas[s0:s1], dtype=inputs.dtype, device=inputs.device)
            weights = torch.tensor(self.weights[s0:s1], dtype=inputs.dtype, device=inputs.device)
            k = s1 - s0
            shape = (k,) + (1,) * inputs.dim()
            points = (base.unsqueeze(0) + alphas.view(shape) * diff.unsqueeze(0)).reshape(k * b, *inputs.shape[1:])
            grads = gradient(model, points, target.repeat(k)).view(k, *inputs.shape)
            total += (grads * weights.view(shape)).sum(0)
        return diff * total

    def attribute_with_delta(self, model, inputs, target) -> tuple[torch.Tensor, torch.Tensor]:
        check_inputs(model, inputs)
        inputs = inputs.detach()
        t = as_target(model, inputs, target)
        attr = self._integrate(model, inputs, t)
        with torch.no_grad():
            base = _baseline_like(self.baseline, inputs)
            delta = target_logits(model, inputs, t) - target_logits(model, base.contiguous(), t)
        return attr, delta - attr.flatten(1).sum(1)


class SmoothGrad(Attribution):
    """Average a gradient method over noisy copies of the input (Smilkov et al. 2017).

    Noise is Gaussian with standard deviation ``stdev`` in input units (pixels in [0, 1]),
    drawn from a generator seeded with ``seed`` at every call, so a call is repeatable. The
    copies of each input are consecutive (input 0's samples, then input 1's), as in Captum's
    NoiseTunnel, so the same seed gives Captum the same noise.
    """

    name = "smoothgrad"
    gradient_based = True

    def __init__(
        self,
        base: Attribution | None = None,
        n_samples: int = 25,
        stdev: float = 0.15,
        seed: int = 0,
        batch_size: int | None = 512,
    ) -> None:
        self.base = base or Saliency()
        if not getattr(self.base, "gradient_based", False):
            raise MechscopeError(f"SmoothGrad wraps a gradient method, not {type(self.base).__name__}")
        if n_samples < 1:
            raise MechscopeError(f"n_samples must be at least 1, got {n_samples}")
        self.n_samples, self.stdev, self.seed, self.batch_size = n_samples, stdev, seed, batch_size
        self.name = f"smoothgrad_{self.base.name}" if not isinstance(self.base, Saliency) else "smoothgrad"

    def _attribute(self, model, inputs, target):
        g = torch.Generator(device=inputs.device).manual_seed(self.seed)
        n, b = self.n_samples, inputs.shape[0]
        noisy = inputs.repeat_interleave(n, 0)
        noisy = noisy + torch.randn(noisy.shape, generator=g, dtype=inputs.dtype, device=inputs.device) * self.stdev
        targets = target.repeat_interleave(n)
        out = torch.empty_like(noisy)
        for s0, s1 in _chunks(n * b, self.batch_size):
            out[s0:s1] = self.base._attribute(model, noisy[s0:s1], targets[s0:s1])
        return out.view(b, n, *inputs.shape[1:]).mean(1)


# ---------------------------------------------------------------------------------------------
# perturbation


class Occlusion(Attribution):
    """Slide a window over the input, fill it with ``baseline``, record the target logit's drop.

    Each pixel gets the mean drop over the windows that cover it (Zeiler & Fergus 2014). Window
    positions start at 0 every ``stride`` pixels; the last window in each direction may hang
    over the edge and is cropped, as in Captum. ``batch_size`` windows are evaluated at once.
    """

    name = "occlusion"

    def __init__(self, window: int = 4, stride: int = 2, baseline: float = 0.0, batch_size: int = 64) -> None:
        if window < 1 or stride < 1:
            raise MechscopeError(f"window and stride must be at least 1, got {window} and {stride}")
        if stride > window:
            raise MechscopeError(f"stride {stride} larger than the window {window} would skip pixels")
        self.window, self.stride, self.baseline, self.batch_size = window, stride, baseline, batch_size

    def masks(self, height: int, width: int, device=None) -> torch.Tensor:
        """All window masks [n_windows, H, W] (1 inside the window)."""
        if self.window > min(height, width):
            raise MechscopeError(f"window {self.window} larger than the input ({height}x{width})")
        ys = [i * self.stride for i in range(math.ceil((height - self.window) / self.stride) + 1)]
        xs = [i * self.stride for i in range(math.ceil((width - self.window) / self.stride) + 1)]
        masks = torch.zeros(len(ys) * len(xs), height, width, device=device)
        for i, (y, x) in enumerate((y, x) for y in ys for x in xs):
            masks[i, y : y + self.window, x : x + self.window] = 1
        return masks

    def _attribute(self, model, inputs, target):
        b, c, h, w = inputs.shape
        masks = self.masks(h, w, inputs.device).to(inputs.dtype)  # [M, H, W]
        with torch.no_grad():
            base_out = target_logits(model, inputs, target)  # [B]
            total = torch.zeros(b, h, w, dtype=inputs.dtype, device=inputs.device)
            per_chunk = max(1, self.batch_size // b) if self.batch_size else len(masks)
            for m0, m1 in _chunks(len(masks), per_chunk):
                m = masks[m0:m1][:, None, None]  # [k, 1, 1, H, W]
                occluded = inputs.unsqueeze(0) * (1 - m) + self.baseline * m  # [k, B, C, H, W]
                k = m1 - m0
                out = target_logits(model, occluded.reshape(k * b, c, h, w), target.repeat(k)).view(k, b)
                total += torch.einsum("kb,khw->bhw", base_out.unsqueeze(0) - out, masks[m0:m1])
            counts = masks.sum(0)  # [H, W] windows covering each pixel
        return (total / counts).unsqueeze(1).expand(b, c, h, w).clone()


# ---------------------------------------------------------------------------------------------
# layer-based, modified-gradient methods


def resolve_layer(model: nn.Module, layer: str) -> str:
    """A hook-point name for ``layer``; a block name (``conv2``) means its post-ReLU point."""
    points = hook_points(model)
    if layer in points:
        return layer
    if f"{layer}.hook_post" in points:
        return f"{layer}.hook_post"
    raise MechscopeError(f"unknown layer {layer!r}; valid layers: {describe_names(points)}")


class GradCAM(Attribution):
    """Grad-CAM (Selvaraju et al. 2017) for any conv layer, upsampled to the input size.

    Channel weights are the spatial mean of the target logit's gradient at ``layer``; the map
    is Σ_c weight_c · activation_c, passed through ReLU (``relu=True``, as in the paper) and
    resized to the input with ``upsample`` ("bilinear" or "nearest"). The result is repeated
    over input channels so that it is shaped like the inputs.
    """

    name = "gradcam"

    def __init__(self, layer: str = "conv2.hook_post", relu: bool = True, upsample: str = "bilinear") -> None:
        if upsample not in ("bilinear", "nearest"):
            raise MechscopeError(f"upsample must be 'bilinear' or 'nearest', got {upsample!r}")
        self.layer, self.relu, self.upsample = layer, relu, upsample

    def layer_map(self, model, inputs, target) -> torch.Tensor:
        """The map at the layer's resolution, [B, 1, h, w]."""
        name = resolve_layer(model, self.layer)
        with torch.enable_grad():
            logits, cache = run_with_cache(model, inputs, names=[name], grad=True)
            act = cache[name]
            if act.dim() != 4:
                raise MechscopeError(f"Grad-CAM needs a conv layer [B, C, H, W]; {name} is {list(act.shape)}")
            (g,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), act)
        cam = (g.mean((2, 3), keepdim=True) * act).sum(1, keepdim=True).detach()
        return F.relu(cam) if self.relu else cam

    def _attribute(self, model, inputs, target):
        cam = self.layer_map(model, inputs, target)
        up = F.interpolate(cam, size=inputs.shape[2:], mode=self.upsample)
        return up.expand_as(inputs).clone()


class GuidedBackprop(Attribution):
    """Guided backpropagation (Springenberg et al. 2015): only positive gradients pass a ReLU."""

    name = "guided_backprop"
    gradient_based = True

    def _attribute(self, model, inputs, target):
        def positive(module, grad_input, grad_output):
            return tuple(F.relu(g) if g is not None else None for g in grad_input)

        with module_hooks(model, (nn.ReLU,), backward=positive) as found:
            if not found:
                raise MechscopeError("guided backprop needs nn.ReLU modules in the model; found none")
            return gradient(model, inputs, target)


@dataclass
class _Saved:
    input: torch.Tensor
    output: torch.Tensor


class DeepLift(Attribution):
    """DeepLIFT with the rescale rule (Shrikumar, Greenside & Kundaje 2017).

    The input and the baseline run as one batch. At every ReLU the gradient is replaced by the
    multiplier Δout/Δin (the plain gradient where |Δin| < eps); max-pooling passes the
    gradient to the winning input, the DeepLIFT authors' default for max-pooling. Attribution
    = (x − x') · multiplier, which sums to f(x) − f(x') through ReLUs and linear layers; through
    a max-pool only where the baseline's window is flat (its maximum is then wherever the input's
    is): a padded convolution before a pool breaks that at the image's edges, and the sum is then
    close, not exact.

    This equals Captum's DeepLift on this model to the last bit: Captum defines a rescale rule
    for max-pooling too, but when a ReLU feeds a max-pool directly its ReLU hook records the
    output gradient before the max-pool's override is applied, so that rule drops out.
    Nonlinear modules other than ReLU and max-pooling are refused, not silently linearised.
    """

    name = "deeplift"
    _unsupported = (
        nn.Sigmoid, nn.Tanh, nn.GELU, nn.ELU, nn.LeakyReLU, nn.Softplus, nn.SiLU, nn.Softmax, nn.LayerNorm, SoLU,
        ChannelNorm,
    )  # fmt: skip

    def __init__(self, baseline: float | torch.Tensor = 0.0, eps: float = 1e-10) -> None:
        self.baseline, self.eps = baseline, eps

    def _attribute(self, model, inputs, target):
        bad = [type(m).__name__ for m in model.modules() if isinstance(m, self._unsupported)]
        if bad:
            raise MechscopeError(f"DeepLift here supports ReLU and max-pooling only; the model has {bad[0]}")
        base = _baseline_like(self.baseline, inputs)
        saved: dict[nn.Module, list[_Saved]] = {}  # per call: a ReLU module may be called more than once

        def forward(module, args, output):
            saved.setdefault(module, []).append(_Saved(args[0].detach(), output.detach()))

        def rescale(module, grad_input, grad_output):  # calls come back in reverse order: the last call first
            s = saved[module].pop()
            x, x_ref = s.input.chunk(2)
            y, y_ref = s.output.chunk(2)
            delta_in, delta_out = torch.cat(2 * [x - x_ref]), torch.cat(2 * [y - y_ref])
            return (torch.where(delta_in.abs() < self.eps, grad_input[0], grad_output[0] * delta_out / delta_in),)

        both = torch.cat([inputs, base.contiguous()]).requires_grad_(True)
        with module_hooks(model, (nn.ReLU,), forward=forward, backward=rescale):
            with torch.enable_grad():
                out = target_logits(model, both, target.repeat(2))
                (g,) = torch.autograd.grad(out.sum(), both)
        return (inputs - base) * g[: inputs.shape[0]]


# ---------------------------------------------------------------------------------------------

METHODS: dict[str, type[Attribution]] = {
    cls.name: cls
    for cls in (
        Saliency,
        InputXGradient,
        IntegratedGradients,
        SmoothGrad,
        Occlusion,
        GradCAM,
        DeepLift,
        GuidedBackprop,
    )
}


def get_method(name: str, **options) -> Attribution:
    """An attribution method by name (``integrated_gradients``, ``gradcam``, ...)."""
    key = name.lower().replace("-", "_")
    aliases = {"ig": "integrated_gradients", "ixg": "input_x_gradient", "grad_cam": "gradcam", "gbp": "guided_backprop"}
    key = aliases.get(key, key)
    if key not in METHODS:
        raise MechscopeError(f"unknown attribution method {name!r}; valid methods: {', '.join(METHODS)}")
    return METHODS[key](**options)
