"""The circuits report's sentences (``lm circuits``: report/circuits.py), from hand-made results: the
composition sentences and the induction circuit's (reusing the heads report's hand-made result)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from mechscope.lm.methods.ablation import HeadAblation
from mechscope.lm.methods.circuits import CircuitsResult
from mechscope.lm.report import circuits as C
from tests.unit.test_sentences_heads import ESTIMATED, _composition, make_result


def circuits(induction=None, unavailable=None) -> CircuitsResult:
    return CircuitsResult("hand-made", "folded", _composition(), ((1, 2),), induction=induction,
                          unavailable=unavailable or {})  # fmt: skip


def test_composition_is_high_only_at_twice_the_baseline():
    lines = C.summary(circuits(unavailable={"induction_circuit": "needs a forward pass"}))
    k = next(s for s in lines if s.startswith("The strongest K-composition"))
    assert k.startswith("The strongest K-composition is 0.2 → 2.0: 0.100, 2.5× the random baseline 0.040 (high;")
    assert not any(s.startswith("The strongest Q-composition") and "(high" in s for s in lines)


def test_no_path_patching_below_when_there_is_none(tmp_path):
    r = circuits(unavailable={"induction_circuit": "needs a forward pass, which a partial checkpoint cannot run"})
    line = C.summary(r)[-1]
    assert "this page has no causal test of it (path patching of the induction circuit: needs a forward pass" in line
    assert "below" not in line
    html = C.write_report(r, tmp_path / "r.html").read_text()
    assert "path patching below" not in html and "(path patching, below" not in html


def test_with_the_induction_circuit_the_totals_are_estimates_and_say_so(tmp_path):
    heads = make_result()
    rng = np.random.default_rng(0)
    est = rng.normal(0, 0.002, (3, 4, 4))
    for lh, v in ESTIMATED.items():
        est[lh] = v
    unmeasured = HeadAblation.measured("mean", est, {})  # lm circuits measures no head alone
    r = circuits(induction=replace(heads, ablation=heads.ablation | {"mean": unmeasured}))
    lines = C.summary(r)
    assert "the induction circuit's section below, tests whether the later head uses it" in lines[3]
    path = next(s for s in lines if s.startswith("Path patching 0.0 →"))
    assert "mean-ablating 0.0 on every path costs +0.14 nats (attribution-patching estimate; not measured)" in path
    assert "less than this path alone" not in path  # an estimate is not compared as if measured
    html = C.write_report(r, tmp_path / "r.html").read_text()
    assert "(path patching, below, tests that for the induction circuit)" in html


def test_circuits_json_holds_the_numbers_its_induction_sentences_cite():
    import re

    r = circuits(induction=make_result())
    d = r.to_dict()["induction_circuit"]
    rows = {row["head"]: row for row in d["prefix_matching_heads"]}
    lines = C.summary(r)
    label = re.compile(r"(\d+\.\d+) \(prefix matching ([\d.]+), copying ([+-][\d.]+)\)")
    cited = [(h, float(pm), float(cp)) for s in lines for h, pm, cp in label.findall(s)]
    assert cited  # the hand-made result has induction heads
    for h, pm, cp in cited:
        assert round(rows[h]["prefix_matching"], 2) == pm and round(rows[h]["copying"], 2) == cp
    measured = {row["head"]: row for row in d["ablation"]["measured"]}
    total = re.compile(r"mean-ablating (\d+\.\d+) on every path costs ([+-][\d.]+) ± ([\d.]+) nats")
    totals = [(h, float(m), float(sd)) for s in lines for h, m, sd in total.findall(s)]
    assert totals  # the confirmed edges' sources were measured
    for h, m, sd in totals:
        assert round(measured[h]["mean"], 2) == m and round(measured[h]["std"], 2) == sd
    assert d["thresholds"] == r.induction.protocol["thresholds"]
