"""``mechscope cnn explain``: how a CNN classifies, from measured numbers.

Strings the methods together; each returns a typed result (see
:class:`~mechscope.cnn.methods.explained.ExplainResult`). The numbers are computed in ``methods/``,
the sentences in ``report/summary.py``, the page in ``report/microscope.py``.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from mechscope.cnn.config import ExplainSettings
from mechscope.cnn.methods import featvis as FV
from mechscope.cnn.methods.ablation_study import ablation_study
from mechscope.cnn.methods.activations import ExplainData, collect
from mechscope.cnn.methods.circuit_study import circuit_study
from mechscope.cnn.methods.explained import ExplainResult
from mechscope.cnn.methods.faithfulness import final_rho
from mechscope.cnn.methods.overview import overview, weights_view
from mechscope.cnn.methods.patching import default_pair, patching_study
from mechscope.cnn.methods.selectivity import selectivity
from mechscope.cnn.methods.unit_examples import unit_examples
from mechscope.cnn.models.spec import walk
from mechscope.cnn.pipelines.blocks import blocks_link
from mechscope.cnn.pipelines.tuning import linked_tuning
from mechscope.cnn.runs import load_run, load_run_data, write_json
from mechscope.core.errors import MechscopeError
from mechscope.core.outputs import WEIGHTS_KEY, atomic_output, read_linked, weights_hash
from mechscope.core.results import plain
from mechscope.core.torch_utils import Timer, n_parameters
from mechscope.core.validate import settings_or

log = logging.getLogger(__name__)


def check_settings(settings: ExplainSettings, spec, class_names) -> ExplainSettings:
    """Every setting a user gives, checked against the model and data before any work; classes as indices."""
    settings.validate()
    if spec.n_classes != len(class_names):
        raise MechscopeError(f"the model has {spec.n_classes} outputs; the data have {len(class_names)} classes")
    if settings.circuit_layer is not None:
        spec.stage(settings.circuit_layer)
    return settings.resolve(class_names)


def explain_model(
    model, data, out, settings: ExplainSettings | None = None, *, run=None, linked=None, force=False, digest=None
):  # fmt: skip
    """Explain ``model`` on ``data`` (an :class:`~mechscope.cnn.data.images.ImageDataset`); write mechanisms.json
    and report.html into ``out`` atomically. Returns (``out``, the :class:`ExplainResult`). ``digest``: the model's
    :func:`~mechscope.core.outputs.weights_hash` when the caller has it (a loaded run's), else computed here."""
    from mechscope.cnn.report.microscope import write_report
    from mechscope.cnn.report.summary import summarise

    settings = settings_or(settings, ExplainSettings)
    timer = Timer("explain")
    with timer.section("load"):
        spec = walk(model, data.shape)
        settings = check_settings(settings, spec, data.class_names)
    counter = spec.work_counter()
    with atomic_output(out, force) as tmp, counter.counting():
        s = settings
        with timer.section("forward"):
            ed = ExplainData.from_dataset(data, s.test_limit, s.n_mean, s.held_out)
            acts = collect(model, spec, ed, s.batch_size)
            ov = overview(model, spec, ed, acts)
        with timer.section("weights"):
            weights = weights_view(model, spec)
        with timer.section("ablation"):
            reference = f"per-position mean over the first {len(ed.x_ref):,} training images"
            ablation = ablation_study(model, spec, ed, acts, s.batch_size, reference)
        with timer.section("selectivity"):
            sel = selectivity(model, spec, ed, acts)
        with timer.section("patching"):
            pair = s.patch or default_pair(ed.class_names, ov.confusion_matrix)
            patching = patching_study(model, spec, ed, acts, pair, s.n_pairs, s.batch_size)
        with timer.section("circuits"):
            n_ref, n_held = len(ed.x_ref), len(ed.y_held)
            held = f"training images {n_ref:,}-{n_ref + n_held:,}, not used for the means" if n_held else "none"
            classes = list(dict.fromkeys(s.classes)) if s.classes else list(range(ed.n_classes))
            circuits = circuit_study(
                model, spec, ed, acts, classes, s.circuit_layer, s.tolerance, s.resample_seed, s.batch_size, held
            )
        with timer.section("examples"):
            examples = unit_examples(model, spec, ed)
        result = ExplainResult(
            run=str(run) if run is not None else None,
            model={**spec.to_dict(), "architecture": spec.architecture(), "n_parameters": n_parameters(model),
                   WEIGHTS_KEY: digest or weights_hash(model)},  # what cnn discover --explain checks against
            data={**_describe(data), "test_images": len(ed.y)},
            class_names=tuple(ed.class_names),
            settings={**s.to_dict(), "patch": list(pair), "description": ed.description},
            overview=ov, weights=weights, ablation=ablation, selectivity=sel, patching=patching,
            circuits=circuits, examples=examples, work=counter.report("cnn explain", len(ed.y)),
        )  # fmt: skip
        with timer.section("summary"):
            result = replace(result, summary=tuple(summarise(result, linked)))
        with timer.section("report"):
            vrange = (min(0.0, float(ed.x.min())), max(1.0, float(ed.x.max())))  # [0, 1] pixels unless wider
            result = replace(result, seconds=dict(timer.seconds), linked=linked or {}, vrange=vrange)
            write_report(result, tmp / "report.html")
        result = replace(result, seconds=dict(timer.seconds))
        write_json(tmp / ExplainResult.FILE, result.to_dict())
    return Path(out), result


def _describe(data) -> dict:
    return data.describe() if hasattr(data, "describe") else {"name": getattr(data, "name", "data")}


def explain_run(run, out=None, settings=None, *, dataset=None, data_dir=None, class_names=None, force=False):
    """Explain a trained run directory on its own data (``dataset``/``data_dir`` override where it is)."""
    loaded = load_run(run)
    data = load_run_data(loaded, dataset, data_dir, class_names)
    out = Path(out) if out is not None else Path(run) / "explain"
    linked = linked_outputs(Path(run), loaded.weights_sha256)
    linked["blocks"] = blocks_link(Path(run), out, loaded.model)  # RUN/blocks/report.html of these weights
    linked["tuning"] = linked_tuning(Path(run), loaded.model)  # RUN/tuning/tuning.json of these weights
    return explain_model(
        loaded.model, data, out, settings, run=run, linked=linked, force=force, digest=loaded.weights_sha256
    )


def linked_outputs(run: Path, digest: str | None = None) -> dict:
    """Outputs of `cnn visualize` and `cnn attribute` in their default places, when present and, given the
    weights' ``digest`` (:func:`~mechscope.core.outputs.weights_hash`), made from those weights (others are left
    out with a note in ``linked["notes"]``)."""
    from mechscope.cnn.methods.attributed import AttributionResult
    from mechscope.cnn.methods.visualised import FeatvisResult

    linked: dict = {"featvis": None, "attribution": None}
    fv, at = run / "featvis", run / "attribution"
    found, why = read_linked(fv / FeatvisResult.FILE, FeatvisResult, digest)
    if found is not None:
        units = {}
        for u in found.units:
            short = FV.short_layer_name(u.layer)
            png = fv / "units" / f"{short}_{u.unit}.png"
            if png.is_file():
                units[f"{short}_{u.unit}"] = {"png": png, **plain(u)}
        linked["featvis"] = {"dir": fv, "units": units, "summary": plain(found.summary)}
    elif why:
        _note(linked, fv, why)
    found, why = read_linked(at / AttributionResult.FILE, AttributionResult, digest)
    if found is not None and found.faithfulness.curves_over is None:  # an older mechscope's: the background too
        found, why = None, ("its faithfulness checks are an older mechscope's, over the whole image (the black "
                            "background made their ranking); `mechscope cnn attribute --force` remakes them")
    if found is not None:
        pngs = {p.stem: p for p in sorted(at.glob("*.png"))}
        f = found.faithfulness
        order = f.ranking()
        checks = [
            {"method": m.method, "gap": m.gap, "passes": f.passes(m),
             "rho": final_rho(m.randomisation), "rho_on_input": final_rho(m.randomisation_on_input)}
            for m in order
        ]  # fmt: skip
        linked["attribution"] = {
            "dir": at, "ranking": [m.method for m in order], "checks": checks, "threshold": f.sanity_threshold,
            "pngs": pngs,
        }  # fmt: skip
    elif why:
        _note(linked, at, why)
    return linked


def _note(linked: dict, where: Path, why: str) -> None:
    note = f"{where}: not linked ({why})"
    log.warning("%s", note)
    linked.setdefault("notes", []).append(note)
