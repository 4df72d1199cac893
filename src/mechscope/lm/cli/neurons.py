"""``mechscope lm neurons`` and ``mechscope lm solu-compare``: MLP neurons and SoLU against GELU."""

from __future__ import annotations

import typer

from mechscope.core.cli_options import ThreadsOneOpt, ThreadsOpt
from mechscope.lm.cli.common import DeviceMapOpt, DeviceOpt, DtypeOpt, ForceOpt, RevisionOpt, app, parse_pair


def parse_neuron(text: str) -> tuple[int, int]:
    return parse_pair(text, "neuron", "0.17")


@app.command()
def neurons(
    model: str = typer.Option(
        ...,
        "--model",
        help="A train-toy run with MLPs (runs/toy-...), one of its checkpoints, or a model as for lm heads.",
    ),
    out: str | None = typer.Option(None, "--out", help="Output directory (default: runs/neurons/MODEL)."),
    text: str | None = typer.Option(None, "--text", help="Text to sample contexts from (default: tinyshakespeare)."),
    layer: list[int] | None = typer.Option(None, "--layer", help="Read only this MLP layer (repeatable)."),
    neuron: list[str] | None = typer.Option(None, "--neuron", help="A neuron (LAYER.NEURON) shown first."),
    site: str = typer.Option(
        "auto", "--site", help="auto (hook_post; SoLU: hook_mid, before its LayerNorm), post or mid."
    ),
    k: int = typer.Option(100, "--k", help="Top activations per neuron the figures count."),
    sequences: int = typer.Option(512, "--sequences", help="Windows of text in the sample."),
    length: int | None = typer.Option(
        None, "--length", help="Tokens per window (default 64, or the model's context if shorter; at most its context)."
    ),
    contexts: int = typer.Option(5, "--contexts", help="Top contexts shown per neuron."),
    seed: int = typer.Option(0, "--seed"),
    threads: int | None = ThreadsOpt,
    force: bool = ForceOpt,
    device: str | None = DeviceOpt,
    dtype: str | None = DtypeOpt,
    device_map: str | None = DeviceMapOpt,
    revision: str | None = RevisionOpt,
) -> None:
    """Every MLP neuron's top-activating contexts and how concentrated they are on one token:
    neurons.json and a self-contained report.html."""
    from mechscope.core.torch_utils import torch_threads
    from mechscope.lm.cli.common import check_device_map_option
    from mechscope.lm.pipelines.neurons import NeuronSettings
    from mechscope.lm.pipelines.neurons import neurons as run

    check_device_map_option(device_map)
    settings = NeuronSettings(
        layers=tuple(layer) if layer else None,
        neurons=tuple(parse_neuron(n) for n in neuron or []),
        site=site,
        k=k,
        sequences=sequences,
        length=length,
        contexts=contexts,
        seed=seed,
    )
    with torch_threads(threads):
        path, result = run(
            model,
            out,
            text,
            settings,
            force,
            progress=lambda step: typer.echo(f"  {step}...", err=True),
            device=device,
            dtype=dtype,
            device_map=device_map,
            revision=revision,
        )
    for line in _summary(result):
        typer.echo(line)
    typer.echo(f"neurons.json and report.html written to {path}")


def _summary(result) -> list[str]:
    from mechscope.lm.report.neurons import summary_lines

    return summary_lines(result)


@app.command("solu-compare")
def solu_compare(
    out: str | None = typer.Option(None, "--out", help="Output directory (default: runs/solu-compare)."),
    text: str | None = typer.Option(None, "--text", help="Training text (default: tinyshakespeare)."),
    layers: int = typer.Option(2, "--layers", help="Transformer blocks (attention + MLP): 1 or 2."),
    d_model: int = typer.Option(128, "--d-model"),
    d_mlp: int = typer.Option(512, "--d-mlp", help="MLP neurons per layer."),
    n_ctx: int = typer.Option(64, "--n-ctx", help="Context in characters."),
    steps: int = typer.Option(3000, "--steps", help="Training steps of each model."),
    batch: int = typer.Option(32, "--batch"),
    seed: int = typer.Option(0, "--seed"),
    k: int = typer.Option(100, "--k", help="Top activations per neuron the figures count."),
    threads: int = ThreadsOneOpt,
    force: bool = ForceOpt,
) -> None:
    """Train the same toy transformer with GELU and with SoLU MLPs (same seed, data, steps) and compare
    held-out loss and how monosemantic their neurons are: compare.json and report.html."""
    from mechscope.lm.pipelines.neurons import CompareSettings, solu_compare_run

    settings = CompareSettings(
        layers=layers,
        d_model=d_model,
        d_mlp=d_mlp,
        n_ctx=n_ctx,
        steps=steps,
        batch=batch,
        seed=seed,
        k=k,
        threads=threads,
    )
    path, r = solu_compare_run(settings, out, text, force, progress=lambda s: typer.echo(f"  {s}...", err=True))
    for line in r.summary:
        typer.echo(line)
    typer.echo(f"compare.json and report.html written to {path} ({r.seconds['total']:.0f} s)")
