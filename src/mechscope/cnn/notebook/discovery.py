"""Renderers of the circuit-discovery and causal-scrubbing results (``cnn discover``), registered with
:mod:`mechscope.core.show`."""
