"""Errors a user can cause.

Library code raises :class:`MechscopeError` (or a subclass) for anything a user can fix: a
missing file, a corrupt checkpoint, a wrong shape, an unknown layer. The message says what was
expected. The CLI turns these into one line on stderr and a non-zero exit; anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations

from contextlib import contextmanager


class MechscopeError(Exception):
    """A problem with the user's input, described in one line.

    The message is made one line here (runs of whitespace, newlines included, become one space), so that
    the Python API raises the same text the command line prints, whatever a user's file put in it.
    """

    def __init__(self, *args) -> None:
        if len(args) == 1 and isinstance(args[0], str):
            args = (" ".join(args[0].split()),)
        super().__init__(*args)


class DataError(MechscopeError):
    """A data file is missing, unreadable or not what it should be."""


class RunError(MechscopeError):
    """A run directory is missing, corrupt, or from another model."""


class HookError(MechscopeError):
    """An unknown hook point name or a bad hook."""


def user_errors(fn):
    """Decorate a public Python call: a :class:`MechscopeError` raised anywhere inside it surfaces from the call
    itself, with its one-line message and no traceback through mechscope's internals (as the CLI's one line)."""
    import functools

    @functools.wraps(fn)
    def call(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MechscopeError as e:
            raise e.with_traceback(None) from None

    return call


@contextmanager
def about(where, error: type[MechscopeError] | None = None):
    """A one-line error raised inside is said of ``where`` (``where: …``, once): a file whose contents it is about.
    ``error``: the type it is raised as (by default its own)."""
    try:
        yield
    except MechscopeError as e:
        kind = error or type(e)
        said = str(e) if str(e).startswith(f"{where}:") else f"{where}: {e}"
        if said == str(e) and isinstance(e, kind):
            raise
        raise kind(said) from None
