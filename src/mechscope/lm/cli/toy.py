"""``mechscope lm train-toy``: train a small transformer and watch its induction heads form."""

from __future__ import annotations

import typer

from mechscope.core.cli_options import ThreadsOpt
from mechscope.lm.cli.common import ForceOpt, app


@app.command("train-toy")
def train_toy_cmd(
    layers: int = typer.Option(2, "--layers", help="Attention layers: 1 or 2."),
    data: str = typer.Option("synthetic", "--data", help="synthetic (repeated spans) or text (characters)."),
    text: str | None = typer.Option(None, "--text", help="Text file for --data text (default: tinyshakespeare)."),
    steps: int | None = typer.Option(None, "--steps", help="Training steps (default 2,500 synthetic, 8,000 text)."),
    seed: int = typer.Option(0, "--seed"),
    mlp: str = typer.Option(
        "none", "--mlp", help="none (attention-only), gelu or solu (SoLU + LayerNorm, Elhage et al. 2022) MLPs."
    ),
    d_mlp: int | None = typer.Option(
        None, "--d-mlp", help="MLP neurons per layer (default 4 × d_model; with --mlp)."
    ),
    control: bool = typer.Option(True, "--control/--no-control", help="Also train the 1-layer control."),
    out: str | None = typer.Option(None, "--out", help="Output directory (default: runs/toy-DATA-NL)."),
    threads: int | None = ThreadsOpt,
    force: bool = ForceOpt,
    device: str | None = typer.Option("cpu", "--device", help="cpu (toy models train in seconds there)."),
    dtype: str | None = typer.Option("float32", "--dtype", help="float32 (training in lower precision: not yet)."),
) -> None:
    """Train a small transformer (attention-only unless --mlp) and watch its induction heads form."""
    import torch

    from mechscope.core.errors import MechscopeError
    from mechscope.core.torch_utils import torch_threads
    from mechscope.lm.models.devices import resolve_device, resolve_dtype
    from mechscope.lm.pipelines.toy import train_toy_run
    from mechscope.lm.toy import ToyConfig

    where = resolve_device(device)  # a device that is not there, or a dtype it cannot do: one line
    if where.type != "cpu" or resolve_dtype(dtype, where) != torch.float32:
        raise MechscopeError(f"lm train-toy trains on the CPU in float32 only (got --device {where} --dtype {dtype})")

    config = ToyConfig(layers=layers, data=data, steps=steps, seed=seed, mlp=mlp, d_mlp=d_mlp)
    with torch_threads(threads):
        path, result = train_toy_run(config, out, text, control, force)
    r = result.series
    p, f = r["phase_change"], r["final"]
    if p.get("detected"):
        typer.echo(
            f"phase change between steps {p['window'][0]} and {p['window'][1]}: induction +{p['induction_jump']:.2f}, "
            f"in-context-learning score {p['icl_jump']:+.2f}"
        )
    else:
        typer.echo("no phase change detected")
    typer.echo(
        f"final: best induction score {f['max_induction_last_layer']:.2f}, best previous-token score "
        f"{f['max_previous_token_layer0']:.2f}, held-out loss {f['held_out_loss']:.3f}"
    )
    if "control" in r:
        typer.echo(f"1-layer control: best induction score {r['control']['final']['max_induction_last_layer']:.2f}")
    typer.echo(f"training.json, training.html and checkpoints written to {path}")
