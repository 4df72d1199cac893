"""The induction-heads report: sentences and a self-contained HTML page (no computation; the figures are in
:mod:`mechscope.lm.report.heads_figures`).

Every sentence is written from a field of :class:`~mechscope.lm.methods.heads.HeadsResult`, and
every number in it appears in a table or figure of the page.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mechscope.core.render.html import render
from mechscope.lm.report.heads_figures import (
    MARGINAL_SE,
    agreement_figure,
    circuit_figure,
    circuit_graph,
    heatmaps,
    loss_plot,
    node_text,
)

TABLE_SCORES = (
    "induction",
    "prefix_matching",
    "previous_token",
    "duplicate_token",
    "copying",
    "ov_eigen_positivity",
    "ablation_loss_increase",
)
KIND_TEXT = {
    "mean": "mean-ablation (each position's head output replaced by its mean at that position over the batch)",
    "zero": "zero-ablation (head output set to 0)",
    "resample": "resample-ablation (head output taken from another sequence of the batch, same position)",
}


# ---- the sentences -----------------------------------------------------------------------------------------
# Every comparison word is backed by a number in its sentence and one of these thresholds, stated on the page
# ("What the numbers mean").

USES_EARLIER_COPY = 0.5  # second-copy loss below this share of the first-copy loss: the model uses the earlier copy
WEAK_COPYING = 0.1  # a positive copying score below this (centred logit) is weak evidence of copying
HIGH_COMPOSITION = 2.0  # a composition score at least this many times the random baseline is "high"
ESTIMATE_FAILS = (0.1, 0.5)  # |estimate − measured| ≥ 0.1 nats and ≥ 50% of |measured|: the estimate fails
RANKED = 3  # heads named in the single-head cost ranking
SAID_EDGES = 8  # confirmed path-patching edges told in a sentence each (the rest: a count, the figure, the tables)


def thresholds_text() -> dict[str, str]:
    """The report's own thresholds, for the page's definitions."""
    lo, rel = ESTIMATE_FAILS
    return {
        "uses": f"the model uses the earlier copy when its loss on the second copy is below {USES_EARLIER_COPY:.0%} "
        "of its loss on the first",
        "weak_copying": f"a copying score above 0 but below {WEAK_COPYING} is weak evidence of copying",
        "high_composition": f"a composition score is high when it is at least {HIGH_COMPOSITION:g}× the random "
        "baseline's mean",
        "estimate_fails": f"the attribution-patching estimate fails on a head when it is off by at least {lo} nats and "
        f"by at least {rel:.0%} of the measured value",
        "marginal": f"a query head passes (or fails) the edge criterion marginally when its drop is within "
        f"{MARGINAL_SE:g} standard errors (sd / √sequences) of the criterion's threshold (in the figure: * after a "
        "head that passes marginally, the edge dashed when every head it passes for is marginal; in the tables: * "
        "after yes or no)",
    }


def _h(lh) -> str:
    return f"{lh[0]}.{lh[1]}"


def _list(items: list[str], n: int = 6) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def _listed(items: list[str], n: int = 3) -> str:
    """Items that hold commas themselves, joined by semicolons; past ``n``, how many more (in the tables below)."""
    more = f"; and {len(items) - n} more in the tables below" if len(items) > n else ""
    return "; ".join(items[:n]) + more


def _n_of(items: list) -> str:
    return "one pair" if len(items) == 1 else f"{len(items)} pairs"


def summary(result) -> list[str]:
    """Sentences written from the result's fields (each states its intervention, path and baseline)."""
    lines = [loss_sentence(result)]
    lines += induction_sentences(result)
    lines += ablation_sentences(result)
    lines += circuit_sentences(result)
    return lines


def loss_sentence(result) -> str:
    f, sec = result.loss_first_half, result.loss_second_half
    moves, to = ("falls from", "to") if sec < f else ("rises from", "to") if sec > f else ("is", "and")
    said = f"On repeated random tokens the model's loss {moves} {f:.2f} nats on the first copy {to} {sec:.2f} on the"
    if not f > 0:  # a model that already predicts random tokens perfectly: no ratio to read
        return said + " second: with nothing left to predict on the first copy, this measure cannot tell."
    uses = sec / f < USES_EARLIER_COPY
    verdict = ("it uses the earlier copy to predict the next token" if uses
               else "by this measure it does not use the earlier copy much")  # fmt: skip
    return said + f" second ({sec / f:.0%} of the first; below {USES_EARLIER_COPY:.0%} counts as using it): {verdict}."


def _pm_heads(result) -> list[tuple[int, int]]:
    """Heads meeting the prefix-matching threshold, highest prefix-matching score first."""
    s, t = result.scores, result.protocol["thresholds"]["induction"]
    pm = np.asarray(s["prefix_matching"], dtype=float)
    heads = [(int(a), int(b)) for a, b in zip(*np.nonzero(pm >= t), strict=True)]
    return sorted(heads, key=lambda lh: -pm[lh])


def induction_sentences(result) -> list[str]:
    s, t = result.scores, result.protocol["thresholds"]
    pm, cp = s["prefix_matching"], s["copying"]
    eig = np.asarray(s.get("ov_eigen_positivity", np.full(np.shape(pm), np.nan)), dtype=float)
    lines = []
    pm_heads = _pm_heads(result)
    ind = [lh for lh in pm_heads if result.labels[lh[0]][lh[1]] == "induction"]
    if ind:
        lines.append(
            f"{len(ind)} heads are induction heads by Olsson et al.'s two properties, prefix matching (prefix-matching "
            f"score ≥ {t['induction']}) and copying (copying score > 0, centred): "
            + _list([f"{_h(lh)} (prefix matching {pm[lh]:.2f}, copying {cp[lh]:+.2f})" for lh in ind])
            + "; in brackets: the two scores the label rests on."
        )
        weak = [lh for lh in ind if cp[lh] < WEAK_COPYING]
        if weak:
            lines.append(
                f"{len(weak)} of the {len(ind)} induction heads rest on a weak copying score (above 0 but below "
                f"{WEAK_COPYING}): "
                + _list([f"{_h(lh)} (copying {cp[lh]:+.3f})" for lh in weak])
                + "."
            )
    else:
        best = np.unravel_index(np.nanargmax(pm), np.shape(pm))
        lines.append(
            f"No head is an induction head by prefix matching (score ≥ {t['induction']}) and copying (copying score "
            f"> 0); the highest prefix-matching score is {pm[best]:.2f} (head {_h(best)}, copying {cp[best]:+.2f})."
        )
    no_copy = [lh for lh in pm_heads if cp[lh] <= 0]
    if no_copy:
        lines.append(
            f"Prefix matching (score ≥ {t['induction']}) without a positive copying score, so not labelled induction: "
            + _list([f"{_h(lh)} (prefix matching {pm[lh]:.2f}, copying {cp[lh]:+.2f})" for lh in no_copy], 5)
            + "."
        )
    lines += [x for x in [copying_agreement_sentence(pm_heads, cp, eig, t["induction"])] if x]
    prev = result.ranked("previous_token", "previous_token")
    if prev:
        lines.append(
            f"{len(prev)} previous-token heads (previous-token score on random tokens ≥ {t['previous_token']}): "
            + _list([f"{r['layer']}.{r['head']} ({r['score']:.2f})" for r in prev], 5)
            + "; in brackets: the previous-token score."
        )
    return lines


def copying_agreement_sentence(heads, copying, eigen, threshold) -> str | None:
    """Copying and OV eigenvalue positivity measure the same property; where their signs differ, say so."""
    both = [lh for lh in heads if np.isfinite(eigen[lh]) and np.isfinite(copying[lh])]
    if not both:
        return None
    differ = [lh for lh in both if (copying[lh] > 0) != (eigen[lh] > 0)]
    what = ("copying (the head's centred direct effect on the token it attends to) and OV eigenvalue positivity "
            "(Σλ/Σ|λ| of its full OV circuit, read from the weights)")  # fmt: skip
    if not differ:
        return (f"On all {len(both)} heads with prefix-matching score ≥ {threshold}, {what} agree in sign.")
    return (
        f"Two measures of whether a head copies, {what}, disagree in sign on {len(differ)} of the {len(both)} heads "
        f"with prefix-matching score ≥ {threshold}: "
        + _list([f"{_h(lh)} (copying {copying[lh]:+.2f}, eigenvalue positivity {eigen[lh]:+.2f})" for lh in differ])
        + "; the induction label follows the copying score."
    )


def ablation_sentences(result) -> list[str]:
    k = result.top_k_ablation
    b = result.protocol["batch"]
    none = "" if result.induction_heads() else " (no head is labelled induction: these are the highest scores)"
    lines = [
        f"Mean-ablating the {k['k']} heads with the highest induction scores together{none} (each position's output "
        f"replaced by its mean over the {b} sequences; measured) {top_k_text(k, 2)}."
    ]
    mean = result.ablation["mean"]
    n_heads = int(np.size(mean.estimate_mean))
    if not mean.exact_mean:
        lines.append(
            "No head was mean-ablated alone exactly: every single-head value on this page is an attribution-patching "
            "estimate (first order), and no head is ranked by its cost."
        )
        return lines
    noise = _indistinct(mean, b)
    if noise:
        return lines + [noise]
    best = sorted(mean.exact_mean.items(), key=lambda kv: -kv[1])[:RANKED]
    top = ", ".join(f"{_h(lh)} ({v:+.2f} ± {mean.exact_std[lh]:.2f})" for lh, v in best)
    p = result.protocol
    measured = (f"the labelled heads, the path-patching sources and targets, the ranked table's rows, up to "
                f"{p.get('exact_top', 0)} with the largest estimated effects and up to {p.get('exact_random', 0)} "
                "random others") if p.get("per_head_ablation", True) else (
                "the source of each confirmed path-patching edge")  # fmt: skip
    if len(mean.exact_mean) == n_heads:
        measured = f"every head ({n_heads})"
    lines.append(
        f"One head at a time, mean-ablation (each position's output replaced by its mean over the {b} sequences) "
        f"costs most, among the {len(mean.exact_mean)} heads measured exactly, for {top} nats of second-half loss "
        f"(mean ± sd over the sequences). Measured: {measured}"
        + (f"; the other {n_heads - len(mean.exact_mean)} heads have only an attribution-patching estimate and are not "
           "ranked." if len(mean.exact_mean) < n_heads else ".")
    )
    lines.append(agreement_sentence(result, mean))
    return lines


RANDOM_FROM = "drawn from the other heads"


def top_k_text(k: dict, digits: int = 3) -> str:
    """The top-k ablation's loss change and its random control, in words that match their signs (the summary's
    sentence and the ablation section's)."""
    x = _change(k["induction_heads_loss_increase"], digits)
    if not k["random_draws"]:
        return f"{x}; no random control (no other heads to draw {k['k']} from)"
    return (f"{x}; {k['k']} random heads {RANDOM_FROM} change it by {k['random_heads_loss_increase_mean']:+.{digits}f}"
            f" ± {k['random_heads_loss_increase_std']:.{digits}f} (mean ± sd over {len(k['random_draws'])} draws)")


DISTINCT_SE = 2.0  # a measured cost is told from zero when it is at least this many standard errors from it


def _change(x: float, digits: int = 2) -> str:
    """A loss change in words that match its sign (a change under half the last digit shown is none)."""
    if abs(x) < 0.5 * 10**-digits:
        return f"leaves the second-half loss within {0.5 * 10**-digits:g} nats ({x:+.{digits + 1}f})"
    return f"{'raises' if x > 0 else 'lowers'} the second-half loss by {abs(x):.{digits}f} nats"


def _indistinct(ablation, batch: int) -> str | None:
    """A sentence when no head's measured cost is told from zero (every |mean| under DISTINCT_SE standard errors
    of the mean over the sequences): ranking those costs, or judging the estimate against them, ranks noise."""
    n = max(int(batch), 1)
    se = {lh: ablation.exact_std[lh] / np.sqrt(n) for lh in ablation.exact_mean}
    if any(abs(v) >= DISTINCT_SE * se[lh] and abs(v) >= 0.005 for lh, v in ablation.exact_mean.items()):
        return None
    lh, v = max(ablation.exact_mean.items(), key=lambda kv: abs(kv[1]))
    return (f"No head's cost, mean-ablated alone, is told from zero: the largest |mean| among the "
            f"{len(ablation.exact_mean)} heads measured exactly is {abs(v):.4f} nats ({_h(lh)}), against a standard "
            f"error of {se[lh]:.4f} (sd over the {n} sequences / √{n}); no head is ranked by its cost and the "
            "attribution-patching estimate is not judged against these.")


def estimate_failures(ablation) -> list[tuple[int, int]]:
    """Heads measured both ways whose estimate fails (:data:`ESTIMATE_FAILS`), largest error first."""
    lo, rel = ESTIMATE_FAILS
    errs = ablation.errors()
    bad = [lh for lh, e in errs.items() if abs(e) >= lo and abs(e) >= rel * abs(ablation.exact_mean[lh])]
    return sorted(bad, key=lambda lh: -abs(errs[lh]))


def agreement_sentence(result, ablation) -> str:
    ag = ablation.agreement()
    n = ag["heads"]
    prev = [lh for lh in ablation.exact_mean if result.labels[lh[0]][lh[1]] == "previous_token"]
    with_prev = f", {len(prev)} of them previous-token heads" if prev else ""
    if n < 2:
        return f"Only {n} head was measured exactly, too few to judge the attribution-patching estimate."
    corr = "" if ag.get("pearson") is None else f"Pearson r = {ag['pearson']:.2f}, "
    if ag.get("spearman") is not None:
        corr += f"Spearman ρ = {ag['spearman']:.2f}, "
    m = ag.get("median_abs_measured")  # not in a heads.json written before it
    against = "" if m is None else f" against a median |measured effect| of {m:.3f} nats"
    bad = estimate_failures(ablation)
    lo, rel = ESTIMATE_FAILS
    head = (f"On the {n} heads measured exactly{with_prev}, the attribution-patching estimate of {ablation.kind}-"
            f"ablation compared with the measurement: {corr}median |error| "
            f"{ag['median_abs_error']:.3f} nats{against}")  # fmt: skip
    if not bad:
        return head + f"; it fails (off by ≥ {lo} nats and ≥ {rel:.0%} of the measured value) on none of them."
    named = [
        f"{_h(lh)} ({'previous-token; ' if lh in prev else ''}estimate {ablation.measured_estimate[lh]:+.2f}, "
        f"measured {ablation.exact_mean[lh]:+.2f})"
        for lh in bad
    ]
    return (
        head + f"; it fails (off by ≥ {lo} nats and ≥ {rel:.0%} of the measured value) on {len(bad)} of them: "
        + _list(named, 5) + ". Unmeasured heads' values are estimates of the same kind."
    )


def _total_effect(result, source) -> str:
    """A source head's total effect (every path), measured where it was, else its estimate, said which."""
    mean = result.ablation["mean"]
    if source in mean.exact_mean:
        return f"{mean.exact_mean[source]:+.2f} ± {mean.exact_std[source]:.2f} nats (measured)"
    est = float(np.asarray(mean.estimate_mean)[source])
    return f"{est:+.2f} nats (attribution-patching estimate; not measured)"


def circuit_sentences(result) -> list[str]:
    lines = []
    crit = result.criterion
    _, edges = circuit_graph(result)
    g = result.kv_groups
    mean = result.ablation["mean"]
    for e in edges[:SAID_EDGES]:
        pp = e["patch"]
        src = _h(pp.source)
        group = (f"key/value head {pp.kv_head} of layer {pp.layer}, shared by query heads "
                 f"{', '.join(f'{pp.layer}.{h}' for h in pp.query_heads)}")  # fmt: skip
        keys = f"the keys of {group}" if g > 1 else f"the keys of {pp.layer}.{pp.query_heads[0]}"
        one_test = "; one test for the group" if g > 1 else ""
        change = "; ".join(
            f"{pp.layer}.{h} {c:.3f} → {q:.3f} (drop {d:.3f})"
            for h, c, q, d, ok in zip(pp.query_heads, pp.induction_clean, pp.induction_patched, pp.drop,
                                      pp.confirmed, strict=True)
            if ok
        )  # fmt: skip
        text = (
            f"Path patching {src} → {node_text(e['b'], result)}: {src}'s output mean-ablated only on the path into "
            f"{keys} (queries, values and every other head see the clean stream{one_test}) lowers the induction score "
            f"of {change}"
        )
        if e["loss"] is not None:
            total = _total_effect(result, pp.source)
            sd = "" if pp.loss_increase_std is None else f" ± {pp.loss_increase_std:.2f}"
            text += f"; this one path raises the second-half loss by {e['loss']:.2f}{sd} nats"
            text += f", while mean-ablating {src} on every path costs {total}"
            if pp.source in mean.exact_mean and mean.exact_mean[pp.source] < e["loss"]:
                offset = (e["loss"] - mean.exact_mean[pp.source]) / e["loss"] if e["loss"] > 0 else 0.0
                text += (f": less than this path alone, so ablating {src}'s other paths at the same time offsets "
                         f"{offset:.0%} of the key path's effect (inferred from the two measurements)")  # fmt: skip
        lines.append(text + ".")
    if len(edges) > SAID_EDGES:
        more = len(edges) - SAID_EDGES
        said = "One more confirmed path is" if more == 1 else f"{more} more confirmed paths are"
        lines.append(f"{said} drawn in the circuit figure and listed in the path-patching tables below.")
    marginal = [(e["patch"], h) for e in edges for h in e["marginal_heads"]]
    if marginal:
        lines.append(
            f"Marginal passes (drop within {MARGINAL_SE:g} standard errors of the threshold; * in the figure and the "
            "tables, the edge dashed where every head it passes for is marginal): "
            + "; ".join(_marginal_text(result, pp, h) for pp, h in marginal)
            + "."
        )
    fails = marginal_fails(result)
    if fails:
        lines.append(
            f"Marginal fails (drop below the threshold by less than {MARGINAL_SE:g} standard errors, so not drawn; * "
            "in the tables): " + "; ".join(_marginal_text(result, pp, h) for pp, h in fails) + "."
        )
    lines += composition_sentences(result)
    if not result.path_patches:
        lines.append("No pair was tested by path patching: a test needs an induction head as its target, and no head "
                     "is labelled induction.")  # fmt: skip
        return lines
    lines.append(
        f"An edge is drawn only when the target's induction score drops by at least {crit.min_drop} and by at least "
        f"{crit.min_share:.0%} of its clean value; the tables below list every pair tested, confirmed or not."
    )
    return lines


def marginal_fails(result) -> list[tuple]:
    """(path patch, query head) where an induction head's drop falls short of the criterion's threshold by less than
    MARGINAL_SE standard errors: a test that did not confirm the edge but could not rule it out either."""
    out = []
    for pp in result.path_patches:
        for h, m, ok in zip(pp.query_heads, result.edge_margin(pp), pp.confirmed, strict=True):
            if not ok and -MARGINAL_SE < m < 0 and result.labels[pp.layer][h] == "induction":
                out.append((pp, h))
    return out


def _marginal_text(result, pp, head: int) -> str:
    crit = result.criterion
    margin = result.edge_margin(pp)
    i = pp.query_heads.index(head)
    threshold = max(crit.min_drop, crit.min_share * pp.induction_clean[i])
    se = pp.drop_std[i] / np.sqrt(max(int(result.protocol["batch"]), 1))
    return (f"{_h(pp.source)} → {pp.layer}.{pp.query_heads[i]} (drop {pp.drop[i]:.3f} against the threshold "
            f"{threshold:.3f}, standard error {se:.3f}, {margin[i]:+.1f} standard errors)")  # fmt: skip


def composition_sentences(result) -> list[str]:
    """The induction heads' two strongest K-composition sources that path patching rejected, with how far each
    composition score is above the random baseline: only a score ≥ HIGH_COMPOSITION × baseline is called high."""
    crit = result.criterion
    base = result.composition.baseline.mean
    high, low = [], []
    for row in result.circuit():
        ih = row["induction_head"]
        for top in row["top_k_composition"][:2]:
            test = next((t for t in row["path_patching"] if t["source"] == top["head"]), None)
            if test is None or test["confirmed"]:
                continue
            ratio = top["k_composition"] / base if base > 0 else float("inf")
            threshold = max(crit.min_drop, crit.min_share * test["induction_clean"])
            text = (f"{top['head']} → {ih['layer']}.{ih['head']} (K-composition {top['k_composition']:.3f}, "
                    f"{ratio:.1f}× the baseline; induction {test['induction_clean']:.3f} → "
                    f"{test['induction_patched']:.3f}, drop {test['drop']:.3f} against the threshold "
                    f"{threshold:.3f})")  # fmt: skip
            (high if ratio >= HIGH_COMPOSITION else low).append(text)
    lines = []
    rejects = (f"mean-ablating the source only on the path into the target's keys does not pass the edge criterion "
               f"(drop ≥ {crit.min_drop} and ≥ {crit.min_share:.0%} of the clean score) for")  # fmt: skip
    if high:
        lines.append(
            f"A high K-composition (≥ {HIGH_COMPOSITION:g}× the random baseline {base:.3f}) is not by itself "
            f"evidence of use: {rejects} {_n_of(high)}: " + _listed(high) + "."
        )
    if low:
        lines.append(
            f"Path patching also rejects {_n_of(low)} of the induction heads' two strongest K-composition sources "
            f"whose scores are not high (under {HIGH_COMPOSITION:g}× the random baseline {base:.3f}): "
            + _listed(low) + "."
        )
    return lines


def table_rows(result, n: int = 20) -> list[dict]:
    s = result.scores
    order = np.argsort(-s["induction"].ravel())[:n]
    H = s["induction"].shape[1]
    spread = result.ablation["mean"].spread()
    rows = []
    for i in order:
        layer, h = divmod(int(i), H)
        rows.append(
            {
                "head": f"{layer}.{h}",
                "label": result.labels[layer][h],
                **{k: float(s[k][layer, h]) for k in TABLE_SCORES},
                "ablation_sd": float(spread[layer, h]),
                "measured": (layer, h) in result.ablation["mean"].exact_mean,
                "ablation_value": "measured" if (layer, h) in result.ablation["mean"].exact_mean else "estimate",
            }
        )
    return rows


def token_texts(result) -> dict[str, list[str]]:
    """The text of each example sequence's tokens (their ids where the result holds no text)."""
    text = result.token_text or {}
    return {k: text.get(k) or [str(i) for i in v["tokens"]] for k, v in (result.examples or {}).items()
            if k in ("repeated", "text")}  # fmt: skip


def write_report(result, out: Path) -> Path:
    return render("mechscope.lm", "heads.html.j2", out, **report_context(result))


def report_context(result, token_text: dict[str, list[str]] | None = None) -> dict:
    """What heads.html.j2 draws (the file report and the notebook fragment)."""
    token_text = token_text if token_text is not None else token_texts(result)
    viewer = {
        name: {"tokens": token_text[name], "patterns": data["patterns"]}
        for name, data in (result.examples or {}).items()
        if name in ("repeated", "text")
    }
    d = result.to_dict()
    noise = {kind: _indistinct(a, result.protocol["batch"]) if a.exact_mean else None
             for kind, a in result.ablation.items()}  # fmt: skip
    return dict(
        result=d,
        summary=summary(result),
        definitions=thresholds_text(),
        marginal_se=MARGINAL_SE,
        failures={kind: [] if noise[kind] else [_h(lh) for lh in estimate_failures(a)]
                  for kind, a in result.ablation.items()},  # fmt: skip
        noise=noise,
        topk=top_k_text(result.top_k_ablation),
        heatmaps=heatmaps(result),
        loss_png=loss_plot(result.loss_per_position, result.protocol["n"]),
        circuit_png=circuit_figure(result),
        agreement_png=None if noise.get("mean") else agreement_figure(result.ablation["mean"]),
        kinds=KIND_TEXT,
        rows=table_rows(result),
        table_scores=TABLE_SCORES,
        viewer=viewer,
        heads=(result.examples or {}).get("heads", []),
    )
