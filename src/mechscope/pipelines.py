"""The only place that strings steps together: data -> model -> methods -> outputs."""

from __future__ import annotations

import logging
from pathlib import Path

from mechscope.config import TrainConfig
from mechscope.data.mnist import load_mnist
from mechscope.models.cnn import n_parameters
from mechscope.runs import check_out_dir, prepare_out_dir, save_run
from mechscope.training import train_cnn

log = logging.getLogger(__name__)


def train_mnist(
    out: str | Path,
    config: TrainConfig | None = None,
    data_dir: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
) -> tuple[Path, dict]:
    """Train the CNN on MNIST and write a run directory; returns its path and metrics."""
    config = config or TrainConfig()
    config.validate()
    out = Path(out)
    check_out_dir(out, force=force)  # fail before a minute of training, not after
    data = load_mnist(data_dir)
    result = train_cnn(data, config, progress=progress)
    metrics = {
        **result.evaluation.to_dict(),
        "train_seconds": result.train_seconds,
        "n_parameters": n_parameters(result.model),
        "steps": result.steps,
        "history": result.history,
    }
    run_config = {
        "training": config.to_dict(),
        "seed": config.seed,
        "data": {"directory": str(data.directory), "md5": data.md5},
    }
    save_run(prepare_out_dir(out, force=force), result.model, run_config, metrics)
    return out, metrics
