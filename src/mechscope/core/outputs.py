"""Atomic outputs: a command's files appear all together, or not at all.

:func:`atomic_output` gives a command a fresh temporary directory *beside* its target (same
file system, so the final moves are renames). The command writes everything there. When the
``with`` block ends without error, the new entries are moved into place; when it raises
(an error, Ctrl-C, out of memory), the temporary directory is removed and the target is exactly
as it was. So an interrupted run never leaves a mix of old and new files.

* The target absent or empty: the temporary directory becomes the target (one rename).
* The target holds files: refused unless ``force``; with ``force`` each top-level entry the
  command wrote replaces its namesake and nothing else is touched (``--out ~ --force`` must
  never empty a home directory). The old entries are moved aside first and put back if a move
  fails, then deleted.

The location is checked for writability on entry, before any work: the temporary directory is
created there at once.

:func:`write_json` is the one JSON writer of every command: strict JSON, never ``NaN`` or
``Infinity`` (a non-finite number becomes ``null`` and the object's ``non_finite`` entry says
which field held what). A record (a JSON object with a ``schema``) says what made it: its ``versions``
entry holds mechscope's, Python's and the libraries' versions (:func:`versions`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mechscope.core.errors import RunError

log = logging.getLogger(__name__)

TMP_MARK = ".mechscope-tmp-"  # a temporary entry is ".NAME.mechscope-tmp-PID-random" beside its target
NON_FINITE = "non_finite"  # the key that lists the fields written as null, and why


def _plain(x: Any) -> Any:
    """Plain JSON values (NaN and infinities kept, to be found and reported by :func:`finite_json`)."""
    import dataclasses

    import numpy as np
    import torch

    if isinstance(x, (bool, int, str)) or x is None:
        return x
    if isinstance(x, (float, np.floating)):
        return float(x)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    if isinstance(x, (torch.Tensor, np.ndarray)):
        return _plain(x.detach().cpu().tolist() if isinstance(x, torch.Tensor) else x.tolist())
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        if hasattr(x, "to_dict"):
            return _plain(x.to_dict())
        return {f.name: _plain(getattr(x, f.name)) for f in dataclasses.fields(x) if f.metadata.get("json", True)}
    return x


def finite_json(obj: Any) -> tuple[Any, dict[str, str]]:
    """``obj`` as plain JSON values with every NaN and ±infinity replaced by None, and what was replaced
    (``{"path.to[3].field": "NaN"}``). Tensors, arrays, numpy scalars, tuples and result objects become
    plain values."""
    replaced: dict[str, str] = {}

    def walk(x: Any, where: str) -> Any:
        if isinstance(x, float):
            if math.isfinite(x):
                return x
            replaced[where or "."] = "NaN" if math.isnan(x) else ("+Infinity" if x > 0 else "-Infinity")
            return None
        if isinstance(x, dict):
            return {k: walk(v, f"{where}.{k}" if where else k) for k, v in x.items()}
        if isinstance(x, list):
            return [walk(v, f"{where}[{i}]") for i, v in enumerate(x)]
        return x

    return walk(_plain(obj), ""), replaced


VERSIONS = "versions"


NUMERIC_LIBRARIES = ("torch", "numpy", "safetensors", "scikit-learn")  # what the numbers depend on (NMF: blocks)


def versions() -> dict[str, str]:
    """The versions of what computed a result: mechscope, Python and the libraries its numbers depend on (from the
    installed packages' metadata: nothing is imported)."""
    import platform
    from importlib import metadata

    from mechscope.core.version import VERSION

    out = {"mechscope": VERSION, "python": platform.python_version()}
    for name in NUMERIC_LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:  # run from a source tree without that package's metadata
            continue
    return out


def write_json(path: str | os.PathLike, obj: Any, *, compact: bool = False) -> dict[str, str]:
    """Write ``obj`` as strict JSON, never ``NaN`` or ``Infinity``: each non-finite number becomes null, the
    object's ``non_finite`` entry names the field and what it held, and a warning is logged. Returns those
    fields (path -> what it held). ``compact``: no indentation (large files)."""
    value, replaced = finite_json(obj)
    if isinstance(value, dict) and "schema" in value and VERSIONS not in value:  # a record: what made it
        value = {"schema": value["schema"], VERSIONS: versions(), **value}
    if replaced:
        shown = ", ".join(f"{k} ({v})" for k, v in list(replaced.items())[:5])
        more = f" and {len(replaced) - 5} more" if len(replaced) > 5 else ""
        log.warning("%s: non-finite numbers written as null: %s%s", Path(path).name, shown, more)
        if isinstance(value, dict):
            value[NON_FINITE] = {k: f"{v}: not a finite number, written as null" for k, v in replaced.items()}
    if compact:
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    else:
        text = json.dumps(value, indent=2, allow_nan=False)
    Path(path).write_text(text + "\n", encoding="utf-8")
    return replaced


def _umask() -> int:
    """The process's umask, read without changing it where Linux says it (setting it to 0 for a moment to read it
    gave a file another thread made in that moment mode 0666)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _usual_mode(path: Path) -> None:
    """Give a temporary entry (mkstemp: 0600, mkdtemp: 0700) the mode a new file or folder would have."""
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~_umask())


def page_path(path) -> Path:
    """``path`` as a file a page can be written to (for ``save_html``): a folder there, a file where a folder above
    it should be, or no path at all, one line each (IsADirectoryError naming a temporary file, FileExistsError and
    TypeError before)."""
    if isinstance(path, bool) or not isinstance(path, (str, os.PathLike)):
        raise RunError(f"expected a file path for the page (e.g. 'report.html'), got {type(path).__name__}")
    path = Path(path).expanduser()  # as Result.load reads it ("~/x.html" made a folder named ~)
    if path.is_dir():
        raise RunError(f"{path} is a folder: give the page a file name (e.g. {path / 'report.html'})")
    above = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if above is not None:
        raise RunError(f"{above} is a file, not a folder: the page {path} cannot be written under it")
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to the file ``path`` all at once: into a temporary file beside it, then renamed over it (an
    error or Ctrl-C leaves the old file, never half a new one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TMP_MARK}{os.getpid()}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        _usual_mode(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_tensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None) -> Path:
    """Write ``tensors`` as a safetensors file through Python's own file I/O, so that a full disk or a read-only
    place is an ``OSError`` (one line from the CLI), not a safetensors error."""
    from safetensors.torch import save

    data = save({k: v.detach().contiguous() for k, v in tensors.items()}, metadata=metadata)
    with open(path, "wb") as f:
        f.write(data)
    return Path(path)


def check_target(path: str | os.PathLike, force: bool = False) -> Path:
    """The target as an absolute path; raise unless it can be written (absent, empty, or ``force``)."""
    if not isinstance(path, (str, os.PathLike)):  # out=None in Python was a TypeError from pathlib
        raise RunError(f"an output folder is needed (out=...), got {path!r}")
    out = Path(path).expanduser().absolute()
    if out.is_symlink() and not out.exists():  # refused now, not after the work when the outputs cannot move in
        raise RunError(f"{out}: a broken link (to {os.readlink(out)}); remove it or give another folder")
    if out.exists() and not out.is_dir():
        raise RunError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise RunError(f"{out}: already exists and is not empty; pass --force (force=True in Python) to overwrite it")
    _check_writable(out)
    return out


def _check_writable(out: Path) -> None:
    """Raise unless the outputs can be written beside ``out``: its nearest existing ancestor a writable folder."""
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        if parent.is_symlink():  # a dangling link
            raise RunError(f"cannot create {out}: {parent} is a broken link")
        parent = parent.parent
    if not parent.is_dir():
        raise RunError(f"cannot create {out}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise RunError(f"cannot write in {parent}: permission denied or a read-only file system")
    try:  # access() says yes to root everywhere, /proc included: make (and remove) a folder there to be sure
        os.rmdir(tempfile.mkdtemp(prefix=".mechscope-check-", dir=parent))
    except OSError as e:
        raise RunError(f"cannot write in {parent}: {e.strerror or e}") from None


def _make_parent(out: Path) -> None:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunError(f"cannot create {out.parent}: {e.strerror or e}") from None
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise RunError(f"{out.parent}: not writable")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _commit(tmp: Path, out: Path) -> None:
    """Move the finished entries of ``tmp`` into ``out`` (through it where it is a link to a folder)."""
    if not out.exists() or (not out.is_symlink() and out.is_dir() and not any(out.iterdir())):
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
        return
    backup = Path(tempfile.mkdtemp(prefix=f".{out.name}{TMP_MARK}{os.getpid()}-old-", dir=out.parent))
    moved_aside: list[str] = []
    moved_in: list[str] = []
    try:
        for entry in sorted(os.listdir(tmp)):
            if (out / entry).exists() or (out / entry).is_symlink():
                os.replace(out / entry, backup / entry)
                moved_aside.append(entry)
            os.replace(tmp / entry, out / entry)
            moved_in.append(entry)
    except BaseException:
        for entry in moved_in:  # put the old state back
            _remove(out / entry)
        for entry in moved_aside:
            os.replace(backup / entry, out / entry)
        raise
    finally:
        shutil.rmtree(backup, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Remove the temporary entries an earlier command left beside ``out`` when it was killed (its process is gone);
    those of a command still running are kept. Returns what was removed."""
    removed = []
    prefix = f".{out.name}{TMP_MARK}"
    try:
        entries = list(out.parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(prefix):
            continue
        pid = entry.name[len(prefix) :].split("-", 1)[0]
        if pid.isdecimal() and _alive(int(pid)):
            continue
        _remove(entry)
        removed.append(entry)
        log.info("removed %s, left by an interrupted command", entry)
    return removed


@contextmanager
def atomic_output(path: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory to write into; move its contents to ``path`` on success.

    Raises :class:`~mechscope.core.errors.RunError` at once (before any work) when ``path`` exists
    and is not empty without ``force``, is a file, or its location cannot be written.
    """
    out = check_target(path, force)
    _make_parent(out)
    try:
        remove_stale_temporaries(out)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}{TMP_MARK}{os.getpid()}-", dir=out.parent))
        _usual_mode(tmp)  # it becomes the output folder: not 0700
    except OSError as e:
        raise RunError(f"cannot write in {out.parent}: {e.strerror or e}") from None
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        _commit(tmp, out)
    except OSError as e:
        raise RunError(f"cannot move the finished outputs into {out}: {e.strerror or e}") from None


# ---- linking one command's outputs to another's: by the weights they were made from -------------------

WEIGHTS_KEY = "weights_sha256"  # the key under which outputs record the weights they were made from


def weights_hash(model) -> str:
    """SHA-256 of a model's weights: every state-dict entry's name and raw bytes, in name order.

    The same weights give the same hash whether they came from a run directory, a safetensors file or
    memory. Outputs made from a model record
    it (``weights_sha256`` in their JSON) so that a report linking them can tell whether they were made
    from the same weights (:func:`same_weights`).
    """
    import torch

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        t = t.detach().to("cpu").contiguous()
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # any dtype, 0-dim too
    return h.hexdigest()


def same_weights(recorded: dict, digest: str) -> tuple[bool, str]:
    """(whether an output's JSON ``recorded`` was made from the weights hashed ``digest``, why not)."""
    theirs = recorded.get(WEIGHTS_KEY) if isinstance(recorded, dict) else None
    if not isinstance(theirs, str):
        return False, "it records no weights hash (made by an older mechscope); run the command again"
    if theirs != digest:
        return False, f"it was made from other weights (sha256 {theirs[:12]}, this model {digest[:12]})"
    return True, ""


def read_linked(path: str | os.PathLike, result_type, digest: str | None = None):
    """Another command's output at ``path`` read back as ``result_type`` (its ``from_dict``), and linked only when
    it was made from the weights hashed ``digest`` (None: any weights). Returns ``(result, "")`` or
    ``(None, why not)``; a missing file gives ``(None, "")`` and an unreadable one a reason, never an error:
    a report that links outputs leaves out, with a note, what it cannot use."""
    path = Path(path)
    if not path.is_file():
        return None, ""
    try:
        result = result_type.load(path)
    except RunError as e:
        return None, f"unreadable ({e})"
    if digest is not None:
        ok, why = same_weights({WEIGHTS_KEY: getattr(result, WEIGHTS_KEY, None)}, digest)
        if not ok:
            return None, why
    return result, ""
