"""Run directories: what a training run writes, and loading it back.

A run directory holds ``model.safetensors`` (the weights), ``config.json`` (architecture,
training settings, seed, the dataset with its checksums, shape and class names, library
versions) and ``metrics.json`` (test accuracy, per-class accuracy, confusion matrix, training
seconds, parameter count). Runs written before the CNN took other shapes and data (kind
``mnist-cnn``, ``conv1_channels``/``conv2_channels``, MNIST only) load as they are.
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

from mechscope.errors import MechscopeError, RunError
from mechscope.models.cnn import CNN, CNNConfig
from mechscope.outputs import write_json  # noqa: F401  (the one JSON writer; imported from here too)

KIND = "cnn"
KINDS = (KIND, "mnist-cnn")  # mnist-cnn: runs written before the CNN half took other data
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


def save_run(out: Path, model: CNN, config: dict, metrics: dict) -> None:
    """Write a run directory into ``out`` (an existing directory, e.g. from :func:`outputs.atomic_output`)."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS), metadata={"kind": KIND})
    write_json(out / CONFIG, {"kind": KIND, "model": model.config.to_dict(), **config, "versions": versions()})
    write_json(out / METRICS, metrics)


@dataclass
class Run:
    path: Path
    model: CNN
    config: dict
    metrics: dict

    @property
    def data(self) -> dict:
        """The dataset the run was trained on, as config.json records it (runs from before: MNIST)."""
        recorded = dict(self.config.get("data") or {})
        recorded.setdefault("name", "mnist")
        recorded.setdefault("kind", "builtin")
        return recorded

    @property
    def class_names(self) -> tuple[str, ...]:
        names = self.data.get("class_names")
        return tuple(names) if names else tuple(str(i) for i in range(self.model.config.n_classes))


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
    if config.get("kind") not in KINDS:
        raise RunError(f"{run}: a run of kind {config.get('kind')!r}; expected {KIND!r}")
    try:
        model = CNN(CNNConfig.from_dict(config.get("model", {})))
    except (TypeError, ValueError, MechscopeError) as e:
        raise RunError(f"{run / CONFIG}: invalid model config ({e})") from None
    weights = run / WEIGHTS
    if not weights.is_file():
        raise RunError(f"{run}: {WEIGHTS} is missing")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise RunError(f"{weights}: corrupt or not a safetensors file ({e})") from None
    _check_state(weights, model.state_dict(), state)
    model.load_state_dict(state)
    model.eval()
    metrics = _read_json(run / METRICS) if (run / METRICS).exists() else {}
    return Run(run, model, config, metrics)


def _check_state(weights: Path, expected: dict, state: dict) -> None:
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


def load_run_data(run: Run, dataset: str | None = None, data_dir=None, class_names=None):
    """The run's dataset (or ``dataset`` when given), loaded as :func:`~mechscope.data.images.load_dataset` does.

    A built-in dataset is looked for under ``data_dir`` as always; a folder of IDX files or a .npz
    is taken from where the run recorded it unless ``data_dir`` / ``dataset`` says otherwise.
    """
    from mechscope.data.images import check_recorded, load_dataset

    recorded = run.data
    if dataset is None:
        kind = recorded.get("kind")
        if kind == "idx":
            dataset, data_dir = "idx", data_dir or recorded.get("directory")
        elif kind == "npz":
            dataset = recorded.get("file")
        else:
            dataset = recorded.get("name", "mnist")
    names = class_names if class_names is not None else recorded.get("class_names")
    data = load_dataset(dataset, data_dir, names)
    check_recorded(data, recorded)
    if data.shape != run.model.input_shape:
        raise RunError(
            f"{run.path}: the model takes images shaped {list(run.model.input_shape)}; "
            f"{data.name} has {list(data.shape)}"
        )
    if data.n_classes != run.model.config.n_classes:
        k = run.model.config.n_classes
        raise RunError(f"{run.path}: the model has {k} classes; {data.name} has {data.n_classes}")
    return data
