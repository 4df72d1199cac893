"""Renderers of the sparse-dictionary results (``lm sae``), registered with :mod:`mechscope.core.show`."""

from __future__ import annotations

from mechscope.core.show import esc, page, renders, table_html
from mechscope.lm.methods.sae import LmSaeDashboards, LmSaeEvaluation, LmSaeHarvest, LmSaeTraining


@renders(LmSaeDashboards, keep_open=("Summary", "Dashboards"))
def dashboards_page(result: LmSaeDashboards, full: bool = True) -> str:
    from mechscope.lm.report.sae import dashboards_page as draw

    return draw(result)


@renders(LmSaeEvaluation)
def evaluation_page(result: LmSaeEvaluation, full: bool = True) -> str:
    from mechscope.lm.report.sae import evaluation_page as draw

    return draw(result)


@renders(LmSaeTraining)
def training_page(result: LmSaeTraining, full: bool = True) -> str:
    from mechscope.lm.report.sae import training_page as draw

    return draw(result)


@renders(LmSaeHarvest)
def harvest_page(result: LmSaeHarvest, full: bool = True) -> str:
    rows = [[s["name"], s["rows"], s["width"], s["shards"]] for s in result.stores]
    body = (
        f"<p>{esc(result.model)} on {esc(result.text)}: {result.contexts:,} contexts of {result.context} tokens "
        f"({result.tokens:,} tokens) in {result.seconds:.1f} s, {result.tokens_per_second:,.0f} tokens/s, "
        f"{result.world_size} process(es).</p><h2>Stores</h2>"
        + table_html(["store", "rows", "width", "shards"], rows)
    )
    return page(f"Activation harvest of {result.model}", body)
