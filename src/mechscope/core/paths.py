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
    """A command's default output directory for a model: runs/COMMAND/MODEL (the spec made a safe name)."""
    return Path("runs") / command / re.sub(r"[^A-Za-z0-9_.-]+", "_", str(model_spec).rstrip("/"))
