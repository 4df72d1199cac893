"""Renderers of the sparse-dictionary results (``cnn sae``), registered with :mod:`mechscope.core.show`."""

from __future__ import annotations

from mechscope.cnn.methods.sae import CnnSaeDashboards, CnnSaeEvaluation, CnnSaeHarvest, CnnSaeTraining
from mechscope.core.show import esc, page, renders, table_html


@renders(CnnSaeDashboards, keep_open=("Summary", "Dashboards"))
def dashboards_page(result: CnnSaeDashboards, full: bool = True) -> str:
    from mechscope.cnn.report.sae import dashboards_page as draw

    return draw(result)


@renders(CnnSaeEvaluation)
def evaluation_page(result: CnnSaeEvaluation, full: bool = True) -> str:
    from mechscope.cnn.report.sae import evaluation_page as draw

    return draw(result)


@renders(CnnSaeTraining)
def training_page(result: CnnSaeTraining, full: bool = True) -> str:
    from mechscope.cnn.report.sae import training_page as draw

    return draw(result)


@renders(CnnSaeHarvest)
def harvest_page(result: CnnSaeHarvest, full: bool = True) -> str:
    rows = [[result.hook, str(list(result.activation_shape)), result.images, result.rows, result.width, result.shards]]
    body = (
        f"<p>{esc(result.dataset)} {esc(result.split)}: {result.images:,} images in {result.seconds:.1f} s "
        f"({result.images_per_second:,.0f} images/s, {result.world_size} process(es)).</p><h2>Store</h2>"
        + table_html(["hook", "activation", "images", "rows", "width", "shards"], rows)
    )
    return page(f"Activation harvest of {result.run}", body)
