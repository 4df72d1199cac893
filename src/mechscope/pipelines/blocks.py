"""``mechscope cnn blocks``: Building Blocks (Olah et al. 2018) for one test image or typical ones.

Strings the steps of :mod:`mechscope.methods.blocks` together: choose the images, factorise each
stage's activations into neuron groups, visualise grid cells, groups and channels in one
optimisation, find each group's top test images, attribute group → group → class; then
blocks.json and report.html (:mod:`mechscope.report.blocks`), written atomically.
"""

from __future__ import annotations

import time
from pathlib import Path

from mechscope.config import check_seed
from mechscope.errors import MechscopeError
from mechscope.methods import blocks as B
from mechscope.methods import blocks_vis as V
from mechscope.models.spec import walk
from mechscope.outputs import atomic_output, check_target, write_json
from mechscope.results import SCHEMA_VERSION
from mechscope.runs import load_run, load_run_data


def check_settings(kw: dict) -> None:
    """The settings that need neither model nor data, checked first (``kw``: :func:`blocks_model`'s keywords)."""
    steps, typical, image, groups = kw.get("steps", 256), kw.get("typical"), kw.get("image"), kw.get("groups")
    if steps < 1:
        raise MechscopeError(f"--steps must be at least 1, got {steps}")
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
    if kw.get("threads", 1) < 1:
        raise MechscopeError(f"--threads must be at least 1, got {kw['threads']}")
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
    from mechscope.models.devices import torch_threads

    check_settings({**kw, "threads": threads})
    with torch_threads(threads):
        return _blocks(model, data, out, **kw)


def _blocks(model, data, out, *, image=None, typical=None, groups=None, steps=256, seed=0, max_side=12,
            threshold=0.9, n_top=4, n_examples=6, featvis_dir=None, force=False, run=None):  # fmt: skip
    from dataclasses import replace

    from mechscope.report.blocks import summary_lines, write_report

    t0 = time.perf_counter()
    seconds: dict[str, float] = {}

    def lap(name: str) -> None:
        seconds[name] = time.perf_counter() - t0 - sum(seconds.values())

    spec = walk(model, data.shape)
    out = check_target(out, force)
    x_test, y_test = data.test_float(), data.test_labels
    sel = B.select_images(spec, x_test, y_test, image, typical)
    B.check_groups(spec, len(sel.images), groups)
    with atomic_output(out, force) as tmp:
        x = x_test[list(sel.images)]
        _, acts = B.stage_activations(spec, x)
        shown = [sel.images.index(i) for i in sel.shown]
        layers = [B.analyse_layer(spec, s, acts[s.name], shown, groups, threshold, seed, max_side, n_top)
                  for s in spec.stages]  # fmt: skip
        lap("forward and NMF")
        layers = B.attach_examples(spec, layers, x_test, n_examples)
        lap("examples")
        flows = B.image_flows(spec, layers, sel, data.class_names)
        lap("attribution")
        sha = V.weights_sha256(model)
        channels, source = _channels(spec, featvis_dir, sha)
        vrange = (min(0.0, float(x_test.min())), max(1.0, float(x_test.max())))
        images = V.visualise_blocks(spec, layers, steps, seed, vrange, channels)
        lap("feature visualisation")
        settings = {"weights_sha256": sha, "image": image, "typical": typical, "groups": groups, "steps": steps,
                    "seed": seed, "grid_max_side": max_side, "threshold": threshold, "n_top_channels": n_top,
                    "n_examples": n_examples, "cossim_pow": V.COSSIM_POW, "run": str(run) if run else None,
                    "schema_version": SCHEMA_VERSION}  # fmt: skip
        result = B.BlocksResult(sel, tuple(layers), tuple(flows), tuple(data.class_names), settings, source,
                                seconds=seconds, images=images, inputs=x)  # fmt: skip
        write_report(result, tmp / "report.html", vrange, spec, x_test)
        lap("report")
        seconds["total"] = time.perf_counter() - t0
        result = replace(result, seconds=dict(seconds))
        write_json(tmp / "blocks.json", {**result.to_dict(), "summary": summary_lines(result)})
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
    import json
    import os

    report, record = run / "blocks" / "report.html", run / "blocks" / "blocks.json"
    if not (report.is_file() and record.is_file()):
        return None
    try:
        sha = json.loads(record.read_text(encoding="utf-8"))["settings"]["weights_sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if sha != V.weights_sha256(model):
        return None
    return os.path.relpath(report.absolute(), Path(explain_out).absolute())
