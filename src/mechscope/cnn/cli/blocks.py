"""``mechscope cnn blocks``: Building Blocks (Olah et al. 2018) of a run for one test image or typical ones."""

from __future__ import annotations

from pathlib import Path

import typer

from mechscope.cnn.cli.common import ClassNames, DataDir, Dataset, Force, RunDir, app
from mechscope.core.cli_options import ThreadsOneOpt


@app.command("blocks")
def blocks(
    run: Path = RunDir,
    image: int | None = typer.Option(None, "--image", help="Test image index (default: 0)."),
    typical: int | None = typer.Option(
        None,
        "--typical",
        help="Instead of one image: the K most typical test images of each class (correctly "
        "classified, highest probability of their class).",
    ),  # fmt: skip
    groups: int | None = typer.Option(
        None, "--groups", help="Neuron groups per stage (default: the smallest k explaining 90% of the variance)."
    ),
    steps: int = typer.Option(256, "--steps", help="Feature visualisation steps."),
    grid: int = typer.Option(12, "--grid", help="Activation grid: at most this many cells a side (cells averaged)."),
    seed: int = typer.Option(0, "--seed", help="Seed of NMF and the feature visualisations."),
    threads: int = ThreadsOneOpt,
    out: Path | None = typer.Option(None, "--out", help="Output directory (default: RUN/blocks)."),
    dataset: str | None = Dataset,
    data_dir: Path | None = DataDir,
    class_names: Path | None = ClassNames,
    force: bool = Force,
) -> None:
    """Activation grid, semantic dictionary, NMF neuron groups and group attribution: blocks.json, report.html."""
    from mechscope.cnn.pipelines.blocks import blocks_run
    from mechscope.cnn.report.blocks import summary_lines

    path, result = blocks_run(
        run, out, dataset=dataset, data_dir=data_dir, class_names=class_names, image=image, typical=typical,
        groups=groups, steps=steps, max_side=grid, seed=seed, threads=threads, force=force,
    )  # fmt: skip
    for line in summary_lines(result):
        typer.echo(line)
    typer.echo(f"blocks.json and report.html written to {path} ({result.seconds['total']:.1f} s)")
