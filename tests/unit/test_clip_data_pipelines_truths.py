"""The small CLIP's pair sampler, its drawing helpers and the ``clip`` pipelines, against outside truths: binomial
shares of seeded draws, the fonts' own glyph masks, each mask's box by hand, recorders showing each pipeline argument
arriving at its own parameter (JSON read back with ``json``), and a numpy softmax for ``clip inspect``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mechscope.core.errors import MechscopeError
from tests.e2e.test_cli_options_truths import Called, record
from tests.unit.test_clip_methods_truths import fake_mnist
from tests.unit.test_clip_training_truths import np_log_softmax

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- the pair sampler ---------------------------------------------------------------------------------------


def within_binomial(count: int, n: int, p: float) -> bool:
    return abs(count - n * p) <= 5 * math.sqrt(n * p * (1 - p)) + 1


@pytest.mark.parametrize("mix,want", [((0.4, 0.3, 0.2, 0.1), (0.4, 0.3, 0.2, 0.1)),
                                      ((5.0, 3.0, 2.0), (0.5, 0.3, 0.2, 0.0))])  # fmt: skip
def test_family_and_bare_shares_follow_the_mix_within_binomial_tolerance(mix, want):
    """Truth: the ``mix`` weights normalised (a missing scene weight is 0) and ``bare``: over 2000 seeded draws each
    count lies within 5 binomial standard deviations of n·p (the four shares all different)."""
    from mechscope.clip.data.digits import PairSampler

    images, labels = fake_mnist(50)
    sampler = PairSampler(images, labels, 32, seed=11, mix=mix, fonts=("sans",), bare=0.3)
    _, cap, kinds, _ = sampler.batch(2000)
    counts = np.bincount(kinds.numpy(), minlength=4)
    for c, p in zip(counts, want, strict=True):
        assert (c == 0) if p == 0 else within_binomial(int(c), 2000, p), (counts, want)
    assert within_binomial(int((cap >= 30).sum()), 2000, 0.3)


def test_word_and_numeral_pictures_are_training_font_glyphs_at_their_sizes():
    """Truth: the fonts' own glyph masks (fitted to 30 px): every drawn word or numeral cropped to its ink is one
    training-font mask of its text at a word or numeral size, all six training fonts are drawn, no held-out one."""
    from mechscope.clip.data.digits import DIGIT_WORDS, NUMERAL_SIZES, TRAIN_FONTS, WORD_SIZES, PairSampler
    from mechscope.clip.data.render import fitted_mask

    images, labels = fake_mnist(20)
    sampler = PairSampler(images, labels, 32, seed=8, mix=(0, 1, 1, 0))
    x, _, kinds, digits = sampler.batch(240)
    fonts_seen = set()
    for i in range(240):
        a = x[i, 0].numpy()
        rows, cols = np.nonzero(a.max(1) > 0)[0], np.nonzero(a.max(0) > 0)[0]
        ink = a[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
        d = int(digits[i])
        word, sizes = (DIGIT_WORDS[d], WORD_SIZES) if kinds[i] == 1 else (str(d), NUMERAL_SIZES)
        match = {f for f in TRAIN_FONTS for s in sizes if (m := fitted_mask(word, f, s, 30)).shape == ink.shape
                 and np.allclose(m, ink, atol=1e-6)}  # fmt: skip
        assert match, (i, word)
        fonts_seen |= match
    assert fonts_seen == set(TRAIN_FONTS)


def test_a_handwritten_digit_reaches_every_offset_in_the_canvas():
    """Truth: a 28 px digit in a 32 px canvas can start at rows and columns 0–4; 400 seeded draws reach each."""
    from mechscope.clip.data.digits import PairSampler

    images, labels = fake_mnist(20)  # every pixel ≥ 1: the ink's box is the digit's place
    sampler = PairSampler(images, labels, 32, seed=1, mix=(1, 0, 0, 0), fonts=("sans",))
    x, *_ = sampler.batch(400)
    tops = {int(np.nonzero(a[0].max(1) > 0)[0][0]) for a in x.numpy()}
    lefts = {int(np.nonzero(a[0].max(0) > 0)[0][0]) for a in x.numpy()}
    assert tops == lefts == {0, 1, 2, 3, 4}


def box(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
    return int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])


@pytest.mark.parametrize("x,y", [(0.5, 0.5), (0.57, 0.43), (0.31, 0.69)])
def test_a_placed_mask_is_centred_within_half_a_pixel_and_clipped_at_the_edges(x, y):
    """Truth: geometry: a 5 × 7 mask whose centre is to be at (x·32, y·32) has its centre (top + 5/2, left + 7/2)
    within half a pixel of it; asked for a corner, it sits flush in that corner."""
    from mechscope.clip.data.render import Placement, place

    mask = np.ones((5, 7))
    top, left = place(mask, 32, Placement(x, y))
    assert abs(top + 2.5 - y * 32) <= 0.5 and abs(left + 3.5 - x * 32) <= 0.5
    assert place(mask, 32, Placement(1.0, 1.0)) == (27, 25) and place(mask, 32, Placement(0.0, 0.0)) == (0, 0)


def test_a_label_reaches_pad_pixels_past_the_ink_on_every_side():
    """Truth: the docstring: the label is a box ``pad`` pixels round the ink. On a 0.7 image with a 0.2 label and
    0.9 ink, the changed pixels' box is the ink's box (pixels above 0.2 other than 0.7) widened by 2 each way."""
    from mechscope.clip.data.render import Placement, write_on

    out = write_on(torch.full((1, 32, 32), 0.7), "hi", size=10, where=Placement(0.5, 0.5), fg=0.9, label=0.2, pad=2)
    a = out[0].double().numpy()
    changed = np.abs(a - 0.7) > 1e-6
    ink = changed & (a > 0.2 + 1e-6)
    r0, r1, c0, c1 = box(ink)
    assert box(changed) == (r0 - 2, r1 + 2, c0 - 2, c1 + 2)


# ---- the pipelines: each argument to its own parameter, results under their own name --------------------------

# outer "module:function", the inner step it hands to, the call's own arguments, {inner parameter: value expected}
PIPELINES = {
    "neurons": ("mechscope.clip.pipelines.neurons:neurons", "read_model", {"images": "im", "concepts": "cc",
                "data_dir": "dd"}, "clip-neurons", "mechscope.clip.methods.neurons:NeuronsResult"),
    "attack": ("mechscope.clip.pipelines.attack:attack", "attack_model", {"images": "im", "data_dir": "dd"},
               "clip-attack", "mechscope.clip.methods.attack:AttackResult"),
    "inspect": ("mechscope.clip.pipelines.inspect:inspect", "inspect_bundle", {"images": "im", "prompts": ("p", "q")},
                "clip-inspect", "mechscope.clip.methods.evaluate:InspectResult"),
}  # fmt: skip


def _load(target: str):
    import importlib

    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def _fake_load(monkeypatch) -> list:
    """load_clip replaced by a recorder bound to its own signature."""
    import inspect

    sig, calls = inspect.signature(_load("mechscope.clip.models.loading:load_clip")), []

    def fake(*a, **k):
        calls.append(dict(sig.bind(*a, **k).arguments))
        return "a bundle"

    monkeypatch.setattr("mechscope.clip.models.loading.load_clip", fake)
    return calls


@pytest.mark.parametrize("name", PIPELINES)
def test_each_pipeline_hands_every_argument_to_its_own_parameter(name, monkeypatch, tmp_path):
    """Truth: the inner step's own signature (the recorder binds to it): distinct values arrive by name, the model
    is loaded with the device and dtype asked for, in that order of load_clip's parameters."""
    outer, inner, kw, _, _ = PIPELINES[name]
    loads = _fake_load(monkeypatch)
    seen = record(monkeypatch, f"{outer.split(':')[0]}:{inner}")
    with pytest.raises(Called):
        _load(outer)("m", tmp_path / "o", device="cpu", dtype="float16", **kw)
    assert seen["bundle"] == "a bundle" and {k: seen[k] for k in kw} == kw
    assert loads == [{"path": "m", "device": "cpu", "dtype": "float16"}]


class Stub:
    def __init__(self, n: int):
        self.n = n

    def to_dict(self) -> dict:
        return {"stub": self.n}

    def save_html(self, path: Path) -> None:
        Path(path).write_text(f"<p>{self.n}</p>", encoding="utf-8")


@pytest.mark.parametrize("name", PIPELINES)
def test_results_go_under_the_commands_own_name_and_force_overwrites(name, monkeypatch, tmp_path):
    """Truth: model_out's rule, runs/COMMAND/MODEL, for out=None; the JSON under the result's own FILE name read
    back with ``json``; a second run refused without force (before any work), replacing the first with it."""
    outer, inner, _, command, result = PIPELINES[name]
    _fake_load(monkeypatch)
    n = iter(range(1, 10))
    monkeypatch.setattr(f"{outer.split(':')[0]}.{inner}", lambda *a, **k: Stub(next(n)))
    monkeypatch.chdir(tmp_path)
    out, _ = _load(outer)("m", device="cpu")
    assert out == tmp_path / "runs" / command / "m"
    file = out / _load(result).FILE
    assert json.loads(file.read_text()) == {"stub": 1}
    with pytest.raises(MechscopeError, match="force"):
        _load(outer)("m", device="cpu")
    assert json.loads(file.read_text()) == {"stub": 1}
    _load(outer)("m", device="cpu", force=True)
    assert json.loads(file.read_text()) == {"stub": 2} and (out / "report.html").read_text() == "<p>2</p>"


def fake_mnist_split():
    g = torch.Generator().manual_seed(0)
    return SimpleNamespace(train_images=torch.randint(0, 256, (120, 28, 28), generator=g, dtype=torch.uint8),
                           train_labels=torch.arange(120) % 10, test_images=torch.zeros(30, 28, 28, dtype=torch.uint8),
                           test_labels=torch.zeros(30, dtype=torch.long))  # fmt: skip


def test_clip_train_trains_on_the_training_split_and_evaluates_in_the_data_dir(monkeypatch, tmp_path):
    """Truth: the training split (120 images, distinct from the 30 test ones) reaches train(); the data folder
    asked for reaches both MNIST's loader and the evaluation."""
    from mechscope.clip.models.clip import CLIP
    from mechscope.clip.pipelines.train import train_small
    from mechscope.clip.training import SmallSettings, Trained

    m, dirs = fake_mnist_split(), []
    monkeypatch.setattr("mechscope.cnn.data.mnist.load_mnist", lambda d, **k: dirs.append(d) or m)
    s = SmallSettings(d_model=16, n_heads=2, d_mlp=24, text_d_model=16, embed_dim=8, n_layers=1, text_layers=1)
    seen = record(monkeypatch, "mechscope.clip.pipelines.train:train")
    with pytest.raises(Called):
        train_small(tmp_path / "a", s, data_dir="dd")
    assert seen["images"] is m.train_images and seen["labels"] is m.train_labels and dirs == ["dd"]
    monkeypatch.setattr("mechscope.clip.pipelines.train.train", lambda *a, **k: Trained(CLIP(s.model_config()).eval()))
    seen = record(monkeypatch, "mechscope.clip.pipelines.train:evaluate_small")
    with pytest.raises(Called):
        train_small(tmp_path / "b", s, data_dir="dd")
    assert seen["data_dir"] == "dd" and seen["bundle"].preprocess.image_size == 32


def test_attack_hands_each_setting_to_the_attack(tiny_clip, clip_pictures, monkeypatch):
    """Truth: typographic_attack's signature (the recorder binds to it) and AttackSettings' documentation: the place
    (x, y) in that order, a label in the background colour (a general model writes black, 0, on white, 1), the
    default size ten 32nds of the image (30 px: 9), k and candidates each to its own parameter."""
    from mechscope.clip.data.render import Placement
    from mechscope.clip.models.loading import load_clip
    from mechscope.clip.pipelines.attack import AttackSettings, attack_model

    bundle = load_clip(tiny_clip, device="cpu", dtype="float32")
    s = AttackSettings(word="dog", true="cat", classes=("ant", "cat", "dog"), prompt="a photo of {}", k=3,
                       candidates=9, font="serif", x=0.25, y=0.4, label=True, ablation="zero", controls=7,
                       seed=4)  # fmt: skip
    seen = record(monkeypatch, "mechscope.clip.methods.attack:typographic_attack")
    with pytest.raises(Called):
        attack_model(bundle, s, images=clip_pictures)
    got = {k: seen[k] for k in ("target", "word", "k", "candidates", "font", "size", "where", "fg", "label")}
    assert got == {"target": 2, "word": "dog", "k": 3, "candidates": 9, "font": "serif", "size": 9,
                   "where": Placement(0.25, 0.4), "fg": 0.0, "label": 1.0}  # fmt: skip
    assert (seen["ablation"], seen["controls"], seen["seed"]) == ("zero", 7, 4)
    assert set(seen["true"].tolist()) == {1}


def test_the_small_models_attack_prompts_are_its_handwritten_caption():
    """Truth: AttackSettings.prompt's documentation: without --prompt the small model's "a handwritten {}"."""
    from mechscope.clip.data.digits import CAPTIONS
    from mechscope.clip.pipelines.attack import AttackSettings, class_prompts

    bundle = SimpleNamespace(small={"captions": CAPTIONS})
    _, prompts = class_prompts(AttackSettings(classes=("one", "two")), bundle)
    assert prompts == ["a handwritten one", "a handwritten two"]


def test_inspect_probabilities_are_each_images_softmax_over_the_prompts(tiny_clip, clip_pictures):
    """Truth: CLIP's zero-shot in numpy: exp(logit_scale)·cos(image, prompt), a softmax over the prompts of each
    image (rows sum to 1; three prompts, eight images, so a softmax over the images differs)."""
    from mechscope.clip.data.folder import read_folder
    from mechscope.clip.models.loading import load_clip
    from mechscope.clip.pipelines.inspect import inspect_bundle

    bundle = load_clip(tiny_clip, device="cpu", dtype="float32")
    prompts = ["a photo of a cat", "a photo of a dog", "the cat"]
    r = inspect_bundle(bundle, clip_pictures, prompts)
    pixels, _ = read_folder(clip_pictures, bundle.preprocess)
    with torch.no_grad():  # the bundle's own towers, its preprocessing of the unit pixels included
        img = bundle.image_embeds(pixels).double().numpy()
        txt = bundle.text_embeds(prompts).double().numpy()
    cos = (img / np.linalg.norm(img, axis=1, keepdims=True)) @ (txt / np.linalg.norm(txt, axis=1, keepdims=True)).T
    want = np.exp(np_log_softmax(math.exp(bundle.model.logit_scale.item()) * cos, 1))
    assert np.allclose(np.array(r.probabilities), want, atol=1e-5)
