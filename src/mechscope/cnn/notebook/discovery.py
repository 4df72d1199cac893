"""Renderers of the circuit-discovery and causal-scrubbing results (``cnn discover``), registered with
:mod:`mechscope.core.show`."""

from __future__ import annotations

from mechscope.cnn.methods.discovery import CNNDiscovery
from mechscope.cnn.methods.scrubbing import CNNScrub
from mechscope.core.show import renders


@renders(CNNDiscovery, keep_open=("Summary", "The circuit", "Faithfulness"))
def discovery_page(result: CNNDiscovery, full: bool = True) -> str:
    from mechscope.cnn.report.discovery import discovery_page as draw

    return draw(result)


@renders(CNNScrub)
def scrub_page(result: CNNScrub, full: bool = True) -> str:
    from mechscope.cnn.report.discovery import scrub_page as draw

    return draw(result)
