"""KeptSum and Rates give the reference's answers bit for bit, including at near-ties where the fast sum must
fall back, and Rates equals the boolean-index means it replaces."""

import random

import torch

from mechscope.core.kept_sum import KeptSum, Rates


def _keeps(n_channels: int, n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [sorted(rng.sample(range(n_channels), rng.randint(1, n_channels))) for _ in range(n)]


def test_predict_equals_the_reference_argmax_on_random_sets():
    g = torch.Generator().manual_seed(0)
    contrib = torch.randn(500, 12, 10, generator=g) * torch.rand(1, 12, 1, generator=g) * 5
    ks = KeptSum(torch.randn(10, generator=g), contrib)
    for keep in _keeps(12, 300) + [[]]:
        assert torch.equal(ks.predict(keep), ks.reference(keep).argmax(1)), keep
    assert ks.calls == 301
    for keep in _keeps(12, 40, seed=5):
        want = ks.reference(keep).argmax(1)
        for d in range(10):
            assert torch.equal(ks.hits(keep, d), want == d), (keep, d)
    assert ks.fallbacks < ks.calls  # the fast path is taken, not only the reference


def test_near_ties_fall_back_and_still_agree():
    """Class 0 sums one large and 31 tiny terms, which the fast order and the reference order round several
    units in the last place apart; class 1 is planted between the two sums. Without the bound the fast sum
    picks the other class on those rows; with it, the evaluation falls back and agrees."""
    n, c, ulp = 200, 32, 2.0**-23
    terms = torch.rand(n, c, generator=torch.Generator().manual_seed(4)) * 0.45 * ulp
    terms[:, 0] = 1.0
    contrib = torch.zeros(n, c, 2)
    contrib[:, :, 0] = terms
    keep = list(range(c))
    ks = KeptSum(torch.zeros(2), contrib)

    def in_fast_order():  # the order predict adds in, without its check
        acc = ks.slabs[keep[0]] + ks.column
        for j in keep[1:]:
            acc += ks.slabs[j]
        return acc.T  # [N, K]

    reference = ks.reference(keep)[:, 0]
    contrib[:, 0, 1] = (reference.double() + in_fast_order()[:, 0].double()).div(2).float()  # between the sums
    ks = KeptSum(torch.zeros(2), contrib)
    assert not torch.equal(in_fast_order().argmax(1), ks.reference(keep).argmax(1))  # planted rows disagree
    assert torch.equal(ks.predict(keep), ks.reference(keep).argmax(1))
    assert torch.equal(ks.hits(keep, 1), ks.reference(keep).argmax(1) == 1)
    assert ks.fallbacks == 2


def test_exact_ties_take_the_first_class_like_argmax():
    contrib = torch.ones(8, 4, 5)  # every class equal: argmax picks class 0
    ks = KeptSum(torch.zeros(5), contrib)
    assert torch.equal(ks.predict([0, 2]), torch.zeros(8, dtype=torch.long))
    assert not ks.hits([0, 2], 3).any() and ks.hits([0, 2], 0).all()  # a tie is never two winners
    assert ks.fallbacks == 3


def test_non_finite_logits_fall_back():
    contrib = torch.randn(16, 3, 4, generator=torch.Generator().manual_seed(2))
    contrib[3, 1, 2] = float("nan")
    ks = KeptSum(torch.zeros(4), contrib)
    assert torch.equal(ks.predict([0, 1]), ks.reference([0, 1]).argmax(1))
    assert torch.equal(ks.hits([0, 1], 2), ks.reference([0, 1]).argmax(1) == 2)
    assert ks.fallbacks == 2


def test_rates_equal_the_boolean_index_means():
    g = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 10, (1000,), generator=g)
    labels[labels == 7] = 6  # class 7 absent: its accuracy is NaN, as the mean of nothing is
    rates = Rates(labels, 10)
    for _ in range(20):
        pred = torch.randint(0, 10, (1000,), generator=g)
        for d in range(10):
            is_d = labels == d
            want = (float((pred[is_d] == d).double().mean()), float((pred[~is_d] == d).double().mean()))
            for got in (rates(pred, d), rates.of_hits(pred == d, d)):
                assert (got[0] == want[0] or (got[0] != got[0] and want[0] != want[0])) and got[1] == want[1]


def test_hits_each_equals_hits_of_each_set():
    g = torch.Generator().manual_seed(7)
    contrib = torch.randn(400, 16, 10, generator=g) * torch.rand(1, 16, 1, generator=g) * 4
    ks = KeptSum(torch.randn(10, generator=g), contrib)
    for rest in ([], [3], [0, 5, 9], list(range(1, 15, 2))):
        extra = [c for c in range(16) if c not in rest]
        for d in (0, 4, 9):
            got = ks.hits_each(rest, extra, d, chunk=3 * 10 * 400)  # blocks of three sets
            want = torch.stack([ks.reference(sorted(rest + [c])).argmax(1) == d for c in extra])
            assert torch.equal(got, want), (rest, d)
    assert ks.fallbacks < ks.calls
    assert ks.hits_each([1], [], 0).shape == (0, 400)


def test_hits_each_falls_back_at_a_planted_near_tie():
    """The near-tie of test_near_ties_fall_back_and_still_agree, asked as "rest plus one channel": the row with the
    tie falls back to the reference and agrees; without the band it would not."""
    n, c, ulp = 200, 32, 2.0**-23
    terms = torch.rand(n, c, generator=torch.Generator().manual_seed(4)) * 0.45 * ulp
    terms[:, 0] = 1.0
    contrib = torch.zeros(n, c, 2)
    contrib[:, :, 0] = terms
    ks = KeptSum(torch.zeros(2), contrib)
    rest = list(range(c - 1))
    fast = (ks.column + sum((ks.slabs[j] for j in rest), torch.zeros(2, n)) + ks.slabs[c - 1])[0]  # hits_each's order
    contrib[:, 0, 1] = (ks.reference(list(range(c)))[:, 0].double() + fast.double()).div(2).float()
    ks = KeptSum(torch.zeros(2), contrib)
    want = ks.reference(list(range(c))).argmax(1) == 1
    assert torch.equal(ks.hits_each(rest, [c - 1], 1)[0], want)
    assert ks.fallbacks == 1


def test_unit_ablation_accuracy_equals_the_reference():
    """Against the reference's own float operations (logits + diff·w, argmax, per-class shares), on random read-outs
    and with near-ties planted where one unit's change decides the verdict."""
    from mechscope.core import intervene as A
    from mechscope.core.kept_sum import unit_ablation_accuracy

    g = torch.Generator().manual_seed(11)
    b, d, k = 3000, 48, 10
    acts = torch.rand(b, d, generator=g)
    w = torch.randn(k, d, generator=g) * 0.3
    logits = acts @ w.T
    labels = logits.argmax(1)
    labels[::7] = torch.randint(0, k, labels[::7].shape, generator=g)  # some wrong
    top2 = logits.topk(2, 1).values
    logits[::5, 3] = top2[::5, 0]  # exact ties with the winner on a fifth of the inputs
    replacement = acts.mean(0)
    diff = (replacement - acts).expand_as(acts)
    reduce = A.class_accuracy(labels, k)
    units = torch.arange(d)
    want = torch.cat([reduce(logits[None] + (diff[:, u, None] * w[:, u])[None]) for u in range(d)])
    got = unit_ablation_accuracy(logits, diff, w, units, labels, k)
    assert torch.equal(got, want)
    masks = A.unit_masks((d,))
    assert torch.equal(A.readout_intervene(w, None, acts, masks, replacement, reduce, logits=logits), want)
    logits[0, 0] = float("nan")
    assert unit_ablation_accuracy(logits, diff, w, units, labels, k) is None  # the caller runs the reference


def test_the_band_is_four_gamma_t_as_documented():
    """The band's width by hand: one kept channel (m = 2 terms: the base and the channel), class 0 at 0.5 + g and
    class 1 at 0.5, so T = 0.5 + g and γ = 2u/(1 − 2u). A gap g = 3·2⁻²⁴ (1.8e-7) lies between 2γT (1.2e-7) and 4γT:
    the fast sum may not decide it, so predict, hits and hits_each fall back; g = 2⁻²¹ (4.8e-7) lies outside and
    is decided without the reference. A band of γT or 2γT (a tighter bound than any summation order guarantees)
    passed the near-tie tests above; it fails here."""
    for g, falls_back in ((3 * 2.0**-24, True), (2.0**-21, False)):
        contrib = torch.tensor([[[0.5 + g, 0.5]]])  # [N=1, C=1, K=2]
        gamma_t = 2 * 2.0**-24 / (1 - 2 * 2.0**-24) * (0.5 + g)
        assert (2 * 1.01 * gamma_t < g < 4 * gamma_t) == falls_back
        ks = KeptSum(torch.zeros(2), contrib)
        assert ks.predict([0]).tolist() == [0] and ks.hits([0], 0).tolist() == [True]
        assert ks.hits_each([], [0], 0).tolist() == [[True]]
        assert (ks.calls, ks.fallbacks) == (3, 3 if falls_back else 0), g
