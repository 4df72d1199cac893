"""Where things are by default: the data root and the default output folder of a command."""

from __future__ import annotations

import os
import re
from pathlib import Path


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The data root: ``data_dir`` > ``$MECHSCOPE_DATA`` > ``~/.cache/mechscope/data``."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    env = os.environ.get("MECHSCOPE_DATA")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "mechscope" / "data"


def model_out(command: str, model_spec) -> Path:
    """A command's default output directory for a model: runs/COMMAND/MODEL, MODEL the spec made a safe name; a
    local path without its leading ``./``, ``../`` and ``/`` (``../toy``, ``./toy``, ``toy/``: ``toy``; they were
    three folders, two of them hidden), its folders kept (``a/control`` and ``b/control`` stay apart)."""
    spec = str(model_spec)
    local = Path(spec).expanduser()
    try:
        exists = local.exists()
    except OSError:  # a name the file system refuses (too long): the command's own check says so
        exists = False
    name = spec.rstrip("/")
    if exists:  # as spelled, without its leading ./, ../ and /: models in two folders keep two names (no symlink
        parts = [p for p in Path(os.path.normpath(local)).parts if p not in ("/", ".", "..")]  # is followed)
        name = "/".join(parts) or Path(os.path.abspath(local)).name
    return Path("runs") / command / re.sub(r"[^A-Za-z0-9_.-]+", "_", name or spec)
