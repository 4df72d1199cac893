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
           featvis_response=-0.014, top_images=("a", "b"))  # fmt: skip
    assert aligned_clause(r).endswith("over all 2 words; it points away from the text of every word, least of all "
                                      "from one (-0.00038), zero (-0.0009).")  # fmt: skip
    assert "does not drive the neuron" in featvis_clause(r)
    r = NS(aligned_words=("six",), aligned_values=(0.3,), dataset_max=1.0, featvis_response=0.8, top_images=("a",))
    assert aligned_clause(r).endswith("it aligns most with six (+0.3).") and featvis_clause(r) == ""
    assert aligned_clause(r, ("six",)).endswith("it aligns most with six (+0.3). 'six' ranks 1st of 1 (+0.3).")


def test_a_readings_aligned_words_come_with_their_scale_image_set_and_own_concepts_rank():
    """A report audit: "Neuron 1.42 (most multimodal neuron for 'seven'): … aligns most with the text of five
    (+0.004), six (+0.0029)…" gave no scale for values near 0.004, did not say they are measured on the neuron's 8
    top images only, and left 'seven' out although it ranks 25th of 28 (−0.0016): the sentence read as alignment
    with its own concept."""
    from types import SimpleNamespace as NS

    from mechscope.clip.report.context import neurons_summary, probe_clause

    words = ("five", "six", "cat", "two", "seven", "one")
    values = (0.004, 0.0029, 0.0028, 0.0025, -0.0016, -0.0022)
    r = NS(neuron="1.42", why="most multimodal neuron for 'seven'", aligned_words=words, aligned_values=values,
           probe_words=("seven", "one", "house", "3", "five", "six"), probe_values=(0.67, 0.55, 0.5, 0.46, 0.1, 0.02),
           top_images=("handwritten seven",) * 8, dataset_max=1.6, featvis_response=0.8)  # fmt: skip
    seven = NS(concept="seven", neuron="1.42", forms=("seven",), multimodal=False)  # its summary line is not read
    mm = NS(concepts=(seven,), n_neurons=512, n_pictures=200, n_words=80, n_controls=50)
    line = neurons_summary(NS(multimodality=mm, readings=(r,), settings={"read": 1}))[-1]
    assert "averaged over its 8 top dataset images" in line
    assert "runs from -0.0022 to +0.004 over all 6 words" in line  # the scale: the spread over every word
    assert line.endswith("'seven' ranks 5th of 6 (-0.0016), at or below zero: the contribution does not point "
                         "towards its own concept's text.")  # fmt: skip
    assert "of 6 drawn words (mean responses from 0.02 to 0.67) it responds most to seven (0.67)" in line
    assert "'seven' ranks 1st of 6." in line
    # a neuron read only because it was asked for has no concept of its own: no rank, no verdict
    assert "ranks" not in probe_clause(r) and "own concept" not in neurons_summary(
        NS(multimodality=NS(**{**vars(mm), "concepts": ()}), readings=(r,), settings={"read": 1}))[-1]  # fmt: skip
    low = NS(**{**vars(r), "aligned_values": (0.004, 0.0029, 0.0028, 0.0025, 0.001, -0.0022)})
    assert "in the lower half: the contribution does not single out" in neurons_summary(
        NS(multimodality=mm, readings=(low,), settings={"read": 1}))[-1]  # fmt: skip


def test_settings_show_as_a_person_reads_them():
    """clip inspect's tables printed Python reprs: "(0.5,)", "None", 0.00392156862745098, 218369."""
    from mechscope.core.render.html import shown_value

    shown = [shown_value(v) for v in (None, (0.5,), 0.00392156862745098, 218369, (32, 32), True, "bicubic")]
    assert shown == ["—", "0.5", "0.003922", "218,369", "32, 32", "yes", "bicubic"]


def test_a_neurons_page_says_why_it_read_fewer_neurons_than_asked():
    from types import SimpleNamespace as NS

    from mechscope.clip.report.context import neurons_summary

    mm = NS(concepts=(), n_neurons=512, n_pictures=100, n_words=80, n_controls=50)
    r = NS(multimodality=mm, readings=(), settings={"read": 2})
    assert neurons_summary(r)[-1].startswith("0 of the 2 neurons asked for (--read) are read in full: after the")
    assert len(neurons_summary(NS(multimodality=mm, readings=(), settings={"read": 0}))) == 1


def _neurons_result(patches, top_names=None):
    """A small NeuronsResult from random responses (4 concepts, layers 0 and 1 of 6 neurons each) and one reading
    whose top images have the ``patches`` given (None: the largest activation at the class token)."""
    from mechscope.clip.methods import neurons as N

    g = torch.Generator().manual_seed(0)
    names = ["zero", "one", "two", "three"]
    pa, wa = torch.randn(40, 12, generator=g), torch.randn(24, 12, generator=g)
    mm = N.multimodality(pa, torch.arange(40) % 4, wa, torch.arange(24) % 4, names, [[n] for n in names], [0, 1], 6,
                         n_controls=5, seed=0)  # fmt: skip
    k = len(patches)
    top_names = top_names or tuple(f"handwritten {names[i % 4]}" for i in range(k))
    reading = N.NeuronReading(
        "1.2", 1, 2, "asked for", 0.9, 0.8, tuple(top_names), tuple(0.9 - 0.1 * i for i in range(k)), tuple(patches),
        ("three",), (0.5,), ("three",), (0.1,), featvis=np.zeros((1, 32, 32)), top_pixels=np.zeros((k, 1, 32, 32)),
        top_attribution=np.zeros((k, 32, 32)),
    )  # fmt: skip
    return N.NeuronsResult("tiny", "clip", (0, 1), "mean", {"read": 1}, "random concepts", "random images", 10, mm,
                           (reading,), ("three",), ("{}",), {})  # fmt: skip


def _page(result) -> str:
    from mechscope.clip.report.context import neurons_context
    from mechscope.core.render.html import render_string

    return render_string("mechscope.clip", "neurons.html.j2", **neurons_context(result))


def test_a_top_image_whose_maximum_is_at_the_class_token_says_so_and_gets_no_box(monkeypatch):
    """A report audit: one top image was drawn without the red box, and nothing said why (hot_patch gives no box
    for an image whose largest activation is at the class token, which is no patch of the image)."""
    import json

    from mechscope.clip.methods.neurons import NeuronsResult
    from mechscope.clip.report import figures as F
    from mechscope.clip.report.figures import CLS_NOTE, top_image_rows

    result = _neurons_result([(8, 0, 16, 8), None, (0, 24, 8, 32)])
    rows = top_image_rows(result.readings[0])
    assert [r["cls"] for r in rows] == [False, True, False] and [r["note"] for r in rows] == ["", CLS_NOTE, ""]
    assert rows[0]["box"] == (8, 0, 16, 8) and rows[1]["box"] is None
    assert rows[0]["where"] == "patch at pixel rows 8–15, columns 0–7 (red box)"
    monkeypatch.setattr(F, "figure_data_uri", lambda fig: fig)  # the figure itself, to read what it draws
    fig = F.reading_figure(result.readings[0])
    tops = fig.axes[1:4]  # row 0: the feature visualisation, then the top images
    assert [len(ax.patches) for ax in tops] == [1, 0, 1]  # no box on the image whose maximum is at CLS
    box = tops[0].patches[0]
    assert (box.get_x(), box.get_y(), box.get_width(), box.get_height()) == (-0.5, 7.5, 8, 8)
    assert [ax.get_xlabel() for ax in tops] == ["", CLS_NOTE, ""]
    monkeypatch.undo()
    html = _page(result)
    assert "class token (CLS), no patch of the image: no box" in html
    # neurons.json keeps the missing box as null: a result read back says the same
    back = NeuronsResult.from_dict(json.loads(json.dumps(result.to_dict())))
    assert [r["cls"] for r in top_image_rows(back.readings[0])] == [False, True, False]
    assert "no patch of the image" not in _page(_neurons_result([(8, 0, 16, 8), (0, 0, 8, 8)]))


def test_top_image_names_are_wrapped_not_cut(monkeypatch):
    """A report audit: top images' names were cut at 18 characters ("drawn 'seven' (san")."""
    from mechscope.clip.report import figures as F

    name = "drawn 'seven' (sans-oblique, 11px)"
    long = "a_very_long_picture_file_name_from_a_folder_of_many_images_0042.png"
    assert F.wrapped(name) == "drawn 'seven'\n(sans-oblique, 11px)"
    cut = F.wrapped(long).split("\n")
    assert len(cut) == 3 and all(len(line) <= 20 for line in cut) and cut[-1].endswith("…")
    result = _neurons_result([(0, 0, 8, 8), None], top_names=(name, long))
    monkeypatch.setattr(F, "figure_data_uri", lambda fig: fig)
    fig = F.reading_figure(result.readings[0])
    assert fig.axes[1].get_title() == "drawn 'seven'\n(sans-oblique, 11px)\n0.90"
    monkeypatch.undo()
    html = _page(result)
    assert f'<td class="l">{name.replace(chr(39), "&#39;")}</td>' in html and long in html  # in full beside it


def test_the_z_column_and_the_scatter_plots_say_what_they_show(monkeypatch):
    """A report audit: the concept table's z had no definition and the d′ scatter plots no caption. The sentences
    are checked against the numbers: z is (score − controls' mean) / controls' sd and never below the highest
    control's own z; the red point is the concept's best neuron."""
    import dataclasses

    from mechscope.clip.methods.neurons import column_neuron
    from mechscope.clip.report import figures as F
    from mechscope.clip.report.context import best_column

    result = _neurons_result([(0, 0, 8, 8)])
    mm = result.multimodality
    controls = torch.randperm(mm.n_neurons, generator=torch.Generator().manual_seed(0))[: mm.n_controls]
    for i, c in enumerate(mm.concepts):
        assert c.z == pytest.approx((c.score - c.control_mean) / c.control_sd)
        ctrl = mm.scores[i, controls].double()
        assert c.control_mean == pytest.approx(float(ctrl.mean())) and c.control_sd == pytest.approx(
            float(ctrl.std(unbiased=False)))  # fmt: skip
        assert c.z >= float(((ctrl - ctrl.mean()) / ctrl.std(unbiased=False)).max()) - 1e-9
        col = best_column(result, c)
        assert column_neuron(col, list(result.layers), 6) == (c.layer, c.unit)
        monkeypatch.setattr(F, "figure_data_uri", lambda fig: fig)
        red = F.scatter_figure(mm, i, col).axes[0].collections[1].get_offsets()[0]
        monkeypatch.undo()
        assert tuple(red) == pytest.approx((c.picture_d, c.word_d), abs=1e-6)
    html = _page(result)
    assert "z: (score − controls' mean) / controls' sd" in html and "(population sd, dividing by 5)" in html
    assert "each grey point is one of the 12 neurons (layers 0, 1)" in html
    best = max(mm.concepts, key=lambda c: c.score)
    assert (f"<figcaption class=\"muted\">{best.concept}: neuron {best.neuron} at d′ pictures {best.picture_d:.2f}, "
            f"d′ name {best.word_d:.2f}</figcaption>") in html  # fmt: skip
    flat = dataclasses.replace(mm.concepts[0], z=float("nan"), control_sd=0.0)
    html = _page(dataclasses.replace(result, multimodality=dataclasses.replace(mm, concepts=(flat, *mm.concepts[1:]))))
    assert "<td>—</td>" in html


def _attack_result(**changes):
    """An attack result with the numbers of a review run (``clip attack --n 100 --candidates 12 --controls 6``)."""
    from types import SimpleNamespace as NS

    from mechscope.clip.methods.attack import AttackNeuron, AttackSummary
    from mechscope.core.stats import sample_sd

    each = (0.4375, 0.5, 0.5625, 0.6875, 0.75, 0.8333)
    numbers = dict(n_images=100, n_counted=96, clean_accuracy=0.96, attacked_accuracy=0.1, success_rate=0.5833,
                   success_rate_any=0.906, margin_clean=-6.02, margin_attacked=1.03, n_discovery=48, n_heldout=48,
                   heldout_success=0.479, heldout_success_ablated=0.0, heldout_clean_accuracy_ablated=1.0,
                   margin_ablated=-1.37, undone=0.34, control_success_mean=float(np.mean(each)),
                   control_success_sd=float(sample_sd(each)), control_undone_mean=-0.03, k=5, heldout_accuracy=0.104,
                   heldout_accuracy_ablated=0.604, heldout_clean_accuracy=1.0, control_successes=each)  # fmt: skip
    summary = AttackSummary(**{**numbers, **changes})
    neurons = tuple(AttackNeuron(f"1.{i}", 1, i, -0.3, -0.3) for i in range(5))
    return NS(finding=NS(summary=summary, neurons=neurons), classes=("seven", "three"), true_classes=(0,) * 100,
              word="three", target="three", settings={"controls": len(summary.control_successes)})  # fmt: skip


def test_the_held_out_clean_accuracy_under_ablation_is_read_against_its_100_percent_by_selection():
    """A report audit: "clean accuracy with them ablated 100.0%" stood under "Clean accuracy 96.0% of 100" as if
    ablating had raised it; the held-out images are chosen among those classified correctly before the attack, so
    theirs is 100% before any ablation by construction."""
    from mechscope.clip.report.context import attack_summary, heldout_clean_ablated

    lines = attack_summary(_attack_result())
    assert lines[0].startswith("Clean accuracy (all 100 images, before the attack) 96.0%")
    assert ("on the held-out half (48 of the counted images, all classified correctly before the attack)" in lines[2]
            and lines[2].endswith("their clean accuracy with the 5 ablated 100.0% (against 100.0% before any "
                                  "ablation, by selection)."))  # fmt: skip
    assert heldout_clean_ablated(_attack_result()) == "100.0% ablated, 100.0% before any ablation, by selection"
    # a result written before heldout_clean_accuracy was recorded: still 100% by selection
    assert "(against 100.0% before any ablation, by selection)" in attack_summary(
        _attack_result(heldout_clean_accuracy=float("nan")))[2]  # fmt: skip
    named = attack_summary(_attack_result(given=("1.7",), given_success=0.4, given_accuracy=0.2,
                                          given_clean_accuracy=0.9375, given_undone=0.1))[-1]  # fmt: skip
    assert named.endswith("clean accuracy of the held-out images with them ablated 93.8% (against 100.0% before any "
                          "ablation, by selection).")  # fmt: skip


def test_the_attack_control_states_its_sets_its_sd_and_when_it_raises_success(monkeypatch):
    """A report audit: "Control: 5 random neurons ablated: success 62.8% ± 17.1%, -3% of the shift undone" was 6
    random sets, a population sd, and the number of sets was not stated (nor on the bar chart); nothing said that the
    random ablations raised the success above the 47.9% of the unablated held-out images."""
    from mechscope.clip.report import figures as F
    from mechscope.clip.report.context import control_line, control_sd_kind, control_sets, control_words
    from mechscope.core.stats import sample_sd

    r = _attack_result()
    s = r.finding.summary
    assert s.control_success_sd == pytest.approx(float(np.std(s.control_successes, ddof=1)))  # the sample sd
    line = control_line(r)
    assert line.startswith(f"Control: 6 random sets of 5 neurons from the same layers, each ablated instead of the top "
                           f"5: success 62.8% ± {s.control_success_sd:.1%} (mean ± sample sd over the 6 sets), -3% of "
                           "the shift undone.")  # fmt: skip
    assert ("On average the random ablations raised the attack's success above the 47.9% it has on these images with "
            "nothing ablated (above it in 5 of the 6 sets), and widened the margin shift") in line
    assert line.endswith("The top 5 ablated (0.0%) are below 6 of the 6 sets (their lowest 43.8%).")
    sd = f"{s.control_success_sd:.1%}"
    assert control_words(r) == f"6 random sets of 5 neurons: mean success 62.8% ± {sd} (sample sd)"
    # random ablations that lower the success: no "raised" sentence
    low = _attack_result(control_successes=(0.3, 0.4), control_success_mean=0.35,
                         control_success_sd=float(sample_sd([0.3, 0.4])), control_undone_mean=0.1)  # fmt: skip
    assert "raised" not in control_line(low) and "(mean ± sample sd over the 2 sets)" in control_line(low)
    # a result written before the sets were recorded: the number from the settings, the sd named as population sd
    old = _attack_result(control_successes=())
    old.settings = {"controls": 6}
    assert control_sets(old) == 6 and control_sd_kind(old.finding.summary) == "population sd"
    assert "(mean ± population sd over the 6 sets)" in control_line(old)
    none = _attack_result(control_successes=(), control_success_mean=float("nan"), control_success_sd=float("nan"))
    none.settings = {"controls": 0}
    assert control_line(none).startswith("No random control was run (--controls 0)")
    monkeypatch.setattr(F, "figure_data_uri", lambda fig: fig)
    ticks = [t.get_text() for t in F.attack_summary_figure(s, 5, 6, "sample sd").axes[0].get_xticklabels()]
    assert ticks[2] == "5 random neurons\nablated (6 sets,\nmean ± sample sd)"
    assert len(F.attack_summary_figure(none.finding.summary, 5, 0).axes[0].patches) == 2  # no control, no bar


def test_the_mismatched_caption_says_the_best_of_every_neuron_as_the_code_takes_it():
    """A report audit: the caption called the mismatched score "the best neuron's score when the concept's pictures
    are paired with another concept's name"; the code takes, for each other name, the highest score of any neuron."""
    result = _neurons_result([(0, 0, 8, 8)])
    mm = result.multimodality
    pd, wd = mm.picture_d.double(), mm.word_d.double()
    differs = False
    for i, c in enumerate(mm.concepts):
        best = int(mm.scores[i].argmax())
        others = [j for j in range(len(mm.concepts)) if j != i]
        each = [float(torch.minimum(pd[i], wd[j]).max()) for j in others]
        assert c.null_max == pytest.approx(max(each), abs=1e-6)
        assert c.null_mean == pytest.approx(np.mean(each), abs=1e-6)
        differs |= max(each) > max(float(torch.minimum(pd[i, best], wd[j, best])) for j in others) + 1e-6
    assert differs  # the best neuron's own mismatched scores are not what the column shows
    html = _page(result)
    assert ("Mismatched: for each of the 3 other concepts' names, the highest score any of the 12 neurons reaches when "
            "this concept's pictures are paired with that name") in html  # fmt: skip
    assert "the best neuron's score when the concept's pictures are paired" not in html


def test_diverse_visualisations_that_do_not_drive_the_neuron_are_named():
    """A report audit: neuron 1.198's two diverse feature visualisations reached −0.03 and −0.04 against a dataset
    maximum of 1.722 and stood under "each with the neuron's response to it" with no warning."""
    import dataclasses

    from mechscope.clip.report.context import diverse_note

    r = _neurons_result([(0, 0, 8, 8)])
    reading = dataclasses.replace(r.readings[0], dataset_max=1.722, diverse_responses=(-0.03, 1.5, -0.04),
                                  diverse=np.zeros((3, 1, 32, 32)))  # fmt: skip
    assert diverse_note(reading) == ("Diverse 1 (-0.03), 3 (-0.04) reach under a tenth of the dataset's largest "
                                     "response (1.722): they do not drive the neuron and show what the optimiser "
                                     "reached, not a facet of the neuron.")  # fmt: skip
    assert diverse_note(dataclasses.replace(reading, diverse_responses=(1.2, 1.5))) == ""
    html = _page(dataclasses.replace(r, readings=(reading,)))
    assert "Diverse 1 (-0.03), 3 (-0.04) reach under a tenth" in html


def test_render_words_arguments_are_checked_in_one_line():
    """Truth: the docstring's unit pixels [C,S,S] and the arguments' meanings. fg=2.0 drew pixels of 2, channels=0
    an empty image, x=nan a ValueError from int(), 'red' a TypeError, size 0 PIL's "font size must be greater than
    0", 32.5 a TypeError from torch.zeros, 123 'renders to nothing'."""
    import mechscope.clip as C

    for kwargs, said in (({"fg": 2.0}, "fg's values must be in [0, 1]"), ({"bg": -0.1}, "bg's values must be in"),
                         ({"fg": float("nan")}, "in [0, 1]"), ({"fg": "red"}, "fg is a number in [0, 1]"),
                         ({"channels": 0}, "channels must be an integer from 1 to 1,024"),
                         ({"x": float("nan")}, "x must be a fraction of the image in [0, 1]"),
                         ({"y": 1.5}, "y must be"),
                         ({"size": 0}, "size must be an integer from 1"),
                         ({"image_size": 32.5}, "image_size must be an integer"),
                         ({"word": 123}, "word must be a string, got int")):  # fmt: skip
        with pytest.raises(MechscopeError) as e:
            C.render_word(**({"word": "cat"} | kwargs))
        assert said in str(e.value) and "\n" not in str(e.value), (kwargs, str(e.value))
    img = C.render_word("cat", 32, 3, fg=(1.0, 0.5, 0.0), bg=0.25, x=0.0, y=1.0)
    assert img.shape == (3, 32, 32) and float(img.min()) >= 0 and float(img.max()) <= 1
    near = C.render_word("cat", 32, 5, fg=1.0000001, x=np.float32(0.5))  # float32 rounding, numpy numbers: as before
    assert near.shape == (5, 32, 32) and float(near.max()) == 1.0
