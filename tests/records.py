"""Complete, small records of other commands' outputs, for tests of the readers that link them.

Each is a real result object (so its JSON is what the command writes and ``from_dict`` reads back), with the
few fields a test is about set and every other field a plain, valid value.
"""

from __future__ import annotations

from mechscope.cnn.methods.attributed import AttributionResult
from mechscope.cnn.methods.faithfulness import CURVES_OVER, FaithfulnessReport, MethodFaithfulness
from mechscope.cnn.methods.visualised import FeatvisResult, FeatvisSummary, UnitVis


def featvis_record(units: list[tuple[str, int, float]], weights: str | None = None, ratio: float = 1.0):
    """``units``: (layer, unit, its maximum over the test images); each visualisation reaches ``ratio`` times it."""
    rows = tuple(
        UnitVis(layer, unit, activation=ratio * top, dataset_max=top, ratio_to_dataset_max=ratio,
                exceeds_dataset_max=ratio > 1, objective_first=0.0, top_test_images=(0,), bottom_test_images=(1,),
                top_receptive_fields=None)
        for layer, unit, top in units
    )  # fmt: skip
    summary = FeatvisSummary(len(rows), sum(r.exceeds_dataset_max for r in rows), ratio, 0, 0, 0)
    return FeatvisResult({"steps": 1}, summary, rows, ("0", "1"), weights)


def attribution_record(methods: list[str], weights: str | None = None) -> AttributionResult:
    report = FaithfulnessReport(
        [MethodFaithfulness(m, 0.1, 0.9, {"all": 0.0}, {"all": 0.0}, [0.5, 0.1], [0.5, 0.9]) for m in methods],
        0.5, 0.5, ["all"], 1, 2, [0.0, 1.0], [0.5, 0.5], [0.5, 0.5], curves_over=CURVES_OVER,
    )  # fmt: skip
    return AttributionResult("pred", "conv1.hook_post", ("0", "1"), (0,), (0,), (0,), report, None, {}, weights)


def explain_record(out, seed: int = 0):
    """A real ``cnn explain`` of a small random two-class CNN on 300 random images labelled by its own predictions
    (a few seconds): (its directory, the result)."""
    import torch

    from mechscope.cnn import explain
    from mechscope.cnn.models.cnn import CNN, CNNConfig

    torch.manual_seed(seed)
    net = CNN(CNNConfig(channels=(4, 6), n_classes=2)).eval()
    x = torch.rand(300, 1, 28, 28, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        margin = net(x) @ torch.tensor([1.0, -1.0])
        net.fc.bias += torch.tensor([-0.5, 0.5]) * margin.median()  # half the images each class
        y = net(x).argmax(1)
    result = explain(net, (x[:200], y[:200]), (x[200:], y[200:]), out=out, class_names=["a", "b"], test_limit=100)
    return out, result


def assert_round_trip(path, result_type):
    """``result_type.load(path)`` gives back what the command wrote: ``to_dict()`` of it is the file's JSON."""
    import json
    from pathlib import Path

    from mechscope.core.outputs import NON_FINITE, VERSIONS, finite_json, versions

    saved = json.loads(Path(path).read_text(encoding="utf-8"))
    saved.pop(NON_FINITE, None)
    if "schema" in saved:  # a record says what made it, beside its fields
        assert saved.pop(VERSIONS) == versions(), f"{path}: its versions are not this install's"
    again, _ = finite_json(result_type.load(path).to_dict())
    assert again == saved, f"{path}: load then to_dict differs from the file"
    return saved
