"""Figures and rows both wings' discovery and scrubbing reports share: the faithfulness curve of a circuit
(:class:`~mechscope.core.graphs.FaithfulnessCurve`) and the breakdown of a causal scrub
(:class:`~mechscope.core.scrub.ScrubResult`)."""

from __future__ import annotations

import math
import textwrap

import numpy as np
from matplotlib.ticker import PercentFormatter

from mechscope.core.render import layout as CL
from mechscope.core.render.figures import subplots
from mechscope.core.render.html import figure_data_uri

METRIC_WORDS = {  # what each metric of either wing's tasks measures, and in what unit (natural logs: nats)
    "loss": "cross-entropy of the right label, in nats",
    "logprob": "log-probability of the right label, in nats",
    "kl": "KL divergence of the output distribution from the clean run's, in nats",
    "logit": "the right label's logit",
    "logit_diff": "a difference of logits, in logit units",
    "accuracy": "the fraction predicted right, 0 to 1",
    "detect": "the fraction of images where \"predicted the class\" agrees with \"is the class\", 0 to 1",
    "projection": "where the output lies from the corrupted run's (0) to the clean run's (1)",
    "mse": "mean squared difference from the clean run's output, in the output's units squared",
}


def metric_words(name: str, better: str | None) -> str:
    """``name`` (what it measures, its unit; which way is better), for a report's header."""
    way = f"{better} is better" if better else "direction unknown"
    return f"{name} ({METRIC_WORDS[name]}; {way})" if name in METRIC_WORDS else f"{name} ({way})"


def faithfulness_figure(curve, title: str = "") -> str | None:
    """The metric with the top edges kept against random circuits (a data URI), or None without a curve."""
    if curve is None:
        return None
    fig, ax = subplots(figsize=(6.5, 3.6), layout="constrained")
    CL.draw_faithfulness(ax, curve.fractions, curve.faithfulness, curve.random_mean, curve.random_sd,
                         curve.faithfulness_absolute, label=curve.method,
                         ranked="signed score" if curve.cpr_ranking == "signed" else "|score|")  # fmt: skip
    ax.set_title(title or f"faithfulness of the top edges ({curve.method}, {curve.ablation} ablation)", fontsize=9)
    return figure_data_uri(fig)


ABLATED_VALUE = {"patch": "the corrupted input's value", "mean": "its mean over the corrupted batch", "zero": "zero"}


def strongest(scores, k: int = 30) -> tuple[list[int], str]:
    """The ``k`` edges of the largest |score| that score at all, and a note on those left out for scoring 0 (an
    edge ACDC never tried, one no gradient reaches)."""
    ids = [int(e) for e in scores.order()[:k] if scores.scores[e] != 0]
    zero = int(np.sum(np.asarray(scores.scores) == 0))
    return ids, (f"{zero:,} of the {scores.graph.n_edges:,} edges score exactly 0 and are not listed." if zero else "")


def score_words(result) -> str:
    """What an edge's score is, for the caption under the circuit figure (ACDC's depends on its search order)."""
    value = ABLATED_VALUE.get(result.settings.get("ablation"), "the corrupted input's value")
    if result.method == "acdc":
        return (f"ACDC's measured change of the metric when it removed that edge (it then carries {value}) with every "
                "edge it had removed before it already removed, so it depends on the search order; an edge ACDC "
                "never tried (its receiver no longer mattered) scores 0")  # fmt: skip
    how = {"edge-patching": "measured", "eap": "estimated, to first order,",
           "eap-ig": "estimated (gradients averaged from the corrupted input to the clean one)"}.get(
        result.method, "estimated")  # fmt: skip
    return f"the {how} change of the metric when that edge alone carries {value}"


def curve_words(curve) -> str:
    """The caption of the faithfulness figure: what is drawn, the axis, what CPR and CMD are areas over."""
    value = ABLATED_VALUE.get(curve.ablation, curve.ablation)
    one = CL.same_curve(curve.faithfulness, curve.faithfulness_absolute)  # as the figure draws them
    drawn = ("the two rankings give one curve, drawn once" if one
             else "both curves are drawn, so the two areas need not add to 1")  # fmt: skip
    return (f"The metric with only the top k% of edges kept (every other edge carries {value}), normalised so that "
            "the full model is 1 and the empty circuit 0; the x axis is logarithmic. CPR is the area under the curve "
            "of the edges ranked as the method scores them (by signed score where the metric has a better direction), "
            "CMD the area between 1 and the curve of the edges ranked by |score| (MIB's convention; " + drawn + "). "
            "Both areas are taken over the fraction of edges on a linear scale, as MIB takes them" + _weight(curve)
            + (f"; the random baseline ranks the edges in {curve.n_random} seeded random "
               f"order{'s' * (curve.n_random != 1)}." if curve.n_random else "; no random baseline was drawn."))


def _weight(curve) -> str:
    """How much of the areas' width the plot's points from 10% up make, against their share of the log axis."""
    lo, hi = min(curve.fractions), max(curve.fractions)
    if not 0 < lo < 0.1 < hi:
        return ""
    plot, width = math.log(hi / 0.1) / math.log(hi / lo), (hi - 0.1) / (hi - lo)
    return (f", so the points from 10% up, {plot:.0%} of the plot's width, make {width:.0%} of the width the areas "
            "are taken over")


ROUNDING = 1e-6  # a score at most this share of the largest is float rounding, not an effect


def discovery_lines(result, name: str) -> list[str]:
    """The summary lines both wings' discovery reports open with: what was scored, the drawn circuit and what it
    does alone, the faithfulness areas (which curve each comes from), and caveats the numbers call for."""
    s, f, drawn = result.scores, result.faithfulness, result.circuit_faithfulness
    out = [
        f"{result.method} on {name}: {s.graph.n_edges:,} edges scored for the {result.metric} metric "
        f"({result.task_description}) in {s.seconds:.1f} s ({s.forward_passes} forward, {s.backward_passes} "
        f"backward passes); {_ends(s)}.",
        f"The circuit: {len(result.circuit)} edges over {len(result.circuit.nodes)} nodes.",
    ]
    out[-1] += _dangling(result)
    if drawn is not None and f is not None:
        out[-1] += (f" Alone (every other edge carries {ABLATED_VALUE.get(f.ablation, f.ablation)}) it gives "
                    f"{drawn['metric']:.4g}: {_share(drawn)}.")  # fmt: skip
    if f is not None:
        ranked = "by signed score" if f.cpr_ranking == "signed" else "by |score|"
        out.append(
            f"Faithfulness over circuit sizes (MIB): CPR {f.cpr:.3f}, the area under the curve of the edges ranked "
            f"{ranked} ({_random_cpr(f)}); CMD {f.cmd:.3f}, the area between 1 and the curve of the edges ranked "
            f"by |score|{f' (random {f.random_cmd:.3f})' if f.n_random else ''}."
        )
    return out + _caveats(result)


def _random_cpr(f) -> str:
    """The random baseline's CPR as its draws allow: mean ± sd, one draw's value ("± nan" before), or none."""
    if not f.n_random:
        return "no random circuits drawn"
    if f.n_random == 1:
        return f"one random circuit {f.random_cpr:.3f}, no spread from one"
    return f"random circuits {f.random_cpr:.3f} ± {f.random_cpr_sd:.3f}"


def cli_lines(result) -> list[str]:
    """What ``discover`` prints for both wings: the scores, the circuit (and what it does alone), the areas."""
    s, f, drawn = result.scores, result.faithfulness, result.circuit_faithfulness
    g = s.graph
    out = [
        f"{result.method}: {s.graph.n_edges:,} edges scored in {s.seconds:.1f} s ({s.forward_passes} forward, "
        f"{s.backward_passes} backward passes); {result.metric} {_ends(s)}",
        f"circuit: {len(result.circuit)} edges ({int(_on_path(result).sum())} on a path from the input to the output), "
        f"{len(result.circuit.nodes)} nodes; strongest: "
        + (", ".join(f"{g.edges[e][0]}->{g.receiver_name(int(g.edge_receiver[e]))} {s.scores[e]:+.4g}"
                     for e in strongest(s, 5)[0]) or "none (every edge scores 0)"),
    ]
    if drawn is not None:
        out.append(f"the circuit alone: {result.metric} {drawn['metric']:.4g}, {_share(drawn)}")
    if f is not None:
        cpr, cmd = ((f" (random {f.random_cpr:.3f})", f" (random {f.random_cmd:.3f})") if f.n_random
                    else ("", " (no random baseline drawn)"))  # fmt: skip
        out.append(f"faithfulness: CPR {f.cpr:.3f}{cpr}, CMD {f.cmd:.3f}{cmd}")
    return out


def _on_path(result) -> np.ndarray:
    """Whether each of the circuit's edges lies on a path of its edges from the input to the output (a cut of the
    ranking need not join up: the top edges can all be of two kinds with none between them)."""
    g = result.scores.graph
    return g.on_path([g.edge_id(*e) for e in result.circuit.edges])


def _dangling(result) -> str:
    on = _on_path(result)
    if on.all():
        return ""
    if not on.any():
        hint = ("ACDC pruned the edges between them; a lower --threshold keeps more" if result.method == "acdc"
                else "a larger --size may join them")  # fmt: skip
        return (" None of its edges lies on a path from the input to the output: they do not join up, so alone it "
                f"passes nothing of the input on ({hint}).")
    return (f" {int((~on).sum())} of its edges lie on no path from the input to the output (they join nothing up, so "
            "alone they pass nothing of the input on).")


def _ends(s) -> str:
    """The metric on the clean input and on the corrupted one; under mean or zero ablation the corrupted inputs give
    only the mean (or the shapes), and no metric is taken on them."""
    clean = f"clean {s.metric_clean:.4g}"
    if math.isfinite(s.metric_corrupted):
        return f"{clean}, corrupted {s.metric_corrupted:.4g}"
    return f"{clean} (no corrupted metric: removed edges carry the corrupted batch's mean, or zero)"


def _share(drawn: dict) -> str:
    """The drawn circuit's share of the way from the empty circuit to the full model, with both ends."""
    return (f"{drawn['faithfulness']:.1%} of the way from the empty circuit ({drawn['metric_empty']:.4g}) to the full "
            f"model ({drawn['metric_full']:.4g})")  # fmt: skip


def _caveats(result) -> list[str]:
    s, out = result.scores, []
    scores = np.abs(np.asarray(s.scores, dtype=float))
    top, gap = float(scores.max(initial=0.0)), abs(s.metric_corrupted - s.metric_clean)
    if result.method == "eap" and math.isfinite(gap) and gap > 0 and top < 0.01 * gap:
        out.append(
            f"EAP's largest |score| is {top:.2g}, {top / gap:.2%} of the change corrupting the input makes "
            f"({gap:.4g}): its first-order estimate is far below the effects, as when the metric is saturated at the "
            "clean run (its gradient near zero there); EAP-IG or ACDC measure them."
        )
    small = rounding_level(result)
    if small and result.method in ("eap", "eap-ig"):  # a gradient's estimate, not a measurement of the edge
        out.append(
            f"{small} of the circuit's {len(result.circuit)} edges score at rounding level (|score| at most "
            f"{ROUNDING:g} of the largest). From a gradient that is not a measurement: an edge the metric needs can "
            "score so where attention or an activation is saturated (tracr's compiled layers are), and so can an "
            "edge with no effect; which of them enter the circuit, and how the ranking scores below order them, is "
            "arbitrary. --method edge-patching or acdc ablate each edge and measure it."
        )
    elif small:
        out.append(
            f"{small} of the circuit's {len(result.circuit)} edges score at rounding level (|score| at most "
            f"{ROUNDING:g} of the largest): which of those enter the circuit is arbitrary."
        )
    return out


def rounding_level(result) -> int:
    """How many of the circuit's edges score at rounding level (|score| at most ROUNDING of the largest)."""
    top = float(np.abs(np.asarray(result.scores.scores, dtype=float)).max(initial=0.0))
    circuit = np.abs(np.asarray(result.circuit.scores, dtype=float))
    return int(np.sum(circuit <= ROUNDING * top)) if top > 0 else 0


def scrub_figure(scrub, title: str = "") -> str:
    """Behaviour recovered: the hypothesis, each claim alone (the rest clean) and the unclaimed edges alone."""
    names = ["hypothesis"] + [c.name for c in scrub.claims] + (["the unclaimed edges"] if scrub.unclaimed else [])
    vals = [scrub.recovered] + [c.recovered for c in scrub.claims] + (
        [scrub.unclaimed.recovered] if scrub.unclaimed else [])  # fmt: skip
    span = abs(scrub.metric_clean - scrub.metric_random)
    parts = list(scrub.claims) + ([scrub.unclaimed] if scrub.unclaimed else [])
    errs = np.nan_to_num([scrub.recovered_sd] + [c.metric_sd / span if span > 0 else 0.0 for c in parts])  # as shares
    built = [False] + [not c.measured for c in parts]  # the clean model by construction: drawn hollow, not run
    width = 5.0 + 0.065 * max(len(n) for n in names)  # room for the claims' names beside the bars
    fig, ax = subplots(figsize=(width, 0.9 + 0.38 * len(names)), layout="constrained")
    y = np.arange(len(names))[::-1]
    colors = ["#1b9e77"] + ["none" if b else "#7570b3" for b in built[1:]]
    ax.barh(y, vals, xerr=errs, color=colors, edgecolor=["#7570b3" if b else "none" for b in built], ecolor="#333",
            capsize=2)  # fmt: skip
    ends = [v - e if v < 0 else v + e for v, e in zip(vals, errs, strict=True)]  # each bar's end beyond its error bar
    for yi, v, end, b in zip(y, vals, ends, built, strict=True):  # labels there (left of a negative bar)
        text = " 100% by construction (not run)" if b else f" {v:.1%}" if v >= 0 else f"{v:.1%} "
        ax.text(end, yi, text, va="center", ha="left" if v >= 0 else "right", fontsize=8)
    low, high = min(0.0, *ends), max(1.0, *ends)
    ax.set_xlim(low - 0.15 * (high - low) * (low < 0), high + 0.12 * (high - low))  # room for the labels
    ax.set_yticks(y)
    ax.set_yticklabels(names, fontsize=8)
    ax.axvline(1.0, color="#999", lw=0.8, ls=":")
    ax.axvline(0.0, color="#555", lw=0.6)
    ax.xaxis.set_major_formatter(PercentFormatter(1.0))  # the bars' labels are percentages too
    ax.set_xlabel("recovered = (scrubbed − resampled) / (clean − resampled); ± sd over the resamplings",
                  fontsize=8)  # fmt: skip
    ax.set_title(textwrap.fill(title or "causal scrubbing", 80), fontsize=9)
    return figure_data_uri(fig)


def scrub_rows(scrub) -> list[list]:
    """The scrub table: the hypothesis, each claim alone, the unclaimed edges alone (metric ± sd, recovered)."""
    whole = _pm(scrub.metric_scrubbed, scrub.metric_scrubbed_sd)
    rows = [["hypothesis (everything it does not claim resampled)", whole, f"{scrub.recovered:.1%}"]]
    rows += [[f"claim {c.name!r} alone (the rest clean)", *_part(c, "a claim without a feature keeps its edges as "
                                                                 "they are")] for c in scrub.claims]  # fmt: skip
    if scrub.unclaimed:
        rows.append(["the unclaimed edges alone resampled", *_part(scrub.unclaimed, "no edge is left unclaimed")])
    return rows


def _part(c, why: str) -> list[str]:
    """A breakdown row's metric and recovered share, or why it is the clean model without being run."""
    if not c.measured:
        return ["the clean model (not run)", f"100% by construction: {why}"]
    return [_pm(c.metric, c.metric_sd), f"{c.recovered:.1%}"]


def _pm(value: float, sd: float) -> str:
    """``value ± sd``; an sd at float rounding of the value (1.2e-16 where every resampling gave the same) is 0."""
    return f"{value:.4g} ± {0.0 if abs(sd) <= 1e-12 * max(1.0, abs(value)) else sd:.2g}"
