"""The typographic attack's controls, candidates and success rates, and the multimodality control, against numbers
worked out by hand.

The planted CLIP toy of ``test_clip_planted`` is linear up to the cosine: with uniform attention the image
embedding is ``[(2·n0 + n1)/5, (n2 + n3)/5, 0.1]``, where ``n_u`` is layer-0 neuron ``u``'s activation summed over
the five tokens (each neuron's activation at a token is the ink of that token's patch when the neuron reads it),
and the zero-shot logits are that embedding, unit-normed, dotted with the one-hot prompts. Here neuron 0.1 is made
to read the bottom-right patch as well, so it carries a third of the written word's push towards class A (0.0 the
other two thirds): a control set that holds 0.1 undoes part of the attack, one that does not undoes none of it.
Mean ablation replaces a neuron's activation at each token by its mean over the clean images, so ``n_u`` becomes
its mean over the clean images. Every expected number below is computed with numpy from the pixels alone.
"""

from __future__ import annotations

import itertools
import math
import statistics

import numpy as np
import pytest
import torch

from mechscope.clip.data.render import Placement
from mechscope.clip.methods import attack as attack_module
from mechscope.clip.methods.attack import attack_images, typographic_attack
from mechscope.clip.methods.evaluate import zero_shot, zero_shot_model
from tests.unit.test_clip_planted import PATCHES, POS, images_with_ink, planted_bundle

pytestmark = pytest.mark.usefixtures("one_thread")  # small models: one torch thread

WORD, FONT, SIZE, WHERE, FG = "a", "sans-bold", 8, Placement(0.75, 0.75), 0.5  # the word in the bottom-right patch
# the image tower's projection of the neuron sums (columns: neurons 0.0 .. 0.3), and the class token's constant
PROJ = np.array([[2.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]]) / 5
CONST = np.array([0.0, 0.0, 0.1])


def two_carrier_bundle():
    """The planted toy with neuron 0.1 firing on bottom-right ink too (as 0.0 does), at half 0.0's weight in A."""
    b = planted_bundle()
    with torch.no_grad():
        b.model.vision.blocks[0].mlp.up.weight[1, 1 + POS["BR"]] = 100.0
    return b


def ink(x: torch.Tensor, where: str) -> np.ndarray:
    r, c = PATCHES[where]
    return x[:, 0, r : r + 4, c : c + 4].double().sum((1, 2)).numpy()


def neuron_sums(x: torch.Tensor, two_carriers: bool) -> np.ndarray:
    """[N, 4]: each layer-0 neuron's activation summed over the tokens, from the pixels."""
    tl, tr, bl, br = (ink(x, w) for w in ("TL", "TR", "BL", "BR"))
    return np.stack([tl + br, tl + br if two_carriers else tl, tr, bl], 1)


def embeddings(n: np.ndarray) -> np.ndarray:
    return n @ PROJ.T + CONST  # [N, 3]


def logits(n: np.ndarray, n_classes: int) -> np.ndarray:
    e = embeddings(n)
    return (e / np.linalg.norm(e, axis=1, keepdims=True))[:, :n_classes]


def margin(n: np.ndarray, true: int, target: int, n_classes: int) -> np.ndarray:
    lg = logits(n, n_classes)
    return lg[:, target] - lg[:, true]


def ablate(n: np.ndarray, units, clean_n: np.ndarray) -> np.ndarray:
    """Mean ablation of layer-0 ``units`` (layer-1 neurons never fire: ablating them changes nothing)."""
    out = n.copy()
    for u in units:
        out[:, u] = clean_n[:, u].mean()
    return out


def heldout_of(f, clean: torch.Tensor) -> list[int]:
    """The held-out images, read from the finding's examples (``n_examples`` >= the held-out half: all of them)."""
    shown = torch.from_numpy(f.examples[:, 0])
    idx = [next(i for i in range(len(clean)) if torch.equal(clean[i], s)) for s in shown]
    assert len(idx) == f.summary.n_heldout
    return idx


def attack_case(seed: int = 11, n: int = 30):
    clean = images_with_ink("TR", n, seed, low=0.3, high=0.8, fill=1.0)  # class B pictures
    attacked = attack_images(clean, WORD, FONT, SIZE, WHERE, FG)
    return clean, attacked, torch.ones(n, dtype=torch.long)


def test_the_analytic_model_is_the_planted_model():
    """The numpy reading of the toy (used for every expected number below) gives the model's own logits."""
    b = two_carrier_bundle()
    zs = zero_shot_model(b, ["a", "b", "c"])
    clean, attacked, _ = attack_case()
    for x in (clean, attacked):
        got = zero_shot(zs, x).double().numpy()
        assert np.allclose(got, logits(neuron_sums(x, True), 3), atol=1e-5)


def test_control_sets_are_measured_as_ablated_by_hand(monkeypatch):
    """k = 1: the found neuron is 0.0; each control set is one other neuron, and only sets holding 0.1 undo part of
    the attack (fewer images stay at A). Every control's success and undone fraction, recomputed by ablating the
    very set the method drew (recorded by spying on ``ablated``), and their mean, sample sd and undone mean."""
    b = two_carrier_bundle()
    zs = zero_shot_model(b, ["a", "b"])
    clean, attacked, true = attack_case()
    calls: list[list[tuple[int, int]]] = []
    real = attack_module.ablated

    def spy(zs_, neurons, means):
        calls.append([tuple(x) for x in neurons])
        return real(zs_, neurons, means)

    monkeypatch.setattr(attack_module, "ablated", spy)
    controls = 12
    f = typographic_attack(zs, clean, true, 0, WORD, [0, 1], k=1, candidates=8, font=FONT, size=SIZE, where=WHERE,
                           fg=FG, controls=controls, seed=0, n_examples=len(clean))  # fmt: skip
    s = f.summary
    assert calls[0] == [(0, 0)] and f.neurons[0].neuron == "0.0"
    sets = calls[-controls:]
    assert len(calls) == 1 + controls and all(len(c) == 1 and c[0] != (0, 0) for c in sets)

    held = heldout_of(f, clean)
    clean_n, att_n = neuron_sums(clean, True), neuron_sums(attacked, True)
    m_clean = margin(clean_n[held], 1, 0, 2)
    m_att = margin(att_n[held], 1, 0, 2)
    shift = (m_att - m_clean).mean()
    succ, undone = [], []
    for units in sets:
        ab = ablate(att_n[held], [u for layer, u in units if layer == 0], clean_n)
        succ.append(float((logits(ab, 2).argmax(1) == 0).mean()))
        undone.append(float((m_att - margin(ab, 1, 0, 2)).mean() / shift))

    # the case is what it should be: the attack wins every held-out image, 0.0 alone undoes it all, and the controls
    # differ (0.1 drawn at least once, another neuron at least once)
    assert float((logits(att_n[held], 2).argmax(1) == 0).mean()) == 1.0 == s.heldout_success
    assert s.heldout_success_ablated == float((logits(ablate(att_n[held], [0], clean_n), 2).argmax(1) == 0).mean())
    assert (0, 1) in [c[0] for c in sets] and len(set(succ)) >= 2
    assert 0 < statistics.mean(succ) < 1 and max(undone) > 0.2

    assert s.control_successes == pytest.approx(tuple(succ), abs=1e-6)
    assert s.control_success_mean == pytest.approx(statistics.mean(succ), abs=1e-6)
    assert s.control_success_sd == pytest.approx(statistics.stdev(succ), rel=1e-5)
    assert s.control_success_sd > 0.1
    assert s.control_undone_mean == pytest.approx(statistics.mean(undone), rel=1e-4)
    assert s.undone == pytest.approx(float((m_att - margin(ablate(att_n[held], [0], clean_n), 1, 0, 2)).mean() / shift),
                                     rel=1e-4)  # fmt: skip


def test_fewer_candidates_than_neurons_keep_the_carriers_with_their_first_order_estimates():
    """candidates = 2 of 8 neurons: attribution patching must rank them. Its estimate per neuron is the first-order
    change of the margin, Σ_tokens (replacement − activation) · ∂margin/∂activation, worked here from the pixels
    with the cosine's gradient by hand; the two most negative are the two carriers, 0.0 first; the measured effect
    of each is the exact margin change of ablating it alone (discovery images)."""
    b = two_carrier_bundle()
    zs = zero_shot_model(b, ["a", "b"])
    clean, attacked, true = attack_case()
    f = typographic_attack(zs, clean, true, 0, WORD, [0, 1], k=1, candidates=2, font=FONT, size=SIZE, where=WHERE,
                           fg=FG, controls=2, seed=0, n_examples=len(clean))  # fmt: skip
    held = set(heldout_of(f, clean))
    disc = [i for i in range(len(clean)) if i not in held]  # every image is counted here
    assert len(disc) == f.summary.n_discovery
    clean_n, att_n = neuron_sums(clean, True), neuron_sums(attacked, True)
    n = att_n[disc]
    e = embeddings(n)
    r = np.linalg.norm(e, axis=1)
    # margin = (e_A − e_B) / |e|: ∂/∂e_j = (δ_jA − δ_jB)/|e| − (e_A − e_B) e_j / |e|³
    dm_de = (np.array([1.0, -1.0, 0.0])[None] / r[:, None]) - ((e[:, 0] - e[:, 1]) / r**3)[:, None] * e
    dm_dn = dm_de @ PROJ  # [N, 4]: ∂margin/∂(a neuron's activation at any one token)
    est0 = ((clean_n.mean(0)[None] - n) * dm_dn).mean(0)  # layer 0; layer 1's neurons never fire: estimate 0
    est = np.concatenate([est0, np.zeros(4)])
    names = [f"{layer}.{u}" for layer in (0, 1) for u in range(4)]
    want = [names[i] for i in np.argsort(est, kind="stable")[:2]]
    assert set(want) == {"0.0", "0.1"}  # the case: the two carriers are the two most negative
    assert est[0] < est[1] < 0 and est[0] == pytest.approx(2 * est[1], rel=1e-9)

    got = {x.neuron: x for x in f.neurons}
    assert set(got) == set(want) and f.neurons[0].neuron == "0.0"
    base = margin(n, 1, 0, 2)
    for u in (0, 1):
        x = got[f"0.{u}"]
        assert x.estimated == pytest.approx(est[u], rel=1e-4)
        assert x.effect == pytest.approx(float((margin(ablate(n, [u], clean_n), 1, 0, 2) - base).mean()), rel=1e-4)
    assert f.neurons[0].effect < f.neurons[1].effect < 0


def test_success_rate_any_counts_every_changed_prediction_not_only_the_target():
    """Three prompts and target "c": the word "a" moves the faint pictures to A (not the target), so the targeted
    success rate is 0 and the "any" rate is the share of counted pictures whose prediction left B, counted by hand."""
    b = planted_bundle()
    zs = zero_shot_model(b, ["a", "b", "c"])
    clean, attacked, true = attack_case(seed=12, n=24)
    clean_n, att_n = neuron_sums(clean, False), neuron_sums(attacked, False)
    pc, pa = logits(clean_n, 3).argmax(1), logits(att_n, 3).argmax(1)
    counted = pc == 1
    assert counted.all()
    want_any = float((pa[counted] != 1).mean())
    want_target = float((pa[counted] == 2).mean())
    assert 0.2 < want_any < 0.8 and want_target == 0.0  # the case: they differ
    f = typographic_attack(zs, clean, true, 2, WORD, [0], k=1, candidates=2, font=FONT, size=SIZE, where=WHERE,
                           fg=FG, controls=2, seed=0)  # fmt: skip
    s = f.summary
    assert tuple(pa.tolist()) == f.predictions_attacked
    assert s.n_counted == int(counted.sum())
    assert s.success_rate == want_target
    assert s.success_rate_any == pytest.approx(want_any, abs=1e-6)
    assert s.attacked_accuracy == pytest.approx(float((pa == 1).mean()), abs=1e-6)


# ---- multimodality: control neurons fewer than the neurons ------------------------------------------------------


def synthetic_acts(seed: int):
    """Two concepts; 8 neurons whose responses separate concept 0 by different amounts in pictures and in words;
    neuron 6 a copy of the best (neuron 2), so the best score is tied."""
    g = np.random.default_rng(seed)
    n_p, n_w = 40, 30
    pl, wl = np.repeat([0, 1], n_p // 2), np.repeat([0, 1], n_w // 2)
    sep_p = np.array([0.5, 1.5, 3.0, 0.2, 2.0, 1.0, 0.0, 2.5])
    sep_w = np.array([1.0, 1.2, 2.8, 0.4, 0.6, 2.0, 0.0, 0.3])
    pa = (pl == 0)[:, None] * sep_p[None] + g.normal(0, 1, (n_p, 8))
    wa = (wl == 0)[:, None] * sep_w[None] + g.normal(0, 1, (n_w, 8))
    pa[:, 6], wa[:, 6] = pa[:, 2], wa[:, 2]
    return (torch.tensor(pa, dtype=torch.float32), torch.tensor(pl), torch.tensor(wa, dtype=torch.float32),
            torch.tensor(wl))  # fmt: skip


def hand_scores(acts: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """[2, neurons]: d′ per concept (mean inside − mean outside) / population sd over all images."""
    a, lab = acts.double().numpy(), labels.numpy()
    sd = a.std(0)
    return np.stack([(a[lab == c].mean(0) - a[lab != c].mean(0)) / sd for c in (0, 1)])


def test_control_above_counts_the_drawn_controls_at_or_above_the_best():
    """n_controls = 3 of 8 neurons. The drawn set is read off the reported control mean and sd (the one multiset of
    three scores with that mean and population sd, found by trying every subset), and control_above is the share
    of it scoring at least the best neuron (ties count: neuron 6 is neuron 2's copy). Over several seeds the draw
    sometimes holds a top neuron and sometimes not."""
    from mechscope.clip.methods.neurons import multimodality

    pa, pl, wa, wl = synthetic_acts(0)
    scores = np.minimum(hand_scores(pa, pl), hand_scores(wa, wl))  # [2, 8]
    n_c = 3
    seen_above = set()
    for seed in range(8):
        mm = multimodality(pa, pl, wa, wl, ["A", "B"], [["a"], ["b"]], [0], 8, n_controls=n_c, min_score=0.5,
                           seed=seed)  # fmt: skip
        assert mm.n_controls == n_c and mm.n_neurons == 8
        for ci, row in enumerate(mm.concepts):
            sc = scores[ci]
            best = sc.max()
            assert row.score == pytest.approx(best, rel=1e-5)
            counts = set()
            for sub in itertools.combinations(range(8), n_c):
                v = sc[list(sub)]
                if abs(v.mean() - row.control_mean) < 1e-5 and abs(v.std() - row.control_sd) < 1e-5:
                    counts.add(int((v >= best - 1e-9).sum()))
            assert len(counts) == 1, f"seed {seed}: the control set is not identified ({counts})"
            above = counts.pop()
            assert row.control_above == pytest.approx(above / n_c, abs=1e-12)
            if ci == 0:
                seen_above.add(above)
    assert 0 in seen_above and max(seen_above) >= 1  # the seeds exercise both cases


def test_an_attack_that_moves_no_margin_leaves_every_share_undone_undefined(monkeypatch):
    """Truth: a share of a zero shift is 0/0. With the word written as nothing (the attacked images are the clean
    ones), the top k's, the given neurons' and every control's share undone are all NaN alike (the given neurons and
    the controls once read 0.0 beside the top k's NaN), and the report says there was nothing to undo."""
    from mechscope.clip.report.context import undone_text

    monkeypatch.setattr(attack_module, "write_on", lambda x, *a, **k: x.clone())
    zs = zero_shot_model(two_carrier_bundle(), ["a", "b"])
    clean, _, true = attack_case()
    f = typographic_attack(zs, clean, true, 0, WORD, [0, 1], k=1, candidates=8, font=FONT, size=SIZE, where=WHERE,
                           fg=FG, controls=3, seed=0, n_examples=len(clean), given=((0, 1),))  # fmt: skip
    s = f.summary
    assert s.margin_clean == s.margin_attacked  # the case: nothing moved
    assert all(math.isnan(v) for v in (s.undone, s.given_undone, s.control_undone_mean))
    assert undone_text(s.undone) == "nothing of the shift to undo (the attack moved no margin)"
    assert undone_text(0.34) == "34% of the shift undone"
