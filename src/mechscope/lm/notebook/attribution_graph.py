"""Renderers of the attribution-graph results (``lm graph``), registered with :mod:`mechscope.core.show`."""

from __future__ import annotations

from mechscope.core.show import esc, page, renders, table_html
from mechscope.lm.methods.attribution_graph import LmAttributionGraph
from mechscope.lm.methods.attribution_graph_qk import QKAttribution
from mechscope.lm.methods.edge_paths import EdgePaths
from mechscope.lm.methods.replacement_training import TrainedTranscoders


@renders(LmAttributionGraph)
def graph_page(result: LmAttributionGraph, full: bool = True) -> str:
    from mechscope.lm.report.attribution_graph import page as draw

    return draw(result)


@renders(QKAttribution)
def qk_page(q: QKAttribution, full: bool = True) -> str:
    def side(items, what: str):
        return table_html([what, "score"], [[i["label"], i["score"]] for i in items])

    body = (
        f"<p>{esc(q.summary())}</p><h2>Writers</h2>"
        + side(q.query_writers, "query writer")
        + side(q.key_writers, "key writer")
        + table_html(["query", "key", "score"], [[p["query"], p["key"], p["score"]] for p in q.writer_pairs])
        + "<h2>Sources</h2>"
        + side(q.query_sources, "query source")
        + side(q.key_sources, "key source")
        + table_html(["query", "key", "score"], [[p["query"], p["key"], p["score"]] for p in q.pairs])
    )
    return page(f"QK attribution of head {q.layer}.{q.head}", body)


@renders(EdgePaths)
def paths_page(r: EdgePaths, full: bool = True) -> str:
    rows = [
        [x["source"], x["edge"], x["direct"], ", ".join(f"{k}: {v:+.3f}" for k, v in x["via"].items())] for x in r.rows
    ]
    heads = [[h["head"], h["total"], h["abs"]] for h in r.heads[:12]]
    body = (
        table_html(["source", "edge", "direct", "via heads"], rows)
        + "<h2>Heads</h2>"
        + table_html(["head", "total", "sum of |parts|"], heads)
    )
    return page(f"Paths into {r.title()}", body)


@renders(TrainedTranscoders)
def training_page(r: TrainedTranscoders, full: bool = True) -> str:
    cols = ["layer", "explained_variance", "l0", "error_share", "dead", "seconds"]
    return page(f"Transcoders of {r.model}", table_html(cols, [[x.get(c) for c in cols] for x in r.layers]))
