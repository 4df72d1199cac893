"""Renderers of the attribution-graph results (``lm graph``), registered with :mod:`mechscope.core.show`."""
