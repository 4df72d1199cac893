"""Circuit search and selectivity on constructed problems with known answers."""

from __future__ import annotations

import itertools

import pytest
import torch

from mechscope.cnn.methods.circuits import class_means, find_circuit, order_by_profile, selectivity_index
from mechscope.core.errors import MechscopeError


def test_finds_the_needed_pair_and_nothing_else():
    needed = {2, 5}

    def margin(keep):
        return 0.0 if needed <= set(keep) else -1.0 + 0.1 * len(needed & set(keep))

    c = find_circuit(margin, 8, ranking=[0, 1, 2, 3, 4, 5, 6, 7], target=3)
    assert sorted(c.channels) == [2, 5]
    assert c.meets_criterion and c.margin == 0.0
    assert c.prefix_size == 6  # the attribution prefix needed channels 0..5, pruning removed four
    assert c.greedy_size == 2


def test_result_is_one_minimal_on_a_random_additive_problem():
    # accuracy-like score: each channel adds a weight; criterion: total >= 0.8 of all positive weight
    g = torch.Generator().manual_seed(0)
    w = torch.rand(12, generator=g) - 0.2
    target = 0.8 * float(w.clamp(min=0).sum())

    def margin(keep):
        return float(w[keep].sum()) - target if keep else -target

    c = find_circuit(margin, 12, ranking=w.argsort(descending=True).tolist(), target=0)
    assert c.meets_criterion
    for ch in c.channels:  # no single channel can go
        assert margin([x for x in c.channels if x != ch]) < 0
    smallest = next(k for k in range(1, 13) if any(margin(list(s)) >= 0 for s in itertools.combinations(range(12), k)))
    assert len(c.channels) == smallest  # additive problems: greedy is exact


def test_unreachable_criterion_is_reported_not_hidden():
    c = find_circuit(lambda keep: -1.0, 4, ranking=[3, 2, 1, 0], target=1, max_size=2)
    assert not c.meets_criterion
    assert c.prefix_size is None and c.greedy_size is None
    with pytest.raises(MechscopeError, match="ranking must order all 4 channels"):
        find_circuit(lambda keep: 0.0, 4, ranking=[0, 1, 2], target=0)


def test_selectivity_index_known_values():
    means = torch.tensor([[0.0, 2.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [3.0, 1.0, 1.0]])
    sel = selectivity_index(means)
    torch.testing.assert_close(sel, torch.tensor([1.0, 0.0, 0.0, 0.5]))
    assert order_by_profile(means) == [3, 1, 2, 0]  # preferred class 0 first (most selective first), then class 1


def test_class_means_and_grouping():
    values = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 4.0], [0.0, 2.0]])
    labels = torch.tensor([0, 0, 1, 1])
    means = class_means(values, labels, 2)
    torch.testing.assert_close(means, torch.tensor([[2.0, 0.0], [0.0, 3.0]]))
    assert order_by_profile(means) == [0, 1]  # unit 0 prefers class 0, unit 1 class 1
    with pytest.raises(MechscopeError, match="3 activations for 4 labels"):
        class_means(values[:3], labels, 2)


def test_swaps_shrink_a_set_that_pruning_cannot():
    # valid sets: any superset of {0, 1, 2} or of {0, 5}. The attribution prefix and the greedy run
    # both reach {0, 1, 2}, which no single removal shrinks; trading 1 and 2 for 5 does.
    def margin(keep):
        s = set(keep)
        if {0, 1, 2} <= s or {0, 5} <= s:
            return 0.0
        return -1.0 + 0.1 * len(s & {1, 2}) + 0.05 * (0 in s)

    plain = find_circuit(margin, 6, ranking=[0, 1, 2, 3, 4, 5], target=0, swaps=False)
    assert sorted(plain.channels) == [0, 1, 2] and plain.greedy_size == 3 and plain.prefix_size == 3
    c = find_circuit(margin, 6, ranking=[0, 1, 2, 3, 4, 5], target=0)
    assert sorted(c.channels) == [0, 5]
    assert c.meets_criterion and c.pruned_size == 3 and c.method.endswith("then swaps")
    for a, b in itertools.combinations(c.channels, 2):  # swap-minimal: no two channels trade for one
        rest = [x for x in c.channels if x not in (a, b)]
        assert all(margin(rest + [o]) < 0 for o in range(6) if o not in c.channels)


def test_batched_candidates_find_the_same_circuit():
    """``evaluate_each`` (all of a step's candidates in one call) changes how the search asks, not what it finds."""
    g = torch.Generator().manual_seed(3)
    w = torch.rand(14, generator=g)
    pair = torch.rand(14, 14, generator=g) * 0.2

    def margin(keep):
        idx = torch.tensor(keep, dtype=torch.long)
        return float(w[idx].sum() + pair[idx][:, idx].sum() / 4) - 2.2 if keep else -2.2

    asked = []

    def each(rest, extra):
        asked.append(len(extra))
        return [margin(rest + [c]) for c in extra]

    ranking = w.argsort(descending=True).tolist()
    plain = find_circuit(margin, 14, ranking, target=0)
    batched = find_circuit(margin, 14, ranking, target=0, evaluate_each=each)
    assert batched == plain and max(asked) > 1
