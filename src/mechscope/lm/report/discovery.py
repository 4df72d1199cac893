"""The report of ``lm discover`` and ``mechscope scrub`` on a transformer: the circuit drawn in layer columns (edge
width by score), the faithfulness curve against random circuits, the ground-truth scores, the scrubbing breakdown."""

from __future__ import annotations

from pathlib import Path

from mechscope.core.render import layout as CL
from mechscope.core.render.discovery import (
    curve_words,
    discovery_lines,
    faithfulness_figure,
    metric_words,
    rounding_level,
    score_words,
    scrub_figure,
    scrub_rows,
    strongest,
)
from mechscope.core.render.figures import subplots
from mechscope.core.render.html import figure_data_uri, render, render_string
from mechscope.lm.methods.graph import short_name

KIND_COLOURS = {"input": "#555555", "head": "#1b9e77", "mlp": "#7570b3", "output": "#d95f02"}


def circuit_figure(result, max_edges: int = 60) -> str:
    """The circuit's edges (at most ``max_edges``, strongest first) between nodes in layer columns; width by
    |score|; with a known circuit, true edges green and others red."""
    g = result.scores.graph
    pairs: dict[tuple[str, str], dict] = {}
    ranked = sorted(zip(result.circuit.edges, result.circuit.scores, strict=True), key=lambda es: -abs(es[1]))
    known = {tuple(e) for e in result.known_edges}
    for (s, n, slot), sc in ranked[:max_edges]:
        p = pairs.setdefault((s, n), {"a": s, "b": n, "score": 0.0, "slots": [], "known": []})
        p["score"] = max(p["score"], abs(sc))
        p["slots"].append(slot)
        p["known"].append((s, n, slot) in known)
    if not pairs:
        fig, ax = subplots(figsize=(6, 1.5), layout="constrained")
        ax.axis("off")
        ax.text(0.5, 0.5, "the circuit has no edge", ha="center", va="center")
        return figure_data_uri(fig)
    top = max(p["score"] for p in pairs.values()) or 1.0
    edges = [{"a": p["a"], "b": p["b"], "width": p["score"] / top,
              "colour": _truth_colour(p["known"]) if known else "#777",
              "label": ",".join(sl for sl in p["slots"] if sl in ("q", "k", "v"))} for p in pairs.values()]  # fmt: skip
    nodes = list(dict.fromkeys(n for e in edges for n in (e["a"], e["b"])))
    nodes.sort(key=lambda n: (g.node(n).layer, g.node(n).index))
    cols, rows = CL.circuit_extent(nodes, lambda n: g.node(n).layer)
    fig, ax = subplots(figsize=(min(16, 1.6 + 1.4 * cols), min(12, 1.6 + 1.1 * rows)), layout="constrained")
    labels = {0: "embed", 2 * _layers(g) + 1: "logits"}
    labels |= {2 * L + 1: f"{L} attn" for L in range(_layers(g))} | {2 * L + 2: f"{L} mlp" for L in range(_layers(g))}
    CL.draw_circuit(ax, nodes, edges, lambda n: g.node(n).layer, label_of=lambda n: _label(n),
                    node_colour=lambda n: KIND_COLOURS.get(g.node(n).kind, "#888"), column_labels=labels)  # fmt: skip
    title = f"{result.method} circuit: {len(result.circuit)} edges" + (
        f" (the {max_edges} strongest drawn)" if len(ranked) > max_edges else ""
    )
    if known:
        title += "; green: in the known circuit's primary edges, red: not, orange: some of its slots"
    ax.set_title(title + "; width: |score|; labels: q/k/v slots", fontsize=8)
    return figure_data_uri(fig)


def _truth_colour(known: list[bool]) -> str:
    """Green when every slot of a drawn edge is in the known circuit, red when none is, orange when some are."""
    return "#1b9e77" if all(known) else "#d62728" if not any(known) else "#e6ab02"


def _layers(g) -> int:
    return max((n.layer for n in g.nodes), default=1) // 2


def _label(name: str) -> str:
    s = short_name(name)
    return {"embed": "emb", "pos_embed": "pos", "unembed": "out"}.get(s, s.replace("MLP ", "M"))


def summary(result) -> list[str]:
    out = discovery_lines(result, result.model)
    out += [truth_sentence(result, name) for name in result.ground_truth]
    if any(_fractional(sc.edge_precision * sc.size) for sc in result.ground_truth.values()):
        out.append("Edges tied at the cut count as a random tie break would (the expected share), so precision and "
                   "recall need not be whole counts.")  # fmt: skip
    c = result.comparison
    if c:
        out.append(
            f"The {len(c['edges'])} edges the heads report confirmed by path patching: AUROC {c['auroc']:.3f} among "
            f"all {c['n_edges']:,} edges, {c['auroc_in_slot']:.3f} among the {c['n_slot_edges']:,} edges into "
            f"{'/'.join(c['slots'])} inputs; {c['in_top']} of them in the top {c['top']}."
        )
    return out


def truth_sentence(result, name: str) -> str:
    """One edge set of circuit.json against the scores (at the set's own size) and against the drawn circuit."""
    sc = result.ground_truth[name]
    d = (result.drawn_vs_truth or {}).get(name)
    small = rounding_level(result) if d else 0
    luck = f"; {small} of its edges score at rounding level, so which of them it holds is arbitrary" if small else ""
    drawn = (f" The drawn circuit's {d['edges']} edges hold {d['true']} of them (precision {d['precision']:.2f}, "
             f"recall {d['recall']:.2f}{luck}).") if d else ""  # fmt: skip
    return (f"Against circuit.json ({name} edges, {sc.n_true_edges}): edge AUROC {sc.edge_auroc:.3f}; precision "
            f"{sc.edge_precision:.2f} and recall {sc.edge_recall:.2f} of the top {sc.size} edges (as many as the set "
            f"has); node AUROC {_node_auroc(sc)}, node recall of the top {sc.n_true_nodes} nodes (as many as it "
            f"has) {sc.node_recall_at_size:.2f}." + drawn)


def _node_auroc(sc) -> str:
    """The node AUROC, or why there is none (every candidate node is in the known circuit: nothing to rank below)."""
    if sc.node_auroc == sc.node_auroc:
        return f"{sc.node_auroc:.3f}"
    return "undefined (every head and MLP is in the known circuit)" if sc.n_true_nodes == sc.n_node_candidates else (
        "undefined")  # fmt: skip


def _fractional(x: float) -> bool:
    return abs(x - round(x)) > 1e-9


def ground_truth_rows(result) -> list[list]:
    return [[name, sc.n_true_edges, f"{sc.edge_auroc:.3f}", f"{sc.edge_precision:.2f}", f"{sc.edge_recall:.2f}",
             _node_auroc(sc).split(" (")[0], f"{sc.node_precision:.2f}", f"{sc.node_recall:.2f}",
             f"{sc.node_recall_at_size:.2f}", _drawn_cell(result, name)]
            for name, sc in result.ground_truth.items()]  # fmt: skip


def _drawn_cell(result, name: str) -> str:
    d = (result.drawn_vs_truth or {}).get(name)
    return f"{d['true']} of {d['edges']} ({d['precision']:.2f} / {d['recall']:.2f})" if d else "–"


def top_rows(result, k: int = 30) -> list[list]:
    known = {tuple(e) for e in result.known_edges}
    rows = []
    for e in strongest(result.scores, k)[0]:
        s, n, slot = result.scores.graph.edges[e]
        rows.append([f"{s} → {n}<{slot}>", f"{result.scores.scores[e]:+.4g}",
                     ("yes" if (s, n, slot) in known else "no") if known else ""])  # fmt: skip
    return rows


def discovery_context(result) -> dict:
    return {
        "result": result,
        "metric": metric_words(result.metric, result.better),
        "summary": summary(result),
        "circuit_uri": circuit_figure(result),
        "faithfulness_uri": faithfulness_figure(result.faithfulness),
        "curve_words": curve_words(result.faithfulness) if result.faithfulness is not None else "",
        "score_words": score_words(result),
        "zero_note": strongest(result.scores)[1],
        "truth_rows": ground_truth_rows(result),
        "top_rows": top_rows(result),
        "comparison": result.comparison,
        "settings": {k: f"{v:.4g}" if isinstance(v, float) else v for k, v in result.settings.items() if v is not None},
    }


def discovery_page(result) -> str:
    return render_string("mechscope.lm", "discovery.html.j2", **discovery_context(result))


def write_report(result, out: Path) -> Path:
    return render("mechscope.lm", "discovery.html.j2", Path(out), **discovery_context(result))


# ---- scrubbing ------------------------------------------------------------------------------------------


def scrub_context(result) -> dict:
    s = result.scrub
    claims = [{"name": c.name, "feature": c.feature or "(the input itself)",
               "edges": [f"{a} → {b}<{slot}>" for a, b, slot in c.edges]} for c in s.hypothesis.claims]  # fmt: skip
    return {
        "result": result,
        "metric": metric_words(result.metric, result.better),
        "s": s,
        "figure_uri": scrub_figure(s, f"causal scrubbing of {result.name!r} on {result.model}"),
        "rows": scrub_rows(s),
        "claims": claims,
        # the task's corrupted input is discovery's; scrubbing resamples inputs by the hypothesis instead
        "where": f"{result.model}: {result.task_description.split('; corrupted:')[0]}",
    }


def scrub_page(result) -> str:
    return render_string("mechscope.lm", "scrub.html.j2", **scrub_context(result))


def write_scrub_report(result, out: Path) -> Path:
    return render("mechscope.lm", "scrub.html.j2", Path(out), **scrub_context(result))
