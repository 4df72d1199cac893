"""The report of ``cnn discover`` and ``mechscope scrub`` on a CNN: the channel circuit drawn in stage columns (edge
width by score), the faithfulness curve against random circuits, the comparison with ``cnn explain``'s circuit,
the scrubbing breakdown."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mechscope.core.render import layout as CL
from mechscope.core.render.discovery import (
    curve_words,
    discovery_lines,
    faithfulness_figure,
    metric_words,
    score_words,
    scrub_figure,
    scrub_rows,
    strongest,
)
from mechscope.core.render.figures import subplots
from mechscope.core.render.html import figure_data_uri, render, render_string

KIND_COLOURS = {"input": "#555555", "channel": "#1b9e77", "output": "#d95f02"}
SIGN_COLOURS = {True: "#2166ac", False: "#b2182b"}  # an edge's score: positive, negative


def circuit_figure(result, max_edges: int = 60) -> str:
    g = result.scores.graph
    ranked = sorted(zip(result.circuit.edges, result.circuit.scores, strict=True), key=lambda es: -abs(es[1]))
    ranked = ranked[:max_edges]
    if not ranked:
        fig, ax = subplots(figsize=(6, 1.5), layout="constrained")
        ax.axis("off")
        ax.text(0.5, 0.5, "the circuit has no edge", ha="center", va="center")
        return figure_data_uri(fig)
    top = max(abs(s) for _, s in ranked) or 1.0
    hand = set()
    if result.hand:
        hand = {f"{result.hand['stage']}.c{c}" for c in result.hand["hand"]}
    edges = [{"a": s, "b": n, "width": abs(sc) / top, "colour": SIGN_COLOURS[sc >= 0]} for (s, n, _), sc in ranked]
    nodes = list(dict.fromkeys(n for e in edges for n in (e["a"], e["b"])))
    nodes.sort(key=lambda n: (g.node(n).layer, g.node(n).index))
    fig, ax = subplots(figsize=CL.circuit_figsize(nodes, lambda n: g.node(n).layer, 14, 12), layout="constrained")
    stages = sorted({g.node(n).layer for n in nodes})
    labels = {0: "input", max(n.layer for n in g.nodes): "logits"}
    labels |= {s: f"conv{s}" for s in stages if s not in labels}

    def colour(n):
        if n in hand:
            return "#e7298a"
        return KIND_COLOURS.get(g.node(n).kind, "#888")

    CL.draw_circuit(ax, nodes, edges, lambda n: g.node(n).layer, label_of=lambda n: n.split(".")[-1],
                    node_colour=colour, column_labels=labels)  # fmt: skip
    title = f"{result.method} circuit: {len(result.circuit)} edges; width: |score|, blue: score > 0, red: < 0"
    if hand:
        title += "; pink: channels cnn explain found"
    ax.set_title(title, fontsize=8)
    return figure_data_uri(fig)


def summary(result) -> list[str]:
    out = discovery_lines(result, result.run)
    h = result.hand
    if h:
        out.append(
            f"cnn explain's {h['stage']} circuit for the class, {h['hand']}: the discovered top {len(h['hand'])} "
            f"channels {h['discovered_top']} share {len(h['overlap'])} ({h['recall_at_size']:.0%}, Jaccard "
            f"{h['jaccard']:.2f}); AUROC of the hand-found channels in the discovered ranking {h['auroc']:.3f}."
        )
    return out


def channel_figure(result) -> str:
    stages = list(result.channel_scores)
    fig, axes = subplots(len(stages), 1, figsize=(7, 1.4 + 1.2 * len(stages)), layout="constrained")
    axes = np.atleast_1d(axes)
    hand = result.hand or {}
    for ax, st in zip(axes, stages, strict=True):
        v = np.asarray(result.channel_scores[st])
        colours = ["#e7298a" if hand.get("stage") == st and j in hand.get("hand", []) else "#1b9e77"
                   for j in range(len(v))]  # fmt: skip
        ax.bar(np.arange(len(v)), v, color=colours)
        ax.set_ylabel(st, fontsize=8)
        ax.set_xticks(np.arange(len(v)))
        ax.tick_params(labelsize=6)
    key = " (pink: cnn explain's circuit)" if hand else ""  # the key only where the page has that circuit
    axes[0].set_title(f"per channel: the largest |score| of its edges{key}", fontsize=9)
    return figure_data_uri(fig)


def top_rows(result, k: int = 30) -> list[list]:
    g = result.scores.graph
    return [[f"{g.edges[e][0]} → {g.edges[e][1]}", f"{result.scores.scores[e]:+.4g}"]
            for e in strongest(result.scores, k)[0]]  # fmt: skip


def discovery_context(result) -> dict:
    return {
        "result": result,
        "metric": metric_words(result.metric, result.better),
        "summary": summary(result),
        "circuit_uri": circuit_figure(result),
        "channel_uri": channel_figure(result),
        "faithfulness_uri": faithfulness_figure(result.faithfulness),
        "curve_words": curve_words(result.faithfulness) if result.faithfulness is not None else "",
        "score_words": score_words(result),
        "zero_note": strongest(result.scores)[1],
        "top_rows": top_rows(result),
        "settings": {k: f"{v:.4g}" if isinstance(v, float) else v for k, v in result.settings.items() if v is not None},
    }


def discovery_page(result) -> str:
    return render_string("mechscope.cnn", "discovery.html.j2", **discovery_context(result))


def write_report(result, out: Path) -> Path:
    return render("mechscope.cnn", "discovery.html.j2", Path(out), **discovery_context(result))


def scrub_context(result) -> dict:
    s = result.scrub
    claims = [{"name": c.name, "feature": c.feature or "(the input itself)",
               "edges": [f"{a} → {b}" for a, b, _ in c.edges]} for c in s.hypothesis.claims]  # fmt: skip
    target = f", class {result.target}" if result.target is not None else ""
    return {
        "result": result,
        "metric": metric_words(result.metric, result.better),
        "s": s,
        "figure_uri": scrub_figure(s, f"causal scrubbing of {result.name!r} ({result.metric}{target})"),
        "rows": scrub_rows(s),
        "claims": claims,
        "where": f"{result.run} ({result.settings['n']} test images{target}{_read_by_metric(result)})",
    }


def _read_by_metric(result) -> str:
    """When the metric reads only the target class's images, how many: each one moves it by 1/k."""
    k, n = result.settings.get("metric_images"), result.settings["n"]
    return f"; the metric averages over the {k} of class {result.target}" if k is not None and k != n else ""


def scrub_page(result) -> str:
    return render_string("mechscope.cnn", "scrub.html.j2", **scrub_context(result))


def write_scrub_report(result, out: Path) -> Path:
    return render("mechscope.cnn", "scrub.html.j2", Path(out), **scrub_context(result))
