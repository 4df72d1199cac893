"""The image–text wing's methods against outside truths: numbers worked by hand with numpy from a hand-built model's
pixels (the planted toy of ``test_clip_planted``, read analytically as in ``test_clip_controls``), numpy and sklearn
on synthetic activations, the completeness axiom of integrated gradients, and the written specification of the
training pairs, the schedule and the preprocessing saved with the small model."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mechscope.clip.methods import neurons as N
from mechscope.core.errors import MechscopeError
from tests.unit.test_clip_controls import (
    FG,
    FONT,
    SIZE,
    WHERE,
    WORD,
    ablate,
    attack_case,
    heldout_of,
    ink,
    logits,
    neuron_sums,
)
from tests.unit.test_clip_planted import images_with_ink, planted_bundle

pytestmark = pytest.mark.usefixtures("one_thread")  # small models: one torch thread


def planted_view():
    from mechscope.clip.models.views import ImageModel

    b = planted_bundle()
    return b, ImageModel(b.model, b.preprocess)


def inked(n: int, seed: int) -> torch.Tensor:
    """Images with ink in all four patches (different amounts)."""
    return sum(images_with_ink(w, n, seed + i, fill=0.7) for i, w in enumerate(("TL", "TR", "BL", "BR")))


def random_clip(channels: int = 1):
    from mechscope.clip.models.clip import CLIP, CLIPConfig, TextConfig, VisionConfig
    from mechscope.clip.models.preprocess import Preprocessor
    from mechscope.clip.models.views import ImageModel

    cfg = CLIPConfig(
        VisionConfig(32, 2, 4, 64, 16, 4, n_channels=channels, proj_dim=16),
        TextConfig(32, 1, 4, 64, 40, 8, eos_token_id=39, proj_dim=16),
    )
    model = CLIP(cfg)
    model.init_weights(torch.Generator().manual_seed(3))
    return ImageModel(model, Preprocessor(16, channels, mean=(0.5,) * channels, std=(0.5,) * channels)).eval()


# ---- neurons: activations and their reductions ----------------------------------------------------------------


def test_reductions_and_column_layout_match_numpy_on_raw_hook_output():
    """Truth: the raw [B,P,M] MLP output captured with a plain torch forward hook (not mechscope's hooks), reduced
    with numpy (mean over tokens, max over tokens, the class token); columns layer-major in the order the layers
    are given ([1, 0]). A GELU model, so activations are negative too."""
    view = random_clip()
    x = torch.rand(7, 1, 16, 16, generator=torch.Generator().manual_seed(4))
    raw = {}
    handles = [
        view.get_submodule(N.layer_name(layer)).register_forward_hook(
            lambda m, i, o, layer=layer: raw.__setitem__(layer, o.detach().double().numpy())
        )
        for layer in (0, 1)
    ]
    with torch.no_grad():
        view(x)
    for h in handles:
        h.remove()
    assert (raw[1] < 0).any()
    want = {"mean": lambda a: a.mean(1), "max": lambda a: a.max(1), "cls": lambda a: a[:, 0]}
    for reduce, f in want.items():
        got = N.activations(view, x, [1, 0], reduce, batch_size=3).double().numpy()
        assert np.allclose(got, np.concatenate([f(raw[1]), f(raw[0])], 1), atol=1e-5), reduce


def test_reductions_on_the_planted_model_by_hand():
    """Truth: on the planted toy a layer-0 neuron's activation at a token is the ink of that token's patch when it
    reads that patch (0.0: TL and BR, 0.1: TL, 0.2: TR, 0.3: BL), 0 elsewhere and at the class token."""
    _, view = planted_view()
    x = inked(6, 30)
    tl, tr, bl, br = (ink(x, w) for w in ("TL", "TR", "BL", "BR"))
    per_token = np.zeros((6, 5, 4))
    per_token[:, 1, 0], per_token[:, 4, 0] = tl, br
    per_token[:, 1, 1], per_token[:, 2, 2], per_token[:, 3, 3] = tl, tr, bl
    for reduce, want in (("mean", per_token.mean(1)), ("max", per_token.max(1)), ("cls", per_token[:, 0])):
        got = N.activations(view, x, [0], reduce).double().numpy()
        assert np.allclose(got, want, atol=1e-5), reduce


# ---- neurons: multimodality bookkeeping ------------------------------------------------------------------------


def np_dprime(a: np.ndarray, lab: np.ndarray, c: int) -> np.ndarray:
    sd = a.std(0)
    diff = np.stack([a[lab == k].mean(0) - a[lab != k].mean(0) for k in range(c)])
    return np.where(sd > 0, diff / np.where(sd > 0, sd, 1.0), 0.0)


def three_concepts(seed: int = 0):
    """3 concepts, 6 neurons (layers [3, 5, 8], 2 each). Concept k's best neuron is column (1, 3, 4)[k]; other
    columns separate one modality or both by less."""
    g = np.random.default_rng(seed)
    n_p, n_w = 60, 45
    pl, wl = np.arange(n_p) % 3, np.arange(n_w) % 3
    sep_p = np.zeros((3, 6))
    sep_w = np.zeros((3, 6))
    for k, col in enumerate((1, 3, 4)):
        sep_p[k, col], sep_w[k, col] = 3.5, 3.0
    sep_p[0, 0], sep_w[0, 0] = 1.5, 1.2  # concept 0's runner-up
    sep_p[1, 2], sep_w[1, 2] = 4.0, 0.0  # a picture-only neuron
    sep_p[2, 5], sep_w[2, 5] = 0.3, 2.0
    sep_w[1, 0] = 2.0  # concept 1's name on concept 0's runner-up: the mismatched pairing scores
    pa = sep_p[pl] + g.normal(0, 1, (n_p, 6))
    wa = sep_w[wl] + g.normal(0, 1, (n_w, 6))
    return pa, pl, wa, wl


def test_multimodality_rows_match_numpy():
    """Truth: d′ per concept and neuron with numpy (population sd), score = min of the two, the best and runner-up
    columns named L.U layer-major, every neuron a control (n_controls ≥ neurons: their mean, population sd, z and
    the share at or above the best), and the mismatched null (this concept's pictures, each other concept's name)."""
    pa, pl, wa, wl = three_concepts()
    layers, d_mlp = [3, 5, 8], 2
    mm = N.multimodality(torch.tensor(pa, dtype=torch.float32), torch.tensor(pl), torch.tensor(wa, dtype=torch.float32),
                         torch.tensor(wl), ["A", "B", "C"], [["a"], ["b"], ["c"]], layers, d_mlp, n_controls=100,
                         min_score=1.0)  # fmt: skip
    pa32, wa32 = pa.astype(np.float32).astype(np.float64), wa.astype(np.float32).astype(np.float64)
    pd, wd = np_dprime(pa32, pl, 3), np_dprime(wa32, wl, 3)
    score = np.minimum(pd, wd)
    assert mm.n_controls == 6 and mm.n_neurons == 6
    assert np.allclose(mm.scores.double().numpy(), score, atol=1e-5)
    name = lambda col: f"{layers[col // d_mlp]}.{col % d_mlp}"  # noqa: E731
    for k, row in enumerate(mm.concepts):
        order = np.argsort(-score[k], kind="stable")
        best, second = order[0], order[1]
        assert best == (1, 3, 4)[k]  # the case
        assert row.neuron == name(best) and (row.layer, row.unit) == (layers[best // 2], best % 2)
        assert row.score == pytest.approx(score[k, best], abs=1e-6)
        assert row.picture_d == pytest.approx(pd[k, best], abs=1e-6)
        assert row.word_d == pytest.approx(wd[k, best], abs=1e-6)
        assert row.runner_up == name(second) and row.runner_up_score == pytest.approx(score[k, second], abs=1e-6)
        cm, cs = score[k].mean(), score[k].std()
        assert row.control_mean == pytest.approx(cm, abs=1e-6) and row.control_sd == pytest.approx(cs, abs=1e-6)
        assert row.z == pytest.approx((score[k, best] - cm) / cs, rel=1e-5)
        assert row.z > 0
        assert row.control_above == pytest.approx(1 / 6)
        null = np.array([np.minimum(pd[k], wd[j]).max() for j in range(3) if j != k])
        assert row.null_mean == pytest.approx(null.mean(), abs=1e-6)
        assert row.null_sd == pytest.approx(null.std(), abs=1e-6)
        assert row.null_max == pytest.approx(null.max(), abs=1e-6)
        assert row.multimodal == bool(score[k, best] > null.max() and score[k, best] >= 1.0)
    # the case: the nulls differ between pairings, so mean, max and the pairing's direction are told apart
    nulls0 = [np.minimum(pd[0], wd[j]).max() for j in (1, 2)]
    swapped0 = [np.minimum(pd[j], wd[0]).max() for j in (1, 2)]
    assert abs(nulls0[0] - nulls0[1]) > 0.1 and abs(max(nulls0) - max(swapped0)) > 0.1


def test_a_score_exactly_at_min_score_is_multimodal():
    """Truth: 'reaches min_score' includes equality. A neuron that is 1 on concept 0's images (half of them) and 0
    elsewhere has d′ = (1 − 0) / 0.5 = 2 exactly in both modalities; no mismatched pairing scores above 0."""
    lab = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    ind = (lab == 0).float()
    pa = torch.stack([ind, (lab == 1).float()], 1)
    wa = torch.stack([ind, torch.zeros(8)], 1)
    mm = N.multimodality(pa, lab, wa, lab, ["A", "B", "C"], [["a"], ["b"], ["c"]], [0], 2, min_score=2.0)
    a = mm.concepts[0]
    assert a.score == 2.0 and a.null_max <= 0.0
    assert a.multimodal and mm.n_multimodal == 1


# ---- neurons: reading one neuron ----------------------------------------------------------------------------


def test_text_probe_is_each_words_mean_response():
    """Truth: the planted neuron 0.1 responds ink(TL)/5 and 0.2 ink(TR)/5 (mean over five tokens); a word's probe
    value is the mean over its drawings (unequal counts per word)."""
    _, view = planted_view()
    w0, w1 = images_with_ink("TL", 3, 40), images_with_ink("TR", 5, 41)
    unit = torch.cat([w0, w1])
    labels = torch.tensor([0] * 3 + [1] * 5)
    got = N.text_probe(view, unit, labels, ["x", "y"], [1, 2], [0]).double().numpy()
    want = np.array([[ink(w0, "TL").mean() / 5, 0.0], [0.0, ink(w1, "TR").mean() / 5]])
    assert np.allclose(got, want, atol=1e-6)


def test_text_probe_refuses_a_word_without_drawings():
    """Truth: a mean over no drawings has no value; one line naming the word instead of a row of NaN."""
    _, view = planted_view()
    unit = images_with_ink("TL", 3, 40)
    with pytest.raises(MechscopeError, match="no drawing of 'y'"):
        N.text_probe(view, unit, torch.zeros(3, dtype=torch.long), ["x", "y"], [1, 2], [0])
    with pytest.raises(MechscopeError, match="2 labels for 3 drawings"):
        N.text_probe(view, unit, torch.zeros(2, dtype=torch.long), ["x"], [1, 2], [0])


def test_text_alignment_by_hand_with_unnormalised_word_embeddings():
    """Truth: the planted image embedding is [(2·n0 + n1)/5, (n2 + n3)/5, 0.1] (n_u: neuron 0.u summed over
    tokens); zeroing 0.0 sets n0 = 0. The alignment is the unit-norm word embeddings (given here at different
    norms, one off-axis) dotted with the mean change of the unit-norm image embedding, all in numpy."""
    b, view = planted_view()
    x = images_with_ink("TL", 6, 50) + images_with_ink("TR", 6, 51)
    n = neuron_sums(x, False)
    proj = np.array([[2.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]]) / 5
    emb = lambda m: m @ proj.T + np.array([0.0, 0.0, 0.1])  # noqa: E731
    unitn = lambda e: e / np.linalg.norm(e, axis=-1, keepdims=True)  # noqa: E731
    ab = n.copy()
    ab[:, 0] = 0.0
    contribution = (unitn(emb(n)) - unitn(emb(ab))).mean(0)
    words = np.array([[3.0, 0.0, 0.0], [0.0, 0.5, 0.0], [1.0, 0.0, 2.0]])
    want = unitn(words) @ contribution
    got = N.text_alignment(view, x, 0, 0, torch.tensor(words, dtype=torch.float32)).double().numpy()
    assert np.allclose(got, want, atol=1e-6)
    assert want[0] > 0 > want[1]  # the case: the neuron moves images towards A, away from B (which it dilutes)


def test_top_examples_are_numpys_largest():
    """Truth: numpy's descending sort of one column; k larger than the images gives all of them."""
    acts = torch.randn(20, 4, generator=torch.Generator().manual_seed(6))
    idx, vals = N.top_examples(acts, 2, 5)
    a = acts[:, 2].numpy()
    want = np.argsort(-a)[:5]
    assert idx == want.tolist() and np.allclose(vals, a[want])
    idx_all, _ = N.top_examples(acts, 2, 50)
    assert idx_all == np.argsort(-a).tolist()


def test_pixel_attribution_is_complete_over_three_channels():
    """Truth: the completeness axiom of integrated gradients: the attributions (summed over channels and pixels) add
    up to the neuron's response minus its response to the black baseline, both read by :func:`activations`; a
    three-channel random model, so summing the channels differs from averaging them."""
    view = random_clip(channels=3)
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(8))
    diff = (N.activations(view, x, [1]) - N.activations(view, torch.zeros_like(x), [1])).double()
    unit = int(diff.abs().mean(0).argmax())
    attr, delta = N.pixel_attribution(view, x, 1, unit, n_steps=64)
    assert attr.shape == (3, 16, 16)
    want = diff[:, unit].numpy()
    assert np.abs(want).min() > 0.05  # the case: a response that moves
    got = attr.double().sum((1, 2)).numpy()
    assert np.allclose(got, want, rtol=0.03, atol=1e-3)
    assert np.allclose(delta.double().numpy(), want - got, atol=1e-3)


# ---- attack ---------------------------------------------------------------------------------------------------


def test_token_means_over_several_batches_by_hand():
    """Truth: each planted layer-0 neuron's mean activation at each token is the mean ink of the patch it reads
    there (0 at the class token); layer 1's neurons never fire. Ten images in batches of four."""
    from mechscope.clip.methods.attack import token_means
    from mechscope.clip.methods.evaluate import zero_shot_model

    b = planted_bundle()
    zs = zero_shot_model(b, ["a", "b"])
    x = inked(10, 60)
    got = token_means(zs, x, [0, 1], batch_size=4)
    want = np.zeros((5, 4))
    want[1, 0] = want[1, 1] = ink(x, "TL").mean()
    want[4, 0] = ink(x, "BR").mean()
    want[2, 2], want[3, 3] = ink(x, "TR").mean(), ink(x, "BL").mean()
    assert np.allclose(got[0].double().numpy(), want, atol=1e-5)
    assert np.allclose(got[1].double().numpy(), 0.0)


def test_attack_counts_only_non_target_images_and_measures_given_neurons_by_hand():
    """Truth: the numpy reading of the planted toy (test_clip_controls). Six pictures of the target class A are
    among the images: they are not counted (n_counted, success rate, margins over the counted B pictures only).
    The user names neuron 0.2 (B's picture neuron, not a carrier): its given_* numbers are worked by mean-ablating
    it by hand on the held-out attacked and clean images."""
    from mechscope.clip.methods.attack import attack_images, typographic_attack
    from mechscope.clip.methods.evaluate import zero_shot_model

    b = planted_bundle()
    zs = zero_shot_model(b, ["a", "b"])
    clean_b, _, _ = attack_case(seed=13, n=24)
    clean_a = images_with_ink("TL", 6, 14, low=0.3, high=0.8, fill=1.0)
    clean = torch.cat([clean_a, clean_b])
    true = torch.tensor([0] * 6 + [1] * 24)
    attacked = attack_images(clean, WORD, FONT, SIZE, WHERE, FG)
    f = typographic_attack(zs, clean, true, 0, WORD, [0], k=1, candidates=4, font=FONT, size=SIZE, where=WHERE,
                           fg=FG, controls=2, seed=0, n_examples=len(clean), given=((0, 2),))  # fmt: skip
    s = f.summary
    clean_n, att_n = neuron_sums(clean, False), neuron_sums(attacked, False)
    lc, la = logits(clean_n, 2), logits(att_n, 2)
    t = true.numpy()
    pc, pa = lc.argmax(1), la.argmax(1)
    counted = (pc == t) & (t != 0)
    assert (pc == t).all() and counted.sum() == 24  # the case: every picture right, six of them of the target
    rows = np.arange(len(t))
    mc, ma = lc[:, 0] - lc[rows, t], la[:, 0] - la[rows, t]
    assert s.n_counted == 24 and s.n_discovery + s.n_heldout == 24
    assert s.success_rate == pytest.approx(float((pa[counted] == 0).mean()), abs=1e-9)
    assert s.success_rate < 1.0 or (pa[~counted] == 0).all()
    assert s.margin_clean == pytest.approx(float(mc[counted].mean()), rel=1e-4)
    assert s.margin_attacked == pytest.approx(float(ma[counted].mean()), rel=1e-4)
    assert s.clean_accuracy == 1.0

    held = heldout_of(f, clean)
    assert all(t[i] == 1 for i in held)
    shift = (ma[held] - mc[held]).mean()
    ab_att = logits(ablate(att_n[held], [2], clean_n), 2)
    ab_clean = logits(ablate(clean_n[held], [2], clean_n), 2)
    assert s.given == ("0.2",)
    assert s.given_success == pytest.approx(float((ab_att.argmax(1) == 0).mean()), abs=1e-9)
    assert s.given_accuracy == pytest.approx(float((ab_att.argmax(1) == 1).mean()), abs=1e-9)
    assert s.given_clean_accuracy == pytest.approx(float((ab_clean.argmax(1) == 1).mean()), abs=1e-9)
    assert s.given_clean_accuracy != s.given_accuracy  # the case: attacked and clean tell apart
    want_undone = float((ma[held] - (ab_att[:, 0] - ab_att[:, 1])).mean() / shift)
    assert s.given_undone == pytest.approx(want_undone, rel=1e-4, abs=1e-6)


# ---- zero-shot evaluation ---------------------------------------------------------------------------------------


def test_accuracy_and_confusion_match_sklearn():
    """Truth: predictions worked from the pixels with the numpy reading of the planted toy (TL ink → A, TR or BL →
    B, blank → the constant C direction), scored against seeded labels by sklearn's accuracy_score and
    confusion_matrix ([true][predicted]); 65 images, one past a batch of 64."""
    from sklearn.metrics import accuracy_score, confusion_matrix

    from mechscope.clip.methods.evaluate import accuracy, zero_shot_model

    b = planted_bundle()
    zs = zero_shot_model(b, ["a", "b", "c"])
    x = torch.cat([images_with_ink("TL", 20, 70), images_with_ink("TR", 15, 71), images_with_ink("BL", 15, 72),
                   torch.zeros(15, 1, 8, 8)])  # fmt: skip
    pred = logits(neuron_sums(x, False), 3).argmax(1)
    assert sorted(set(pred.tolist())) == [0, 1, 2]
    labels = np.where(np.random.default_rng(0).random(65) < 0.7, pred, np.random.default_rng(1).integers(0, 3, 65))
    acc = accuracy(zs, x, torch.tensor(labels), "planted", "{}")
    assert acc.n == 65
    assert acc.accuracy == pytest.approx(accuracy_score(labels, pred), abs=1e-6)
    want = confusion_matrix(labels, pred, labels=[0, 1, 2])
    assert not (want == want.T).all()  # the case: the matrix is not symmetric
    assert np.array_equal(np.array(acc.confusion), want)


# ---- training --------------------------------------------------------------------------------------------------


def test_learning_rate_warms_up_linearly_then_follows_a_half_cosine():
    """Truth: the schedule written out by hand: lr·(step+1)/warmup over the warmup steps (the full rate at the last
    one), then lr·½(1 + cos(π·t)) with t = (step − warmup)/(steps − warmup)."""
    from mechscope.clip.training import SmallSettings, lr_at

    s = SmallSettings(steps=10, warmup=4, lr=2.0)
    want = [0.5, 1.0, 1.5, 2.0] + [1.0 + math.cos(math.pi * (k / 6)) for k in range(6)]
    assert [lr_at(i, s) for i in range(10)] == pytest.approx(want, abs=1e-12)
    assert lr_at(7, s) == pytest.approx(1.0)  # half-way through the cosine: half the rate


def test_training_normalises_pixels_as_the_saved_preprocessor_does(monkeypatch, tmp_path):
    """Truth: the preprocessor_config.json saved with the small model (what transformers' CLIPImageProcessor
    applies: (unit − image_mean) / image_std). The pixels the image tower saw in training (recorded) must be the
    sampler's unit pixels normalised that way."""
    from mechscope.clip import training

    seen_unit, seen_tower = [], []

    class Sampler(training.PairSampler):
        def __init__(self, *a, **k):
            super().__init__(*a, **{**k, "fonts": ("sans",)})  # one font: fast

        def batch(self, n):
            out = super().batch(n)
            seen_unit.append(out[0].clone())
            return out

    class Recording(training.CLIP):
        def encode_image(self, x):
            seen_tower.append(x.detach().clone())
            return super().encode_image(x)

    monkeypatch.setattr(training, "PairSampler", Sampler)
    monkeypatch.setattr(training, "CLIP", Recording)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (100, 28, 28), generator=g, dtype=torch.uint8)
    s = training.SmallSettings(steps=1, batch=4, warmup=0, d_model=16, n_heads=2, d_mlp=32, text_d_model=16,
                               embed_dim=8, n_layers=1, text_layers=1, train_limit=100)  # fmt: skip
    trained = training.train(s, images, torch.arange(100) % 10)
    training.save_small(tmp_path, trained, s)
    pre = json.loads((tmp_path / "preprocessor_config.json").read_text())
    mean, std = pre["image_mean"][0], pre["image_std"][0]
    assert len(seen_unit) == 1 and len(seen_tower) == 1
    assert float(seen_unit[0].max()) > 0.5  # the case: unit pixels in [0, 1]
    assert torch.allclose(seen_tower[0], (seen_unit[0] - mean) / std, atol=1e-6)


# ---- data: the training pairs and the probe sets ------------------------------------------------------------------


def fake_mnist(n: int, labels=None, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(1, 256, (n, 28, 28), generator=g, dtype=torch.uint8)
    return images, (torch.arange(n) % 10 if labels is None else labels)


def test_pair_captions_follow_the_written_scheme():
    """Truth: the module's specification written out: a handwritten digit is "a handwritten {word}", a drawn word
    "the word {word}", a numeral "the number {word}", a scene is captioned by its text ("the word {word}"), a bare
    pair by the word alone; a handwritten picture is an MNIST image of its digit (its ink matches one)."""
    from mechscope.clip.data.digits import DIGIT_WORDS, PairSampler, all_captions

    images, labels = fake_mnist(60)
    caps = all_captions()
    want_kind = {0: "a handwritten {}", 1: "the word {}", 2: "the number {}", 3: "the word {}"}
    sums = images.double().sum((1, 2)).numpy() / 255
    for bare in (0.0, 1.0):
        sampler = PairSampler(images, labels, 32, seed=3, mix=(1, 1, 1, 1), fonts=("sans",), bare=bare)
        x, cap, kinds, digits = sampler.batch(80)
        assert set(kinds.tolist()) == {0, 1, 2, 3}
        for i in range(80):
            word = DIGIT_WORDS[int(digits[i])]
            want = word if bare else want_kind[int(kinds[i])].format(word)
            assert caps[int(cap[i])] == want
            if kinds[i] == 0:
                j = np.nonzero(np.isclose(sums, float(x[i].double().sum()), atol=1e-3))[0]
                assert len(j) == 1 and int(labels[j[0]]) == int(digits[i])


@pytest.mark.parametrize("under,never", [(3, {3}), (7, {7, 3})])
def test_a_scene_never_writes_its_own_digit_or_a_held_out_pair(under, never):
    """Truth: the specification: a scene writes *another* digit's name over the handwritten one, and the held-out
    pair (a 7 with "three") never occurs. Every handwritten digit here is ``under``."""
    from mechscope.clip.data.digits import PairSampler

    images, _ = fake_mnist(20)
    sampler = PairSampler(images, torch.full((20,), under), 32, seed=5, mix=(0, 0, 0, 1), fonts=("sans",))
    _, _, kinds, digits = sampler.batch(300)
    assert (kinds == 3).all()
    got = set(digits.tolist())
    assert not got & never and len(got) == 10 - len(never)


def test_digit_pictures_are_mnist_images_centred_with_their_labels():
    """Truth: a 28×28 image centred in a 32 canvas sits at offset 2; every picture is one of the given images of its
    label (/255), each label ``per_digit`` times, no image twice."""
    from mechscope.clip.data.digits import digit_pictures

    images, labels = fake_mnist(50, seed=9)
    x, y = digit_pictures(images, labels, 32, 3, seed=1)
    assert x.shape == (30, 1, 32, 32) and np.bincount(y.numpy(), minlength=10).tolist() == [3] * 10
    flat = images.double().numpy() / 255
    used = []
    for i in range(30):
        inner = x[i, 0, 2:30, 2:30].double().numpy()
        assert float(x[i].double().abs().sum()) == pytest.approx(inner.sum(), abs=1e-6)
        j = [k for k in range(50) if np.allclose(flat[k], inner, atol=1e-6)]
        assert len(j) == 1 and int(labels[j[0]]) == int(y[i])
        used.append(j[0])
    assert len(set(used)) == 30


def small_bundle():
    from mechscope.clip.data.digits import HELD_OUT_FONTS, TRAIN_FONTS

    record = {"text": {"fg": 1.0, "bg": 0.0}, "train_fonts": list(TRAIN_FONTS), "held_out_fonts": list(HELD_OUT_FONTS)}
    return SimpleNamespace(preprocess=SimpleNamespace(image_size=32, channels=1), small=record)


def test_the_small_model_is_probed_in_fonts_it_never_saw():
    """Truth: the record save_small writes holds both font lists; the probes must use the held-out ones, none of
    the training fonts."""
    from mechscope.clip.data.digits import HELD_OUT_FONTS, TRAIN_FONTS
    from mechscope.clip.data.probes import text_style

    style = text_style(small_bundle())
    assert style.fonts == HELD_OUT_FONTS and not set(style.fonts) & set(TRAIN_FONTS)


def test_digit_concepts_and_dataset_against_mnist(mnist):
    """Truth: MNIST's own test images and labels: each dataset picture is an MNIST test image (centred, /255) whose
    label names it ("handwritten {word}"); numerals are drawn at the numeral sizes, words at the word sizes."""
    from mechscope.clip.data.digits import DIGIT_WORDS
    from mechscope.clip.data.probes import digit_concepts, digit_dataset, text_style

    b = small_bundle()
    style = text_style(b)
    c = digit_concepts(b, per_digit=1, positions=1, seed=0, numerals=True)
    sizes = {(m["word"].isdigit(), m["size"]) for m in c.word_meta}
    assert sizes == {(True, s) for s in style.numeral_sizes} | {(False, s) for s in style.word_sizes}
    assert [c.forms[int(lab)][0 if not m["word"].isdigit() else 1] for lab, m in zip(c.word_labels, c.word_meta,
                                                                                         strict=True)] == [
        m["word"] for m in c.word_meta]  # fmt: skip

    x, names = digit_dataset(b, per_digit=1, seed=1)
    test = mnist.test_images.double().numpy() / 255
    for i in range(10):
        inner = x[i, 0, 2:30, 2:30].double().numpy()
        j = np.nonzero(np.abs(test - inner).reshape(len(test), -1).max(1) < 1e-6)[0]
        assert len(j) >= 1
        assert names[i] == f"handwritten {DIGIT_WORDS[int(mnist.test_labels[j[0]])]}"


def test_evaluate_small_scores_each_image_set_against_its_named_prompts(mnist_root):
    """Truth: zero-shot predictions worked in numpy from the model's own towers (cosine of the image embedding of
    (unit − 0.5)/0.5 with each prompt's text embedding, argmax), for the image set and the prompt template each row
    names, scored by sklearn's accuracy_score and confusion_matrix. A random small model, so the templates
    predict differently."""
    from sklearn.metrics import accuracy_score, confusion_matrix

    from mechscope.clip.data.digits import DIGIT_WORDS
    from mechscope.clip.data.probes import digit_pictures_for, text_style
    from mechscope.clip.data.render import word_images
    from mechscope.clip.methods.evaluate import evaluate_small
    from mechscope.clip.models.clip import CLIP
    from mechscope.clip.models.loading import ClipBundle
    from mechscope.clip.models.preprocess import Preprocessor
    from mechscope.clip.models.tokenizer import CHARS, ClipTokenizer, char_ids, char_tokenizer
    from mechscope.clip.training import SmallSettings

    model = CLIP(SmallSettings(d_model=32, d_mlp=64, text_d_model=32, embed_dim=16).model_config())
    model.init_weights(torch.Generator().manual_seed(2))
    ids = char_ids(CHARS)
    tok = ClipTokenizer(char_tokenizer(CHARS), 32, ids["bos"], ids["eos"], ids["eos"])
    b = small_bundle()
    bundle = ClipBundle(model.eval(), tok, Preprocessor(32, 1, mean=(0.5,), std=(0.5,)), "small", small=b.small)
    rows = evaluate_small(bundle, per_digit=2, seed=0, data_dir=mnist_root)

    style = text_style(bundle)
    pics, pl = digit_pictures_for(bundle, 2, 0, mnist_root)
    words, wm = word_images(list(DIGIT_WORDS), 32, 1, style.fonts, style.word_sizes, 3, 0, style.fg, style.bg)
    nums, nm = word_images([str(i) for i in range(10)], 32, 1, style.fonts, style.numeral_sizes, 3, 0, 1.0, 0.0)
    sets = {
        "MNIST": (pics, pl.numpy()),
        "digit words": (words, np.array([DIGIT_WORDS.index(m["word"]) for m in wm])),
        "numerals": (nums, np.array([int(m["word"]) for m in nm])),
    }
    with torch.no_grad():
        emb = {k: model.encode_image((x - 0.5) / 0.5).double().numpy() for k, (x, _) in sets.items()}
    unit = lambda e: e / np.linalg.norm(e, axis=1, keepdims=True)  # noqa: E731

    def by_hand(key, template):
        text = bundle.text_embeds([template.format(w) for w in DIGIT_WORDS]).double().numpy()
        return (unit(emb[key]) @ unit(text).T).argmax(1)

    for r in rows:
        key = next(k for k in sets if r.images.startswith(k))
        labels, pred = sets[key][1], by_hand(key, r.prompts)
        assert r.n == len(labels)
        assert r.accuracy == pytest.approx(accuracy_score(labels, pred), abs=1e-6), (r.images, r.prompts)
        assert np.array_equal(np.array(r.confusion), confusion_matrix(labels, pred, labels=range(10)))
    # the case: on each image set every template predicts differently, so a row scored against another shows
    for key in sets:
        preds = [tuple(by_hand(key, t)) for t in ("a handwritten {}", "the word {}", "the number {}", "{}")]
        assert len(set(preds)) == 4, key
