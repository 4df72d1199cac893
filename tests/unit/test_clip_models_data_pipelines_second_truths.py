"""Second pass over the image–text wing's preprocessing, tokenizers, probe data and pair sampler against outside
truths: transformers' SigLIP / CLIP image processors and CLIPTokenizer built offline, the small model's character
vocabulary read back from the ``tokenizers`` backend, numpy block means, and drawn images read back as arrays."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tests.unit.test_clip_methods_truths import fake_mnist
from tests.unit.test_clip_models import clip_bpe_vocab

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")


def _smooth_image(seed: int = 4):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((13, 17, 3)) * 255).astype(np.uint8)).resize((61, 47), Image.BILINEAR)


# ---- preprocessing ------------------------------------------------------------------------------------------


def test_siglip_defaults_and_a_plain_number_size_are_transformers_siglip_processor():
    """Truth: transformers' get_size_dict for a square-default processor (a number 30 is a 30×30 resize, no aspect
    kept) and its SiglipImageProcessorPil at that size (no crop, mean and std 0.5): its pixel values on the same
    picture within ~2 levels (torch's antialias is not PIL's to the last level)."""
    from transformers.image_processing_utils import get_size_dict

    from mechscope.clip.models.preprocess import Preprocessor

    size = get_size_dict(30, default_to_square=True)
    proc = transformers.SiglipImageProcessorPil(size=size)
    pre = Preprocessor.from_config({"size": 30}, 30, 3, "siglip")
    assert pre.resize_hw == (size["height"], size["width"]) and pre.shortest_edge is None
    assert pre.crop_hw is None
    assert pre.std == pytest.approx(tuple(proc.image_std)) and pre.mean == pytest.approx(tuple(proc.image_mean))
    image = _smooth_image()
    expected = np.asarray(proc(images=[image], return_tensors="np").pixel_values)
    for ours in (pre([image]).numpy(), Preprocessor.from_config({}, 30, 3, "siglip")([image]).numpy()):
        assert ours.shape == expected.shape == (1, 3, 30, 30)
        diff = np.abs(ours - expected)
        assert diff.mean() < 0.03 and diff.max() < 0.5, (diff.mean(), diff.max())


def test_without_rescaling_the_raw_levels_are_normalised_as_transformers():
    """Truth: transformers' CLIPImageProcessorPil with do_rescale off (and no resize): the 0..255 levels
    themselves, centre-cropped and normalised; no interpolation, so equal to float precision."""
    from PIL import Image

    from mechscope.clip.models.preprocess import Preprocessor

    a = (np.random.default_rng(5).random((32, 33, 3)) * 255).astype(np.uint8)
    cfg = {"do_resize": False, "crop_size": {"height": 30, "width": 30}, "do_rescale": False}
    proc = transformers.CLIPImageProcessorPil(**cfg)
    expected = np.asarray(proc(images=[Image.fromarray(a)], return_tensors="np").pixel_values)
    ours = Preprocessor.from_config(cfg, 30, 3, "clip")([Image.fromarray(a)]).numpy()
    assert np.abs(ours - expected).max() < 1e-3 * np.abs(expected).max()
    assert expected.max() > 100  # raw levels, not unit pixels


def test_a_two_channel_tensor_is_averaged_for_a_grey_model_and_grey_repeated_for_rgb():
    """Truth: numpy's mean over the channels of a 2-channel picture (the documented reading of any channel count
    but RGB), and a grey picture's one channel copied into each of three."""
    from mechscope.clip.models.preprocess import Preprocessor

    x = torch.from_numpy(np.random.default_rng(6).integers(0, 256, (1, 2, 30, 30)).astype(np.float32))
    grey = Preprocessor(30, 1, mean=(0.0,), std=(1.0,)).to_unit(x)[0, 0].numpy()
    assert np.allclose(grey, x[0].numpy().mean(0) / 255.0, atol=1e-6)
    rgb = Preprocessor(30, 3).to_unit(x[:, :1])[0].numpy()
    assert all(np.allclose(rgb[c], x[0, 0].numpy() / 255.0, atol=1e-6) for c in range(3))


# ---- tokenizers ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """The tiny CLIP vocabulary as vocab.json + merges.txt, and transformers' CLIPTokenizer on the same."""
    vocab, merges = clip_bpe_vocab()
    d = tmp_path_factory.mktemp("bpe")
    (d / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return d, transformers.CLIPTokenizer(vocab=vocab, merges=[tuple(m.split()) for m in merges])


TEXTS = ["photo", "the cat of", "a cat"]


def test_old_placeholder_ids_are_replaced_by_the_vocabularys_and_pad_with_the_end_token(bpe):
    """Truth: transformers' CLIPTokenizer's own bos / eos / pad ids and its right-padded batch (padding=True)."""
    from mechscope.clip.models.tokenizer import from_dir, own_special_tokens

    d, hf = bpe
    tok = own_special_tokens(from_dir(d, 16, 0, 2, 1), "here")
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id)
    assert tok.batch(TEXTS).tolist() == hf(TEXTS, padding=True)["input_ids"]


def test_a_config_without_a_pad_id_pads_with_the_end_token(bpe):
    """Truth: transformers' CLIPTokenizer pads with <|endoftext|> (its pad token) where nothing else is said."""
    from mechscope.clip.models.tokenizer import from_dir

    d, hf = bpe
    tok = from_dir(d, 16, hf.bos_token_id, hf.eos_token_id, None)
    assert tok.batch(TEXTS).tolist() == hf(TEXTS, padding=True)["input_ids"]


def test_decoding_gives_back_the_text_as_transformers(bpe, tmp_path):
    """Truth: transformers' CLIPTokenizer.decode(ids, skip_special_tokens=True) of the same ids, padding included:
    'the cat of', from vocab.json + merges.txt and from the tokenizer.json transformers saves (whose decoder alone
    keeps the </w> word ends: transformers reads them as spaces in Python)."""
    from mechscope.clip.models.tokenizer import from_dir

    d, hf = bpe
    hf.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    for where in (d, tmp_path):
        tok = from_dir(where, 16, hf.bos_token_id, hf.eos_token_id, hf.pad_token_id)
        ids = tok.batch(["the cat of", "a cat"])[1].tolist()  # "a cat" padded to the longer text
        assert ids[-1] == hf.pad_token_id
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True) == "a cat"
        ids = tok.encode("the cat of")
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True) == "the cat of"


def test_the_small_models_ids_are_its_characters_positions_then_its_specials():
    """Truth: a plain loop over CHARS (a character's id is its position) and the backend's own vocabulary for the
    special tokens: "Three 3" reads as <|startoftext|> t h r e e ␣ 3 <|endoftext|>, lowercased."""
    from mechscope.clip.models.tokenizer import BOS, CHARS, EOS, ClipTokenizer, char_ids, char_tokenizer

    backend = char_tokenizer(CHARS)
    ids = char_ids(CHARS)
    assert ids["bos"] == backend.token_to_id(BOS) and ids["eos"] == backend.token_to_id(EOS)
    assert ids["unk"] == backend.token_to_id("<unk>") and ids["vocab"] == backend.get_vocab_size()
    tok = ClipTokenizer(backend, 32, ids["bos"], ids["eos"], ids["eos"])
    by_hand = [CHARS.index(c) for c in "three 3"]
    assert tok.encode("Three 3") == [backend.token_to_id(BOS), *by_hand, backend.token_to_id(EOS)]


# ---- drawn words --------------------------------------------------------------------------------------------


def _ink_box(a: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.nonzero(a.max(1) > 0)[0], np.nonzero(a.max(0) > 0)[0]
    return int(rows[0]), int(cols[0]), int(rows[-1]), int(cols[-1])


def test_the_first_place_of_a_word_is_the_centre_and_the_others_stay_in_the_middle_half():
    """Truth: the ink read back: the first image's ink box is centred within a pixel; 19 other places are all
    inside [0.25, 0.75] of the image and spread over most of it (seeded)."""
    from mechscope.clip.data.render import word_images

    x, meta = word_images(["one"], 40, 1, ("sans",), (9,), positions=20, seed=3)
    assert (meta[0]["x"], meta[0]["y"]) == (0.5, 0.5)
    top, left, bottom, right = _ink_box(x[0, 0].numpy())
    assert abs((top + bottom + 1) / 2 - 20) <= 1 and abs((left + right + 1) / 2 - 20) <= 1
    xs = np.array([[m["x"], m["y"]] for m in meta[1:]])
    assert xs.min() >= 0.25 and xs.max() <= 0.75
    assert xs.min() < 0.3 and xs.max() > 0.7


def test_a_colour_for_a_grey_image_is_the_mean_of_its_values():
    """Truth: numpy's mean of an RGB colour for a one-channel image: text (0.9, 0.3, 0.0) draws 0.4 at full ink,
    background (0.1, 0.2, 0.6) is 0.3."""
    from mechscope.clip.data.render import render_word

    x = render_word("one", 32, 1, "sans", 14, fg=(0.9, 0.3, 0.0), bg=(0.1, 0.2, 0.6))[0].numpy()
    assert x[0, 0] == pytest.approx(0.3) and x.max() == pytest.approx(0.4)


def test_coverage_keeps_the_margin_empty_on_every_side():
    """Truth: the ink read back: with the default 1-pixel margin in a 19-pixel square no ink lies in the outer rows
    or columns (an 18-pixel-wide "eight" at 14 px would touch one), while the word shrunk to fit still spans most
    of the 17 columns left."""
    from mechscope.clip.data.render import coverage

    a = coverage("eight", 19, "sans", 14).numpy()
    top, left, bottom, right = _ink_box(a)
    assert top >= 1 and left >= 1 and bottom <= 17 and right <= 17
    assert right - left + 1 >= 12


# ---- MNIST pictures and pairs -------------------------------------------------------------------------------


def test_each_picture_is_an_mnist_image_of_its_own_label_centred():
    """Truth: each 32-px picture's centre 28×28 is, pixel for pixel, one of the source images whose label is the
    returned label (distinct random images, read back), with ``per_digit`` of each digit."""
    from mechscope.clip.data.digits import digit_pictures

    images, labels = fake_mnist(60, seed=2)
    x, y = digit_pictures(images, labels, 32, 3, seed=1)
    assert np.bincount(y.numpy(), minlength=10).tolist() == [3] * 10
    src = images.float().numpy() / 255.0
    for pic, lab in zip(x[:, 0].numpy(), y.tolist(), strict=True):
        assert not pic[:2].any() and not pic[30:].any() and not pic[:, :2].any() and not pic[:, 30:].any()
        match = [j for j in range(len(src)) if np.array_equal(pic[2:30, 2:30], src[j])]
        assert len(match) == 1 and int(labels[match[0]]) == lab


def _scenes(label: int, n: int, blank: bool = False):
    from mechscope.clip.data.digits import PairSampler

    images, _ = fake_mnist(20, seed=1)
    if blank:
        images = torch.zeros_like(images)
    sampler = PairSampler(images, torch.full((20,), label), 32, seed=5, mix=(0, 0, 0, 1), fonts=("sans",))
    return sampler.batch(n)


@pytest.mark.parametrize("under", [0, 5, 7])
def test_a_scene_writes_another_digits_name_never_the_held_out_pair(under):
    """Truth: the module's specification counted: over 300 scenes on digits all labelled ``under`` the written
    digit is never ``under`` (nor 3 on a 7, the held-out pair), and every other digit occurs."""
    _, cap, kinds, digits = _scenes(under, 300)
    seen = set(digits.tolist())
    banned = {under} | ({3} if under == 7 else set())
    assert seen == set(range(10)) - banned
    assert set(kinds.tolist()) == {3}


def test_a_scenes_word_is_centred_within_a_fifth_of_the_middle():
    """Truth: the ink read back on blank digits (the word alone): every word's ink box centre lies within
    0.2 × 32 = 6.4 pixels (plus half a pixel of rounding) of the middle row."""
    x, *_ = _scenes(2, 300, blank=True)
    centres = []
    for img in x[:, 0].numpy():
        top, _, bottom, _ = _ink_box(img)
        centres.append((top + bottom + 1) / 2)
    assert max(abs(c - 16) for c in centres) <= 6.4 + 0.5 + 0.5


# ---- probes -------------------------------------------------------------------------------------------------


def _bundle(size: int, small: dict | None):
    from mechscope.clip.models.preprocess import Preprocessor

    return SimpleNamespace(preprocess=Preprocessor(size, 1, mean=(0.5,), std=(0.5,)), small=small)


def test_the_small_models_words_use_its_recorded_fonts_and_numerals_the_numeral_sizes(monkeypatch):
    """Truth: the model's own record (held-out fonts ["serif-italic"], white on black) and the sizes read back
    from every drawn image's record: numerals at 16 and 20 px, words at 9 and 11."""
    from mechscope.clip.data import probes

    monkeypatch.setattr(probes, "mnist_test", lambda data_dir=None: fake_mnist(40))
    b = _bundle(32, {"held_out_fonts": ["serif-italic"], "text": {"fg": 0.75, "bg": 0.25}})
    style = probes.text_style(b)
    assert (style.fg, style.bg, style.fonts) == (0.75, 0.25, ("serif-italic",))
    c = probes.digit_concepts(b, per_digit=2, positions=1, numerals=True)
    sizes = {m["word"]: set() for m in c.word_meta}
    for m in c.word_meta:
        sizes[m["word"]].add(m["size"])
        assert m["font"] == "serif-italic"
    assert sizes["3"] == {16, 20} and sizes["three"] == {9, 11}
    assert [int(v) for v in c.word_labels[c.word_labels == 3]] and len(c.word_labels) == 10 * 2 * 2
    assert c.words[0, 0, 0, 0] == pytest.approx(0.25)


def test_a_general_models_word_sizes_scale_with_its_images():
    """Truth: hand arithmetic for a 224-px model: words at 22% and 30% of the image (49, 67 px), numerals at 50%
    and 65% (112, 146 px); black text on white."""
    from mechscope.clip.data.probes import text_style

    style = text_style(_bundle(224, None))
    assert style.word_sizes == (49, 67) and style.numeral_sizes == (112, 146)
    assert (style.fg, style.bg) == (0.0, 1.0)


def _area(a: np.ndarray, n: int) -> np.ndarray:
    """Area averaging written as loops: output cell i covers input rows floor(i·28/n) .. ceil((i+1)·28/n)."""
    m = a.shape[0]
    out = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            r0, r1 = (i * m) // n, -(-((i + 1) * m) // n)
            c0, c1 = (j * m) // n, -(-((j + 1) * m) // n)
            out[i, j] = a[r0:r1, c0:c1].mean()
    return out


def test_a_small_canvas_takes_the_area_mean_of_the_centred_digit(monkeypatch):
    """Truth: area averaging by plain loops (adaptive pooling bins) of each 28-px MNIST digit for a 10-px model."""
    from mechscope.clip.data import probes

    images, labels = fake_mnist(30, seed=3)
    monkeypatch.setattr(probes, "mnist_test", lambda data_dir=None: (images, labels))
    x, y = probes.digit_pictures_for(_bundle(10, None), per_digit=2, seed=0)
    assert x.shape == (20, 1, 10, 10)
    src = images.float().numpy() / 255.0
    for pic, lab in zip(x[:, 0].numpy(), y.tolist(), strict=True):
        blocks = [_area(src[j], 10) for j in range(30) if int(labels[j]) == lab]
        assert any(np.allclose(pic, b, atol=1e-5) for b in blocks)


def test_dataset_names_say_each_handwritten_digits_own_label(monkeypatch):
    """Truth: the label of each picture read back by matching its pixels to the source images."""
    from mechscope.clip.data import probes
    from mechscope.clip.data.digits import DIGIT_WORDS

    images, labels = fake_mnist(30, seed=4)
    monkeypatch.setattr(probes, "mnist_test", lambda data_dir=None: (images, labels))
    x, names = probes.digit_dataset(_bundle(32, {"text": {}}), per_digit=1, seed=2)
    src = images.float().numpy() / 255.0
    for pic, name in zip(x[:10, 0].numpy(), names[:10], strict=True):
        j = next(j for j in range(30) if np.array_equal(pic[2:30, 2:30], src[j]))
        assert name == f"handwritten {DIGIT_WORDS[int(labels[j])]}"


# ---- the pipelines' steps -----------------------------------------------------------------------------------


def test_with_no_multimodal_concept_the_best_scoring_one_is_still_read(tiny_clip, mnist_root, monkeypatch):
    """Truth: numpy's argmax of the concepts' own scores (none reaches --min-score 100) names the one neuron read;
    a model's record of captions gives the text-alignment templates, in the record's order; the probe draws the
    numeral at the small style's numeral sizes (16, 20) and the words at its word sizes (9, 11)."""
    from mechscope.clip.data import render
    from mechscope.clip.models.loading import load_clip
    from mechscope.clip.pipelines.neurons import NeuronSettings, read_model

    drawn, real = [], render.word_images

    def spy(words, *args, **kw):
        drawn.append((tuple(words), tuple(args[3])))
        return real(words, *args, **kw)

    monkeypatch.setattr(render, "word_images", spy)

    bundle = load_clip(tiny_clip, device="cpu", dtype="float32")
    captions = {"word": "the word {}", "hand": "a handwritten {}"}
    bundle.small = {"captions": captions, "held_out_fonts": ["sans"], "text": {"fg": 1.0, "bg": 0.0}}
    s = NeuronSettings(read=1, per_digit=2, positions=1, controls=3, k=2, steps=1, diverse=0, min_score=100.0,
                       words=("three", "3", "cat"))  # fmt: skip
    r = read_model(bundle, s, data_dir=mnist_root)
    concepts = r.multimodality.concepts
    assert not any(c.multimodal for c in concepts)
    best = concepts[int(np.argmax([c.score for c in concepts]))]
    assert [x.neuron for x in r.readings] == [f"{best.layer}.{best.unit}"]
    assert tuple(r.templates) == ("the word {}", "a handwritten {}")
    assert drawn[-2:] == [(("three", "cat"), (9, 11)), (("3",), (16, 20))]


class _Stop(Exception):
    pass


def test_the_attack_takes_n_images_of_the_true_class(tiny_clip, monkeypatch):
    """Truth: the count asked for (--n 4) and the class index of "seven" among the ten digit words, read from what
    reaches the attack (fake MNIST with 10 sevens of 100)."""
    from mechscope.clip.data import probes
    from mechscope.clip.methods import attack as A
    from mechscope.clip.models.loading import load_clip
    from mechscope.clip.pipelines.attack import AttackSettings, attack_model

    seen = {}

    def stub(zs, unit, true, *args, **kw):
        seen.update(unit=unit, true=true)
        raise _Stop

    monkeypatch.setattr(probes, "mnist_test", lambda data_dir=None: fake_mnist(100))
    monkeypatch.setattr(A, "typographic_attack", stub)
    with pytest.raises(_Stop):
        attack_model(load_clip(tiny_clip, device="cpu", dtype="float32"), AttackSettings(n=4, k=1, candidates=1))
    assert len(seen["unit"]) == 4 and seen["true"].tolist() == [7] * 4


# ---- figures ------------------------------------------------------------------------------------------------


@pytest.fixture
def figures(monkeypatch):
    """The clip figures module returning the Figure itself (to read its artists) and the array an image URI gets."""
    from mechscope.clip.report import figures as F

    monkeypatch.setattr(F, "figure_data_uri", lambda fig: fig)
    monkeypatch.setattr(F, "array_uri", lambda a, scale: np.asarray(a))
    return F


def _reading(k: int = 2):
    g = np.random.default_rng(7)
    return SimpleNamespace(
        featvis=g.random((3, 4, 6)), featvis_response=1.5, top_pixels=g.random((k, 3, 4, 6)),
        top_attribution=g.normal(size=(k, 4, 6)), top_images=("a", "b")[:k],
        top_values=(2.0, 1.0)[:k], top_patches=(None, (0, 2, 2, 4))[:k],
        diverse=g.random((3, 3, 4, 6)), diverse_responses=(0.25, 0.5, 0.75),
    )  # fmt: skip


def test_an_rgb_image_is_shown_and_encoded_height_by_width_by_channel(figures):
    """Truth: numpy's transpose of a [3, 4, 6] picture to [4, 6, 3], read back from the axes' image and from the
    array handed to the PNG encoder."""
    r = _reading()
    fig = figures.reading_figure(r)
    assert np.array_equal(np.asarray(fig.axes[0].images[0].get_array()), r.featvis.transpose(1, 2, 0))
    assert np.array_equal(np.asarray(fig.axes[1].images[0].get_array()), r.top_pixels[0].transpose(1, 2, 0))
    assert np.array_equal(figures.image_uri(r.featvis), r.featvis.transpose(1, 2, 0))


def test_attribution_maps_are_shaded_symmetrically_about_zero(figures):
    """Truth: numpy's largest absolute attribution m of each top image: its colour limits are (−m, m), its array
    the attribution itself."""
    r = _reading()
    fig = figures.reading_figure(r)
    row2 = [ax for ax in fig.axes if ax.images and ax.images[0].get_cmap().name == "bwr"]
    assert len(row2) == 2
    for ax, a in zip(row2, r.top_attribution, strict=True):
        m = float(np.abs(a).max())
        assert ax.images[0].get_clim() == pytest.approx((-m, m))
        assert np.array_equal(np.asarray(ax.images[0].get_array()), a)


def test_each_diverse_image_is_titled_with_its_own_response(figures):
    """Truth: the responses 0.25, 0.5, 0.75 written by hand as the titles, one per image in order."""
    fig = figures.diverse_figure(_reading())
    assert [ax.get_title() for ax in fig.axes] == ["diverse 1\n0.25", "diverse 2\n0.50", "diverse 3\n0.75"]
