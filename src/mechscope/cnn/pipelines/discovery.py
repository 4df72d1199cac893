"""``mechscope cnn discover`` and the CNN half of ``mechscope scrub``: discovery.json / scrub.json and a
self-contained report.html, written atomically."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from mechscope.cnn.config import class_index
from mechscope.cnn.methods.discovery import CNNDiscovery, check_hand, discover, image_task
from mechscope.cnn.methods.scrubbing import CNNScrub, parse_hypothesis_file, scrub_hypothesis
from mechscope.cnn.models.spec import walk
from mechscope.core.errors import MechscopeError, about
from mechscope.core.graphs import check_discovery_settings
from mechscope.core.outputs import WEIGHTS_KEY, atomic_output, check_target, same_weights, write_json
from mechscope.core.torch_utils import Timer, evaluating
from mechscope.core.validate import read_json_object


def _data(run, dataset=None, data_dir=None):
    from mechscope.cnn.runs import load_run_data

    data = load_run_data(run, dataset, data_dir)
    return data.test_float(), data.test_labels.long(), data


def hand_circuit(path: str | Path, target: int, spec=None, digest: str | None = None) -> list[int]:
    """The last-stage channels ``cnn explain`` found for class ``target`` (its mechanisms.json, or the folder),
    checked against ``spec``'s last stage when given, and (``digest``) made from those weights when the file says
    which it was made from (a mechanisms.json before the hash was recorded does not)."""
    path = Path(path)
    if path.is_dir():
        path = path / "mechanisms.json"
    if not path.exists():
        raise MechscopeError(f"{path}: not found")
    data = read_json_object(path, "cnn explain mechanisms.json")
    circuits = data.get("circuits")
    rows = circuits.get("circuits") if isinstance(circuits, dict) else None
    if not isinstance(rows, list):
        raise MechscopeError(f"{path}: not a readable mechanisms.json (circuits.circuits is not a list)")
    model = data.get("model")
    if digest is not None and isinstance(model, dict) and WEIGHTS_KEY in model:  # another run's channel numbers
        ok, why = same_weights(model, digest)
        if not ok:
            raise MechscopeError(f"{path}: not this run's explanation: {why}")
    for row in rows:
        t = row.get("target") if isinstance(row, dict) else None
        if type(t) is int and t == target:  # a float or bool target is not a class index
            return check_hand(row.get("channels"), spec, f"{path}: circuit for class {target}")
    raise MechscopeError(f"{path}: cnn explain found no circuit for class {target}")


def discover_run(
    run_dir: str | Path,
    out: str | Path | None = None,
    *,
    method: str = "eap-ig",
    metric: str | None = None,
    target: int | str | None = None,
    n: int | None = None,
    seed: int = 0,
    corrupt: str = "resample",
    size: int | float | None = None,
    threshold: float | None = None,
    steps: int | None = None,
    ablation: str = "patch",
    curve: bool = True,
    n_random: int | None = None,
    explain: str | Path | None = None,
    dataset: str | None = None,
    data_dir=None,
    force: bool = False,
    progress: bool = False,
) -> tuple[Path, CNNDiscovery]:
    """Discover a CNN's channel circuit; write discovery.json and report.html. Returns (out, the result)."""
    from mechscope.cnn.report.discovery import write_report
    from mechscope.cnn.runs import load_run

    steps, n_random = check_discovery_settings(method, seed, n_random, size, threshold, steps, curve,
                                                 ablation)
    out = Path(out) if out is not None else Path(run_dir) / "discover"
    check_target(out, force)
    if explain is not None and target is None:
        raise MechscopeError("--explain compares a class's circuit: give the class with --class")
    timer = Timer("cnn discover")
    with timer.section("load"):
        run = load_run(run_dir)
        images, labels, data = _data(run, dataset, data_dir)
        target = None if target is None else class_index(target, data.class_names)
        spec = walk(run.model, data.shape)
        hand = hand_circuit(explain, target, spec, run.weights_sha256) if explain is not None else None
        counter = spec.work_counter()
        with evaluating(spec.model), counter.counting():
            task = image_task(images, labels, target=target, metric=metric, n=n, seed=seed, corrupt=corrupt,
                              n_classes=spec.n_classes, model=spec.model)  # fmt: skip
    with counter.counting():
        result = discover(spec, task, method, size=size, threshold=threshold, steps=steps, ablation=ablation,
                          curve=curve, n_random=n_random, seed=seed, hand=hand, name=str(run_dir),
                          progress=progress)  # fmt: skip
    work = counter.report("cnn discover", len(task.clean))
    result = replace(result, seconds={**timer.seconds, **result.seconds}, work=work)
    with atomic_output(out, force) as tmp:
        write_json(tmp / CNNDiscovery.FILE, result.to_dict())
        write_report(result, tmp / "report.html")
    return out, result


def scrub_file(data: dict, where: str, out: str | Path | None = None, force: bool = False) -> tuple[Path, CNNScrub]:
    """Causal scrubbing of a CNN hypothesis (the parsed JSON of ``where``); scrub.json and report.html."""
    from mechscope.cnn.report.discovery import write_scrub_report
    from mechscope.cnn.runs import load_run

    hyp = parse_hypothesis_file(data, where)
    out = Path(out) if out is not None else Path("runs") / "scrub" / Path(where).stem
    check_target(out, force)
    run = load_run(hyp.run)
    images, labels, d = _data(run)
    spec = walk(run.model, d.shape)
    counter = spec.work_counter()
    with counter.counting(), about(where):
        result = scrub_hypothesis(spec, images, labels, hyp, name=hyp.run)
    result = replace(result, work=counter.report("cnn scrub", result.settings["n"]))
    with atomic_output(out, force) as tmp:
        write_json(tmp / CNNScrub.FILE, result.to_dict())
        write_scrub_report(result, tmp / "report.html")
    return out, result
