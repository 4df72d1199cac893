"""Neurons of an image tower read as Goh et al. (2021, "Multimodal Neurons in Artificial Neural Networks") read them.

A neuron is one unit of an image-tower MLP, ``vision.blocks.L.mlp.hook_post`` [B,P,M], named ``L.U``. Its response
to an image is its activation averaged over the image's tokens (``reduce="mean"``, as a CNN channel is averaged over
positions), or its largest activation (``max``), or its activation at the class token (``cls``).

* :func:`activations`: every neuron's response to a set of images, [N, L·M];
* :func:`multimodality`: for each concept, how strongly each neuron separates the concept's *pictures* from other
  concepts' pictures and the concept's *written name* from other names. Each separation is a d′: the difference of
  the means (this concept minus the others) over the neuron's standard deviation on all images of that modality
  (population sd; a neuron that never varies scores 0). A neuron's multimodality for the concept is the smaller
  of the two, so it is high only when the neuron responds to both. Against it: control neurons drawn at random
  (seeded; their mean and sd) and a mismatched null, the best neuron's score when a concept's pictures are paired
  with *another* concept's name (so the best of many neurons is compared with the best of many neurons);
  a concept gets a multimodal neuron when its best neuron beats every mismatched pairing and reaches ``min_score``;
* :func:`text_probe`: a neuron's response to drawn words, each word averaged over fonts, sizes and places;
* :func:`text_alignment`: which words' text embeddings the neuron's contribution to the image embedding points at
  (the paper's "faceted" reading through the rest of the tower and the projection): the change in the unit-norm
  image embedding when the neuron is zeroed, averaged over its top images, dotted with each word's unit-norm text
  embedding (averaged over prompt templates);
* :func:`top_examples` (a neuron's top images and the patch where it fires most), :func:`pixel_attribution`
  (which pixels of an image make it respond: the CNN half's integrated gradients) and :func:`visualise` (feature
  visualisation with the CNN half's parameterisations, transforms, diversity term and optimiser,
  :func:`mechscope.cnn.methods.featvis.render`).

Methods compute and return; hooks go on and off through :mod:`mechscope.core.hooks`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mechscope.clip.models.views import ImageModel
from mechscope.core.errors import MechscopeError
from mechscope.core.hooks import hooks
from mechscope.core.results import Result, figure_data
from mechscope.core.torch_utils import evaluating
from mechscope.core.validate import indices

SITE = "mlp.hook_post"
REDUCE = ("mean", "max", "cls")


def layer_name(layer: int) -> str:
    return f"vision.blocks.{layer}.{SITE}"


def parse_neuron(text: str) -> tuple[int, int]:
    try:
        return indices(str(text))
    except ValueError:
        raise MechscopeError(f"expected a neuron as LAYER.UNIT (for example 1.37), got {text!r}") from None


def check_layers(view: ImageModel, layers) -> list[int]:
    n = view.vision.cfg.n_layers
    layers = list(range(n)) if not layers else [int(x) for x in layers]
    bad = [x for x in layers if not 0 <= x < n]
    if bad:
        raise MechscopeError(f"image-tower layer {bad[0]} out of range: the tower has layers 0..{n - 1}")
    if len(set(layers)) != len(layers):
        raise MechscopeError(f"a layer is given twice: {layers}")
    return layers


def check_neuron(view: ImageModel, layer: int, unit: int) -> None:
    cfg = view.vision.cfg
    if not 0 <= layer < cfg.n_layers:
        raise MechscopeError(f"neuron {layer}.{unit}: the image tower has layers 0..{cfg.n_layers - 1}")
    if not 0 <= unit < cfg.d_mlp:
        raise MechscopeError(f"neuron {layer}.{unit}: layer {layer} has neurons 0..{cfg.d_mlp - 1}")


def check_reduce(view: ImageModel, reduce: str) -> None:
    if reduce not in REDUCE:
        raise MechscopeError(f"reduce must be one of {', '.join(REDUCE)}, got {reduce!r}")
    if reduce == "cls" and not view.vision.cfg.class_token:
        raise MechscopeError("this image tower has no class token (SigLIP): use reduce mean or max")


def _reduce(x: torch.Tensor, reduce: str) -> torch.Tensor:
    if reduce == "mean":
        return x.mean(1)
    if reduce == "max":
        return x.max(1).values
    return x[:, 0]


@torch.no_grad()
def activations(view: ImageModel, unit: torch.Tensor, layers: list[int], reduce: str = "mean",
                batch_size: int = 64) -> torch.Tensor:  # fmt: skip
    """Each neuron's response to each image: [N, len(layers)·M] (layer-major: column l·M + u is neuron layers[l].u)."""
    check_reduce(view, reduce)
    names = [layer_name(layer) for layer in layers]
    out: list[torch.Tensor] = []
    grabbed: dict[str, torch.Tensor] = {}

    def grab(x, hook):
        grabbed[hook.name] = _reduce(x.float(), reduce).cpu()

    with evaluating(view), hooks(view, fwd=[(n, grab) for n in names]):
        for i in range(0, len(unit), batch_size):
            grabbed.clear()
            view(unit[i : i + batch_size])
            out.append(torch.cat([grabbed[n] for n in names], 1))
    m = view.vision.cfg.d_mlp
    return torch.cat(out) if out else torch.zeros(0, len(layers) * m)


def column_neuron(column: int, layers: list[int], d_mlp: int) -> tuple[int, int]:
    return layers[column // d_mlp], column % d_mlp


# ---- multimodality ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ConceptScore(Result):
    """One concept's most multimodal neuron, against control neurons and mismatched pairings."""

    concept: str
    forms: tuple[str, ...]  # the written forms drawn (its name, its numeral)
    neuron: str  # L.U
    layer: int
    unit: int
    score: float  # min(picture_d, word_d) of the best neuron
    picture_d: float
    word_d: float
    control_mean: float  # the score of neurons drawn at random
    control_sd: float
    control_above: float  # fraction of control neurons scoring at least the best neuron's score
    z: float  # (score - control_mean) / control_sd
    null_mean: float  # the best neuron's score with this concept's pictures and another concept's name
    null_sd: float
    null_max: float
    multimodal: bool
    runner_up: str = ""  # the second-best neuron and its score
    runner_up_score: float = float("nan")


@dataclass(frozen=True)
class Multimodality(Result):
    concepts: tuple[ConceptScore, ...]
    n_neurons: int
    n_controls: int
    min_score: float
    n_pictures: int
    n_words: int
    n_multimodal: int
    scores: torch.Tensor | None = figure_data()  # [C, neurons] min(picture_d, word_d)
    picture_d: torch.Tensor | None = figure_data()  # [C, neurons]
    word_d: torch.Tensor | None = figure_data()


def dprime(acts: torch.Tensor, labels: torch.Tensor, n_concepts: int) -> torch.Tensor:
    """[C, neurons]: (mean over the concept's images - mean over the others) / sd over all images (0 where sd = 0)."""
    acts = acts.double()
    sd = acts.std(0, unbiased=False)
    out = torch.zeros(n_concepts, acts.shape[1], dtype=torch.float64)
    for c in range(n_concepts):
        inside = labels == c
        if not inside.any() or inside.all():
            raise MechscopeError(f"concept {c}: needs images of its own and of other concepts")
        out[c] = acts[inside].mean(0) - acts[~inside].mean(0)
    return torch.where(sd > 0, out / sd.clamp(min=1e-300), torch.zeros(()))


def multimodality(picture_acts: torch.Tensor, picture_labels: torch.Tensor, word_acts: torch.Tensor,
                  word_labels: torch.Tensor, names: list[str], forms: list[list[str]], layers: list[int],
                  d_mlp: int, n_controls: int = 100, min_score: float = 1.0,
                  seed: int = 0) -> Multimodality:  # fmt: skip
    """Each concept's most multimodal neuron from the responses to its pictures and its drawn name (see the module
    docstring); ``picture_acts`` [Np, neurons], ``word_acts`` [Nw, neurons] from :func:`activations`."""
    c = len(names)
    if c < 2:
        raise MechscopeError(f"multimodality needs at least two concepts, got {c}")
    pd = dprime(picture_acts, picture_labels, c)
    wd = dprime(word_acts, word_labels, c)
    score = torch.minimum(pd, wd)  # [C, N]
    n = score.shape[1]
    g = torch.Generator().manual_seed(seed)
    controls = torch.randperm(n, generator=g)[: min(n_controls, n)]
    rows = []
    for i, name in enumerate(names):
        order = score[i].argsort(descending=True)
        best = int(order[0])
        s = float(score[i, best])
        ctrl = score[i, controls]
        cm, cs = float(ctrl.mean()), float(ctrl.std(unbiased=False))
        null = torch.stack([torch.minimum(pd[i], wd[j]).max() for j in range(c) if j != i])
        layer, unit = column_neuron(best, layers, d_mlp)
        second = int(order[1]) if n > 1 else best
        l2, u2 = column_neuron(second, layers, d_mlp)
        multimodal = bool(s > float(null.max()) and s >= min_score)
        rows.append(ConceptScore(
            name, tuple(forms[i]), f"{layer}.{unit}", layer, unit, s, float(pd[i, best]), float(wd[i, best]), cm, cs,
            float((ctrl >= s).double().mean()), (s - cm) / cs if cs > 0 else float("nan"), float(null.mean()),
            float(null.std(unbiased=False)), float(null.max()), multimodal, f"{l2}.{u2}", float(score[i, second]),
        ))  # fmt: skip
    return Multimodality(tuple(rows), n, len(controls), min_score, len(picture_acts), len(word_acts),
                         sum(r.multimodal for r in rows), score.float(), pd.float(), wd.float())  # fmt: skip


# ---- one neuron read in full --------------------------------------------------------------------


def top_examples(acts: torch.Tensor, column: int, k: int) -> tuple[list[int], list[float]]:
    """The ``k`` images (indices) where the neuron of ``column`` responds most, highest first, and the responses."""
    v, i = acts[:, column].topk(min(k, len(acts)))
    return i.tolist(), v.tolist()


@torch.no_grad()
def hot_patch(view: ImageModel, unit: torch.Tensor, layer: int, neuron: int) -> list[tuple[int, int, int, int] | None]:
    """Per image, the pixel box (top, left, bottom, right) of the patch where the neuron fires most (None: the class
    token)."""
    cfg = view.vision.cfg
    got = {}

    def grab(x, hook):
        got["x"] = x[:, :, neuron].float()

    with evaluating(view), hooks(view, fwd=[(layer_name(layer), grab)]):
        view(unit)
    boxes = []
    for pos in got["x"].argmax(1).tolist():
        p = pos - int(cfg.class_token)
        if p < 0:
            boxes.append(None)
            continue
        r, c = divmod(p, cfg.grid)
        s = cfg.patch_size
        boxes.append((r * s, c * s, (r + 1) * s, (c + 1) * s))
    return boxes


def text_probe(view: ImageModel, word_unit: torch.Tensor, word_labels: torch.Tensor, words: list[str],
               columns: list[int], layers: list[int], reduce: str = "mean") -> torch.Tensor:  # fmt: skip
    """Mean response of each neuron (``columns``) to each word's drawings: [len(words), len(columns)]."""
    if len(word_labels) != len(word_unit):
        raise MechscopeError(f"text_probe: {len(word_labels)} labels for {len(word_unit)} drawings")
    undrawn = [w for i, w in enumerate(words) if not bool((word_labels == i).any())]
    if undrawn:  # a mean over no drawings is NaN
        raise MechscopeError(f"text_probe: no drawing of {', '.join(map(repr, undrawn[:3]))}"
                             + (f" and {len(undrawn) - 3} more" if len(undrawn) > 3 else ""))  # fmt: skip
    acts = activations(view, word_unit, layers, reduce)[:, columns]
    out = torch.zeros(len(words), len(columns))
    for i in range(len(words)):
        out[i] = acts[word_labels == i].mean(0)
    return out


def text_alignment(view: ImageModel, unit: torch.Tensor, layer: int, neuron: int,
                   word_embeds: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """Per word, unit-norm text embedding · (mean over ``unit`` of the change in the unit-norm image embedding when
    the neuron is zeroed at every token): [W]. Positive: the neuron moves images towards the word."""
    import torch.nn.functional as F

    def zero(x, hook):
        x = x.clone()
        x[:, :, neuron] = 0
        return x

    with torch.no_grad(), evaluating(view):
        clean = F.normalize(view(unit), dim=-1)
        with hooks(view, fwd=[(layer_name(layer), zero)]):
            ablated = F.normalize(view(unit), dim=-1)
    contribution = (clean - ablated).mean(0)  # [E]
    return F.normalize(word_embeds.float(), dim=-1) @ contribution


class NeuronOutput(torch.nn.Module):
    """The image tower as a one-output model: a neuron's response to each image, [B,1] (unit pixels in), so the CNN
    half's attribution methods (:mod:`mechscope.cnn.methods.attribution`) attribute it to pixels."""

    def __init__(self, view: ImageModel, layer: int, neuron: int, reduce: str = "mean") -> None:
        super().__init__()
        self.view, self.layer, self.neuron, self.reduce = view, layer, neuron, reduce

    def forward(self, unit: torch.Tensor) -> torch.Tensor:
        got = {}

        def grab(x, hook):
            got["x"] = x[:, :, self.neuron : self.neuron + 1].float()

        with hooks(self.view, fwd=[(layer_name(self.layer), grab)]):
            self.view(unit)
        return _reduce(got["x"], self.reduce)  # [B,1]


def pixel_attribution(view: ImageModel, unit: torch.Tensor, layer: int, neuron: int, reduce: str = "mean",
                      n_steps: int = 32, baseline: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Which pixels make the neuron respond: the CNN half's integrated gradients of its response from a plain
    ``baseline`` image (0: black), summed over channels, [N,S,S]; and the completeness delta per image [N]
    (response − baseline response − the attributions' sum; near 0 when ``n_steps`` is enough)."""
    from mechscope.cnn.methods.attribution import IntegratedGradients

    m = NeuronOutput(view, layer, neuron, reduce)
    with evaluating(view):
        attr, delta = IntegratedGradients(n_steps=n_steps, baseline=baseline, batch_size=256).attribute_with_delta(
            m, unit, 0
        )
    return attr.sum(1).detach(), delta.detach()


def neuron_objective(assignment: list[tuple[int, int]], reduce: str = "mean"):
    """Feature-visualisation objective: image i maximises neuron assignment[i] = (layer, unit)'s response."""
    from mechscope.cnn.methods.featvis import Objective

    names = sorted({layer_name(layer) for layer, _ in assignment})

    def fn(acts):
        vals = []
        for i, (layer, u) in enumerate(assignment):
            x = acts[layer_name(layer)][i : i + 1, :, u]  # [1,P]
            vals.append(_reduce(x[..., None], reduce)[:, 0])
        return torch.cat(vals)

    return Objective(fn, set(names), f"{len(assignment)} neurons")


def diversity_objective(layer: int, group: int, weight: float = 2.0):
    """The CNN half's diversity term (Olah et al. 2017: minus the mean cosine similarity of the Gram matrices within
    each group of ``group`` images) on a ViT layer: its Gram matrix over neurons, [B,P,M] read as [B,M,P]."""
    from mechscope.cnn.methods.featvis import Objective, diversity

    name = layer_name(layer)
    inner = diversity(name, group)
    return weight * Objective(lambda a: inner({name: a[name].transpose(1, 2)}), {name}, f"diversity {name}")


def visualise(view: ImageModel, neurons: list[tuple[int, int]], steps: int = 256, seed: int = 0, lr: float = 0.05,
              param: str = "pixel", reduce: str = "mean", diverse: int = 0,
              diversity_weight: float = 2.0):  # fmt: skip
    """Feature visualisation of each neuron (one image each, in one batch): the CNN half's ``render`` with its
    parameterisations and its pad / jitter / scale / rotate transforms sized to the image. With ``diverse`` ≥ 2,
    ``diverse`` images per neuron instead (neuron-major: images i·diverse ... are neuron i's), pushed apart by the
    CNN half's diversity term on the first image-tower layer (times ``diversity_weight``: 2.0 as in ``cnn
    visualize``; too large a weight for a model's activations trades the neuron's response for diversity, so each
    diverse image's response is reported beside it). Returns its ``Render`` (images [n,C,S,S] in [0, 1],
    the history, the final objective per image)."""
    from mechscope.cnn.methods.featvis import compose, crop_to, jitter, pad, random_affine, render

    s = view.input_shape[1]
    d = max(1, s // 16)
    transforms = compose(pad(2 * d), jitter(2 * d), random_affine((0.9, 1.1), 10.0), jitter(d), crop_to(s, s))
    if diverse >= 2:
        assignment = [n for n in neurons for _ in range(diverse)]
        objective = neuron_objective(assignment, reduce) + diversity_objective(0, diverse, diversity_weight)
    else:
        assignment, objective = list(neurons), neuron_objective(neurons, reduce)
    return render(view, objective, len(assignment), steps=steps, param=param, lr=lr, seed=seed,
                  transforms=transforms)  # fmt: skip


@dataclass(frozen=True)
class NeuronReading(Result):
    """One neuron read in full: its feature visualisation, top images, text probes and aligned words."""

    neuron: str
    layer: int
    unit: int
    why: str  # why it was read (multimodal for a concept, asked for)
    dataset_max: float  # its largest response over the dataset
    featvis_response: float  # its response to its feature visualisation
    top_images: tuple[str, ...]  # names of its top dataset images
    top_values: tuple[float, ...]
    top_patches: tuple  # per top image: (top, left, bottom, right) of the patch where it fires most, or None
    probe_words: tuple[str, ...]  # words by mean response to their drawings, highest first
    probe_values: tuple[float, ...]
    aligned_words: tuple[str, ...]  # words by text alignment of its contribution, most aligned first
    aligned_values: tuple[float, ...]
    featvis: np.ndarray | None = figure_data()  # [C,S,S]
    top_pixels: np.ndarray | None = figure_data()  # [k,C,S,S]
    diverse_responses: tuple[float, ...] = ()  # its response to each of its diverse feature visualisations
    attribution_delta: float = float("nan")  # largest |completeness delta| of the top images' attributions
    diverse: np.ndarray | None = figure_data()  # [d,C,S,S] diverse feature visualisations (``--diverse``)
    top_attribution: np.ndarray | None = figure_data()  # [k,S,S] integrated gradients of each top image


@dataclass(frozen=True)
class NeuronsResult(Result):
    """``clip neurons``: multimodal neurons of an image tower and a few neurons read in full (neurons.json)."""

    SCHEMA = "mechscope.clip-neurons/1"
    FILE = "neurons.json"

    model: str
    family: str
    layers: tuple[int, ...]
    reduce: str
    settings: dict
    concepts_source: str
    dataset_source: str
    n_dataset: int
    multimodality: Multimodality
    readings: tuple[NeuronReading, ...]
    words: tuple[str, ...]  # the probe words
    templates: tuple[str, ...]  # prompt templates of the text alignment
    seconds: dict
    weights_sha256: str = ""
    machine: str = ""
    # forward and backward passes of each tower, {"image": ..., "text": ...} (WorkCounter), in passes over the dataset
    # images (``n_dataset``) and over the probe words in every template (text: 0 when no neuron is read in full). A
    # backward pass from a neuron of layer L (feature visualisation, integrated gradients) counts the L blocks below
    # it: the part of block L it runs back through is not counted
    work: dict | None = None
