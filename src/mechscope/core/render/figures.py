"""Figures without pyplot: nothing here selects a backend or keeps global figure state."""

from __future__ import annotations

from matplotlib.figure import Figure


def subplots(*args, **kwargs):
    """(Figure, axes) like ``pyplot.subplots``, without pyplot."""
    fig_kw = {k: kwargs.pop(k) for k in ("figsize", "layout") if k in kwargs}
    fig = Figure(**fig_kw)
    return fig, fig.subplots(*args, **kwargs)
