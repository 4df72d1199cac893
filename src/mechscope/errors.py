"""Errors a user can cause.

Library code raises :class:`MechscopeError` (or a subclass) for anything a user can fix: a
missing file, a corrupt checkpoint, a wrong shape, an unknown layer. The message says what was
expected. The CLI turns these into one line on stderr and a non-zero exit; anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations


class MechscopeError(Exception):
    """A problem with the user's input, described in one line."""


class DataError(MechscopeError):
    """A data file is missing, unreadable or not what it should be."""


class RunError(MechscopeError):
    """A run directory is missing, corrupt, or from another model."""


class HookError(MechscopeError):
    """An unknown hook point name or a bad hook."""
