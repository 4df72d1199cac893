"""The explain summary's sentences (``cnn explain``: report/summary.py), from a hand-made result where each
claim is known true or false.

Three classes (cat, dog, fox), stages conv1 (4 channels) and conv2 (5 channels):

* with every conv2 channel at its mean the network calls every image a fox, and the foxes keep 100%: the fox
  circuit's mean-ablation tests are vacuous (its necessity, 99%, cannot show anything; resample leaves 40%);
* resample-ablation drew its donors from the data distribution (a third of them of the image's own class);
* conv2 channel 1 costs the cats 2 points when mean-ablated, nothing else costs any class 0.5 points;
* the cat circuit's largest conv1 input carries 23% of the summed |contribution| of the 4 conv1 channels.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from mechscope.cnn.methods.ablation_study import AblationResult, StageAblation, WholeStage
from mechscope.cnn.methods.circuit_study import CircuitStudy, ClassCircuit, Feeder
from mechscope.cnn.methods.explained import ExplainResult
from mechscope.cnn.methods.overview import Overview
from mechscope.cnn.methods.patching import PatchingResult, StagePatching, TopUnit
from mechscope.cnn.methods.selectivity import StageSelectivity
from mechscope.cnn.report import summary as S

NAMES = ("cat", "dog", "fox")
K = 3


def _stage_ablation(name: str, c: int, cost: dict | None = None) -> StageAblation:
    mean = torch.full((c, K), -0.001)
    for (ch, k), v in (cost or {}).items():
        mean[ch, k] = -v
    overall = mean.mean(1)
    return StageAblation(name, f"{name}.hook_out", "hand-made", mean.clone(), mean, overall.clone(), overall)


def _whole(stage: str, kind: str, reads_as: int, share: float, per_class) -> WholeStage:
    pred = torch.full((K,), (1 - share) / (K - 1))
    pred[reads_as] = share
    per = torch.tensor(per_class, dtype=torch.float64)
    return WholeStage(stage, kind, per, float(per.mean()), pred.double(), reads_as)


def _selectivity(name: str, c: int) -> StageSelectivity:
    means = torch.rand(c, K, generator=torch.Generator().manual_seed(c))
    pref = tuple(int(x) for x in means.argmax(1))
    return StageSelectivity(name, "hand-made", means, torch.full((c,), 0.3), pref, tuple(range(c)), ("upper left",) * c)


def _circuit(target: int, channels, necessity: float, resample: float, feeders=()) -> ClassCircuit:
    z = torch.zeros(K)
    return ClassCircuit(
        target=target, channels=tuple(channels), method="hand-made", margin=0.0, prefix_size=None, greedy_size=None,
        pruned_size=None, greedy_order=tuple(channels), ranking=tuple(range(5)), full_accuracy=0.98,
        sufficiency=0.975, necessity=necessity, necessity_resample=resample, other_classes_called_full=0.01,
        other_classes_called_circuit=0.015, meets_criterion=True, accuracy_criterion_met=True,
        per_class_accuracy_circuit_only=z, per_class_accuracy_circuit_ablated=z, per_class_accuracy_circuit_resampled=z,
        held_out_full_accuracy=None, held_out_sufficiency=None, held_out_other_classes_called_full=None,
        held_out_other_classes_called_circuit=None, growth=(), attribution=torch.zeros(5),
        readout_weight_to_class=None, feeders=tuple(feeders), feeders_all=torch.zeros(4) if feeders else None,
    )  # fmt: skip


def _study(**changes) -> CircuitStudy:
    circuits = (
        _circuit(0, (1, 2), 0.30, 0.10, (Feeder(3, 0.8, 0.23), Feeder(0, -0.5, 0.14))),
        _circuit(1, (0, 3), 0.50, 0.20),
        _circuit(2, (4,), 0.99, 0.40),
    )
    fields = dict(
        stage="conv2", site="conv2.hook_out", closed_form=True, tolerance=0.01, criterion="hand-made",
        search="hand-made", necessity="hand-made", necessity_resample="hand-made", resample_seed=0,
        held_out_check="", feeder_stage="conv1", circuits=circuits, resample_donors="data",
        resample_same_class_share=1 / 3,
    )  # fmt: skip
    return CircuitStudy(**(fields | changes))


def make_result(fox_share: float = 1.0, fox_accuracy: float = 1.0, **study) -> ExplainResult:
    conf = ((97, 2, 1), (1, 98, 1), (0, 1, 99))
    ablation = AblationResult(
        metric="hand-made", baseline_per_class=torch.tensor([0.97, 0.98, 0.99]), mean_reference="",
        stages=(_stage_ablation("conv1", 4), _stage_ablation("conv2", 5, {(1, 0): 0.02})), readout=None,
        whole=(_whole("conv1", "zero", 0, 1.0, [1, 0, 0]), _whole("conv1", "mean", 1, 1.0, [0, 1, 0]),
               _whole("conv2", "zero", 0, 1.0, [1, 0, 0]),
               _whole("conv2", "mean", 2, fox_share, [0, 0, fox_accuracy])),
    )  # fmt: skip
    unit = TopUnit(channel=3, y=1, x=2, recovered=0.41)
    patching = PatchingResult(
        clean_class=0, corrupted_class=1, pairs=16, clean_test_indices=(), corrupted_test_indices=(), metric="LD",
        logit_difference_clean_mean=5.0, logit_difference_corrupted_mean=-5.0,
        stages=(StagePatching("conv2", (unit,), torch.zeros(5, 3, 3), torch.tensor([0.1, -0.6, 0.2, 0.3, 0.0]),
                              torch.zeros(5)),),
    )  # fmt: skip
    return ExplainResult(
        run=None, model={}, data={}, class_names=NAMES, settings={},
        overview=Overview(300, 0.98, (0.97, 0.98, 0.99), conf), weights=None, ablation=ablation,
        selectivity=(_selectivity("conv1", 4), _selectivity("conv2", 5)), patching=patching,
        circuits=_study(**study), examples=(),
    )  # fmt: skip


@pytest.fixture(scope="module")
def lines() -> list[str]:
    return S.summarise(make_result())


def one(lines: list[str], start: str) -> str:
    found = [s for s in lines if s.startswith(start)]
    assert len(found) == 1, (start, lines)
    return found[0]


def test_a_class_the_study_did_not_search_is_one_line():
    from mechscope.core.errors import MechscopeError

    assert _study().of(1).channels == (0, 3) and _study().get(7) is None
    with pytest.raises(MechscopeError, match="no circuit for class 7: this study searched class"):
        _study().of(7)  # it returned None, and `.channels` failed on it


def test_the_mean_bias_and_the_donors_are_stated(lines):
    line = one(lines, "Mean-ablation is not neutral here")
    assert "the network calls every test image a fox (at least 50% counts as the mean conv2 map reading" in line
    assert "drawn at random from the whole test set (seed 0: the data distribution" in line
    assert "33.3% of the donors are of the image's own class" in line
    assert "no such bias" not in " ".join(lines)


def test_other_class_donors_state_their_bias():
    line = one(S.summarise(make_result(resample_donors="other_class")), "Mean-ablation is not neutral here")
    assert "a random test image of another class" in line and "biases it the other way" in line


def test_a_mean_that_reads_as_no_class_is_not_called_biased():
    lines = S.summarise(make_result(fox_share=0.3, fox_accuracy=0.3))
    assert not any(s.startswith("Mean-ablation is not neutral") for s in lines)
    assert "most common answer is fox (30.0% of test images; under the 50%" in one(lines, "With every conv2 channel")
    assert not any(s.startswith("For the foxes") for s in lines)  # no vacuous-test sentence either


def test_the_fox_circuit_is_vacuous_not_a_job(lines):
    line = one(lines, "For the foxes, the class the mean conv2 map reads as")
    assert "the circuit's mean-ablation tests are vacuous" in line
    assert "its accuracy half is met by the empty set (100.0% of the foxes called fox" in line
    assert "so the 99.0% it leaves cannot show that the foxes need them" in line
    assert "Resample-ablating them, which has no pull towards fox, leaves 40.0%" in line
    assert "job" not in " ".join(lines)
    # the foxes lose accuracy when every conv2 channel is at its mean: the empty set does not meet the accuracy half
    other = one(S.summarise(make_result(fox_accuracy=0.5)), "For the foxes")
    assert "met by the empty set" not in other and "cannot show that the foxes need them" in other


def test_a_feeder_share_says_of_what_and_that_it_is_an_estimate(lines):
    line = one(lines, "Class cat:")
    assert ("By activation × gradient (a first-order estimate, not an ablation), its largest conv1 input is channel 3: "
            "23% of the summed |contribution| of all 4 conv1 channels") in line
    assert "of the total" not in " ".join(lines)
    assert "conv1 input" not in one(lines, "Class dog:")  # no feeders: no claim


def test_the_named_channel_is_the_costliest_and_the_threshold_is_stated(lines):
    line = one(lines, "conv2 channel 1: mean-ablating it costs class cat 2.0 points")
    assert "(named: the only channel costing one class at least 0.5 points, largest first)" in line
    assert not any(s.startswith("conv2 channel 0:") for s in lines)  # 0.1 points: under the threshold
    assert "the costliest is channel 1" in one(lines, "conv2, one channel mean-ablated at a time (measured)")
    assert not any(s.startswith("The other ") for s in lines)


def test_channels_past_the_named_three_are_listed_not_dropped():
    """Five channels cost a class at least 0.5 points: three get a sentence, the other two are listed (the
    sentences said "named: a cost of at least 0.5 points" and named three of eight)."""
    r = make_result()
    costs = {(0, 1): 0.009, (1, 0): 0.02, (2, 2): 0.006, (3, 1): 0.012, (4, 0): 0.005}
    stages = (r.ablation.stages[0], _stage_ablation("conv2", 5, costs))
    lines = S.summarise(replace(r, ablation=replace(r.ablation, stages=stages)))
    named = [s for s in lines if s.startswith("conv2 channel ") and "mean-ablating it costs" in s]
    assert [s.split(":")[0] for s in named] == ["conv2 channel 1", "conv2 channel 3", "conv2 channel 0"]
    assert all("(named: the 3 largest of the 5 channels costing one class at least 0.5 points" in s for s in named)
    line = one(lines, "The other 2 conv2 channels costing one class at least 0.5 points:")
    assert line.endswith(": 2 (class fox, 0.6); 4 (class cat, 0.5).")


def test_the_preferred_class_comes_with_the_next_one(lines):
    """A channel whose class means are all alike does not read as preferring one: the next class's mean is given."""
    sel = make_result().selectivity[1]
    means = sel.class_means[1]
    first, second = means.argsort(descending=True)[:2].tolist()
    line = one(lines, "conv2 channel 1: mean-ablating it costs class cat")
    assert (f"its mean activation is highest on class {NAMES[first]} (mean {float(means[first]):.2f}; next class "
            f"{NAMES[second]}, {float(means[second]):.2f}; selectivity 0.30)") in line  # fmt: skip


def test_resample_against_mean_says_which_donors(lines):
    line = one(lines, "Resample-ablating a circuit (donors from the data distribution) leaves")
    assert "for 3 of 3 classes (median 20.0% against 50.0%). Neither is a neutral 'off'" in line
    assert "66.7% of them of another class" in line and "for more than half" not in line


def test_patching_says_it_is_measured_and_what_the_share_is_of(lines):
    line = one(lines, "Activation patching from a cat into a dog")
    assert "measured" in line and "of the gap between the two images' logit differences restored" in line
    assert "the whole channels that move it most, one stage at a time: conv2 channel 1 (-60% ± 0)" in line
    assert "pairs, all there are" not in line  # no --pairs asked for more


def test_patching_says_when_there_were_fewer_pairs_than_asked():
    r = make_result()
    line = one(S.summarise(replace(r, settings={"n_pairs": 40})), "Activation patching from a cat into a dog")
    assert (f"({r.patching.pairs} pairs, all there are of correctly classified images of the two classes (--pairs "
            "asked for 40);") in line
    assert "all there are" not in one(S.summarise(replace(r, settings={"n_pairs": r.patching.pairs})), "Activation")


def test_held_out_images_are_judged_by_the_same_criterion():
    """The circuits are searched on the test images, where they pass narrowly by design; the held-out images give
    the criterion's verdict on data the search never saw (both halves, the same tolerance)."""
    r = make_result()
    held = dict(held_out_full_accuracy=0.99, held_out_other_classes_called_full=0.001)
    circuits = (
        replace(r.circuits.circuits[0], margin=0.002, held_out_sufficiency=0.985,  # both halves hold
                held_out_other_classes_called_circuit=0.005, **held),
        replace(r.circuits.circuits[1], margin=0.004, held_out_sufficiency=0.97,  # accuracy 2 points short
                held_out_other_classes_called_circuit=0.005, **held),
        replace(r.circuits.circuits[2], margin=0.001, held_out_sufficiency=0.99,  # other classes called fox
                held_out_other_classes_called_circuit=0.02, **held),
    )  # fmt: skip
    study = replace(r.circuits, circuits=circuits, held_out_check="training images 100-200, not used for the means")
    assert [study.held_out_met(c) for c in circuits] == [True, False, False]
    assert make_result().circuits.held_out_met(r.circuits.circuits[0]) is None  # no held-out images: no verdict
    line = one(S.summarise(replace(r, circuits=study)), "These are the smallest sets for the test images")
    assert "the margin is at most 0.4 points" in line
    assert "(training images 100-200, not used for the means), 1 of 3 meet the criterion (class cat)" in line
    assert "accuracy there is 0.0 to 2.0 points below the full model's (class dog the most)" in line
    assert "called it up to 1.9 points more often" in line
    assert not any(s.startswith("These are the smallest") for s in S.summarise(r))


def test_the_donor_field_survives_json():
    study = _study()
    again = CircuitStudy.from_dict(study.to_dict())
    assert again.resample_donors == "data" and again.resample_same_class_share == pytest.approx(1 / 3)
    old = {k: v for k, v in study.to_dict().items() if k not in ("resample_donors", "resample_same_class_share")}
    assert CircuitStudy.from_dict(old).resample_donors == "other_class"  # what an older mechanisms.json meant
    assert replace(study, resample_donors="other_class").resample_donors == "other_class"


def test_the_most_shared_channel_is_named_only_without_a_tie(lines):
    assert one(lines, "No conv2 channel is in more than 1 circuit: 5 channels are in 1")
    r = make_result()
    circuits = r.circuits.circuits[:2] + (replace(r.circuits.circuits[2], channels=(4, 1)),)
    shared = S.summarise(replace(r, circuits=replace(r.circuits, circuits=circuits)))
    line = one(shared, "conv2 channel 1 is in the most circuits (2: classes cat, fox; no other channel is in more")
    assert "0 of 5 channels are in none" in line


def test_the_size_range_names_every_class_at_each_end(lines):
    line = one(lines, "Per-class circuits in conv2:")
    assert "Sizes run from 1 channel (class fox) to 2 (classes cat and dog), mean 1.7 of 5." in line
    r = make_result()
    circuits = r.circuits.circuits[:2] + (replace(r.circuits.circuits[2], channels=(4, 1, 2)),)
    line = one(S.summarise(replace(r, circuits=replace(r.circuits, circuits=circuits))), "Per-class circuits")
    assert "Sizes run from 2 channels (classes cat and dog) to 3 (class fox), mean 2.3 of 5." in line


def test_a_tie_for_the_costliest_channel_names_every_tied_channel(lines):
    line = one(lines, "conv1, one channel mean-ablated at a time (measured)")
    assert "every channel costs the same (0.1 points of test accuracy)" in line  # all four at -0.001
    assert "is shared by 12 (channel, class) pairs" in line
    r = make_result()
    conv1 = _stage_ablation("conv1", 4, {(1, 0): 0.02, (3, 0): 0.02})
    ablation = replace(r.ablation, stages=(conv1, r.ablation.stages[1]))
    line = one(S.summarise(replace(r, ablation=ablation)), "conv1, one channel mean-ablated")
    assert "the costliest are channels 1 and 3 (" in line and "points of test accuracy each)" in line
    pairs = "channel 1 on class cat and channel 3 on class cat"
    assert f"the largest cost to one class, 2.0 points each, is {pairs}" in line
    assert "the costliest is channel 1 (" in one(lines, "conv2, one channel mean-ablated")


def test_the_most_common_confusion_names_every_tie(lines):
    assert "; the most common confusion is a cat read as a dog (2 images)." in lines[0]
    r = make_result()
    tied = replace(r.overview, confusion_matrix=((97, 2, 1), (2, 97, 1), (0, 1, 99)))
    line = S.summarise(replace(r, overview=tied))[0]
    both = "a cat read as a dog and a dog read as a cat"
    assert line.endswith(f"; the most common confusions, 2 images each, are {both}.")
    many = replace(r.overview, confusion_matrix=((98, 1, 1), (1, 98, 1), (1, 1, 98)))
    assert S.summarise(replace(r, overview=many))[0].endswith("; 6 confusions tie as the most common, 1 image each.")


def test_the_ablation_matrix_prints_tenths_readably_and_names_its_axes(monkeypatch):
    from importlib.resources import files

    from mechscope.cnn.report import cnn_figures as F

    figures = []
    monkeypatch.setattr(F, "figure_data_uri", lambda fig, dpi: figures.append(fig) or "")
    # changes of -0.94, -1.84, -12.3 and -0.4 points: the last under the printing threshold
    stages = (_stage_ablation("conv1", 4, {(0, 0): 0.0094, (1, 1): 0.0184, (2, 2): 0.123, (3, 0): 0.004}),)
    F.ablation_fig(stages, "mean", NAMES)
    ax = figures[0].axes[0]
    printed = {t.get_text(): t.get_color() for t in ax.texts}
    assert printed == {"-0.9": "black", "-1.8": "black", "-12": "white"}  # not "-1", "-2"; white on the dark cell
    assert ax.get_xlabel() == "class" and ax.get_ylabel() == "conv1 channel"
    template = (files("mechscope.cnn.report") / "templates" / "microscope.html.j2").read_text(encoding="utf-8")
    assert f"Numbers are printed where |change| ≥ {F.PRINT_MIN:g} points, to one decimal below 10" in template
