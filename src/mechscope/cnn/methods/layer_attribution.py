"""Layer and neuron attribution: which channels of a hidden layer make the model say "7".

The "Building Blocks" view (Olah et al. 2018): attribute a logit to every channel of a hidden
layer, per spatial position and summed over positions, and attribute one layer's channels to
an earlier layer's channels.

* :func:`layer_activation_x_gradient` a · ∂f/∂a at the layer (Captum's LayerGradientXActivation)
* :func:`layer_integrated_gradients` IG in the layer's activation space, from the activation at
  the baseline input to the activation at the input (Captum's LayerIntegratedGradients)
* :func:`channel_to_channel` how much each channel of a source layer contributes to each
  channel of a later layer, per input or averaged over a class

Layers are hook-point names (``conv1.hook_out``); a block name (``conv2``) means its
post-ReLU point. Every hook is removed before a function returns or raises.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mechscope.cnn.methods.attribution import (
    _baseline_like,
    _chunks,
    as_target,
    check_inputs,
    path_points,
    resolve_layer,
)
from mechscope.core.errors import MechscopeError
from mechscope.core.hooks import hooks, run_with_cache


@dataclass
class LayerAttribution:
    """Attribution of a target logit to a layer's units."""

    layer: str
    method: str
    per_position: torch.Tensor  # [B, C, H, W] (or [B, units] for a flat layer)
    delta: torch.Tensor | None = None  # completeness gap per input, for layer IG

    @property
    def per_channel(self) -> torch.Tensor:
        """Summed over spatial positions: [B, C]."""
        p = self.per_position
        return p.flatten(2).sum(2) if p.dim() > 2 else p


def layer_activation_x_gradient(model: nn.Module, inputs: torch.Tensor, target, layer: str) -> LayerAttribution:
    """a · ∂logit/∂a at every unit of ``layer``."""
    check_inputs(model, inputs)
    t = as_target(model, inputs, target)
    name = resolve_layer(model, layer)
    with torch.enable_grad():
        logits, cache = run_with_cache(model, inputs.detach(), names=[name], grad=True)
        act = cache[name]
        (g,) = torch.autograd.grad(logits.gather(1, t[:, None]).sum(), act)
    return LayerAttribution(name, "activation_x_gradient", (act * g).detach())


def layer_integrated_gradients(
    model: nn.Module,
    inputs: torch.Tensor,
    target,
    layer: str,
    baseline: float | torch.Tensor = 0.0,
    n_steps: int = 50,
    method: str = "gausslegendre",
    batch_size: int | None = 512,
) -> LayerAttribution:
    """Integrated Gradients in the activation space of ``layer``.

    The path runs from a' (the layer's activation for the baseline input) to a (for the input);
    the activation is replaced along it by a forward hook. Completeness: the attributions sum
    to f(x) − f(x'); ``delta`` holds the gap.
    """
    check_inputs(model, inputs)
    inputs = inputs.detach()
    t = as_target(model, inputs, target)
    name = resolve_layer(model, layer)
    alphas, weights = path_points(n_steps, method)
    base_in = _baseline_like(baseline, inputs).contiguous()
    with torch.no_grad():
        f_x, cache = run_with_cache(model, inputs, names=[name])
        f_b, cache_b = run_with_cache(model, base_in, names=[name])
    a, a_ref = cache[name], cache_b[name]
    diff = a - a_ref
    b = inputs.shape[0]
    total = torch.zeros_like(a)
    per_chunk = max(1, (batch_size or b * n_steps) // b)
    for s0, s1 in _chunks(n_steps, per_chunk):
        k = s1 - s0
        al = torch.tensor(alphas[s0:s1], dtype=a.dtype, device=a.device).view((k,) + (1,) * a.dim())
        path = (a_ref.unsqueeze(0) + al * diff.unsqueeze(0)).reshape(k * b, *a.shape[1:]).requires_grad_(True)

        def replace(act, hook, path=path):
            return path

        with hooks(model, fwd=[(name, replace)]), torch.enable_grad():
            out = model(inputs.repeat(k, *([1] * (inputs.dim() - 1))))
            (g,) = torch.autograd.grad(out.gather(1, t.repeat(k)[:, None]).sum(), path)
        w = torch.tensor(weights[s0:s1], dtype=a.dtype, device=a.device).view((k,) + (1,) * a.dim())
        total += (g.view(k, *a.shape) * w).sum(0)
    attr = diff * total
    gap = f_x.gather(1, t[:, None]).squeeze(1) - f_b.gather(1, t[:, None]).squeeze(1)
    return LayerAttribution(name, "integrated_gradients", attr, gap - attr.flatten(1).sum(1))


def channel_to_channel(
    model: nn.Module,
    inputs: torch.Tensor,
    source: str = "conv1.hook_out",
    target_layer: str = "conv2.hook_post",
    batch_size: int = 256,
) -> torch.Tensor:
    """Contribution of each source channel to each target channel: [B, C_target, C_source].

    Entry [b, j, i] = Σ_positions a_i · ∂(Σ_positions t_j)/∂a_i for input b: activation ×
    gradient of target channel j's total activation with respect to source channel i. Between
    a pooled conv output and the next conv's pre-activation this is exact (the map is linear):
    the entries of row j sum to channel j's total pre-activation minus its bias. All target
    channels are computed together (batched vector-Jacobian products).
    """
    check_inputs(model, inputs)
    src, tgt = resolve_layer(model, source), resolve_layer(model, target_layer)
    out = []
    for s0, s1 in _chunks(inputs.shape[0], batch_size):
        with torch.enable_grad():
            _, cache = run_with_cache(model, inputs[s0:s1].detach(), names=[src, tgt], grad=True)
            a, t = cache[src], cache[tgt]
            if t.dim() < 3:
                raise MechscopeError(f"target layer {tgt} has no spatial positions; use a conv layer")
            totals = t.flatten(2).sum(2)  # [b, C_t]
            c_t = totals.shape[1]
            eye = torch.eye(c_t, dtype=totals.dtype, device=totals.device).unsqueeze(1).expand(c_t, *totals.shape)
            (g,) = torch.autograd.grad(
                totals, a, grad_outputs=eye, is_grads_batched=True, allow_unused=True
            )  # [C_t, b, C_s, H, W]
            if g is None:
                raise MechscopeError(f"{tgt} does not depend on {src}: choose a source layer before the target")
        out.append((g * a.detach().unsqueeze(0)).flatten(3).sum(3).permute(1, 0, 2))  # [b, C_t, C_s]
    return torch.cat(out)


def class_channel_to_channel(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    source: str = "conv1.hook_out",
    target_layer: str = "conv2.hook_post",
    n_classes: int = 10,
) -> torch.Tensor:
    """:func:`channel_to_channel` averaged over the images of each class: [classes, C_t, C_s]."""
    labels = torch.as_tensor(labels)
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= n_classes):
        bad = int(labels.max()) if int(labels.max()) >= n_classes else int(labels.min())
        raise MechscopeError(f"label {bad} outside the {n_classes} classes 0..{n_classes - 1}")
    per_input = channel_to_channel(model, images, source, target_layer)
    out = torch.zeros(n_classes, *per_input.shape[1:], dtype=per_input.dtype, device=per_input.device)
    for k in range(n_classes):
        sel = labels == k
        if sel.any():
            out[k] = per_input[sel].mean(0)
    return out
