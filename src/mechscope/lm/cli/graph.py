"""``mechscope lm graph``: attribution graphs through transcoder features."""

from __future__ import annotations

import typer

from mechscope.core.cli_options import ThreadsOpt, graph_check_lines, strongest_inputs, view_only
from mechscope.lm.cli.common import DeviceOpt, DtypeOpt, ForceOpt, RevisionOpt, app


def _qk(text: str) -> tuple:
    """``L.H`` or ``L.H@Q`` or ``L.H@Q:K``."""
    from mechscope.core.errors import MechscopeError
    from mechscope.core.validate import indices

    head, has_at, at = text.partition("@")
    try:
        layer, h = indices(head)
        if not has_at:
            return (layer, h)
        q, has_k, k = at.partition(":")
        if not q or (has_k and not k):  # "1.2@" or "1.2@3:": a position left empty
            raise ValueError(text)
        return (layer, h, *indices(q, 1)) if not has_k else (layer, h, *indices(q, 1), *indices(k, 1))
    except ValueError:
        raise MechscopeError(
            f"--qk expects LAYER.HEAD, LAYER.HEAD@QUERY or LAYER.HEAD@QUERY:KEY, got {text!r}"
        ) from None


def _steer(text: str) -> tuple[str, float]:
    from mechscope.core.attribution_graph import parse_steer

    return parse_steer(text, "3_1204_7")


@app.command("graph")
def graph_cmd(
    model: str | None = typer.Option(
        None, "--model", help="smollm2, a model folder (tracr too), a .gguf file or a hub id."
    ),
    prompt: str | None = typer.Option(None, "--prompt", help="The prompt (BOS is put first)."),
    tokens: str | None = typer.Option(None, "--tokens", help="Token ids instead of a prompt: 1,2,3."),
    transcoders: str | None = typer.Option(
        None,
        "--transcoders",
        help="A folder of per-layer transcoders (SAELens layout) or of a cross-layer transcoder (circuit-tracer's "
        "W_enc_L/W_dec_L.safetensors layout, detected).",
    ),
    neurons: bool = typer.Option(False, "--neurons", help="The MLPs' own neurons as exact transcoders (ReLU MLPs)."),
    train_tokens: int | None = typer.Option(
        None,
        "--train-transcoders",
        help="Train small transcoders here on this many tokens of text (saved in OUT/transcoders).",
    ),
    crosslayer: bool = typer.Option(
        False,
        "--crosslayer",
        help="With --train-transcoders: train one cross-layer transcoder (features write to every later MLP) "
        "with the same number of features per layer.",
    ),
    text: str | None = typer.Option(
        None, "--text", help="Text for training and dashboards (default: tinyshakespeare)."
    ),
    target: list[str] | None = typer.Option(
        None, "--target", help="A logit to attribute: a one-token text or #ID (repeatable; default: the most probable)."
    ),
    logit_pos: int | None = typer.Option(
        None, "--logit-pos", help="Where the logits are read (default: the last position)."
    ),
    max_features: int | None = typer.Option(
        None, "--max-features", help="Features that get a row (default: every active one)."
    ),
    edges_per_row: int | None = typer.Option(
        None, "--edges-per-row", help="Feature edges kept per row (default: all)."
    ),
    node_threshold: float = typer.Option(0.8, "--node-threshold"),
    edge_threshold: float = typer.Option(0.98, "--edge-threshold"),
    batch: int = typer.Option(32, "--batch", help="Targets per backward pass."),
    check: int = typer.Option(16, "--check", help="Sources checked against interventions (0: none)."),
    qk: list[str] | None = typer.Option(
        None, "--qk", help="A head's QK attribution: L.H, L.H@QUERY or L.H@QUERY:KEY (repeatable)."
    ),
    ablate: list[str] | None = typer.Option(
        None, "--ablate", help="Feature nodes ablated together: ID,ID (repeatable)."
    ),
    steer: list[str] | None = typer.Option(None, "--steer", help="A feature set to a value: NODE=VALUE (repeatable)."),
    paths: int = typer.Option(10, "--paths", help="The top logit's inputs split by attention head (0: none)."),
    dashboards: int = typer.Option(24, "--dashboards", help="Top-example cards for this many features (0: none)."),
    examples: int = typer.Option(4096, "--examples", help="Tokens of text searched for the dashboards."),
    no_bos: bool = typer.Option(False, "--no-bos", help="Do not put BOS first."),
    view: str | None = typer.Option(
        None, "--view", help="Re-render a graph JSON (annotated in the viewer) without a model."
    ),
    out: str | None = typer.Option(None, "--out", help="Output directory (default: runs/graph/MODEL)."),
    threads: int | None = ThreadsOpt,
    force: bool = ForceOpt,
    device: str | None = DeviceOpt,
    dtype: str | None = DtypeOpt,
    revision: str | None = RevisionOpt,
) -> None:
    """Trace one prompt through transcoder features: graph.json, graph.html (the viewer), graph-circuit-tracer.json."""
    from mechscope.core.errors import MechscopeError

    if view is not None:
        from mechscope.lm.pipelines.attribution_graph import view_run

        return view_only(view_run, view, out, force)
    if model is None:
        raise MechscopeError("give --model (or --view GRAPH_JSON)")
    from mechscope.core.torch_utils import torch_threads
    from mechscope.core.validate import name_list
    from mechscope.lm.cli.common import parse_tokens
    from mechscope.lm.methods.attribution_graph import GraphSettings
    from mechscope.lm.pipelines.attribution_graph import graph_run

    if sum(map(bool, (neurons, transcoders, train_tokens is not None))) > 1:  # one source of features (0 tokens too)
        raise MechscopeError("give one of --transcoders, --neurons and --train-transcoders")
    if crosslayer and train_tokens is None:
        raise MechscopeError("--crosslayer trains a cross-layer transcoder: give it with --train-transcoders TOKENS")
    settings = GraphSettings(
        max_feature_nodes=max_features,
        edges_per_row=edges_per_row,
        node_threshold=node_threshold,
        edge_threshold=edge_threshold,
        batch_size=batch,
        check_sources=check,
    )
    settings.validate()
    with torch_threads(threads):
        path, g = graph_run(
            model,
            prompt,
            out,
            force,
            tokens=parse_tokens(tokens) if tokens else None,
            transcoders="neurons" if neurons else transcoders,
            train_tokens=train_tokens,
            crosslayer=crosslayer,
            text_file=text,
            targets=list(target or []),
            logit_pos=logit_pos,
            settings=settings,
            qk=[_qk(q) for q in qk or []],
            ablate=[list(name_list(a, "--ablate")) for a in ablate or []],
            steer=[_steer(s) for s in steer or []],
            paths=paths,
            dashboards=dashboards,
            examples=examples,
            bos=not no_bos,
            progress=lambda m: typer.echo(f"  {m}", err=True),
            device=device,
            dtype=dtype,
            revision=revision,
        )
    _echo(g, path)


def _echo(g, path) -> None:
    """What ``lm graph`` prints: the logits, the counts, the checks, each intervention, QK attribution and path."""
    c = g.counts
    logits = [n for n in g.nodes if n["kind"] == "logit"]
    typer.echo("logits: " + ", ".join(f"{n['label']!r} p={n['probability']:.3f}" for n in logits))
    from mechscope.core.render.html import counted

    typer.echo(
        f"{counted(c['active_features'], 'active feature')}, {c['feature_nodes']:,} with rows, "
        f"{counted(c['backward_passes'], 'backward pass', 'backward passes')}; pruned: "
        f"{counted(c['nodes_pruned'], 'node')}, {counted(c['edges_pruned'], 'edge')}"
    )
    for line in graph_check_lines(g):
        typer.echo(line)
    if logits:
        top = g.inputs_of(logits[0]["id"], 5)
        typer.echo(f"strongest inputs of {logits[0]['label']!r}: "
                   + strongest_inputs(top, lambda n: f"{n.get('label', n['id'])} [{n['id']}]"))  # fmt: skip
    from mechscope.core.attribution_graph import GraphIntervention
    from mechscope.lm.methods.attribution_graph_qk import QKAttribution

    for chk in g.checks:
        typer.echo(GraphIntervention.from_dict(chk).summary())
    for q in g.qk:
        typer.echo(QKAttribution.from_dict(q).summary())
    from mechscope.lm.methods.edge_paths import EdgePaths

    for p in map(EdgePaths.from_dict, g.paths):
        heads = ", ".join(f"{h['head']} {h['total']:+.3f}" for h in p.heads[:4])
        typer.echo(f"inputs of {p.title()} by the head that carried them: {heads}")
    typer.echo(f"graph.json, graph.html and graph-circuit-tracer.json written to {path} ({_total(g.seconds):.1f} s)")


def _total(seconds: dict) -> float:
    """The whole run's seconds (the pipeline's sections), or the graph's alone when they are not there."""
    parts = [v for k, v in seconds.items() if k.startswith("pipeline: ")]
    return sum(parts) if parts else seconds.get("total", 0.0)
