"""The sections under an attribution graph's drawing (:mod:`mechscope.core.render.graph_viewer`), both wings:
the interventions, with each pair of neighbouring runs that disagree and why; QK attributions; edge paths; the
dictionaries and their quality; the settings and timings."""

from __future__ import annotations

import html as H
import math

from mechscope.core.render.graph_viewer import number_text, table_html

# what each measured column of the interventions holds fixed and what it recomputes (the wings' run modes)
MEASURED = {
    "lm": "Frozen: the attention patterns, normalisation scales and error nodes held at their values on the prompt, "
    "every transcoder's features downstream re-encoded from their inputs, so that they can switch on or off. "
    "Recomputed: the same with the attention patterns and normalisation scales live; the error nodes still held. "
    "Model: the original transformer, its own MLPs, with the features' decoder change added to the MLP outputs they "
    "write.",
    "cnn": "Frozen: every ReLU mask, max-pool choice and error node held at its value on the image, every dictionary's "
    "features downstream re-encoded from their inputs, so that they can switch on or off. Recomputed: the same "
    "with the ReLUs and max pools live; the error nodes still held. Model: the original CNN with the features' "
    "decoder change added where the dictionary writes.",
}

STEP_NAMES = {"predicted_full": "the graph (all edges)", "frozen": "the frozen run", "recomputed": "the recomputed run",
              "model": "the model"}  # fmt: skip


def _gap_reason(step: tuple[str, str], kind: str, counts: dict) -> str:
    """Why two neighbouring steps of the interventions' table differ: what the second releases that the first holds."""
    if step == ("predicted_full", "frozen"):
        return (
            "The graph and the frozen run hold the same parts fixed, but the frozen run re-encodes the features "
            "downstream: where they disagree, the intervention switches features downstream on or off, which the "
            "linear graph, holding each dictionary's active set fixed, cannot follow" + _left_out(counts) + "."
        )
    if step == ("frozen", "recomputed"):
        frozen = "ReLU masks and max-pool choices" if kind == "cnn" else "attention patterns and normalisation scales"
        return f"Frozen and recomputed differ only in the {frozen}: where they disagree, those change."
    if step == ("recomputed", "model"):
        return ("Recomputed and model differ only in the error nodes, held at their values in the recomputed run: "
                "where they disagree, the layers the dictionaries replace respond to the intervention otherwise than "
                "the dictionaries do.")  # fmt: skip
    return (f"{STEP_NAMES[step[0]]} and {STEP_NAMES[step[1]]} (no number between them): where they disagree, the "
            "parts the graph holds fixed change under this intervention.")  # fmt: skip


def _left_out(counts: dict) -> str:
    """What this graph's prediction cannot carry besides: features with no row, row entries dropped."""
    missing = counts.get("active_features", 0) - counts.get("feature_nodes", 0)
    dropped = counts.get("entries_dropped", 0)
    parts = ([f"{missing:,} active features have no row"] if missing > 0 else []) + (
        [f"{dropped:,} row entries were dropped"] if dropped > 0 else [])  # fmt: skip
    return f" (and in this graph {' and '.join(parts)}, which the prediction leaves out)" if parts else ""


def _prediction_gaps(checks: list[dict], shown: int = 3) -> tuple[list[str], list[tuple[str, str]]]:
    """A line for each logit shown of each intervention (the first ``shown``) naming the neighbouring steps of
    graph, frozen, recomputed and model that disagree in sign or by more than 2× (:func:`~mechscope.core.
    attribution_graph.checks.gaps`), and the steps that disagree anywhere, in order (each gets its diagnosis once,
    :func:`_gap_reason`)."""
    from mechscope.core.attribution_graph.checks import STEPS, gaps

    lines, seen = [], set()
    for chk in checks:
        for r in chk.get("logits", [])[:shown]:
            found = gaps(r)
            seen.update(found)
            parts = [f"{STEP_NAMES[a]} {r[a]:+.4g} vs {STEP_NAMES[b]} {r[b]:+.4g} ({_ratio(r[a], r[b])})"
                     for a, b in found]  # fmt: skip
            if parts:
                lines.append(f"{chk['description']}, logit {r.get('label')!r}: " + "; ".join(parts) + ".")
    return lines, sorted(seen, key=lambda g: (STEPS.index(g[0]), STEPS.index(g[1])))


def _ratio(a: float, b: float) -> str:
    """How the change ``a`` of one step compares with ``b`` of the next."""
    if a * b < 0:
        return "the opposite sign"
    if a == 0 or b == 0:
        return f"the {'second' if b == 0 else 'first'} does not move"
    return f"{abs(a / b):.1f}× as large"


def _paths_html(p: dict, nodes: list[dict]) -> str:
    """One target's inputs split by the attention head that carried them (an ``EdgePaths`` record)."""
    from mechscope.core.attribution_graph.graph import target_title

    name = H.escape(target_title(p["target"], p.get("label", "")))
    by_id = {n["id"]: n for n in nodes}

    def source(i: str) -> str:  # an input by its token, a feature or error by its label and the token it sits on
        n = by_id.get(i)
        if n is None:
            return i
        if n["kind"] == "input":
            return f"{n.get('label', '')!r} at position {n['pos']} ({i})"
        return f"{n.get('label', i)} at position {n['pos']}, {n.get('ctx_label', '')!r} ({i})"

    heads = [[h["head"], h["total"], h["abs"]] for h in p["heads"] if h["abs"] > 0][:8]  # heads that carried any
    rows = [
        [source(r["source"]), r["edge"], r["direct"], "; ".join(f"{k} {v:+.3f}" for k, v in r["via"].items()) or "—"]
        for r in p["rows"]
    ]
    return (
        f"<h2>Inputs of {name} by the head that carried them</h2>"
        "<p>Each input's edge into the target split exactly into the part written at the target's position "
        "(direct) and the part each attention head carried there (its output at that position read through the "
        "target's readout, one backward pass per head): edge = direct + the heads' parts (the table gives each "
        "input's five largest). An input at another position has no direct part; the largest found is "
        f"{number_text(p['max_abs_residual'], 2)}.</p>"
        "<div style='display:flex;gap:1em;flex-wrap:wrap'>"
        f"<div><b>Heads, summed over every input</b>{table_html(['head', 'total', 'sum of |parts|'], heads)}</div>"
        f"<div><b>The strongest inputs</b>{table_html(['input', 'edge', 'direct', 'via heads'], rows)}</div></div>"
    )


def sections_html(d: dict, extra: str = "") -> str:
    """Interventions, QK attributions, edge paths, dictionaries and settings of a graph record, as ``<h2>``
    sections."""
    out = [_interventions_html(d)] if d.get("checks") else []
    out += [_qk_html(q) for q in d.get("qk", [])]
    out += [_paths_html(p, d["nodes"]) for p in d.get("paths", [])]
    if d.get("dictionaries"):
        out.append(_dictionaries_html(d["dictionaries"]))
    out.append(extra)
    out.append(_settings_html(d))
    return "".join(out)


SHOWN_LOGITS = 3  # the attributed logits each intervention's rows show


def _interventions_html(d: dict) -> str:
    from mechscope.core.attribution_graph.checks import GAP_FACTOR

    rows = [
        [chk["description"], r.get("label"), r.get("predicted_full"), r.get("predicted_pruned")]
        + [r.get(k) for k in ("frozen", "recomputed", "model")]
        for chk in d["checks"]
        for r in chk["logits"][:SHOWN_LOGITS]
    ]
    n = max(len(chk["logits"]) for chk in d["checks"])
    k = SHOWN_LOGITS
    which = (f"the first {k} of the {n} attributed logits, in the order listed above, each" if n > k
             else "the attributed logit" if n == 1 else f"the {n} attributed logits, each")  # fmt: skip
    lines, steps = _prediction_gaps(d["checks"], SHOWN_LOGITS)
    notes = "".join(f"<li>{H.escape(s)}</li>" for s in lines)
    why = " ".join(_gap_reason(g, d.get("kind", ""), d.get("counts") or {}) for g in steps)
    return (
        f"<h2>Interventions</h2><p>Change of {which} minus the mean logit: predicted by the graph, which holds every "
        "nonlinearity and each dictionary's active set fixed (every computed edge; the pruned graph alone), and "
        f"measured in three runs. {MEASURED.get(d.get('kind'), '')} Below the table: each pair of neighbouring "
        f"columns (graph (all), frozen, recomputed, model) that disagrees in sign or by more than {GAP_FACTOR:g}×, "
        "and what the second of the pair lets change.</p>"
        + table_html(["intervention", "logit", "graph (all)", "graph (pruned)", "frozen", "recomputed", "model"],
                     rows, 2)
        + (f"<ul>{notes}</ul><p>{H.escape(why)}</p>" if notes else "<p class='muted'>No neighbouring columns "
           "disagree.</p>")  # fmt: skip
    )


def _qk_html(q: dict) -> str:
    def side(items):
        return table_html(["part", "score"], [[i["label"], i["score"]] for i in items])

    wpairs = table_html(["query", "key", "score"], [[p["query"], p["key"], p["score"]] for p in q["writer_pairs"]], 2)
    spairs = table_html(["query", "key", "score"], [[p["query"], p["key"], p["score"]] for p in q["pairs"]], 2)
    return (
        f"<h2>QK attribution: head {q['layer']}.{q['head']}, query {q['query_pos']} → key {q['key_pos']}</h2>"
        f"<p>Attention {q['pattern']:.3f}, score {q['score']:.3f} (scaled q·k); the parts and the bias terms "
        f"add up to it within {number_text(q['max_abs_residual'], 2)}.</p>"
        "<div style='display:flex;gap:1em;flex-wrap:wrap'>"
        f"<div><b>Query side, by writer</b>{side(q['query_writers'])}</div>"
        f"<div><b>Key side, by writer</b>{side(q['key_writers'])}</div>"
        f"<div><b>Pairs of writers</b>{wpairs}</div>"
        f"<div><b>Query side, by source</b>{side(q['query_sources'])}</div>"
        f"<div><b>Key side, by source</b>{side(q['key_sources'])}</div>"
        f"<div><b>Pairs of sources</b>{spairs}</div></div>"
    )


def _readable(v) -> str:
    """A dictionaries entry as text: a list as its first items, a dict (training settings) as "key value" pairs."""
    if isinstance(v, dict):
        return ", ".join(f"{str(k).replace('_', ' ')} {_readable(x)}" for k, x in v.items() if x is not None)
    if isinstance(v, list):
        return ", ".join(map(_readable, v[:8])) + (" …" if len(v) > 8 else "")
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


def _dictionaries_html(dic: dict) -> str:
    names = {"trained": "trained with"}
    rows = [
        [names.get(k, k), _readable(v)]
        for k, v in dic.items()
        if k != "quality" and v not in ([], "", None)  # an empty entry (no paths: built here) says nothing
    ]
    quality = _quality_html(dic.get("quality"), dic.get("widths"))
    return "<h2>Dictionaries</h2>" + table_html(["", ""], rows, 2) + quality


def _pct(x) -> str:
    return f"{100 * x:.1f}%" if isinstance(x, (int, float)) and math.isfinite(x) else "—"


def _quality_html(q: list[dict] | None, widths: list | None) -> str:
    """The trained dictionaries' quality on held-out rows, one row per layer or stage, and a sentence on the worst
    error share (the error nodes stand in for what the features miss)."""
    if not q:
        return ""
    where = "stage" if "stage" in q[0] else "layer"
    rows = []
    for r in q:
        width = r.get("d_sae")
        if width is None and isinstance(r.get(where), int) and widths and r[where] < len(widths):
            width = widths[r[where]]
        dead = r.get("dead")
        dead_text = "—" if dead is None else f"{dead:,}" + (f" of {width:,} ({_pct(dead / width)})" if width else "")
        l0 = r.get("l0")
        rows.append([str(r.get(where)), _pct(r.get("explained_variance")),
                     "—" if l0 is None else f"{l0:.1f}", _pct(r.get("error_share")), dead_text])  # fmt: skip
    cols = [where, "explained variance", "L0 (features active per position)", "error share (‖error‖ / ‖output‖)",
            "dead features"]  # fmt: skip
    return (
        "<p>Quality on held-out rows not used in training: the share of the output's variance the dictionary "
        "explains; L0, the mean number of features active per position; the error share, the mean norm of the error "
        "(what the error nodes carry) over the mean norm of the output it is part of; the features never active on "
        "those rows.</p>" + table_html(cols, rows) + _error_sentence(q, where)
    )


def _error_sentence(q: list[dict], where: str) -> str:
    share = [(r["error_share"], r) for r in q if isinstance(r.get("error_share"), (int, float))
             and math.isfinite(r["error_share"])]  # fmt: skip
    if not share:
        return ""
    e, r = max(share, key=lambda x: x[0])
    text = (f"The largest error share is {where} {H.escape(str(r.get(where)))}'s: the error's mean norm is "
            f"{_pct(e)} of the output's (explained variance {_pct(r.get('explained_variance'))}).")  # fmt: skip
    if e >= 0.5:
        text += (f" Much of what that {where} writes reaches the graph through error nodes rather than features: an "
                 "error node is a fixed vector, with no inputs in the graph.")  # fmt: skip
    return f"<p>{text}</p>"


OMIT_SETTINGS = {"image_pixels": "the image above (its grey values are in graph.json)"}


def _settings_html(d: dict) -> str:
    st = [
        [k, OMIT_SETTINGS[k] if k in OMIT_SETTINGS else v if not isinstance(v, (list, dict)) else str(v)[:80]]
        for k, v in d["settings"].items()
    ]
    st += [[f"seconds: {k}", v] for k, v in d.get("seconds", {}).items()]
    return "<h2>Settings and timings</h2>" + table_html(["", ""], st)
