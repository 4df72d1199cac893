"""Is an attribution faithful to the model? Measured, not asserted.

* Deletion and insertion curves (Petsiuk et al. 2018, RISE): remove pixels from the image in
  attribution order (most important first), or add them to a blank image, and follow the
  target class probability. A faithful map makes the deletion curve fall fast (small area)
  and the insertion curve rise fast (large area). Each method is compared with the same
  curves for a random pixel order. Pixels already at the baseline (MNIST's black background)
  cannot be removed or revealed, so the steps run over the other pixels: a map's values on the
  background neither help nor hurt it (over every pixel, a method that spent its first steps on
  the background lost area for nothing).
* Model randomisation (Adebayo et al. 2018, "Sanity Checks for Saliency Maps"): re-initialise
  the layers from the top down, cascading, and compare the attributions of the randomised
  model with those of the trained one (Spearman rank correlation of |attribution|). A method
  that explains the model must change when the model's weights are destroyed: low
  correlation passes, high correlation means the map shows the input, not the model. The
  check is judged on the input's non-zero pixels: on the background, methods that multiply by
  the input give 0 and occluding changes nothing, for the trained and the random model alike,
  and those tied zeros alone lifted the whole-image ρ to 0.93-0.99 (it is kept beside).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from mechscope.cnn.methods.attribution import Attribution, as_target, check_inputs
from mechscope.core.stats import spearman


@dataclass
class Curves:
    fractions: torch.Tensor  # [S+1] fraction of pixels removed / inserted
    deletion: torch.Tensor  # [B, S+1] target probability
    insertion: torch.Tensor  # [B, S+1]

    @staticmethod
    def auc(curve: torch.Tensor, fractions: torch.Tensor) -> torch.Tensor:
        return torch.trapezoid(curve, fractions, dim=-1)

    @property
    def deletion_auc(self) -> float:
        return self.auc(self.deletion, self.fractions).mean().item()

    @property
    def insertion_auc(self) -> float:
        return self.auc(self.insertion, self.fractions).mean().item()


def pixel_scores(attributions: torch.Tensor) -> torch.Tensor:
    """One score per pixel [B, H*W]: attributions summed over input channels."""
    return attributions.sum(1).flatten(1)


def deletion_insertion(
    model: nn.Module,
    inputs: torch.Tensor,
    target,
    scores: torch.Tensor,
    steps: int = 28,
    baseline: float = 0.0,
    batch_size: int = 1024,
) -> Curves:
    """Deletion and insertion curves for pixel ``scores`` [B, H*W] (higher = more important).

    Only pixels that differ from the ``baseline`` (on some channel) can change: step k removes
    (deletion) or reveals (insertion) the ``round(k/steps · m)`` top ones of an image's m such
    pixels; removed pixels take the ``baseline`` value. Ties keep pixel order.
    """
    check_inputs(model, inputs)
    t = as_target(model, inputs, target)
    b, c, h, w = inputs.shape
    n = h * w
    changeable = (inputs - baseline).abs().sum(1).flatten(1) > 0  # [B, n]
    scores = torch.where(changeable, scores.to(torch.float64), torch.tensor(-torch.inf, dtype=torch.float64))
    order = scores.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(n).expand(b, n))  # rank[b, p] = position of pixel p
    fractions = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
    counts = torch.round(fractions[None] * changeable.sum(1, keepdim=True)).long()  # [B, S+1] pixels affected
    keep = (rank.unsqueeze(1) < counts.unsqueeze(-1)).to(inputs.dtype)  # [B, S+1, n] 1 = top-k pixel
    keep = keep.view(b, steps + 1, 1, h, w)
    x = inputs.unsqueeze(1)
    deleted = x * (1 - keep) + baseline * keep
    inserted = baseline * (1 - keep) + x * keep
    curves = []
    with torch.no_grad():
        for batch in (deleted, inserted):
            flat = batch.reshape(-1, c, h, w)
            tt = t.repeat_interleave(steps + 1)
            probs = torch.cat(
                [
                    F.softmax(model(flat[i : i + batch_size]), 1).gather(1, tt[i : i + batch_size, None]).squeeze(1)
                    for i in range(0, len(flat), batch_size)
                ]
            )
            curves.append(probs.view(b, steps + 1))
    return Curves(fractions, curves[0], curves[1])


def random_scores(shape: tuple[int, int], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g)


def spearman_within(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Spearman correlation per row over the positions where ``mask`` [B, N] is true: [B]; NaN for a row of under 2
    such positions (as :func:`~mechscope.core.stats.spearman` gives)."""
    a, b = a.flatten(1), b.flatten(1)
    return torch.stack([spearman(a[i][mask[i]][None], b[i][mask[i]][None])[0] for i in range(len(a))])


def randomise_cascading(model: nn.Module, layers: list, seed: int = 0):
    """Yield (layer, model copy) with ``layers`` re-initialised cumulatively, in the order given.

    A layer is a module path, or (label, [module paths]) for a layer made of several modules
    (a spec's :meth:`~mechscope.cnn.models.spec.CNNSpec.parameter_groups`). Conv2d and Linear weights
    are redrawn; norms keep theirs.
    """
    randomised = copy.deepcopy(model)
    modules = dict(randomised.named_modules())
    g = torch.Generator().manual_seed(seed)
    for layer in layers:
        name, paths = (layer, [layer]) if isinstance(layer, str) else layer
        targets = [modules[p] for p in paths]
        if not any(True for m in targets for _ in m.parameters()):
            raise ValueError(f"layer {name} has no parameters to randomise")
        with torch.no_grad():
            for sub in (s for m in targets for s in m.modules()):
                if isinstance(sub, (nn.Conv2d, nn.Linear)):
                    # the layer's own default initialisation (Kaiming uniform), from a seeded generator
                    bound = 1 / (sub.weight[0].numel() ** 0.5)
                    sub.weight.copy_((torch.rand(sub.weight.shape, generator=g) * 2 - 1) * bound)
                    if sub.bias is not None:
                        sub.bias.copy_((torch.rand(sub.bias.shape, generator=g) * 2 - 1) * bound)
        yield name, randomised


CURVES_OVER = "the pixels that differ from the baseline"
SANITY_ON = "the input's non-zero pixels, after the full cascade"


def final_rho(by_layer: dict) -> float | None:
    """The Spearman ρ after the whole cascade (every layer re-initialised), as the check reads it; None when there is
    none."""
    return list(by_layer.values())[-1] if by_layer else None


@dataclass(frozen=True)
class MethodFaithfulness:
    method: str
    deletion_auc: float
    insertion_auc: float
    randomisation: dict[str, float] = field(default_factory=dict)  # layer -> mean Spearman |attr|
    # the same over the input's non-zero pixels only: removes the agreement that methods which
    # multiply by the input get for free from the black background
    randomisation_on_input: dict[str, float] = field(default_factory=dict)
    deletion_curve: list[float] = field(default_factory=list)  # mean over inputs, per step
    insertion_curve: list[float] = field(default_factory=list)

    @property
    def gap(self) -> float:
        """insertion − deletion area: higher is more faithful."""
        return self.insertion_auc - self.deletion_auc


@dataclass(frozen=True)
class FaithfulnessReport:
    methods: list[MethodFaithfulness]
    random_deletion_auc: float
    random_insertion_auc: float
    layers: list[str]
    n_inputs: int
    steps: int
    fractions: list[float] = field(default_factory=list)
    random_deletion_curve: list[float] = field(default_factory=list)
    random_insertion_curve: list[float] = field(default_factory=list)
    sanity_threshold: float = 0.5
    # what the curves and the check ran over (None: a record of an older mechscope, over the whole image)
    curves_over: str | None = None

    def ranking(self) -> list[MethodFaithfulness]:
        """Methods that pass the randomisation check first, then by insertion − deletion gap."""

        def key(m: MethodFaithfulness):
            return (not self.passes(m), -m.gap)

        return sorted(self.methods, key=key)

    def passes(self, m: MethodFaithfulness) -> bool:
        """After the full cascade, |Spearman| below the threshold on the input's non-zero pixels (over the whole
        image for a record without them)."""
        last = [final_rho(r) for r in (m.randomisation_on_input, m.randomisation)]
        last = [v for v in last if v is not None and math.isfinite(v)]  # no foreground rho: the whole image's
        return not last or abs(last[0]) < self.sanity_threshold

    def to_dict(self) -> dict:
        return {
            "n_inputs": self.n_inputs,
            "steps": self.steps,
            "fractions": self.fractions,
            "random_order": {
                "deletion_auc": self.random_deletion_auc,
                "insertion_auc": self.random_insertion_auc,
                "deletion_curve": self.random_deletion_curve,
                "insertion_curve": self.random_insertion_curve,
            },
            "randomisation_layers_top_down": self.layers,
            "sanity_threshold": self.sanity_threshold,
            "sanity_check_on": None if self.curves_over is None else SANITY_ON,
            "curves_over": self.curves_over,
            "methods": {
                m.method: {
                    "deletion_auc": m.deletion_auc,
                    "insertion_auc": m.insertion_auc,
                    "insertion_minus_deletion": m.gap,
                    "beats_random_order": m.deletion_auc < self.random_deletion_auc
                    and m.insertion_auc > self.random_insertion_auc,
                    "randomisation_spearman": m.randomisation,
                    "randomisation_spearman_on_input_pixels": m.randomisation_on_input,
                    "passes_randomisation_check": self.passes(m),
                    "deletion_curve": m.deletion_curve,
                    "insertion_curve": m.insertion_curve,
                }
                for m in self.methods
            },
            "ranking": [m.method for m in self.ranking()],
        }

    @classmethod
    def from_dict(cls, d: dict) -> FaithfulnessReport:
        """The report ``to_dict`` wrote (faithfulness.json holds it at its top level)."""
        r = d["random_order"]
        methods = [
            MethodFaithfulness(name, m["deletion_auc"], m["insertion_auc"], m["randomisation_spearman"],
                               m["randomisation_spearman_on_input_pixels"], m["deletion_curve"], m["insertion_curve"])
            for name, m in d["methods"].items()
        ]  # fmt: skip
        return cls(methods, r["deletion_auc"], r["insertion_auc"], list(d["randomisation_layers_top_down"]),
                   d["n_inputs"], d["steps"], list(d["fractions"]), list(r["deletion_curve"]),
                   list(r["insertion_curve"]), d["sanity_threshold"], d.get("curves_over"))  # fmt: skip


def evaluate_faithfulness(
    model: nn.Module,
    inputs: torch.Tensor,
    target,
    methods: dict[str, Attribution],
    layers_top_down: list | None = None,
    steps: int = 28,
    seed: int = 0,
    attributions: dict[str, torch.Tensor] | None = None,
    baseline: float = 0.0,
) -> FaithfulnessReport:
    """Deletion/insertion AUCs and cascading randomisation correlations for every method.

    ``layers_top_down``: module paths or (label, [paths]) groups, last layer first (default: the
    model's parameterised top-level children); ``baseline``: the value deleted pixels take.
    """
    check_inputs(model, inputs)
    t = as_target(model, inputs, target)
    layers = layers_top_down if layers_top_down is not None else _default_layers(model)
    attributions = dict(attributions or {})
    for name, m in methods.items():
        if name not in attributions:
            attributions[name] = m.attribute(model, inputs, t)
    results = {}
    for name in methods:
        curves = deletion_insertion(model, inputs, t, pixel_scores(attributions[name]), steps, baseline)
        results[name] = MethodFaithfulness(
            name,
            curves.deletion_auc,
            curves.insertion_auc,
            deletion_curve=curves.deletion.mean(0).tolist(),
            insertion_curve=curves.insertion.mean(0).tolist(),
        )
    rnd = deletion_insertion(
        model, inputs, t, random_scores((inputs.shape[0], inputs[0, 0].numel()), seed), steps, baseline
    )
    on_input = (inputs - baseline).abs().sum(1).flatten(1) > 0  # [B, H*W] pixels off the background
    for layer, randomised in randomise_cascading(model, layers, seed):
        for name, m in methods.items():
            before, after = attributions[name].abs().sum(1), m.attribute(randomised, inputs, t).abs().sum(1)
            rho = spearman(before, after)
            results[name].randomisation[layer] = rho.nan_to_num(0.0).mean().item()
            rho_in = spearman_within(before, after, on_input)  # NaN for an image of under 2 such pixels: left out
            finite = rho_in[torch.isfinite(rho_in)]
            results[name].randomisation_on_input[layer] = finite.mean().item() if len(finite) else float("nan")
    return FaithfulnessReport(
        list(results.values()),
        rnd.deletion_auc,
        rnd.insertion_auc,
        [layer if isinstance(layer, str) else layer[0] for layer in layers],
        inputs.shape[0],
        steps,
        fractions=rnd.fractions.tolist(),
        random_deletion_curve=rnd.deletion.mean(0).tolist(),
        random_insertion_curve=rnd.insertion.mean(0).tolist(),
        curves_over=CURVES_OVER,
    )


def _default_layers(model: nn.Module) -> list[str]:
    """Parameterised top-level children, last first (fc, conv2, conv1 for the CNN)."""
    names = [n for n, m in model.named_children() if any(True for _ in m.parameters())]
    return list(reversed(names))
