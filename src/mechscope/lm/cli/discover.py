"""``mechscope lm discover``: automatic circuit discovery on the component graph."""

from __future__ import annotations

import typer

from mechscope.core.cli_options import ThreadsOpt
from mechscope.lm.cli.common import DeviceOpt, DtypeOpt, ForceOpt, ModelOpt, RevisionOpt, app


def parse_range(text: str | None) -> tuple[int, int] | None:
    from mechscope.core.errors import MechscopeError

    if text is None:
        return None
    try:
        lo, hi = (int(x) for x in text.split(","))
    except ValueError:
        raise MechscopeError(f"--tokens expects LOW,HIGH token ids, got {text!r}") from None
    return lo, hi


@app.command()
def discover(
    model: str = typer.Option(
        ..., "--model", help=ModelOpt.help.rstrip(".") + "; or a tracr-compiled model's folder (the tracr task, scored "
        "against its circuit.json).",
    ),
    method: str = typer.Option(
        "eap-ig", "--method", help="eap, eap-ig, acdc or edge-patching (exact, one pass per edge)."
    ),
    task: str | None = typer.Option(None, "--task", help="induction or tracr (default: tracr for a tracr folder)."),
    metric: str | None = typer.Option(
        None,
        "--metric",
        help="induction: loss, logprob, kl, logit_diff; tracr: logit_diff, logit, logprob, kl, "
        "accuracy (categorical), projection, mse (numerical). Default: the first.",
    ),
    size: str | None = typer.Option(
        None,
        "--size",
        help="Circuit edges: a count or a fraction (default: the known circuit's size, ACDC's own, or 30).",
    ),
    threshold: float | None = typer.Option(
        None,
        "--threshold",
        help="ACDC's tau (default: 1% of |metric clean - corrupted|); for eap/eap-ig a cut on "
        "|score| (the circuit: every edge at or above it).",
    ),
    steps: int | None = typer.Option(None, "--steps", help="EAP-IG's interpolation steps (default 5)."),
    ablation: str = typer.Option(
        "patch", "--ablation", help="What a removed edge carries: patch (the corrupted input's value), mean or zero."
    ),
    n: int = typer.Option(20, "--n", help="induction: random tokens per copy."),
    batch: int = typer.Option(8, "--batch", help="induction: sequences."),
    tokens: str | None = typer.Option(None, "--tokens", help="induction: token ids LOW,HIGH to draw from."),
    distinct: bool = typer.Option(False, "--distinct", help="induction: the n tokens of a copy all different."),
    limit: int | None = typer.Option(None, "--limit", help="tracr: the first N examples (default: all)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the data, the corruption and the random baseline."),
    no_curve: bool = typer.Option(False, "--no-curve", help="Skip the faithfulness curve."),
    random: int | None = typer.Option(
        None, "--random", help="Random circuits of the faithfulness baseline (default 5)."
    ),
    compare_heads: str | None = typer.Option(
        None, "--compare-heads", help="heads.json of `lm heads` on this model: compare with its path-patched edges."
    ),
    out: str | None = typer.Option(None, "--out", help="Output directory (default: runs/discover/MODEL)."),
    force: bool = ForceOpt,
    device: str | None = DeviceOpt,
    dtype: str | None = DtypeOpt,
    revision: str | None = RevisionOpt,
    threads: int | None = ThreadsOpt,
) -> None:
    """Discover a circuit (EAP, EAP-IG or ACDC): discovery.json and a self-contained report.html."""
    from mechscope.core.graphs import parse_size
    from mechscope.core.torch_utils import torch_threads
    from mechscope.lm.pipelines.discovery import discover_model

    with torch_threads(threads):
        path, r = discover_model(
            model, out, method=method, task=task, metric=metric, size=parse_size(size), threshold=threshold,
            steps=steps, ablation=ablation, n=n, batch=batch, seed=seed, limit=limit, token_range=parse_range(tokens),
            distinct=distinct, curve=not no_curve, n_random=random, compare_heads=compare_heads, force=force,
            device=device, dtype=dtype, revision=revision,
        )  # fmt: skip
    from mechscope.core.render.discovery import cli_lines

    for line in cli_lines(r):
        typer.echo(line)
    from mechscope.lm.report.discovery import truth_sentence

    for name in r.ground_truth:
        typer.echo(truth_sentence(r, name))
    if r.comparison:
        c = r.comparison
        typer.echo(f"path-patched edges: AUROC {c['auroc']:.3f} (among {'/'.join(c['slots'])} inputs "
                   f"{c['auroc_in_slot']:.3f}); {c['in_top']} of {len(c['edges'])} in the top {c['top']}")  # fmt: skip
    typer.echo(f"discovery.json and report.html written to {path}")
