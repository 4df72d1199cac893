"""The result of ``cnn attribute``: what was attributed and the faithfulness report that ranks the methods."""

from __future__ import annotations

from dataclasses import dataclass

from mechscope.cnn.methods.faithfulness import FaithfulnessReport
from mechscope.core.outputs import WEIGHTS_KEY
from mechscope.core.results import Result, figure_data, plain


@dataclass(frozen=True)
class Completeness(Result):
    steps: int
    max_abs_delta: float
    max_relative_delta: float


@dataclass(frozen=True)
class AttributionResult(Result):
    """faithfulness.json: the faithfulness report and what was attributed. ``out`` (where the grids were
    written) is for showing it, not in the JSON."""

    SCHEMA = "mechscope.attribution/3"
    FILE = "faithfulness.json"

    target: str
    gradcam_layer: str
    class_names: tuple[str, ...]
    test_indices: tuple[int, ...]
    labels: tuple[int, ...]
    predictions: tuple[int, ...]
    faithfulness: FaithfulnessReport
    completeness: Completeness | None
    skipped: dict[str, str]  # method -> why it does not apply to this model
    weights_sha256: str | None = None  # the weights it was made from (core.outputs.weights_hash)
    work: dict | None = None  # forward and backward passes, in passes over the images attributed (WorkCounter)
    out: str | None = figure_data()

    def to_dict(self) -> dict:
        return {
            "schema": self.SCHEMA,
            **self.faithfulness.to_dict(),
            "integrated_gradients_completeness": plain(self.completeness),
            "target": self.target,
            "gradcam_layer": self.gradcam_layer,
            "class_names": list(self.class_names),
            "examples": {"test_indices": list(self.test_indices), "labels": list(self.labels),
                         "predictions": list(self.predictions)},
            "skipped": dict(self.skipped),
            WEIGHTS_KEY: self.weights_sha256,
            "work": self.work,
        }  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict) -> AttributionResult:
        ex, c = d["examples"], d.get("integrated_gradients_completeness")
        return cls(
            d["target"], d["gradcam_layer"], tuple(d["class_names"]), tuple(ex["test_indices"]), tuple(ex["labels"]),
            tuple(ex["predictions"]), FaithfulnessReport.from_dict(d), None if c is None else Completeness(**c),
            dict(d.get("skipped") or {}), d.get(WEIGHTS_KEY), d.get("work"),
        )  # fmt: skip
