"""``mechscope cnn blocks``: Building Blocks (Olah et al. 2018) for one test image or typical ones.

Strings the steps of :mod:`mechscope.cnn.methods.blocks` together: choose the images, factorise each
stage's activations into neuron groups, visualise grid cells, groups and channels in one
optimisation, find each group's top test images, attribute group → group → class; then
blocks.json and report.html (:mod:`mechscope.cnn.report.blocks`), written atomically.
"""

from __future__ import annotations

from pathlib import Path

from mechscope.cnn.methods import blocks as B
from mechscope.cnn.methods import blocks_vis as V
from mechscope.cnn.models.spec import walk
from mechscope.cnn.runs import load_run, load_run_data
from mechscope.core.errors import MechscopeError
from mechscope.core.outputs import atomic_output, check_target, read_linked, weights_hash, write_json
from mechscope.core.torch_utils import Timer, torch_threads
from mechscope.core.validate import check_int, check_seed, check_threads


def check_settings(kw: dict) -> None:
    """The settings that need neither model nor data, checked first (``kw``: :func:`blocks_model`'s keywords)."""
    steps, typical, image, groups = kw.get("steps", 256), kw.get("typical"), kw.get("image"), kw.get("groups")
    if steps < 1:
        raise MechscopeError(f"--steps must be at least 1, got {steps}")
    if steps > 100_000:
        raise MechscopeError(f"--steps must be at most 100,000, got {steps:,}")
    if typical is not None and typical < 1:
        raise MechscopeError(f"--typical must be at least 1, got {typical}")
    if typical is not None and image is not None:
        raise MechscopeError("--image and --typical exclude each other")
    if image is not None and image < 0:
        raise MechscopeError(f"--image {image} out of range: a test image index is 0 or more")
    if groups is not None and groups < 1:
        raise MechscopeError(f"--groups must be at least 1, got {groups}")
    if kw.get("max_side", 12) < 1:
        raise MechscopeError(f"--grid must be at least 1, got {kw['max_side']}")
    if not 0 < kw.get("threshold", 0.9) <= 1:
        raise MechscopeError(f"--threshold must be in (0, 1], got {kw['threshold']}")
    for key in ("n_top", "n_examples"):  # Python-only settings: 0 gave rows with no channel and groups with no image
        if key in kw:
            check_int(kw[key], key, 1, 10_000)
    check_threads(kw.get("threads", 1))
    check_seed(kw.get("seed", 0))


def _channels(spec, featvis_dir: Path | None, sha: str) -> tuple[dict | None, str]:
    """The channel visualisations of ``cnn visualize`` when made from these weights, else None (compute)."""
    if featvis_dir is None:
        return None, "computed here (no featvis directory given)"
    wanted = {s.hook_post: s.out_channels for s in spec.stages}
    found = V.load_channel_images(featvis_dir / V.CHANNEL_IMAGES, sha, wanted)
    if found is None:
        return None, f"computed here ({featvis_dir / V.CHANNEL_IMAGES} absent, incomplete or from other weights)"
    return {s.name: found[s.hook_post] for s in spec.stages}, f"reused from {featvis_dir} (same weights)"


def blocks_model(model, data, out, *, threads: int = 1, **kw):
    """Building Blocks of ``model`` on ``data``'s test images into ``out``; returns (out, BlocksResult).

    ``threads``: torch threads for the work (one by default: on a small machine anything else is
    using, more threads make these small models many times slower; see ``pipelines.neurons``).
    """
    from mechscope.cnn.data.images import check_dataset

    check_dataset(data)
    check_settings({**kw, "threads": threads})
    with torch_threads(threads):
        return _blocks(model, data, out, **kw)


def _blocks(model, data, out, *, image=None, typical=None, groups=None, steps=256, seed=0, max_side=12,
            threshold=0.9, n_top=4, n_examples=6, featvis_dir=None, force=False, run=None):  # fmt: skip
    from dataclasses import replace

    from mechscope.cnn.report.blocks import summary_lines, write_report

    timer = Timer("blocks")
    spec = walk(model, data.shape)
    out = check_target(out, force)
    x_test, y_test = data.test_float(), data.test_labels
    sel = B.select_images(spec, x_test, y_test, image, typical)
    B.check_groups(spec, len(sel.images), groups)
    counter = spec.work_counter()
    with atomic_output(out, force) as tmp, counter.counting():
        x = x_test[list(sel.images)]
        with timer.section("forward and NMF"):
            _, acts = B.stage_activations(spec, x)
            shown = [sel.images.index(i) for i in sel.shown]
            layers = [B.analyse_layer(spec, s, acts[s.name], shown, groups, threshold, seed, max_side, n_top)
                      for s in spec.stages]  # fmt: skip
        with timer.section("examples"):
            layers = B.attach_examples(spec, layers, x_test, n_examples)
        with timer.section("attribution"):
            flows = B.image_flows(spec, layers, sel, data.class_names)
        with timer.section("feature visualisation"):
            sha = weights_hash(model)
            channels, source = _channels(spec, featvis_dir, sha)
            vrange = (min(0.0, float(x_test.min())), max(1.0, float(x_test.max())))
            images = V.visualise_blocks(spec, layers, steps, seed, vrange, channels)
        settings = {"weights_sha256": sha, "image": image, "typical": typical, "groups": groups, "steps": steps,
                    "seed": seed, "grid_max_side": max_side, "threshold": threshold, "n_top_channels": n_top,
                    "n_examples": n_examples, "cossim_pow": V.COSSIM_POW, "run": str(run) if run else None}  # fmt: skip
        result = B.BlocksResult(sel, tuple(layers), tuple(flows), tuple(data.class_names), settings, source,
                                seconds=dict(timer.seconds), images=images, inputs=x)  # fmt: skip
        result = replace(result, summary=tuple(summary_lines(result)))
        with timer.section("report"):
            write_report(result, tmp / "report.html", vrange, spec, x_test)
        result = replace(result, seconds=dict(timer.seconds) | {"total": timer.total()},
                         work=counter.report("cnn blocks", len(x_test)))  # fmt: skip
        write_json(tmp / "blocks.json", result.to_dict())
    return out, result


def blocks_run(run, out=None, *, dataset=None, data_dir=None, class_names=None, **kw):
    """Building Blocks of a run directory; ``out`` defaults to RUN/blocks, featvis reused from RUN/featvis."""
    check_settings(kw)  # before loading anything
    loaded = load_run(run)
    data = load_run_data(loaded, dataset, data_dir, class_names)
    out = Path(out) if out is not None else Path(run) / "blocks"
    return blocks_model(loaded.model, data, out, featvis_dir=Path(run) / "featvis", run=run, **kw)


def blocks_link(run: Path, explain_out: Path, model) -> str | None:
    """The path of RUN/blocks/report.html relative to ``explain_out`` when it exists and was made from ``model``'s
    weights (for the explain report's link), else None."""
    import os

    report = run / "blocks" / "report.html"
    if not report.is_file():
        return None
    found, _ = read_linked(run / "blocks" / B.BlocksResult.FILE, B.BlocksResult, weights_hash(model))
    if found is None:
        return None
    return os.path.relpath(report.absolute(), Path(explain_out).absolute())
