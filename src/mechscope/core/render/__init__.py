"""Rendering primitives both wings use: self-contained HTML, notebook fragments, viewers, graph layout."""
