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
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mechscope.errors import RunError

TMP_MARK = ".mechscope-tmp-"


def check_target(path: str | os.PathLike, force: bool = False) -> Path:
    """The target as an absolute path; raise unless it can be written (absent, empty, or ``force``)."""
    out = Path(path).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise RunError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise RunError(f"{out}: already exists and is not empty; pass --force to overwrite it")
    return out


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
    """Move the finished entries of ``tmp`` into ``out``."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
        return
    backup = Path(tempfile.mkdtemp(prefix=f".{out.name}{TMP_MARK}old-", dir=out.parent))
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


@contextmanager
def atomic_output(path: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory to write into; move its contents to ``path`` on success.

    Raises :class:`~mechscope.errors.RunError` at once (before any work) when ``path`` exists
    and is not empty without ``force``, is a file, or its location cannot be written.
    """
    out = check_target(path, force)
    _make_parent(out)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}{TMP_MARK}", dir=out.parent))
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
