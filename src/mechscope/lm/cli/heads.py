"""``mechscope lm heads``: find a model's induction heads."""

from __future__ import annotations

import typer

from mechscope.core.cli_options import ThreadsOpt
from mechscope.lm.cli.common import (
    DeviceMapOpt,
    DeviceOpt,
    DtypeOpt,
    ForceOpt,
    ModelOpt,
    RevisionOpt,
    app,
    check_device_map_option,
    parse_heads,
)


@app.command()
def heads(
    model: str = ModelOpt,
    out: str | None = typer.Option(None, "--out", help="Output directory (default: runs/heads/MODEL)."),
    n: int = typer.Option(50, "--n", help="Random tokens per half of the repeated sequence."),
    batch: int = typer.Option(8, "--batch", help="Repeated sequences."),
    seed: int = typer.Option(0, "--seed"),
    top_k: int | None = typer.Option(
        None, "--top-k", help="Induction heads ablated together against as many random other heads (default 5, at most "
        "half the heads)."
    ),
    show: list[str] | None = typer.Option(None, "--show", help="A head (LAYER.HEAD) for the pattern viewer."),
    text: str | None = typer.Option(None, "--text", help="Real text for the previous-token score."),
    no_ablation: bool = typer.Option(False, "--no-ablation", help="Skip the per-head ablations (the slow part)."),
    threads: int | None = ThreadsOpt,
    force: bool = ForceOpt,
    device: str | None = DeviceOpt,
    dtype: str | None = DtypeOpt,
    device_map: str | None = DeviceMapOpt,
    revision: str | None = RevisionOpt,
) -> None:
    """Find the induction heads: write heads.json and a self-contained report.html."""
    from mechscope.core.torch_utils import torch_threads
    from mechscope.lm.methods.heads import HeadProtocol
    from mechscope.lm.pipelines.heads import induction_heads

    check_device_map_option(device_map)
    protocol = HeadProtocol(n=n, batch=batch, seed=seed, top_k=top_k, per_head_ablation=not no_ablation)
    shown = parse_heads(show, "--show")
    with torch_threads(threads):
        path, r = induction_heads(
            model,
            out,
            protocol,
            text_file=text,
            show=shown,
            force=force,
            progress=lambda step: typer.echo(f"  {step}...", err=True),
            device=device,
            dtype=dtype,
            device_map=device_map,
            revision=revision,
        )
    typer.echo(
        f"loss on repeated random tokens: first copy {r.loss_first_half:.3f}, second copy {r.loss_second_half:.3f}"
    )
    ind = r.ranked("induction", "induction")
    typer.echo(
        f"induction heads ({len(ind)}): " + ", ".join(f"{h['layer']}.{h['head']} ({h['score']:.2f})" for h in ind[:10])
    )
    prev = r.ranked("previous_token", "previous_token")
    typer.echo(
        f"previous-token heads ({len(prev)}): "
        + ", ".join(f"{h['layer']}.{h['head']} ({h['score']:.2f})" for h in prev[:10])
    )
    from mechscope.lm.report.heads import top_k_text

    k = r.top_k_ablation
    typer.echo(f"mean-ablating the {k['k']} heads with the highest induction scores together {top_k_text(k)}")
    typer.echo(f"heads.json and report.html written to {path} ({sum(r.seconds.values()):.0f} s)")
