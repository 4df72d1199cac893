"""The result of ``cnn visualize``: every unit's feature visualisation measured against the test images."""

from __future__ import annotations

from dataclasses import dataclass

from mechscope.core.results import Result, figure_data


@dataclass(frozen=True)
class UnitVis(Result):
    layer: str
    unit: int
    activation: float  # the unit's value on its visualisation
    dataset_max: float  # its maximum over the test images
    ratio_to_dataset_max: float | None  # None: never active on the test set
    exceeds_dataset_max: bool
    objective_first: float  # its objective (activation less the regulariser) on its starting image, step 0
    top_test_images: tuple[int, ...]
    bottom_test_images: tuple[int, ...]
    top_receptive_fields: tuple[tuple[int, int, int, int], ...] | None  # (y0, y1, x0, x1) per top image
    assigned_class: int | None = None  # logits: the class the model gives the visualisation
    assigned_probability: float | None = None


@dataclass(frozen=True)
class FeatvisSummary(Result):
    units: int
    exceed_dataset_max: int
    median_ratio_to_dataset_max: float
    units_never_active_on_test_set: int
    logit_visualisations_classified_as_their_class: int
    logit_visualisations: int


@dataclass(frozen=True)
class FeatvisResult(Result):
    """What ``cnn visualize`` measured; ``to_dict()`` is featvis.json. ``out`` (where the grids were written) is
    for showing it, not in the JSON."""

    SCHEMA = "mechscope.featvis/3"
    FILE = "featvis.json"

    settings: dict
    summary: FeatvisSummary
    units: tuple[UnitVis, ...]
    class_names: tuple[str, ...]
    weights_sha256: str | None = None  # the weights it was made from (core.outputs.weights_hash)
    work: dict | None = None  # forward and backward passes, in passes over the test images (WorkCounter)
    out: str | None = figure_data()
