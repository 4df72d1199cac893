"""Training a CNN on an image dataset and writing its run directory."""

from __future__ import annotations

from pathlib import Path

from mechscope.config import TrainConfig
from mechscope.data.images import load_dataset
from mechscope.models.cnn import CNNConfig, n_parameters
from mechscope.outputs import atomic_output
from mechscope.runs import save_run
from mechscope.training import model_config_for, train_cnn


def train(
    out: str | Path,
    config: TrainConfig | None = None,
    model_config: CNNConfig | None = None,
    dataset: str = "mnist",
    data_dir: str | Path | None = None,
    class_names=None,
    force: bool = False,
    progress: bool = True,
) -> tuple[Path, dict]:
    """Train the CNN (``model_config``: its shape; default the MNIST network) and write a run directory.

    The output location is checked before any work and written atomically: an error or Ctrl-C
    leaves it as it was. Returns the run directory and its metrics.
    """
    config = config or TrainConfig()
    config.validate()
    if model_config is not None:
        model_config.validate_shape()  # before the data are read
    with atomic_output(out, force) as tmp:
        data = load_dataset(dataset, data_dir, class_names)
        fitted = model_config_for(data, model_config)
        fitted.validate()  # an image too small for the network fails before training
        result = train_cnn(data, config, fitted, progress=progress)
        metrics = {
            **result.evaluation.to_dict(),
            "train_seconds": result.train_seconds,
            "n_parameters": n_parameters(result.model),
            "steps": result.steps,
            "history": result.history,
            "class_names": list(data.class_names),
        }
        run_config = {"training": config.to_dict(), "seed": config.seed, "data": data.describe()}
        save_run(tmp, result.model, run_config, metrics)
    return Path(out), metrics


def train_mnist(out, config=None, data_dir=None, force=False, progress=True) -> tuple[Path, dict]:
    """The default network on MNIST (the name from before other data and shapes)."""
    return train(out, config, data_dir=data_dir, force=force, progress=progress)
