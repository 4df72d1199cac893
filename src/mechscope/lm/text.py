"""Text for the language half: the default corpus (tinyshakespeare under the data root) and reading a text file."""

from __future__ import annotations

from pathlib import Path

from mechscope.core.errors import MechscopeError
from mechscope.core.paths import resolve_data_dir


def default_text_path() -> Path:
    """``tinyshakespeare/input.txt`` under the data root (``$MECHSCOPE_DATA``; ../shared/data with `make`)."""
    return resolve_data_dir() / "tinyshakespeare" / "input.txt"


def read_text(text_file: str | Path | None) -> tuple[str, str]:
    """The text (tinyshakespeare by default) and where it came from; one-line errors."""
    from mechscope.core.validate import read_text_file

    path = Path(text_file) if text_file else default_text_path()
    if not path.exists():
        raise MechscopeError(f"{path}: text file not found")  # a folder or unreadable file: read_text_file says so
    return read_text_file(path), str(path)


def context_length(asked: int | None, n_ctx: int, default: int, flag: str) -> int:
    """Tokens per context: ``asked`` (refused, in one line, above the model's context ``n_ctx``), or by default
    ``default`` or the model's context where that is shorter (a toy's 64)."""
    if asked is None:
        return min(default, n_ctx)
    if asked > n_ctx:
        raise MechscopeError(f"{flag} {asked} is longer than the model's context of {n_ctx} tokens")
    return asked
