"""Renderers of the circuit-discovery and causal-scrubbing results (``lm discover``), registered with
:mod:`mechscope.core.show`."""

from __future__ import annotations

from mechscope.core.show import renders
from mechscope.lm.methods.discovery import LMDiscovery
from mechscope.lm.methods.scrubbing import LMScrub


@renders(LMDiscovery, keep_open=("Summary", "The circuit", "Faithfulness"))
def discovery_page(result: LMDiscovery, full: bool = True) -> str:
    from mechscope.lm.report.discovery import discovery_page as draw

    return draw(result)


@renders(LMScrub)
def scrub_page(result: LMScrub, full: bool = True) -> str:
    from mechscope.lm.report.discovery import scrub_page as draw

    return draw(result)
