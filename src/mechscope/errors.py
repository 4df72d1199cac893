"""Old home of the errors: they live in :mod:`mechscope.core.errors`."""

from mechscope.core.errors import *  # noqa: F401,F403
from mechscope.core.errors import DataError, HookError, MechscopeError, RunError, user_errors  # noqa: F401
