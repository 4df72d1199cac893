"""``mechscope cnn graph``: attribution graphs through transcoder features."""

from __future__ import annotations

from pathlib import Path

import typer

from mechscope.cnn.cli.common import DataDir, Dataset, Force, app
from mechscope.core.cli_options import ThreadsOpt, graph_check_lines, strongest_inputs, view_only


@app.command("graph")
def graph_cmd(
    run: Path | None = typer.Option(None, "--run", help="Run directory written by `mechscope cnn train`."),
    image: int = typer.Option(0, "--image", help="Index of the image in the split."),
    split: str = typer.Option("test", "--split", help="test or train images."),
    dictionaries: str | None = typer.Option(
        None,
        "--dictionaries",
        help="A folder of per-stage dictionaries (SAELens layout; default: train small ones here).",
    ),
    channels: bool = typer.Option(
        False, "--channels", help="The CNN's own channels as exact transcoders (every error node zero)."
    ),
    kind: str = typer.Option(
        "sae",
        "--kind",
        help="Dictionaries trained here: sae (on each stage's output) or transcoder (across each ReLU).",
    ),
    target: str | None = typer.Option(
        None, "--target", help="The class (index or name) whose logit to trace (default: the predicted one)."
    ),
    max_features: int | None = typer.Option(None, "--max-features", help="Features that get a row (default: all)."),
    node_threshold: float = typer.Option(0.8, "--node-threshold"),
    edge_threshold: float = typer.Option(0.98, "--edge-threshold"),
    check: int = typer.Option(16, "--check", help="Sources checked against interventions (0: none)."),
    ablate: list[str] | None = typer.Option(
        None, "--ablate", help="Feature nodes ablated together: ID,ID (repeatable)."
    ),
    steer: list[str] | None = typer.Option(None, "--steer", help="A feature set to a value: NODE=VALUE (repeatable)."),
    dashboards: int = typer.Option(24, "--dashboards", help="Top-patch cards for this many features (0: none)."),
    view: str | None = typer.Option(None, "--view", help="Re-render a graph JSON (annotated in the viewer)."),
    out: Path | None = typer.Option(None, "--out", help="Output directory (default: RUN/graph-IMAGE)."),
    dataset: str | None = Dataset,
    data_dir: Path | None = DataDir,
    threads: int | None = ThreadsOpt,
    force: bool = Force,
) -> None:
    """Trace one image's logit through dictionary features at receptive-field positions: graph.json, graph.html."""
    from mechscope.core.errors import MechscopeError
    from mechscope.core.validate import typed_options

    if view is not None:
        from mechscope.cnn.pipelines.attribution_graph import view_run

        return view_only(view_run, view, out, force)
    if run is None:
        raise MechscopeError("give --run (or --view GRAPH_JSON)")
    if channels and dictionaries:
        raise MechscopeError("give --dictionaries or --channels, not both")
    if (channels or dictionaries) and "--kind" in typed_options():  # --kind is what is trained when neither is given
        raise MechscopeError("--kind chooses the dictionaries trained here: give it without --channels/--dictionaries")
    if kind not in ("sae", "transcoder"):
        raise MechscopeError(f"--kind must be sae or transcoder, got {kind!r}")
    from mechscope.cnn.methods.attribution_graph import CnnDictionaryTraining, CnnGraphSettings
    from mechscope.cnn.pipelines.attribution_graph import graph_run

    settings = CnnGraphSettings(
        max_feature_nodes=max_features,
        node_threshold=node_threshold,
        edge_threshold=edge_threshold,
        check_sources=check,
    )
    settings.validate()
    from mechscope.core.attribution_graph import parse_steer
    from mechscope.core.torch_utils import torch_threads
    from mechscope.core.validate import name_list

    steers = [parse_steer(s, "1_12_5") for s in steer or []]
    with torch_threads(threads):
        path, g = graph_run(
            run, image, out, force, split=split, dictionaries="channels" if channels else dictionaries,
            training=CnnDictionaryTraining(kind=kind), target=target, settings=settings,
            ablate=[list(name_list(a, "--ablate")) for a in ablate or []], steer=steers,
            dashboards=dashboards, dataset=dataset, data_dir=data_dir,
            progress=lambda m: typer.echo(f"  {m}", err=True),
        )  # fmt: skip
    c = g.counts
    typer.echo(g.title)
    from mechscope.core.render.html import counted

    typer.echo(
        f"{counted(c['active_features'], 'active feature')}, "
        f"{counted(c['backward_passes'], 'backward pass', 'backward passes')}; pruned: "
        f"{counted(c['nodes_pruned'], 'node')}, {counted(c['edges_pruned'], 'edge')}"
    )
    for line in graph_check_lines(g):
        typer.echo(line)
    logit = next(n for n in g.nodes if n["kind"] == "logit")
    top = g.inputs_of(logit["id"], 5)
    shown = strongest_inputs(top, lambda n: n.get("label", n["id"]))
    typer.echo(f"strongest inputs of class {logit['label']}: {shown}")
    from mechscope.core.attribution_graph import GraphIntervention

    for chk in g.checks:
        typer.echo(GraphIntervention.from_dict(chk).summary())
    typer.echo(f"graph.json, graph.html and graph-circuit-tracer.json written to {path} ({_total(g.seconds):.1f} s)")


def _total(seconds: dict) -> float:
    """The whole run's seconds (the pipeline's sections), or the graph's alone when they are not there."""
    parts = [v for k, v in seconds.items() if k.startswith("pipeline: ")]
    return sum(parts) if parts else seconds.get("total", 0.0)
