"""Command-line options every wing's commands share, defined once (the wings' ``cli`` packages import them), and
what both graph commands do the same way (``--view``, their check lines)."""

from __future__ import annotations

import typer

ForceOpt = typer.Option(
    False, "--force", help="Replace the files this command writes in --out (other files there are kept)."
)
DeviceOpt = typer.Option(None, "--device", help="cpu, cuda, cuda:N or mps (default: the best one present).")
DtypeOpt = typer.Option(
    None, "--dtype", help="float32, bfloat16 or float16 (default: float32 on the CPU, bfloat16 on a GPU)."
)


def _threads(value: int | None) -> int | None:
    """``--threads`` is checked as the command line is read, before anything loads (a count past what OpenMP can
    start crashes it: a segmentation fault, not an error)."""
    if value is not None:
        from mechscope.core.validate import check_threads

        check_threads(value)
    return value


ThreadsOpt = typer.Option(
    None, "--threads", callback=_threads,
    help="Torch threads (default: torch's own, one per core; 1 is far faster for small models on a busy machine).",
)  # fmt: skip
ThreadsOneOpt = typer.Option(  # commands whose models are small enough that one thread is the fastest default
    1, "--threads", callback=_threads,
    help="Torch threads (default 1: the fastest on a busy machine; more can help a large model on a quiet one).",
)  # fmt: skip
DistributedOpt = typer.Option(
    None, "--distributed/--no-distributed",
    help="Data-parallel over the processes torchrun started (default: when launched by torchrun); launch as "
    "torchrun --nproc-per-node N -m mechscope -- COMMAND ...",
)  # fmt: skip


# ---- sae train (both wings): the dictionary and its training ----------------------------------------------------
ArchitectureOpt = typer.Option("topk", "--architecture", help="relu (L1), topk, batchtopk or jumprelu.")
L1Opt = typer.Option(5.0, "--l1", help="L1 coefficient (relu).")
L0Opt = typer.Option(1.0, "--l0", help="L0 coefficient (jumprelu).")
NormalizeOpt = typer.Option(True, "--normalize/--no-normalize", help="Scale inputs to mean squared norm d_in.")
BatchSizeOpt = typer.Option(4096, "--batch-size", help="Rows per step.")
EpochsOpt = typer.Option(1, "--epochs", help="Passes over the store.")
StepsOpt = typer.Option(None, "--steps", help="Stop after this many steps.")
LrOpt = typer.Option(4e-4, "--lr")
SeedOpt = typer.Option(0, "--seed")
CheckpointEveryOpt = typer.Option(0, "--checkpoint-every", help="Steps between checkpoints (OUT.partial).")
ResumeOpt = typer.Option(False, "--resume", help="Continue from the checkpoints in OUT.partial.")


def view_only(view_run, view: str, out, force: bool) -> None:
    """A graph command's ``--view GRAPH_JSON``: re-render the saved graph with the wing's ``view_run`` and say what
    was written; any option that builds a graph is refused (a re-render would silently ignore it)."""
    from mechscope.core.errors import MechscopeError
    from mechscope.core.validate import typed_options

    other = typed_options(exclude=("view", "out", "force"))
    if other:
        raise MechscopeError(
            f"--view re-renders a saved graph and takes only --out and --force, not {', '.join(other)}"
        )
    path, g = view_run(view, out, force)
    typer.echo(f"{len(g.nodes)} nodes, {len(g.edges)} edges, {len(g.pinned)} pinned, {len(g.supernodes)} supernodes")
    typer.echo(f"graph.html and graph-circuit-tracer.json written to {path}")


def graph_check_lines(g) -> list[str]:
    """A graph command's lines on its graph's scores and exactness (both wings print them)."""
    s, e = g.scores, g.exactness
    edges = (f", edges max |error| {e['edges_max_abs_error']:.2e} over {e['edges_sources_checked']} sources"
             if "edges_max_abs_error" in e else "")  # fmt: skip
    undefined = not _defined(s["replacement"])
    why = " (no influence of an input or an error node reaches the logits: too few features with rows?)"
    return [
        f"replacement score {_score(s['replacement'])} (pruned {_score(s['replacement_pruned'])}), completeness "
        f"{_score(s['completeness'])} (pruned {_score(s['completeness_pruned'])}){why if undefined else ''}",
        f"exactness: logits max |diff| {e['logits_max_abs_diff']:.2e}{edges}",
    ]


def _defined(v) -> bool:
    return v is not None and v == v  # a score of no influence at all is NaN in memory, null in graph.json


def _score(v) -> str:
    return f"{v:.3f}" if _defined(v) else "undefined"


def strongest_inputs(top, label) -> str:
    """The "strongest inputs of ..." line of a graph command: ``top`` as ``Graph.inputs_of`` gives them, each as
    ``label(node)``; "none in the pruned graph" when nothing is left."""
    listed = ", ".join(f"{label(n)} {w:+.3f}" for n, w in top)
    return listed or "none in the pruned graph"
