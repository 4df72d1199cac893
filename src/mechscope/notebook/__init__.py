"""mechscope in a notebook: every result renders itself inline (``_repr_html_``), offline.

Each result's ``_repr_html_`` is one self-contained HTML fragment with the content of its section
of the HTML report: tables, figures inlined as base64 PNGs, the hover attention viewer with its
inline script; no CDN, no widget extension. Large results show their summary with the rest folded
in ``<details>``, and stay under :data:`~mechscope.notebook.fragment.MAX_CHARS` (the whole report is
``result.save_html(path)``). Element ids are unique per render and every script is scoped to its
own root element, so any number of results and viewers share one notebook.

:func:`to_html` and :func:`save_html` pick the renderer for a result (:mod:`.render`).
"""

from mechscope.notebook.fragment import MAX_CHARS, page_to_fragment
from mechscope.notebook.render import save_html, summary_text, to_html
from mechscope.notebook.viewer import AttentionViewer, Table

__all__ = ["MAX_CHARS", "AttentionViewer", "Table", "page_to_fragment", "save_html", "summary_text", "to_html"]
