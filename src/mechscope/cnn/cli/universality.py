"""``mechscope cnn universality``: do networks trained with other seeds or widths learn the same units?"""

from __future__ import annotations

from pathlib import Path

import typer

from mechscope.cnn.cli.common import DataDir, Force, app
from mechscope.core.cli_options import ThreadsOneOpt


@app.command("universality")
def universality(
    runs: list[Path] = typer.Option(
        ..., "--runs", help="Two or more run directories (same dataset): --runs R1 R2 R3 or --runs R1 --runs R2."
    ),
    extra: list[Path] | None = typer.Argument(None, hidden=True, metavar="MORE_RUNS"),
    out: Path | None = typer.Option(None, "--out", help="Output directory (default: runs/universality)."),
    test_limit: int | None = typer.Option(None, "--test-limit", help="Use only the first N test images."),
    data_dir: Path | None = DataDir,
    vis_steps: int = typer.Option(
        128, "--vis-steps", help="Optimisation steps of the feature visualisations made here (no RUN/featvis)."
    ),
    threads: int = ThreadsOneOpt,
    force: bool = Force,
) -> None:
    """Match units across networks (best-match correlation, Hungarian one-to-one matching, linear CKA), each
    against a random network of its shape, and compare class circuits: universality.json and report.html."""
    from mechscope.cnn.pipelines.universality import universality as run_universality

    path, result = run_universality(
        [*runs, *(extra or [])], out, test_limit=test_limit, data_dir=data_dir, force=force, threads=threads,
        vis_steps=vis_steps,
        progress=lambda s: typer.echo(f"  {s}...", err=True),
    )  # fmt: skip
    for line in result.summary:
        typer.echo(line)
    typer.echo(f"universality.json and report.html written to {path} ({result.seconds['total']:.0f} s)")
