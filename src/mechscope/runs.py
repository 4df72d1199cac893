"""Run directories: what a training run writes, and loading it back.

A run directory holds ``model.safetensors`` (the weights), ``config.json`` (architecture,
training settings, seed, data MD5s, library versions) and ``metrics.json`` (test accuracy,
per-class accuracy, confusion matrix, training seconds, parameter count).
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from mechscope.errors import RunError
from mechscope.models.cnn import CNNConfig, MnistCNN

KIND = "mnist-cnn"
WEIGHTS, CONFIG, METRICS = "model.safetensors", "config.json", "metrics.json"


def versions() -> dict[str, str]:
    import numpy
    import safetensors

    from mechscope import __version__

    return {
        "mechscope": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "safetensors": safetensors.__version__,
    }


def check_out_dir(path: str | Path, force: bool = False) -> Path:
    """Raise unless ``path`` can be written: absent, empty, or ``force`` given."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise RunError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise RunError(f"{out}: already exists and is not empty; pass --force to overwrite it")
    return out


def prepare_out_dir(path: str | Path, force: bool = False) -> Path:
    """Create an output directory; refuse one that exists and is not empty unless ``force``.

    With ``force`` the files a command writes replace their old versions; nothing else in the
    directory is deleted (``--out ~ --force`` must never empty a home directory).
    """
    out = check_out_dir(path, force)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunError(f"cannot create {out}: {e.strerror or e}") from None
    return out


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def save_run(out: Path, model: MnistCNN, config: dict, metrics: dict) -> None:
    """Write a run directory (``out`` must exist; see :func:`prepare_out_dir`)."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS), metadata={"kind": KIND})
    write_json(out / CONFIG, {"kind": KIND, "model": model.config.to_dict(), **config, "versions": versions()})
    write_json(out / METRICS, metrics)


@dataclass
class Run:
    path: Path
    model: MnistCNN
    config: dict
    metrics: dict


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise RunError(f"{path.parent}: not a mechscope run directory ({path.name} is missing)")
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunError(f"{path}: corrupt JSON ({e})") from None
    if not isinstance(obj, dict):
        raise RunError(f"{path}: expected a JSON object")
    return obj


def load_run(path: str | Path) -> Run:
    """Load a trained CNN run: the model (in eval mode), its config and its metrics."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    run = Path(path)
    if not run.is_dir():
        raise RunError(f"{run}: run directory not found")
    config = _read_json(run / CONFIG)
    if config.get("kind") != KIND:
        raise RunError(f"{run}: a run of kind {config.get('kind')!r}; expected {KIND!r}")
    known = {f.name for f in fields(CNNConfig)}
    model_cfg = config.get("model", {})
    unknown = sorted(set(model_cfg) - known)
    if unknown:
        raise RunError(f"{run / CONFIG}: unknown model fields {', '.join(unknown)}")
    try:
        model = MnistCNN(CNNConfig(**model_cfg))
    except (TypeError, ValueError) as e:
        raise RunError(f"{run / CONFIG}: invalid model config ({e})") from None
    weights = run / WEIGHTS
    if not weights.is_file():
        raise RunError(f"{run}: {WEIGHTS} is missing")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise RunError(f"{weights}: corrupt or not a safetensors file ({e})") from None
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or extra or wrong:
        detail = "; ".join(
            part
            for part in (
                f"missing {', '.join(missing)}" if missing else "",
                f"unexpected {', '.join(extra)}" if extra else "",
                ", ".join(f"{k} is {list(state[k].shape)}, expected {list(expected[k].shape)}" for k in wrong),
            )
            if part
        )
        raise RunError(f"{weights}: weights of another architecture ({detail})")
    model.load_state_dict(state)
    model.eval()
    metrics = _read_json(run / METRICS) if (run / METRICS).exists() else {}
    return Run(run, model, config, metrics)
