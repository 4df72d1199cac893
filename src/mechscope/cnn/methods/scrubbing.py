"""Causal scrubbing of a hypothesis about a CNN's channel graph (Chan et al. 2022).

:func:`parse_hypothesis_file` checks a hypothesis file (JSON) for its keys and types; :func:`scrub_hypothesis`
scrubs its claims on seeded test images, with the features of the images that :data:`FEATURES` lists
(:func:`feature_values`) and a metric of :mod:`mechscope.cnn.methods.discovery`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from mechscope.cnn.methods.discovery import (
    METRICS,
    check_images_fit,
    check_spec,
    checked_images,
    make_metric,
    metric_rows,
)
from mechscope.cnn.methods.graph import CNNEdges
from mechscope.cnn.models.spec import CNNSpec
from mechscope.core.errors import MechscopeError
from mechscope.core.results import Result
from mechscope.core.scrub import (
    ScrubResult,
    hypothesis_file_claims,
    hypothesis_file_ints,
    hypothesis_file_sampling,
    parse_hypothesis,
    scrub,
)
from mechscope.core.torch_utils import evaluating

FEATURES = {
    "class": "the image's class",
    "prediction": "the class the model predicts for the image",
    "image": "the image itself (recursively resampled: the same as no feature)",
    "central_column": "the ink in the image's central column (quartile over the dataset)",
    "ink": "the image's total ink (quartile over the dataset)",
}


@dataclass(frozen=True)
class CNNScrub(Result):
    """Causal scrubbing of one hypothesis on a CNN; ``scrub.json``."""

    SCHEMA: ClassVar[str] = "mechscope.cnn_scrub/1"
    FILE: ClassVar[str] = "scrub.json"

    run: str
    name: str
    description: str
    metric: str
    better: str | None
    target: int | None
    settings: dict
    features: dict[str, str]
    scrub: ScrubResult
    seconds: dict[str, float]
    # forward passes, in passes over the scrubbed batch of settings["n"] test images (WorkCounter over the stages'
    # convolutions): scrub.forward_passes and the one clean run that gives the predictions and the metric's logits
    work: dict | None = None


def _quartiles(x: torch.Tensor) -> torch.Tensor:
    q = torch.quantile(x.double(), torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
    return torch.bucketize(x.double(), q)


def feature_values(name: str, images: torch.Tensor, labels: torch.Tensor, predictions: torch.Tensor) -> torch.Tensor:
    """One value per image of feature ``name`` (:data:`FEATURES`)."""
    if name == "class":
        return labels
    if name == "prediction":
        return predictions
    if name == "image":
        return torch.arange(len(images))
    if name == "central_column":
        return _quartiles(images[..., images.shape[-1] // 2].flatten(1).sum(1))
    if name == "ink":
        return _quartiles(images.flatten(1).sum(1))
    raise MechscopeError(f"unknown feature {name!r}: the CNN features are {', '.join(FEATURES)}")


HYPOTHESIS_KEYS = {"name", "description", "run", "wing", "metric", "target", "data", "claims", "samples", "seed",
                   "sampling", "breakdown"}  # fmt: skip
DATA_KEYS = {"n", "seed"}


@dataclass(frozen=True)
class HypothesisSpec:
    name: str
    description: str
    run: str
    metric: str
    target: int | None
    n: int
    data_seed: int
    claims: tuple
    samples: int
    seed: int
    sampling: str
    breakdown: bool = True


def parse_hypothesis_file(data: Any, where: str = "hypothesis") -> HypothesisSpec:
    """A CNN hypothesis (JSON object) checked for its keys and types; one line on any error."""
    source_help = "'run' must name the run directory of `mechscope cnn train`"
    claims = hypothesis_file_claims(data, where, HYPOTHESIS_KEYS, "run", source_help)
    metric = data.get("metric", "accuracy")
    if not isinstance(metric, str) or metric not in METRICS:
        raise MechscopeError(f"{where}: unknown metric {metric!r}: one of {', '.join(METRICS)}")
    target = data.get("target")
    if target is not None and (isinstance(target, bool) or not isinstance(target, int) or target < 0):
        raise MechscopeError(f"{where}: target must be a class index, got {target!r}")
    if metric == "detect" and target is None:
        raise MechscopeError(f"{where}: the metric 'detect' needs a target class ('target')")
    d = data.get("data", {})
    if not isinstance(d, dict) or set(d) - DATA_KEYS:
        raise MechscopeError(f"{where}: 'data' must be an object with keys among {', '.join(sorted(DATA_KEYS))}")
    vals = hypothesis_file_ints(where, {"data.n": (d.get("n", 500), 2), "data.seed": (d.get("seed", 0), 0),
                                        "samples": (data.get("samples", 10), 1), "seed": (data.get("seed", 0), 0)})
    sampling, breakdown = hypothesis_file_sampling(data, where)
    for c in claims:
        f = c.get("feature") if isinstance(c, dict) else None
        if f is not None and (not isinstance(f, str) or f not in FEATURES):
            raise MechscopeError(f"{where}: unknown feature {f!r}; the CNN features: {', '.join(FEATURES)}")
    return HypothesisSpec(
        name=str(data.get("name", Path(where).stem)),
        description=str(data.get("description", "")),
        run=data["run"],
        metric=metric,
        target=target,
        n=vals["data.n"],
        data_seed=vals["data.seed"],
        claims=tuple(claims),
        samples=vals["samples"],
        seed=vals["seed"],
        sampling=sampling,
        breakdown=breakdown,
    )


def _checked_data(spec, images, labels, hyp) -> tuple[torch.Tensor, torch.Tensor]:
    """The spec, the hypothesis, and images and labels the model takes, one label per image; one line otherwise."""
    from mechscope.cnn.data.images import as_labels

    check_spec(spec, "scrub_hypothesis")
    if not isinstance(hyp, HypothesisSpec):
        raise MechscopeError(f"expected a HypothesisSpec (parse_hypothesis_file reads one), got {type(hyp).__name__}")
    images, labels = checked_images(images, "scrub_hypothesis"), as_labels(labels, "scrub_hypothesis")
    if len(images) != len(labels):
        raise MechscopeError(f"{len(images):,} images and {len(labels):,} labels: one label per image")
    check_images_fit(images, spec, "the images")
    return images, labels


def scrub_hypothesis(spec: CNNSpec, images: torch.Tensor, labels: torch.Tensor, hyp: HypothesisSpec, *,
                     name: str = "") -> CNNScrub:  # fmt: skip
    """Causal scrubbing of ``hyp`` on ``n`` seeded test images of every class."""
    images, labels = _checked_data(spec, images, labels, hyp)
    t0 = time.perf_counter()
    edges = CNNEdges(spec)
    h = parse_hypothesis({"claims": list(hyp.claims)}, edges.graph)
    if hyp.target is not None and not 0 <= hyp.target < spec.n_classes:
        raise MechscopeError(f"target class {hyp.target} outside 0..{spec.n_classes - 1}")
    if hyp.n > len(labels):
        raise MechscopeError(f"data.n is {hyp.n:,}: there are {len(labels):,} test images")
    g = torch.Generator().manual_seed(hyp.data_seed)
    pick = torch.randperm(len(labels), generator=g)[: hyp.n]
    x, y = images[pick], labels[pick]
    with torch.no_grad(), evaluating(spec.model):
        logits = spec.model(x)
    pred = logits.argmax(1)
    used = sorted({c.feature for c in h.claims if c.feature is not None})
    feats = {f: feature_values(f, x, y, pred) for f in used}
    metric = make_metric(hyp.metric, y, hyp.target, logits)
    with evaluating(spec.model):
        res = scrub(edges, x, metric=metric, hypothesis=h, features=feats, samples=hyp.samples, seed=hyp.seed,
                    sampling=hyp.sampling, breakdown=hyp.breakdown)  # fmt: skip
    return CNNScrub(
        run=name,
        name=hyp.name,
        description=hyp.description,
        metric=hyp.metric,
        better=METRICS[hyp.metric],
        target=hyp.target,
        settings={
            "n": len(pick),
            "data_seed": hyp.data_seed,
            "samples": hyp.samples,
            "seed": hyp.seed,
            "sampling": hyp.sampling,
            "metric_images": int(metric_rows(hyp.metric, y, hyp.target).sum()),  # what the metric averages over
        },  # fmt: skip
        features={f: FEATURES[f] for f in used},
        scrub=res,
        seconds={"scrub": time.perf_counter() - t0},
    )
