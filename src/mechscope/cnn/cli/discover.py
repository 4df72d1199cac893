"""``mechscope cnn discover``: automatic circuit discovery on the component graph."""

from __future__ import annotations

from pathlib import Path

import typer

from mechscope.cnn.cli.common import DataDir, Dataset, Force, RunDir, app
from mechscope.core.cli_options import ThreadsOpt


@app.command()
def discover(
    run: Path = RunDir,
    method: str = typer.Option(
        "eap-ig", "--method", help="eap, eap-ig, acdc or edge-patching (exact, one pass per edge)."
    ),
    metric: str | None = typer.Option(
        None,
        "--metric",
        help="logprob (default), logit, logit_diff, loss, kl (to the clean run), accuracy, detect (accuracy and "
        "detect: acdc only).",
    ),
    target: str | None = typer.Option(
        None, "--class", "--digit", help="A class (index or name): its images, corrupted by others'."
    ),
    n: int | None = typer.Option(None, "--n", help="Test images (default: 64, or every one there is when fewer)."),
    corrupt: str = typer.Option(
        "resample",
        "--corrupt",
        help="Corrupted images: resample (the same images, shuffled; with --class, images of other classes) or "
        "other-class (each image against one of the others of another class).",
    ),
    ablation: str = typer.Option(
        "patch", "--ablation", help="What a removed edge carries: patch (the corrupted image's value), mean or zero."
    ),
    size: str | None = typer.Option(
        None, "--size", help="Circuit edges: a count or a fraction (default: ACDC's own, or 30)."
    ),
    threshold: float | None = typer.Option(
        None,
        "--threshold",
        help="ACDC's tau (default: 1% of |metric clean - corrupted|); for eap/eap-ig a cut on |score|.",
    ),
    steps: int | None = typer.Option(None, "--steps", help="EAP-IG's interpolation steps (default 5)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the images, the corruption and the random baseline."),
    explain: str | None = typer.Option(
        None, "--explain", help="mechanisms.json of `cnn explain`: compare with its circuit for --class."
    ),
    no_curve: bool = typer.Option(False, "--no-curve", help="Skip the faithfulness curve."),
    random: int | None = typer.Option(
        None, "--random", help="Random circuits of the faithfulness baseline (default 5)."
    ),
    out: Path | None = typer.Option(None, "--out", help="Output directory (default: RUN/discover)."),
    dataset: str | None = Dataset,
    data_dir: Path | None = DataDir,
    force: bool = Force,
    threads: int | None = ThreadsOpt,
) -> None:
    """Discover a channel circuit (EAP, EAP-IG or ACDC): discovery.json and a self-contained report.html."""
    from mechscope.cnn.pipelines.discovery import discover_run
    from mechscope.core.graphs import parse_size
    from mechscope.core.torch_utils import torch_threads

    with torch_threads(threads):
        path, r = discover_run(
            run, out, method=method, metric=metric, target=target, n=n, seed=seed, corrupt=corrupt,
            size=parse_size(size), threshold=threshold, steps=steps, ablation=ablation, curve=not no_curve,
            n_random=random, explain=explain, dataset=dataset, data_dir=data_dir, force=force,
        )  # fmt: skip
    from mechscope.core.render.discovery import cli_lines

    for line in cli_lines(r):
        typer.echo(line)
    if r.hand:
        h = r.hand
        typer.echo(f"cnn explain's {h['stage']} circuit {h['hand']}: {len(h['overlap'])} in the discovered top "
                   f"{len(h['hand'])} {h['discovered_top']}; AUROC {h['auroc']:.3f}")  # fmt: skip
    typer.echo(f"discovery.json and report.html written to {path}")
