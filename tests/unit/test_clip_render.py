"""Words drawn as images are what was asked for: against a second PIL path and matplotlib's own text rendering."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mechscope.clip.data.render import (
    Placement,
    check_word,
    font_path,
    glyph_mask,
    render_word,
    word_images,
    write_on,
)
from mechscope.core.errors import MechscopeError

pytestmark = pytest.mark.usefixtures("one_thread")  # small models: one torch thread


def ink_crop(a: np.ndarray) -> np.ndarray:
    rows, cols = np.nonzero(a.max(1) > 0)[0], np.nonzero(a.max(0) > 0)[0]
    return a[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def pil_getmask(word: str, font: str, size: int) -> np.ndarray:
    """A second PIL path: the font's own rasterised mask (ImageFont.getmask), not ImageDraw."""
    from PIL import ImageFont

    m = ImageFont.truetype(str(font_path(font)), size).getmask(word, mode="L")
    return ink_crop(np.array(m, dtype=np.float32).reshape(m.size[1], m.size[0]) / 255.0)


def matplotlib_text(word: str, font: str, size: int) -> np.ndarray:
    """matplotlib's Agg rendering of the same word in the same font at the same pixel size (100 dpi)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.font_manager import FontProperties

    fig = Figure(figsize=(3, 1), dpi=100)
    fig.patch.set_facecolor("black")
    fig.text(
        0.5,
        0.5,
        word,
        fontproperties=FontProperties(fname=str(font_path(font)), size=size * 72 / 100),
        color="white",
        ha="center",
        va="center",
    )
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return ink_crop(np.asarray(canvas.buffer_rgba())[..., 0].astype(np.float32) / 255.0)


def resized(a: np.ndarray, shape) -> np.ndarray:
    t = torch.from_numpy(a)[None, None]
    return torch.nn.functional.interpolate(t, size=shape, mode="bilinear", align_corners=False)[0, 0].numpy()


def corr(a, b) -> float:
    """Correlation of two ink maps after a 3×3 box blur (the two rasterisers hint glyphs to different sub-pixels)."""

    def blur(x):
        return torch.nn.functional.avg_pool2d(torch.from_numpy(x)[None, None], 3, 1, 1)[0, 0].numpy()

    return float(np.corrcoef(blur(a).ravel(), blur(b).ravel())[0, 1])


@pytest.mark.parametrize("font", ["sans", "serif", "mono-bold"])
def test_glyphs_equal_a_second_pil_path(font):
    for word in ("three", "seven", "3"):
        ours, ref = glyph_mask(word, font, 20), pil_getmask(word, font, 20)
        assert ours.shape == ref.shape
        assert np.abs(ours - ref).max() < 1e-6


@pytest.mark.parametrize("font", ["sans", "serif", "mono"])
def test_glyphs_match_matplotlib_rendering(font):
    ref = matplotlib_text("three", font, 24)
    ours = glyph_mask("three", font, 24)
    # the same font at the same pixel size: the ink box agrees within two pixels and the pixels correlate
    assert abs(ours.shape[0] - ref.shape[0]) <= 2 and abs(ours.shape[1] - ref.shape[1]) <= 2
    same = corr(resized(ours, ref.shape), ref)
    assert same > 0.9, same
    for other in ("there", "seven", "tree"):  # and it is the word asked for, not a look-alike
        assert same > corr(resized(glyph_mask(other, font, 24), ref.shape), ref) + 0.1


def test_render_word_places_the_word_where_asked():
    img = render_word("three", 64, 1, "sans", 12, Placement(0.3, 0.7))
    assert img.shape == (1, 64, 64) and float(img.min()) >= 0.0 and float(img.max()) <= 1.0
    a = img[0].numpy()
    ys, xs = np.nonzero(a)
    cy, cx = (ys * a[ys, xs]).sum() / a[ys, xs].sum(), (xs * a[ys, xs]).sum() / a[ys, xs].sum()
    assert abs(cy - 0.7 * 64) < 3 and abs(cx - 0.3 * 64) < 3
    dark = render_word("three", 64, 3, "sans", 12, fg=0.0, bg=1.0)  # black on white, three channels
    assert dark.shape == (3, 64, 64) and float(dark.min()) == 0.0 and float(dark.max()) == 1.0
    assert torch.equal(dark[0], dark[1])


def test_write_on_keeps_the_image_outside_the_word():
    base = torch.rand(1, 32, 32, generator=torch.Generator().manual_seed(0)) * 0.5
    out = write_on(base, "three", "sans", 9, Placement(0.5, 0.8), fg=1.0)
    changed = (out - base).abs() > 0
    rows = torch.nonzero(changed.any(2)[0]).flatten()
    assert rows.min() >= 20  # only the bottom, where the word is
    labelled = write_on(base, "three", "sans", 9, Placement(0.5, 0.8), fg=1.0, label=0.0)
    assert (labelled[0, 26:29] == 0).any()  # the label's background shows between the letters


def test_word_images_is_seeded():
    a, meta = word_images(["three", "3"], 32, 1, ("sans", "serif"), (9,), 3, seed=4)
    b, _ = word_images(["three", "3"], 32, 1, ("sans", "serif"), (9,), 3, seed=4)
    assert len(a) == 12 and len(meta) == 12 and torch.equal(a, b)


@pytest.mark.parametrize("word", ["", "   ", "日本", "tab\there"])
def test_words_that_render_to_nothing_are_refused(word):
    with pytest.raises(MechscopeError) as e:
        check_word(word)
    assert "\n" not in str(e.value)


def test_a_word_too_wide_shrinks_to_fit():
    m = glyph_mask("three", "sans", 40)
    img = render_word("three", 32, 1, "sans", 40)
    assert m.shape[1] > 32 and float(img.sum()) > 0


def test_neuron_readings_say_which_test_failed_and_what_the_values_are():
    """A report audit: a neuron scoring 1.058 against the threshold 1.0 was called 'below the threshold' (it failed
    the mismatched pairing, 1.076); 'aligns most with' ranked words whose values were all negative; a feature
    visualisation that does not drive its neuron went unflagged."""
    from types import SimpleNamespace as NS

    from mechscope.clip.pipelines.neurons import _not_multimodal
    from mechscope.clip.report.context import aligned_clause, featvis_clause

    c = NS(concept="six", score=1.058, null_max=1.076)
    assert _not_multimodal(c, 1.0) == ("best multimodality score for 'six', 1.06: not above the best mismatched "
                                       "pairing 1.08")  # fmt: skip
    assert _not_multimodal(NS(concept="two", score=0.5, null_max=0.4), 1.0).endswith(": below the threshold 1")
    r = NS(aligned_words=("one", "zero"), aligned_values=(-0.00038, -0.0009), dataset_max=1.392,
           featvis_response=-0.014)  # fmt: skip
    assert aligned_clause(r) == ("its contribution points away from the text of every word; least of all from "
                                 "one (-0.00038), zero (-0.0009).")  # fmt: skip
    assert "does not drive the neuron" in featvis_clause(r)
    r = NS(aligned_words=("six",), aligned_values=(0.3,), dataset_max=1.0, featvis_response=0.8)
    assert aligned_clause(r) == "its contribution aligns most with the text of six (+0.3)." and featvis_clause(r) == ""


def test_settings_show_as_a_person_reads_them():
    """clip inspect's tables printed Python reprs: "(0.5,)", "None", 0.00392156862745098, 218369."""
    from mechscope.core.render.html import shown_value

    shown = [shown_value(v) for v in (None, (0.5,), 0.00392156862745098, 218369, (32, 32), True, "bicubic")]
    assert shown == ["—", "0.5", "0.003922", "218,369", "32, 32", "yes", "bicubic"]


def test_a_neurons_page_says_why_it_read_fewer_neurons_than_asked():
    from types import SimpleNamespace as NS

    from mechscope.clip.report.context import neurons_summary

    mm = NS(concepts=(), n_neurons=512, n_pictures=100, n_words=80)
    r = NS(multimodality=mm, readings=(), settings={"read": 2})
    assert neurons_summary(r)[-1].startswith("0 of the 2 neurons asked for (--read) are read in full: after the")
    assert len(neurons_summary(NS(multimodality=mm, readings=(), settings={"read": 0}))) == 1
