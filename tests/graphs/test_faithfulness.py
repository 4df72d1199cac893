"""Faithfulness curves, the MIB areas (CPR, CMD) and the random baseline, on the planted circuits."""

from __future__ import annotations

import json
import math
import statistics

import numpy as np
import pytest

from mechscope.core.errors import MechscopeError
from mechscope.core.graphs import (
    MIB_FRACTIONS,
    EdgeScores,
    FaithfulnessCurve,
    acdc,
    circuit_faithfulness,
    eap,
    faithfulness_curve,
    mib_areas,
)
from mechscope.core.graphs.faithfulness import area
from tests.graphs.toys import PLANTED_EDGES, batches, conv_batches, logit_diff, planted_conv, planted_residual


@pytest.fixture(scope="module")
def setup():
    model, (clean, corrupted) = planted_residual("tanh"), batches()
    return model, clean, corrupted, eap(model, clean, corrupted, metric=logit_diff, better="higher")


def test_full_is_one_and_empty_is_zero(setup):
    model, clean, corrupted, _ = setup
    g = model.graph
    full = circuit_faithfulness(model, range(g.n_edges), clean, corrupted, metric=logit_diff)
    empty = circuit_faithfulness(model, [], clean, corrupted, metric=logit_diff)
    assert full["faithfulness"] == pytest.approx(1.0, abs=1e-12)
    assert empty["faithfulness"] == pytest.approx(0.0, abs=1e-12)
    assert empty["metric"] == pytest.approx(float(logit_diff(model.forward(corrupted)[0])), abs=1e-12)
    planted = circuit_faithfulness(model, sorted(PLANTED_EDGES), clean, corrupted, metric=logit_diff)
    assert planted["faithfulness"] == pytest.approx(1.0, abs=1e-12)


def test_curve_reaches_one_at_the_planted_size_and_ends_at_one(setup):
    model, clean, corrupted, scores = setup
    curve = faithfulness_curve(model, scores, clean, corrupted, metric=logit_diff, fractions=(0.05, 7 / 43, 0.5, 1.0))
    assert curve.edge_counts == (2, 7, 21, 43)
    assert curve.faithfulness_absolute[1:] == pytest.approx((1.0, 1.0, 1.0), abs=1e-12)
    # the signed ranking (CPR) puts the planted edges whose removal raises the logit difference last
    hurting = [e for e in scores.order("signed")[-5:] if scores.scores[e] > 1e-12]
    assert {model.graph.edges[e] for e in hurting} <= PLANTED_EDGES and hurting
    assert curve.faithfulness[-1] == pytest.approx(1.0, abs=1e-12) and curve.faithfulness[1] != pytest.approx(1.0)
    assert curve.cpr_ranking == "signed"
    cpr, cmd = mib_areas(curve.fractions, curve.faithfulness, curve.faithfulness_absolute)
    assert (curve.cpr, curve.cmd) == (pytest.approx(cpr), pytest.approx(cmd))
    assert curve.cpr > curve.random_cpr and curve.cmd < curve.random_cmd


def test_mib_defaults_and_pass_count(setup):
    model, clean, corrupted, scores = setup
    model.forwards = 0
    curve = faithfulness_curve(model, scores, clean, corrupted, metric=logit_diff, n_random=3, seed=7)
    assert curve.fractions == MIB_FRACTIONS and curve.edge_counts[:3] == (0, 0, 0) and curve.edge_counts[-1] == 43
    k = len(MIB_FRACTIONS)
    assert curve.forward_passes == model.forwards == 1 + 2 + 2 * k + 3 * k  # signed and |score| orders differ
    assert len(curve.random_mean) == len(curve.random_sd) == k
    assert curve.random_mean[-1] == pytest.approx(1.0) and curve.random_sd[-1] == pytest.approx(0.0, abs=1e-12)
    again = faithfulness_curve(model, scores, clean, corrupted, metric=logit_diff, n_random=3, seed=7)
    assert again.random_mean == curve.random_mean
    other = faithfulness_curve(model, scores, clean, corrupted, metric=logit_diff, n_random=3, seed=8)
    assert other.random_mean != curve.random_mean
    back = FaithfulnessCurve.from_dict(json.loads(json.dumps(curve.to_dict())))
    assert back.cpr == curve.cpr and back.fractions == curve.fractions


def test_the_random_baseline_replayed_edge_set_by_edge_set(setup):
    """The random baseline's mean, sd and areas, recomputed from its seeded orders one circuit at a time with
    circuit_faithfulness and statistics' stdev (only the last fraction's sd was checked, 0 by construction: every
    order's whole set is the full model)."""
    model, clean, corrupted, scores = setup
    fractions, seed, n_random = (0.1, 0.3, 0.6, 1.0), 3, 4
    curve = faithfulness_curve(model, scores, clean, corrupted, metric=logit_diff, fractions=fractions,
                               n_random=n_random, seed=seed)  # fmt: skip
    rng, n = np.random.default_rng(seed), model.graph.n_edges
    orders = [rng.permutation(n) for _ in range(n_random)]
    f = np.array([[circuit_faithfulness(model, list(o[:k]), clean, corrupted, metric=logit_diff)["faithfulness"]
                   for k in curve.edge_counts] for o in orders])  # fmt: skip
    assert curve.random_mean == pytest.approx([statistics.fmean(col) for col in f.T], abs=1e-12)
    assert curve.random_sd == pytest.approx([statistics.stdev(col) for col in f.T], abs=1e-12)
    assert curve.random_sd[2] > 0.05  # random circuits of 60% of the edges differ (fewer hold no whole planted path)
    cpr = [np.trapezoid(row, fractions) for row in f]
    cmd = [np.trapezoid(np.abs(1 - row), fractions) for row in f]
    assert (curve.random_cpr, curve.random_cpr_sd) == pytest.approx((statistics.fmean(cpr), statistics.stdev(cpr)))
    assert (curve.random_cmd, curve.random_cmd_sd) == pytest.approx((statistics.fmean(cmd), statistics.stdev(cmd)))
    assert curve.random_cpr_sd > 0 and curve.random_cmd_sd > 0


def test_acdc_scores_share_one_order_and_no_random_baseline_is_nan():
    model, (clean, corrupted) = planted_conv("relu"), conv_batches()
    scores = acdc(model, clean, corrupted, metric=logit_diff, threshold=1e-6)
    fractions = (0.2, 5 / 11, 1.0)
    curve = faithfulness_curve(model, scores, clean, corrupted, metric=logit_diff, fractions=fractions, n_random=0)
    assert curve.cpr_ranking == "absolute" and curve.forward_passes == 1 + 2 + 3
    assert curve.faithfulness[1] == pytest.approx(1.0)
    assert math.isnan(curve.random_cpr) and all(math.isnan(v) for v in curve.random_mean)


def test_areas_by_hand():
    assert area([0.0, 0.5, 1.0], [0.0, 0.5, 1.0]) == pytest.approx(0.5)
    cpr, cmd = mib_areas([0.1, 0.5, 1.0], [0.2, 1.2, 1.0], [0.0, 0.5, 1.0])
    assert cpr == pytest.approx(0.4 * 0.7 + 0.5 * 1.1)
    assert cmd == pytest.approx(0.4 * 0.75 + 0.5 * 0.25)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"fractions": (0.5,)}, "at least two"),
        ({"fractions": (0.0, 1.0)}, "in \\(0, 1\\]"),
        ({"fractions": (0.5, 0.2)}, "increasing"),
        ({"fractions": (0.5, 1.5)}, "in \\(0, 1\\]"),
        ({"fractions": "abc"}, "fractions"),
        ({"n_random": -1}, "n_random"),
        ({"seed": 1.5}, "seed"),
        ({"metric": lambda o: o.sum() * 0}, "same metric"),
        ({"metric": lambda o: o.mean(0)}, "scalar"),
    ],
)
def test_bad_settings_raise(setup, kwargs, match):
    model, clean, corrupted, scores = setup
    kwargs = {"metric": logit_diff} | kwargs
    with pytest.raises(MechscopeError, match=match):
        faithfulness_curve(model, scores, clean, corrupted, **kwargs)


def test_scores_from_another_graph_raise(setup):
    model, clean, corrupted, _ = setup
    other = EdgeScores(method="x", graph=planted_conv().graph, scores=np.zeros(11))
    with pytest.raises(MechscopeError, match="this model's graph"):
        faithfulness_curve(model, other, clean, corrupted, metric=logit_diff)
    with pytest.raises(MechscopeError, match="out of range"):
        circuit_faithfulness(model, [99], clean, corrupted, metric=logit_diff)
