"""Image–text pairs made from what this machine has: MNIST digits and digit words and numerals drawn in DejaVu fonts.

Three kinds of picture of each digit concept, each with its caption:

* ``hand``: an MNIST digit (28 × 28, white on black) at a random place in the canvas — "a handwritten three";
* ``word``: the digit's name drawn in a font, size and place drawn at random — "the word three";
* ``numeral``: the numeral ("3") drawn the same way, larger — "the number three".

A fraction of the pairs of every kind (``bare``) is captioned by the concept's name alone, "three", as the web's
alt-texts name what a picture shows whatever its form: the one thing that ties a handwritten 3 to the word "three".

``scene`` pairs are text in a scene: a handwritten digit with another digit's name written over it (painted on, or
on a label half the time), captioned by the text ("the word three"), as web captions often transcribe the text in a
photo. They are what teaches a model to read a word on top of other things; the pairs in ``SCENE_HELD_OUT`` (a 7
with "three", the attack measured later) never occur.

Fonts are split: the probes and evaluations of the trained model use fonts it never saw (``HELD_OUT_FONTS``).
Every draw comes from a seeded ``numpy`` generator, so a seed gives the same pairs on every machine.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mechscope.clip.data.render import Placement, fitted_mask, place

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
NUMERALS = tuple(str(i) for i in range(10))
KINDS = ("hand", "word", "numeral", "scene")
SCENE_HELD_OUT = ((7, 3),)  # (handwritten digit, written word) pairs never drawn as scenes
CAPTIONS = {"hand": "a handwritten {}", "word": "the word {}", "numeral": "the number {}"}  # scenes: the word
BARE = "{}"  # the concept's name alone
TRAIN_FONTS = ("sans", "sans-bold", "serif", "serif-bold", "mono", "mono-bold")
HELD_OUT_FONTS = ("sans-oblique", "serif-italic")
WORD_SIZES = (8, 9, 10, 11)
NUMERAL_SIZES = (14, 16, 18, 20, 22)


def caption(kind: str, digit: int) -> str:
    return CAPTIONS[kind].format(DIGIT_WORDS[digit])


def all_captions() -> list[str]:
    """Every caption, kind by kind, digit by digit (index = kind * 10 + digit), then the bare names (30 + digit)."""
    return [caption(k, d) for k in KINDS[:3] for d in range(10)] + [BARE.format(w) for w in DIGIT_WORDS]


@dataclass
class GlyphBank:
    """Glyph masks of every digit word and numeral in some fonts and sizes, drawn once (placing is cheap)."""

    masks: dict  # (kind, digit) -> list of [h, w] float arrays
    image_size: int

    @classmethod
    def build(cls, image_size: int, fonts=TRAIN_FONTS, word_sizes=WORD_SIZES, numeral_sizes=NUMERAL_SIZES):
        masks = {}
        for d in range(10):
            masks[("word", d)] = [fitted_mask(DIGIT_WORDS[d], f, s, image_size - 2) for f in fonts for s in word_sizes]
            masks[("numeral", d)] = [fitted_mask(NUMERALS[d], f, s, image_size - 2) for f in fonts
                                     for s in numeral_sizes]  # fmt: skip
        return cls(masks, image_size)

    def draw(self, kind: str, digit: int, rng: np.random.Generator, spread: float = 0.3) -> np.ndarray:
        """One word or numeral image [S,S] in [0, 1]: a glyph mask drawn at random, its centre at a random place
        within ``spread`` of the middle (fractions of the image)."""
        options = self.masks[(kind, digit)]
        m = options[int(rng.integers(len(options)))]
        s = self.image_size
        where = Placement(*rng.uniform(0.5 - spread, 0.5 + spread, 2).tolist())
        top, left = place(m, s, where)
        out = np.zeros((s, s), np.float32)
        out[top : top + m.shape[0], left : left + m.shape[1]] = m
        return out


def place_digit(digit: np.ndarray, image_size: int, rng: np.random.Generator | None) -> np.ndarray:
    """An MNIST digit [28,28] in [0,1] in an ``image_size`` canvas: at a random offset, or centred (rng None)."""
    h, w = digit.shape
    room_y, room_x = image_size - h, image_size - w
    if rng is None:
        oy, ox = room_y // 2, room_x // 2
    else:
        oy, ox = int(rng.integers(room_y + 1)), int(rng.integers(room_x + 1))
    out = np.zeros((image_size, image_size), np.float32)
    out[oy : oy + h, ox : ox + w] = digit
    return out


class PairSampler:
    """Seeded batches of (unit pixels [B,1,S,S], caption index [B] into :func:`all_captions`, kind [B], digit [B])."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, image_size: int, seed: int,
                 mix: tuple[float, ...] = (0.5, 0.3, 0.2, 0.0), fonts=TRAIN_FONTS,
                 bare: float = 0.0) -> None:  # fmt: skip
        self.images = images.float().numpy() / (255.0 if images.dtype == torch.uint8 else 1.0)  # [N,28,28]
        self.labels = labels.numpy()
        self.size = image_size
        self.rng = np.random.default_rng(seed)
        self.mix = np.asarray(tuple(mix) + (0.0,) * (4 - len(mix)), dtype=float) / sum(mix)
        self.bank = GlyphBank.build(image_size, fonts)
        self.bare = float(bare)

    def batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        rng = self.rng
        kinds = rng.choice(4, size=n, p=self.mix)
        out = np.zeros((n, 1, self.size, self.size), np.float32)
        digits = np.zeros(n, np.int64)
        for i, k in enumerate(kinds):
            if k == 0:
                j = int(rng.integers(len(self.images)))
                digits[i] = self.labels[j]
                out[i, 0] = place_digit(self.images[j], self.size, rng)
            elif k == 3:  # a scene: a handwritten digit with another digit's name written over it
                j = int(rng.integers(len(self.images)))
                under = int(self.labels[j])
                d = int(rng.integers(9))
                d = d + (d >= under)  # another digit
                while (under, d) in SCENE_HELD_OUT:
                    d = int(rng.integers(10))
                    d = d if d != under else (d + 1) % 10
                digits[i] = d
                canvas = place_digit(self.images[j], self.size, rng)
                word = self.bank.draw("word", d, rng, 0.2)
                if rng.random() < 0.5:  # on a label: the word's box (one pixel round its ink) cleared first
                    rows, cols = np.nonzero(word.max(1) > 0)[0], np.nonzero(word.max(0) > 0)[0]
                    canvas[max(rows[0] - 1, 0) : rows[-1] + 2, max(cols[0] - 1, 0) : cols[-1] + 2] = 0.0
                out[i, 0] = np.maximum(canvas, word)
            else:
                d = int(rng.integers(10))
                digits[i] = d
                out[i, 0] = self.bank.draw(KINDS[k], d, rng)
        kinds_t = torch.from_numpy(kinds.astype(np.int64))
        digits_t = torch.from_numpy(digits)
        bare = torch.from_numpy(rng.random(n) < self.bare)
        kind_caption = torch.where(kinds_t == 3, 1, kinds_t)  # a scene is captioned by its text: "the word ..."
        caption = torch.where(bare, 30 + digits_t, kind_caption * 10 + digits_t)
        return torch.from_numpy(out), caption, kinds_t, digits_t


def digit_pictures(images: torch.Tensor, labels: torch.Tensor, image_size: int, per_digit: int,
                   seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``per_digit`` MNIST digits of each class, centred in the canvas: unit pixels [10·n,1,S,S] and digits."""
    g = np.random.default_rng(seed)
    lab = labels.numpy()
    chosen = np.concatenate([g.permutation(np.nonzero(lab == d)[0])[:per_digit] for d in range(10)])
    x = images[torch.from_numpy(chosen)].float().numpy() / (255.0 if images.dtype == torch.uint8 else 1.0)
    out = np.stack([place_digit(a, image_size, None) for a in x])[:, None]
    return torch.from_numpy(out), torch.from_numpy(lab[chosen].astype(np.int64))
