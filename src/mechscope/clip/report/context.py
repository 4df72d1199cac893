"""What each clip report draws: figures and summary sentences from a result (rendering only, no computing)."""

from __future__ import annotations

import math
from datetime import date

from mechscope.clip.report import figures as F


def footer() -> str:
    return f"report made {date.today().isoformat()}"


def chance(a) -> float:
    """A uniform guess's accuracy: one over the number of classes (the side of the confusion matrix)."""
    return 1 / max(len(a.confusion), 1)


def standard_error(a) -> float:
    """The binomial standard error of an accuracy measured on ``a.n`` items."""
    return math.sqrt(a.accuracy * (1 - a.accuracy) / max(a.n, 1))


def guess_error(a) -> float:
    """The standard error of a uniform guess's accuracy on ``a.n`` items: the spread chance alone gives."""
    c = chance(a)
    return math.sqrt(c * (1 - c) / max(a.n, 1))


def near_chance(a) -> bool:
    """Whether the accuracy is within two standard errors of chance (a guess lands there one time in twenty)."""
    return abs(a.accuracy - chance(a)) <= 2 * guess_error(a)


def with_error(a) -> str:
    """``12.5% ± 3.0 of 120``: the accuracy, its standard error in points and the count."""
    return f"{a.accuracy:.1%} ± {100 * standard_error(a):.1f} of {a.n}"


def versus_chance(a) -> str:
    if near_chance(a):
        return "within two standard errors of chance"
    side = "above" if a.accuracy > chance(a) else "below"
    return f"{abs(a.accuracy - chance(a)) / guess_error(a):.1f} standard errors {side} chance"


def cross_verdict(best) -> str:
    if near_chance(best):
        return "no sign that pictures and written names of a digit meet in the embedding space."
    if best.accuracy < chance(best):
        return "below guessing, so the embedding does not match pictures with written names."
    if best.accuracy > 0.3:
        return "pictures and written names of a digit meet in the embedding space."
    return "pictures and written names of a digit meet only weakly in the embedding space."


def train_summary(result) -> list[str]:
    lines = [f"{a.images} classified with “{a.prompts}” prompts: {with_error(a)} (chance {chance(a):.0%}; "
             f"{versus_chance(a)})." for a in result.evaluation]  # fmt: skip
    near = [a for a in result.evaluation if near_chance(a)]
    if near:
        lines.append(f"{len(near)} of {len(result.evaluation)} accuracies are within two standard errors of chance "
                     "(marked above): those rows are not told apart from guessing.")  # fmt: skip
    cross = [a for a in result.evaluation if "across" in a.images]
    if cross:
        best = max(cross, key=lambda a: a.accuracy)
        lines.append(f"Across modalities the best is {with_error(best)} ({best.images}), {versus_chance(best)}: "
                     + cross_verdict(best))  # fmt: skip
    return lines


def chance_note(result) -> str:
    levels = sorted({chance(a) for a in result.evaluation})
    if len(levels) == 1:
        return f"Chance (a uniform guess) is {levels[0]:.0%} in every row."
    return "Chance (a uniform guess) is " + ", ".join(f"{c:.0%}" for c in levels) + " depending on the row."


def confusion_title(a) -> str:
    return f"{a.images}, “{a.prompts}”:\n{with_error(a)}"


def train_context(result) -> dict:
    from mechscope.clip.data.digits import DIGIT_WORDS

    rows = [{"a": a, "se": 100 * standard_error(a), "versus": versus_chance(a)} for a in result.evaluation]
    return {
        "result": result,
        "summary": train_summary(result),
        "rows": rows,
        "chance_note": chance_note(result),
        "history": F.history_figure(result.history),
        "confusions": [F.confusion_figure(a, DIGIT_WORDS, confusion_title(a)) for a in result.evaluation],
        "footer": footer(),
    }


def inspect_context(result) -> dict:
    rows = []
    for i, name in enumerate(result.images):
        probs = result.probabilities[i]
        top = max(range(len(probs)), key=lambda j: probs[j]) if probs else -1
        uri = F.image_uri(result.pixels[i], 2) if result.pixels is not None and i < len(result.pixels) else ""
        rows.append({"name": name, "uri": uri, "cells": [{"p": p, "top": j == top} for j, p in enumerate(probs)]})
    return {"result": result, "rows": rows, "footer": footer()}


def neurons_summary(result) -> list[str]:
    mm = result.multimodality
    found = [c for c in mm.concepts if c.multimodal]
    lines = [f"{len(found)} of {len(mm.concepts)} concepts get a multimodal neuron "
             f"(of {mm.n_neurons:,} neurons; {mm.n_pictures} pictures, {mm.n_words} drawn words)."]  # fmt: skip
    for c in sorted(found, key=lambda c: -c.score)[:5]:
        lines.append(f"{c.concept}: neuron {c.neuron}, score {c.score:.2f} (pictures d′ {c.picture_d:.2f}, name d′ "
                     f"{c.word_d:.2f}) against {mm.n_controls} random neurons' scores {c.control_mean:.2f} ± "
                     f"{c.control_sd:.2f} (mean ± population sd) and the best mismatched pairing "
                     f"{c.null_max:.2f}.")  # fmt: skip
    for r in result.readings:
        own = own_words(result, r)
        lines.append(f"Neuron {r.neuron} ({r.why}): " + probe_clause(r, own) + " " + aligned_clause(r, own)
                     + featvis_clause(r))  # fmt: skip
    asked = result.settings.get("read", len(result.readings))
    if len(result.readings) < asked:  # the rest are read only when they are multimodal
        lines.append(f"{len(result.readings)} of the {asked} neurons asked for (--read) are read in full: after the "
                     "neurons named with --neuron (or, with none named, the best-scoring concept's neuron) only "
                     "multimodal neurons are read, and too few concepts have one here.")  # fmt: skip
    return lines


def own_words(result, r) -> tuple[str, ...]:
    """The written forms of the concepts whose best neuron ``r`` is (none for a neuron read only because it was asked
    for): the words its probe and its alignment are read against."""
    return tuple(f for c in result.multimodality.concepts if c.neuron == r.neuron for f in c.forms)


def ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def rank_of(words, values, own) -> list[tuple[str, int, float]]:
    """(word, 1-based rank, value) of each of ``own`` found among ``words`` (ordered highest first)."""
    words = list(words)
    return [(w, words.index(w) + 1, values[words.index(w)]) for w in own if w in words]


def probe_clause(r, own=()) -> str:
    """The drawn words it responds to most, with the responses, the range over every word and its concept's rank."""
    n, v = len(r.probe_words), list(r.probe_values)
    top = ", ".join(f"{w} ({x:.3g})" for w, x in zip(r.probe_words[:4], v[:4], strict=False))
    span = f" (mean responses from {min(v):.3g} to {max(v):.3g})" if v else ""
    ranks = "".join(f" {w!r} ranks {ordinal(k)} of {n}." for w, k, _ in rank_of(r.probe_words, v, own))
    return f"of {n} drawn words{span} it responds most to {top}.{ranks}"


def aligned_clause(r, own=()) -> str:
    """The words its contribution aligns with, with the values, the images it is measured on, the range over every
    word (the scale) and where its own concept's words rank: when every value is negative the words are only the
    least anti-aligned, and when its concept's word is at or below zero, or in the lower half, the sentence says so."""
    v = list(r.aligned_values)
    words = ", ".join(f"{w} ({x:+.2g})" for w, x in zip(r.aligned_words[:4], v[:4], strict=False))
    head = (f"Its contribution to the image embedding, averaged over {top_set(r)} and "
            f"dotted with each word's text embedding, runs from {min(v, default=0):+.2g} to {max(v, default=0):+.2g} "
            f"over all {len(v)} words; ")  # fmt: skip
    if v and max(v) < 0:
        head += f"it points away from the text of every word, least of all from {words}."
    else:
        head += f"it aligns most with {words}."
    for w, rank, x in rank_of(r.aligned_words, v, own):
        head += f" {w!r} ranks {ordinal(rank)} of {len(v)} ({x:+.2g})"
        if x <= 0:
            head += ", at or below zero: the contribution does not point towards its own concept's text"
        elif rank > (len(v) + 1) / 2:  # below the median word
            head += ", in the lower half: the contribution does not single out its own concept's text"
        head += "."
    return head


def top_set(r) -> str:
    """The images a reading's text alignment is measured on: its top dataset images (``--k``), not the dataset."""
    k = len(r.top_images)
    return f"its {k} top dataset images" if k != 1 else "its top dataset image"


def bars_note(result, r) -> str:
    """What the two bar charts of a reading show, with the words left out and the image set."""
    n, shown = len(r.probe_words), words_shown(r.probe_words)
    return (f"Left: the neuron's mean response to the drawings of each word (its fonts, sizes and places), {shown}. "
            f"Right: the change in the unit-norm image embedding when the neuron is zeroed, averaged over "
            f"{top_set(r)}, dotted with each word's unit-norm text embedding (averaged over "
            f"the {len(result.templates)} prompt templates), {shown}. The summary gives the range over all {n} "
            f"and, for a concept's best neuron, where the concept's own words rank.")  # fmt: skip


BARS = 12  # words drawn in each bar chart of a reading


def words_shown(words) -> str:
    n = len(words)
    return f"the {BARS} highest of {n} words" if n > BARS else f"all {n} words" if n != 1 else "its one word"


def bars_title(r, what: str, words) -> str:
    return f"{r.neuron}: {what}\n{words_shown(words)}"


def featvis_clause(r, share: float = 0.1) -> str:
    """A warning when the feature visualisation does not drive the neuron (under ``share`` of the dataset's
    largest response): its images then show what the optimiser reached, not what the neuron detects."""
    if r.dataset_max > 0 and r.featvis_response < share * r.dataset_max:
        return (f" Its feature visualisation reaches {r.featvis_response:.3f} against the dataset's largest response "
                f"{r.dataset_max:.3f}: it does not drive the neuron (more --steps may).")
    return ""


def diverse_note(r, share: float = 0.1) -> str:
    """A warning naming the diverse feature visualisations that do not drive the neuron (under ``share`` of the
    dataset's largest response), as :func:`featvis_clause` warns of the main one."""
    weak = [f"{i + 1} ({v:.2f})" for i, v in enumerate(r.diverse_responses) if v < share * r.dataset_max]
    if r.dataset_max <= 0 or not weak:
        return ""
    return (f"Diverse {', '.join(weak)} reach{'es' if len(weak) == 1 else ''} under a tenth of the dataset's largest "
            f"response ({r.dataset_max:.3f}): {'it does' if len(weak) == 1 else 'they do'} not drive the neuron and "
            f"show{'s' if len(weak) == 1 else ''} what the optimiser reached, not a facet of the neuron.")


def reduce_words(reduce: str) -> str:
    """An image's response to a neuron in words (``reduce`` of :func:`mechscope.clip.methods.neurons.activations`)."""
    return {"mean": "the mean of its activation over the image's tokens",
            "max": "its largest activation over the image's tokens",
            "cls": "its activation at the class token"}.get(reduce, f"its activation reduced by {reduce}")  # fmt: skip


def best_column(result, c) -> int | None:
    """The column of concept ``c``'s best neuron in the multimodality's [concepts, neurons] arrays (layer-major, as
    :func:`mechscope.clip.methods.neurons.column_neuron` reads them), or None when it cannot be placed."""
    layers = list(result.layers)
    if c.layer not in layers or result.multimodality.n_neurons % len(layers) != 0:
        return None
    return layers.index(c.layer) * (result.multimodality.n_neurons // len(layers)) + c.unit


def reading_context(result, r) -> dict:
    """One neuron read in full: its figures, its top images' rows and what its bar charts show."""
    align = f"contribution · text embedding\n(over {top_set(r)})"
    return {"reading": r, "figure": F.reading_figure(r), "diverse": F.diverse_figure(r), "tops": F.top_image_rows(r),
            "probe": F.bars_figure(r.probe_words, r.probe_values,
                                   bars_title(r, "mean response to drawn words", r.probe_words), BARS),
            "align": F.bars_figure(r.aligned_words, r.aligned_values, bars_title(r, align, r.aligned_words), BARS),
            "note": bars_note(result, r), "diverse_note": diverse_note(r)}  # fmt: skip


def neurons_context(result) -> dict:
    mm = result.multimodality
    order = sorted(range(len(mm.concepts)), key=lambda i: -mm.concepts[i].score)
    scatters = []
    for i in order[:4]:
        c = mm.concepts[i]
        uri = F.scatter_figure(mm, i, best_column(result, c))
        if uri:
            scatters.append({"uri": uri, "concept": c})
    readings = [reading_context(result, r) for r in result.readings]
    return {"result": result, "summary": neurons_summary(result), "mm_figure": F.multimodality_figure(mm),
            "scatters": scatters, "readings": readings, "response": reduce_words(result.reduce),
            "cls_note": F.CLS_NOTE, "footer": footer()}  # fmt: skip


def attack_summary(result) -> list[str]:
    s = result.finding.summary
    true = result.classes[result.true_classes[0]] if result.true_classes else "the true class"
    lines = [
        f"Clean accuracy (all {s.n_images} images, before the attack) {s.clean_accuracy:.1%}; with {result.word!r} "
        f"written on them {s.attacked_accuracy:.1%}.",
        f"Attack success (prediction moves to {result.target!r}): {s.success_rate:.1%} of {s.n_counted} counted images "
        f"(any change of class: {s.success_rate_any:.1%}); margin logit[target] − logit[true] {s.margin_clean:.2f} → "
        f"{s.margin_attacked:.2f}.",
        ablated_line(result),
        control_line(result),
    ]
    if s.heldout_accuracy == s.heldout_accuracy:  # not NaN (results written before these fields lack them)
        lines.insert(3, f"Held-out attacked images classified as {true!r}: {s.heldout_accuracy:.1%} → "
                        f"{s.heldout_accuracy_ablated:.1%} with the top {s.k} ablated.")  # fmt: skip
    if s.given:
        lines.append(f"The neurons asked for ({', '.join(s.given)}) ablated instead: success {s.heldout_success:.1%} → "
                     f"{s.given_success:.1%}, classified as {true!r} {s.given_accuracy:.1%}, "
                     f"{undone_text(s.given_undone)}; clean accuracy of the held-out images with them ablated "
                     f"{clean_against(s, s.given_clean_accuracy)}.")  # fmt: skip
    return lines


ATTACK_SHIFT = "the attack's margin shift"


def undone_text(share: float, what: str = "the shift") -> str:
    """"34% of the shift undone", or words where the attack moved no margin (the share is NaN: nothing to undo)."""
    if share != share:
        return f"nothing of {what} to undo (the attack moved no margin)"
    return f"{share:.0%} of {what} undone"


def heldout_clean(s) -> str:
    """The held-out images' clean accuracy with nothing ablated: 100% by selection (only images classified correctly
    before the attack are counted), from the result where it records it."""
    before = s.heldout_clean_accuracy if s.heldout_clean_accuracy == s.heldout_clean_accuracy else 1.0
    return f"{before:.1%} before any ablation, by selection"


def clean_against(s, ablated: float) -> str:
    """A clean accuracy under ablation beside the held-out images' own before it (100% by selection)."""
    return f"{ablated:.1%} (against {heldout_clean(s)})"


def ablated_line(result) -> str:
    s = result.finding.summary
    top = ", ".join(n.neuron for n in result.finding.neurons[: s.k])
    return (f"Ablating the top {s.k} neurons ({top}) on the held-out half ({s.n_heldout} of the counted images, all "
            f"classified correctly before the attack): success {s.heldout_success:.1%} → "
            f"{s.heldout_success_ablated:.1%}, {undone_text(s.undone, ATTACK_SHIFT)}; their clean "
            f"accuracy with the {s.k} ablated {clean_against(s, s.heldout_clean_accuracy_ablated)}.")  # fmt: skip


def control_sets(result) -> int:
    """How many random sets of k neurons were ablated as the control (the setting, for results that lack the list)."""
    s = result.finding.summary
    return len(s.control_successes) if s.control_successes else int(result.settings.get("controls", 0) or 0)


def control_sd_kind(s) -> str:
    """Which sd the control's ± is: the sample sd (ddof 1) from the version that records each set's success on."""
    return "sample sd" if s.control_successes else "population sd"


def heldout_clean_ablated(result) -> str:
    """The CLI's short form: the held-out clean accuracy with the top k ablated, against 100% by selection."""
    s = result.finding.summary
    return f"{s.heldout_clean_accuracy_ablated:.1%} ablated, {heldout_clean(s)}"


def control_ran(result) -> bool:
    """Whether the attack ran its random control (--controls above 0: a mean success to compare with)."""
    s = result.finding.summary
    return control_sets(result) > 0 and s.control_success_mean == s.control_success_mean  # NaN: none


def control_words(result) -> str:
    """The CLI's short form of the control: how many random sets, their mean success and which sd."""
    s, n = result.finding.summary, control_sets(result)
    if not control_ran(result):
        return "no random control (--controls 0)"
    sd = f" ± {s.control_success_sd:.1%} ({control_sd_kind(s)})" if n > 1 else ""
    return f"{n} random set{'s' if n > 1 else ''} of {s.k} neurons: mean success {s.control_success_mean:.1%}{sd}"


def control_line(result) -> str:
    s, n = result.finding.summary, control_sets(result)
    if not control_ran(result):
        return f"No random control was run (--controls 0): nothing to compare the top {s.k}'s ablation with."
    spread = (f"{s.control_success_mean:.1%} ± {s.control_success_sd:.1%} (mean ± {control_sd_kind(s)} over the "
              f"{n} sets)" if n > 1 else f"{s.control_success_mean:.1%} (one set: no sd)")  # fmt: skip
    line = (f"Control: {n} random set{'s' if n > 1 else ''} of {s.k} neurons from the same layers, each ablated "
            f"instead of the top {s.k}: success {spread}, {undone_text(s.control_undone_mean)}")
    if s.control_success_mean > s.heldout_success:
        line += (f". On average the random ablations raised the attack's success above the {s.heldout_success:.1%} "
                 "it has on these images with nothing ablated")
        if s.control_successes:
            line += f" (above it in {sum(v > s.heldout_success for v in s.control_successes)} of the {n} sets)"
        if s.control_undone_mean < 0:
            line += ", and widened the margin shift (a negative share undone)"
    if s.control_successes:
        below = sum(v > s.heldout_success_ablated for v in s.control_successes)
        line += (f". The top {s.k} ablated ({s.heldout_success_ablated:.1%}) are below {below} of the {n} sets "
                 f"(their lowest {min(s.control_successes):.1%})")
    return line + "."


def attack_context(result) -> dict:
    f = result.finding
    return {"result": result, "summary": attack_summary(result), "footer": footer(),
            "summary_figure": F.attack_summary_figure(f.summary, f.summary.k, control_sets(result),
                                                      control_sd_kind(f.summary)),
            "effects": F.effects_figure(f.neurons),
            "examples": F.attack_examples_figure(f, result.classes)}  # fmt: skip
