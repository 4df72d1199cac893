"""Typed results: each analysis returns a frozen dataclass; JSON is ``to_dict()`` of one of them.

:class:`Result` gives a dataclass ``to_dict()``: fields become plain JSON values (tensors and
arrays become nested lists, tuples lists, nested results dicts). Fields that only feed figures
(images, activation maps) are declared with :func:`figure_data` and left out of the JSON.
Reports, the CLI and the tests read the fields themselves, never keys of the JSON.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import field, fields, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

SCHEMA_VERSION = 2  # 1: the implicit mechanisms.json of the MNIST-only explain


def figure_data(default=None) -> Any:
    """A field the report draws but the JSON leaves out (large arrays)."""
    return field(default=default, repr=False, compare=False, metadata={"json": False})


def plain(obj: Any) -> Any:
    """``obj`` as JSON values: dataclasses and dicts as dicts, tensors and arrays as lists, NaN as None."""
    if is_dataclass(obj) and not isinstance(obj, type):
        if hasattr(obj, "to_dict"):
            return obj.to_dict()
        return {f.name: plain(getattr(obj, f.name)) for f in fields(obj) if f.metadata.get("json", True)}
    if isinstance(obj, torch.Tensor):
        return plain(obj.detach().cpu().tolist())
    if isinstance(obj, np.ndarray):
        return plain(obj.tolist())
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return None if math.isnan(obj) else float(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    return obj


class Shown:
    """Mixin: a result that shows itself in a notebook (``_repr_html_``) and writes its HTML report (``save_html``).

    Both delegate to :mod:`mechscope.notebook`, which holds the renderers (imported on first use).
    """

    def _repr_html_(self) -> str:
        from mechscope.notebook import to_html

        return to_html(self)

    def save_html(self, path) -> Path:
        """Write this result's self-contained HTML report to ``path``; returns the path."""
        from mechscope.notebook import save_html

        return save_html(self, path)

    def _repr_pretty_(self, p, cycle) -> None:
        """IPython's text beside the HTML: one line (the dataclass repr of a large result runs to megabytes)."""
        from mechscope.notebook import summary_text

        p.text(summary_text(self))

    def __init_subclass__(cls, **kwargs) -> None:
        # IPython takes the first class in the MRO with _repr_pretty_ *or* __repr__ in its own namespace, and
        # @dataclass writes a __repr__ into each result class: so each gets _repr_pretty_ in its own too
        super().__init_subclass__(**kwargs)
        cls._repr_pretty_ = Shown._repr_pretty_


class Result(Shown):
    """Mixin for frozen result dataclasses: ``to_dict()`` for JSON."""

    def to_dict(self) -> dict:
        return {f.name: plain(getattr(self, f.name)) for f in fields(self) if f.metadata.get("json", True)}


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for a block and restore its train/eval mode afterwards, however the block ends."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, mode in modes:
            m.training = mode
