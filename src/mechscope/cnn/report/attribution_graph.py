"""The page of a CNN's attribution graph (``cnn graph``): the viewer of :mod:`mechscope.core.render.graph_viewer`
with the image, the scores, the checks and the interventions around it."""

from __future__ import annotations

import html as H

import numpy as np

from mechscope.core.render.graph_sections import sections_html
from mechscope.core.render.graph_viewer import graph_page, summary_html
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


# where each kind of dictionary reads a stage, so the grid a node's position is in (cnn.methods.replacement.KINDS)
GRID_PLACE = {
    "sae": "each stage's output after its ReLU and any max-pool (conv{i}.hook_out, which the SAE reads)",
    "transcoder": "each stage's convolution output (after any batch norm), before its ReLU and max-pool "
    "(conv{i}.hook_pre, which the transcoder reads)",
    "channels": "each stage's convolution output (after any batch norm), before its ReLU and max-pool "
    "(conv{i}.hook_pre, where the stage's own channels are read)",
}


def _grids(d: dict) -> str:
    """Where a node's position lives: the grid of the activation each stage's dictionary reads (``settings.grids``),
    which depends on the dictionaries' kind: an SAE's on the pooled output (the default CNN's conv1 12x12, conv2 4x4),
    a transcoder's or the channels' on the convolution output before pooling (24x24, 8x8)."""
    grids = d["settings"].get("grids") or []
    if not grids:
        return ""
    kind = (d.get("dictionaries") or {}).get("kind") or d["settings"].get("dictionary_kind")
    place = GRID_PLACE.get(kind, "each stage's dictionary grid")
    parts = ", ".join(f"{H.escape(str(n))} {h}×{w}" for n, (h, w) in zip(d["layer_names"], grids, strict=False))
    return f"Feature positions are (row, column) in {place}: {parts}."
