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
                     f"{c.word_d:.2f}) against random neurons {c.control_mean:.2f} ± {c.control_sd:.2f} and the best "
                     f"mismatched pairing {c.null_max:.2f}.")  # fmt: skip
    for r in result.readings:
        lines.append(f"Neuron {r.neuron} ({r.why}): drawn words it responds to most: {', '.join(r.probe_words[:4])}; "
                     + aligned_clause(r) + featvis_clause(r))  # fmt: skip
    asked = result.settings.get("read", len(result.readings))
    if len(result.readings) < asked:  # the rest are read only when they are multimodal
        lines.append(f"{len(result.readings)} of the {asked} neurons asked for (--read) are read in full: after the "
                     "neurons named with --neuron (or, with none named, the best-scoring concept's neuron) only "
                     "multimodal neurons are read, and too few concepts have one here.")  # fmt: skip
    return lines


def aligned_clause(r) -> str:
    """The words its contribution aligns with, with the values: when every value is negative the words are only
    the least anti-aligned, and the sentence says so."""
    words = ", ".join(f"{w} ({v:+.2g})" for w, v in zip(r.aligned_words[:4], r.aligned_values[:4], strict=False))
    if r.aligned_values and max(r.aligned_values) < 0:
        return f"its contribution points away from the text of every word; least of all from {words}."
    return f"its contribution aligns most with the text of {words}."


def featvis_clause(r, share: float = 0.1) -> str:
    """A warning when the feature visualisation does not drive the neuron (under ``share`` of the dataset's
    largest response): its images then show what the optimiser reached, not what the neuron detects."""
    if r.dataset_max > 0 and r.featvis_response < share * r.dataset_max:
        return (f" Its feature visualisation reaches {r.featvis_response:.3f} against the dataset's largest response "
                f"{r.dataset_max:.3f}: it does not drive the neuron (more --steps may).")
    return ""


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


def neurons_context(result) -> dict:
    mm = result.multimodality
    order = sorted(range(len(mm.concepts)), key=lambda i: -mm.concepts[i].score)
    scatters = []
    for i in order[:4]:
        c = mm.concepts[i]
        uri = F.scatter_figure(mm, i, best_column(result, c))
        if uri:
            scatters.append({"uri": uri, "concept": c})
    readings = [{
        "reading": r, "figure": F.reading_figure(r), "diverse": F.diverse_figure(r), "tops": F.top_image_rows(r),
        "probe": F.bars_figure(r.probe_words, r.probe_values, f"{r.neuron}: response to drawn words"),
        "align": F.bars_figure(r.aligned_words, r.aligned_values, f"{r.neuron}: contribution · text embedding"),
    } for r in result.readings]  # fmt: skip
    return {"result": result, "summary": neurons_summary(result), "mm_figure": F.multimodality_figure(mm),
            "scatters": scatters, "readings": readings, "response": reduce_words(result.reduce),
            "cls_note": F.CLS_NOTE, "footer": footer()}  # fmt: skip


def attack_summary(result) -> list[str]:
    s = result.finding.summary
    top = ", ".join(n.neuron for n in result.finding.neurons[: s.k])
    true = result.classes[result.true_classes[0]] if result.true_classes else "the true class"
    lines = [
        f"Clean accuracy {s.clean_accuracy:.1%} of {s.n_images}; with {result.word!r} written on them "
        f"{s.attacked_accuracy:.1%}.",
        f"Attack success (prediction moves to {result.target!r}): {s.success_rate:.1%} of {s.n_counted} counted images "
        f"(any change of class: {s.success_rate_any:.1%}); margin logit[target] − logit[true] {s.margin_clean:.2f} → "
        f"{s.margin_attacked:.2f}.",
        f"Ablating the top {s.k} neurons ({top}) on the held-out half: success {s.heldout_success:.1%} → "
        f"{s.heldout_success_ablated:.1%}, {s.undone:.0%} of the attack's margin shift undone; clean accuracy with "
        f"them ablated {s.heldout_clean_accuracy_ablated:.1%}.",
        f"Control: {s.k} random neurons ablated: success {s.control_success_mean:.1%} ± {s.control_success_sd:.1%}, "
        f"{s.control_undone_mean:.0%} of the shift undone.",
    ]
    if s.heldout_accuracy == s.heldout_accuracy:  # not NaN (results written before these fields lack them)
        lines.insert(3, f"Held-out attacked images classified as {true!r}: {s.heldout_accuracy:.1%} → "
                        f"{s.heldout_accuracy_ablated:.1%} with the top {s.k} ablated.")  # fmt: skip
    if s.given:
        lines.append(f"The neurons asked for ({', '.join(s.given)}) ablated instead: success {s.heldout_success:.1%} → "
                     f"{s.given_success:.1%}, classified as {true!r} {s.given_accuracy:.1%}, {s.given_undone:.0%} of "
                     f"the shift undone; clean accuracy {s.given_clean_accuracy:.1%}.")  # fmt: skip
    return lines


def attack_context(result) -> dict:
    f = result.finding
    return {"result": result, "summary": attack_summary(result), "footer": footer(),
            "summary_figure": F.attack_summary_figure(f.summary, f.summary.k),
            "effects": F.effects_figure(f.neurons),
            "examples": F.attack_examples_figure(f, result.classes)}  # fmt: skip
