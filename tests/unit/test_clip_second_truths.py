"""The multimodal wing's attack, neurons and zero-shot methods, second pass, against outside truths: the numpy
reading of the planted toy (``test_clip_controls``: embedding ``[(2·n0 + n1)/5, (n2 + n3)/5, 0.1]``, logits its
unit-norm dotted with one-hot prompts at logit scale 1), with zero ablation worked by hand (a neuron zeroed at every
token adds nothing to its sum), softmax in numpy, the paper's rule that a multimodal neuron must *beat* every
mismatched pairing, and the documented bounds of the attack (a target among the classes, at least two counted
images)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mechscope.clip.methods import neurons as N
from mechscope.clip.methods.attack import attack_images, typographic_attack
from mechscope.clip.methods.evaluate import zero_shot_model
from mechscope.clip.models.views import ImageModel
from mechscope.core.errors import MechscopeError
from tests.unit.test_clip_controls import (
    FG,
    FONT,
    PROJ,
    SIZE,
    WHERE,
    WORD,
    ablate,
    embeddings,
    heldout_of,
    logits,
    margin,
    neuron_sums,
)
from tests.unit.test_clip_planted import images_with_ink, planted_bundle

pytestmark = pytest.mark.usefixtures("one_thread")  # small models: one torch thread


def zero(n: np.ndarray, units) -> np.ndarray:
    out = n.copy()
    out[:, list(units)] = 0.0
    return out


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def attack(zs, clean, true, target, **kw):
    args = dict(k=1, candidates=4, font=FONT, size=SIZE, where=WHERE, fg=FG, controls=2, seed=0)
    return typographic_attack(zs, clean, true, target, WORD, [0], **{**args, **kw})


def faint_tl_case(n: int = 24):
    """Class B pictures (TR ink) with faint top-left ink, so neuron 0.0's clean mean is not 0 (mean ≠ zero)."""
    clean = images_with_ink("TR", n, 21, low=0.3, high=0.8, fill=1.0)
    clean = clean + images_with_ink("TL", n, 22, low=0.05, high=0.15, fill=0.5)
    return clean, attack_images(clean, WORD, FONT, SIZE, WHERE, FG), torch.ones(n, dtype=torch.long)


def grad_estimate(n: np.ndarray, rep: np.ndarray) -> np.ndarray:
    """First-order margin change (A − B, three prompts) of replacing each neuron's sum by ``rep``: the cosine's
    gradient by hand, ∂m/∂e_j = (δ_jA − δ_jB)/|e| − (e_A − e_B) e_j/|e|³."""
    e = embeddings(n)
    r = np.linalg.norm(e, axis=1)
    dm_de = np.array([1.0, -1.0, 0.0])[None] / r[:, None] - ((e[:, 0] - e[:, 1]) / r**3)[:, None] * e
    return ((rep - n) * (dm_de @ PROJ)).mean(0)


# ---- zero ablation ---------------------------------------------------------------------------------------------


def test_zero_ablation_estimates_effects_and_margins_by_hand():
    """Truth: with ablation "zero" each neuron's estimate is the gradient reading of setting its sum to 0, its
    effect the exact margin change of that, and the held-out margin after ablating the found neuron is worked with
    its sum set to 0, which differs here from setting it to its clean mean."""
    zs = zero_shot_model(planted_bundle(), ["a", "b", "c"])
    clean, attacked, true = faint_tl_case()
    f = attack(zs, clean, true, 0, ablation="zero", n_examples=len(clean))
    held = heldout_of(f, clean)
    disc = [i for i in range(len(clean)) if i not in held]
    clean_n, att_n = neuron_sums(clean, False), neuron_sums(attacked, False)
    d = att_n[disc]
    est = grad_estimate(d, np.zeros_like(d))
    base = margin(d, 1, 0, 3)
    got = {x.unit: x for x in f.neurons}
    assert sorted(got) == [0, 1, 2, 3]
    for u in range(4):
        assert got[u].estimated == pytest.approx(est[u], rel=1e-4, abs=1e-7)
        assert got[u].effect == pytest.approx(float((margin(zero(d, [u]), 1, 0, 3) - base).mean()), rel=1e-4, abs=1e-7)
    assert f.neurons[0].neuron == "0.0" and f.neurons[0].effect < 0  # the case: the word's carrier
    h = att_n[held]
    want = margin(zero(h, [0]), 1, 0, 3)
    assert f.summary.margin_ablated == pytest.approx(float(want.mean()), rel=1e-4)
    assert abs(float(margin(ablate(h, [0], clean_n), 1, 0, 3).mean() - want.mean())) > 0.01  # mean ≠ zero here
    shift = (margin(h, 1, 0, 3) - margin(clean_n[held], 1, 0, 3)).mean()
    assert f.summary.undone == pytest.approx(float((margin(h, 1, 0, 3) - want).mean() / shift), rel=1e-4)


def test_predictions_and_probabilities_of_every_image_by_hand():
    """Truth: argmax of the numpy logits of every clean, attacked and attacked-with-0.0-zeroed image, and for the
    held-out images shown the numpy softmax (logit scale 1) of the three, in that order, over the classes."""
    zs = zero_shot_model(planted_bundle(), ["a", "b", "c"])
    clean, attacked, true = faint_tl_case()
    f = attack(zs, clean, true, 0, ablation="zero", n_examples=len(clean))
    assert f.neurons[0].neuron == "0.0"
    clean_n, att_n = neuron_sums(clean, False), neuron_sums(attacked, False)
    lc, la, lz = logits(clean_n, 3), logits(att_n, 3), logits(zero(att_n, [0]), 3)
    assert f.predictions_clean == tuple(lc.argmax(1).tolist())
    assert f.predictions_attacked == tuple(la.argmax(1).tolist())
    assert f.predictions_ablated == tuple(lz.argmax(1).tolist())
    assert 0 < (la.argmax(1) == 0).mean() < 1  # the case: some flipped, some not, so the three differ
    held = heldout_of(f, clean)
    want = softmax(np.stack([lc[held], la[held], lz[held]], 1))
    assert f.probabilities.shape == (len(held), 3, 3)
    assert np.allclose(f.probabilities, want, atol=1e-5)
    assert f.summary.heldout_success == pytest.approx(float((la[held].argmax(1) == 0).mean()), abs=1e-6)
    assert f.summary.heldout_success_ablated == pytest.approx(float((lz[held].argmax(1) == 0).mean()), abs=1e-6)


def test_zeroing_every_neuron_sends_clean_images_to_the_constant_class():
    """Truth: with all four layer-0 neurons zeroed the embedding is the class token's constant [0, 0, 0.1], whose
    nearest prompt is "c": no held-out clean image stays B (clean accuracy 1 before, by selection, 0 after) and no
    attacked one reaches the target. k = 6 asks for more neurons than the four there are: four are ablated."""
    zs = zero_shot_model(planted_bundle(), ["a", "b", "c"])
    clean, _, true = faint_tl_case(12)
    f = attack(zs, clean, true, 0, ablation="zero", k=6, n_examples=len(clean))
    s = f.summary
    assert s.k == 4 and len(f.neurons) == 4
    assert s.heldout_clean_accuracy == 1.0 and s.heldout_clean_accuracy_ablated == 0.0
    assert s.heldout_success_ablated == 0.0 and s.heldout_accuracy_ablated == 0.0
    assert f.predictions_ablated == (2,) * len(clean)


# ---- an attack that moves the margin away from the target --------------------------------------------------------


def test_a_negative_shift_is_still_a_share_to_undo():
    """Truth: share undone = mean(m_attacked − m_ablated) / mean shift, by hand, whichever the shift's sign. A
    pictures with some B ink (true A, target B) and the word "a" written on them: the attack pushes further from B
    (the shift is negative); mean-ablating 0.0 (named by the user) takes part of it back, as worked by hand."""
    zs = zero_shot_model(planted_bundle(), ["a", "b"])
    clean = images_with_ink("TL", 20, 31, low=0.3, high=0.8, fill=1.0) + images_with_ink("TR", 20, 32, fill=0.5)
    attacked = attack_images(clean, WORD, FONT, SIZE, WHERE, FG)
    true = torch.zeros(20, dtype=torch.long)
    f = attack(zs, clean, true, 1, n_examples=len(clean), given=((0, 0),))
    held = heldout_of(f, clean)
    clean_n, att_n = neuron_sums(clean, False), neuron_sums(attacked, False)
    m_clean, m_att = margin(clean_n[held], 0, 1, 2), margin(att_n[held], 0, 1, 2)
    shift = (m_att - m_clean).mean()
    assert shift < -0.01  # the case
    want_given = (m_att - margin(ablate(att_n[held], [0], clean_n), 0, 1, 2)).mean() / shift
    assert f.summary.given_undone == pytest.approx(float(want_given), rel=1e-4)
    top = [f.neurons[0].unit]
    want_top = (m_att - margin(ablate(att_n[held], top, clean_n), 0, 1, 2)).mean() / shift
    assert f.summary.undone == pytest.approx(float(want_top), rel=1e-4, abs=1e-6)
    assert not math.isnan(f.summary.control_undone_mean)


# ---- documented bounds ---------------------------------------------------------------------------------------------


def test_the_target_must_be_one_of_the_classes():
    """Truth: two prompts are classes 0 and 1; 2 and −1 are refused with the range, before any work."""
    zs = zero_shot_model(planted_bundle(), ["a", "b"])
    clean, _, true = faint_tl_case(4)
    for bad in (2, -1):
        with pytest.raises(MechscopeError, match=rf"target class {bad} out of range 0\.\.1"):
            attack(zs, clean, true, bad)


def test_the_attack_needs_two_counted_images_and_two_are_enough():
    """Truth: the documented minimum of 2 counted images (correct before, not of the target), at its boundary:
    one B picture among A pictures (target A) is refused, two are split one and one."""
    zs = zero_shot_model(planted_bundle(), ["a", "b"])
    b_pics, _, _ = faint_tl_case(2)
    a_pics = images_with_ink("TL", 3, 41, low=0.3, high=0.8, fill=1.0)
    one = torch.cat([b_pics[:1], a_pics])
    with pytest.raises(MechscopeError, match=r"only 1 image\(s\) are classified correctly"):
        attack(zs, one, torch.tensor([1, 0, 0, 0]), 0)
    s = attack(zs, torch.cat([b_pics, a_pics]), torch.tensor([1, 1, 0, 0, 0]), 0).summary
    assert (s.n_counted, s.n_discovery, s.n_heldout) == (2, 1, 1)


def test_attacked_accuracy_is_over_every_image_and_held_out_success_over_the_held_out_half():
    """Truth: counted by a plain loop over the numpy predictions. Six A pictures (the target: not counted, but
    still images whose accuracy is measured) beside 24 B pictures; held-out success over the held-out half only."""
    zs = zero_shot_model(planted_bundle(), ["a", "b"])
    b_pics, _, _ = faint_tl_case(24)
    clean = torch.cat([images_with_ink("TL", 6, 14, low=0.3, high=0.8, fill=1.0), b_pics])
    true = [0] * 6 + [1] * 24
    f = attack(zs, clean, torch.tensor(true), 0, n_examples=len(clean))
    pa = logits(neuron_sums(attack_images(clean, WORD, FONT, SIZE, WHERE, FG), False), 2).argmax(1).tolist()
    right = sum(1 for p, t in zip(pa, true, strict=True) if p == t)
    assert f.summary.attacked_accuracy == pytest.approx(right / 30, abs=1e-6)
    held = heldout_of(f, clean)
    hits = sum(1 for i in held if pa[i] == 0)
    assert f.summary.heldout_success == pytest.approx(hits / len(held), abs=1e-6)
    counted_hits = sum(1 for i in range(6, 30) if pa[i] == 0)
    assert counted_hits / 24 != hits / len(held) or 0 < hits < len(held)  # the case: not all or nothing


# ---- neurons ---------------------------------------------------------------------------------------------------


def test_a_best_score_tied_with_a_mismatched_pairing_is_not_multimodal():
    """Truth: Goh et al.'s control as the module documents it: a concept's best neuron must *beat* every mismatched
    pairing. Neuron 0 is concept A in pictures and in names (d′ = 1/√(¼·¾) both); neuron 1 is A in pictures and
    B's name, so A's pictures with B's name score the same d′ exactly: a tie, not multimodal."""
    lab = torch.tensor([0, 0, 1, 1, 2, 2, 2, 2])
    a, b = (lab == 0).float(), (lab == 1).float()
    pa, wa = torch.stack([a, a], 1), torch.stack([a, b], 1)
    mm = N.multimodality(pa, lab, wa, lab, ["A", "B", "C"], [["a"], ["b"], ["c"]], [0], 2, min_score=1.0)
    row = mm.concepts[0]
    d = 1 / math.sqrt(0.25 * 0.75)
    assert row.score == pytest.approx(d) and row.null_max == pytest.approx(d)
    assert not row.multimodal and mm.n_multimodal == 0


def test_hot_patch_of_a_top_right_neuron_is_the_top_right_box():
    """Truth: on the planted toy neuron 0.2 fires on top-right ink only; the top-right patch of an 8×8 image in
    4×4 patches spans rows 0..4 and columns 4..8, so its box (top, left, bottom, right) is (0, 4, 4, 8)."""
    b = planted_bundle()
    view = ImageModel(b.model, b.preprocess)
    assert N.hot_patch(view, images_with_ink("TR", 3, 5, low=0.5), 0, 2) == [(0, 4, 4, 8)] * 3
    assert N.hot_patch(view, images_with_ink("BL", 2, 6, low=0.5), 0, 3) == [(4, 0, 8, 4)] * 2


def test_multimodality_counts_the_pictures_and_the_names_apart():
    """Truth: the rows given, counted: six pictures and nine drawn names."""
    pl, wl = torch.tensor([0, 0, 0, 1, 1, 1]), torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 1])
    g = torch.Generator().manual_seed(0)
    mm = N.multimodality(torch.rand(6, 3, generator=g), pl, torch.rand(9, 3, generator=g), wl, ["A", "B"],
                         [["a"], ["b"]], [0], 3)  # fmt: skip
    assert (mm.n_pictures, mm.n_words, mm.n_neurons) == (6, 9, 3)


def test_layer_and_neuron_bounds_at_their_edges():
    """Truth: the planted image tower has 2 layers of 4 neurons: layer 1 and unit 3 are the last there are, layer 2
    and unit 4 one past them."""
    b = planted_bundle()
    view = ImageModel(b.model, b.preprocess)
    assert N.check_layers(view, [1, 0]) == [1, 0] and N.check_layers(view, None) == [0, 1]
    with pytest.raises(MechscopeError, match=r"layer 2 out of range: the tower has layers 0\.\.1"):
        N.check_layers(view, [0, 2])
    N.check_neuron(view, 1, 3)
    with pytest.raises(MechscopeError, match=r"layer 0 has neurons 0\.\.3"):
        N.check_neuron(view, 0, 4)
    with pytest.raises(MechscopeError, match=r"the image tower has layers 0\.\.1"):
        N.check_neuron(view, 2, 0)
