"""``cnn sae show``'s summary (cnn/report/sae.py) from hand-made comparisons: the untrained control's verdict
follows its numbers."""

from __future__ import annotations

from types import SimpleNamespace

from mechscope.cnn.report import sae as R


def result(control_selective: int) -> SimpleNamespace:
    comparison = {
        "threshold": 0.5,
        "channels": {"selective": 4, "units": 32, "median_index": 0.42},
        "latents": {"selective": 212, "units": 500, "median_index": 0.57},
        "random_sparse": {"selective": control_selective, "units": 500, "median_index": 0.59, "k": 8},
    }
    return SimpleNamespace(architecture="topk", d_sae=512, hook="conv2.hook_post", d_in=32, dead_fraction=0.02,
                           images=10_000, comparison=comparison)  # fmt: skip


def control_line(r) -> str:
    return next(s for s in R.summary_lines(r) if s.startswith("control"))


def test_a_control_as_selective_as_the_dictionary_takes_the_whole_gain():
    line = control_line(result(242))  # the review's numbers: 242 of 500 against 212 of 500
    assert "242 of 500 alive latents class-selective (48.4%, median index 0.59)" in line
    assert "sparsity alone accounts for the latents' selectivity and training adds none" in line


def test_a_control_part_way_gets_its_share_of_the_gain():
    line = control_line(result(100))  # channels 12.5%, control 20.0%, trained 42.4%
    assert "sparsity alone gives 25% of the trained dictionary's gain" in line
    assert "(+7.5 of +29.9 points of selective share); training adds the rest" in line


def test_a_control_no_better_than_the_channels_leaves_the_gain_to_training():
    line = control_line(result(50))
    assert "the trained dictionary's gain (+29.9 points) comes from training" in line


def test_shares_are_to_a_tenth_of_a_percent():
    assert "against 4 of 32 channels (12.5%)" in R.summary_lines(result(242))[1]


def test_the_evaluation_reads_a_poor_reconstruction_beside_a_good_splice():
    mt = SimpleNamespace(explained_variance=0.3052, cosine_similarity=0.824, l2_ratio=1.362)
    e = SimpleNamespace(accuracy_recovered=0.980, acc_spliced=0.9758, acc_clean=0.9935, acc_ablated=0.0982,
                        kl_recovered=0.974)  # fmt: skip
    lines = R.evaluation_lines(mt, e)
    assert lines[0].startswith("The reconstruction keeps 30.5% of the activation's variance about its mean (cosine "
                               "0.824); its norm is 1.36× the activation's")
    assert lines[1].startswith("Spliced in, it keeps 98.0% of the test accuracy that zeroing the activation loses "
                               "(97.58% against 99.35% clean and 9.82% zeroed)")
    assert lines[2].startswith("So the model's answer survives a reconstruction that misses 69% of the activation's")
    good = R.evaluation_lines(SimpleNamespace(explained_variance=0.9, cosine_similarity=0.95, l2_ratio=1.0), e)
    assert len(good) == 2  # no caution where the reconstruction is close


def test_the_evaluation_says_when_zeroing_changes_nothing():
    mt = SimpleNamespace(explained_variance=0.9, cosine_similarity=0.95, l2_ratio=1.0)
    e = {"accuracy_recovered": float("nan"), "acc_spliced": 0.5, "acc_clean": 0.5, "acc_ablated": 0.5,
         "kl_recovered": float("nan")}  # a record's dict, as the page gets it
    line = R.evaluation_lines(mt, e)[1]
    assert line.startswith("Zeroing the activation does not change the test accuracy (50.00%)") and "nan" not in line
