"""The result of explaining a CNN: every analysis's typed result in one object, ``to_dict()`` for JSON.

Each field is the frozen dataclass its method returns (:mod:`~mechscope.cnn.methods.overview`,
:mod:`~mechscope.cnn.methods.ablation_study`, :mod:`~mechscope.cnn.methods.selectivity`,
:mod:`~mechscope.cnn.methods.patching`, :mod:`~mechscope.cnn.methods.circuit_study`,
:mod:`~mechscope.cnn.methods.unit_examples`); ``mechanisms.json`` is :meth:`ExplainResult.to_dict`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mechscope.cnn.methods.ablation_study import AblationResult
from mechscope.cnn.methods.circuit_study import CircuitStudy
from mechscope.cnn.methods.overview import Overview, Weights
from mechscope.cnn.methods.patching import PatchingResult
from mechscope.cnn.methods.selectivity import StageSelectivity
from mechscope.cnn.methods.unit_examples import StageExamples
from mechscope.core.results import Result, figure_data


@dataclass(frozen=True)
class ExplainResult(Result):
    """Everything ``cnn explain`` measured; ``to_dict()`` is mechanisms.json. ``linked`` (the other commands'
    outputs the report links: feature visualisations, attribution grids, tuning curves, blocks) and ``vrange``
    (the pixel range images are drawn in) are for the report; they are not in the JSON."""

    SCHEMA = "mechscope.explain/3"
    FILE = "mechanisms.json"

    run: str | None
    model: dict  # the spec (stages, hooks, receptive fields, read-out) and the architecture table
    data: dict  # the dataset: name, checksums, shape, class names; what the numbers rest on
    class_names: tuple[str, ...]
    settings: dict
    overview: Overview
    weights: Weights
    ablation: AblationResult
    selectivity: tuple[StageSelectivity, ...]
    patching: PatchingResult | None
    circuits: CircuitStudy
    examples: tuple[StageExamples, ...]
    summary: tuple[str, ...] = ()
    seconds: dict = field(default_factory=dict)
    work: dict | None = None  # forward and backward passes made, in passes over the test images (WorkCounter)
    linked: dict | None = figure_data()
    vrange: tuple[float, float] = figure_data((0.0, 1.0))

    @property
    def stage_names(self) -> list[str]:
        return [s.stage for s in self.selectivity]

    def selectivity_of(self, stage: str) -> StageSelectivity:
        return next(s for s in self.selectivity if s.stage == stage)

    def examples_of(self, stage: str) -> StageExamples:
        return next(e for e in self.examples if e.stage == stage)

    def name(self, k: int) -> str:
        return self.class_names[k]
