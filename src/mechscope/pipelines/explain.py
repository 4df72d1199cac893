"""``mechscope cnn explain``: how a CNN classifies, from measured numbers.

Strings the methods together; each returns a typed result (see
:class:`~mechscope.methods.explained.ExplainResult`). The numbers are computed in ``methods/``,
the sentences in ``report/summary.py``, the page in ``report/microscope.py``.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from mechscope.config import ExplainSettings
from mechscope.errors import MechscopeError
from mechscope.methods import featvis as FV
from mechscope.methods.ablation_study import ablation_study
from mechscope.methods.activations import ExplainData, collect
from mechscope.methods.circuit_study import circuit_study
from mechscope.methods.explained import ExplainResult
from mechscope.methods.overview import overview, weights_view
from mechscope.methods.patching import default_pair, patching_study
from mechscope.methods.selectivity import selectivity
from mechscope.methods.unit_examples import unit_examples
from mechscope.models.cnn import n_parameters
from mechscope.models.spec import walk
from mechscope.outputs import atomic_output
from mechscope.pipelines.blocks import blocks_link
from mechscope.pipelines.tuning import linked_tuning
from mechscope.runs import load_run, load_run_data, same_weights, write_json

log = logging.getLogger(__name__)


class Timer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def section(self, name: str):
        log.info("explain: %s", name)
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t


def check_settings(settings: ExplainSettings, spec, class_names) -> ExplainSettings:
    """Every setting a user gives, checked against the model and data before any work; classes as indices."""
    settings.validate()
    if spec.n_classes != len(class_names):
        raise MechscopeError(f"the model has {spec.n_classes} outputs; the data have {len(class_names)} classes")
    if settings.circuit_layer is not None:
        spec.stage(settings.circuit_layer)
    return settings.resolve(class_names)


def explain_model(model, data, out, settings: ExplainSettings | None = None, *, run=None, linked=None, force=False):
    """Explain ``model`` on ``data`` (an :class:`~mechscope.data.images.ImageDataset`); write mechanisms.json
    and report.html into ``out`` atomically. Returns (``out``, the :class:`ExplainResult`)."""
    from mechscope.report.microscope import write_report
    from mechscope.report.summary import summarise

    settings = settings or ExplainSettings()
    timer = Timer()
    with timer.section("load"):
        spec = walk(model, data.shape)
        settings = check_settings(settings, spec, data.class_names)
    with atomic_output(out, force) as tmp:
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
            held = f"training images {n_ref:,}-{n_ref + n_held:,} (not used for the means)" if n_held else "none"
            classes = list(dict.fromkeys(s.classes)) if s.classes else list(range(ed.n_classes))
            circuits = circuit_study(
                model, spec, ed, acts, classes, s.circuit_layer, s.tolerance, s.resample_seed, s.batch_size, held
            )
        with timer.section("examples"):
            examples = unit_examples(model, spec, ed)
        result = ExplainResult(
            run=str(run) if run is not None else None,
            model={**spec.to_dict(), "architecture": spec.architecture(), "n_parameters": n_parameters(model)},
            data={**_describe(data), "test_images": len(ed.y)},
            class_names=tuple(ed.class_names),
            settings={**s.to_dict(), "patch": list(pair), "description": ed.description},
            overview=ov, weights=weights, ablation=ablation, selectivity=sel, patching=patching,
            circuits=circuits, examples=examples,
        )  # fmt: skip
        with timer.section("summary"):
            result = replace(result, summary=tuple(summarise(result, linked)))
        with timer.section("report"):
            vrange = (min(0.0, float(ed.x.min())), max(1.0, float(ed.x.max())))  # [0, 1] pixels unless wider
            write_report(replace(result, seconds=dict(timer.seconds)), linked or {}, tmp / "report.html", vrange)
        result = replace(result, seconds=dict(timer.seconds))
        write_json(tmp / "mechanisms.json", result.to_dict())
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
    return explain_model(loaded.model, data, out, settings, run=run, linked=linked, force=force)


def explain_mnist(run, out=None, digits=None, patch_classes=(8, 3), n_pairs=16, tolerance=0.01, data_dir=None,
                  force=False, batch_size=2048, test_limit=None):  # fmt: skip
    """The MNIST-era signature of :func:`explain_run`."""
    settings = ExplainSettings(
        classes=tuple(digits) if digits else None, patch=tuple(patch_classes) if patch_classes else None,
        n_pairs=n_pairs, tolerance=tolerance, test_limit=test_limit, batch_size=batch_size,
    )  # fmt: skip
    return explain_run(run, out, settings, data_dir=data_dir, force=force)


def _same(json_path: Path, digest: str | None, what: str, linked: dict) -> bool:
    """Whether the output at ``json_path`` was made from the weights hashed ``digest`` (else a note, and skipped)."""
    if digest is None:
        return True
    try:
        recorded = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        recorded = None
    ok, why = same_weights(recorded, digest)
    if not ok:
        note = f"{json_path.parent}: not linked ({why})"
        log.warning("%s", note)
        linked.setdefault("notes", []).append(note)
    return ok


def linked_outputs(run: Path, digest: str | None = None) -> dict:
    """Outputs of `cnn visualize` and `cnn attribute` in their default places, when present and, given the
    weights' ``digest`` (:func:`~mechscope.runs.weights_hash`), made from those weights (others are left
    out with a note in ``linked["notes"]``)."""
    linked: dict = {"featvis": None, "attribution": None}
    fv = run / "featvis"
    if (fv / "featvis.json").is_file() and _same(fv / "featvis.json", digest, "feature visualisations", linked):
        try:
            data = json.loads((fv / "featvis.json").read_text())
            units = {}
            for row in data.get("units", []):
                short = FV.short_layer_name(row["layer"])
                png = fv / "units" / f"{short}_{row['unit']}.png"
                if png.is_file():
                    units[f"{short}_{row['unit']}"] = {"png": png, **row}
            linked["featvis"] = {"dir": fv, "units": units, "summary": data.get("summary", {})}
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, KeyError, TypeError, AttributeError):
            log.warning("%s: unreadable featvis.json; the report leaves feature visualisation out", fv)
    at = run / "attribution"
    if (at / "faithfulness.json").is_file() and _same(at / "faithfulness.json", digest, "attribution grids", linked):
        try:
            data = json.loads((at / "faithfulness.json").read_text())
            pngs = {p.stem: p for p in sorted(at.glob("*.png"))}
            linked["attribution"] = {"dir": at, "ranking": data.get("ranking", []), "pngs": pngs}
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            log.warning("%s: unreadable faithfulness.json; the report leaves attribution out", at)
    return linked
