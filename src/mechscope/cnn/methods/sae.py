"""Sparse dictionaries on a CNN: harvesting a stage's channel vectors, splicing a dictionary in, reading latents.

**Rows**: a conv hook's activation ``[B, C, H, W]`` is read as one row per image position, ``[B * H * W, C]``
(row ``b * H * W + y * W + x``): a dictionary on ``conv2.hook_out`` decomposes the 32-channel vector each
position of conv2's output carries. A flat hook (``hook_hidden``, ``hook_logits``) gives ``[B, D]``.

**Splicing**: the dictionary replaces the activation at its hook by its reconstruction (every position), through
:func:`mechscope.core.hooks.hooks`. Test accuracy with it (``acc_spliced``), clean (``acc_clean``) and with the
activation zeroed (``acc_ablated``): ``accuracy_recovered = (acc_spliced - acc_ablated) / (acc_clean -
acc_ablated)``; the logit KL is KL(softmax(clean logits) || softmax(spliced logits)) per image, averaged.

**Units read alike**: latents and channels get the same two measures, so "the latent is monosemantic where the
channels are not" compares like with like:

- *class selectivity* (Morcos et al. 2018, :mod:`mechscope.cnn.methods.selectivity`): each unit's mean over
  positions and over the test images of each class, the index ``(mu_max - mu_rest) / (mu_max + mu_rest)`` on
  the class means shifted to a minimum of 0 (as :func:`mechscope.cnn.methods.channel_selectivity.shifted_index`);
  *digit-selective* when the index is at least :data:`SELECTIVE` = 0.6 (the preferred class's mean at least four
  times the others');
- *stroke tuning* (:mod:`mechscope.cnn.methods.tuning`): each unit's response (maximum over positions, and at the
  position whose receptive field is centred on the stimulus) to the synthetic lines, edges, curves, line endings,
  corners, blobs and loops, the same curves, sharpness and drive thresholds; a latent's response is its
  activation on the stimuli's channel vectors at the hook.

**A control**: an untrained TopK dictionary of the same size and L0 (:func:`random_control`) measured alike.
Sparsity alone makes units look selective and sharply tuned (a unit that fires at one position of a few images
has a peaked class profile and a peaked tuning curve), so the trained latents are compared with it as well as
with the channels.

**Direct class effect** (only where the read-out is one linear layer on the hook: the last stage's ``hook_out``):
the logits' change when the latent's decoder direction is added at every position of the map,
``sum_{y,x} W_fc[k, :, y, x] . d``, centred over the classes.

**Feature visualisation**: the input that maximises the latent's pre-activation averaged over positions (the
encoder column as a ``direction`` objective of :mod:`mechscope.cnn.methods.featvis`, rendered by its
``render``: Fourier parameterisation, the default transformations).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import ClassVar

import numpy as np
import torch

from mechscope.cnn.methods import circuits as C
from mechscope.cnn.methods.channel_selectivity import shifted_index
from mechscope.core.dictionaries import DictionaryConfig, SparseDictionary, StreamingMetrics
from mechscope.core.dictionaries.latents import LatentCollector
from mechscope.core.dictionaries.metrics import accuracy_recovered, kl_divergence, kl_recovered
from mechscope.core.dictionaries.parallel import split
from mechscope.core.dictionaries.staged import DictionaryTraining
from mechscope.core.errors import MechscopeError
from mechscope.core.hooks import hooks, run_with_cache
from mechscope.core.results import Result, figure_data
from mechscope.core.torch_utils import evaluating

SELECTIVE = 0.6


# ---- hooks, rows --------------------------------------------------------------------------------------


def hook_shape(spec, hook: str) -> tuple[int, ...]:
    """The activation's shape per image at ``hook`` ([C, H, W] or [D]); an unknown hook is one line."""
    if hook not in spec.hook_names():
        raise MechscopeError(f"unknown hook point {hook!r}; valid names: {', '.join(spec.hook_names())}")
    with evaluating(spec.model):
        _, cache = run_with_cache(spec.model, torch.zeros(1, *spec.input_shape), names=[hook])
    return tuple(cache[hook].shape[1:])


def width_of(shape: tuple[int, ...]) -> int:
    return int(shape[0])


def to_rows(act: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B*H*W, C] (position-major per image); [B, D] as it is; float32 on the CPU."""
    if act.dim() == 4:
        return act.permute(0, 2, 3, 1).reshape(-1, act.shape[1]).float().cpu()
    return act.reshape(act.shape[0], -1).float().cpu()


def from_rows(rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`to_rows`, in ``like``'s dtype, device and memory layout: the layers after a splice see
    the layout they would have seen (a permuted view sent a convolution down another kernel, whose sums differ in
    the last bits on some CPUs)."""
    out = torch.empty_like(like)
    if like.dim() == 4:
        b, c, h, w = like.shape
        return out.copy_(rows.reshape(b, h, w, c).permute(0, 3, 1, 2))
    return out.copy_(rows.reshape(like.shape))


def check_dictionary(spec, dictionary: SparseDictionary, hook: str) -> tuple[int, ...]:
    """The hook's shape; a dictionary whose d_in/d_out is not the hook's width (or a transcoder) is one line."""
    shape = hook_shape(spec, hook)
    cfg = dictionary.cfg
    if cfg.transcoder:
        raise MechscopeError("cnn sae splices SAEs (a hook read and written); this dictionary is a transcoder")
    if cfg.d_in != width_of(shape):
        raise MechscopeError(
            f"the dictionary reads d_in={cfg.d_in}; {hook} has {width_of(shape)} channels (activation {list(shape)})"
        )
    return shape


def harvest_batches(spec, images: torch.Tensor, hook: str, *, batch: int = 512, rank: int = 0, world: int = 1,
                    on_batch=None) -> Iterator[torch.Tensor]:  # fmt: skip
    """Rows at ``hook`` of each batch of images (this rank's slice of each batch)."""
    shape = hook_shape(spec, hook)
    with evaluating(spec.model):
        for start in range(0, len(images), batch):
            part = images[start : start + batch]
            part = part[split(len(part), rank, world)]
            if len(part) == 0:
                yield torch.zeros(0, width_of(shape))
                continue
            _, cache = run_with_cache(spec.model, part, names=[hook])
            if on_batch is not None:
                on_batch(len(part))
            yield to_rows(cache[hook])


# ---- splicing ---------------------------------------------------------------------------------------


def splice_hooks(dictionary: SparseDictionary, hook: str, sink=None, mode: str = "splice") -> list:
    """A forward hook replacing the activation at ``hook`` by the dictionary's reconstruction (``"splice"``) or
    by zeros (``"zero"``); ``sink(f)`` receives the latents ``[rows, d_sae]``."""

    def replace(act, h):
        if mode == "zero":
            return torch.zeros_like(act)
        out, f = dictionary(to_rows(act).to(dictionary.W_enc.dtype))
        if sink is not None:
            sink(f.detach())
        return from_rows(out.float(), act)

    return [(hook, replace)]


@dataclass(frozen=True)
class SpliceAccuracy(Result):
    """Test accuracy and logits with the dictionary spliced in (see the module docstring)."""

    images: int
    acc_clean: float
    acc_spliced: float
    acc_ablated: float
    accuracy_recovered: float
    kl_spliced: float
    kl_ablated: float
    kl_recovered: float
    ablation: str = "zero"


def splice_effect(spec, x: torch.Tensor, y: torch.Tensor, dictionary: SparseDictionary, hook: str, *,
                  batch: int = 1000, progress=None):  # fmt: skip
    """(:class:`SpliceAccuracy`, :class:`~mechscope.core.dictionaries.DictionaryMetrics`) on images ``x``
    labels ``y``."""
    net = spec.model
    metrics = StreamingMetrics(dictionary.cfg.d_out, dictionary.cfg.d_sae)
    right = dict.fromkeys(("clean", "spliced", "zero"), 0)
    kl = {"spliced": 0.0, "zero": 0.0}
    dictionary.eval()
    with evaluating(net), torch.no_grad():
        for start in range(0, len(x), batch):
            xb, yb = x[start : start + batch], y[start : start + batch]
            clean, cache = run_with_cache(net, xb, names=[hook])
            with hooks(net, fwd=splice_hooks(dictionary, hook)):
                spliced = net(xb)
            with hooks(net, fwd=splice_hooks(dictionary, hook, mode="zero")):
                zeroed = net(xb)
            rows = to_rows(cache[hook])
            out, f = dictionary(rows)
            metrics.update(rows, out.float(), f)
            for key, logits in (("clean", clean), ("spliced", spliced), ("zero", zeroed)):
                right[key] += int((logits.argmax(1) == yb).sum())
            kl["spliced"] += float(kl_divergence(clean, spliced, "none").sum())
            kl["zero"] += float(kl_divergence(clean, zeroed, "none").sum())
            if progress is not None:
                progress(len(xb))
    n = len(x)
    acc = {k: v / n for k, v in right.items()}
    klsp, klz = kl["spliced"] / n, kl["zero"] / n
    effect = SpliceAccuracy(
        images=n, acc_clean=acc["clean"], acc_spliced=acc["spliced"], acc_ablated=acc["zero"],
        accuracy_recovered=accuracy_recovered(acc["clean"], acc["spliced"], acc["zero"]), kl_spliced=klsp,
        kl_ablated=klz, kl_recovered=kl_recovered(klsp, klz),
    )  # fmt: skip
    return effect, metrics.result()


# ---- latents and channels over the test images ----------------------------------------------------------


def activations(spec, x: torch.Tensor, hook: str, batch: int = 1000) -> torch.Tensor:
    """The hook's activations on every image, [N, ...] float32."""
    parts = []
    with evaluating(spec.model), torch.no_grad():
        for start in range(0, len(x), batch):
            _, cache = run_with_cache(spec.model, x[start : start + batch], names=[hook])
            parts.append(cache[hook].float().cpu())
    return torch.cat(parts)


def latent_activations(dictionary: SparseDictionary, acts: torch.Tensor, batch: int = 512):
    """The latents on every row of ``acts`` [N, ...] (rows as :func:`to_rows`): LatentActivations."""
    collector = LatentCollector(dictionary.cfg.d_sae)
    dictionary.eval()
    with torch.no_grad():
        for start in range(0, len(acts), batch):
            collector.update(dictionary.encode(to_rows(acts[start : start + batch])))
    return collector.result()


def unit_class_means(per_image: torch.Tensor, labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """[U, K] class means of each unit's per-image value ``per_image`` [N, U]."""
    return C.class_means(per_image, labels, n_classes)


def channel_means(acts: torch.Tensor) -> torch.Tensor:
    """[N, C] each channel's mean over positions (the value class selectivity averages)."""
    return acts.flatten(2).mean(2) if acts.dim() == 4 else acts


def latent_means(lat, n_images: int) -> torch.Tensor:
    """[N, d_sae] each latent's mean over an image's positions."""
    per = lat.n_rows // n_images
    out = np.zeros((n_images, lat.d_sae), dtype=np.float64)
    np.add.at(out, (lat.rows // per, lat.latents), lat.values.astype(np.float64))
    return torch.from_numpy(out / per).float()


def selectivity(class_means: torch.Tensor) -> torch.Tensor:
    """The class selectivity index [U] of class means [U, K], shifted per unit to a minimum of 0."""
    return shifted_index(class_means)


@dataclass(frozen=True)
class UnitTuningSummary(Result):
    """A unit's stroke tuning (from :func:`mechscope.cnn.methods.tuning.unit_tuning`)."""

    tuned: bool
    label: str
    reason: str


def tuning_labels(spec, hook: str, encode, stim, dataset_max: torch.Tensor,
                  batch: int = 512) -> list[UnitTuningSummary]:  # fmt: skip
    """Each unit's tuning label: ``encode(rows [n, C]) -> [n, U]`` maps the hook's channel vectors to the units
    (the identity for channels, the dictionary's encoder for latents); ``dataset_max [U]`` each unit's maximum
    over the test images (drive = best stimulus / it)."""
    from mechscope.cnn.methods.tuning import _Settings, centre_positions, model_inputs, unit_tuning

    stage = spec.stage(hook)
    rf = stage.rf_out if hook.endswith("hook_out") else stage.rf_post
    where = SimpleNamespace(rf_post=rf)
    x = model_inputs(stim, spec.input_shape)
    r_max, r_centre = [], []
    with evaluating(spec.model), torch.no_grad():
        for start in range(0, len(x), batch):
            part = x[start : start + batch]
            _, cache = run_with_cache(spec.model, part, names=[hook])
            a = cache[hook]  # [B, C, H, W]
            b, c, h, w = a.shape
            u = encode(to_rows(a)).reshape(b, h, w, -1)  # [B, H, W, U]
            pos = centre_positions(where, stim.stimuli[start : start + batch], (h, w))
            r_max.append(u.flatten(1, 2).amax(1))
            r_centre.append(u[torch.arange(b), pos[:, 0], pos[:, 1]])
        _, cache = run_with_cache(spec.model, torch.zeros(1, *spec.input_shape), names=[hook])
        blank = encode(to_rows(cache[hook])).amax(0)
    r_max, r_centre = torch.cat(r_max), torch.cat(r_centre)
    grid = _Settings(stim)
    means = (grid.mean(r_max).numpy(), grid.mean(r_centre).numpy())
    out = []
    for u in range(r_max.shape[1]):
        t = unit_tuning(stage.name, u, stim, grid, r_max, r_centre, float(blank[u]), float(dataset_max[u]), means)
        out.append(UnitTuningSummary(t.tuned, t.label, t.reason))
    return out


def random_control(d_in: int, d_sae: int, k: int, mean: torch.Tensor, seed: int = 0) -> SparseDictionary:
    """The control the latents are measured against: an untrained TopK dictionary of the same size and L0 (random
    unit decoder rows, encoder = decoder transposed, decoder bias at the activations' mean). Sparsity alone makes
    units class-selective and sharply tuned; what a trained dictionary adds is what it scores above this."""
    cfg = DictionaryConfig(d_in=d_in, d_sae=d_sae, architecture="topk", k=max(1, min(int(k), d_sae)))
    sae = SparseDictionary(cfg, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        sae.b_dec.copy_(mean.to(sae.b_dec.dtype))
    return sae.eval()


# ---- weights ----------------------------------------------------------------------------------------------


def class_effects(spec, dictionary: SparseDictionary, hook: str) -> torch.Tensor | None:
    """[d_sae, K] the direct class effect of each latent (module docstring), or None where the read-out is not
    one linear layer on ``hook``."""
    if not (spec.readout.linear and hook == spec.last.hook_out):
        return None
    c, h, w = spec.last.shape_out
    wfc = spec.readout.fc.weight.detach().float().cpu().view(-1, c, h, w)  # [K, C, H, W]
    per_channel = wfc.sum((2, 3))  # [K, C]
    d = dictionary.folded().W_dec.detach().float().cpu()  # [S, C]
    e = d @ per_channel.T  # [S, K]
    return e - e.mean(1, keepdim=True)


def encoder_directions(dictionary: SparseDictionary) -> torch.Tensor:
    """[d_sae, d_in] each latent's encoder column in the activations' own units (normalisation folded)."""
    return dictionary.folded().W_enc.detach().float().cpu().T


def featvis_latents(spec, dictionary: SparseDictionary, hook: str, latents: list[int], *, steps: int = 256,
                    seed: int = 0) -> torch.Tensor:  # fmt: skip
    """[len(latents), C_in, H, W] images maximising each latent's mean pre-activation (module docstring)."""
    from mechscope.cnn.methods import featvis as FV

    if not latents:
        return torch.zeros(0, *spec.input_shape)
    enc = encoder_directions(dictionary)[latents]  # [L, C]

    def fn(acts):
        a = acts[hook]
        a = a.flatten(2).mean(2) if a.dim() == 4 else a  # [B, C]
        return (a * enc.to(a)).sum(1)

    objective = FV.Objective(fn, {hook}, f"{len(latents)} latents at {hook}")
    return FV.render(spec.model, objective, batch=len(latents), steps=steps, seed=seed).images


# ---- the records the commands write ------------------------------------------------------------------------


@dataclass(frozen=True)
class CnnSaeHarvest(Result):
    """``cnn sae harvest``: the store, its size and the speed."""

    SCHEMA: ClassVar[str] = "mechscope.cnn-sae-harvest/1"
    FILE: ClassVar[str] = "harvest.json"

    run: str
    dataset: str
    split: str
    hook: str
    activation_shape: tuple[int, ...]
    images: int
    rows: int
    width: int
    shards: int
    store: str
    seconds: float
    images_per_second: float
    rows_per_second: float
    world_size: int
    resumed_rows: int
    settings: dict
    # forward and backward passes through the network's stages, in passes over the harvest's images (``images``;
    # WorkCounter): the whole job's, summed over the processes; a resumed harvest counts the images it ran (a
    # fraction of a pass); the two one-image probes of the hook's shape included
    work: dict | None = None


@dataclass(frozen=True)
class CnnSaeTraining(DictionaryTraining):
    """``cnn sae train``: see :class:`~mechscope.core.dictionaries.staged.DictionaryTraining`."""

    SCHEMA: ClassVar[str] = "mechscope.cnn-sae-training/1"
    FILE: ClassVar[str] = "training.json"


@dataclass(frozen=True)
class CnnSaeEvaluation(Result):
    """``cnn sae evaluate``: reconstruction and sparsity at the hook, accuracy and logit KL spliced in."""

    SCHEMA: ClassVar[str] = "mechscope.cnn-sae-evaluation/1"
    FILE: ClassVar[str] = "evaluation.json"

    run: str
    dictionary: str
    hook: str
    architecture: str
    d_in: int
    d_sae: int
    dataset: str
    effect: SpliceAccuracy
    metrics: dict
    seconds: float
    latent_frequency: np.ndarray | None = figure_data()
    # forward and backward passes through the network's stages, in passes over the test images evaluated (three per
    # batch: clean, spliced, zero-ablated; and a one-image probe of the hook's shape; WorkCounter); ``work
    # ["dictionary"]``: the dictionary's own forwards, in passes over the hook's rows of those images (one per image
    # position): two, spliced in and for the reconstruction metrics
    work: dict | None = None


@dataclass(frozen=True)
class ImageExample(Result):
    """One image position where a latent fires: the image, the position, its receptive field, the activation."""

    value: float
    image: int
    label: int
    position: tuple[int, int]  # (y, x) in the hook's map
    box: tuple[int, int, int, int]  # (y0, y1, x0, x1) in the input


@dataclass(frozen=True)
class CnnLatentDashboard(Result):
    latent: int
    density: float
    max: float
    mean_when_active: float
    top: tuple[ImageExample, ...]
    band_edges: tuple[float, ...]
    bands: tuple[tuple[ImageExample, ...], ...]
    hist_counts: tuple[int, ...]
    hist_edges: tuple[float, ...]
    class_means: tuple[float, ...]
    selectivity: float
    preferred_class: int
    tuning: UnitTuningSummary | None
    class_effect: tuple[float, ...] | None  # [K] direct effect on the logits, centred (linear read-out only)
    mixes: tuple[tuple[int, float], ...]  # (channel, decoder weight) of the largest |weights|
    why: str
    featvis: torch.Tensor | None = figure_data()  # [C_in, H, W]


@dataclass(frozen=True)
class CnnSaeDashboards(Result):
    """``cnn sae show``: the latents against the channels (class selectivity, stroke tuning) and dashboards."""

    SCHEMA: ClassVar[str] = "mechscope.cnn-sae-dashboards/1"
    FILE: ClassVar[str] = "dashboards.json"

    run: str
    dictionary: str
    hook: str
    architecture: str
    d_in: int
    d_sae: int
    dataset: str
    class_names: tuple[str, ...]
    images: int
    dead_fraction: float
    comparison: dict  # {"latents": {...}, "channels": {...}} counts of selective / tuned units
    channel_selectivity: tuple[float, ...]
    channel_preferred: tuple[int, ...]
    channel_tuning: tuple[UnitTuningSummary, ...] | None
    latent_selectivity: tuple[float, ...]
    latent_preferred: tuple[int, ...]
    latent_tuned: tuple[int, ...]  # latents with a tuning label
    latents: tuple[CnnLatentDashboard, ...]
    summary: tuple[str, ...]
    seconds: dict
    value_range: tuple[float, float] = (0.0, 1.0)
    densities: np.ndarray | None = figure_data()
    example_images: dict | None = figure_data()  # image index -> [C_in, H, W] of the images the dashboards show
    # forward and backward passes through the network's stages, in passes over the test images read (one over them;
    # the tuning's stimuli, three times, and the feature visualisation's steps add theirs; WorkCounter); the
    # dictionary's encoder on the hook's rows is not counted (``encode``, not a pass through the network)
    work: dict | None = None
