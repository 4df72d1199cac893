"""The Mathematical Framework report (``lm circuits``): figures and a self-contained page."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from mechscope.core.render.html import figure_data_uri, render
from mechscope.core.results import Saved
from mechscope.lm.report import heads as HR
from mechscope.lm.report import heads_figures as HF


def composition_figure(comp, mode: str) -> str:
    """Scores above the random baseline for every (source head, target head) pair (a CompositionResult)."""
    s = comp.above_baseline(mode)  # [L, H, L, H]
    L, H = s.shape[:2]
    m = s.reshape(L * H, L * H)
    valid = comp.valid_mask(s.shape).reshape(L * H, L * H)
    m = np.where(valid, m, np.nan)
    fig = Figure(figsize=(6.2, 5.4), layout="constrained")
    ax = fig.subplots()
    vmax = np.nanmax(np.abs(m)) or 1.0
    im = ax.imshow(m, cmap="RdBu_r", vmin=-vmax, vmax=vmax, interpolation="nearest")
    ticks = np.arange(0, L * H, H * max(1, L // 12))
    for axis in (ax.set_xticks, ax.set_yticks):
        axis(ticks)
    ax.set_xticklabels([str(t // H) for t in ticks])
    ax.set_yticklabels([str(t // H) for t in ticks])
    ax.set_xlabel("target head (by layer)")
    ax.set_ylabel("source head (by layer)")
    ax.set_title(f"{mode}-composition minus the random baseline ({comp.baseline.mean:.3f})", fontsize=10)
    fig.colorbar(im, ax=ax, shrink=0.8)
    return figure_data_uri(fig)


def positional_grid(pos, n: int = 24) -> str:
    """Every head's positional attention pattern on the first ``n`` positions, tiled: layers as rows."""
    pat = pos.patterns[:, :, :n, :n]
    n = pat.shape[-1]  # a model whose context is shorter than n
    L, H = pat.shape[:2]
    tile = np.full((L * (n + 2), H * (n + 2)), np.nan)
    for layer in range(L):
        for h in range(H):
            r, c = layer * (n + 2) + 1, h * (n + 2) + 1
            tile[r : r + n, c : c + n] = pat[layer, h]
    fig = Figure(figsize=(min(16, 0.75 * H + 1.5), min(24, 0.75 * L + 1.2)), layout="constrained")
    ax = fig.subplots()
    ax.imshow(tile, cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([h * (n + 2) + n / 2 for h in range(H)])
    ax.set_xticklabels([str(h) for h in range(H)], fontsize=7)
    ax.set_yticks([layer * (n + 2) + n / 2 for layer in range(L)])
    ax.set_yticklabels([str(layer) for layer in range(L)], fontsize=7)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(f"positional QK pattern of every head (query rows, key columns; first {n} positions)", fontsize=10)
    return figure_data_uri(fig)


def dla_figure(dla) -> str:
    fig = Figure(figsize=(9, 3.4), layout="constrained")
    a, b = fig.subplots(1, 2, width_ratios=[3, 2])
    vmax = float(np.abs(dla.heads).max()) or 1.0
    im = a.imshow(dla.heads.T, aspect="auto", cmap="RdBu_r", vmin=-vmax, vmax=vmax)
    a.set_xlabel("layer")
    a.set_ylabel("head")
    a.set_title("each head's share of the centred logit", fontsize=9)
    fig.colorbar(im, ax=a, shrink=0.9)
    b.bar(range(len(dla.mlps)), dla.mlps, color="#7570b3")
    b.axhline(0, color="grey", lw=0.6)
    b.set_xlabel("layer")
    b.set_title("each MLP's share", fontsize=9)
    return figure_data_uri(fig)


def composition_sentences(result) -> list[str]:
    """The strongest pair of each kind, against the random baseline and the report's threshold for "high"; and what
    a composition score can and cannot say, pointing at the path patching only where the page has it."""
    comp = result.composition
    base = comp.baseline.mean
    lines = []
    for mode in ("Q", "K", "V"):
        rows = comp.top_pairs(mode, 1) if comp.scores is not None else comp.top.get(mode, [])[:1]
        if not rows:
            continue
        top = rows[0]
        ratio = top["score"] / base if base > 0 else float("inf")
        high = "high" if ratio >= HR.HIGH_COMPOSITION else "not high"
        lines.append(
            f"The strongest {mode}-composition is {top['source']} → {top['target']}: {top['score']:.3f}, "
            f"{ratio:.1f}× the random baseline {base:.3f} ({high}; high means at least {HR.HIGH_COMPOSITION:g}× the "
            "baseline)."
        )
    has_patching = result.induction is not None and not isinstance(result.induction, Saved)
    loaded = isinstance(result.induction, Saved) and bool((result.induction.data or {}).get("circuit"))
    has_patching = has_patching or loaded
    if has_patching:
        tail = "path patching, in the induction circuit's section below, tests whether the later head uses it."
    else:
        why = result.unavailable.get("induction_circuit", "it was not run")
        tail = f"this page has no causal test of it (path patching of the induction circuit: {why})."
    lines.append(
        "A composition score is a weight score: it says a later head could read what an earlier one writes, not "
        f"that it does; {tail}"
    )
    return lines


def summary(result) -> list[str]:
    """The page's sentences, from the result's fields."""
    lines = composition_sentences(result)
    ind = result.induction
    if ind is not None and not isinstance(ind, Saved):
        lines += HR.induction_sentences(ind)
        lines += HR.circuit_sentences(ind)
    return lines


def write_report(result, out: Path) -> Path:
    return render("mechscope.lm", "circuits.html.j2", out, **report_context(result))


def report_context(result) -> dict:
    """What circuits.html.j2 draws (the file report and the notebook fragment). A loaded result draws what its
    JSON holds: the figures that need arrays the JSON leaves out are left out."""
    d = result.to_dict()
    prompt_text = result.prompt_text
    comp = result.composition
    many_layers = comp.scores is not None and comp.scores["K"].shape[0] > 1  # one layer: no pair to compose
    figures = {m: composition_figure(comp, m) for m in ("Q", "K", "V")} if many_layers else {}
    extra = {}
    if result.eigen_positivity is not None:
        extra["eigen"] = HF.layer_head_figure(result.eigen_positivity, "OV eigenvalue positivity Σλ/Σ|λ| (folded)")
    if result.positional is not None and not isinstance(result.positional, Saved):
        extra["previous_position"] = HF.layer_head_figure(
            result.positional.previous_token(), "attention to the previous position from positions alone", False
        )
        extra["positional_grid"] = positional_grid(result.positional)
    if result.dla is not None and not isinstance(result.dla, Saved):
        extra["dla"] = dla_figure(result.dla)
    if result.induction is not None and not isinstance(result.induction, Saved):
        extra["circuit"] = HF.circuit_figure(result.induction)
    lens_rows = []
    if d["logit_lens"] is not None and prompt_text:
        last = min(12, len(prompt_text))
        for i, row in enumerate(d["logit_lens"]["top"]):
            lens_rows.append(
                {
                    "layer": "embed" if i == 0 else f"after {i - 1}",
                    "tokens": row[-last:],
                    "probs": d["logit_lens"]["top_prob"][i][-last:],
                }
            )
        lens_rows.append({"layer": "input", "tokens": list(prompt_text[-last:]), "probs": None})
    return dict(
        r=d,
        summary=summary(result),
        high_composition=f"{HR.HIGH_COMPOSITION:g}",
        marginal_se=HF.MARGINAL_SE,
        composition_figures=figures,
        figs=extra,
        lens_rows=lens_rows,
    )
