"""Renderers of the attribution-graph results (``cnn graph``), registered with :mod:`mechscope.core.show`."""

from __future__ import annotations

from mechscope.cnn.methods.attribution_graph import CnnAttributionGraph, TrainedDictionaries
from mechscope.core.show import page, renders, table_html


@renders(CnnAttributionGraph)
def graph_page(result: CnnAttributionGraph, full: bool = True) -> str:
    from mechscope.cnn.report.attribution_graph import page as draw

    return draw(result)


@renders(TrainedDictionaries)
def dictionaries_page(r: TrainedDictionaries, full: bool = True) -> str:
    cols = ["stage", "explained_variance", "l0", "error_share", "dead", "d_sae", "rows", "seconds"]
    return page("Dictionaries of the CNN's stages", table_html(cols, [[x.get(c) for c in cols] for x in r.stages]))
