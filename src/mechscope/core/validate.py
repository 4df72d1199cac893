"""Field-by-field checks of what a file gives, each error naming the file, the field and what was expected.

Every reader of a user's file (a run's config.json, a Hugging Face config.json, a GGUF header,
a safetensors header) checks the fields it will use with :func:`field` before using them, so a
wrong type or an absurd value is one line (``config.json: field 'n_head' is 0; expected an
integer ≥ 1``), never a ``TypeError`` or a division by zero deep inside.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from mechscope.core.errors import MechscopeError

MISSING = object()
BIG = 2**31 - 1  # the largest size any field may hold (a 32-bit count: beyond it, a corrupt file)


def shown(value: Any, limit: int = 60) -> str:
    """A short rendering of a JSON value for an error message."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def field(
    obj: dict,
    key: str,
    kind: str,
    where: str | Path,
    *,
    default: Any = MISSING,
    lo: float | None = None,
    hi: float | None = None,
    choices: tuple | None = None,
    nullable: bool = False,
    error: type[MechscopeError] = MechscopeError,
    label: str | None = None,
) -> Any:
    """``obj[key]`` checked to be of ``kind`` (``int``, ``number``, ``str``, ``bool``, ``object``, ``list``,
    ``ints``: a list of integers, ``numbers``: a number or a list of numbers) and within ``lo``..``hi`` /
    ``choices``; ``default`` when absent (absent and no default: an error). ``nullable``: JSON null allowed
    (returned as None). Raises ``error`` naming ``where``, the field and what was expected."""
    name = label or key
    if key not in obj or (obj[key] is None and not nullable and default is not MISSING):
        if default is MISSING:
            raise error(f"{where}: field {name!r} is missing; expected {_expected(kind, lo, hi, choices)}")
        return default
    value = obj[key]
    if value is None and nullable:
        return None
    ok = {
        "int": _is_int,
        "number": _is_number,
        "str": lambda v: isinstance(v, str),
        "bool": lambda v: isinstance(v, bool),
        "object": lambda v: isinstance(v, dict),
        "list": lambda v: isinstance(v, list),
        "ints": lambda v: isinstance(v, list) and all(_is_int(x) for x in v),
        "numbers": lambda v: _is_number(v) or (isinstance(v, list) and v and all(_is_number(x) for x in v)),
    }[kind](value)
    if ok and choices is not None:
        ok = value in choices
    if ok and kind in ("int", "number") and ((lo is not None and value < lo) or (hi is not None and value > hi)):
        ok = False
    if ok and kind in ("ints", "numbers"):
        items = value if isinstance(value, list) else [value]
        ok = all((lo is None or x >= lo) and (hi is None or x <= hi) for x in items)
    if not ok:
        raise error(f"{where}: field {name!r} is {shown(value)}; expected {_expected(kind, lo, hi, choices)}")
    return value


def _expected(kind: str, lo, hi, choices) -> str:
    if choices is not None:
        return "one of " + ", ".join(shown(c) for c in choices)
    what = {
        "int": "an integer",
        "number": "a finite number",
        "str": "a string",
        "bool": "true or false",
        "object": "a JSON object",
        "list": "a list",
        "ints": "a list of integers",
        "numbers": "a finite number or a list of them",
    }[kind]
    if lo is not None and hi is not None:
        return f"{what} from {_num(lo)} to {_num(hi)}"
    if lo is not None:
        return f"{what} ≥ {_num(lo)}"
    if hi is not None:
        return f"{what} ≤ {_num(hi)}"
    return what


def _num(x: float) -> str:
    if isinstance(x, int) or float(x).is_integer() and abs(x) < 1e15:
        return f"{int(x):,}"
    return f"{x:g}"


def read_json_object(path: Path, what: str = "JSON", error: type[MechscopeError] = MechscopeError) -> dict:
    """A JSON file that must hold one object: one line naming the file when it is unreadable, not UTF-8,
    not JSON, or another JSON type."""
    try:
        text = path.read_bytes().decode("utf-8-sig")  # a byte-order mark some editors write is not content
    except FileNotFoundError:
        raise error(f"{path}: file not found") from None
    except IsADirectoryError:
        raise error(f"{path}: is a directory; expected a {what} file") from None
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text (byte {e.start}); expected a {what} file") from None
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        obj = strict_loads(text)
    except (json.JSONDecodeError, ValueError, RecursionError) as e:
        raise error(f"{path}: corrupt JSON ({json_why(e)}); expected a {what} file") from None
    if not isinstance(obj, dict):
        raise error(f"{path}: holds a JSON {_json_type(obj)}; expected an object ({what})")
    return obj


def read_safetensors(path: Path) -> dict:
    """A safetensors file's tensors by name: one line naming the file when it is missing or unreadable."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise MechscopeError(f"{path}: file not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise MechscopeError(f"{path}: not a readable safetensors file ({type(e).__name__})") from None


def json_why(e: Exception) -> str:
    """What :func:`strict_loads` refused, in a few words (Python's own text for a huge number is a paragraph)."""
    return "a number of more than 4,300 digits" if "integer string conversion" in str(e) else str(e)


def strict_loads(text: str) -> Any:
    """JSON as the standard has it: ``NaN`` and ``Infinity`` (which Python's reader takes and writer writes) and a
    key given twice in one object are a ``ValueError``."""
    return json.loads(text, parse_constant=_no_constant, object_pairs_hook=_no_repeats)


def read_strict_json(path: Path, what: str) -> Any:
    """A file a command wrote, read as :func:`strict_loads`: a :class:`RunError` naming the file when it is missing
    (``not found``) or not strict JSON (``not a readable WHAT``)."""
    from mechscope.core.errors import RunError

    try:
        return strict_loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunError(f"{path}: not found") from None
    except (OSError, ValueError, RecursionError) as e:  # UTF-8, NaN, Infinity, a key given twice
        raise RunError(f"{path}: not a readable {what} ({json_why(e)})") from None


def _no_repeats(pairs: list) -> dict:
    """A JSON object whose keys are all different (Python keeps the last of two, so one was silently read)."""
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"key {k!r} appears twice in one object")
        out[k] = v
    return out


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _json_type(v: Any) -> str:
    return {list: "list", str: "string", int: "number", float: "number", bool: "boolean"}.get(type(v), "null")


def read_text_file(path: Path, what: str = "text") -> str:
    """A UTF-8 text file: one line naming the file when it is missing, a folder, not UTF-8, binary or empty."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise MechscopeError(f"{path}: {what} file not found") from None
    except IsADirectoryError:
        raise MechscopeError(f"{path}: is a directory; expected a {what} file") from None
    except OSError as e:
        raise MechscopeError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MechscopeError(f"{path}: not UTF-8 text (byte {e.start}); expected a {what} file") from None
    if "\0" in text:
        raise MechscopeError(f"{path}: holds NUL bytes (a binary file?); expected a {what} file")
    if not text.strip():
        raise MechscopeError(f"{path}: the {what} file is empty")
    return text


def usable_path(path: str | Path, what: str = "path") -> Path:
    """``path`` (``~`` expanded) once the file system accepts its name, whether or not it exists: a name it cannot
    even look up (a component longer than 255 bytes, a NUL byte, a folder it may not search) is one line naming
    ``what``, not an ``OSError`` from the first ``exists()``. Call it where a user's path is first probed."""
    import errno
    import os

    if isinstance(path, bool) or not isinstance(path, (str, os.PathLike)):  # None was pathlib's TypeError
        raise MechscopeError(f"{what} must be a path (a string or a pathlib.Path), got {type(path).__name__}")
    text = str(path)
    short = text if len(text) <= 80 else text[:60] + "..." + text[-10:]
    try:
        p = Path(text).expanduser()
        os.stat(p)
    except (FileNotFoundError, NotADirectoryError):
        return p
    except ValueError:  # an embedded NUL byte
        raise MechscopeError(f"{what} {short!r}: not a usable path (it holds a NUL byte)") from None
    except RuntimeError:  # ~user of no such user
        raise MechscopeError(f"{what} {short!r}: not a usable path (no such home directory)") from None
    except OSError as e:
        reason = "file name too long" if e.errno == errno.ENAMETOOLONG else (e.strerror or str(e)).lower()
        raise MechscopeError(f"{what} {short!r}: not a usable path ({reason})") from None
    return p


SEED_MAX = 2**63 - 1  # torch generators take 64-bit seeds; room is left for the seed + k a run derives
LR_MAX = 10.0  # a peak learning rate above this only diverges


def check_seed(seed: int, name: str = "--seed") -> None:
    """A seed must be an integer in [0, 2**63 - 1] (torch's generators overflow beyond 64 bits)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
        raise MechscopeError(f"{name} must be an integer from 0 to 2**63 - 1, got {seed!r}")


def check_lr(lr: float, name: str = "--lr") -> None:
    """A learning rate must be in (0, 10]: zero trains nothing, NaN and infinity make NaN weights."""
    if not _is_number(lr) or not 0 < lr <= LR_MAX:  # a bool is not a rate (True would train at 1)
        raise MechscopeError(f"{name} must be in (0, {LR_MAX:g}], got {lr!r}")


def max_threads() -> int:
    """The most torch threads a command takes: four per core of this machine (more only thrashes, and far more
    crashes OpenMP)."""
    import os

    return 4 * (os.cpu_count() or 1)


def check_threads(n: int, name: str = "--threads") -> None:
    """A thread count must be an integer from 1 to :func:`max_threads`."""
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= max_threads():
        raise MechscopeError(f"{name} must be an integer from 1 to {max_threads()} (4 per core here), got {n!r}")


def check_count(n: int, name: str, low: int = 1, high: int = 10**7) -> None:
    """A count a user gives (steps, sizes, samples) must be an integer in [low, high]: a value past ``high`` is a
    typo or a run of years, not a setting."""
    if isinstance(n, bool) or not isinstance(n, int):
        raise MechscopeError(f"{name} must be an integer, got {n!r}")
    if n < low:
        raise MechscopeError(f"{name} must be at least {low:,}, got {n}")
    if n > high:
        raise MechscopeError(f"{name} must be at most {high:,}, got {n:,}")


def check_finite(x, what: str) -> None:
    """Refuse, in one line, a tensor holding NaN or infinity (a broken network's activations, a corrupt input)
    before an analysis that would fail on it deep inside (scikit-learn's NMF, a matching)."""
    import torch

    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise MechscopeError(f"{what}: {bad:,} values are not finite (NaN or infinity); the weights or the config "
                             "make the network's activations overflow")  # fmt: skip


def scalar(value):
    """A 0-d tensor or array as its Python number (``torch.tensor(5)``, ``np.array(0.5)``); anything else as it is:
    for the checks that read a number given from Python."""
    return value.item() if getattr(value, "ndim", None) == 0 and hasattr(value, "item") else value


def settings_or(settings, cls, **defaults):
    """``settings`` (a ``cls``) or ``cls(**defaults)`` when None; anything else one line (a dict of the fields was
    "'dict' object has no attribute 'validate'")."""
    if settings is None:
        return cls(**defaults)
    if not isinstance(settings, cls):  # two classes of one name (lm's and clip's NeuronSettings): their modules
        want, got = cls.__name__, type(settings).__name__
        if want == got:
            want, got = f"{cls.__module__}.{want}", f"{type(settings).__module__}.{got}"
        raise MechscopeError(f"settings must be a {want} (or None for the defaults), got {got}")
    return settings


def check_int(value, name: str, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an int when it is one (not a bool, not a float; a 0-d tensor or array of one too) within
    [low, high]; else one line."""
    import numbers

    value = scalar(value)  # torch.tensor(5) was refused
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise MechscopeError(f"{name} must be an integer, got {shown(value)}")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        if low is not None and high is not None:
            span = f"from {low:,} to {high:,}"
        else:
            span = f"from {low:,} upwards" if low is not None else f"up to {high:,}"
        raise MechscopeError(f"{name} must be an integer {span}, got {value:,}")
    return value


def check_types(settings, flags: dict[str, str] | None = None) -> None:
    """Each int and float field of a settings dataclass holds an int (not a bool) or a number; one line naming the
    field (its command-line flag from ``flags``, else its name) otherwise. Ranges are each class's own business."""
    import dataclasses

    for f in dataclasses.fields(settings):
        value, name = getattr(settings, f.name), (flags or {}).get(f.name, f.name)
        kind = str(f.type)
        if kind.startswith(("Optional[", "typing.Optional[")):  # the older spelling of "int | None"
            kind = kind.split("[", 1)[1].removesuffix("]") + " | None"
        if value is None and "None" in kind:
            continue
        if kind.split(" |")[0] == "int":
            check_int(value, name)
        elif kind.split(" |")[0] == "float" and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise MechscopeError(f"{name} must be a number, got {shown(value)}")


def repeated(items) -> list:
    """The items given more than once, each named once, sorted (for "X given more than once" lines)."""
    items = list(items)
    return sorted({x for x in items if items.count(x) > 1})


def indices(text: str, n: int = 2, sep: str = ".") -> tuple[int, ...]:
    """``text`` as ``n`` indices separated by ``sep`` (``"5.1"``), each digits only; a ValueError otherwise, for the
    caller's own message (``int("-0")`` is 0: "-0.3" was read as the pair 0.3)."""
    parts = text.split(sep)
    if len(parts) != n or not all(p.strip().isdigit() for p in parts):
        raise ValueError(text)
    return tuple(int(p) for p in parts)


def int_list(text: str, what: str) -> list[int]:
    """Integers separated by commas (or by spaces alone): ``"1,2,3"``, ``"1 2 3"``. An empty item (``"1,,3"``, a
    trailing comma) is one line naming ``what``, not dropped (dropping it read "2,,4" as two ids)."""
    parts = text.split(",") if "," in text else text.split()
    if not parts or any(not p.strip() for p in parts):
        raise MechscopeError(f"{what} expects integers separated by commas, with none empty, got {text!r}")
    try:
        return [int(p) for p in parts]
    except ValueError:
        raise MechscopeError(f"{what} expects integers separated by commas, got {text!r}") from None


def known_settings(cls, settings: dict, what: str) -> None:
    """Every keyword a Python user gives to a function taking ``**settings`` is a field of the settings dataclass
    ``cls``: one line naming the unknown one and the known ones (a TypeError from the dataclass before)."""
    import dataclasses

    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = [k for k in settings if k not in names]
    if unknown:
        raise MechscopeError(f"unknown {what} setting {unknown[0]!r}; the settings are {', '.join(names)}")


def as_items(value, what: str) -> tuple | None:
    """A list a notebook user may give as one item: None stays None, a string or a number is one item (a string was
    read character by character: "saliency" as the methods 's', 'a', ...), a list or tuple its items."""
    import numbers

    if value is None:
        return None
    if isinstance(value, (str, numbers.Number)) and not isinstance(value, bool):
        return (value,)
    if isinstance(value, (list, tuple)) or (hasattr(value, "__iter__") and not isinstance(value, (bytes, dict))):
        return tuple(value)  # an array or a tensor of classes, as before
    raise MechscopeError(f"{what} must be a list (or one item), got {type(value).__name__}")


def name_list(text: str, what: str) -> tuple[str, ...]:
    """Names separated by commas, each stripped: ``"relu, gelu"``. An empty item (``"a,,b"``, a trailing comma) is
    one line naming ``what``, not dropped."""
    parts = [p.strip() for p in text.split(",")]
    empty = next((i for i, p in enumerate(parts) if not p), None)
    if empty is not None:
        raise MechscopeError(f"{what}: item {empty + 1} of {len(parts)} is empty in {text!r}")
    return tuple(parts)


def typed_options(exclude=()) -> list[str]:
    """The options of the running CLI command that the user typed (``--name``), but those named in ``exclude``
    (parameter names); empty outside a command. For options another one makes meaningless, which should be refused
    rather than silently ignored."""
    import importlib

    import typer  # its own copy of click (typer >= 0.24), or click itself: the one that runs the commands

    core = importlib.import_module(typer.Context.__mro__[1].__module__)
    ParameterSource = core.ParameterSource
    ctx = importlib.import_module(core.__name__.rsplit(".", 1)[0] + ".globals").get_current_context(silent=True)
    if ctx is None:
        return []
    return [p.opts[0] if getattr(p, "opts", None) else p.name for p in ctx.command.params
            if p.name not in exclude and ctx.get_parameter_source(p.name) is ParameterSource.COMMANDLINE]  # fmt: skip
