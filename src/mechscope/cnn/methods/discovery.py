"""Circuit discovery on a CNN's channel graph: tasks, metrics, results (scrubbing: :mod:`.scrubbing`).

A task (:class:`ImageTask`) is a clean batch of test images, a corrupted batch of the same size and a scalar
metric of the logits on the clean batch. With a target class (``--class D``) the clean images are the class's
and the corrupted ones are seeded images of other classes; without one, a seeded sample of every class and,
corrupted, the same images in a seeded derangement (``corrupt="resample"``) or, for each image, a seeded one of
them of another class (``corrupt="other-class"``; a derangement can pair two images of one class). Metrics
(labels = the images' classes, or the target):
``logprob`` (mean log-softmax of the label; default), ``logit`` (the label's logit), ``logit_diff`` (the label's
logit minus the mean of the others), ``loss`` (cross-entropy), ``accuracy`` and ``detect`` (with a target:
how often "predicted D" agrees with "is D", over images of every class; not differentiable: ACDC and scrubbing
only) and ``kl`` (the KL divergence of the output from the clean run's, mean over the images; 0 at the clean
run; its gradient there is 0 too, so EAP scores nothing with it: use EAP-IG or ACDC).

:func:`discover` runs EAP, EAP-IG, ACDC or exact edge patching through
:class:`~mechscope.cnn.methods.graph.CNNEdges`, cuts a circuit and draws the faithfulness curve; given the
channels ``cnn explain`` found for the class (``mechanisms.json``), it compares the discovered channels of the
last stage with them.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from mechscope.cnn.data.images import as_labels
from mechscope.cnn.methods.graph import CNNEdges
from mechscope.cnn.models.spec import CNNSpec
from mechscope.core.errors import MechscopeError
from mechscope.core.graphs import (
    Circuit,
    EdgeScores,
    FaithfulnessCurve,
    TopEdges,
    auroc,
    check_task_model,
    find_circuit,
)
from mechscope.core.intervene import derangement, resample_donors
from mechscope.core.results import Result
from mechscope.core.torch_utils import evaluating
from mechscope.core.validate import check_seed

METRICS = {"logprob": "higher", "logit": "higher", "logit_diff": "higher", "loss": "lower", "accuracy": "higher",
           "detect": "higher", "kl": "lower"}  # fmt: skip
NOT_DIFFERENTIABLE = {"accuracy", "detect"}
DEFAULT_N = 64  # images of a task when n is not given (or every one there is, when fewer)


@dataclass(frozen=True)
class ImageTask:
    """Clean and corrupted images and a metric of the logits on the clean ones (see the module docstring)."""

    metric_name: str
    better: str | None
    clean: torch.Tensor = field(repr=False)
    corrupted: torch.Tensor = field(repr=False)
    labels: torch.Tensor = field(repr=False)
    metric: Callable = field(repr=False, compare=False)
    target: int | None = None
    description: str = ""
    settings: dict = field(default_factory=dict)
    made_on: Any = field(default=None, repr=False, compare=False)  # kl: a weak reference to the model whose clean
    # logits the metric holds; None: any model of these images and classes will do


def check_spec(spec, caller: str) -> None:
    """A :class:`CNNSpec` (a bare model gave "'CNN' object has no attribute 'n_classes'"), or one line."""
    if not isinstance(spec, CNNSpec):
        raise MechscopeError(f"{caller} takes the model's spec, walk(model, image_shape), not a "
                             f"{type(spec).__name__}")  # fmt: skip


def check_images_fit(x, spec: CNNSpec, what: str) -> None:
    """Images shaped as ``spec``'s model takes them, or one line naming ``what`` they are."""
    if not isinstance(x, torch.Tensor) or tuple(x.shape[1:]) != tuple(spec.input_shape):
        shape = list(x.shape[1:]) if isinstance(x, torch.Tensor) else type(x).__name__
        raise MechscopeError(f"{what} are shaped {shape}; the model takes {list(spec.input_shape)}")


def check_task_fits(task: ImageTask, spec: CNNSpec) -> None:
    """Refuse a task that is not of ``spec``'s model: images of another shape, classes it does not have, or a
    metric that holds another model's logits."""
    check_spec(spec, "discover")
    if not isinstance(task, ImageTask):  # (images, labels) gave "'tuple' object has no attribute 'clean'"
        raise MechscopeError(f"discover takes an image_task(images, labels, ...), not a {type(task).__name__}")
    for what, x in (("clean", task.clean), ("corrupted", task.corrupted)):
        check_images_fit(x, spec, f"the task's {what} images")
    top = max(int(task.labels.max()), -1 if task.target is None else task.target)
    if top >= spec.n_classes:
        raise MechscopeError(f"the task has class {top}; the model has {spec.n_classes} classes "
                             f"(0..{spec.n_classes - 1})")  # fmt: skip
    check_task_model(task.made_on, spec.model)


def metric_rows(name: str, labels: torch.Tensor, target: int | None) -> torch.Tensor:
    """The images a metric averages over [N] (bool): with a target class, its images only, except for ``detect``
    (every image: does "predicted D" agree with "is D"?) and ``kl`` (every image)."""
    if target is None or name in ("detect", "kl"):
        return torch.ones(len(labels), dtype=torch.bool)
    return labels == target


def make_metric(
    name: str, labels: torch.Tensor, target: int | None, clean_logits: torch.Tensor | None = None
) -> Callable:
    """The metric ``name`` of the logits [N, K] for images of classes ``labels`` (see the module docstring);
    ``kl`` needs the clean run's logits [N, K]."""
    if name not in METRICS:
        raise MechscopeError(f"unknown metric {name!r}: one of {', '.join(METRICS)}")
    if name == "detect" and target is None:
        raise MechscopeError("the metric 'detect' needs a target class (--class)")
    if name == "kl":
        if clean_logits is None or tuple(clean_logits.shape[:1]) != tuple(labels.shape):
            raise MechscopeError("the metric 'kl' needs the clean run's logits, one row per image")
        clean_lp = F.log_softmax(clean_logits.detach().double(), -1)
        return lambda out: F.kl_div(F.log_softmax(out.double(), -1), clean_lp, log_target=True,
                                    reduction="none").sum(-1).mean()  # fmt: skip
    rows = metric_rows(name, labels, target)
    y = labels if target is None else torch.full_like(labels, target)

    def pick(out):
        return out.double().gather(1, y[:, None])[:, 0][rows]

    fns = {
        "logprob": lambda out: pick(F.log_softmax(out.double(), -1)).mean(),
        "logit": lambda out: pick(out).mean(),
        "logit_diff": lambda out: (pick(out) - (out.double().sum(1)[rows] - pick(out)) / (out.shape[1] - 1)).mean(),
        "loss": lambda out: -pick(F.log_softmax(out.double(), -1)).mean(),
        "accuracy": lambda out: (out.argmax(1) == y)[rows].double().mean(),
        "detect": lambda out: ((out.argmax(1) == target) == (labels == target)).double().mean(),
    }
    return fns[name]


def checked_images(images, source: str = "image_task") -> torch.Tensor:
    """Images [N, C, H, W] in the model's own input range: floating point (0..255 integers are another range) and
    finite (NaN images gave a circuit of NaN scores), as float32."""
    from mechscope.cnn.data.images import as_nchw  # beside as_labels: the dataset's own checks

    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        got = images.dtype if isinstance(images, torch.Tensor) else type(images).__name__
        raise MechscopeError(f"images must be a floating-point tensor [N, C, H, W] in the model's own input range, "
                             f"got {got}")  # fmt: skip
    return as_nchw(images, source)


def image_task(
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    target: int | None = None,
    metric: str | None = None,
    n: int | None = None,
    seed: int = 0,
    corrupt: str = "resample",
    n_classes: int | None = None,
    model: Callable | None = None,
) -> ImageTask:
    """``n`` seeded test images (of the target class, when given; default 64, or every one there is when fewer)
    and their corruption (see the docstring); ``model`` (images -> logits) gives the clean logits the metric ``kl``
    compares with."""
    metric = metric or "logprob"
    if not isinstance(metric, str) or metric not in METRICS:
        raise MechscopeError(f"unknown metric {metric!r}: one of {', '.join(METRICS)}")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 2):
        raise MechscopeError(f"--n (n) must be an integer >= 2, got {n!r}")
    if corrupt not in ("resample", "other-class"):
        raise MechscopeError(f"unknown corruption {corrupt!r}: resample or other-class")
    check_seed(seed, "seed")
    images, labels = checked_images(images), as_labels(labels, "image_task")
    if len(images) != len(labels) or len(labels) < 2:
        raise MechscopeError(f"{len(images)} images and {len(labels)} labels: one label per image, two or more")
    if int(labels.min()) < 0:  # index -1 reached the logits' gather as "out of bounds"
        raise MechscopeError(f"labels must be class indices 0 or more, got {int(labels.min())}")
    k = n_classes if n_classes is not None else int(labels.max()) + 1
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= int(labels.max()):
        raise MechscopeError(f"n_classes {k!r} does not cover the labels 0..{int(labels.max())}")
    if target is not None and (isinstance(target, bool) or not isinstance(target, (int, np.integer))
                               or not 0 <= target < k):  # fmt: skip
        raise MechscopeError(f"class {target!r} outside 0..{k - 1}")
    g = torch.Generator().manual_seed(seed)
    every = target is None or metric == "detect"
    pool = torch.arange(len(labels)) if every else torch.nonzero(labels == target).flatten()
    if len(pool) < 2:
        raise MechscopeError(f"only {len(pool)} test image(s) of class {target}")
    if n is not None and n > len(pool):  # taken as a cap, it gave fewer images than asked for without a word
        raise MechscopeError(f"n is {n:,}: {'there are' if every else f'class {target} has'} {len(pool):,} test images")
    n = min(DEFAULT_N, len(pool)) if n is None else n
    pick = pool[torch.randperm(len(pool), generator=g)[:n]]
    if target is not None and metric != "detect":
        others = torch.nonzero(labels != target).flatten()
        if not len(others):
            raise MechscopeError(f"every test image is of class {target}: no image of another class to corrupt with")
        donors = others[torch.randint(len(others), (len(pick),), generator=g)]
        how = f"seeded images of other classes than {target}"
    elif corrupt == "other-class":
        donors = pick[resample_donors(labels[pick], seed, other_class=True)]
        how = "for each image, a seeded one of the others of another class"
    else:
        perm = derangement(len(pick), g)
        donors = pick[perm]
        how = "the same images in a seeded derangement"
    lab = labels[pick]
    clean_logits = None
    if metric == "kl":
        if model is None:
            raise MechscopeError("the metric 'kl' needs the model, to compute the clean run's logits")
        with torch.no_grad():
            clean_logits = model(images[pick])
    return ImageTask(
        metric_name=metric,
        better=METRICS[metric],
        clean=images[pick],
        corrupted=images[donors],
        labels=lab,
        metric=make_metric(metric, lab, target, clean_logits),
        target=target,
        description=f"{metric} on {len(pick)} test images"
        + (f" of class {target}" if target is not None and metric != "detect" else "")
        + f"; corrupted: {how}",  # fmt: skip
        settings={"n": len(pick), "seed": seed, "target": target, "corrupt": corrupt},
        made_on=weakref.ref(model) if metric == "kl" else None,
    )


# ---- results -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CNNDiscovery(TopEdges, Result):
    """One circuit-discovery run on a CNN's channel graph; ``discovery.json``."""

    SCHEMA: ClassVar[str] = "mechscope.cnn_discovery/1"
    FILE: ClassVar[str] = "discovery.json"

    run: str
    task_description: str
    metric: str
    better: str | None
    target: int | None
    method: str
    settings: dict
    n_examples: int
    scores: EdgeScores
    circuit: Circuit
    faithfulness: FaithfulnessCurve | None
    channel_scores: dict[str, list[float]]  # stage -> per channel: the largest |score| of its edges
    hand: dict | None  # against the circuit cnn explain found for the class
    seconds: dict[str, float]
    # forward and backward passes, in passes over the clean batch of n_examples images (WorkCounter over the stages'
    # convolutions): the method's own forward_passes (scores, faithfulness curve, drawn circuit), plus the clean
    # logits of the metric kl and ACDC's two runs that set its default threshold. A backward of EAP/EAP-IG stops at
    # the first stage's receivers, so it runs every stage's convolution but the first: backward_passes = (S - 1) / S
    # per backward of scores.backward_passes (S stages); the edges' own linear maps (edge_mix, edge_attribution) are
    # not counted.
    work: dict | None = None
    # the drawn circuit alone (every other edge ablated as for the curve): circuit_faithfulness's dict
    circuit_faithfulness: dict | None = None


# ---- discovery -----------------------------------------------------------------------------------------


def channel_scores(scores: EdgeScores, spec: CNNSpec) -> dict[str, list[float]]:
    """Per stage and channel, the largest |score| among the edges that touch the channel."""
    g = scores.graph
    send, recv = g.edge_nodes()
    best = np.zeros(len(g.nodes))
    np.maximum.at(best, send, np.abs(scores.scores))
    np.maximum.at(best, recv, np.abs(scores.scores))
    return {st.name: [float(best[g.node_id(f"{st.name}.c{j}")]) for j in range(st.out_channels)]
            for st in spec.stages}  # fmt: skip


def check_hand(hand, spec: CNNSpec | None, where: str = "hand", stage: str | None = None) -> list[int]:
    """Hand-found channels: a non-empty list of distinct channel indices (not bools or floats) of ``stage``'s
    channels (default the last stage; unchecked against a stage without ``spec``)."""
    if not isinstance(hand, (list, tuple)) or not hand:
        raise MechscopeError(f"{where}: channels must be a non-empty list of channel indices, got {hand!r}")
    n = (spec.stage(stage) if stage else spec.last).out_channels if spec is not None else None
    for c in hand:
        if type(c) is not int or c < 0 or (n is not None and c >= n):
            span = f"0..{n - 1}" if n is not None else "0 or more"
            raise MechscopeError(f"{where}: channel {c!r} is not a channel index ({span})")
    if len(set(hand)) != len(hand):
        raise MechscopeError(f"{where}: channels {list(hand)} name a channel twice")
    return [int(c) for c in hand]


def compare_channels(scores: EdgeScores, spec: CNNSpec, hand: list[int], stage: str | None = None) -> dict:
    """The discovered channels of ``stage`` (default the last) against the hand-found ``hand``: channels ranked
    by their read-out edge's |score| (the last stage) or their largest edge, the top ``len(hand)`` compared
    (recall = overlap / |hand|, Jaccard), AUROC of the hand set, each hand channel's rank."""
    hand = check_hand(hand, spec, "hand", stage)
    st = spec.stage(stage) if stage else spec.last
    g = scores.graph
    last = st is spec.last
    keys = []
    for j in range(st.out_channels):
        name = f"{st.name}.c{j}"
        if last:
            keys.append(abs(float(scores.scores[g.edge_id(name, "logits", "in")])))
        else:
            keys.append(channel_scores(scores, spec)[st.name][j])
    key = np.asarray(keys)
    order = np.argsort(-key, kind="stable")
    top = [int(c) for c in order[: len(hand)]]
    labels = np.zeros(len(key), dtype=bool)
    labels[list(hand)] = True
    rank = {int(c): int(np.flatnonzero(order == c)[0]) + 1 for c in hand}
    both = set(top) & set(hand)
    return {
        "stage": st.name,
        "hand": [int(c) for c in hand],
        "discovered_top": top,
        "overlap": sorted(both),
        "recall_at_size": len(both) / len(hand) if hand else math.nan,
        "jaccard": len(both) / len(set(top) | set(hand)) if hand else math.nan,
        "auroc": auroc(key, labels),
        "hand_ranks": rank,
        "ranking": [int(c) for c in order],
    }


def discover(
    spec: CNNSpec,
    task: ImageTask,
    method: str = "eap-ig",
    *,
    size: int | float | None = None,
    threshold: float | None = None,
    steps: int | None = None,
    ablation: str = "patch",
    curve: bool = True,
    n_random: int = 5,
    seed: int = 0,
    hand: list[int] | None = None,
    name: str = "",
    progress: bool = False,
) -> CNNDiscovery:
    """Discover the channel circuit of ``task`` (see the module docstring); ``hand``: the last stage's channels
    ``cnn explain`` found for the task's class, to compare with."""
    check_task_fits(task, spec)
    if hand:
        check_hand(hand, spec)  # before the search, not after it
    with evaluating(spec.model):
        found = find_circuit(CNNEdges(spec), task.clean, task.corrupted, metric=task.metric, better=task.better,
                             metric_name=task.metric_name, differentiable=task.metric_name not in NOT_DIFFERENTIABLE,
                             method=method, size=size, threshold=threshold, steps=steps, ablation=ablation,
                             curve=curve, n_random=n_random, seed=seed, progress=progress)  # fmt: skip
    scores = found.scores
    settings = {"steps": found.scores.settings.get("steps"), "ablation": ablation, "size": size,
                "threshold": found.threshold, "n_random": n_random, **task.settings}  # fmt: skip
    return CNNDiscovery(
        run=name,
        task_description=task.description,
        metric=task.metric_name,
        better=task.better,
        target=task.target,
        method=method,
        settings=settings,
        n_examples=len(task.clean),
        scores=scores,
        circuit=found.circuit,
        faithfulness=found.faithfulness,
        circuit_faithfulness=found.circuit_faithfulness,
        channel_scores=channel_scores(scores, spec),
        hand=compare_channels(scores, spec, hand) if hand else None,
        seconds=found.seconds,
    )
