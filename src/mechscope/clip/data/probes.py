"""The probe sets a neuron is read on: each concept's pictures and its written name, and a dataset of images.

* :class:`Concepts`: per concept, its pictures and drawn images of its name (and other written forms: the digit
  words and their numerals), labelled by concept. The default is the ten digits: MNIST test digits and the digit
  words and numerals, drawn in fonts the small model never saw (``HELD_OUT_FONTS``) for the small model, and in
  DejaVu Sans, Serif and Mono for any other model. A folder of concept folders (:func:`concepts_from_folder`)
  gives the user's own.
* :func:`digit_dataset`: the images whose top activations are shown: MNIST test digits and drawn words.

Text is drawn as the model expects it: white on black for the small model (as MNIST), black on white otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mechscope.clip.data.digits import DIGIT_WORDS, HELD_OUT_FONTS, NUMERALS, digit_pictures
from mechscope.clip.data.render import word_images
from mechscope.core.errors import DataError

GENERAL_FONTS = ("sans", "serif", "mono")


@dataclass
class TextStyle:
    fg: float
    bg: float
    fonts: tuple[str, ...]
    word_sizes: tuple[int, ...]
    numeral_sizes: tuple[int, ...]


def text_style(bundle) -> TextStyle:
    """How words are drawn for this model: the small model's record, else black on white at sizes for its images."""
    s = bundle.preprocess.image_size
    if bundle.small:
        t = bundle.small.get("text", {})
        fonts = tuple(bundle.small.get("held_out_fonts", HELD_OUT_FONTS))
        return TextStyle(float(t.get("fg", 1.0)), float(t.get("bg", 0.0)), fonts, (9, 11), (16, 20))
    return TextStyle(0.0, 1.0, GENERAL_FONTS, (max(4, round(s * 0.22)), max(5, round(s * 0.3))),
                     (max(6, round(s * 0.5)), max(7, round(s * 0.65))))  # fmt: skip


@dataclass
class Concepts:
    names: list[str]  # one per concept
    forms: list[list[str]]  # the written forms of each concept (its name, its numeral)
    pictures: torch.Tensor  # unit pixels [Np,C,S,S]
    picture_labels: torch.Tensor  # [Np] concept index
    words: torch.Tensor  # unit pixels [Nw,C,S,S]
    word_labels: torch.Tensor  # [Nw]
    word_meta: list[dict] = field(default_factory=list)
    source: str = ""


def _words(forms: list[list[str]], bundle, style: TextStyle, positions: int, seed: int):
    images, labels, meta = [], [], []
    s, c = bundle.preprocess.image_size, bundle.preprocess.channels
    for i, fs in enumerate(forms):
        for form in fs:
            sizes = style.numeral_sizes if form.isdigit() else style.word_sizes
            x, m = word_images([form], s, c, style.fonts, sizes, positions, seed + i, style.fg, style.bg)
            images.append(x)
            labels += [i] * len(x)
            meta += m
    return torch.cat(images), torch.tensor(labels), meta


def mnist_test(data_dir=None):
    from mechscope.cnn.data.mnist import load_mnist

    m = load_mnist(data_dir, download_missing=False)
    return m.test_images, m.test_labels


def digit_pictures_for(bundle, per_digit: int, seed: int, data_dir=None) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST test digits as the model sees them: centred in the small model's canvas, else resized to its size."""
    images, labels = mnist_test(data_dir)
    s = bundle.preprocess.image_size
    if bundle.small or s < 28:
        x, y = digit_pictures(images, labels, max(s, 28), per_digit, seed)
        if s < 28:
            x = torch.nn.functional.interpolate(x, size=(s, s), mode="area")
        return x.expand(-1, bundle.preprocess.channels, -1, -1).contiguous(), y
    x, y = digit_pictures(images, labels, 28, per_digit, seed)
    return bundle.preprocess.to_unit(x * 255.0), y


def digit_concepts(bundle, per_digit: int = 50, positions: int = 2, seed: int = 0, data_dir=None,
                   numerals: bool = False) -> Concepts:  # fmt: skip
    """The ten digits: MNIST test pictures, and each digit's word (and, with ``numerals``, its printed numeral: a
    printed 3 looks like a handwritten one, so it is not a written *name*) drawn in several fonts and sizes."""
    pics, labels = digit_pictures_for(bundle, per_digit, seed, data_dir)
    style = text_style(bundle)
    forms = [[w, n] if numerals else [w] for w, n in zip(DIGIT_WORDS, NUMERALS, strict=True)]
    words, wl, meta = _words(forms, bundle, style, positions, seed)
    what = "words and numerals" if numerals else "words"
    return Concepts(
        list(DIGIT_WORDS),
        forms,
        pics,
        labels,
        words,
        wl,
        meta,
        f"MNIST test digits ({per_digit} per digit); digit {what} in {', '.join(style.fonts)}",
    )


def concepts_from_folder(folder, bundle, positions: int = 2, seed: int = 0) -> Concepts:
    """The user's concepts: one folder of pictures per concept, the folder's name drawn as its written form."""
    from mechscope.clip.data.folder import read_concepts
    from mechscope.clip.data.render import check_word

    found = read_concepts(folder, bundle.preprocess)
    style = text_style(bundle)
    names = list(found)
    for n in names:
        try:
            check_word(n, style.fonts)
        except Exception as e:
            raise DataError(f"concept folder {n!r}: {e}") from None
    pics = torch.cat([found[n][0] for n in names])
    labels = torch.cat([torch.full((len(found[n][0]),), i) for i, n in enumerate(names)])
    words, wl, meta = _words([[n] for n in names], bundle, style, positions, seed)
    return Concepts(names, [[n] for n in names], pics, labels, words, wl, meta, f"{folder} ({len(pics)} pictures)")


def digit_dataset(bundle, per_digit: int = 30, seed: int = 1, data_dir=None) -> tuple[torch.Tensor, list[str]]:
    """Images to draw top activations from: MNIST test digits and drawn digit words and numerals, with labels."""
    pics, labels = digit_pictures_for(bundle, per_digit, seed, data_dir)
    style = text_style(bundle)
    forms = [[w, n] for w, n in zip(DIGIT_WORDS, NUMERALS, strict=True)]
    words, _, meta = _words(forms, bundle, style, 2, seed)
    names = [f"handwritten {DIGIT_WORDS[int(y)]}" for y in labels] + [
        f"drawn {m['word']!r} ({m['font']}, {m['size']}px)" for m in meta
    ]
    return torch.cat([pics, words]), names
