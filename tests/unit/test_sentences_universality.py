"""The universality report's sentences (``cnn universality``: report/universality.py), from a hand-made result.

Networks A and B (3 conv1 channels each), each against a random twin: A and B's units match well (best
correlations 0.9, 0.8, 0.7), the twins' badly (0.2); class circuits overlap 2 against 0.7 by chance.
"""

from __future__ import annotations

import pytest
import torch

from mechscope.cnn.methods.universality import (
    CircuitReuse,
    Comparison,
    MatchedPair,
    UnitMatching,
    UniversalityResult,
)
from mechscope.cnn.report import universality as U


def matching(best: float, step: float) -> UnitMatching:
    b = torch.tensor([best, best - step, best - 2 * step])
    pairs = tuple(MatchedPair(i, i, float(b[i])) for i in range(3))
    return UnitMatching("conv1", "image × position", 100, b, torch.arange(3), b.clone(), torch.arange(3), pairs, (), (),
                        0.9 if best > 0.5 else 0.1)  # fmt: skip


def make_result(trained_best: float = 0.9) -> UniversalityResult:
    reuse = (CircuitReuse(0, (0, 1), (0, 1), (0, 1), 2, 0.7, 0.01), CircuitReuse(1, (2,), (1,), (2,), 0, 0.3, 1.0))
    comps = (
        Comparison("A", "B", "trained", (matching(trained_best, 0.1),), "conv1", reuse),
        Comparison("A", "random A", "baseline", (matching(0.2, 0.0),)),
        Comparison("B", "random B", "baseline", (matching(0.2, 0.0),)),
    )
    labels = ("A conv1", "B conv1", "random A conv1", "random B conv1")
    cka = torch.tensor([[1, 0.8, 0.1, 0.1], [0.8, 1, 0.1, 0.1], [0.1, 0.1, 1, 0.1], [0.1, 0.1, 0.1, 1.0]])
    runs = tuple({"label": n, "test_accuracy": 0.99, "channels": [3]} for n in ("A", "B"))
    return UniversalityResult(dataset="hand-made", class_names=("cat", "dog"), test_images=100, runs=runs,
                              baselines=(), comparisons=comps, cka_labels=labels, cka=cka, settings={})  # fmt: skip


def test_the_best_match_verdict_follows_the_numbers_it_shows():
    line = U.summary_lines(make_result())[1]
    # 6 trained best matches (0.9, 0.8, 0.7 twice) against 12 random ones (all 0.2): every pair won, U = 72 of 72
    assert line.startswith("conv1: median best-match correlation 0.80 between trained networks against 0.20 with a "
                           "random network (above that baseline: one-sided Mann–Whitney p = ")
    assert "probability that a trained unit's best match beats a random one's 1.00, over 6 and 12 units;" in line
    p = float(line.split("Mann–Whitney p = ")[1].split(",")[0])
    assert p < 1e-4  # the normal approximation (the 12 baseline values tie); exact, without ties: 1 / C(18, 6)
    low = U.summary_lines(make_result(trained_best=0.3))[1]  # 0.3, 0.2, 0.1 against 0.2: U = 36 of 72 (ties half)
    assert "median best-match correlation 0.20 between trained networks against 0.20" in low
    assert "(not clearly above that baseline: one-sided Mann–Whitney p = 0.5" in low
    assert "beats a random one's 0.50" in low


def test_cka_and_circuits_are_stated_with_chance():
    lines = U.summary_lines(make_result())
    assert "conv1 0.80 between trained networks, 0.10 with the random twin" in lines[2]
    assert lines[-1] == ("Class circuits (conv1): of the 3 circuit channels of the first network of each pair, mapped "
                         "through the one-to-one matching, 2 land in the second network's circuit for the same class, "
                         "against 1.0 expected by chance (2.0×); 1 of 2 class × pair cases have p < 0.05 "
                         "(hypergeometric).")


def test_each_directions_median_is_numpys_over_live_units_as_the_summary_takes_it():
    from dataclasses import replace

    m = replace(matching(0.9, 0.1), best_a=torch.tensor([0.9, 0.8, 0.6, 0.0]), dead_a=(3,),
                best_b=torch.tensor([0.9, 0.8, 0.6, 0.5]))  # fmt: skip
    assert m.best_b.median().item() == pytest.approx(0.6)  # torch's median: the lower middle value
    # the mean of the middle two; dead unit 3 left out
    assert m.median_best_b == pytest.approx(0.7) and m.median_best_a == pytest.approx(0.8)
