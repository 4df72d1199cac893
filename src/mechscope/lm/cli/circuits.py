"""``mechscope lm circuits``: the Mathematical Framework toolkit on one model."""

from __future__ import annotations

import typer

from mechscope.core.cli_options import ThreadsOpt
from mechscope.lm.cli.common import DeviceMapOpt, DeviceOpt, DtypeOpt, ForceOpt, RevisionOpt, app, parse_heads


@app.command()
def circuits(
    model: str = typer.Option(
        ...,
        "--model",
        help="As for lm heads, or a partial checkpoint (weights-only readings), or a train-toy run directory.",
    ),
    out: str | None = typer.Option(None, "--out", help="Output directory (default: runs/circuits/MODEL)."),
    head: list[str] | None = typer.Option(None, "--head", help="A head (LAYER.HEAD) to read out as tokens."),
    prompt: str | None = typer.Option(
        None, "--prompt", help="Text for direct logit attribution and the logit lens."
    ),
    threads: int | None = ThreadsOpt,
    force: bool = ForceOpt,
    device: str | None = DeviceOpt,
    dtype: str | None = DtypeOpt,
    device_map: str | None = DeviceMapOpt,
    revision: str | None = RevisionOpt,
) -> None:
    """Composition, OV/QK circuits, positional attention, direct logit attribution, the logit lens and the
    induction circuit by path patching: circuits.json and a self-contained report.html."""
    from mechscope.core.torch_utils import torch_threads
    from mechscope.lm.cli.common import check_device_map_option
    from mechscope.lm.pipelines.circuits import circuits as run

    check_device_map_option(device_map)
    heads = parse_heads(head, "--head")
    with torch_threads(threads):
        path, r = run(
            model,
            out,
            heads or None,
            prompt,
            force,
            progress=lambda step: typer.echo(f"  {step}...", err=True),
            device=device,
            dtype=dtype,
            device_map=device_map,
            revision=revision,
        )
    k = r.composition.top_pairs("K", 3)
    base = r.composition.baseline.mean
    typer.echo(
        "strongest K-composition: " + ", ".join(f"{p['source']}→{p['target']} ({p['score']:.3f})" for p in k)
        + f"; random baseline {base:.3f}"
        if k else "K-composition: no pair of heads to score (one layer: no head reads another's output)"
    )
    if r.induction is not None:
        edges = r.induction.edges()
        typer.echo(
            "induction circuit (path patching): "
            + (", ".join(f"{e['source']}→{'/'.join(e['targets'])}" for e in edges) or "no edge confirmed")
        )
    for key, why in r.unavailable.items():
        typer.echo(f"not available: {key.replace('_', ' ')} ({why})")
    typer.echo(f"circuits.json and report.html written to {path}")
