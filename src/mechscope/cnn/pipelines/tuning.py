"""``mechscope cnn tuning``: every conv unit's tuning curves on synthetic stimuli; tuning.json and report.html.

Strings the steps together: stimuli (:mod:`mechscope.cnn.methods.stimuli`), responses and labels
(:mod:`mechscope.cnn.methods.tuning`), the page (:mod:`mechscope.cnn.report.tuning`).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from mechscope.cnn.methods.stimuli import draw_stimuli
from mechscope.cnn.methods.tuning import TuningResult, dataset_max, tuning
from mechscope.cnn.models.spec import walk
from mechscope.cnn.runs import load_run, load_run_data
from mechscope.core.outputs import atomic_output, check_target, read_linked, weights_hash, write_json
from mechscope.core.torch_utils import Timer
from mechscope.core.validate import check_seed

log = logging.getLogger(__name__)


def tuning_model(model, data, out, seed: int = 0, *, run=None, weights=None, force: bool = False,
                 progress=None) -> tuple[Path, TuningResult]:  # fmt: skip
    """Tuning curves of every conv unit of ``model``, with test-set maxima from ``data`` (an ImageDataset);
    writes tuning.json, report.html and units/*.png into ``out`` atomically. ``weights``: the weights' hash
    recorded in tuning.json (default: computed from ``model``)."""
    from mechscope.cnn.report.tuning import summary_lines, write_report

    say = progress or (lambda _: None)
    check_seed(seed)
    check_target(out, force)
    timer = Timer("tuning")
    spec = walk(model, data.shape)
    weights = weights or weights_hash(model)
    x = data.test_float()
    value_range = (min(0.0, float(x.min())), max(1.0, float(x.max())))  # [0, 1] pixels unless the data say wider
    counter = spec.work_counter()
    with atomic_output(out, force) as tmp, counter.counting():
        say("drawing stimuli")
        with timer.section("stimuli"):
            stim = draw_stimuli(spec.input_shape[1:], seed)
        say("test-set maxima")
        with timer.section("test-set maxima"):
            maxima = dataset_max(spec, x)
        say("responses and labels")
        with timer.section("responses"):
            result = tuning(spec, stim, maxima, value_range, run=run, weights_sha256=weights)
            result = replace(result, summary=tuple(summary_lines(result)))
        say("figures")
        with timer.section("report"):
            write_report(replace(result, seconds=dict(timer.seconds)), tmp)
        result = replace(result, seconds=dict(timer.seconds), work=counter.report("cnn tuning", len(x)))
        write_json(tmp / TuningResult.FILE, result.to_dict())
    return Path(out), result


def tuning_run(run, out=None, seed: int = 0, *, dataset=None, data_dir=None, class_names=None, force: bool = False,
               progress=None) -> tuple[Path, TuningResult]:  # fmt: skip
    """:func:`tuning_model` on a run directory (default output RUN/tuning)."""
    check_seed(seed)
    loaded = load_run(run)
    out = Path(out) if out is not None else Path(run) / "tuning"
    check_target(out, force)
    data = load_run_data(loaded, dataset, data_dir, class_names)
    return tuning_model(loaded.model, data, out, seed, run=run, weights=loaded.weights_sha256 or None, force=force,
                        progress=progress)  # fmt: skip


def linked_tuning(run: Path, model) -> dict | None:
    """RUN/tuning's results for the microscope report: per unit its figure, label and numbers, when
    tuning.json was made from ``model``'s weights (:func:`~mechscope.core.outputs.weights_hash`); otherwise
    ``{"dir", "stale": why}`` so that the report says why it shows none, and None when there is none."""
    from mechscope.cnn.methods.tuning import CV_MAX

    where = Path(run) / "tuning"
    found, why = read_linked(where / TuningResult.FILE, TuningResult, weights_hash(model))
    if found is None:
        if not why:
            return None
        log.warning("%s: tuning curves not shown: %s", where, why)
        again = f" (`mechscope cnn tuning --run {run} --force` makes them again)"
        again = "" if why.startswith("unreadable") else again
        return {"dir": where, "stale": why + again}
    units = {}
    for stage in found.stages:
        for u in stage.units:
            name = f"{stage.stage}_{u.channel}"
            png = where / "units" / f"{name}.png"
            units[name] = {"png": png if png.is_file() else None, "stage": stage.stage, "channel": u.channel,
                           **{k: getattr(u, k) for k in ("label", "tuned", "reason", "sharpness", "sharpness_kind",
                                                         "drive")}, "stronger": u.stronger()}  # fmt: skip
    return {"dir": where, "stale": None, "units": units, "cv_max": CV_MAX}
