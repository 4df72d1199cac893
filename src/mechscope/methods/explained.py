"""The result of explaining a CNN: every analysis's typed result in one object, ``to_dict()`` for JSON.

Each field is the frozen dataclass its method returns (:mod:`~mechscope.methods.overview`,
:mod:`~mechscope.methods.ablation_study`, :mod:`~mechscope.methods.selectivity`,
:mod:`~mechscope.methods.patching`, :mod:`~mechscope.methods.circuit_study`,
:mod:`~mechscope.methods.unit_examples`); ``mechanisms.json`` is :meth:`ExplainResult.to_dict`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mechscope.methods.ablation_study import AblationResult
from mechscope.methods.circuit_study import CircuitStudy
from mechscope.methods.overview import Overview, Weights
from mechscope.methods.patching import PatchingResult
from mechscope.methods.selectivity import StageSelectivity
from mechscope.methods.unit_examples import StageExamples
from mechscope.results import SCHEMA_VERSION, Result


@dataclass(frozen=True)
class ExplainResult(Result):
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
    schema_version: int = SCHEMA_VERSION

    @property
    def stage_names(self) -> list[str]:
        return [s.stage for s in self.selectivity]

    def selectivity_of(self, stage: str) -> StageSelectivity:
        return next(s for s in self.selectivity if s.stage == stage)

    def examples_of(self, stage: str) -> StageExamples:
        return next(e for e in self.examples if e.stage == stage)

    def name(self, k: int) -> str:
        return self.class_names[k]
