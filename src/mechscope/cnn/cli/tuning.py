"""``mechscope cnn tuning``: tuning curves of every conv unit on synthetic stimuli (lines, edges, arcs, ...)."""

from __future__ import annotations

from pathlib import Path

import typer

from mechscope.cnn.cli.common import ClassNames, DataDir, Dataset, Force, RunDir, app
from mechscope.core.cli_options import ThreadsOpt


@app.command("tuning")
def tuning(
    run: Path = RunDir,
    out: Path | None = typer.Option(None, "--out", help="Output directory (default: RUN/tuning)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the stimuli's position jitter (0 to 2**63-1)."),
    dataset: str | None = Dataset,
    data_dir: Path | None = DataDir,
    class_names: Path | None = ClassNames,
    threads: int | None = ThreadsOpt,
    force: bool = Force,
) -> None:
    """Every conv unit's response to lines, edges, arcs, line endings, corners, blobs and loops over angle,
    curvature and size: tuning curves, preferred stimulus, circular variance and a label where tuning is sharp
    and strong (tuning.json, report.html, units/*.png). `cnn explain` shows them per channel."""
    from mechscope.cnn.pipelines.tuning import tuning_run
    from mechscope.core.torch_utils import torch_threads

    with torch_threads(threads):
        path, r = tuning_run(
            run, out, seed, dataset=dataset, data_dir=data_dir, class_names=class_names, force=force,
            progress=lambda s: typer.echo(f"  {s}...", err=True),
        )  # fmt: skip
    for line in r.summary:
        typer.echo(line)
    typer.echo(f"tuning.json and report.html written to {path} ({sum(r.seconds.values()):.1f} s)")
