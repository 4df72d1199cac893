"""``mechscope cnn tuning``: every conv unit's tuning curves on synthetic stimuli; tuning.json and report.html.

Strings the steps together: stimuli (:mod:`mechscope.methods.stimuli`), responses and labels
(:mod:`mechscope.methods.tuning`), the page (:mod:`mechscope.report.tuning`).
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from mechscope.config import check_seed
from mechscope.methods.stimuli import draw_stimuli
from mechscope.methods.tuning import TuningResult, dataset_max, tuning
from mechscope.models.spec import walk
from mechscope.outputs import atomic_output, check_target, write_json
from mechscope.runs import load_run, load_run_data, same_weights, weights_hash

TUNING_JSON = "tuning.json"


def tuning_model(model, data, out, seed: int = 0, *, run=None, weights=None, force: bool = False,
                 progress=None) -> tuple[Path, TuningResult]:  # fmt: skip
    """Tuning curves of every conv unit of ``model``, with test-set maxima from ``data`` (an ImageDataset);
    writes tuning.json, report.html and units/*.png into ``out`` atomically. ``weights``: the weights' hash
    recorded in tuning.json (default: computed from ``model``)."""
    from mechscope.report.tuning import summary_lines, write_report

    say = progress or (lambda _: None)
    check_seed(seed)
    check_target(out, force)
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    spec = walk(model, data.shape)
    weights = weights or weights_hash(model)
    x = data.test_float()
    value_range = (min(0.0, float(x.min())), max(1.0, float(x.max())))  # [0, 1] pixels unless the data say wider
    with atomic_output(out, force) as tmp:
        say("drawing stimuli")
        stim = draw_stimuli(spec.input_shape[1:], seed)
        seconds["stimuli"] = time.perf_counter() - t
        t = time.perf_counter()
        say("test-set maxima")
        maxima = dataset_max(spec, x)
        seconds["test-set maxima"] = time.perf_counter() - t
        t = time.perf_counter()
        say("responses and labels")
        result = tuning(spec, stim, maxima, value_range, run=run, weights_sha256=weights)
        result = replace(result, summary=tuple(summary_lines(result)))
        seconds["responses"] = time.perf_counter() - t
        t = time.perf_counter()
        say("figures")
        write_report(replace(result, seconds=dict(seconds)), tmp)
        seconds["report"] = time.perf_counter() - t
        result = replace(result, seconds=seconds)
        write_json(tmp / TUNING_JSON, result.to_dict())
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
    tuning.json was made from ``model``'s weights (:func:`~mechscope.runs.weights_hash`); otherwise
    ``{"dir", "stale": why}`` so that the report says why it shows none, and None when there is none."""
    import json
    import logging

    from mechscope.methods.tuning import CV_MAX

    where = Path(run) / "tuning"
    path = where / TUNING_JSON
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        ok, why = same_weights(data, weights_hash(model))
        if not ok:
            logging.getLogger(__name__).warning("%s: tuning curves not shown: %s", where, why)
            return {"dir": where, "stale": f"{why} (`mechscope cnn tuning --run {run} --force` makes them again)"}
        units = {}
        for stage in data["stages"]:
            for u in stage["units"]:
                name = f"{stage['stage']}_{u['channel']}"
                png = where / "units" / f"{name}.png"
                units[name] = {"png": png if png.is_file() else None, "stage": stage["stage"], "channel": u["channel"],
                               **{k: u[k] for k in ("label", "tuned", "reason", "sharpness", "sharpness_kind",
                                                    "drive")}}  # fmt: skip
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
        logging.getLogger(__name__).warning("%s: unreadable tuning.json; the report leaves tuning curves out", where)
        return {"dir": where, "stale": "unreadable tuning.json"}
    return {"dir": where, "stale": None, "units": units, "cv_max": CV_MAX}
