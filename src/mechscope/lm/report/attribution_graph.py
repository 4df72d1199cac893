"""The page of a transformer's attribution graph (``lm graph``): the viewer of :mod:`mechscope.core.render.
graph_viewer` with the prompt, the scores, the checks, the interventions and the QK attributions around it."""

from __future__ import annotations

import html as H

from mechscope.core.render.graph_sections import sections_html
from mechscope.core.render.graph_viewer import graph_page, summary_html


def page(graph, slug: str = "graph") -> str:
    """The whole self-contained page of ``graph`` (an :class:`~mechscope.lm.methods.attribution_graph.
    LmAttributionGraph`)."""
    d = graph.to_dict()
    toks = "".join(
        f"<span style='border:1px solid #ddd;margin:1px;padding:0 2px;white-space:pre'>{H.escape(t)}</span>"
        for t in d["input_labels"]
    )
    lead = f"<p><b>{H.escape(d['model'])}</b> on {len(d['input_labels'])} tokens:</p><p>{toks}</p>"
    return graph_page(
        d, graph.to_circuit_tracer(slug), f"Attribution graph: {d['model']}", summary_html(d, lead), sections_html(d)
    )
