"""The summary of an explanation: sentences written from the numbers of an :class:`ExplainResult`.

Every number a sentence states is in a table or figure of the report. Class names come from the
dataset ("a 3", "a Sneaker"); ten digit classes are called digits, anything else classes.
"""

from __future__ import annotations

import numpy as np

from mechscope.core.render.html import counted


def noun(class_names) -> str:
    return "digit" if tuple(class_names) == tuple("0123456789") else "class"


_SAME_PLURAL = frozenset({"deer", "sheep", "fish", "moose", "bison", "series", "species", "aircraft"})
_IRREGULAR = {"person": "people", "man": "men", "woman": "women", "child": "children", "mouse": "mice",
              "goose": "geese", "foot": "feet", "tooth": "teeth", "ox": "oxen"}  # fmt: skip
_A_BEFORE_VOWEL = ("uni", "use", "usu", "uti", "ure", "eu", "one", "once", "ewe")  # a unicorn, a user, a ewe
_AN_BEFORE_H = ("hour", "honest", "honor", "honour", "heir")  # an hour


def plural(word: str) -> str:
    """English plurals of class names: 'boxes', 'cats', 'butterflies', 'deer', 'people', 'Ankle boots'."""
    word = str(word)
    last = word.rpartition(" ")[2]
    low = last.lower()
    if low in _SAME_PLURAL:
        return word
    if low in _IRREGULAR:
        many = _IRREGULAR[low]
        return word[: len(word) - len(last)] + (many.capitalize() if last[:1].isupper() else many)
    if len(low) > 1 and low.endswith("y") and low[-2] not in "aeiou":
        return f"{word[:-1]}ies"
    return f"{word}es" if low.endswith(("s", "x", "z", "ch", "sh")) else f"{word}s"


def article(name: str) -> str:
    """'an 8', 'a 3', 'an Ankle boot', 'a Shirt', 'a unicorn', 'an hourglass'."""
    s = str(name).lower()
    if s[:1].isdigit():
        vowel = s.startswith("8") or s in ("11", "18")
    else:
        vowel = (s[:1] in "aeiou" and not s.startswith(_A_BEFORE_VOWEL)) or s.startswith(_AN_BEFORE_H)
    return f"{'an' if vowel else 'a'} {name}"


def _pts(v: float) -> str:
    return f"{100 * v:.1f}"


# The thresholds behind the summary's words (stated in the sentences that use them).
READS_AS_MIN = 0.5  # a replacement "reads as" a class when the network calls at least this share of images that class
SPECIALIST_MIN = 0.005  # a channel is named when mean-ablating it costs one class at least 0.5 points
SPECIALISTS_SHOWN = 3  # the largest that get a sentence; the others are listed in one
NEGLIGIBLE = 0.001  # a channel whose mean-ablation costs under 0.1 points of test accuracy


def _called(share: float) -> str:
    return "every test image" if share >= 0.9995 else f"{_pts(share)}% of test images"


def donors_text(cs, word: str) -> str:
    """How the circuits' resample-ablation drew its donors, and the bias that follows."""
    if cs.resample_donors == "data":
        same = cs.resample_same_class_share
        own = "" if same is None else f"; {_pts(same)}% of the donors are of the image's own {word}"
        return (
            f"each image's channels taken from another test image drawn at random from the whole test set (seed "
            f"{cs.resample_seed}: the data distribution, as causal scrubbing resamples{own})"
        )
    return (
        f"each image's channels taken from a random test image of another {word} (seed {cs.resample_seed}); every "
        f"donor being of another {word} biases it the other way: it can overstate how much a {word} needs a channel"
    )


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
    if errors == 0:
        return f"Test accuracy {_pts(ov.test_accuracy)}% (no errors in {int(conf.sum()):,})."
    total = f"{errors} errors in {int(conf.sum()):,}"
    return f"Test accuracy {100 * ov.test_accuracy:.2f}% ({total}); {_confusions(conf, names)}."  # as the overview


def _confusions(conf: np.ndarray, names) -> str:
    """The most common confusion, or every one tied with it (up to three named, else counted)."""
    off = conf.copy()
    np.fill_diagonal(off, 0)
    n = int(off.max())
    tied = [f"{article(names[t])} read as {article(names[p])}" for t, p in zip(*np.nonzero(off == n), strict=True)]
    if len(tied) == 1:
        return f"the most common confusion is {tied[0]} ({counted(n, 'image')})"
    if len(tied) <= 3:
        return f"the most common confusions, {counted(n, 'image')} each, are {_and(tied)}"
    return f"{len(tied)} confusions tie as the most common, {counted(n, 'image')} each"


def _whole_stages(r, names, word) -> list[str]:
    ab = r.ablation
    stages = r.stage_names
    mean = " and ".join(f"{_pts(ab.whole_stage(s, 'mean').test_accuracy)}% ({s})" for s in stages)
    zero = " and ".join(f"{_pts(ab.whole_stage(s, 'zero').test_accuracy)}%" for s in stages)
    lines = [
        f"Mean-ablating every channel of a stage leaves {mean} test accuracy; chance is {100 / len(names):.0f}%. "
        f"Zero-ablating them: {zero}."
    ]
    cs = r.circuits
    st = cs.stage if cs.stage in stages else stages[-1]
    w = ab.whole_stage(st, "mean")
    k = w.reads_as
    share = float(w.predicted_share[k])
    if share >= READS_AS_MIN:
        lines.append(
            f"Mean-ablation is not neutral here: with every {st} channel at its mean the network calls "
            f"{_called(share)} {article(names[k])} (at least {READS_AS_MIN:.0%} counts as the mean {st} map reading "
            f"as that {word}), so mean-ablating {st} channels pushes images towards {names[k]} and cannot show that a "
            f"channel is needed for that {word}. The circuits below also report resample-ablation, "
            f"{donors_text(cs, word)}, which replaces the channels with values of real images instead of one fixed map."
        )
    else:
        lines.append(
            f"With every {st} channel at its mean the network's most common answer is {names[k]} ({_called(share)}; "
            f"under the {READS_AS_MIN:.0%} at which the mean map would read as one {word}). The circuits below also "
            f"report resample-ablation, {donors_text(cs, word)}."
        )
    return lines


def _and(items: list[str]) -> str:
    """"a", "a and b", "a, b and c"."""
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def _costliest(ov: np.ndarray) -> str:
    """The channel(s) whose ablation costs the most overall; every one tied at the largest cost is named."""
    if ov.min() > 0:
        return f"no channel costs test accuracy (each one's ablation raises it, by at least {_pts(ov.min())} points)"
    tied = [str(c) for c in np.flatnonzero(ov == ov.min())]
    cost = f"{_pts(-ov.min())} points of test accuracy"
    if len(tied) == 1:
        return f"the costliest is channel {tied[0]} ({cost})"
    if len(tied) == len(ov):
        return f"every channel costs the same ({cost})"
    return f"the costliest are channels {_and(tied)} ({cost} each)"


def _worst_pair(per: np.ndarray, names, word) -> str:
    """The (channel, class) pair(s) with the largest cost to one class; ties named (up to three, else counted)."""
    if per.min() > 0:
        return f"no channel costs any one {word} accuracy"
    tied = list(zip(*np.nonzero(per == per.min()), strict=True))
    cost = f"{_pts(-per.min())} points"
    if len(tied) == 1:
        c, k = tied[0]
        return f"the largest cost to one {word} is channel {c} on {word} {names[k]} ({cost})"
    if len(tied) <= 3:
        pairs = _and([f"channel {c} on {word} {names[k]}" for c, k in tied])
        return f"the largest cost to one {word}, {cost} each, is {pairs}"
    return f"the largest cost to one {word}, {cost}, is shared by {len(tied)} (channel, {word}) pairs"


def _per_stage_costs(r, names, word) -> list[str]:
    lines = []
    for st in r.ablation.stages:
        ov = st.mean_overall.numpy()
        lines.append(
            f"{st.stage}, one channel mean-ablated at a time (measured): {_costliest(ov)}; "
            f"{_worst_pair(st.mean.numpy(), names, word)}; {int((ov > -NEGLIGIBLE).sum())} of {len(ov)} channels "
            f"cost under {100 * NEGLIGIBLE:.1f} points each."
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
        if cost[c, d] >= SPECIALIST_MIN:
            found.append((cost[c, d], c, d, rest))
    found.sort(reverse=True)
    shown, more = found[:SPECIALISTS_SHOWN], found[SPECIALISTS_SHOWN:]
    m = len(found)
    every = {1: "the only channel", 2: "both channels"}.get(m, f"all {m} channels")
    which = f"the {len(shown)} largest of the {m} channels" if more else every
    lines = [
        f"{last.stage} channel {c}: mean-ablating it costs {word} {names[d]} {_pts(value)} points of its accuracy and "
        f"no other {word} more than {_pts(max(rest, 0.0) + 0.0)} (named: {which} costing one {word} at least "
        f"{100 * SPECIALIST_MIN:.1f} points, largest first); its mean activation is highest on {word} "
        f"{_runner_up(sel, c, names, word)}, with the centre of mass of its map on those images in the "
        f"{sel.region_on_preferred_class[c]} of the image."
        for value, c, d, rest in shown
    ]
    if more:
        lines.append(
            f"The other {len(more)} {last.stage} channels costing one {word} at least {100 * SPECIALIST_MIN:.1f} "
            "points: " + "; ".join(f"{c} ({word} {names[d]}, {_pts(value)})" for value, c, d, _ in more) + "."
        )
    return lines


def _runner_up(sel, c: int, names, word) -> str:
    """'3 (mean 1.71; next 4, 1.69; selectivity 0.26)': the preferred class beside the next one, so that a channel
    whose classes are all alike does not read as preferring one."""
    means = sel.class_means[c].float()
    first, second = means.argsort(descending=True)[:2].tolist() if len(means) > 1 else (int(means.argmax()), None)
    nxt = "" if second is None else f"; next {word} {names[second]}, {float(means[second]):.2f}"
    return f"{names[first]} (mean {float(means[first]):.2f}{nxt}; selectivity {float(sel.index[c]):.2f})"


def _at_size(circ, size: int, names, word) -> str:
    """Every class whose circuit has ``size`` channels: "digit 3", "digits 6, 8 and 9"."""
    at = [str(names[c.target]) for c in circ if c.size == size]
    return f"{word} {at[0]}" if len(at) == 1 else f"{plural(word)} {_and(at)}"


def _held_out(cs, names, word) -> str:
    """The criterion on the held-out images beside its margin on the test images the search chose the circuits on
    (a search that stops as soon as the criterion holds passes it narrowly there by design)."""
    held = [(c, ok) for c in cs.circuits if (ok := cs.held_out_met(c)) is not None]
    if not held:
        return ""
    met = [str(names[c.target]) for c, ok in held if ok]
    short = [(c.held_out_full_accuracy - c.held_out_sufficiency, c) for c, _ in held]
    worst = max(short, key=lambda x: x[0])
    over = max(c.held_out_other_classes_called_circuit - c.held_out_other_classes_called_full for c, _ in held)
    margins = [c.margin for c in cs.circuits if c.meets_criterion]
    on_test = f"where the margin is at most {_pts(max(margins))} points; " if margins else ""
    which = f" ({plural(word)} {_and(met)})" if len(met) > 1 else (f" ({word} {met[0]})" if met else "")
    lo, hi = _pts(min(s for s, _ in short)), _pts(worst[0])
    if lo != hi:
        below = f"{lo} to {hi} points below the full model's ({word} {names[worst[1].target]} the most)"
    else:  # one figure for every class: no class is "the most"
        below = f"{hi} points below the full model's" + (f" for each {word}" if len(held) > 1 else "")
    return (
        f"These are the smallest sets for the test images the search ran on, {on_test}on held-out images the "
        f"search never saw ({cs.held_out_check}), {len(met)} of {len(held)} meet "
        f"the criterion{which}: with only the circuit, a {word}'s accuracy there is {below}, and other "
        f"{plural(word)} are called it up to {_pts(max(over, 0.0))} points more often."
    )


def _circuits(r, names, word) -> list[str]:
    cs = r.circuits
    circ = cs.circuits
    if not circ:
        return []
    stage = cs.stage
    n_ch = len(r.selectivity_of(stage).index)
    sizes = [c.size for c in circ]
    met = sum(c.meets_criterion for c in circ)
    lines = [
        f"Per-{word} circuits in {stage}: {met} of {len(circ)} meet the criterion (with every other channel "
        f"mean-ablated, the {word}'s accuracy within {_pts(cs.tolerance)} points of the full model's and other "
        f"{plural(word)} not called that {word} more often than by the full model, within the same margin; no channel "
        f"can be dropped and no two traded for one). Sizes run from {counted(min(sizes), 'channel')} "
        f"({_at_size(circ, min(sizes), names, word)}) to {max(sizes)} ({_at_size(circ, max(sizes), names, word)}), "
        f"mean {np.mean(sizes):.1f} of {n_ch}."
    ]
    lines += [x for x in [_held_out(cs, names, word)] if x]
    for c in circ:
        lines.append(
            f"{word.capitalize()} {names[c.target]}: {stage} channels {', '.join(map(str, c.channels))} alone keep "
            f"{_pts(c.sufficiency)}% (full model {_pts(c.full_accuracy)}%); mean-ablating just them leaves "
            f"{_pts(c.necessity)}%, resample-ablating them {_pts(c.necessity_resample)}%; with only them, "
            f"{_pts(c.other_classes_called_circuit)}% of other {plural(word)} are called {names[c.target]} (full model "
            f"{_pts(c.other_classes_called_full)}%)." + _feeder_text(cs, c, names, word)
        )
    resampled = [c.necessity_resample for c in circ]
    meaned = [c.necessity for c in circ]
    lower = sum(a < b for a, b in zip(resampled, meaned, strict=True))
    donors = "donors from the data distribution" if cs.resample_donors == "data" else f"donors of other {plural(word)}"
    share = cs.resample_same_class_share
    other = "" if share is None else f", {_pts(1 - share)}% of them of another {word},"
    lines.append(
        f"Resample-ablating a circuit ({donors}) leaves its {word} less accuracy than mean-ablating it for {lower} of "
        f"{len(circ)} {plural(word)} (median {_pts(float(np.median(resampled)))}% against "
        f"{_pts(float(np.median(meaned)))}%). Neither is a neutral 'off': mean-ablation puts one fixed map in its "
        f"place (what it reads as is above) and resampling another image's values{other} with that image's "
        f"evidence; how much a {word} needs its circuit depends on what replaces it."
    )
    lines += [x for x in [vacuous_sentence(r, names, word)] if x]
    shared = cs.membership()
    most = max(len(ds) for ds in shared.values())
    tied = sorted(ch for ch, ds in shared.items() if len(ds) == most)
    none = f"{n_ch - len(shared)} of {n_ch} channels are in none"
    if len(tied) == 1:
        ds = shared[tied[0]]
        lines.append(
            f"{stage} channel {tied[0]} is in the most circuits ({most}: {plural(word)} "
            f"{', '.join(names[d] for d in ds)}; no other channel is in more than "
            f"{max([len(v) for k, v in shared.items() if k != tied[0]] or [0])}); {none}."
        )
    else:
        lines.append(
            f"No {stage} channel is in more than {most} circuit{'s' * (most != 1)}: {len(tied)} channels are in "
            f"{most} ({', '.join(map(str, tied[:8]))}{', …' if len(tied) > 8 else ''}); {none}."
        )
    return lines


def _feeder_text(cs, c, names, word) -> str:
    """The circuit's largest input from the previous stage, said to be an activation × gradient estimate, with the
    total its share is of."""
    if not c.feeders:
        return ""
    f0 = c.feeders[0]
    n = len(c.feeders_all) if c.feeders_all is not None else None
    of = f"all {n} {cs.feeder_stage} channels" if n else f"the {cs.feeder_stage} channels"
    return (
        f" By activation × gradient (a first-order estimate, not an ablation), its largest {cs.feeder_stage} input "
        f"is channel {f0.channel}: {100 * f0.share:.0f}% of the summed |contribution| of {of} to the circuit "
        f"channels' total activation on {word} {names[c.target]} images."
    )


def vacuous_sentence(r, names, word) -> str | None:
    """When the mean of the circuits' stage reads as a class, that class's mean-ablation tests are vacuous: say so."""
    cs = r.circuits
    stage = cs.stage
    w = r.ablation.whole_stage(stage, "mean")
    k = w.reads_as
    c = cs.get(k)
    share = float(w.predicted_share[k])
    if c is None or share < READS_AS_MIN:
        return None
    empty = float(w.per_class[k])
    met = empty >= c.full_accuracy - cs.tolerance
    first = (
        f"its accuracy half is met by the empty set ({_pts(empty)}% of the {plural(names[k])} called {names[k]} "
        f"with every "
        f"{stage} channel at its mean, full model {_pts(c.full_accuracy)}%), and "
        if met
        else ""
    )
    return (
        f"For the {plural(names[k])}, the {word} the mean {stage} map reads as (with every {stage} channel "
        f"mean-ablated the "
        f"network calls {_called(share)} {article(names[k])}), the circuit's mean-ablation tests are vacuous: {first}"
        f"mean-ablating its channels pushes images towards {names[k]}, so the {_pts(c.necessity)}% it leaves cannot "
        f"show that the {plural(names[k])} need them."
        + (
            f" With the accuracy half met by no channel at all, the circuit's {counted(c.size, 'channel')} "
            f"{'meets' if c.size == 1 else 'meet'} the other "
            f"half: keeping the other {plural(word)} from being called {names[k]} "
            f"({_pts(c.other_classes_called_circuit)}% "
            f"of them with only the circuit, full model {_pts(c.other_classes_called_full)}%"
            + ("; with no channel kept, every image)." if share >= 0.9995 else ").")
            if met
            else ""
        )
        + f" Resample-ablating them, which has no pull towards {names[k]}, leaves {_pts(c.necessity_resample)}%."
    )


def _patching(r, names) -> str:
    pt = r.patching
    last = pt.stages[-1]
    u = last.top_units[0]
    whole = []
    for st in pt.stages:
        ch, sd = st.channel_mean.numpy(), st.channel_std.numpy()
        b = int(np.abs(ch).argmax())
        whole.append(f"{st.stage} channel {b} ({100 * ch[b]:.0f}% ± {100 * sd[b]:.0f})")
    asked = (r.settings or {}).get("n_pairs")
    fewer = (f", all there are of correctly classified images of the two classes (--pairs asked for {asked})"
             if asked is not None and pt.pairs < asked else "")  # fmt: skip
    return (
        f"Activation patching from {article(names[pt.clean_class])} into {article(names[pt.corrupted_class])} "
        f"({pt.pairs} pairs{fewer}; one unit or channel of the {names[pt.clean_class]} image put into the "
        f"{names[pt.corrupted_class]} image's forward pass, measured): the single {last.stage} unit that moves the "
        f"logit difference most is channel {u.channel} at ({u.y}, {u.x}) ({100 * u.recovered:.0f}% of the gap between "
        f"the two images' logit differences restored, mean over pairs); the whole channels that move it most, one "
        f"stage at a time: {_and(whole[::-1])}, ± the sd over pairs."
    )
