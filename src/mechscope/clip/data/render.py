"""Words drawn as images: text on a plain background, in several fonts and sizes, with PIL's TrueType rasteriser.

The fonts are the DejaVu faces matplotlib ships (``matplotlib/mpl-data/fonts/ttf``), so nothing is downloaded and
every machine draws the same glyphs. A word is drawn once as a *glyph mask* (ink coverage in [0, 1], cropped to its
ink) and then placed: on a plain background (:func:`render_word`) or written onto an image (:func:`write_on`, the
typographic attack: the glyphs painted over the image, or on a label of plain background).

A word that would draw nothing is refused in one line before anything is drawn: an empty or blank word, or one with
a character the font has no glyph for (checked against the font's character map, so a missing glyph never turns
into the font's empty box). A word too wide for the image at the size asked is drawn smaller, down to 4 px.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mechscope.core.errors import MechscopeError

FONTS = {
    "sans": "DejaVuSans.ttf",
    "sans-bold": "DejaVuSans-Bold.ttf",
    "sans-oblique": "DejaVuSans-Oblique.ttf",
    "serif": "DejaVuSerif.ttf",
    "serif-bold": "DejaVuSerif-Bold.ttf",
    "serif-italic": "DejaVuSerif-Italic.ttf",
    "mono": "DejaVuSansMono.ttf",
    "mono-bold": "DejaVuSansMono-Bold.ttf",
}
MIN_SIZE = 4


def font_path(font: str) -> Path:
    """The TrueType file of a font name (a key of :data:`FONTS`) or of a path to a ``.ttf`` file."""
    if font in FONTS:
        import matplotlib

        return Path(matplotlib.get_data_path()) / "fonts" / "ttf" / FONTS[font]
    path = Path(font).expanduser()
    if path.suffix.lower() in (".ttf", ".otf") and not path.is_file():
        raise MechscopeError(f"{path}: font file not found")
    if path.suffix.lower() not in (".ttf", ".otf"):
        raise MechscopeError(f"unknown font {font!r}; expected one of {', '.join(FONTS)} or a .ttf file")
    return path


@functools.lru_cache(maxsize=32)
def _charmap(path: str) -> frozenset[int]:
    from matplotlib.ft2font import FT2Font

    try:
        return frozenset(FT2Font(path).get_charmap())
    except (RuntimeError, OSError) as e:
        raise MechscopeError(f"{path}: not a readable font ({e})") from None


@functools.lru_cache(maxsize=256)
def _font(path: str, size: int):
    from PIL import ImageFont

    return ImageFont.truetype(path, size)


def check_word(word: str, fonts=("sans",)) -> str:
    """``word`` if every font can draw it; else one line naming what cannot be drawn."""
    if not isinstance(word, str) or not word.strip():
        raise MechscopeError(f"the word {word!r} renders to nothing (empty or only whitespace)")
    if any(c in "\n\r\t" for c in word):
        raise MechscopeError(f"the word {word!r} holds a line break or tab; expected one line of text")
    for font in fonts:
        cmap = _charmap(str(font_path(font)))
        missing = sorted({c for c in word if not c.isspace() and ord(c) not in cmap})
        if missing:
            raise MechscopeError(f"the word {word!r} renders to nothing in font {font!r}: it has no glyph for "
                                 f"{', '.join(repr(c) for c in missing[:5])}")  # fmt: skip
    return word


@functools.lru_cache(maxsize=4096)
def glyph_mask(word: str, font: str, size: int) -> np.ndarray:
    """Ink coverage [h, w] in [0, 1] of ``word`` at ``size`` px, cropped to its ink (antialiased, PIL's draw)."""
    from PIL import Image, ImageDraw

    check_word(word, (font,))
    f = _font(str(font_path(font)), int(size))
    left, top, right, bottom = f.getbbox(word)
    w, h = right - left + 4, bottom - top + 4
    canvas = Image.new("L", (max(w, 1), max(h, 1)), 0)
    ImageDraw.Draw(canvas).text((2 - left, 2 - top), word, fill=255, font=f)
    a = np.asarray(canvas, dtype=np.float32) / 255.0
    rows, cols = np.nonzero(a.max(1) > 0)[0], np.nonzero(a.max(0) > 0)[0]
    if not len(rows):
        raise MechscopeError(f"the word {word!r} renders to nothing in font {font!r} at {size} px (no ink)")
    return a[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def fitted_mask(word: str, font: str, size: int, width: int, height: int | None = None) -> np.ndarray:
    """The glyph mask at ``size`` px, or smaller (down to 4 px) until it fits ``width`` × ``height`` pixels."""
    height = width if height is None else height
    s = int(size)
    while True:
        m = glyph_mask(word, font, s)
        if (m.shape[1] <= width and m.shape[0] <= height) or s <= MIN_SIZE:
            break
        s = max(MIN_SIZE, min(s - 1, int(s * min(width / m.shape[1], height / m.shape[0]))))
    if m.shape[1] > width or m.shape[0] > height:
        raise MechscopeError(f"the word {word!r} does not fit a {width}×{height} image even at {MIN_SIZE} px")
    return m


@dataclass(frozen=True)
class Placement:
    """Where a word goes: its centre as fractions of the image's width and height (clipped so it stays inside)."""

    x: float = 0.5
    y: float = 0.5


def place(mask: np.ndarray, image_size: int, where: Placement) -> tuple[int, int]:
    """Top-left corner (row, col) of ``mask`` centred at ``where`` and kept inside the image."""
    h, w = mask.shape
    top = int(round(where.y * image_size - h / 2))
    left = int(round(where.x * image_size - w / 2))
    return min(max(top, 0), image_size - h), min(max(left, 0), image_size - w)


def _colour(value, channels: int, name: str = "a colour") -> torch.Tensor:
    """A colour of unit values (one, or one per channel) as [C, 1, 1]; a name, NaN or a value past [0, 1] refused,
    ``name`` (fg, bg, label) said (fg=2.0 drew pixels above 1, 'red' was a TypeError); within 1e-6 of the range
    (float32 rounding) it is clipped."""
    try:
        v = torch.as_tensor(value, dtype=torch.float32).reshape(-1)
    except (TypeError, ValueError, RuntimeError):
        raise MechscopeError(f"{name} is a number in [0, 1] or one per channel, got {value!r}") from None
    if not v.numel() or not bool(((v >= -1e-6) & (v <= 1 + 1e-6)).all()):
        raise MechscopeError(f"{name}'s values must be in [0, 1] (unit pixels), got {value!r}")
    v = v.clamp(0, 1)
    if v.numel() == 1:
        v = v.expand(channels)
    elif v.numel() != channels:
        v = v.mean().expand(channels) if channels == 1 else None
        if v is None:
            raise MechscopeError(f"a colour needs 1 or {channels} values, got {value!r}")
    return v.clone().view(channels, 1, 1)


def coverage(word: str, image_size: int, font: str = "sans", size: int = 12, where: Placement = Placement(),
             margin: int = 1) -> torch.Tensor:  # fmt: skip
    """The word's ink coverage placed in an ``image_size`` square [S,S] in [0, 1]."""
    m = fitted_mask(word, font, size, image_size - 2 * margin)
    top, left = place(m, image_size, where)
    out = torch.zeros(image_size, image_size)
    out[top : top + m.shape[0], left : left + m.shape[1]] = torch.from_numpy(m)
    return out


def render_word(word: str, image_size: int, channels: int = 1, font: str = "sans", size: int = 12,
                where: Placement = Placement(), fg=1.0, bg=0.0) -> torch.Tensor:  # fmt: skip
    """``word`` drawn on a plain background: unit pixels [C,S,S] (``fg`` text colour, ``bg`` background)."""
    a = coverage(word, image_size, font, size, where)[None]
    return _colour(bg, channels, "bg") * (1 - a) + _colour(fg, channels, "fg") * a


def write_on(image: torch.Tensor, word: str, font: str = "sans", size: int = 12, where: Placement = Placement(0.5, 0.8),
             fg=1.0, label=None, pad: int = 1) -> torch.Tensor:  # fmt: skip
    """``word`` written onto ``image`` (unit pixels [C,S,S]): the glyphs painted in ``fg``; with ``label`` (a
    background colour) on a box of that colour, ``pad`` pixels round the ink, as a label stuck on an object."""
    c, s = image.shape[0], image.shape[-1]
    m = fitted_mask(word, font, size, s - 2 * pad - 2)
    top, left = place(m, s, where)
    out = image.clone().float()
    if label is not None:
        t0, l0 = max(top - pad, 0), max(left - pad, 0)
        out[:, t0 : top + m.shape[0] + pad, l0 : left + m.shape[1] + pad] = _colour(label, c, "label")
    a = torch.zeros(1, s, s)
    a[0, top : top + m.shape[0], left : left + m.shape[1]] = torch.from_numpy(m)
    return out * (1 - a) + _colour(fg, c, "fg") * a


def word_images(words: list[str], image_size: int, channels: int = 1, fonts=("sans",), sizes=(12,),
                positions: int = 1, seed: int = 0, fg=1.0, bg=0.0) -> tuple[torch.Tensor, list[dict]]:  # fmt: skip
    """Every word in every font and size, at ``positions`` seeded places each (the first at the centre):
    unit pixels [N,C,S,S] and one record per image (word, font, size, x, y)."""
    for w in words:
        check_word(w, fonts)
    g = np.random.default_rng(seed)
    images, meta = [], []
    for w in words:
        for font in fonts:
            for size in sizes:
                for p in range(positions):
                    where = Placement() if p == 0 else Placement(*g.uniform(0.25, 0.75, 2).round(3).tolist())
                    images.append(render_word(w, image_size, channels, font, size, where, fg, bg))
                    meta.append({"word": w, "font": font, "size": int(size), "x": where.x, "y": where.y})
    return torch.stack(images) if images else torch.zeros(0, channels, image_size, image_size), meta
