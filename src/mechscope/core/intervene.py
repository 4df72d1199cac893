"""Ablation and activation patching: replace part of one layer's activations and watch the output.

Both are the same experiment. Pick a layer and a set of its units (a *mask* over the layer's
per-input activation shape: one channel, one position of one channel, a group of channels),
replace those units' values with something else, run the rest of the network, and compare
the output with the untouched run.

* **zero-ablation** replaces the units with 0: "what if this unit never fired?" For a ReLU
  layer 0 is a real, if extreme, value.
* **mean-ablation** replaces them with their mean over a reference set of inputs (per
  position): "what if this unit carried no information about *this* input?" It keeps the
  downstream layers in the range they were trained on, so it is usually the fairer test.
* **resample-ablation** replaces them with their values on another input drawn at random
  (here: one of another class). Mean-ablation is not neutral when the mean itself is read as
  some class (on MNIST the mean conv2 map reads as an 8, so mean-ablating channels pushes
  every image towards 8 and cannot show that a channel is needed for the 8s); resampling
  keeps activations on the data and removes the input's own information without that bias.
  :func:`resample_donors` draws the donors, seeded.
* **activation patching** replaces them with their values on *another* input: run a 3,
  patch in what one channel at one position saw on an 8, and measure how far the logit
  difference logit(8) - logit(3) moves. Positions where one patch moves it a lot are where
  the network decides 3 versus 8.

:func:`intervene` is the one generic function; :func:`ablate`, :func:`patch` and
:func:`readout_intervene` are thin specialisations. :func:`intervene_at` is the same experiment
started from activations already cached at the layer: only the layers after it run (through
the model's spec, :func:`mechscope.cnn.models.spec.walk`), which makes many interventions at an
early layer cheap; a test checks it against :func:`intervene`. ``readout_intervene`` computes the same
thing in closed form for the input of a final linear layer (the logits are linear in it),
which makes ablating each of the CNN's 512 read-out inputs one matrix product; a test checks
it against :func:`intervene`.

Masks are boolean tensors shaped ``[N, *unit_shape]``: N interventions at once.
:func:`channel_masks` and :func:`unit_masks` build the usual ones. Every hook is removed before
a function returns or raises.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from mechscope.core.errors import MechscopeError
from mechscope.core.hooks import hooks, run_with_cache, select
from mechscope.core.kept_sum import unit_ablation_accuracy
from mechscope.core.torch_utils import described, evaluating
from mechscope.core.validate import check_int

Reduce = Callable[[torch.Tensor], torch.Tensor]  # [k, B, ...outputs] -> [k, ...]


def channel_masks(unit_shape: tuple[int, ...], channels: list[int] | None = None) -> torch.Tensor:
    """One mask per channel (dim 0 of ``unit_shape``): [N, *unit_shape]."""
    c = unit_shape[0]
    channels = list(range(c)) if channels is None else [check_int(ch, "a channel") for ch in channels]  # 1.5
    for ch in channels:
        if not 0 <= ch < c:
            raise MechscopeError(f"channel {ch} out of range: valid channels 0..{c - 1}")
    masks = torch.zeros(len(channels), *unit_shape, dtype=torch.bool)
    for i, ch in enumerate(channels):
        masks[i, ch] = True
    return masks


def unit_masks(unit_shape: tuple[int, ...]) -> torch.Tensor:
    """One mask per single unit (channel and position), in flattened (c, y, x) order: [N, *unit_shape]."""
    n = 1
    for s in unit_shape:
        n *= s
    return torch.eye(n, dtype=torch.bool).view(n, *unit_shape)


def group_mask(unit_shape: tuple[int, ...], channels: list[int]) -> torch.Tensor:
    """A single mask covering several channels: [1, *unit_shape]."""
    return channel_masks(unit_shape, channels).any(0, keepdim=True)


def intervene(
    model: nn.Module,
    inputs: torch.Tensor,
    layer: str,
    masks: torch.Tensor,
    replacement: torch.Tensor | float,
    reduce: Reduce | None = None,
    batch_size: int = 2048,
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Run ``model`` once per mask with the masked units of ``layer`` replaced.

    ``forward`` runs the model on a batch of ``inputs`` (default ``model(x)``); a transformer
    passes a cached residual stream and ``lambda x: model.run_blocks(x, layer)`` so that each
    intervention recomputes only the layers it can change.

    ``inputs`` [B, ...]; ``masks`` [N, *unit_shape] bool, where unit_shape is the activation's
    shape for one input; ``replacement`` a scalar, [*unit_shape] (e.g. a mean) or
    [B, *unit_shape] (e.g. another input's activations, one per input). Inside a mask the
    activation becomes the replacement, elsewhere it is left exactly as it was, so an empty
    mask reproduces the plain forward bit for bit.

    Returns the model's outputs stacked [N, B, ...], or ``reduce`` applied to each group of
    masks' outputs ([k, B, ...] -> [k, ...]) and concatenated, which keeps memory at one group.
    Several masks share one forward when the inputs are few (B x k ≤ ``batch_size``).
    """
    (name,) = select(model, layer)  # an unknown layer raises before any work
    check_int(batch_size, "batch_size", 1)
    inputs = inputs.detach()
    b = inputs.shape[0]
    forward = forward or model
    probe: dict[str, torch.Tensor] = {}

    def grab(act: torch.Tensor, hook) -> None:
        probe[name] = act

    with evaluating(model), torch.no_grad(), hooks(model, fwd=[(name, grab)]):  # no BatchNorm update
        forward(inputs[:1])
    unit_shape = tuple(probe[name].shape[1:])
    if masks.dtype != torch.bool or tuple(masks.shape[1:]) != unit_shape:
        raise MechscopeError(
            f"masks for {name} must be boolean and shaped [N, {', '.join(map(str, unit_shape))}], "
            f"got {masks.dtype} {list(masks.shape)}"
        )
    if len(masks) == 0:
        raise MechscopeError(f"no masks for {name}: give at least one")
    rep = _checked_replacement(replacement, probe[name].dtype, unit_shape, b)
    per_input = rep.dim() == len(unit_shape) + 1

    k = max(1, min(len(masks), batch_size // max(b, 1)))  # masks per forward
    chunk = b if k > 1 else min(b, batch_size)  # inputs per forward
    results = []
    with evaluating(model):
        for m0 in range(0, len(masks), k):
            m = masks[m0 : m0 + k]  # [k, *S]
            kk = len(m)
            outs = []
            for s0 in range(0, b, chunk):
                s1 = min(b, s0 + chunk)
                bb = s1 - s0
                r = rep[s0:s1] if per_input else rep

                def edit(act, hook, m=m, r=r, kk=kk, bb=bb):
                    a = act.reshape(kk, bb, *unit_shape)
                    return torch.where(m[:, None], r, a).reshape(act.shape)

                x = inputs[s0:s1]
                if kk > 1:
                    x = x.repeat(kk, *([1] * (x.dim() - 1)))
                with torch.no_grad(), hooks(model, fwd=[(name, edit)]):
                    out = forward(x)
                outs.append(out.view(kk, bb, *out.shape[1:]))
            out = torch.cat(outs, 1)  # [k, B, ...]
            results.append(reduce(out) if reduce is not None else out)
    return torch.cat(results)


def _checked_replacement(replacement, dtype: torch.dtype, unit_shape: tuple, b: int) -> torch.Tensor:
    """``replacement`` as a tensor: a scalar, [*unit_shape] or [B, *unit_shape] (or shapes that broadcast to one),
    finite; one line otherwise (a mean of the wrong layer was torch.where's broadcast error, NaN ran through)."""
    rep = torch.as_tensor(replacement, dtype=dtype)
    want = (b, *unit_shape) if rep.dim() == len(unit_shape) + 1 else unit_shape
    if rep.dim() == len(unit_shape) + 1 and rep.shape[0] != b:
        raise MechscopeError(f"replacement has {rep.shape[0]} rows for {b} inputs")
    try:
        fits = torch.broadcast_shapes(rep.shape, want) == want
    except RuntimeError:
        fits = False
    if not fits:
        raise MechscopeError(
            f"a replacement of shape {list(rep.shape)} does not fit the layer's activations: give a number, "
            f"[{', '.join(map(str, unit_shape))}] or [{b}, {', '.join(map(str, unit_shape))}] (one per input)"
        )
    if not bool(torch.isfinite(rep).all()):
        raise MechscopeError("the replacement holds NaN or inf")
    return rep


def intervene_at(
    spec,
    acts: torch.Tensor,
    layer: str,
    masks: torch.Tensor,
    replacement: torch.Tensor | float,
    reduce: Reduce | None = None,
    batch_size: int = 2048,
) -> torch.Tensor:
    """:func:`intervene` from the activations ``acts`` [B, *unit_shape] that ``layer`` has on the inputs.

    Runs only the rest of the network (``spec.run_from``, a :class:`~mechscope.cnn.models.spec.CNNSpec`),
    starting at the hook point itself; the result equals :func:`intervene` on the inputs.
    """
    def forward(a: torch.Tensor) -> torch.Tensor:
        return spec.run_from(layer, a, inclusive=True)

    return intervene(spec.model, acts, layer, masks, replacement, reduce, batch_size, forward=forward)


def ablate(
    model: nn.Module,
    inputs: torch.Tensor,
    layer: str,
    masks: torch.Tensor,
    kind: str = "mean",
    mean: torch.Tensor | None = None,
    reduce: Reduce | None = None,
    batch_size: int = 2048,
) -> torch.Tensor:
    """Zero- or mean-ablate each mask's units (``mean`` [*unit_shape], see :func:`layer_means`)."""
    return intervene(model, inputs, layer, masks, _replacement(kind, mean), reduce, batch_size)


def patch(
    model: nn.Module,
    corrupted: torch.Tensor,
    clean: torch.Tensor,
    layer: str,
    masks: torch.Tensor,
    reduce: Reduce | None = None,
    batch_size: int = 2048,
) -> torch.Tensor:
    """Run ``corrupted`` inputs with each mask's units taken from the matching ``clean`` input."""
    if corrupted.shape != clean.shape:
        raise MechscopeError(
            f"clean and corrupted inputs differ in shape: {list(clean.shape)} vs {list(corrupted.shape)}"
        )
    (name,) = select(model, layer)
    with torch.no_grad():
        _, cache = run_with_cache(model, clean, names=[name])
    return intervene(model, corrupted, name, masks, cache[name], reduce, batch_size)


def readout_intervene(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    acts: torch.Tensor,
    masks: torch.Tensor,
    replacement: torch.Tensor | float,
    reduce: Reduce | None = None,
    logits: torch.Tensor | None = None,
    chunk: int = 64,
) -> torch.Tensor:
    """:func:`intervene` at the input of a final linear layer, in closed form.

    ``weight`` [K, D], ``acts`` [B, D] (the read-out's inputs), ``masks`` [N, D] bool,
    ``replacement`` scalar, [D] or [B, D]. The logits are linear in ``acts``, so replacing the
    masked units changes them by ((r - a) * mask) @ weightᵀ. ``logits`` [B, K] are the
    unchanged ones (computed here when not given): an empty mask returns them bit for bit.
    Returns [N, B, K] or ``reduce`` of each chunk of masks as in :func:`intervene`. One-unit masks reduced by
    :func:`class_accuracy` take :func:`~mechscope.core.kept_sum.unit_ablation_accuracy` (the same numbers).
    """
    if masks.dtype != torch.bool or masks.dim() != 2 or masks.shape[1] != acts.shape[1]:
        raise MechscopeError(f"masks must be boolean [N, {acts.shape[1]}], got {masks.dtype} {list(masks.shape)}")
    if len(masks) == 0:
        raise MechscopeError("no masks: give at least one")
    if logits is None:
        logits = nn.functional.linear(acts, weight, bias)
    diff = (torch.as_tensor(replacement, dtype=acts.dtype) - acts).expand_as(acts)  # [B, D]
    b, d = acts.shape
    one_hot = bool((masks.sum(1) == 1).all())
    if one_hot and isinstance(reduce, ClassAccuracy):  # only the inputs a unit can flip (same numbers)
        units = masks.nonzero()[:, 1]
        fast = unit_ablation_accuracy(logits, diff, weight, units, reduce.labels, reduce.n_classes)
        if fast is not None:
            return fast
    if not one_hot:  # dense masks: [k, B, D] per chunk, bounded at 2^25 elements
        chunk = max(1, min(chunk, 2**25 // max(b * d, 1)))
    results = []
    for m0 in range(0, len(masks), chunk):
        m = masks[m0 : m0 + chunk]  # [k, D]
        if one_hot:  # one unit each: its difference times its weight column
            unit = m.float().argmax(1)  # [k]
            delta = diff[:, unit].T[:, :, None] * weight[:, unit].T[:, None, :]  # [k, B, K]
        else:
            delta = (diff[None] * m[:, None, :].to(acts.dtype)) @ weight.T  # [k, B, K]
        out = logits.unsqueeze(0) + delta
        out = torch.where(m.any(1)[:, None, None], out, logits.unsqueeze(0))  # empty mask: untouched
        results.append(reduce(out) if reduce is not None else out)
    return torch.cat(results)


def readout_channel_contributions(
    weight: torch.Tensor, acts: torch.Tensor, reference: torch.Tensor, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel terms of a linear read-out, for fast searches over which channels to keep.

    ``weight`` [K, C*P], ``acts`` [B, C, P] (channels × positions), ``reference`` [C, P] (e.g.
    the mean). With every channel outside a set S replaced by the reference, the logits are
    ``base + contrib[:, S].sum(1)``: returns ``base`` [K] = the logits of the reference itself
    and ``contrib`` [B, C, K] = each channel's (a − reference) · weight.
    """
    k_out = weight.shape[0]
    w = weight.view(k_out, *acts.shape[1:])  # [K, C, P]
    base = torch.nn.functional.linear(reference.flatten()[None], weight, bias)[0]  # [K]
    contrib = torch.einsum("bcp,kcp->bck", acts - reference, w)
    return base, contrib


def derangement(n: int, g: torch.Generator) -> torch.Tensor:
    """A permutation of 0..n-1 that moves every index, drawn from ``g`` (uniform over derangements: permutations
    are drawn until one moves every index, about e of them)."""
    if n < 2:
        raise MechscopeError(f"a derangement needs at least two items, got {n}")
    while True:
        p = torch.randperm(n, generator=g)
        if not (p == torch.arange(n)).any():
            return p


def resample_donors(labels: torch.Tensor, seed: int = 0, other_class: bool = True) -> torch.Tensor:
    """For each input, the index of a random donor input: [N] -> [N], reproducible from ``seed``.

    With ``other_class`` the donor's label differs from the input's (uniform over those
    inputs); otherwise any input but itself, uniform: the data distribution, as causal scrubbing
    resamples. Other-class donors are biased: every replacement then comes from a different class,
    so "resample-ablation hurts the class" partly measures the other classes' values pulling the
    input away; draw from the data distribution unless that is the question. Use
    ``acts[donors]`` as a per-input replacement.
    """
    n = len(labels)
    if n < 2:
        raise MechscopeError("resampling needs at least two inputs")
    g = torch.Generator().manual_seed(seed)
    if not other_class:
        pick = torch.randint(0, n - 1, (n,), generator=g)
        return pick + (pick >= torch.arange(n)).long()  # skip the input itself
    donors = torch.empty(n, dtype=torch.long)
    for c in labels.unique().tolist():
        mine = (labels == c).nonzero().flatten()
        pool = (labels != c).nonzero().flatten()
        if len(pool) == 0:
            raise MechscopeError(f"every input has label {c}: no donor of another class")
        donors[mine] = pool[torch.randint(0, len(pool), (len(mine),), generator=g)]
    return donors


def layer_means(model: nn.Module, inputs: torch.Tensor, layers: list[str], batch_size: int = 2000) -> dict:
    """Mean activation of each layer over ``inputs``, per unit and position: {layer: [*unit_shape]}."""
    names = list(select(model, layers))
    check_int(batch_size, "batch_size", 1)
    if len(inputs) == 0:
        raise MechscopeError("layer_means needs at least one input")
    sums: dict[str, torch.Tensor] = {}
    for s0 in range(0, len(inputs), batch_size):
        with torch.no_grad():
            _, cache = run_with_cache(model, inputs[s0 : s0 + batch_size], names=names)
        for n in names:
            part = cache[n].double().sum(0)
            sums[n] = part if n not in sums else sums[n] + part
    return {n: (sums[n] / len(inputs)).float() for n in names}


class ClassAccuracy:
    """A ``reduce`` for :func:`intervene`: per-class accuracy [k, n_classes] from logits [k, B, K]. Its labels are
    kept, so :func:`readout_intervene` can compute the same numbers without building every ablated logit."""

    def __init__(self, labels: torch.Tensor, n_classes: int = 10) -> None:
        n_classes = check_int(n_classes, "n_classes", 1)
        if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.is_floating_point():
            raise MechscopeError(f"labels must be a 1-D tensor of class indices, got {described(labels, dtype=True)}")
        if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < n_classes:
            raise MechscopeError(f"labels must lie in 0..{n_classes - 1}, got {int(labels.min())}..{int(labels.max())}")
        self.labels, self.n_classes = labels, n_classes
        self.counts = torch.bincount(labels, minlength=n_classes).clamp(min=1).double()

    def __call__(self, out: torch.Tensor) -> torch.Tensor:
        if out.dim() != 3 or out.shape[1:] != (len(self.labels), self.n_classes):
            raise MechscopeError(
                f"expected logits [k, {len(self.labels)}, {self.n_classes}] (one row per label, one column per class), "
                f"got {list(out.shape)}"
            )
        correct = (out.argmax(-1) == self.labels).double()  # [k, B]
        per = torch.zeros(out.shape[0], self.n_classes, dtype=torch.float64)
        per.index_add_(1, self.labels, correct)
        return per / self.counts


def class_accuracy(labels: torch.Tensor, n_classes: int = 10) -> Reduce:
    """A ``reduce`` for :func:`intervene`: per-class accuracy [k, n_classes] from logits [k, B, K]."""
    return ClassAccuracy(labels, n_classes)


def _replacement(kind: str, mean: torch.Tensor | None) -> torch.Tensor | float:
    if kind == "zero":
        return 0.0
    if kind == "mean":
        if mean is None:
            raise MechscopeError("mean-ablation needs the layer's mean activation (see layer_means)")
        return mean
    raise MechscopeError(f"unknown ablation kind {kind!r}; expected zero or mean")
