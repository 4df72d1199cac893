"""Figures without pyplot: nothing here selects a backend or keeps global figure state."""

from __future__ import annotations

from matplotlib.figure import Figure


def subplots(*args, **kwargs):
    """(Figure, axes) like ``pyplot.subplots``, without pyplot."""
    fig_kw = {k: kwargs.pop(k) for k in ("figsize", "layout") if k in kwargs}
    fig = Figure(**fig_kw)
    return fig, fig.subplots(*args, **kwargs)


def text_colour(rgba) -> str:
    """White text on a dark colour, black on a light one (by the colour's luminance): numbers printed on heat maps."""
    r, g, b = rgba[:3]
    return "white" if 0.2126 * r + 0.7152 * g + 0.0722 * b < 0.5 else "black"
