"""Causal scrubbing: hypotheses with known answers, computed by hand, and one-line errors for bad hypotheses."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mechscope.core.errors import MechscopeError
from mechscope.core.scrub import Hypothesis, ScrubResult, parse_hypothesis, scrub
from tests.graphs.toys import PLANTED_EDGES, batches, planted_residual, two_paths


@pytest.fixture(scope="module")
def planted():
    model, (clean, _) = planted_residual("tanh"), batches(64)
    labels = model.forward(clean)[0].argmax(1)
    return model, clean, lambda out: torch.nn.functional.cross_entropy(out, labels)


def _all_edges(model, feature=None) -> dict:
    return {"claims": [{"name": "everything", "edges": [list(e) for e in model.graph.edges], "feature": feature}]}


def test_the_whole_model_recovers_everything(planted):
    model, clean, loss = planted
    res = scrub(model, clean, metric=loss, hypothesis=_all_edges(model), samples=2)
    assert res.recovered == pytest.approx(1.0, abs=1e-12) and res.metric_scrubbed == pytest.approx(res.metric_clean)
    assert res.metric_random > res.metric_clean + 0.1


def test_treeified_recursion_through_a_row_feature_recovers_everything(planted):
    model, clean, loss = planted
    rows = {"row": torch.arange(len(clean))}  # agreeing on the row is the input itself, but resampled recursively
    res = scrub(
        model, clean, metric=loss, hypothesis=_all_edges(model, "row"), features=rows, samples=1, breakdown=False
    )
    assert res.recovered == pytest.approx(1.0, abs=1e-12)
    assert res.forward_passes == 1 + 1 + 63  # capture, the random baseline, then the 63 nodes of the treeified graph


def test_the_planted_circuit_as_a_hypothesis_recovers_everything(planted):
    model, clean, loss = planted
    hyp = {"claims": [{"name": "planted", "edges": [f"{s}->{n}<{slot}>" for s, n, slot in sorted(PLANTED_EDGES)]}]}
    res = scrub(model, clean, metric=loss, hypothesis=hyp, samples=3)
    assert res.recovered == pytest.approx(1.0, abs=1e-12) and res.unclaimed.recovered == pytest.approx(1.0)


def test_a_false_claim_recovers_what_the_construction_predicts():
    u, v = 1.0, 2.0
    model, ab, mse, b = two_paths(u, v)
    # "A carries b" is false (A carries a), "B carries b" is true
    a_path, b_path = ["embed", "blocks.0.h0<q>", "logits"], ["embed", "blocks.0.h1<q>", "logits"]
    hyp = {
        "claims": [
            {"name": "A carries b", "path": a_path, "feature": "b"},
            {"name": "B carries b", "path": b_path, "feature": "b"},
        ]
    }
    res = scrub(model, ab, metric=mse, hypothesis=hyp, features={"b": b}, samples=20, seed=1)
    # By hand: y = u·a + v·b and clean MSE 0. Scrubbed, A's value comes from a row with the same b, so its a is a
    # fair coin: MSE = u²·P(a' != a) = u²/2. Fully resampled, a and b are both coins: (u² + v²)/2. Recovered:
    # (u²/2 - (u²+v²)/2) / (0 - (u²+v²)/2) = v² / (u² + v²) = 0.8.
    expected = v**2 / (u**2 + v**2)
    assert res.metric_clean == 0.0
    assert res.metric_scrubbed == pytest.approx(u**2 / 2, abs=0.03)
    assert res.metric_random == pytest.approx((u**2 + v**2) / 2, abs=0.1)
    assert res.recovered == pytest.approx(expected, abs=0.02)
    by_claim = {c.name: c.recovered for c in res.claims}
    assert by_claim["A carries b"] == pytest.approx(expected, abs=0.02)
    assert by_claim["B carries b"] == pytest.approx(1.0, abs=1e-12)
    assert res.unclaimed.recovered == pytest.approx(1.0, abs=1e-12)
    again = scrub(model, ab, metric=mse, hypothesis=hyp, features={"b": b}, samples=20, seed=1)
    assert again.recovered == res.recovered
    back = ScrubResult.from_dict(json.loads(json.dumps(res.to_dict())))
    assert back.hypothesis == res.hypothesis and back.claims == res.claims


def test_each_sd_is_the_spread_of_its_own_resamplings():
    """Every ± is the sd (ddof 1) over the seeded resamplings of its own measurement, in the order scrub makes them
    (clean, random, scrubbed, each claim, the unclaimed edges), and of the size the construction predicts: scrubbed,
    each of the 400 rows' A value is wrong with probability 1/2, so the MSE is u²·Bin(400, 1/2)/400 with sd
    u²·√(400/4)/400 = 0.025 (a permutation of donors gives the same 10/400); fully resampled, B's v² term adds
    sd v²·0.025 beside it: √(u⁴ + v⁴)·0.025 = 0.103. Twenty samples estimate an sd to about 16%."""
    u, v = 1.0, 2.0
    model, ab, mse, b = two_paths(u, v)
    seen = []
    metric = lambda out: seen.append(float(mse(out))) or seen[-1]  # noqa: E731
    a_path, b_path = ["embed", "blocks.0.h0<q>", "logits"], ["embed", "blocks.0.h1<q>", "logits"]
    hyp = {"claims": [{"name": "A carries b", "path": a_path, "feature": "b"},
                      {"name": "B carries b", "path": b_path, "feature": "b"}]}  # fmt: skip
    n = 20
    res = scrub(model, ab, metric=metric, hypothesis=hyp, features={"b": b}, samples=n, seed=1)
    assert len(seen) == 1 + 5 * n  # clean, then random, scrubbed, two claims, the unclaimed edges
    blocks = [seen[1 + i * n: 1 + (i + 1) * n] for i in range(5)]
    sds = [float(np.std(x, ddof=1)) for x in blocks]
    assert res.metric_random_sd == pytest.approx(sds[0], rel=1e-12)
    assert res.metric_scrubbed_sd == pytest.approx(sds[1], rel=1e-12)
    assert [c.metric_sd for c in res.claims] == pytest.approx(sds[2:4], rel=1e-12)
    assert res.unclaimed.metric_sd == pytest.approx(sds[4], rel=1e-12)
    assert res.recovered_sd == pytest.approx(sds[1] / abs(res.metric_clean - res.metric_random), rel=1e-12)
    assert 0.025 * 0.5 < res.metric_scrubbed_sd < 0.025 * 1.5
    assert 0.103 * 0.5 < res.metric_random_sd < 0.103 * 1.5
    assert res.claims[1].metric_sd == 0.0  # "B carries b" is true: every resampling keeps B's value


def test_parts_that_are_the_clean_model_by_construction_are_not_run(monkeypatch):
    """A claim without a feature, alone (its edges as they are, the rest clean), and the unclaimed edges alone when
    no edge is left unclaimed, are the clean model: reported as such (not measured, 100%), without their passes."""
    model, ab, mse, b = two_paths()
    a_path, b_path = ["embed", "blocks.0.h0<q>", "logits"], ["embed", "blocks.0.h1<q>", "logits"]
    hyp = {"claims": [{"name": "A as it is", "path": a_path}, {"name": "B carries b", "path": b_path, "feature": "b"},
                      {"name": "the rest", "rest": True}]}  # fmt: skip
    from mechscope.core import scrub as S

    measured = []
    real = S._measure
    monkeypatch.setattr(S, "_measure", lambda *a: measured.append(a[2].copy()) or real(*a))
    res = scrub(model, ab, metric=mse, hypothesis=hyp, features={"b": b}, samples=4)
    assert len(measured) == 3  # the random baseline, the hypothesis, the one claim with a feature
    a, bb, rest = res.claims
    assert (a.measured, bb.measured, rest.measured, res.unclaimed.measured) == (False, True, False, False)
    assert a.metric == res.metric_clean and a.recovered == 1.0 and a.metric_sd == 0.0
    assert bb.recovered == pytest.approx(1.0, abs=1e-12)  # measured: B's value depends only on b
    back = ScrubResult.from_dict(json.loads(json.dumps(res.to_dict())))
    assert back.claims == res.claims and back.unclaimed == res.unclaimed
    old = res.to_dict()
    for c in old["claims"]:
        c.pop("measured")  # a scrub.json written before the field: every part was measured
    assert all(c.measured for c in ScrubResult.from_dict(old).claims)


def test_no_claims_recovers_nothing():
    model, ab, mse, _ = two_paths()
    res = scrub(model, ab, metric=mse, hypothesis={"claims": []}, samples=20)
    assert res.recovered == pytest.approx(0.0, abs=0.05) and res.claims == ()


def test_hypothesis_parses_paths_edges_and_round_trips():
    g = planted_residual().graph
    hyp = parse_hypothesis(
        {"claims": [{"path": ["embed", "blocks.0.h0", "blocks.1.h0<q>"]}, {"name": "x", "edges": ["embed->logits"]}]},
        g,
    )
    assert hyp.claims[0].name == "claim 0" and hyp.claims[0].feature is None
    assert hyp.claims[0].edges == (
        ("embed", "blocks.0.h0", "q"),
        ("embed", "blocks.0.h0", "k"),
        ("blocks.0.h0", "blocks.1.h0", "q"),
    )
    assert Hypothesis.from_dict(json.loads(json.dumps(hyp.to_dict()))) == hyp
    assert Hypothesis.parse(hyp, g) == hyp


GOOD = ["embed", "blocks.0.h0", "logits"]


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"claims": [{"path": ["embed", "blocks.9.h0", "logits"]}]}, "unknown component 'blocks.9.h0'"),
        ({"claims": [{"path": ["embed", "blocks.0.h0", "blocks.1.h0", "blocks.0.h0"]}]}, "twice \\(a cycle\\)"),
        ({"claims": [{"path": ["blocks.1.h0", "blocks.0.h0"]}]}, "no edge"),
        ({"claims": [{"path": ["embed", "blocks.0.h0<v>"]}]}, "no input slot"),
        ({"claims": [{"path": ["embed"]}]}, "at least two"),
        ({"claims": [{"path": "embed->logits"}]}, "at least two"),
        ({"claims": [{"edges": []}]}, "non-empty list"),
        ({"claims": [{"edges": ["embed=>logits"]}]}, "malformed edge"),
        ({"claims": [{"edges": ["embedd->logits"]}]}, "unknown component"),
        ({"claims": [{"edges": [3]}]}, "malformed edge"),
        ({"claims": [{"path": GOOD, "edges": ["embed->logits"]}]}, "exactly one"),
        ({"claims": [{"name": "n"}]}, "exactly one"),
        ({"claims": [{"path": GOOD, "why": "x"}]}, "unknown key 'why'"),
        ({"claims": [{"path": GOOD, "name": ""}]}, "name"),
        ({"claims": [{"path": GOOD, "feature": 3}]}, "feature"),
        ({"claims": ["embed->logits"]}, "expected a dict"),
        ({"claims": [{"path": GOOD, "feature": "f"}, {"path": GOOD, "feature": "g"}]}, "different features"),
        ({"claims": [{"name": "a", "path": GOOD}, {"name": "a", "edges": ["embed->logits"]}]}, "named 'a'"),
        ({"claims": {}}, "list 'claims'"),
        ({"claim": []}, "list 'claims'"),
        ({"claims": [], "extra": 1}, "unknown hypothesis key"),
        ([GOOD], "list 'claims'"),
    ],
)
def test_bad_hypotheses_raise_one_line(data, match):
    with pytest.raises(MechscopeError, match=match) as e:
        parse_hypothesis(data, planted_residual().graph)
    assert "\n" not in str(e.value)


def test_bad_runs_raise(planted):
    model, clean, loss = planted
    hyp = {"claims": [{"path": GOOD, "feature": "f"}]}
    cases = [
        ({"hypothesis": hyp}, "feature 'f'"),
        ({"hypothesis": hyp, "features": {"f": [0, 1]}}, "one value per input row"),
        ({"hypothesis": hyp, "features": [1]}, "dict"),
        ({"hypothesis": hyp, "features": {"f": [object()] * 64}}, "compared"),
        ({"hypothesis": {"claims": []}, "samples": 0}, "samples"),
        ({"hypothesis": {"claims": []}, "seed": -1}, "seed"),
        ({"hypothesis": {"claims": []}, "seed": 2**64}, "seed must be an integer from 0 to 2"),  # torch overflowed
        ({"hypothesis": {"claims": []}, "max_forwards": 0}, "max_forwards must be an integer from 1"),
        ({"hypothesis": {"claims": []}, "breakdown": "no"}, "breakdown must be True or False"),
        ({"hypothesis": {"claims": []}, "metric": lambda o: o.sum() * 0}, "same metric"),
        ({"hypothesis": {"claims": []}, "metric": lambda o: o.mean(0)}, "scalar"),
        (
            {"hypothesis": _all_edges(model, "row"), "features": {"row": torch.arange(64)}, "max_forwards": 10},
            "more than 10 forward passes",
        ),
    ]
    for kwargs, match in cases:
        with pytest.raises(MechscopeError, match=match):
            scrub(model, clean, **({"metric": loss} | kwargs))
