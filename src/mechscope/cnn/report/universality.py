"""The report of ``cnn universality``: best-match histograms against the baseline, the CKA matrix, matched units
side by side, class circuits through the matching, and a summary written from the numbers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mechscope.cnn.methods.circuits import class_means, selectivity_index
from mechscope.cnn.report.figures import to_display
from mechscope.core.render.figures import subplots
from mechscope.core.render.html import array_uri, figure_data_uri, render

P_ABOVE = 0.05  # a stage's trained best matches are "above" the random baseline at this one-sided p

TRAINED, BASELINE = "#1f77b4", "#999999"


def _median(values) -> float:
    v = np.concatenate([np.asarray(x, dtype=float) for x in values]) if values else np.array([])
    return float(np.median(v)) if len(v) else float("nan")


def _live(m) -> np.ndarray:
    return m.matched_live()


def stage_numbers(result) -> list[dict]:
    """Per stage: medians of the best-match and matched correlations and the CKA, trained pairs and baseline."""
    rows, tests = [], result.stage_tests()
    for st in result.stage_names:
        row = {"stage": st}
        for kind, comps in (("trained", result.trained()), ("baseline", result.baseline())):
            ms = [c.stage(st) for c in comps]
            row[kind] = {
                "median_best": _median([m.best_matches() for m in ms]),
                "median_matched": _median([m.matched_live() for m in ms]),
                "share_matched_ge_0.5": _median([[float(np.mean(v >= 0.5))] for v in map(_live, ms) if len(v)]),
                "cka": [m.cka for m in ms],
            }
        row["test"] = tests[st]
        rows.append(row)
    return rows


def _verdict(test: dict) -> str:
    """The best-match test in words: the verdict, p, the effect size and what they rest on."""
    if not (test["n"] and test["m"]):
        return "no test: a side has no live unit"
    head = "above that baseline" if test["p"] < P_ABOVE else "not clearly above that baseline"
    return (f"{head}: one-sided Mann–Whitney p = {test['p']:.2g}, probability that a trained unit's best match beats "
            f"a random one's {test['superiority']:.2f}, over {test['n']} and {test['m']} units; units of one network "
            "are not independent, so p is a guide")


def circuit_totals(result) -> dict | None:
    """Overlap of mapped circuits summed over classes and trained pairs, against chance."""
    reuse = [r for c in result.trained() for r in c.circuits]
    if not reuse:
        return None
    return {
        "observed": sum(r.overlap for r in reuse), "expected": sum(r.expected for r in reuse),
        "mapped": sum(len(r.mapped) for r in reuse), "cases": len(reuse),
        "significant": sum(r.p_value < 0.05 for r in reuse), "stage": result.trained()[0].circuit_stage,
    }  # fmt: skip


def cka_matrix_numbers(result) -> list[dict]:
    """Per stage, from the CKA matrix (each image's channel means): mean CKA between two trained networks, between
    a network and its random twin, and between this stage of one trained network and the other stages of another."""
    at = {lab: i for i, lab in enumerate(result.cka_labels)}
    cka = result.cka.numpy()
    runs = [r["label"] for r in result.runs]
    out = []
    for st in result.stage_names:
        trained = [cka[at[f"{a} {st}"], at[f"{b} {st}"]] for c in result.trained() for a, b in [(c.a, c.b)]]
        twin = [cka[at[f"{r} {st}"], at[f"random {r} {st}"]] for r in runs]
        other = [cka[at[f"{a} {st}"], at[f"{b} {o}"]] for a in runs for b in runs if a != b
                 for o in result.stage_names if o != st]  # fmt: skip
        out.append({"stage": st, "trained": float(np.mean(trained)), "random_twin": float(np.mean(twin)),
                    "other_stages": float(np.mean(other)) if other else float("nan")})  # fmt: skip
    return out


def summary_lines(result) -> list[str]:
    n = len(result.runs)
    acc = ", ".join(f"{r['label']} {r['test_accuracy']:.4f}" for r in result.runs)
    k = len(result.trained())
    lines = [f"{n} networks ({acc} test accuracy on {result.test_images:,} test images), {k} pair{'s' * (k != 1)}, "
             "each network also against a randomly initialised network of its own shape."]  # fmt: skip
    for row in stage_numbers(result):
        t, b = row["trained"], row["baseline"]
        test = row["test"]
        lines.append(
            f"{row['stage']}: median best-match correlation {t['median_best']:.2f} between trained networks against "
            f"{b['median_best']:.2f} with a random network ({_verdict(test)}); one-to-one (Hungarian) pairs "
            f"median {t['median_matched']:.2f} against {b['median_matched']:.2f}, "
            f"{100 * t['share_matched_ge_0.5']:.0f}% of pairs ≥ 0.5 against {100 * b['share_matched_ge_0.5']:.0f}%; "
            f"linear CKA {_range(t['cka'])} against {_range(b['cka'])}."
        )
    parts = [f"{c['stage']} {c['trained']:.2f} between trained networks, {c['random_twin']:.2f} with the random twin"
             + (f", {c['other_stages']:.2f} with the other stages" if c["other_stages"] == c["other_stages"] else "")
             for c in cka_matrix_numbers(result)]  # fmt: skip
    lines.append("CKA on each image's channel means (the matrix; mean over pairs): " + "; ".join(parts) + ".")
    lines += _width_lines(result)
    ct = circuit_totals(result)
    if ct is not None:
        ratio = ct["observed"] / ct["expected"] if ct["expected"] else float("nan")
        lines.append(
            f"Class circuits ({ct['stage']}): of the {ct['mapped']} circuit channels of the first network of each "
            f"pair, mapped through the one-to-one matching, {ct['observed']} land in the second network's circuit "
            f"for the same class, against {ct['expected']:.1f} expected by chance ({ratio:.1f}×); "
            f"{ct['significant']} of {ct['cases']} class × pair cases have p < 0.05 (hypergeometric)."
        )
    return lines


def _range(values) -> str:
    v = [x for x in values if x == x]
    if not v:
        return "n/a"
    return f"{v[0]:.2f}" if len(v) == 1 else f"{min(v):.2f}–{max(v):.2f} (mean {np.mean(v):.2f})"


def _width_lines(result) -> list[str]:
    """For pairs of different widths: how well each side's units find a partner in the other."""
    width = {r["label"]: r["channels"] for r in result.runs}
    out = []
    for c in result.trained():
        if width[c.a] == width[c.b]:
            continue
        parts = [f"{m.stage} {m.median_best_a:.2f} / {m.median_best_b:.2f}" for m in c.stages]
        wa, wb = "×".join(map(str, width[c.a])), "×".join(map(str, width[c.b]))
        out.append(f"{c.a} ({wa}) against {c.b} ({wb}), median best match of {c.a}'s units in {c.b} / of {c.b}'s "
                   f"in {c.a}: " + "; ".join(parts) + ".")  # fmt: skip
    return out


# ---- figures --------------------------------------------------------------------------------------------------


def histogram_figure(result) -> str:
    names = result.stage_names
    fig, axes = subplots(1, len(names), figsize=(5.2 * len(names), 3.4), layout="constrained", squeeze=False)
    bins = np.linspace(-0.2, 1, 25)
    for j, st in enumerate(names):
        ax = axes[0, j]
        for kind, comps, colour in (("trained vs trained", result.trained(), TRAINED),
                                    ("trained vs random", result.baseline(), BASELINE)):  # fmt: skip
            v = np.concatenate([c.stage(st).best_matches() for c in comps]).astype(np.float64)
            shown = np.clip(v, bins[0], bins[-1])  # in float64: float32's -0.2 lies below the first edge, outside
            ax.hist(shown, bins=bins, histtype="stepfilled" if colour == BASELINE else "step", lw=2, color=colour,
                    alpha=0.5 if colour == BASELINE else 1, density=True,
                    label=f"{kind} (median {np.median(v):.2f}, {len(v)} units)")  # fmt: skip
        ax.set_title(f"{st}: each unit's best-match correlation")
        ax.set_xlabel("Pearson r with the best partner (images × positions)")
        ax.set_ylabel("density")
        ax.legend(fontsize=8, loc="upper left")
        ax.grid(alpha=0.3)
    return figure_data_uri(fig)


def cka_figure(result) -> str:
    cka = result.cka.numpy()
    n = len(cka)
    fig, ax = subplots(figsize=(1.2 + 0.5 * n, 0.9 + 0.45 * n), layout="constrained")
    im = ax.imshow(cka, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(n))
    ax.set_xticklabels(result.cka_labels, rotation=90, fontsize=8)
    ax.set_yticks(range(n))
    ax.set_yticklabels(result.cka_labels, fontsize=8)
    if n <= 24:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{cka[i, j]:.2f}", ha="center", va="center", fontsize=6,
                        color="black" if cka[i, j] > 0.6 else "white")  # fmt: skip
    ax.set_title("linear CKA between stages\n(each image's channel means)", fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.6)
    return figure_data_uri(fig)


def unit_view(label, stage, unit, vis, feats, x, y, class_names, vrange, k: int = 4) -> dict:
    vis_uri = array_uri(to_display(vis[(label, stage, unit)][None], vrange)[0], 3)
    top = feats[label].maxima[stage][:, unit].topk(min(k, len(y))).indices
    strip = np.concatenate(list(to_display(x[top], vrange)), axis=1)  # side by side
    profile = class_means(feats[label].means[stage][:, unit : unit + 1], y, len(class_names))[0].numpy()
    top_abs = float(np.abs(profile).max()) or 1.0
    return {
        "label": label, "stage": stage, "unit": unit, "vis": vis_uri,
        "examples": array_uri(strip, 2), "example_labels": [class_names[int(y[i])] for i in top],
        "profile": [{"name": n, "value": float(v), "height": round(100 * abs(float(v)) / top_abs, 1)}
                    for n, v in zip(class_names, profile, strict=True)],
        "preferred": class_names[int(profile.argmax())],
        "selectivity": float(selectivity_index(torch.as_tensor(profile)[None])[0]),
    }  # fmt: skip


def write_report(result, shown, vis, feats, x, y, out: Path) -> Path:
    names = list(result.class_names)
    vrange = (min(0.0, float(x.min())), max(1.0, float(x.max())))
    sections = [
        {"a": a, "b": b, "stage": st, "rows": [
            {"r": p.correlation, "A": unit_view(a, st, p.a, vis, feats, x, y, names, vrange),
             "B": unit_view(b, st, p.b, vis, feats, x, y, names, vrange)} for p in rows]}
        for a, b, st, rows in shown
    ]  # fmt: skip
    return render(
        "mechscope.cnn", "universality.html.j2", out, result=result, numbers=stage_numbers(result),
        totals=circuit_totals(result),
        histogram=histogram_figure(result), cka=cka_figure(result), sections=sections,
    )  # fmt: skip
