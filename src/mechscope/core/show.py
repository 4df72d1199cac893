"""The renderer registry: how a result becomes HTML, looked up by its type.

Each wing's ``notebook`` module registers a renderer per result type::

    @renders(HeadsResult, keep_open=("Heads ranked by induction score",))
    def heads_page(result, full: bool) -> str | tuple[str, list[str]]:
        ...  # a whole HTML page

``Result._repr_html_`` and ``save_html`` come here; the first lookup of a type that is not registered imports
the notebook module of the wing the type lives in (``mechscope.cnn.notebook`` for ``mechscope.cnn...``), once,
so that results and methods never import rendering. A type with no renderer shows a table of its fields.

A renderer returns a whole page (and, optionally, the names of sections left out of the notebook view);
:func:`to_html` turns it into a notebook fragment (scoped, folded, size-capped), :func:`save_html` writes it.
"""

from __future__ import annotations

import html as H
import importlib
from collections.abc import Callable
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path

import markupsafe

from mechscope.core.render.fragment import MAX_CHARS, page_to_fragment

PAGE_CSS = """
 body { font-family: system-ui, sans-serif; color: #222; }
 h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 1.2em; }
 table { border-collapse: collapse; font-size: .85em; margin: .5em 0; } td, th { border: 1px solid #ddd; padding: .2em .5em; text-align: right; }
 th { background: #f4f4f4; } td.l, th.l { text-align: left; } img { max-width: 100%; } .muted { color: #777; font-size: .9em; }
 .grid { display: flex; flex-wrap: wrap; gap: 1em; } .grid figure { margin: 0; }
"""  # noqa: E501


@dataclass(frozen=True)
class Renderer:
    page: Callable  # (result, full: bool) -> page, or (page, sections left out of the notebook view)
    keep_open: tuple[str, ...] = ()  # sections a notebook shows unfolded besides the first


_REGISTRY: dict[type, Renderer] = {}
_VIEWS: dict[tuple[type, str], Callable] = {}
_LOADED: set[str] = set()


def renders(cls: type, keep_open: tuple[str, ...] = ()):
    """Register the decorated function as the renderer of ``cls`` (and its subclasses without their own)."""

    def register(fn: Callable) -> Callable:
        _REGISTRY[cls] = Renderer(fn, tuple(keep_open))
        return fn

    return register


def views(cls: type, name: str):
    """Register the decorated function as ``cls``'s view ``name`` (``result.view(name, ...)``: a table, a viewer)."""

    def register(fn: Callable) -> Callable:
        _VIEWS[(cls, name)] = fn
        return fn

    return register


def view(obj, name: str, *args, **kwargs):
    """``obj``'s registered view ``name`` called with the arguments (its wing's notebook module loaded once)."""
    for attempt in range(2):
        for klass in type(obj).__mro__:
            if (klass, name) in _VIEWS:
                return _VIEWS[(klass, name)](obj, *args, **kwargs)
        wing = _wing_of(type(obj))
        if attempt or wing is None:
            break
        _LOADED.add(wing)
        importlib.import_module(f"{wing}.notebook")
    raise AttributeError(f"{type(obj).__name__} has no view {name!r}")


def renderer_for(obj) -> Renderer | None:
    """The renderer registered for ``obj``'s type (nearest in its MRO), importing its wing's notebook once."""
    for _ in range(2):
        for klass in type(obj).__mro__:
            if klass in _REGISTRY:
                return _REGISTRY[klass]
        wing = _wing_of(type(obj))
        if wing is None or wing in _LOADED:
            return None
        _LOADED.add(wing)
        importlib.import_module(f"{wing}.notebook")
    return None


def _wing_of(cls: type) -> str | None:
    parts = cls.__module__.split(".")
    if len(parts) >= 2 and parts[0] == "mechscope" and parts[1] not in ("core",):
        return ".".join(parts[:2])
    return None


# ---- pages: the small pieces every renderer uses ------------------------------------------------


def page(title: str, body: str) -> str:
    """A minimal self-contained page in the reports' style."""
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{H.escape(title)}</title>'
        f"<style>{PAGE_CSS}</style></head>\n<body>\n<h1>{H.escape(title)}</h1>\n{body}\n</body></html>"
    )


def esc(x) -> str:
    return str(markupsafe.escape(x))


def table_html(columns: list[str], rows: list[list]) -> str:
    def cell(v):
        if isinstance(v, float):
            return "—" if v != v else f"{v:.3f}"
        return esc(v)

    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def img(uri: str, alt: str) -> str:
    return f'<img src="{uri}" alt="{esc(alt)}">'


def _short(v) -> str:
    import numpy as np
    import torch

    if isinstance(v, torch.Tensor | np.ndarray):
        return f"array {list(v.shape)}"
    if is_dataclass(v) and not isinstance(v, type):
        return type(v).__name__
    if isinstance(v, dict):
        return f"dict of {len(v)}" if len(v) > 8 else ", ".join(f"{k}: {_short(x)}" for k, x in v.items())
    if isinstance(v, list | tuple):
        return f"{len(v)} items" if len(v) > 12 else "[" + ", ".join(_short(x) for x in v) + "]"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def fields_page(obj, full: bool = True) -> str:
    """A table of a result's fields: what any result without a renderer of its own shows."""
    rows = [[f.name, _short(getattr(obj, f.name))] for f in fields(obj)] if is_dataclass(obj) else []
    return page(type(obj).__name__, "<h2>Fields</h2>" + table_html(["field", "value"], rows))


# ---- the two ways out ---------------------------------------------------------------------------


def _page(obj, full: bool) -> tuple[str, list[str], tuple[str, ...]]:
    r = renderer_for(obj)
    if r is None:
        return fields_page(obj), [], ()
    out = r.page(obj, full)
    text, omitted = out if isinstance(out, tuple) else (out, [])
    return text, omitted, r.keep_open


def summary_text(obj) -> str:
    """One line for IPython's text/plain beside the HTML."""
    what = getattr(obj, "model", None)
    what = f" of {what}" if isinstance(what, str) and what else ""
    return f"<mechscope {type(obj).__name__}{what}: shown as HTML; .save_html(path) writes its report>"


def to_html(obj, max_chars: int = MAX_CHARS) -> str:
    """``obj``'s notebook fragment: its report section, summary open, the rest folded, under ``max_chars``."""
    text, omitted, keep = _page(obj, full=False)
    return page_to_fragment(text, keep_open=keep, max_chars=max_chars, omitted=omitted)


def save_html(obj, path) -> Path:
    """Write ``obj``'s whole report page (every section; one self-contained file) to ``path``."""
    from mechscope.core.outputs import page_path, write_text_atomic
    from mechscope.core.render.html import with_footer

    path = page_path(path)  # before the page is rendered
    text, _, _ = _page(obj, full=True)
    return write_text_atomic(path, with_footer(text))
