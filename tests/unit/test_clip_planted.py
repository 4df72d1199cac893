"""Known answers on a hand-built image–text model: a planted multimodal neuron is found with the score worked out
from the pixels alone, its contribution aligns with its concept's text, and ablating the neuron that carries a
planted typographic attack undoes it exactly.

The model (no normalisation, ReLU MLPs, so every number can be worked by hand): 8×8 grey images in four 4×4
patches, tokens [class, top-left, top-right, bottom-left, bottom-right]. The residual stream holds the patch's ink
(channel 0) and a one-hot of the token (1..5). Layer 0's four neurons each fire with the ink of given patches:
0.0 top-left or bottom-right (the planted multimodal neuron: concept A's pictures live top-left, its written name
bottom-right), 0.1 top-left only, 0.2 top-right only (concept B's pictures), 0.3 bottom-left only (B's name).
Layer 1's attention copies the mean of every token's neuron outputs into the class token; the projection reads
0.0 (twice) and 0.1 as class A's direction, 0.2 and 0.3 as class B's. The text tower maps the prompt "a" to A's
direction and "b" to B's.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mechscope.clip.models.clip import CLIP, CLIPConfig, TextConfig, VisionConfig
from mechscope.clip.models.loading import ClipBundle
from mechscope.clip.models.preprocess import Preprocessor
from mechscope.clip.models.tokenizer import CHARS, ClipTokenizer, char_ids, char_tokenizer
from mechscope.clip.models.views import ImageModel

PATCHES = {"TL": (0, 0), "TR": (0, 4), "BL": (4, 0), "BR": (4, 4)}
POS = {"TL": 1, "TR": 2, "BL": 3, "BR": 4}


pytestmark = pytest.mark.usefixtures("one_thread")  # small models: one torch thread


def planted_bundle() -> ClipBundle:
    ids = char_ids(CHARS)
    vision = VisionConfig(14, 2, 1, 4, 8, 4, n_channels=1, act="relu", pre_norm=False, proj_dim=3, norm="none")
    text = TextConfig(
        4,
        1,
        1,
        4,
        ids["vocab"],
        8,
        act="relu",
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"],
        pad_token_id=ids["eos"],
        proj_dim=3,
        norm="none",
    )
    model = CLIP(CLIPConfig(vision, text, family="planted"))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        v = model.vision
        v.patch_embed.weight[0] = 1.0  # channel 0: the patch's ink
        for p in range(5):
            v.W_pos[p, 1 + p] = 1.0  # channels 1..5: which token
        mlp = v.blocks[0].mlp
        for unit, patches in enumerate((("TL", "BR"), ("TL",), ("TR",), ("BL",))):
            mlp.up.weight[unit, 0] = 1.0
            for name in patches:
                mlp.up.weight[unit, 1 + POS[name]] = 100.0
            mlp.up.bias[unit] = -100.0  # fires with the ink of its patches only
            mlp.down.weight[6 + unit, unit] = 1.0
        attn = v.blocks[1].attn  # q = k = 0: every token attends to all five equally
        for unit in range(4):
            attn.v.weight[6 + unit, 6 + unit] = 1.0
            attn.o.weight[10 + unit, 6 + unit] = 1.0
        v.proj.weight[0, 10], v.proj.weight[0, 11] = 2.0, 1.0  # class A
        v.proj.weight[1, 12], v.proj.weight[1, 13] = 1.0, 1.0  # class B
        v.proj.weight[2, 1] = 0.1  # the class token's own channel: a small constant
        t = model.text
        vocab = {c: i for i, c in enumerate(CHARS)}
        t.W_E[vocab["a"], 0], t.W_E[vocab["b"], 1], t.W_E[vocab["c"], 2] = 3.0, 3.0, 3.0
        ta = t.blocks[0].attn
        ta.v.weight.copy_(torch.eye(4))
        ta.o.weight.copy_(torch.eye(4))
        t.proj.weight.copy_(torch.eye(3, 4))
        model.logit_scale.fill_(0.0)
    tok = ClipTokenizer(char_tokenizer(CHARS), 8, ids["bos"], ids["eos"], ids["eos"])
    pre = Preprocessor(8, 1, None, None, "bilinear", None, 1 / 255, (0.0,), (1.0,))
    return ClipBundle(model.eval(), tok, pre, "planted")


def images_with_ink(where: str, n: int, seed: int, low=0.2, high=1.0, fill=0.5) -> torch.Tensor:
    g = np.random.default_rng(seed)
    out = np.zeros((n, 1, 8, 8), np.float32)
    r, c = PATCHES[where]
    out[:, 0, r : r + 4, c : c + 4] = g.uniform(low, high, (n, 4, 4)) * (g.random((n, 4, 4)) < fill)
    return torch.from_numpy(out)


def test_the_text_tower_reads_prompts_as_planted():
    b = planted_bundle()
    e = b.text_embeds(["a", "b", "c"])
    assert torch.allclose(e, torch.eye(3), atol=1e-6)


def test_planted_multimodal_neuron_is_found_with_the_expected_score():
    from mechscope.clip.methods.neurons import activations, multimodality

    b = planted_bundle()
    view = ImageModel(b.model, b.preprocess)
    pics = torch.cat([images_with_ink("TL", 40, 0), images_with_ink("TR", 40, 1)])
    words = torch.cat([images_with_ink("BR", 30, 2), images_with_ink("BL", 30, 3)])
    pl, wl = torch.tensor([0] * 40 + [1] * 40), torch.tensor([0] * 30 + [1] * 30)
    pa, wa = activations(view, pics, [0, 1]), activations(view, words, [0, 1])
    mm = multimodality(pa, pl, wa, wl, ["A", "B"], [["a"], ["b"]], [0, 1], 4, n_controls=8, seed=0)
    a, bb = mm.concepts

    # worked from the pixels alone: neuron 0.0's response is (ink top-left + ink bottom-right) / 5 tokens
    def d(values, labels):
        values = np.asarray(values, dtype=np.float64)
        return (values[labels == 0].mean() - values[labels != 0].mean()) / values.std()

    ink = lambda x, w: x[:, 0, PATCHES[w][0] : PATCHES[w][0] + 4, PATCHES[w][1] : PATCHES[w][1] + 4].sum((1, 2))  # noqa: E731
    expected = min(
        d((ink(pics, "TL") + ink(pics, "BR")) / 5, pl.numpy()), d((ink(words, "TL") + ink(words, "BR")) / 5, wl.numpy())
    )
    assert a.neuron == "0.0" and a.multimodal
    assert a.score == pytest.approx(expected, abs=1e-5)
    assert a.null_max <= 1e-9 < a.score  # A's pictures with B's name: no neuron does both
    assert a.control_mean < a.score
    assert not bb.multimodal and bb.score == pytest.approx(0.0, abs=1e-9)  # B's pictures and name: two neurons
    assert mm.n_multimodal == 1
    # the picture-only neuron 0.1 separates A's pictures as well but scores 0: it ignores the name
    col = 1
    assert float(mm.picture_d[0, col]) > 1.0 and float(mm.scores[0, col]) == pytest.approx(0.0, abs=1e-9)


def test_planted_neuron_contribution_aligns_with_its_concept_text():
    from mechscope.clip.methods.neurons import text_alignment

    b = planted_bundle()
    view = ImageModel(b.model, b.preprocess)
    align = text_alignment(view, images_with_ink("TL", 10, 5), 0, 0, b.text_embeds(["a", "b", "c"]))
    # the unit-norm embedding moves towards "a" when the neuron fires, away from the constant "c" direction it
    # dilutes, and not at all along "b"
    assert int(align.argmax()) == 0 and float(align[0]) > 0 and float(align[2]) < 0
    assert float(align[1]) == pytest.approx(0.0, abs=1e-7)


def test_ablating_the_planted_neuron_undoes_the_planted_attack():
    from mechscope.clip.data.render import Placement
    from mechscope.clip.methods.attack import attack_images, typographic_attack
    from mechscope.clip.methods.evaluate import zero_shot, zero_shot_model

    b = planted_bundle()
    zs = zero_shot_model(b, ["a", "b"])
    clean = images_with_ink("TR", 40, 7, low=0.1, high=0.3, fill=0.6)  # class B pictures, faint
    true = torch.ones(40, dtype=torch.long)
    assert (zero_shot(zs, clean).argmax(1) == 1).all()
    attacked = attack_images(clean, "a", "sans-bold", 8, Placement(0.75, 0.75))
    changed = (attacked - clean).abs().sum(1)[:, :4, :].sum() + (attacked - clean).abs().sum(1)[:, :, :4].sum()
    assert float(changed) == 0.0  # the word lands in the bottom-right patch only
    f = typographic_attack(
        zs,
        clean,
        true,
        0,
        "a",
        [0, 1],
        k=1,
        candidates=8,
        font="sans-bold",
        size=8,
        where=Placement(0.75, 0.75),
        controls=5,
        seed=0,
        given=((0, 0),),
    )
    s = f.summary
    assert s.success_rate == 1.0 and s.heldout_success == 1.0
    assert f.neurons[0].neuron == "0.0"  # the neuron that carries it, found among all eight
    assert s.heldout_success_ablated == 0.0
    assert s.undone == pytest.approx(1.0, abs=1e-5)  # the margin back exactly where it was
    assert s.heldout_clean_accuracy_ablated == 1.0
    assert s.heldout_accuracy == 0.0 and s.heldout_accuracy_ablated == 1.0  # back to the true class
    # the same neuron named by the user (``--ablate 0.0``): the same undoing, measured on its own
    assert s.given == ("0.0",) and s.given_success == 0.0 and s.given_accuracy == 1.0
    assert s.given_undone == pytest.approx(1.0, abs=1e-5) and s.given_clean_accuracy == 1.0
    # the control draws from the other neurons (never the found one), none of which carries the attack: each set
    # leaves it whole, and the ± over the sets is the sample sd (ddof 1), as the report says
    assert s.control_successes == (1.0,) * 5 and s.control_success_mean == 1.0
    assert s.control_success_sd == pytest.approx(np.std(s.control_successes, ddof=1))
    # the held-out images are chosen among those classified correctly before the attack: 100% clean by selection
    assert s.heldout_clean_accuracy == 1.0
    # measured on the discovery half: the whole shift of those images, close to the mean shift of all
    assert f.neurons[0].effect == pytest.approx(s.margin_clean - s.margin_attacked, rel=0.05)
    assert all(abs(n.effect) < 0.2 * abs(f.neurons[0].effect) for n in f.neurons[1:])


def test_pixel_attribution_of_the_planted_neuron_is_its_ink():
    from mechscope.clip.methods.neurons import pixel_attribution

    b = planted_bundle()
    view = ImageModel(b.model, b.preprocess)
    x = images_with_ink("TL", 3, 9) + images_with_ink("BL", 3, 10)  # ink where 0.1 reads and where it does not
    attr, delta = pixel_attribution(view, x, 0, 1)
    # neuron 0.1 is (ink of the top-left patch) / 5 tokens, linear in its pixels from the black baseline: integrated
    # gradients gives each top-left pixel its ink / 5 and every other pixel nothing
    expected = torch.zeros(3, 8, 8)
    expected[:, :4, :4] = x[:, 0, :4, :4] / 5
    assert torch.allclose(attr, expected, atol=1e-5)
    assert float(delta.abs().max()) < 1e-5
