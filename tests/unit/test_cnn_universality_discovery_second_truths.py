"""Universality, closed-form class circuits, channel comparison and the circuit search, second pass: each number
checked against a truth computed another way (numpy's corrcoef, scipy's linear_sum_assignment, CKA by its formula,
a hand-forward of the network, hand-built read-outs and margins with known answers)."""

from __future__ import annotations

from math import comb
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from mechscope.cnn.methods import universality as U
from mechscope.cnn.methods.circuits import circuit_membership, class_means, find_circuit
from mechscope.cnn.methods.discovery import DEFAULT_N, channel_scores, compare_channels, image_task
from mechscope.cnn.models.spec import walk
from tests.unit.test_cnn_circuits_discovery_truths import hand_scores  # noqa: F401 (a fixture)
from tests.unit.test_explain_parts_truths import _tiny, hand_forward

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- matching on synthetic features ------------------------------------------------------------------------------


def _paired_features(seed: int = 0):
    """A [600, 4] and B [600, 5]: B's channel j follows A's channel PERM[j] with its own noise level (so every
    correlation is distinct); B's channel 4 is an independent channel."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(600, 4))
    perm, noise = [2, 0, 3, 1], [0.2, 0.6, 1.1, 0.4]
    b = np.stack([a[:, p] + s * rng.normal(size=600) for p, s in zip(perm, noise, strict=True)]
                 + [rng.normal(size=600)], 1)  # fmt: skip
    return a, b, perm


def test_matching_is_numpys_correlation_and_scipys_assignment_strongest_first():
    """Truth: np.corrcoef for every correlation and best match; scipy's linear_sum_assignment (maximize) on that
    matrix for the pairs; the pairs listed from the largest correlation down."""
    a, b, perm = _paired_features()
    m = U.match_units(U.Moments.of(torch.tensor(a), torch.tensor(b)), "s", "rows")
    ref = np.corrcoef(a.T, b.T)[:4, 4:]
    assert np.allclose(m.correlation.numpy(), ref, atol=1e-6)
    assert np.allclose(m.best_a.numpy(), ref.max(1), atol=1e-6) and m.best_a_partner.tolist() == list(ref.argmax(1))
    assert np.allclose(m.best_b.numpy(), ref.max(0), atol=1e-6) and m.best_b_partner.tolist() == list(ref.argmax(0))
    rows, cols = linear_sum_assignment(ref, maximize=True)
    assert m.mapping() == {int(r): int(c) for r, c in zip(rows, cols, strict=True)}
    assert m.mapping() == {p: j for j, p in enumerate(perm)}
    want = sorted((ref[r, c] for r, c in zip(rows, cols, strict=True)), reverse=True)
    assert np.allclose([p.correlation for p in m.matched], want, atol=1e-6)
    assert [p.correlation for p in m.matched] == sorted((p.correlation for p in m.matched), reverse=True)
    assert m.rows == 600 and m.dead_a == () and m.dead_b == ()


def test_a_network_with_every_partner_dead_has_best_match_zero_at_channel_zero():
    """Truth: the docstring's rule, by hand: with every B channel constant (dead) an A channel has no match: best 0,
    partner 0 (not −inf), and the Hungarian pairing of live channels is empty."""
    rng = np.random.default_rng(1)
    a = torch.tensor(rng.normal(size=(50, 3)))
    b = torch.tensor([2.0, -1.0]) + 1e-7 * a[:, :2]  # variance 1e-14: dead, yet perfectly correlated with a
    m = U.match_units(U.Moments.of(a, b), "s", "rows")
    assert m.dead_b == (0, 1) and m.dead_a == ()
    assert (m.correlation == 0).all()  # "0 in the row or column of a dead channel"
    assert m.best_a.tolist() == [0.0, 0.0, 0.0] and m.best_a_partner.tolist() == [0, 0, 0]
    assert m.matched == () and np.isnan(m.median_matched)


def _cka_formula(x: np.ndarray, y: np.ndarray) -> float:
    """Kornblith et al. 2019, eq. for linear CKA on centred features: ||YᵀX||_F² / (||XᵀX||_F ||YᵀY||_F)."""
    x, y = x - x.mean(0), y - y.mean(0)
    return np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))


def test_the_cka_matrix_is_symmetric_and_each_entry_is_the_formula():
    """Truth: linear CKA by its formula in numpy, for both triangles of the matrix; 1 on the diagonal."""
    a, b, _ = _paired_features(2)
    c = np.random.default_rng(3).normal(size=(600, 3)) + a[:, :3] ** 2
    feats = [a, b, c]
    m = U.cka_matrix([torch.tensor(f) for f in feats]).numpy()
    for i in range(3):
        for j in range(3):
            want = 1.0 if i == j else _cka_formula(feats[i], feats[j])
            assert m[i, j] == pytest.approx(want, abs=1e-10), (i, j)
    assert len({round(m[0, 1], 6), round(m[0, 2], 6), round(m[1, 2], 6)}) == 3  # distinct: a swap would show


# ---- one pass over the images ---------------------------------------------------------------------------------


def test_collected_means_maxima_and_logits_are_the_hand_forwards():
    """Truth: the network's forward written out by hand (hand_forward): per image and channel, the mean and the
    maximum of each stage's pooled output over positions, and the logits; the moments' correlation is np.corrcoef
    over images × positions of those outputs."""
    a, b = _tiny(0), _tiny(4)
    x = torch.rand(30, 1, 16, 16, generator=torch.Generator().manual_seed(5))
    feats, moments = U.collect_pairs({"a": walk(a), "b": walk(b)}, [("a", "b")], x, batch_size=7)
    ha, hb = hand_forward(a, x), hand_forward(b, x)
    for st in ("conv1", "conv2"):
        out = ha[st].numpy()
        assert np.allclose(feats["a"].means[st].numpy(), out.mean((2, 3)), atol=1e-6)
        assert np.allclose(feats["a"].maxima[st].numpy(), out.max((2, 3)), atol=1e-6)
        assert not np.allclose(out.mean((2, 3)), out.max((2, 3)))  # the two differ here
    assert np.allclose(feats["b"].logits.numpy(), hb["logits"].numpy(), atol=1e-5)
    m, how = moments[("a", "b")][1]
    assert how == "image × position" and m.n == 30 * 4
    ra, rb = ha["conv2"].permute(0, 2, 3, 1).reshape(-1, 4).numpy(), hb["conv2"].permute(0, 2, 3, 1).reshape(-1, 4)
    with np.errstate(invalid="ignore"):  # a dead channel's row is NaN here, 0 in the matching
        ref = np.corrcoef(ra.T, rb.numpy().T)[:4, 4:]
    live = ra.std(0) > 0
    assert live.sum() >= 2 and not np.isnan(ref[live]).any()
    assert np.allclose(m.correlation().numpy()[live], ref[live], atol=1e-6)


# ---- class circuits through the matching --------------------------------------------------------------------


def test_circuit_reuse_counts_only_the_channels_the_matching_pairs():
    """Truth: a hand count: A (5 channels) matched to B (4), A's channel 4 unpaired; class 3's A circuit (0, 4, 2)
    maps to (1, 3) only; overlap with B's (3, 2) is 1; expected 2·2/4 = 1; p = P(X ≥ 1) = 1 − C(2,0)C(2,2)/C(4,2)."""
    mapping = {0: 1, 1: 0, 2: 3, 3: 2}
    (r,) = U.circuit_reuse(mapping, {3: (0, 4, 2)}, {3: (3, 2)}, n_b=4)
    assert r.mapped == (1, 3) and r.overlap == 1
    assert r.expected == pytest.approx(1.0)
    assert r.p_value == pytest.approx(1 - comb(2, 0) * comb(2, 2) / comb(4, 2))


def _readout_world():
    """A linear read-out over 3 channels (1×1 maps), 3 classes, reference 0 and no bias, so the logits with channels S
    kept are Σ_{c∈S} a_c·W[:, c]. W: class 0 reads +Σa, class 1 reads −Σa, class 2 reads nothing. Class-0 images have
    a ≈ (3, 1, −0.5), class-1 images the negatives; no image is of class 2."""
    fc = torch.nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        fc.weight.copy_(torch.tensor([[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0], [0.0, 0.0, 0.0]]))
    spec = SimpleNamespace(readout=SimpleNamespace(linear=True, fc=fc))
    base = torch.tensor([[3.0, 1.0, -0.5], [3.2, 1.1, -0.4], [2.9, 0.9, -0.6]])
    acts = torch.cat([base, -base])[:, :, None, None]
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    return spec, fc, acts, labels


def _meets(fc, acts, labels, keep, d, tol=0.01) -> bool:
    """Explain's criterion by a plain masked forward: the dropped channels set to the reference (0) and the read-out
    run; class-d accuracy within tol of the full model's, other classes called d no more often (within tol)."""
    full = fc(acts.flatten(1)).argmax(1)
    masked = acts.clone()
    masked[:, [c for c in range(acts.shape[1]) if c not in keep]] = 0.0
    pred = fc(masked.flatten(1)).argmax(1)
    is_d = labels == d

    def rates(p):
        return float((p[is_d] == d).double().mean()), float((p[~is_d] == d).double().mean())

    (acc, fp), (facc, ffp) = rates(pred), rates(full)
    return acc >= facc - tol and fp <= ffp + tol


def test_class_circuits_start_from_the_strongest_channel_and_skip_classes_without_images():
    """Truth: the hand-built read-out: channels 0 and 1 each suffice for class 0 and class 1 alone (checked by a plain
    masked forward) and channel 0 has the larger attribution, so the shortest attribution prefix is (0,); class 2
    has no test image, so no circuit."""
    spec, fc, acts, labels = _readout_world()
    with torch.no_grad():
        assert _meets(fc, acts, labels, [0], 0) and _meets(fc, acts, labels, [1], 0)
        assert not _meets(fc, acts, labels, [2], 0)
        found = U.circuit_channels(spec, acts, torch.zeros(3, 1, 1), labels, [0, 1, 2], tolerance=0.01)
    assert found == {0: (0,), 1: (0,)}


def test_explains_pruning_drops_the_last_ranked_channel_first():
    """Truth: a hand margin: the prefix (0, 1, 2) meets; without 2 it fails; without 1 it meets and without 0 it
    meets; no single channel meets. Trying the last-ranked first drops 1 (giving (0, 2)), not 0."""
    good = {(0, 1, 2), (0, 2), (1, 2)}
    assert U._prune([0, 1, 2], lambda keep: 0.0 if tuple(sorted(keep)) in good else -1.0) == [0, 2]


# ---- discovery: comparisons and tasks ------------------------------------------------------------------------


def test_an_inner_stage_is_compared_by_each_channels_largest_edge(hand_scores):  # noqa: F811
    """Truth: a plain loop over the graph's edges: a conv1 channel's key is the largest |score| of an edge it sends
    or receives; the ranking is those keys sorted by hand (largest first), ranks 1-based."""
    spec, sc = hand_scores
    keys = []
    for j in range(spec.stage("conv1").out_channels):
        name = f"conv1.c{j}"
        keys.append(max(abs(v) for (s, n, _), v in zip(sc.graph.edges, sc.scores, strict=True) if name in (s, n)))
    order = sorted(range(len(keys)), key=lambda j: -keys[j])
    r = compare_channels(sc, spec, [order[-1]], stage="conv1")
    assert r["stage"] == "conv1" and r["ranking"] == order
    assert r["discovered_top"] == [order[0]] and r["hand_ranks"] == {order[-1]: len(keys)}
    assert r["recall_at_size"] == 0.0
    assert channel_scores(sc, spec)["conv1"] == pytest.approx(keys)


def test_a_task_without_n_takes_the_documented_64_images():
    """Truth: the module's documented default, 64 images when there are more (here 100), every one when fewer (10)."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(100, 1, 8, 8, generator=g), torch.arange(100) % 3
    assert DEFAULT_N == 64
    t = image_task(x, y)
    assert len(t.clean) == 64 and len(t.corrupted) == 64 and t.settings["n"] == 64
    assert len(image_task(x[:10], y[:10]).clean) == 10


# ---- the circuit search's swaps --------------------------------------------------------------------------------


def _swap_margin(keep) -> float:
    """Meets (0) on any superset of {0, 1, 2}, {0, 3} or {2, 4}; otherwise −10 plus per-channel bonuses that make the
    greedy pick 1, then 2, then (a tie at 0, broken by the ranking) 0."""
    s = set(keep)
    if {0, 1, 2} <= s or {0, 3} <= s or {2, 4} <= s:
        return 0.0
    return -10.0 + sum({0: 2.0, 1: 3.0, 2: 2.5}.get(c, 0.0) for c in s)


def test_swaps_take_out_the_two_weakest_channels_first():
    """Truth: a hand-built problem: attribution prefix and greedy both prune to (0, 1, 2); the weakest pair (2, 1) goes
    out first and channel 3 alone with 0 meets, so the swap gives {0, 3} (the strongest pair first: {2, 4})."""
    c = find_circuit(_swap_margin, 5, [0, 1, 2, 3, 4], target=7)
    assert c.prefix_size == 3 and c.greedy_order == [1, 2, 0] and c.pruned_size == 3
    assert sorted(c.channels) == [0, 3] and c.meets_criterion and c.method.endswith("then swaps")


def test_the_greedy_may_take_every_channel_when_only_all_of_them_meet():
    """Truth: a hand margin met by all three channels only: the greedy set grows to all 3 (no default cap below)."""
    c = find_circuit(
        lambda keep: 0.0 if len(keep) == 3 else -1.0 + 0.1 * len(keep), 3, [2, 0, 1], target=0, swaps=False
    )
    assert c.greedy_size == 3 and sorted(c.greedy_order) == [0, 1, 2] and c.prefix_size == 3


def test_class_means_of_a_class_without_images_are_zero_and_membership_keeps_circuit_order():
    """Truth: a plain loop over the rows per class (an empty class: 0, not NaN); membership listed in the circuits'
    order."""
    v = torch.tensor([[1.0, 4.0], [3.0, 2.0], [5.0, -1.0]])
    got = class_means(v, torch.tensor([1, 0, 1]), n_classes=3).numpy()
    want = np.zeros((2, 3))
    for k in range(3):
        rows = [i for i, y in enumerate([1, 0, 1]) if y == k]
        for u in range(2):
            want[u, k] = sum(float(v[i, u]) for i in rows) / len(rows) if rows else 0.0
    assert np.allclose(got, want)
    circuits = [{"digit": 7, "channels": [2, 0]}, {"digit": 3, "channels": [0]}]
    assert circuit_membership(circuits) == {2: [7], 0: [7, 3]}
