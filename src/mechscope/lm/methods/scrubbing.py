"""Causal scrubbing of a hypothesis about a transformer (Chan et al. 2022).

:func:`parse_hypothesis_file` checks a hypothesis file (JSON) for its keys and types; :func:`scrub_hypothesis`
makes its task (:mod:`mechscope.lm.methods.tasks`), reads the features its claims use
(:data:`~mechscope.lm.methods.tasks.FEATURES`) and scrubs it (:func:`mechscope.core.scrub.scrub`).
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

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
from mechscope.lm.methods.graph import TransformerEdges
from mechscope.lm.methods.tasks import (
    FEATURES,
    check_model,
    describe_feature,
    feature_values,
    is_feature,
    make_task,
)
from mechscope.lm.models.transformer import HookedTransformer


@dataclass(frozen=True)
class LMScrub(Result):
    """Causal scrubbing of one hypothesis on a transformer; ``scrub.json``."""

    SCHEMA: ClassVar[str] = "mechscope.lm_scrub/1"
    FILE: ClassVar[str] = "scrub.json"

    model: str
    name: str
    description: str
    task: str
    task_description: str
    metric: str
    better: str | None
    settings: dict
    features: dict[str, str]  # the features the claims use, described
    scrub: ScrubResult
    seconds: dict[str, float]
    # forward passes, in passes over the task's clean batch of tokens (batch x positions, tracr's padding included;
    # WorkCounter over the blocks): scrub.forward_passes and the task's clean run (induction; tracr: clean and
    # corrupted); None unless scrub_hypothesis was given a counter
    work: dict | None = None


HYPOTHESIS_KEYS = {"name", "description", "model", "wing", "task", "metric", "data", "claims", "samples", "seed",
                   "sampling", "breakdown"}  # fmt: skip
DATA_KEYS = {"n", "batch", "seed", "token_range", "limit", "distinct"}


@dataclass(frozen=True)
class HypothesisSpec:
    """A hypothesis file's settings (its claims stay as the file gives them until the model's graph checks them)."""

    name: str
    description: str
    model: str
    task: str | None
    metric: str | None
    data: dict
    claims: tuple
    samples: int
    seed: int
    sampling: str
    breakdown: bool = True


def parse_hypothesis_file(data: Any, where: str = "hypothesis") -> HypothesisSpec:
    """A transformer hypothesis (JSON object) checked for its keys and types; one line on any error."""
    source_help = "'model' must name the model (smollm2, a folder, a toy run)"
    claims = hypothesis_file_claims(data, where, HYPOTHESIS_KEYS, "model", source_help)
    d = data.get("data", {})
    if not isinstance(d, dict) or set(d) - DATA_KEYS:
        raise MechscopeError(f"{where}: 'data' must be an object with keys among {', '.join(sorted(DATA_KEYS))}")
    hypothesis_file_ints(where, {f"data.{key}": (d[key], low) for key, low in (("n", 2), ("batch", 2), ("seed", 0),
                                                                             ("limit", 2)) if d.get(key) is not None})
    if d.get("distinct") is not None and not isinstance(d["distinct"], bool):
        raise MechscopeError(f"{where}: data.distinct must be true or false")
    tr = d.get("token_range")
    if tr is not None and not (isinstance(tr, list) and len(tr) == 2 and all(type(x) is int for x in tr)):
        raise MechscopeError(f"{where}: data.token_range must be [low, high)")
    samples, seed = data.get("samples", 10), data.get("seed", 0)
    hypothesis_file_ints(where, {"samples": (samples, 1), "seed": (seed, 0)})
    for key in ("task", "metric", "name", "description", "sampling"):
        if data.get(key) is not None and not isinstance(data[key], str):
            raise MechscopeError(f"{where}: {key} must be a string")
    sampling, breakdown = hypothesis_file_sampling(data, where)
    for c in claims:
        f = c.get("feature") if isinstance(c, dict) else None
        if f is not None and (not isinstance(f, str) or not is_feature(f)):
            raise MechscopeError(f"{where}: unknown feature {f!r}; the transformer features: {', '.join(FEATURES)}")
    return HypothesisSpec(
        name=str(data.get("name", Path(where).stem)),
        description=str(data.get("description", "")),
        model=data["model"],
        task=data.get("task"),
        metric=data.get("metric"),
        data=dict(d),
        claims=tuple(claims),
        samples=samples,
        seed=seed,
        sampling=sampling,
        breakdown=breakdown,
    )


def scrub_hypothesis(model: HookedTransformer, spec: HypothesisSpec, *, name: str = "", counter=None) -> LMScrub:
    """Causal scrubbing of the hypothesis ``spec`` on ``model`` (its task's clean batch is the dataset).
    ``counter``: a :class:`~mechscope.core.torch_utils.WorkCounter` over ``model`` that counts while the task is
    made and scrubbed; the result's ``work`` is its report, in passes over the task's clean tokens."""
    check_model(model)
    if not isinstance(spec, HypothesisSpec):
        raise MechscopeError(f"expected a HypothesisSpec (parse_hypothesis_file reads one), got {type(spec).__name__}")
    t0 = time.perf_counter()
    settings = {k: v for k, v in spec.data.items() if k != "token_range"}
    if spec.data.get("token_range") is not None:
        settings["token_range"] = tuple(spec.data["token_range"])
    with counter.counting() if counter is not None else nullcontext():
        task = make_task(model, spec.task, spec.metric, **settings)
        edges = TransformerEdges(model)
        hyp = parse_hypothesis({"claims": list(spec.claims)}, edges.graph)  # unknown component, slot or edge: one line
        used = sorted({c.feature for c in hyp.claims if c.feature is not None})
        feats = {f: feature_values(f, task) for f in used}
        with evaluating(model):
            res = scrub(edges, task.clean, metric=task.metric, hypothesis=hyp, features=feats, samples=spec.samples,
                        seed=spec.seed, sampling=spec.sampling, breakdown=spec.breakdown)  # fmt: skip
    work = None if counter is None else counter.report("lm scrub", task.ids.numel())
    return LMScrub(
        model=name or model.cfg.name,
        name=spec.name,
        description=spec.description,
        task=task.kind,
        task_description=task.description,
        metric=task.metric_name,
        better=task.better,
        settings={**task.settings, "samples": spec.samples, "seed": spec.seed, "sampling": spec.sampling},
        features={f: describe_feature(f) for f in used},
        scrub=res,
        seconds={"scrub": time.perf_counter() - t0},
        work=work,
    )
