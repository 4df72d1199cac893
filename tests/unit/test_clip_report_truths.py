"""The clip reports say and draw the result's own numbers: sentences against strings written by hand from the
result's fields, figures against their matplotlib artists read back, settings against the JSON the user gets."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace as NS

import numpy as np
import pytest
import torch

from tests.e2e.test_clip_cli import _accuracy
from tests.unit.test_clip_render import _attack_result

pytestmark = pytest.mark.usefixtures("one_thread")  # small models: one torch thread


@pytest.fixture
def figures(monkeypatch):
    """The clip figures module, returning the matplotlib Figure itself instead of its PNG, to read its artists."""
    from mechscope.clip.report import figures as F

    monkeypatch.setattr(F, "figure_data_uri", lambda fig: fig)
    return F


# ---------------------------------------------------------------- train


def test_the_across_modalities_sentence_names_the_best_cross_row():
    """Truth: of two cross-modal rows (20.0% and 50.0% of 1000, ten classes), the best is 50.0%: ± √(.5·.5/1000) =
    1.6 points, (0.5 − 0.1) / √(0.1·0.9/1000) = 42.2 guess errors above chance."""
    from mechscope.clip.methods.evaluate import TrainResult
    from mechscope.clip.report.context import train_summary

    low, high = _accuracy("words (across modalities)", 200, 1000), _accuracy("numerals (across modalities)", 500, 1000)
    for rows in ((low, high), (high, low)):
        last = train_summary(TrainResult("m", {}, 1, (), rows, 1.0, {}))[-1]
        assert last == ("Across modalities the best is 50.0% ± 1.6 of 1000 (numerals (across modalities)), 42.2 "
                        "standard errors above chance: pictures and written names of a digit meet in the embedding "
                        "space.")  # fmt: skip


def test_chance_note_names_every_level_of_chance():
    """Truth: a ten-class row and a two-class row have chances 1/10 and 1/2: "10%, 50% depending on the row"."""
    from mechscope.clip.methods.evaluate import Accuracy
    from mechscope.clip.report.context import chance_note

    two = Accuracy("pairs", "{}", 4, 0.5, ((1, 1), (1, 1)))
    assert chance_note(NS(evaluation=(_accuracy("x", 5, 10), two))) == (
        "Chance (a uniform guess) is 10%, 50% depending on the row.")  # fmt: skip
    assert chance_note(NS(evaluation=(two,))) == "Chance (a uniform guess) is 50% in every row."


def test_history_figure_plots_loss_left_and_batch_accuracy_right(figures):
    """Truth: the history's own loss and accuracy values against its steps, read from the two lines."""
    history = ({"step": 0, "loss": 2.3, "accuracy": 0.1}, {"step": 5, "loss": 1.1, "accuracy": 0.6},
               {"step": 9, "loss": 0.4, "accuracy": 0.9})  # fmt: skip
    a, b = figures.history_figure(history).axes
    assert list(a.lines[0].get_xdata()) == [0, 5, 9] and list(a.lines[0].get_ydata()) == [2.3, 1.1, 0.4]
    assert list(b.lines[0].get_ydata()) == [0.1, 0.6, 0.9]


def test_confusion_shading_is_the_share_of_each_true_class(figures):
    """Truth: the shading of cell (i, j) is count[i, j] / (count of true class i), divided by hand."""
    from mechscope.clip.methods.evaluate import Accuracy

    conf = ((3, 1, 0), (0, 2, 2), (1, 0, 9))
    fig = figures.confusion_figure(Accuracy("x", "{}", 18, 14 / 18, conf), ["a", "b", "c"], "t")
    shown = np.asarray(fig.axes[0].images[0].get_array())
    assert shown == pytest.approx(np.array([[3 / 4, 1 / 4, 0], [0, 1 / 2, 1 / 2], [1 / 10, 0, 9 / 10]]))


# ---------------------------------------------------------------- inspect


def test_inspect_marks_the_highest_probability_of_each_row():
    """Truth: the marked cell of each row is numpy's argmax of that row."""
    from mechscope.clip.report.context import inspect_context

    probs = ((0.2, 0.7, 0.1), (0.6, 0.3, 0.1), (0.05, 0.15, 0.8))
    ctx = inspect_context(NS(images=("a", "b", "c"), probabilities=probs, pixels=None))
    for row, p in zip(ctx["rows"], probs, strict=True):
        assert [c["top"] for c in row["cells"]] == [j == int(np.argmax(p)) for j in range(3)]
        assert [c["p"] for c in row["cells"]] == list(p)


# ---------------------------------------------------------------- neurons


def _concept(name, score, pd, wd, multimodal, neuron="1.2"):
    return NS(concept=name, forms=(name,), neuron=neuron, score=score, picture_d=pd, word_d=wd, control_mean=0.3,
              control_sd=0.1, null_max=0.9, multimodal=multimodal)  # fmt: skip


def test_the_multimodal_lines_count_and_list_the_best_concepts_with_their_own_numbers():
    """Truth: 6 of 7 concepts are multimodal (counted by hand); the five listed are the highest scores, highest
    first; 'seven' has picture d′ 2.10 and name d′ 1.50, written by hand."""
    from mechscope.clip.report.context import neurons_summary

    names = ("zero", "one", "two", "three", "four", "five")
    found = [_concept(n, 1.1 + 0.05 * i, 3.0, 1.1 + 0.05 * i, True) for i, n in enumerate(names)]
    seven = _concept("seven", 1.50, 2.10, 1.50, True, "1.42")
    concepts = (found[0], seven, *found[1:4], _concept("eight", 0.2, 0.2, 0.9, False), found[4])  # 'five' left out
    mm = NS(concepts=concepts, n_neurons=1024, n_pictures=200, n_words=80, n_controls=50)
    lines = neurons_summary(NS(multimodality=mm, readings=(), settings={"read": 0}))
    assert lines[0] == "6 of 7 concepts get a multimodal neuron (of 1,024 neurons; 200 pictures, 80 drawn words)."
    assert lines[1] == ("seven: neuron 1.42, score 1.50 (pictures d′ 2.10, name d′ 1.50) against 50 random neurons' "
                        "scores 0.30 ± 0.10 (mean ± population sd) and the best mismatched pairing 0.90.")  # fmt: skip
    assert [line.split(":")[0] for line in lines[1:]] == ["seven", "four", "three", "two", "one"]


def _reading(**changes):
    words = ("seven", "one", "house", "3", "five", "six")
    r = dict(neuron="1.42", why="asked for", probe_words=words, probe_values=(0.67, 0.55, 0.5, 0.46, 0.1, 0.02),
             aligned_words=words, aligned_values=(0.5, 0.4, 0.3, 0.2, 0.1, 0.05), top_images=("a",) * 3,
             dataset_max=1.0, featvis_response=0.8)  # fmt: skip
    return NS(**{**r, **changes})


def test_the_probe_sentence_gives_the_four_strongest_words():
    """Truth: the four highest mean responses of the reading, written by hand."""
    from mechscope.clip.report.context import probe_clause

    assert probe_clause(_reading()) == ("of 6 drawn words (mean responses from 0.02 to 0.67) it responds most to "
                                        "seven (0.67), one (0.55), house (0.5), 3 (0.46).")  # fmt: skip


@pytest.mark.parametrize("n, word", [(1, "1st"), (2, "2nd"), (3, "3rd"), (4, "4th"), (11, "11th"), (12, "12th"),
                                     (13, "13th"), (21, "21st"), (22, "22nd"), (23, "23rd"), (101, "101st"),
                                     (111, "111th"), (112, "112th")])  # fmt: skip
def test_ordinals_are_english(n, word):
    """Truth: English ordinals, written by hand."""
    from mechscope.clip.report.context import ordinal

    assert ordinal(n) == word


def test_the_own_concepts_rank_is_read_against_the_median_and_zero():
    """Truth: of 5 words the 3rd is the median (not in the lower half), the 4th is in the lower half; a value of
    exactly 0 is "at or below zero"; the 2nd is "2nd"."""
    from mechscope.clip.report.context import aligned_clause

    words = ("a", "b", "c", "d", "e")
    r = _reading(aligned_words=words, aligned_values=(0.5, 0.4, 0.3, 0.2, 0.1))
    assert aligned_clause(r, ("c",)).endswith("'c' ranks 3rd of 5 (+0.3).")
    assert aligned_clause(r, ("d",)).endswith("'d' ranks 4th of 5 (+0.2), in the lower half: the contribution does "
                                              "not single out its own concept's text.")  # fmt: skip
    assert aligned_clause(r, ("b",)).endswith("'b' ranks 2nd of 5 (+0.4).")
    zero = _reading(aligned_words=words, aligned_values=(0.5, 0.0, -0.1, -0.2, -0.3))
    assert aligned_clause(zero, ("b",)).endswith("'b' ranks 2nd of 5 (+0), at or below zero: the contribution does "
                                                 "not point towards its own concept's text.")  # fmt: skip


def test_the_aligned_words_carry_their_own_values():
    """Truth: each of the four most aligned words beside its own value, written by hand."""
    from mechscope.clip.report.context import aligned_clause

    assert "it aligns most with seven (+0.5), one (+0.4), house (+0.3), 3 (+0.2)." in aligned_clause(_reading())


def test_the_bar_charts_say_how_many_words_they_show_and_draw_that_many(figures):
    """Truth: a chart shows at most 12 words: 12 words are "all 12", 13 are "the 12 highest of 13" and 12 bars; the
    text embedding is averaged over the result's 3 templates (counted by hand)."""
    from mechscope.clip.report.context import bars_note, words_shown

    assert words_shown(["w"] * 12) == "all 12 words" and words_shown(["w"] * 13) == "the 12 highest of 13 words"
    assert words_shown(["w"]) == "its one word"
    words = [f"w{i}" for i in range(13)]
    fig = figures.bars_figure(words, [13 - i for i in range(13)], "t", 12)
    assert len(fig.axes[0].patches) == 12
    note = bars_note(NS(templates=("{}", "a {}", "the word {}"), words=("x", "y")), _reading())
    assert "(averaged over the 3 prompt templates)" in note


def test_each_bar_of_a_word_chart_is_labelled_with_its_own_word(figures):
    """Truth: the input's word → value pairs; each bar's length is read with the tick label at its height."""
    words, values = ["seven", "one", "cat"], [0.9, 0.5, 0.1]
    ax = figures.bars_figure(words, values, "t").axes[0]
    label_at = {round(float(y), 6): t.get_text() for y, t in zip(ax.get_yticks(), ax.get_yticklabels(), strict=True)}
    drawn = {label_at[round(p.get_y() + p.get_height() / 2, 6)]: p.get_width() for p in ax.patches}
    assert drawn == dict(zip(words, values, strict=True))
    top = max(ax.patches, key=lambda p: p.get_y())
    assert label_at[round(top.get_y() + top.get_height() / 2, 6)] == "seven"  # the highest first, at the top


def test_a_concepts_best_column_is_placed_by_its_layers_position():
    """Truth: layers (1, 3) of 6 neurons each are columns 0–5 and 6–11; neuron 3.2 is column 6 + 2 = 8."""
    from mechscope.clip.report.context import best_column

    result = NS(layers=(1, 3), multimodality=NS(n_neurons=12))
    assert best_column(result, NS(layer=3, unit=2)) == 8 and best_column(result, NS(layer=1, unit=5)) == 5
    assert best_column(result, NS(layer=2, unit=0)) is None


def _six_concepts():
    from mechscope.clip.methods import neurons as N

    g = torch.Generator().manual_seed(1)
    names = ["zero", "one", "two", "three", "four", "five"]
    pa, wa = torch.randn(60, 12, generator=g), torch.randn(36, 12, generator=g)
    return N.multimodality(pa, torch.arange(60) % 6, wa, torch.arange(36) % 6, names, [[n] for n in names], [0, 1], 6,
                           n_controls=5, seed=0)  # fmt: skip


def test_the_scatter_plots_are_the_four_best_concepts_with_every_neuron_at_its_d_primes(figures):
    """Truth: the four highest scores of six concepts (sorted by hand); each grey point is one neuron at
    (picture d′, name d′) of the multimodality's own arrays."""
    from mechscope.clip.methods.neurons import NeuronsResult
    from mechscope.clip.report.context import neurons_context

    mm = _six_concepts()
    result = NeuronsResult("tiny", "clip", (0, 1), "mean", {"read": 0}, "c", "d", 10, mm, (), ("three",), ("{}",), {})
    ctx = neurons_context(result)
    best4 = [c.concept for c in sorted(mm.concepts, key=lambda c: c.score, reverse=True)[:4]]
    assert [s["concept"].concept for s in ctx["scatters"]] == best4
    i = [c.concept for c in mm.concepts].index(best4[0])
    grey = ctx["scatters"][0]["uri"].axes[0].collections[0].get_offsets()
    assert np.asarray(grey) == pytest.approx(np.stack([mm.picture_d[i].numpy(), mm.word_d[i].numpy()], 1), abs=1e-6)


def test_the_multimodality_bars_are_score_mismatched_best_and_control_mean(figures):
    """Truth: the concepts' own score, null_max and control_mean ± control_sd, in the three series of bars."""
    mm = _six_concepts()
    ax = figures.multimodality_figure(mm).axes[0]
    bars = [c for c in ax.containers if hasattr(c, "patches")]
    heights = [[p.get_height() for p in b.patches] for b in bars]
    assert heights[0] == pytest.approx([c.score for c in mm.concepts])
    assert heights[1] == pytest.approx([c.null_max for c in mm.concepts])
    assert heights[2] == pytest.approx([c.control_mean for c in mm.concepts])
    segs = bars[2].errorbar.lines[2][0].get_segments()
    assert [s[1][1] - s[0][1] for s in segs] == pytest.approx([2 * c.control_sd for c in mm.concepts])


def test_a_tie_with_the_mismatched_pairing_is_not_above_it():
    """Truth: a score equal to the best mismatched pairing (1.20 = 1.20) is not above it."""
    from mechscope.clip.pipelines.neurons import _not_multimodal

    assert _not_multimodal(NS(concept="six", score=1.2, null_max=1.2), 1.0) == (
        "best multimodality score for 'six', 1.20: not above the best mismatched pairing 1.20")  # fmt: skip


# ---------------------------------------------------------------- attack


def test_the_attack_success_line_states_its_rates_and_margins_in_order():
    """Truth: the summary's 58.33% of 96, 90.6% any change, margins −6.02 before and 1.03 after, by hand."""
    from mechscope.clip.report.context import attack_summary

    assert attack_summary(_attack_result())[1] == (
        "Attack success (prediction moves to 'three'): 58.3% of 96 counted images (any change of class: 90.6%); "
        "margin logit[target] − logit[true] -6.02 → 1.03.")  # fmt: skip


def test_the_held_out_lines_give_before_and_after_ablation():
    """Truth: held-out true-class accuracy 10.4% → 60.4%; held-out success 47.9% → 0.0% with the top 5 named
    1.0–1.4; the named neurons' success 47.9% → 40.0% (before: the held-out success, not the overall 58.3%)."""
    from mechscope.clip.report.context import attack_summary

    lines = attack_summary(_attack_result(given=("1.7",), given_success=0.4, given_accuracy=0.2,
                                          given_clean_accuracy=0.9375, given_undone=0.1))  # fmt: skip
    assert lines[2].startswith("Ablating the top 5 neurons (1.0, 1.1, 1.2, 1.3, 1.4) on the held-out half (48 of the "
                               "counted images, all classified correctly before the attack): success 47.9% → 0.0%, "
                               "34% of the attack's margin shift undone;")  # fmt: skip
    assert lines[3] == "Held-out attacked images classified as 'seven': 10.4% → 60.4% with the top 5 ablated."
    assert lines[-1].startswith("The neurons asked for (1.7) ablated instead: success 47.9% → 40.0%, classified as "
                                "'seven' 20.0%, 10% of the shift undone;")  # fmt: skip


def test_the_control_counts_sets_strictly_above_and_one_set_has_no_sd():
    """Truth: of the sets 50%, 50%, 75% one is above a held-out success of 50% (recounted by hand); one set has no
    sd to state."""
    from mechscope.clip.report.context import control_line, control_words

    each = (0.5, 0.5, 0.75)
    r = _attack_result(heldout_success=0.5, control_successes=each, control_success_mean=float(np.mean(each)),
                       control_success_sd=float(np.std(each, ddof=1)))  # fmt: skip
    assert "(above it in 1 of the 3 sets)" in control_line(r)
    one = _attack_result(control_successes=(0.4,), control_success_mean=0.4, control_success_sd=float("nan"))
    assert control_words(one) == "1 random set of 5 neurons: mean success 40.0%"
    assert "success 40.0% (one set: no sd)" in control_line(one)


def test_the_attack_summary_bars_are_the_summarys_rates_with_the_controls_sd(figures):
    """Truth: bar heights 0.479, 0.0, the control mean and 0.4 (given) from the summary; labels their percentages;
    the control's error bar ± its sample sd; one set is labelled "1 set"."""
    r = _attack_result(given=("1.7",), given_success=0.4)
    s = r.finding.summary
    ax = figures.attack_summary_figure(s, 5, 6, "sample sd").axes[0]
    assert [p.get_height() for p in ax.patches] == pytest.approx([0.479, 0.0, s.control_success_mean, 0.4])
    labels = [t.get_text() for t in ax.texts]
    assert labels == ["48%", "0%", f"{round(100 * s.control_success_mean)}%", "40%"]
    bars = next(c for c in ax.containers if hasattr(c, "patches"))
    seg = bars.errorbar.lines[2][0].get_segments()[2]
    assert seg[1][1] - seg[0][1] == pytest.approx(2 * s.control_success_sd)
    one = figures.attack_summary_figure(s, 5, 1, "sample sd").axes[0]
    assert [t.get_text() for t in one.get_xticklabels()][2] == "5 random neurons\nablated (1 set)"


def test_the_effects_chart_draws_measured_and_estimated_per_neuron(figures):
    """Truth: each neuron's own effect and estimate, with its name at its bars (the first at the top)."""
    from mechscope.clip.methods.attack import AttackNeuron

    neurons = (AttackNeuron("1.3", 1, 3, -0.2, -0.5), AttackNeuron("0.7", 0, 7, 0.1, -0.25))
    ax = figures.effects_figure(neurons).axes[0]
    measured, estimated = (c for c in ax.containers if hasattr(c, "patches"))
    assert [p.get_width() for p in measured.patches] == [-0.5, -0.25]
    assert [p.get_width() for p in estimated.patches] == [-0.2, 0.1]
    ticks = dict(zip(ax.get_yticks(), (t.get_text() for t in ax.get_yticklabels()), strict=True))
    assert ticks[max(ticks)] == "1.3" and ticks[min(ticks)] == "0.7"


def test_the_examples_say_what_each_image_is_classified_as(figures):
    """Truth: argmax of the clean, attacked and ablated probabilities written by hand: seven 70%, three 80%, then
    ablated back to seven."""
    p = np.array([[[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.6, 0.3, 0.1]]])
    finding = NS(examples=np.zeros((1, 2, 1, 8, 8)), probabilities=p)
    fig = figures.attack_examples_figure(finding, ("seven", "three", "one"))
    assert [ax.get_title() for ax in fig.axes] == ["clean: seven 70%", "attacked: three 80%\nablated: seven"]


# ---------------------------------------------------------------- pipelines: what the JSON records


def test_attack_json_records_the_size_drawn_and_the_neurons_asked_for(tiny_clip, clip_pictures, tmp_path):
    """Truth: the default word size is a third of a 32 px image scaled to the model's (10 px at 32 px, read from
    the checkpoint's preprocessor_config.json); the neuron given as (layer 1, unit 5) is "1.5"; the JSON read back
    with json holds the settings passed."""
    from mechscope.clip.methods.evaluate import InspectResult
    from mechscope.clip.pipelines.attack import AttackSettings, attack
    from mechscope.clip.pipelines.inspect import inspect

    _, i = inspect(tiny_clip, tmp_path / "i", images=clip_pictures, prompts=["a photo of cat", "a photo of dog"])
    true, other = ("cat", "dog") if (np.asarray(i.probabilities).argmax(1) == 0).sum() >= 4 else ("dog", "cat")
    assert isinstance(i, InspectResult)
    s = AttackSettings(word=other, true=true, classes=("cat", "dog"), prompt="a photo of {}", k=1, candidates=2,
                       controls=1, ablate=((1, 5),), x=0.4, y=0.6, seed=3)  # fmt: skip
    out, _ = attack(tiny_clip, tmp_path / "a", s, images=clip_pictures)
    side = json.loads((tiny_clip / "preprocessor_config.json").read_text())
    crop = side.get("crop_size", side.get("size"))
    px = crop["height"] if isinstance(crop, dict) and "height" in crop else crop.get("shortest_edge", crop)
    settings = json.loads((out / "attack.json").read_text())["settings"]
    assert settings["size"] == max(4, round(px * 10 / 32))
    assert settings["ablate"] == ["1.5"]
    assert (settings["word"], settings["true"], settings["k"], settings["candidates"], settings["controls"],
            settings["x"], settings["y"], settings["seed"]) == (other, true, 1, 2, 1, 0.4, 0.6, 3)  # fmt: skip
    assert f"at {settings['size']} px" in (out / "report.html").read_text()


def test_neurons_reads_every_neuron_asked_for_with_its_words_highest_first(tiny_clip, clip_pictures, mnist_root):
    """Truth: two neurons asked for with --read 1 are both read (the asked ones come first, whatever --read); each
    reading's probe and alignment values are in descending order (highest first, as the report reads them)."""
    from mechscope.clip.models.loading import load_clip
    from mechscope.clip.pipelines.neurons import NeuronSettings, read_model

    bundle = load_clip(tiny_clip, device="cpu", dtype="float32")
    s = NeuronSettings(neurons=((1, 5), (0, 2)), read=1, per_digit=2, positions=1, controls=5, k=2, steps=1,
                       diverse=0, words=("three", "3", "cat", "dog"))  # fmt: skip
    r = read_model(bundle, s, images=clip_pictures, data_dir=mnist_root)
    assert [x.neuron for x in r.readings] == ["1.5", "0.2"]
    assert r.settings["neurons"] == ((1, 5), (0, 2)) or r.settings["neurons"] == [[1, 5], [0, 2]]
    for x in r.readings:
        assert list(x.probe_values) == sorted(x.probe_values, reverse=True)
        assert list(x.aligned_values) == sorted(x.aligned_values, reverse=True)
        assert sorted(x.probe_words) == ["3", "cat", "dog", "three"]
        assert not any(math.isnan(v) for v in x.probe_values)


# ---------------------------------------------------------------- the pages' tables


def test_the_train_table_gives_accuracy_and_error_in_points():
    """Truth: 15 of 120 is 12.5%, its binomial standard error √(0.125 × 0.875 / 120) = 3.0 points."""
    from mechscope.clip.methods.evaluate import TrainResult
    from mechscope.clip.training import SmallSettings

    html = TrainResult("m", dict(SmallSettings().__dict__), 1, (), (_accuracy("numerals", 15, 120),), 1.0, {}
                       )._repr_html_()  # fmt: skip
    assert "<td>120</td><td>12.5% ± 3.0</td>" in html


def test_the_inspect_table_gives_each_probability_in_percent():
    """Truth: probabilities 0.25 and 0.75 are 25.0% and 75.0%, the 75.0% cell marked (the row's highest)."""
    from mechscope.clip.methods.evaluate import InspectResult

    r = InspectResult("tiny", "clip", {}, "", {}, {}, ("a.png",), ("a cat", "a dog"), ((0.25, 0.75),))
    assert '<td>25.0%</td><td class="yes">75.0%</td>' in r._repr_html_()


def test_the_neurons_table_row_is_the_concepts_own_numbers():
    """Truth: each concept's score, picture d′ and name d′ in the table's columns of those names, in that order."""
    from tests.unit.test_clip_render import _neurons_result, _page

    result = _neurons_result([(0, 0, 8, 8)])
    html = _page(result)
    assert "<th>score</th><th>d′ pictures</th><th>d′ name</th>" in html
    for c in result.multimodality.concepts:
        assert (f"<td>{c.neuron}</td><td>{c.score:.2f}</td><td>{c.picture_d:.2f}</td><td>{c.word_d:.2f}</td>"
                in html)  # fmt: skip


def test_the_attack_neuron_table_gives_measured_then_estimated(figures):
    """Truth: neuron 1.3 measured −0.500, estimated −0.200, in the columns of those names."""
    from mechscope.clip.methods.attack import AttackNeuron
    from mechscope.clip.report.context import attack_context
    from mechscope.core.render.html import render_string

    r = _attack_result()
    neurons = (AttackNeuron("1.3", 1, 3, -0.2, -0.5), AttackNeuron("0.7", 0, 7, 0.1, -0.25))
    r.finding = NS(summary=r.finding.summary, neurons=neurons, examples=None, probabilities=None)
    r.__dict__.update(model="tiny", images="pictures", prompts=("a seven", "a three"), ablation="mean")
    r.settings = {**r.settings, "x": 0.5, "y": 0.75, "font": "sans", "size": 10, "label": False}
    html = render_string("mechscope.clip", "attack.html.j2", **attack_context(r))
    assert "<th>measured margin change</th><th>attribution estimate</th>" in html
    assert "<td>1</td><td>1.3</td><td>-0.500</td><td>-0.200</td>" in html


def test_a_siglip_inspect_page_does_not_call_its_sigmoids_a_softmax():
    """Truth: clip inspect scores a SigLIP model's image-text pairs each with its own sigmoid (pipelines/inspect.py),
    so a row (0.30, 0.20) sums to 0.5, not 1: the page must not call it a softmax over the prompts."""
    from mechscope.clip.methods.evaluate import InspectResult

    r = InspectResult("tiny", "siglip", {}, "", {}, {}, ("a.png",), ("a cat", "a dog"), ((0.3, 0.2),))
    html = r._repr_html_()
    assert "30.0%" in html and "A softmax over the 2 prompts" not in html
    assert "a sigmoid of its logit" in html and "a row need not sum to 100%" in html
    clip = InspectResult("tiny", "clip", {}, "", {}, {}, ("a.png",), ("a cat", "a dog"), ((0.6, 0.4),))
    assert "A softmax over the 2 prompts" in clip._repr_html_()


@pytest.mark.parametrize(
    "args, expect",
    [
        (["neurons", "--diverse", "1"], "--diverse 1 has nothing to be diverse from: give 0 (none) or at least 2"),
        (["attack", "--x", "1.5"], "--x must be between 0 and 1 (a fraction of the image), got 1.5"),
        (["attack", "--ablation", "half"], "--ablation must be mean or zero, got 'half'"),
    ],
)
def test_settings_out_of_range_are_one_line(args, expect, capsys, tiny_clip, tmp_path):
    """Truth: the refusal contract: exit 2 and one line `mechscope: error: …` naming the option and the value."""
    from tests.e2e.test_cli import assert_one_line_error, run_main

    code, _, err = run_main(capsys, "clip", *args, "--model", str(tiny_clip), "--out", str(tmp_path / "o"))
    assert code == 2
    assert_one_line_error(code, err, expect)
    assert err.strip().startswith("mechscope: error: ") and not (tmp_path / "o").exists()
