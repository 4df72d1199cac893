"""Renderers of the sparse-dictionary results (``lm sae``), registered with :mod:`mechscope.core.show`."""
