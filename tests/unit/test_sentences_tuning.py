"""The tuning report's sentences (``cnn tuning``: report/tuning.py), from a hand-made result.

Four conv1 units: 0 a sharp edge detector (CV 0.10, drive 0.9), 1 a sharp blob detector by size fall-off (0.8),
2 broad and weak (CV 0.8, drive 0.2: both reasons at once), 3 broad but strongly driven (CV 0.7, drive 0.9).
"""

from __future__ import annotations

from mechscope.cnn.methods.stimuli import Stimulus, StimulusSet
from mechscope.cnn.methods.tuning import CV_MAX, DRIVE_MIN, FALLOFF_MIN, StageTuning, TuningResult, UnitTuning
from mechscope.cnn.report import tuning as T


def unit(c: int, tuned: bool, family: str, drive: float, sharpness: float, kind: str) -> UnitTuning:
    return UnitTuning(
        stage="conv1", channel=c, blank=0.0, dataset_max=1.0, curves=(), preferred=Stimulus(family, angle=45.0),
        preferred_response=drive, family_best={}, tuned=tuned, label=f"{family} detector" if tuned else "not tuned",
        label_family=family if tuned else None, label_stimulus=None, drive=drive, sharpness=sharpness,
        sharpness_kind=kind, reason="hand-made",
    )  # fmt: skip


def make_result() -> TuningResult:
    cv, fall = "circular variance", "size fall-off"
    units = (unit(0, True, "edge", 0.9, 0.10, cv), unit(1, True, "blob", 0.8, 0.8, fall),
             unit(2, False, "line", 0.2, 0.8, cv), unit(3, False, "line", 0.9, 0.7, cv))  # fmt: skip
    stim = StimulusSet(size=(28, 28), seed=0, width=2.1, supersample=4, offsets=((0.0, 0.0), (3.0, 3.0)), radii={},
                       family_counts={"edge": 2}, stimuli=(Stimulus("edge"),) * 2)  # fmt: skip
    return TuningResult(run=None, weights_sha256=None, input_shape=(1, 28, 28), value_range=(0.0, 1.0), stimuli=stim,
                        thresholds={}, stages=(StageTuning("conv1", "conv1.hook_post", {}, units),))  # fmt: skip


def test_counts_and_thresholds_are_stated():
    lines = T.summary_lines(make_result())
    assert lines[0].startswith("2 of 4 units are tuned to these stimuli (conv1 2 of 4)")
    assert f"circular variance ≤ {CV_MAX} or size fall-off ≥ {FALLOFF_MIN}" in lines[0]
    assert f"at least {DRIVE_MIN:g} of the unit's test-set maximum" in lines[0]


def test_sharpest_first_says_by_what_and_claims_no_more():
    line = T.summary_lines(make_result())[1]
    assert line.startswith("Tuned units, sharpest first (lowest circular variance, then highest size fall-off): "
                           "conv1 0: edge detector (CV 0.10, drive 0.90); conv1 1: blob detector (size fall-off 0.80")
    assert "Clearly" not in line


def test_why_untuned_counts_overlap_and_say_so():
    line = T.summary_lines(make_result())[3]
    assert line.startswith("2 units are not tuned to these stimuli: for their preferred family 2 are too broadly tuned "
                           f"(circular variance above {CV_MAX} or size fall-off below {FALLOFF_MIN}) and 1 are driven")
    assert "(a unit can be both)" in line


def test_the_microscope_sentence():
    linked = {"dir": "RUN/tuning", "units": {
        "conv1_0": {"tuned": True, "stage": "conv1", "channel": 0, "label": "edge",
                    "sharpness_kind": "circular variance", "sharpness": 0.1},
        "conv1_1": {"tuned": False, "stage": "conv1", "channel": 1, "label": "not tuned",
                    "sharpness_kind": "circular variance", "sharpness": 0.9}}}  # fmt: skip
    assert T.microscope_sentence(linked) == (
        "Tuning curves on synthetic stimuli (from RUN/tuning): 1 of 2 units tuned, sharpest first: "
        "conv1 0 edge (CV 0.10).")


def test_labels_driven_harder_by_another_family_are_counted_and_said():
    from dataclasses import replace

    cv = "circular variance"
    best = {"edge": {"response": 0.74, "drive": 0.74, "sharpness": 0.2, "sharpness_kind": cv, "sharp": True},
            "corner": {"response": 1.03, "drive": 1.03, "sharpness": 0.62, "sharpness_kind": cv, "sharp": False},
            "arc": {"response": 0.96, "drive": 0.96, "sharpness": 0.5, "sharpness_kind": cv, "sharp": False}}
    r = make_result()
    units = (replace(r.stages[0].units[0], family_best=best, drive=0.74), *r.stages[0].units[1:])
    r = replace(r, stages=(replace(r.stages[0], units=units),))
    assert units[0].stronger() == ["corner", "arc"] and units[1].stronger() == []
    line = next(s for s in T.summary_lines(r) if "respond more strongly" in s)
    assert line.startswith("1 of the 2 labelled units respond more strongly to a family they are not sharply tuned to")
    assert line.endswith(": conv1 0 (edge 0.74 against corner 1.03).")


def test_the_microscope_sentence_counts_labels_driven_harder_elsewhere():
    linked = {"dir": "RUN/tuning", "units": {
        "conv1_0": {"tuned": True, "stage": "conv1", "channel": 0, "label": "edge", "stronger": ["corner"],
                    "sharpness_kind": "circular variance", "sharpness": 0.1},
        "conv1_1": {"tuned": True, "stage": "conv1", "channel": 1, "label": "line", "stronger": [],
                    "sharpness_kind": "circular variance", "sharpness": 0.2}}}  # fmt: skip
    assert T.microscope_sentence(linked).endswith(
        " 1 of the 2 respond more strongly to a family they are not sharply tuned to (their sections say which), so a "
        "label is the sharpest well-driven tuning, not the strongest response.")


def test_a_size_unit_peaking_at_the_largest_radius_says_the_stimuli_end_first():
    from dataclasses import replace

    r = make_result()
    blob = {"blob": {"response": 0.9, "drive": 0.9, "sharpness": 0.0, "sharpness_kind": "size fall-off",
                     "sharp": False, "at_largest_radius": True}}  # fmt: skip
    unit3 = replace(r.stages[0].units[3], preferred=Stimulus("blob", radius=6.5), family_best=blob)
    r = replace(r, stages=(replace(r.stages[0], units=(*r.stages[0].units[:3], unit3)),))
    line = next(s for s in T.summary_lines(r) if "not tuned to these stimuli:" in s)
    assert line.endswith("; 1 of them respond most to a blob or loop at the largest radius drawn, so the stimuli end "
                         "before any fall-off could show.")
