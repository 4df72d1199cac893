"""``mechscope cnn solu-compare``: the CNN with ReLU, GELU and SoLU, compared by class selectivity."""

from __future__ import annotations

from pathlib import Path

import typer

from mechscope.cnn.cli.common import ClassNames, DataDir, Dataset, Force, app
from mechscope.cnn.config import TrainConfig
from mechscope.core.cli_options import ThreadsOpt

_D = TrainConfig()


@app.command("solu-compare")
def solu_compare(
    out: Path | None = typer.Option(None, "--out", help="Output directory (default: runs/solu-compare-cnn)."),
    activations: str = typer.Option("relu,gelu,solu", "--activations", help="Two or more of relu, gelu, solu."),
    dataset: str = typer.Option("mnist", "--dataset", help=Dataset.help),
    data_dir: Path | None = DataDir,
    class_names: Path | None = ClassNames,
    epochs: int = typer.Option(_D.epochs, "--epochs", help="Passes over the training images (each model)."),
    seed: int = typer.Option(_D.seed, "--seed", help="Seed for initial weights and batch order (all models)."),
    batch_size: int = typer.Option(_D.batch_size, "--batch-size"),
    train_limit: int | None = typer.Option(None, "--train-limit", help="Use only the first N training images."),
    max_steps: int | None = typer.Option(None, "--max-steps", help="Stop after N optimiser steps."),
    test_limit: int | None = typer.Option(
        None, "--test-limit", help="Measure selectivity on the first N test images."
    ),
    threads: int | None = ThreadsOpt,
    force: bool = Force,
) -> None:
    """Train the default CNN once per activation (same seed, data, steps) and compare test accuracy and the
    class selectivity of the conv channels: compare.json, report.html and one run directory per activation."""
    from mechscope.cnn.pipelines.solu_cnn import solu_compare_cnn
    from mechscope.core.torch_utils import torch_threads
    from mechscope.core.validate import name_list

    config = TrainConfig(epochs=epochs, seed=seed, batch_size=batch_size, train_limit=train_limit, max_steps=max_steps)
    acts = name_list(activations, "--activations")
    with torch_threads(threads):
        path, result = solu_compare_cnn(
            out, acts, config, dataset=dataset, data_dir=data_dir, class_names=class_names, test_limit=test_limit,
            force=force, progress=lambda s: typer.echo(f"  {s}...", err=True),
        )  # fmt: skip
    for line in result.summary:
        typer.echo(line)
    typer.echo(f"compare.json and report.html written to {path} ({result.seconds['total']:.0f} s)")
