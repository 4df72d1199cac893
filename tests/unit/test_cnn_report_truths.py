"""The vision wing's reports state the numbers of their results: sentences checked against numbers formatted by
hand from hand-made results, figures read back through their matplotlib artists, thresholds at their boundary.

Fixtures come from the sentence tests (tests/unit/test_sentences_*.py); every expected string here is written out
from the fields set in the test, not produced by the report's own helpers.
"""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from matplotlib.collections import PathCollection

from mechscope.cnn.methods.blocks import Selection
from mechscope.cnn.methods.stimuli import Stimulus, StimulusSet
from mechscope.cnn.methods.tuning import DRIVE_MIN, Curve, StageTuning, TuningResult
from mechscope.cnn.methods.universality import CircuitReuse, Comparison, MatchedPair
from mechscope.cnn.report import blocks as B
from mechscope.cnn.report import sae as R
from mechscope.cnn.report import summary as S
from mechscope.cnn.report import tuning as T
from mechscope.cnn.report import universality as U
from tests.unit import test_sentences_blocks as blocks_fixture
from tests.unit import test_sentences_explain as explain_fixture
from tests.unit import test_sentences_tuning as tuning_fixture
from tests.unit import test_sentences_universality as universality_fixture

CV, FALL = "circular variance", "size fall-off"


# ---- tuning --------------------------------------------------------------------------------------------------


def tuning_result(units, n_stimuli: int = 6, offsets=((0.0, 0.0), (3.0, 3.0))) -> TuningResult:
    stim = StimulusSet(size=(28, 28), seed=3, width=2.1, supersample=4, offsets=offsets, radii={},
                       family_counts={"edge": n_stimuli}, stimuli=(Stimulus("edge"),) * n_stimuli)  # fmt: skip
    return TuningResult(run=None, weights_sha256=None, input_shape=(1, 28, 28), value_range=(0.0, 1.0), stimuli=stim,
                        thresholds={}, stages=(StageTuning("conv1", "conv1.hook_post", {}, tuple(units)),))  # fmt: skip


def test_tuning_label_counts_run_most_common_family_first():
    """Truth: 3 tuned line units and 1 tuned edge unit, counted by hand: 'lines 3, edges 1', the larger first."""
    u = tuning_fixture.unit
    units = [u(0, True, "edge", 0.9, 0.1, CV), u(1, True, "line", 0.9, 0.2, CV), u(2, True, "line", 0.9, 0.25, CV),
             u(3, True, "line", 0.9, 0.15, CV)]  # fmt: skip
    lines = T.summary_lines(tuning_result(units))
    assert "Labels by family: lines 3, edges 1." in lines


def test_size_labels_run_highest_fall_off_first_and_the_rest_are_counted():
    """Truth: the documented order (lowest CV, then highest size fall-off): CV 0.10 unit 0, then fall-off 0.90
    unit 2 before 0.60 unit 1; with n_named=2 the third is counted by hand as '1 more'."""
    u = tuning_fixture.unit
    units = [
        u(0, True, "edge", 0.9, 0.10, CV),
        u(1, True, "blob", 0.8, 0.60, FALL),
        u(2, True, "blob", 0.7, 0.90, FALL),
    ]
    lines = T.summary_lines(tuning_result(units))
    order = lines[1]
    assert order.index("conv1 0:") < order.index("conv1 2:") < order.index("conv1 1:")
    assert (
        "conv1 2: blob detector (size fall-off 0.90, drive 0.70); conv1 1: blob detector (size fall-off 0.60" in order
    )
    short = T.summary_lines(tuning_result(units), n_named=2)[1]
    assert short.endswith("; and 1 more in the table.")
    assert "conv1 1:" not in short


def test_a_unit_driven_exactly_to_the_threshold_is_not_called_weak():
    """Truth: 'driven to less than DRIVE_MIN' is strict; an untuned broad unit with drive == DRIVE_MIN is broad only,
    so by hand: 1 too broad, 0 driven less."""
    u = tuning_fixture.unit
    units = [u(0, True, "edge", 0.9, 0.1, CV), u(1, False, "line", DRIVE_MIN, 0.8, CV)]
    line = next(s for s in T.summary_lines(tuning_result(units)) if "not tuned to these stimuli:" in s)
    assert line.startswith("1 units are not tuned to these stimuli: for their preferred family 1 are too broadly")
    assert " and 0 are driven to less than" in line


def test_the_stimulus_count_sentence_divides_by_the_positions():
    """Truth: 6 stimulus images at 2 positions are 3 shapes (6 // 2), 28×28 pixels, seed 3."""
    u = tuning_fixture.unit
    last = T.summary_lines(tuning_result([u(0, True, "edge", 0.9, 0.1, CV)]))[-1]
    assert last.startswith("6 stimulus images of 28×28 pixels (3 shapes, each drawn at 2 positions; seed 3)")


@pytest.mark.filterwarnings("ignore:No artists with labels")  # the empty radius panel
def test_unit_figure_plots_responses_over_the_test_set_maximum():
    """Truth: the angle curve's line is response / dataset_max, computed by hand (2, 1, 0, 1) / 4; the drive
    threshold line at DRIVE_MIN."""
    curve = Curve("edge", "angle", (0.0, 90.0, 180.0, 270.0), (2.0, 1.0, 0.0, 1.0), (1.0, 0.5, 0.0, 0.5), {}, 0.3)
    u = replace(tuning_fixture.unit(0, True, "edge", 0.5, 0.3, CV), dataset_max=4.0, curves=(curve,),
                preferred_image=torch.zeros(1, 28, 28), label_image=None)  # fmt: skip
    fig = T.unit_figure(u)
    ax = fig.axes[0]
    solid = [ln for ln in ax.get_lines() if ln.get_linestyle() == "-" and len(ln.get_xdata()) == 4]
    assert len(solid) == 1
    np.testing.assert_allclose(solid[0].get_xdata(), [0, 90, 180, 270])
    np.testing.assert_allclose(solid[0].get_ydata(), [0.5, 0.25, 0.0, 0.25])
    dashed = [ln for ln in ax.get_lines() if ln.get_linestyle() == "--"]
    np.testing.assert_allclose(dashed[0].get_ydata(), [0.25, 0.125, 0.0, 0.125])


def test_stage_figure_puts_drive_on_x_and_circular_variance_on_y():
    """Truth: each unit's dot sits at (its family's best drive, its circular variance) as set by hand."""
    u = tuning_fixture.unit
    best = {"edge": {"drive": 0.9, "sharpness": 0.1, "sharpness_kind": CV},
            "line": {"drive": 0.4, "sharpness": 0.7, "sharpness_kind": CV}}  # fmt: skip
    units = (replace(u(0, True, "edge", 0.9, 0.1, CV), family_best=best),
             replace(u(1, False, "line", 0.4, 0.7, CV), family_best=best))  # fmt: skip
    fig = T.stage_figure(StageTuning("conv1", "conv1.hook_post", {}, units))
    dots = [tuple(np.asarray(c.get_offsets())[0]) for c in fig.axes[0].collections
            if isinstance(c, PathCollection) and len(c.get_offsets()) == 1]  # fmt: skip
    assert sorted(dots) == sorted([(0.9, 0.1), (0.4, 0.7)])


# ---- universality ---------------------------------------------------------------------------------------------


def test_the_share_of_matched_pairs_at_least_half_is_the_trained_one_first():
    """Truth: the fixture's trained Hungarian pairs (0.9, 0.8, 0.7) are all ≥ 0.5 (100%), the random ones (0.2) none
    (0%): 'trained against baseline' order."""
    line = U.summary_lines(universality_fixture.make_result())[1]
    assert "100% of pairs ≥ 0.5 against 0%" in line


def test_a_pair_at_exactly_one_half_counts_as_at_least_one_half():
    """Truth: '≥ 0.5' includes 0.5: pairs 0.5, 0.5, 0.9, 0.3 give 3 of 4 = 75%."""
    r = universality_fixture.make_result()
    m = r.comparisons[0].stages[0]
    pairs = tuple(MatchedPair(i, i, v) for i, v in enumerate((0.5, 0.5, 0.9, 0.3)))
    m4 = replace(m, best_a=torch.tensor([0.5, 0.5, 0.9, 0.3]), best_b=torch.tensor([0.5, 0.5, 0.9, 0.3]),
                 matched=pairs)  # fmt: skip
    r = replace(r, comparisons=(replace(r.comparisons[0], stages=(m4,)), *r.comparisons[1:]))
    line = U.summary_lines(r)[1]
    assert "75% of pairs ≥ 0.5 against 0%" in line


def test_a_cka_range_states_its_mean():
    """Truth: three baseline CKAs 0.1, 0.1, 0.7: range 0.10–0.70, mean (0.1 + 0.1 + 0.7) / 3 = 0.30 (median 0.10)."""
    r = universality_fixture.make_result()
    third = Comparison("A", "random B", "baseline", (replace(r.comparisons[1].stages[0], cka=0.7),))
    r = replace(r, comparisons=(*r.comparisons, third))
    line = U.summary_lines(r)[1]
    assert line.endswith("linear CKA 0.90 against 0.10–0.70 (mean 0.30).")


def test_networks_of_different_widths_say_each_direction_in_its_order():
    """Truth: A (3 channels) against B (4): A's units' median best match in B is median(0.9, 0.8, 0.7) = 0.80, B's in
    A median(0.2, 0.3, 0.4, 0.6) = 0.35, written 'A's in B / B's in A'."""
    r = universality_fixture.make_result()
    m = r.comparisons[0].stages[0]
    m = replace(m, best_b=torch.tensor([0.2, 0.3, 0.4, 0.6]), best_b_partner=torch.arange(4))
    runs = ({"label": "A", "test_accuracy": 0.99, "channels": [3]}, {"label": "B", "test_accuracy": 0.99,
                                                                     "channels": [4]})  # fmt: skip
    r = replace(r, runs=runs, comparisons=(replace(r.comparisons[0], stages=(m,)), *r.comparisons[1:]))
    line = next(s for s in U.summary_lines(r) if s.startswith("A (3) against B (4)"))
    assert line.endswith("median best match of A's units in B / of B's in A: conv1 0.80 / 0.35.")


def test_the_random_twin_cka_is_each_networks_own_twin():
    """Truth: CKA(A, random A) = 0.1 and CKA(B, random B) = 0.3 are read off the matrix by hand: mean 0.20."""
    r = universality_fixture.make_result()
    cka = torch.tensor([[1, 0.8, 0.1, 0.6], [0.8, 1, 0.5, 0.3], [0.1, 0.5, 1, 0.1], [0.6, 0.3, 0.1, 1.0]])
    line = next(s for s in U.summary_lines(replace(r, cka=cka)) if s.startswith("CKA on each image's"))
    assert "conv1 0.80 between trained networks, 0.20 with the random twin" in line


def test_a_circuit_case_at_p_exactly_five_percent_is_not_below_it():
    """Truth: 'p < 0.05' is strict: cases with p 0.05 and 0.01 are 1 of 2 below it."""
    r = universality_fixture.make_result()
    reuse = (CircuitReuse(0, (0, 1), (0, 1), (0, 1), 2, 0.7, 0.05), CircuitReuse(1, (2,), (1,), (2,), 1, 0.3, 0.01))
    r = replace(r, comparisons=(replace(r.comparisons[0], circuits=reuse), *r.comparisons[1:]))
    assert U.summary_lines(r)[-1].endswith("1 of 2 class × pair cases have p < 0.05 (hypergeometric).")


def _capture(monkeypatch):
    figs = []
    monkeypatch.setattr(U, "figure_data_uri", lambda fig: figs.append(fig) or "data:")
    return figs


def test_the_histogram_shows_trained_and_random_best_matches(monkeypatch):
    """Truth: the fixture's trained best matches are 0.9, 0.8, 0.7 from each side (6, median 0.80), the random ones
    0.2 (12, median 0.20); the legend says so and the trained curve's mass sits above 0.5."""
    figs = _capture(monkeypatch)
    U.histogram_figure(universality_fixture.make_result())
    ax = figs[0].axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["trained vs trained (median 0.80, 6 units)", "trained vs random (median 0.20, 12 units)"]


def test_the_cka_figure_shows_the_matrix_under_its_labels(monkeypatch):
    """Truth: the image is the result's CKA matrix, the tick labels its labels top to bottom, each cell's text the
    entry formatted to 2 decimals."""
    figs = _capture(monkeypatch)
    r = universality_fixture.make_result()
    U.cka_figure(r)
    ax = figs[0].axes[0]
    np.testing.assert_allclose(ax.get_images()[0].get_array(), r.cka.numpy())
    assert [t.get_text() for t in ax.get_yticklabels()] == list(r.cka_labels)
    assert [t.get_text() for t in ax.get_xticklabels()] == list(r.cka_labels)
    cells = {(t.get_position(), t.get_text()) for t in ax.texts}
    assert ((1, 0), "0.80") in cells and ((2, 0), "0.10") in cells and ((0, 0), "1.00") in cells


# ---- blocks ---------------------------------------------------------------------------------------------------


def test_blocks_follow_the_logits_with_the_largest_change_and_sum_the_groups():
    """Truth: conv2's measured change to the logits is cat +2.60, dog +0.50 (largest first); towards cat its groups
    give 2.0 + 0.5 = +2.50 of the +2.60, residual 0.10; the conv1 → conv2 gap 0.75 − 0.55 = 0.20 is 26.7% of the
    largest change 0.75."""
    lines = B.summary_lines(blocks_fixture.make_result())
    assert any(s.endswith("(measured, as is minus set to zero): cat +2.60, dog +0.50.") for s in lines)
    cat = next(s for s in lines if s.startswith("Logit cat"))
    assert "conv2's groups contribute +2.50 of conv2's measured contribution +2.60" in cat
    assert "the rest, +0.10, outside the groups" in cat
    gap = next(s for s in lines if s.startswith("conv1 → conv2: groups + residual"))
    assert "largest gap 0.200 (26.7% of the largest contribution)" in gap


def test_blocks_typical_images_name_the_largest_signed_group_and_the_lowest_probability():
    """Truth: towards dog the groups give −3.0 and +1.5: the largest (signed, as documented) is group 2 +1.50; of
    probabilities 0.97 and 0.60 the lowest is 0.600."""
    r = blocks_fixture.make_result()
    logits = replace(r.flows[1], attribution=np.array([[2.0, -3.0], [0.5, 1.5]]))
    sel = Selection((7, 9), (7,), (0, 1), (0, 1), (0.97, 0.6), "typical images")
    r = replace(r, flows=(r.flows[0], logits), selection=sel, settings={"typical": True})
    lines = B.summary_lines(r)
    assert lines[0] == "2 test images: typical images (lowest probability among them 0.600)."
    towards = next(s for s in lines if s.startswith("Towards each class"))
    assert "cat: group 1 +2.00; dog: group 2 +1.50" in towards


# ---- explain summary ------------------------------------------------------------------------------------------


def test_resample_counts_only_circuits_it_leaves_strictly_lower():
    """Truth: with resample equal to mean for the dog circuit (0.50 and 0.50), 'less than' holds for 2 of 3
    (cat 0.10 < 0.30, fox 0.40 < 0.99)."""
    r = explain_fixture.make_result()
    circ = list(r.circuits.circuits)
    circ[1] = replace(circ[1], necessity_resample=0.5)
    r = replace(r, circuits=replace(r.circuits, circuits=tuple(circ)))
    line = next(s for s in S.summarise(r) if s.startswith("Resample-ablating a circuit"))
    assert "less accuracy than mean-ablating it for 2 of 3 classes" in line


def test_patching_states_the_sd_over_pairs():
    """Truth: conv2 channel 1 moves the logit difference −60% with sd 0.07 over pairs: '(-60% ± 7)'."""
    r = explain_fixture.make_result()
    st = replace(r.patching.stages[0], channel_std=torch.tensor([0.0, 0.07, 0.0, 0.0, 0.0]))
    r = replace(r, patching=replace(r.patching, stages=(st,)))
    line = next(s for s in S.summarise(r) if s.startswith("Activation patching"))
    assert "conv2 channel 1 (-60% ± 7), ± the sd over pairs." in line


def test_channels_under_the_negligible_cost_are_counted_strictly():
    """Truth: 'cost under 0.1 points each' is strict: conv1's 4 channels cost 0.05, 0.1 (not under), 0.2 and 0.0
    points overall, so 2 of 4."""
    r = explain_fixture.make_result()
    st = r.ablation.stages[0]
    overall = torch.tensor([-0.0005, -S.NEGLIGIBLE, -0.002, 0.0], dtype=torch.float64)
    st = replace(st, mean_overall=overall)
    r = replace(r, ablation=replace(r.ablation, stages=(st, *r.ablation.stages[1:])))
    line = next(s for s in S.summarise(r) if s.startswith("conv1, one channel mean-ablated"))
    assert line.endswith("2 of 4 channels cost under 0.1 points each.")


def test_held_out_shortfalls_run_from_the_smallest_to_the_largest():
    """Truth: held-out accuracy short of the full model's by 0.99 − 0.985 = 0.5, 0.99 − 0.97 = 2.0 and
    0.99 − 0.99 = 0.0 points: 'from 0.0 to 2.0'."""
    r = explain_fixture.make_result()
    held = dict(held_out_full_accuracy=0.99, held_out_other_classes_called_full=0.001,
                held_out_other_classes_called_circuit=0.001)  # fmt: skip
    circ = tuple(replace(c, held_out_sufficiency=s, **held) for c, s in zip(r.circuits.circuits, (0.985, 0.97, 0.99),
                                                                            strict=True))  # fmt: skip
    r = replace(r, circuits=replace(r.circuits, circuits=circ, held_out_check="held"))
    line = next(s for s in S.summarise(r) if s.startswith("These are the smallest sets"))
    assert "accuracy there is 0.0 to 2.0 points below the full model's (class dog the most)" in line


def test_held_out_shortfalls_all_equal_name_no_class_as_the_most():
    """Truth: every class 0.99 - 0.99 = 0.0 points short: one figure for each class, and no class 'the most' (it
    read 'from 0.0 to 0.0 points ... (class cat the most)')."""
    r = explain_fixture.make_result()
    held = dict(held_out_full_accuracy=0.99, held_out_sufficiency=0.99, held_out_other_classes_called_full=0.001,
                held_out_other_classes_called_circuit=0.001)  # fmt: skip
    circ = tuple(replace(c, **held) for c in r.circuits.circuits)
    r = replace(r, circuits=replace(r.circuits, circuits=circ, held_out_check="held"))
    line = next(s for s in S.summarise(r) if s.startswith("These are the smallest sets"))
    assert "accuracy there is 0.0 points below the full model's for each class, and other" in line
    assert "the most" not in line


# ---- SAE ------------------------------------------------------------------------------------------------------


def test_sae_tuned_shares_are_each_sides_own():
    """Truth: 50 of 500 latents are 10.0%, 8 of 32 channels 25.0%."""
    comparison = {"threshold": 0.5,
                  "channels": {"selective": 4, "units": 32, "median_index": 0.4, "tuned": 8, "selective_or_tuned": 10},
                  "latents": {"selective": 200, "units": 500, "median_index": 0.5, "tuned": 50,
                              "selective_or_tuned": 230}}  # fmt: skip
    r = SimpleNamespace(architecture="topk", d_sae=512, hook="conv2.hook_post", d_in=32, dead_fraction=0.0,
                        images=100, comparison=comparison)  # fmt: skip
    line = next(s for s in R.summary_lines(r) if s.startswith("stroke-tuned"))
    assert line.startswith("stroke-tuned (a tuning label): 50 latents (10.0%) against 8 channels (25.0%)")


def test_sae_caution_holds_at_exactly_ninety_percent_recovered():
    """Truth: the documented condition is accuracy recovered ≥ 0.9 with explained variance under 0.5; at exactly
    0.9 (and variance 0.3, 70% missed) the caution is written."""
    mt = SimpleNamespace(explained_variance=0.3, cosine_similarity=0.8, l2_ratio=1.0)
    e = SimpleNamespace(accuracy_recovered=0.9, acc_spliced=0.9, acc_clean=0.99, acc_ablated=0.09, kl_recovered=0.9)
    lines = R.evaluation_lines(mt, e)
    assert len(lines) == 3 and "misses 70% of the activation's variance" in lines[2]


def test_solu_counts_of_the_responding_channels():
    """Truth: 8 channels, 4 silent: 25% of the 4 that respond is 1 channel."""
    from mechscope.cnn.report import solu_cnn

    result = {"models": [{"activation": "relu", "test_accuracy": 0.9, "stages": [
        {"stage": "conv1", "channels": 8, "median": 0.3, "share_ge_0.5": 0.25, "silent": 4}]}]}  # fmt: skip
    line = solu_cnn.summary_lines(result)[1]
    assert "relu median 0.30 (1 of the 4 that respond ≥ 0.5, 25%; 4 silent, left out)" in line


# ---- discovery ------------------------------------------------------------------------------------------------


def test_discovery_compares_with_the_hand_circuit_by_recall_and_jaccard(monkeypatch):
    """Truth: hand circuit (1, 2) against the discovered top 2 (2, 5): 1 shared, recall 1 / 2 = 50%, Jaccard
    1 / 3 = 0.33, AUROC 0.8 as given."""
    from mechscope.cnn.report import discovery as D

    monkeypatch.setattr(D, "discovery_lines", lambda result, name: [])
    hand = {"stage": "conv2", "hand": [1, 2], "discovered_top": [2, 5], "overlap": [2], "recall_at_size": 0.5,
            "jaccard": 1 / 3, "auroc": 0.8}  # fmt: skip
    assert D.summary(SimpleNamespace(run="RUN", hand=hand)) == [
        "cnn explain's conv2 circuit for the class, [1, 2]: the discovered top 2 channels [2, 5] share 1 (50%, "
        "Jaccard 0.33); AUROC of the hand-found channels in the discovered ranking 0.800."
    ]


def test_discovery_channel_bars_are_the_scores_with_the_hand_channels_pink(monkeypatch):
    """Truth: conv2's bars have the scores' heights (0.1, 0.4, 0.2, 0.3) and bars 1 and 2, the hand circuit's
    channels, are pink (#e7298a); conv1's bars are all green."""
    from matplotlib.colors import to_hex

    from mechscope.cnn.report import discovery as D

    figs = []
    monkeypatch.setattr(D, "figure_data_uri", lambda fig: figs.append(fig) or "data:")
    r = SimpleNamespace(channel_scores={"conv1": [0.5, 0.6], "conv2": [0.1, 0.4, 0.2, 0.3]},
                        hand={"stage": "conv2", "hand": [1, 2]})  # fmt: skip
    D.channel_figure(r)
    ax1, ax2 = figs[0].axes[:2]
    np.testing.assert_allclose([p.get_height() for p in ax2.patches], [0.1, 0.4, 0.2, 0.3])
    assert [to_hex(p.get_facecolor()) for p in ax2.patches] == ["#1b9e77", "#e7298a", "#e7298a", "#1b9e77"]
    assert {to_hex(p.get_facecolor()) for p in ax1.patches} == {"#1b9e77"}


# ---- attribution figures --------------------------------------------------------------------------------------


def test_the_attribution_grid_shows_the_signed_map_in_its_signed_row():
    """Truth: the bottom row's image is the attribution itself (negative values kept) on a scale symmetric about 0;
    the |attribution| row is its absolute value."""
    from mechscope.cnn.report import figures as F

    att = np.array([[[-1.0, 0.5], [0.25, 0.0]]])
    fig = F.attribution_grid(np.zeros((1, 2, 2)), att, "saliency", ["a 3"])
    axes = [ax for ax in fig.axes if ax.get_images()]  # the 4 rows (colour bars hold no image)
    heat, signed = axes[1].get_images()[0], axes[3].get_images()[0]
    np.testing.assert_allclose(heat.get_array(), np.abs(att[0]))
    np.testing.assert_allclose(signed.get_array(), att[0])
    lo, hi = signed.get_clim()
    assert lo == -hi and hi > 0


def test_faithfulness_curves_put_deletion_left_and_insertion_right():
    """Truth: the left panel (titled deletion) plots the deletion curves as given, the right the insertion ones."""
    from mechscope.cnn.report import figures as F

    fr = np.array([0.0, 0.5, 1.0])
    fig = F.faithfulness_curves(fr, {"saliency": np.array([0.9, 0.3, 0.1])}, {"saliency": np.array([0.1, 0.6, 0.9])})
    left, right = fig.axes[:2]
    assert left.get_title().startswith("deletion") and right.get_title().startswith("insertion")
    np.testing.assert_allclose(left.get_lines()[0].get_ydata(), [0.9, 0.3, 0.1])
    np.testing.assert_allclose(right.get_lines()[0].get_ydata(), [0.1, 0.6, 0.9])
