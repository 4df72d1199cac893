"""``mechscope lm circuits``: the Mathematical Framework toolkit on one model."""

from __future__ import annotations

from typing import Optional

import typer

from mechscope.cli.lm import DeviceMapOpt, DeviceOpt, DtypeOpt, RevisionOpt, app, parse_head


@app.command()
def circuits(
    model: str = typer.Option(
        ...,
        "--model",
        help="As for lm heads, or a partial checkpoint (weights-only readings), or a train-toy run directory.",
    ),
    out: Optional[str] = typer.Option(None, "--out", help="Output directory (default: runs/circuits/MODEL)."),
    head: Optional[list[str]] = typer.Option(None, "--head", help="A head (LAYER.HEAD) to read out as tokens."),
    prompt: Optional[str] = typer.Option(
        None, "--prompt", help="Text for direct logit attribution and the logit lens."
    ),
    force: bool = typer.Option(False, "--force", help="Replace the files this command writes in --out."),
    device: Optional[str] = DeviceOpt,
    dtype: Optional[str] = DtypeOpt,
    device_map: Optional[str] = DeviceMapOpt,
    revision: Optional[str] = RevisionOpt,
) -> None:
    """Composition, OV/QK circuits, positional attention, direct logit attribution, the logit lens and the
    induction circuit by path patching: circuits.json and a self-contained report.html."""
    from mechscope.cli.lm import check_device_map_option
    from mechscope.pipelines.lm import circuits as run

    check_device_map_option(device_map)
    heads = [parse_head(h) for h in head or []]
    path, data = run(
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
    k = data["composition"]["top_pairs"]["K"][:3]
    base = data["composition"]["baseline"]["mean"]
    typer.echo(
        "strongest K-composition: " + ", ".join(f"{p['source']}→{p['target']} ({p['score']:.3f})" for p in k)
        + f"; random baseline {base:.3f}"
    )
    ind = data["induction_circuit"]
    if ind is not None:
        typer.echo(
            "induction circuit (path patching): "
            + (", ".join(f"{e['source']}→{'/'.join(e['targets'])}" for e in ind["edges"]) or "no edge confirmed")
        )
    for key, why in data["unavailable"].items():
        typer.echo(f"not available: {key.replace('_', ' ')} ({why})")
    typer.echo(f"circuits.json and report.html written to {path}")
