"""The summary of an explanation: sentences written from the numbers of an :class:`ExplainResult`.

Every number a sentence states is in a table or figure of the report. Class names come from the
dataset ("a 3", "a Sneaker"); ten digit classes are called digits, anything else classes.
"""

from __future__ import annotations

import numpy as np


def noun(class_names) -> str:
    return "digit" if tuple(class_names) == tuple("0123456789") else "class"


def plural(word: str) -> str:
    return f"{word}es" if word.endswith("s") else f"{word}s"


def article(name: str) -> str:
    """'an 8', 'a 3', 'an Ankle boot', 'a Shirt'."""
    s = str(name).lower()
    vowel = s[:1] in "aeiou" if not s[:1].isdigit() else (s.startswith("8") or s in ("11", "18"))
    return f"{'an' if vowel else 'a'} {name}"


def _pts(v: float) -> str:
    return f"{100 * v:.1f}"


def summarise(r, linked: dict | None = None) -> list[str]:
    """Sentences from the fields of ``r`` (an :class:`~mechscope.cnn.methods.explained.ExplainResult`)."""
    names, word = r.class_names, noun(r.class_names)
    lines = [_accuracy(r, names)]
    lines += _whole_stages(r, names, word)
    lines += _per_stage_costs(r, names, word)
    lines += _specialists(r, names, word)
    lines += _circuits(r, names, word)
    if r.patching is not None:
        lines.append(_patching(r, names))
    fv = (linked or {}).get("featvis")
    if fv and fv.get("summary"):
        s = fv["summary"]
        lines.append(
            f"Feature visualisation (from {fv['dir']}): {s.get('exceed_dataset_max')} of {s.get('units')} units "
            "reach a higher activation than any test image."
        )
    tuning = (linked or {}).get("tuning")
    if tuning and not tuning.get("stale"):
        from mechscope.cnn.report.tuning import microscope_sentence

        lines += [s for s in [microscope_sentence(tuning)] if s]
    return lines


def _accuracy(r, names) -> str:
    ov = r.overview
    conf = np.array(ov.confusion_matrix)
    errors = int(conf.sum() - np.trace(conf))
    t, p, n = ov.most_confused
    if errors == 0:
        return f"Test accuracy {_pts(ov.test_accuracy)}% (no errors in {int(conf.sum()):,})."
    return (
        f"Test accuracy {_pts(ov.test_accuracy)}% ({errors} errors in {int(conf.sum()):,}); the most common "
        f"confusion is {article(names[t])} read as {article(names[p])} ({n} images)."
    )


def _whole_stages(r, names, word) -> list[str]:
    ab = r.ablation
    stages = r.stage_names
    mean = " and ".join(f"{_pts(ab.whole_stage(s, 'mean').test_accuracy)}% ({s})" for s in stages)
    zero = " and ".join(f"{_pts(ab.whole_stage(s, 'zero').test_accuracy)}%" for s in stages)
    lines = [
        f"Mean-ablating every channel of a stage leaves {mean} test accuracy; chance is {100 / len(names):.0f}%. "
        f"Zero-ablating them: {zero}."
    ]
    last = stages[-1]
    w = ab.whole_stage(last, "mean")
    k = w.reads_as
    share = float(w.predicted_share[k])
    called = "every test image" if share >= 0.9995 else f"{_pts(share)}% of test images"
    lines.append(
        f"Mean-ablation is not neutral here: with every {last} channel at its mean the network calls {called} "
        f"{article(names[k])} (the mean {last} map reads as {article(names[k])}), so mean-ablating {last} channels "
        f"pushes images towards {names[k]} and cannot show that a channel is needed for that {word}. The circuits "
        f"below also report resample-ablation (each image's channels taken from a random image of another {word}), "
        "which has no such bias."
    )
    return lines


def _per_stage_costs(r, names, word) -> list[str]:
    lines = []
    for st in r.ablation.stages:
        ov = st.mean_overall.numpy()
        per = st.mean.numpy()
        c = int(ov.argmin())
        worst = np.unravel_index(per.argmin(), per.shape)
        lines.append(
            f"{st.stage}: the costliest single channel to mean-ablate is channel {c} ({_pts(-ov[c])} points of test "
            f"accuracy); the largest cost to one {word} is channel {worst[0]} on {word} {names[worst[1]]} "
            f"({_pts(-per[worst])} points); {int((ov > -0.001).sum())} of {len(ov)} channels cost under 0.1 points "
            "each."
        )
    return lines


def _specialists(r, names, word) -> list[str]:
    last = r.ablation.stages[-1]
    sel = r.selectivity_of(last.stage)
    cost = -last.mean.numpy()  # [C, K]
    found = []
    for c in range(cost.shape[0]):
        d = int(cost[c].argmax())
        rest = np.delete(cost[c], d).max() if cost.shape[1] > 1 else 0.0
        if cost[c, d] >= 0.005:
            found.append((cost[c, d], c, d, rest))
    return [
        f"{last.stage} channel {c} is most active on {word} {names[sel.preferred_class[c]]} (selectivity "
        f"{float(sel.index[c]):.2f}), mostly in the {sel.region_on_preferred_class[c]} of the image; mean-ablating it "
        f"costs {word} {names[d]} {_pts(value)} points and no other {word} more than {_pts(max(rest, 0.0) + 0.0)}."
        for value, c, d, rest in sorted(found, reverse=True)[:3]
    ]


def _circuits(r, names, word) -> list[str]:
    cs = r.circuits
    circ = cs.circuits
    if not circ:
        return []
    stage = cs.stage
    n_ch = len(r.selectivity_of(stage).index)
    sizes = [c.size for c in circ]
    met = sum(c.meets_criterion for c in circ)
    small, large = circ[int(np.argmin(sizes))], circ[int(np.argmax(sizes))]
    lines = [
        f"Per-{word} circuits in {stage}: {met} of {len(circ)} meet the criterion (with every other channel "
        f"mean-ablated, the {word}'s accuracy within {_pts(cs.tolerance)} points of the full model's and other "
        f"{plural(word)} not called that {word} more often than by the full model, within the same margin; no channel "
        f"can be dropped and no two traded for one). Sizes run from {small.size} channels "
        f"({word} {names[small.target]}) to {large.size} ({word} {names[large.target]}), "
        f"mean {np.mean(sizes):.1f} of {n_ch}."
    ]
    for c in circ:
        f0 = c.feeders[0] if c.feeders else None
        lines.append(
            f"{word.capitalize()} {names[c.target]}: {stage} channels {', '.join(map(str, c.channels))} alone keep "
            f"{_pts(c.sufficiency)}% (full model {_pts(c.full_accuracy)}%); mean-ablating just them leaves "
            f"{_pts(c.necessity)}%, resample-ablating them {_pts(c.necessity_resample)}%; with only them, "
            f"{_pts(c.other_classes_called_circuit)}% of other {plural(word)} are called {names[c.target]} (full model "
            f"{_pts(c.other_classes_called_full)}%)."
            + (
                f" Their strongest {cs.feeder_stage} input is channel {f0.channel} "
                f"({100 * f0.share:.0f}% of the total)."
                if f0
                else ""
            )
        )
    resampled = [c.necessity_resample for c in circ]
    meaned = [c.necessity for c in circ]
    lower = sum(a < b for a, b in zip(resampled, meaned, strict=True))
    verdict = (
        f": by this measure mean-ablation understates how much the {plural(word)} need their circuits"
        if 2 * lower > len(circ)
        else ""
    )
    lines.append(
        f"Resample-ablating a circuit leaves its {word} less accuracy than mean-ablating it for {lower} of "
        f"{len(circ)} {plural(word)} (median {_pts(float(np.median(resampled)))}% against "
        f"{_pts(float(np.median(meaned)))}%){verdict}."
    )
    w = r.ablation.whole_stage(stage, "mean")
    k = w.reads_as
    c = cs.of(k)
    if c is not None:
        share = float(w.predicted_share[k])
        called = "every test image" if share >= 0.9995 else f"{_pts(share)}% of test images"
        lines.append(
            f"For the {names[k]}s, the {word} the mean reads as, the circuit's job is mostly to say "
            f'"not {names[k]}": with every {stage} channel mean-ablated the network calls {called} '
            f"{article(names[k])}; keeping the circuit's {c.size} channels brings that down to "
            f"{_pts(c.other_classes_called_circuit)}% of the other {plural(word)}."
        )
    shared = cs.membership()
    ch, ds = max(shared.items(), key=lambda kv: (len(kv[1]), -kv[0]))
    lines.append(
        f"{stage} channel {ch} is in the most circuits ({len(ds)}: {plural(word)} {', '.join(names[d] for d in ds)}); "
        f"{n_ch - len(shared)} of {n_ch} channels are in none."
    )
    return lines


def _patching(r, names) -> str:
    pt = r.patching
    last = pt.stages[-1]
    u = last.top_units[0]
    ch = last.channel_mean.numpy()
    best = int(np.abs(ch).argmax())
    return (
        f"Patching from {article(names[pt.clean_class])} into {article(names[pt.corrupted_class])} ({pt.pairs} pairs): "
        f"the single {last.stage} unit that moves the logit difference most is channel {u.channel} at ({u.y}, {u.x}) "
        f"({100 * u.recovered:.0f}% of the gap on average); the strongest whole channel is {best} "
        f"({100 * ch[best]:.0f}%)."
    )
