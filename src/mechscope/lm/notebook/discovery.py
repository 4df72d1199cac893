"""Renderers of the circuit-discovery and causal-scrubbing results (``lm discover``), registered with
:mod:`mechscope.core.show`."""
