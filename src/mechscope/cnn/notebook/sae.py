"""Renderers of the sparse-dictionary results (``cnn sae``), registered with :mod:`mechscope.core.show`."""
