"""``mechscope cnn graph``: the attribution graph of one image's logit; graph.json, graph.html, the unpruned graph
and circuit-tracer's graph JSON.

:func:`graph_model` is the Python API (a run folder or a CNN; dictionaries from a folder, the CNN's channels, or
trained here), :func:`graph_run` the CLI's, :func:`view_run` re-renders an annotated graph JSON. Outputs are written
atomically, never over an existing folder without ``force``.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np

from mechscope.cnn.config import class_index
from mechscope.cnn.methods.attribution_graph import (
    CnnAttributionGraph,
    CnnDictionaryTraining,
    CnnGraphSettings,
    cnn_attribution_graph,
    feature_examples,
    intervene,
    train_dictionaries,
)
from mechscope.cnn.methods.replacement import StageDictionaries
from mechscope.cnn.models.spec import walk
from mechscope.core.attribution_graph import PhaseWork, asked_interventions, check_asked, check_counts
from mechscope.core.attribution_graph.files import view_graph, write_graph_files
from mechscope.core.errors import MechscopeError
from mechscope.core.outputs import atomic_output, check_target, write_json
from mechscope.core.torch_utils import Timer
from mechscope.core.validate import check_int, settings_or

log = logging.getLogger(__name__)

FULL_ABOUT = ("the unpruned graph: rows (targets), cols (sources), values (edges) over the node space "
              "[features with rows | errors | pixels | logits]")


def graph_model(
    run,
    image: int = 0,
    *,
    split: str = "test",
    dictionaries=None,
    kind: str = "sae",
    training: CnnDictionaryTraining | None = None,
    target: int | str | None = None,
    settings: CnnGraphSettings | None = None,
    ablate: list[list[str]] | None = None,
    steer: list[tuple[str, float]] | None = None,
    auto_intervention: bool = True,
    dashboards: int = 24,
    dataset: str | None = None,
    data_dir=None,
    out=None,
    force: bool = False,
    progress=None,
) -> tuple[Path | None, CnnAttributionGraph]:
    """The graph of image ``image`` of the run's ``split`` images (``dictionaries``: a folder, ``"channels"``, a
    :class:`StageDictionaries`, or None: small ones of ``kind`` trained here and saved in ``OUT/dictionaries``)."""
    from mechscope.cnn.runs import load_run, load_run_data

    check_counts(dashboards=dashboards)
    check_asked(ablate, steer)
    settings = settings_or(settings, CnnGraphSettings)  # before the dictionaries train
    training = None if training is None else settings_or(training, CnnDictionaryTraining)  # None: of the kind
    if out is not None:
        check_target(out, force)
    if split not in ("train", "test"):
        raise MechscopeError(f"--split must be train or test, got {split!r}")
    timer = Timer("cnn graph")
    with timer.section("load"):
        r = load_run(run)
        data = load_run_data(r, dataset, data_dir)
    target = None if target is None else class_index(target, data.class_names)
    images = data.test_float() if split == "test" else data.train_float()
    labels = data.test_labels if split == "test" else data.train_labels
    image = check_int(image, "image")  # a numpy integer (np.argmax gives one) too; not a bool or a float
    if not 0 <= image < len(images):
        raise MechscopeError(f"image {image} outside the {split} split's 0..{len(images) - 1}")
    model = r.model
    trained = None
    work = PhaseWork(walk(model, data.shape).work_counter(), timer)  # images through the stages' convolutions, by phase

    with work.counter.counting():
        with work.phase("dictionaries"):
            if isinstance(dictionaries, StageDictionaries):
                dicts = dictionaries
            elif dictionaries == "channels":
                dicts = StageDictionaries.channels(model)
            elif dictionaries is not None:
                dicts = StageDictionaries.load(dictionaries)
            else:
                tr = training or CnnDictionaryTraining(kind=kind)
                trained = train_dictionaries(model, data.train_float(), data.test_float(), tr, progress)
                dicts = trained.dictionaries
            dicts.check(model)
        with work.phase("graph"):
            graph, rep = cnn_attribution_graph(
                model,
                dicts,
                images[image],
                target=target,
                label=int(labels[image]),
                class_names=r.class_names,
                settings=settings,
                name=str(run),
            )
        with work.phase("interventions"):
            feats = graph.features()
            checks = asked_interventions(partial(intervene, graph, rep), feats, auto_intervention, ablate, steer)
        dash = {}
        if dashboards and feats:
            with work.phase("dashboards"):
                dash = feature_examples(
                    model, dicts, images[:2000], [(f["layer"], f["feature"]) for f in feats[:dashboards]]
                )
                dash = {k: {"examples": v, "note": f"top of the first 2,000 {split} images"} for k, v in dash.items()}
    dic = dict(graph.dictionaries)
    if trained is not None:
        dic |= {
            "quality": [
                {k: s.get(k) for k in ("stage", "explained_variance", "l0", "error_share", "dead", "d_sae")}
                for s in trained.stages
            ],
            "trained": trained.settings,
        }
    graph = replace(
        graph,
        checks=tuple(c.to_dict() for c in checks),
        dashboards=dash,
        dictionaries=dic,
        seconds={**graph.seconds, **{f"pipeline: {k}": v for k, v in timer.seconds.items()}},
        full=graph.full,
        title=f"image {image} of {split}, " + graph.title,  # the graph's title gives the class and the label
        work=work.report("cnn graph", 1, graph.counts, graph.settings["batch_size"], _not_counted(trained)),
    )
    if out is None:
        return None, graph
    out = Path(out)
    with atomic_output(out, force) as tmp:
        write_outputs(graph, tmp)
        if trained is not None:
            dicts.save(tmp / "dictionaries", run=str(run))
            write_json(tmp / "dictionaries" / "training.json", trained.to_dict())
    return out, graph


def _not_counted(trained) -> str:
    """What ``work`` leaves out (:class:`~mechscope.core.attribution_graph.PhaseWork`)."""
    out = "the dictionaries' encoders and decoders and the read-out (not convolutions)"
    if trained is not None:
        out += "; the training steps of the dictionaries trained here (their activations' harvest is counted)"
    return out


def write_outputs(graph, where: Path, slug: str = "graph") -> None:
    """graph.json, graph.html, graph-circuit-tracer.json and (when the graph has it) graph_full.safetensors."""
    from mechscope.cnn.report.attribution_graph import page

    img = np.asarray(graph.settings.get("image_pixels") or [[0.0]], dtype=float)
    write_graph_files(graph, where, page(graph, img, slug), FULL_ABOUT, slug)


def graph_run(run, image: int, out=None, force: bool = False, **kw) -> tuple[Path, CnnAttributionGraph]:
    """The CLI's call: the default output folder is ``RUN/graph-IMAGE``."""
    out = Path(out) if out is not None else Path(run) / f"graph-{image}"
    return graph_model(run, image, out=out, force=force, **kw)


def view_run(graph_json, out=None, force: bool = False) -> tuple[Path, CnnAttributionGraph]:
    """Re-render a graph JSON (as written, or downloaded from the viewer with annotations)."""
    return view_graph(graph_json, CnnAttributionGraph, write_outputs, out, force)
