"""Pages of ``lm sae``: the evaluation and the dashboards of a dictionary, one self-contained HTML file each.

Contexts are drawn as the neurons report draws them (:mod:`mechscope.lm.report.neurons`): each token a span whose
background is the latent's activation there over the latent's largest activation in the sample (10 steps of
orange), the position the example is about outlined. Figures are inlined PNGs; no script, no network.
"""

from __future__ import annotations

import markupsafe
import numpy as np

from mechscope.core.render.figures import subplots
from mechscope.core.render.html import figure_data_uri, render_string
from mechscope.lm.methods.sae import INDUCTION_MARGIN
from mechscope.lm.report.neurons import label, shown_token

BOS_SHOWN = "⟨BOS⟩"  # position 0 of the induction sequences, when it is the model's BOS


def context_html(tokens, acts, focus: int, peak: float, value: float | None = None,
                 wrap: bool = False) -> markupsafe.Markup:  # fmt: skip
    """One context: tokens coloured by activation / ``peak``, position ``focus`` outlined."""
    parts = []
    for j, (t, a) in enumerate(zip(tokens, acts, strict=True)):
        text = markupsafe.escape(shown_token(t))
        level = int(np.clip(round(10 * a / peak), 0, 10)) if peak > 0 else 0
        top = j == focus
        if level == 0 and not top:
            parts.append(f"<span>{text}</span>")
        else:
            cls = f"a{level}" + (" top" if top else "")
            parts.append(f'<span class="{cls}" title="{a:.3g}">{text}</span>')
    head = f"<b>{value:.3g}</b> " if value is not None else ""
    style = ' style="white-space: pre-wrap"' if wrap else ""
    return markupsafe.Markup(f'<div class="ctx"{style}>{head}{"".join(parts)}</div>')


def histogram_uri(counts, edges, title: str, width: float = 3.6) -> str:
    fig, ax = subplots(figsize=(width, 1.8), layout="constrained")
    if counts:
        edges = np.asarray(edges)
        ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color="#e6550d")
    ax.set_title(title, fontsize=8)
    ax.tick_params(labelsize=7)
    ax.set_xlabel("activation (where it fires)", fontsize=7)
    return figure_data_uri(fig, dpi=80)


def density_uri(densities: np.ndarray | None,
                title: str = "latent density (share of positions where it fires)") -> str | None:  # fmt: skip
    if densities is None or len(densities) == 0:
        return None
    d = np.asarray(densities, dtype=float)
    fig, ax = subplots(figsize=(6.5, 2.4), layout="constrained")
    alive = d[d > 0]
    if len(alive):
        ax.hist(np.log10(alive), bins=40, color="#3182bd")
    ax.set_xlabel("log10 density (dead latents, never firing, left out)", fontsize=8)
    ax.set_ylabel("latents", fontsize=8)
    ax.set_title(f"{title}: {int((d == 0).sum())} of {len(d)} dead", fontsize=9)
    ax.tick_params(labelsize=7)
    return figure_data_uri(fig, dpi=90)


def why_shown(board) -> str:
    """The heading's note: why the latent is shown. A latent picked from the induction ranking is called induction
    only when it meets :data:`INDUCTION_MARGIN`; otherwise its place in the ranking and its measured difference."""
    ind = board.induction
    if board.why != "induction" or ind is None:
        return board.why
    gap = ind["rate_second"] - ind["rate_first"]
    if gap >= INDUCTION_MARGIN:
        return "induction"
    where = "top of" if ind["rank"] == 1 else f"rank {ind['rank']} in"
    return f"{where} the induction ranking: {gap:+.3f} on the repeat, under the {INDUCTION_MARGIN:g} criterion"


def dashboard_context(board) -> dict:
    peak = board.max
    top = [context_html(e.tokens, e.acts, e.focus, peak, e.value) for e in board.top]
    bands = []
    edges = board.band_edges
    for i, band in enumerate(board.bands):
        bands.append({
            "lo": edges[i] if i < len(edges) else 0.0, "hi": edges[i + 1] if i + 1 < len(edges) else 0.0,
            "examples": [context_html(e.tokens, e.acts, e.focus, peak, e.value) for e in band],
        })  # fmt: skip
    return {
        "b": board,
        "why": why_shown(board),
        "top": top,
        "bands": list(reversed(bands)),
        "hist": histogram_uri(board.hist_counts, board.hist_edges,
                              f"latent {board.latent}: {sum(board.hist_counts):,} activations"),
        "pairs": list(zip([(label(shown_token(t)), v) for t, v in board.promoted],
                          [(label(shown_token(t)), v) for t, v in board.suppressed], strict=False)),
    }


def dashboards_page(result) -> str:
    ind = result.induction
    induction_rows, induction_ctx = [], []
    if ind is not None:
        first = BOS_SHOWN if result.induction_bos else shown_token(result.induction_tokens[0])
        shown = (first, *result.induction_tokens[1:])
        for j, i in enumerate(ind.ranked[:15]):
            induction_rows.append((i, ind.rate_first[j], ind.rate_second[j], ind.mean_first[j], ind.mean_second[j],
                                   ind.rate_second[j] - ind.rate_first[j] >= INDUCTION_MARGIN))  # fmt: skip
        for j, i in enumerate(ind.ranked[:3]):
            acts = ind.activations[j]
            peak = max(acts) if acts else 0.0
            induction_ctx.append((i, context_html(shown, acts, -1, peak, wrap=True)))
    return render_string(
        "mechscope.lm", "sae_dashboards.html.j2", r=result, density=density_uri(result.densities),
        boards=[dashboard_context(b) for b in result.latents], induction_rows=induction_rows,
        induction_ctx=induction_ctx, margin=INDUCTION_MARGIN, meeting=sum(row[-1] for row in induction_rows),
        start="BOS" if result.induction_bos else f"a start token ({label(shown_token(result.induction_tokens[0]))}: "
        "this model has no BOS)",
    )  # fmt: skip


def evaluation_page(result) -> str:
    return render_string("mechscope.lm", "sae_evaluation.html.j2", r=result, mt=result.metrics, e=result.effect,
                         density=density_uri(result.latent_frequency))  # fmt: skip


def training_page(result) -> str:
    return render_string("mechscope.lm", "sae_training.html.j2", r=result, curve=training_curve_uri(result.history))


def training_curve_uri(history) -> str | None:
    if not history:
        return None
    steps = [h["step"] for h in history]
    fig, axes = subplots(1, 3, figsize=(10, 2.4), layout="constrained")
    for ax, key, title in zip(axes, ("loss", "l0", "explained_variance"), ("loss", "L0", "explained variance"),
                              strict=True):  # fmt: skip
        ax.plot(steps, [h.get(key) for h in history], color="#3182bd")
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("step", fontsize=7)
        ax.tick_params(labelsize=7)
    return figure_data_uri(fig, dpi=80)
