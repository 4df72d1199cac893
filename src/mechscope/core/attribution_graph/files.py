"""The files a graph command writes, and re-rendering a saved graph: the same for both wings but for the page."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from mechscope.core.outputs import atomic_output, check_target, save_tensors, write_json
from mechscope.core.render.html import with_footer

CT_FILE = "graph-circuit-tracer.json"


def write_graph_files(graph, where: Path, html: str, full_about: str, slug: str = "graph") -> None:
    """graph.json, graph.html (``html``), graph-circuit-tracer.json and (when the graph keeps it) the unpruned graph
    in graph_full.safetensors (``full_about``: its metadata, saying what its node space is)."""
    write_json(where / graph.FILE, graph.to_dict())
    write_json(where / CT_FILE, graph.to_circuit_tracer(slug), compact=True)
    (where / "graph.html").write_text(with_footer(html), encoding="utf-8")
    f = graph.full
    if f is not None:
        tensors = {k: v for k, v in f.items() if isinstance(v, torch.Tensor)}
        save_tensors(where / "graph_full.safetensors", tensors, metadata={"about": full_about})


def view_graph(graph_json, cls, write_outputs: Callable, out=None, force: bool = False):
    """Re-render a graph JSON of class ``cls`` (as written, or downloaded from the viewer with annotations) with the
    wing's ``write_outputs(graph, folder)`` into ``out`` (default: beside it, ``FILE-view/``); ``(out, graph)``."""
    from mechscope.core.attribution_graph.graph import load_graph

    graph = load_graph(graph_json, cls)
    src = Path(graph_json)
    out = Path(out) if out is not None else src.with_name(src.stem + "-view")
    check_target(out, force)
    with atomic_output(out, force) as tmp:
        write_outputs(graph, tmp)
    return out, graph
