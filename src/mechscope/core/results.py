"""Typed results: every analysis returns a frozen :class:`Result`; its JSON is ``to_dict()``.

A result is a frozen dataclass that subclasses :class:`Result`: its fields cannot be reassigned
(``dataclasses.replace`` makes a new one). The arrays, tensors, dicts and lists it holds are not copied, so
writing into one (``r.scores["induction"][0, 0] = 1``) changes the result and every view of it: copy first
(``.copy()``, ``.clone()``) to experiment. ``to_dict()`` turns it into plain JSON values: tensors and arrays
become nested lists, tuples lists, nested results dicts, NaN ``None``; fields declared with
:func:`figure_data` feed figures only and stay out of the JSON. A result that other commands read back has
a ``SCHEMA`` (``"mechscope.<kind>/<version>"``), written as the ``schema`` header of its JSON, and
``from_dict`` / ``load`` rebuild it from the field types.

Rendering is not imported here: ``_repr_html_`` and ``save_html`` look the result's type up in
:mod:`mechscope.core.show`, where each wing's ``notebook`` module registers its renderers.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from mechscope.core.errors import RunError, about, user_errors

SCHEMA_KEY = "schema"


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
        return {_key_text(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return None if math.isnan(obj) else float(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


def check_schema(schema: str, ours: str, where: str = "") -> None:
    """Refuse a record of another layout, or of a newer version of ours (``"mechscope.<kind>/<version>"``): it was
    written by a newer mechscope, whose fields this one may read wrongly. ``where`` prefixes the message."""
    (kind, _, version), (our_kind, _, our_version) = schema.partition("/"), ours.partition("/")
    prefix = f"{where}: " if where else ""
    if kind != our_kind:
        raise RunError(f"{prefix}expected a {ours} record, got {schema}")
    if version.isdigit() and our_version.isdigit() and int(version) > int(our_version):
        raise RunError(f"{prefix}a {schema} record, newer than this mechscope reads ({ours}): upgrade mechscope")


def _a(name: str) -> str:
    """The article of a class name: "an" before a vowel sound (AttributionResult, OwnReader), "a" before a consonant
    and before U read "you" (UnitTuning, UniversalityResult)."""
    return "an" if name[:1] in ("A", "E", "I", "O") else "a"


class Result:
    """Base of every public result: a frozen dataclass with ``to_dict``, ``from_dict``, ``load`` and rendering.

    ``SCHEMA`` (a class attribute) names the JSON layout and its version; results nested inside another need
    none. Subclasses may add derived entries to the JSON with :meth:`json_extras` (ignored by ``from_dict``).
    """

    SCHEMA: ClassVar[str | None] = None

    # ---- JSON -------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        out = {SCHEMA_KEY: self.SCHEMA} if self.SCHEMA else {}
        out |= {f.name: plain(getattr(self, f.name)) for f in fields(self) if f.metadata.get("json", True)}
        return out | self.json_extras()

    def json_extras(self) -> dict:
        """Derived entries written beside the fields (read by people and other tools, not by ``from_dict``)."""
        return {}

    @classmethod
    def check_record(cls, data) -> None:
        """A JSON object of this class's layout, or of an older version of it (:func:`check_schema`); a record
        without a schema is read as this version. :meth:`load` checks it before any ``from_dict``, a subclass's
        own included."""
        if not isinstance(data, dict):
            raise RunError(f"expected {_a(cls.__name__)} {cls.__name__} record (a JSON object), "
                           f"got {type(data).__name__}")  # fmt: skip
        schema = data.get(SCHEMA_KEY)
        if cls.SCHEMA and isinstance(schema, str):
            check_schema(schema, cls.SCHEMA)

    @classmethod
    def from_dict(cls, data: dict):
        """The result ``to_dict`` wrote, rebuilt from the field types (figure-only fields take their defaults)."""
        cls.check_record(data)
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for f in fields(cls):
            if not f.init or not f.metadata.get("json", True) or f.name not in data:
                continue
            kwargs[f.name] = _rebuild(hints.get(f.name, Any), data[f.name])
        missing = [f.name for f in fields(cls) if f.init and f.name not in kwargs and f.default is MISSING
                   and f.default_factory is MISSING]  # fmt: skip
        if missing:  # named here: Python's "__init__() missing 12 required positional arguments: ..." before
            if not kwargs:
                raise RunError(f"not {_a(cls.__name__)} {cls.__name__} record: it holds none of its fields")
            raise RunError(f"not a complete {cls.__name__} record: {', '.join(missing)} missing")
        try:
            return cls(**kwargs)
        except TypeError as e:
            raise RunError(f"not a complete {cls.__name__} record: {e}") from None

    @classmethod
    def load(cls, path):
        """The result saved as JSON at ``path`` (a file, or a directory holding ``cls.FILE``)."""
        from mechscope.core.validate import read_strict_json, usable_path

        path = usable_path(path, f"{cls.__name__} record")  # None was pathlib's TypeError
        if path.is_dir():
            path = path / getattr(cls, "FILE", "result.json")

        data = read_strict_json(path, f"{cls.__name__} record")
        with about(path, RunError):
            cls.check_record(data)
        try:
            with about(path, RunError):  # the record's own checks: said of the file
                return cls.from_dict(data)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
            raise RunError(f"{path}: not a readable {cls.__name__} record ({type(e).__name__}: {e})") from None

    # ---- showing ----------------------------------------------------------------------------

    def _repr_html_(self) -> str:
        from mechscope.core.show import to_html

        return to_html(self)

    @user_errors  # a bad path is one line from the call
    def save_html(self, path) -> Path:
        """Write this result's self-contained HTML report to ``path``; returns the path."""
        from mechscope.core.show import save_html

        return save_html(self, path)

    @user_errors  # a bad head or unit surfaces from the view's call, not through show's machinery
    def render_view(self, name: str, *args, **kwargs):
        """A named view of this result registered by its wing's notebook module (``table``, ``show``...)."""
        from mechscope.core.show import view

        return view(self, name, *args, **kwargs)

    def _repr_pretty_(self, p, cycle) -> None:
        """IPython's text beside the HTML: one line (the dataclass repr of a large result runs to megabytes)."""
        from mechscope.core.show import summary_text

        p.text(summary_text(self))

    def __init_subclass__(cls, **kwargs) -> None:
        # IPython takes the first class in the MRO with _repr_pretty_ *or* __repr__ in its own namespace, and
        # @dataclass writes a __repr__ into each result class: so each gets _repr_pretty_ in its own too
        super().__init_subclass__(**kwargs)
        cls._repr_pretty_ = Result._repr_pretty_


@dataclass(frozen=True)
class Saved(Result):
    """A part of a loaded result kept as the JSON it was saved as.

    Some parts are saved in a form made for reading (token ids decoded into text, summaries of arrays) that
    cannot be turned back into the object that wrote it; after ``load`` such a part is a ``Saved`` holding its
    JSON, so that ``to_dict`` writes it again unchanged and reports show what the file holds.
    """

    data: Any

    def to_dict(self, *args, **kwargs) -> Any:
        return self.data


def saved(value: Any) -> Saved | None:
    """``value`` (a part of a JSON record) kept as it is; None stays None."""
    return None if value is None else Saved(value)


def _rebuild(tp: Any, value: Any) -> Any:
    """``value`` (plain JSON) as the type ``tp`` declares: nested results, tuples, arrays, tensors, floats."""
    if value is None:
        if tp is float:
            return math.nan
        if isinstance(tp, type) and is_dataclass(tp):  # a part that must be there (an optional one is a Union)
            raise ValueError(f"{tp.__name__} is null")
        if typing.get_origin(tp) in (tuple, list, dict):
            raise ValueError(f"null where a {typing.get_origin(tp).__name__} of values is expected")
        return None
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        return _rebuild(options[0], value) if len(options) == 1 else value
    if isinstance(tp, type) and issubclass(tp, Result):
        return tp.from_dict(value)
    if isinstance(tp, type) and is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        return tp(**{f.name: _rebuild(hints.get(f.name, Any), value[f.name]) for f in fields(tp) if f.name in value})
    if tp is np.ndarray:
        return np.asarray(_nan(value), dtype=float)
    if tp is torch.Tensor:
        return torch.as_tensor(np.asarray(_nan(value)))  # float64, int64 or bool: every saved value exactly
    if tp is float:
        return float(value)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_rebuild(args[0], v) for v in value)
        if args:
            if len(value) != len(args):
                raise ValueError(f"{len(value)} items where {len(args)} are expected: {value!r:.60}")
            return tuple(_rebuild(a, v) for a, v in zip(args, value, strict=True))
        return tuple(value)
    if origin is list:
        return [_rebuild(args[0], v) for v in value] if args else list(value)
    if origin is dict:
        kt, vt = args if args else (Any, Any)
        return {_key(kt, k): _rebuild(vt, v) for k, v in value.items()}
    return value


def _key_text(key: Any) -> str:
    """A dict key as JSON's string: a tuple joined with dots ("1.2", what :func:`_key` reads back for ints), others
    ``str``."""
    return ".".join(map(str, key)) if isinstance(key, tuple) else str(key)


def _key(tp: Any, key: str) -> Any:
    if tp is int:
        return int(key)
    if typing.get_origin(tp) is tuple:
        return tuple(int(x) for x in str(key).replace(",", ".").split("."))
    return key


def _nan(value: Any) -> Any:
    if isinstance(value, list):
        return [_nan(v) for v in value]
    return math.nan if value is None else value


def replace(result, **changes):
    """A copy of a frozen result with ``changes`` (``dataclasses.replace``; results never change in place)."""
    return dataclasses.replace(result, **changes)
