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
    """A command's default output directory for a model: runs/COMMAND/MODEL, MODEL the folder's or file's own name
    for a local path however it is spelled (``../toy``, ``./toy``, ``toy/``: ``toy``; they were three folders, two
    of them hidden), else the name or hub id made a safe name."""
    spec = str(model_spec)
    local = Path(spec).expanduser()
    try:
        name = local.resolve().name if local.exists() else spec.rstrip("/")
    except OSError:  # a name the file system refuses (too long): the command's own check says so
        name = spec.rstrip("/")
    return Path("runs") / command / re.sub(r"[^A-Za-z0-9_.-]+", "_", name or spec)
