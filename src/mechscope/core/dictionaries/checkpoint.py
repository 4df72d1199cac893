"""Training checkpoints: everything a run needs to continue bit for bit, in one directory per step.

``<checkpoint_dir>/step-000000100/`` holds ``state.safetensors`` (the model's parameters and buffers as
``model.<name>``, Adam's moments and step counts as ``adam.<name>.<key>``, the dead-latent counters, the
resampling generator's state, BatchTopK's running threshold) and ``checkpoint.json`` (the step, the rows
seen, the dictionary and training settings). The JSON is written last, so a directory without it is an
interrupted write and is ignored.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from mechscope.core.errors import MechscopeError
from mechscope.core.paths import by_step
from mechscope.core.validate import read_safetensors

SCHEMA = "mechscope.dictionary_checkpoint/1"
STATE_FILE = "state.safetensors"
META_FILE = "checkpoint.json"


def save_checkpoint(root: Path, step: int, meta: dict, tensors: dict[str, torch.Tensor], keep: int) -> Path:
    """Write one checkpoint under ``root`` (atomically: a temporary directory renamed) and keep the newest
    ``keep`` of them; returns its directory."""
    root = Path(root)
    final = root / f"step-{step:09d}"
    tmp = root / f".tmp-step-{step:09d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, str(tmp / STATE_FILE))
    (tmp / META_FILE).write_text(json.dumps({"schema": SCHEMA, "step": step, **meta}, indent=1), encoding="utf-8")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in _complete(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _complete(root: Path) -> list[Path]:
    """The complete checkpoints under ``root``, oldest first by step number (past 10^9 steps the nine digits of the
    name's padding run out, and a text sort would put step-1000000000 before step-999999999)."""
    return by_step((p for p in root.glob("step-*") if (p / META_FILE).is_file()), r"step-(\d+)")


def find_checkpoint(path) -> Path:
    """The checkpoint at ``path``: a step directory, or the newest complete one inside a checkpoint_dir."""
    path = Path(path)
    if (path / META_FILE).is_file():
        return path
    found = _complete(path) if path.is_dir() else []
    if not found:
        raise MechscopeError(f"{path}: no checkpoint (expected {META_FILE} in it or in a step-* folder inside)")
    return found[-1]


def load_checkpoint(path) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(meta, tensors)`` of the checkpoint at ``path`` (see :func:`find_checkpoint`)."""
    where = find_checkpoint(path)
    try:
        meta = json.loads((where / META_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MechscopeError(f"{where / META_FILE}: not a readable checkpoint record ({type(e).__name__})") from None
    if not isinstance(meta, dict) or meta.get("schema") != SCHEMA:
        raise MechscopeError(f"{where / META_FILE}: expected a {SCHEMA} record")
    return meta, read_safetensors(where / STATE_FILE)


def check_same_settings(where, saved: dict, current: dict, what: str) -> None:
    """Refuse (one line) to resume when a setting that shapes the result differs from the checkpoint's."""
    for key in sorted(set(saved) | set(current)):
        if saved.get(key) != current.get(key):
            raise MechscopeError(
                f"{where}: checkpoint was written with {what} {key}={saved.get(key)!r}, "
                f"this run has {key}={current.get(key)!r}; resume with the same settings"
            )
