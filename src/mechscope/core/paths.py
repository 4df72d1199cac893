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


# what each wing takes a folder as, for the line a command of another wing prints when it cannot read it
_TAKEN_BY = {
    "cnn": "a CNN run: the cnn commands take it with --run",
    "toy": "a train-toy run: the lm commands take it with --model",
    "tracr": "a tracr-compiled transformer: lm discover, lm circuits, lm graph and scrub take it with --model",
    "clip": "an image–text model: the clip commands take it with --model",
    "lm": "a transformer checkpoint: the lm commands take it with --model",
    "cnn-sae": "a sparse dictionary of a CNN: cnn sae evaluate and cnn sae show take it with --sae",
    "lm-sae": "a sparse dictionary of a transformer: lm sae evaluate and lm sae show take it with --sae",
}
_WING = {"cnn": "cnn", "toy": "lm", "tracr": "lm", "clip": "clip", "lm": "lm", "cnn-sae": "cnn", "lm-sae": "lm"}
DICTIONARIES = ("cnn-sae", "lm-sae")  # the kinds that are dictionaries, not models


def by_step(paths, pattern: str) -> list[Path]:
    """The paths whose whole name matches ``pattern``, whose one group is a step number, in step order: by number,
    not by name (a text sort puts step 1000000 before step 999999 once the padding's digits run out)."""
    found = ((re.fullmatch(pattern, Path(p).name), Path(p)) for p in paths)
    return [p for _, p in sorted((int(m.group(1)), p) for m, p in found if m)]


def folder_kind(path) -> str | None:
    """What a folder holds, from its files alone: "cnn", "toy", "tracr", "clip", "lm" (a Hugging Face causal language
    model: its ``architectures`` end in ForCausalLM or LMHeadModel), "cnn-sae" or "lm-sae" (a dictionary that
    ``cnn sae train`` or ``lm sae train`` wrote: cfg.json beside a training.json of that layout) or None."""
    import json

    p = Path(path)
    try:
        if (p / "cfg.json").is_file() and (p / "training.json").is_file():
            schema = json.loads((p / "training.json").read_text(encoding="utf-8"))
            schema = schema.get("schema") if isinstance(schema, dict) else None
            for kind in DICTIONARIES:
                if isinstance(schema, str) and schema.startswith(f"mechscope.{kind}-training/"):
                    return kind
        if (p / "training.json").is_file() and (p / "checkpoints").is_dir():
            return "toy"
        if (p / "circuit.json").is_file() and (p / "examples.json").is_file():
            return "tracr"
        cfg = json.loads((p / "config.json").read_text(encoding="utf-8")) if (p / "config.json").is_file() else {}
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(cfg, dict):
        return None
    if cfg.get("kind") in ("cnn", "mnist-cnn"):
        return "cnn"
    if cfg.get("model_type") in ("clip", "siglip"):
        return "clip"
    arch = cfg.get("architectures") if isinstance(cfg.get("architectures"), list) else []
    causal = any(isinstance(a, str) and a.endswith(("ForCausalLM", "LMHeadModel")) for a in arch)
    return "lm" if isinstance(cfg.get("model_type"), str) and causal else None


def other_wing(path, here: str) -> str:
    """" (it is a CNN run: the cnn commands take it with --run)" when ``path`` holds what another wing than ``here``
    ("cnn", "lm", "clip") takes, else "": for the end of a line refusing it."""
    kind = folder_kind(path)
    return f" (it is {_TAKEN_BY[kind]})" if kind is not None and _WING[kind] != here else ""


def dictionary_note(path) -> str:
    """" (it is a sparse dictionary of a CNN: ...)" when ``path`` holds a dictionary, else "": for the end of a line
    refusing it where a model was asked for, of either wing."""
    kind = folder_kind(path)
    return f" (it is {_TAKEN_BY[kind]})" if kind in DICTIONARIES else ""
