"""Renderers of the attribution-graph results (``cnn graph``), registered with :mod:`mechscope.core.show`."""
