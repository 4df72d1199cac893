"""The page of a CNN's attribution graph (``cnn graph``): the viewer of :mod:`mechscope.core.render.graph_viewer`
with the image, the scores, the checks and the interventions around it."""

from __future__ import annotations

import html as H

import numpy as np

from mechscope.core.render.graph_viewer import graph_page, sections_html, summary_html
from mechscope.core.render.html import array_uri


def page(graph, image: np.ndarray | None = None, slug: str = "graph") -> str:
    """The whole self-contained page of ``graph`` (a :class:`~mechscope.cnn.methods.attribution_graph.
    CnnAttributionGraph`); ``image`` [H, W] in [0, 1] (default: the one the graph's settings keep)."""
    d = graph.to_dict()
    img = image if image is not None else np.asarray(d["settings"].get("image_pixels") or [[0.0]], dtype=float)
    lead = (
        f"<p><b>{H.escape(d['model'])}</b>, {H.escape(d['title'])}. "
        f"Dictionaries: {H.escape(str(d['dictionaries'].get('kind')))} "
        f"({H.escape(str(d['dictionaries'].get('source')))}). {_grids(d)}</p>"
        f'<p><img src="{array_uri(img, 6)}" alt="the image" style="image-rendering:pixelated"></p>'
    )
    return graph_page(
        d, graph.to_circuit_tracer(slug), f"Attribution graph: {d['title']}", summary_html(d, lead), sections_html(d)
    )


def _grids(d: dict) -> str:
    """Where a node's position lives: each stage's convolution output, before its pooling (conv2's 8x8, where the
    explain report's shapes give the pooled 4x4)."""
    grids = d["settings"].get("grids") or []
    if not grids:
        return ""
    parts = ", ".join(f"{H.escape(str(n))} {h}×{w}" for n, (h, w) in zip(d["layer_names"], grids, strict=False))
    return f"Feature positions are (row, column) in each stage's convolution output before pooling: {parts}."
