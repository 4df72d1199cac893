"""Training a CNN on an image dataset and writing its run directory."""

from __future__ import annotations

from pathlib import Path

from mechscope.cnn.config import TrainConfig
from mechscope.cnn.data.images import load_dataset
from mechscope.cnn.models.cnn import CNNConfig
from mechscope.cnn.runs import save_run
from mechscope.cnn.training import RunMetrics, model_config_for, train_cnn
from mechscope.core.errors import MechscopeError
from mechscope.core.outputs import atomic_output


def train(
    out: str | Path,
    config: TrainConfig | None = None,
    model_config: CNNConfig | None = None,
    dataset: str = "mnist",
    data_dir: str | Path | None = None,
    class_names=None,
    force: bool = False,
    progress: bool = True,
) -> tuple[Path, RunMetrics]:
    """Train the CNN (``model_config``: its shape; default the MNIST network) and write a run directory.

    The output location is checked before any work and written atomically: an error or Ctrl-C
    leaves it as it was. Returns the run directory and its :class:`~mechscope.cnn.training.RunMetrics`.
    """
    config = config or TrainConfig()
    config.validate()
    if model_config is not None:
        model_config.validate_shape()  # before the data are read
        k, pad = model_config.kernel_size, model_config.padding
        if pad >= k:  # past k - 1 (a "full" convolution) the border sees only zeros; --padding 100 ran out of memory
            raise MechscopeError(f"--padding {pad} must be less than the kernel size {k} (at most {k - 1}: a "
                                 "wider border sees only zeros)")  # fmt: skip
    with atomic_output(out, force) as tmp:
        data = load_dataset(dataset, data_dir, class_names)
        fitted = model_config_for(data, model_config)
        fitted.validate()  # an image too small for the network fails before training
        result = train_cnn(data, config, fitted, progress=progress)
        metrics = RunMetrics.of(result, data.class_names)
        run_config = {"training": config.to_dict(), "seed": config.seed, "data": data.describe()}
        save_run(tmp, result.model, run_config, metrics)
    return Path(out), metrics

