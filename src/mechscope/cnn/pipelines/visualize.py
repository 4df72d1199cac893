"""``mechscope cnn visualize``: feature visualisations of every unit beside real test images; featvis.json."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from mechscope.cnn.methods import featvis as FV
from mechscope.cnn.methods.blocks_vis import save_for_blocks
from mechscope.cnn.methods.visualised import FeatvisResult, FeatvisSummary, UnitVis
from mechscope.cnn.models.spec import walk
from mechscope.cnn.runs import load_run, load_run_data, weights_hash, write_json
from mechscope.core.errors import MechscopeError
from mechscope.core.hooks import run_with_cache
from mechscope.core.outputs import atomic_output
from mechscope.core.torch_utils import evaluating
from mechscope.core.validate import check_int, check_seed

log = logging.getLogger(__name__)


def _check(spec, layers, units, steps, seed=0) -> tuple[list[str], dict[str, int]]:
    check_int(steps, "--steps")  # 2.5 was a TypeError from range()
    if steps < 1:
        raise MechscopeError(f"--steps must be at least 1, got {steps}")
    if steps > 100_000:
        raise MechscopeError(f"--steps must be at most 100,000, got {steps:,}")
    check_seed(seed)
    names = FV.resolve_layers(spec, layers)
    with torch.no_grad():
        _, probe = run_with_cache(spec.model, torch.zeros(1, *spec.input_shape), names=names)
    size = {name: probe[name].shape[1] for name in names}
    if units is not None and not len(units):
        raise MechscopeError("--units: expected at least one unit")
    for u in units or []:  # 0.5 was an IndexError from torch, 'a' a TypeError, True a mask
        check_int(u, "--units: each unit")
    if units is not None and len(set(units)) != len(units):
        raise MechscopeError(f"--units: a unit given twice ({', '.join(map(str, units))})")
    for name in names:
        for u in units or []:
            if not 0 <= u < size[name]:
                raise MechscopeError(f"unit {u} out of range for {name}: valid units 0..{size[name] - 1}")
    return names, size


def visualize_model(
    model, data, out, layers=None, units=None, steps: int = 512, param: str = "fourier", seed: int = 0,
    n_diverse: int = 3, force: bool = False,
) -> tuple[Path, FeatvisResult]:  # fmt: skip
    """Maximise, minimise and a diverse set per unit; grids beside top test images; featvis.json."""
    spec = walk(model, data.shape)
    net = spec.model
    names, size = _check(spec, layers, units, steps, seed)
    digest = weights_hash(model)  # recorded, so that explain links these pictures only for the same weights
    counter = spec.work_counter()
    with atomic_output(out, force) as tmp, evaluating(net), counter.counting():
        x_test = data.test_float()
        lo, hi = min(0.0, float(x_test.min())), max(1.0, float(x_test.max()))
        assign = [(name, u) for name in names for u in (units if units is not None else range(size[name]))]
        renders = _render(net, spec, assign, steps, param, seed, n_diverse, (lo, hi))
        ex = FV.dataset_examples(net, x_test, names, k=8)  # one pass over the test set for every unit
        with torch.no_grad():
            logits, cache = run_with_cache(net, renders["positive"].images, names=names)
            reached = FV.units_objective(assign)(cache)
            probs = torch.softmax(logits, 1)
        rows = [_unit(spec, ex, name, u, float(reached[i]), float(renders["positive"].first[i]), probs[i])
                for i, (name, u) in enumerate(assign)]  # fmt: skip
        _figures(tmp, spec, assign, rows, renders, ex, x_test, n_diverse, (lo, hi), data.class_names)
        result = FeatvisResult(_settings(steps, param, seed, n_diverse, spec), _summary(rows), tuple(rows),
                               tuple(data.class_names), digest, counter.report("cnn visualize", len(x_test)),
                               str(Path(out).absolute()))  # fmt: skip
        save_for_blocks(tmp, model, spec, assign, renders["positive"].images)  # `cnn blocks` reuses these
        write_json(tmp / FeatvisResult.FILE, result.to_dict())
    return Path(out), result


def _render(net, spec, assign, steps, param, seed, n_diverse, vrange) -> dict:
    n = len(assign)
    base = FV.units_objective(assign)
    reg = FV.total_variation() * 1.0
    log.info("optimising %d units x %d images for %d steps", n, 2 + n_diverse, steps)
    positive = FV.render(net, base - reg, n, steps, param, seed=seed, value_range=vrange)
    # minimise before the activation: after a ReLU a channel bottoms out at 0 and any dark image "wins"
    below = [(name.replace("hook_post", "hook_pre"), u) for name, u in assign]
    negative = FV.render(net, -FV.units_objective(below) - reg, n, steps, param, seed=seed + 1, value_range=vrange)
    diverse_obj = FV.units_objective([a for a in assign for _ in range(n_diverse)]) - reg
    if n_diverse > 1:
        diverse_obj = diverse_obj + 2.0 * FV.diversity(spec.stages[0].hook_post, n_diverse)
    diverse = FV.render(net, diverse_obj, n * n_diverse, steps, param, seed=seed + 2, value_range=vrange)
    return {"positive": positive, "negative": negative, "diverse": diverse}


def _unit(spec, ex, name, u, value, first, probs) -> UnitVis:
    dmax = float(ex[name].value_max[u])
    boxes = None
    if ex[name].positions is not None and name.startswith("conv"):
        stage = spec.stage(name)
        rf = stage.rf_out if name.endswith("hook_out") else stage.rf_post
        boxes = tuple(rf.box(int(y), int(x), *spec.input_shape[1:]) for y, x in ex[name].positions[u])
    logit = name == "hook_logits"
    return UnitVis(
        layer=name, unit=u, activation=value, dataset_max=dmax,
        ratio_to_dataset_max=value / dmax if dmax > 0 else None,
        exceeds_dataset_max=value > dmax, objective_first=first, top_test_images=tuple(ex[name].top[u].tolist()),
        bottom_test_images=tuple(ex[name].bottom[u].tolist()), top_receptive_fields=boxes,
        assigned_class=int(probs.argmax()) if logit else None,
        assigned_probability=float(probs.max()) if logit else None,
    )  # fmt: skip


def _summary(rows: list[UnitVis]) -> FeatvisSummary:
    ratios = [r.ratio_to_dataset_max for r in rows if r.ratio_to_dataset_max is not None]
    logits = [r for r in rows if r.layer == "hook_logits"]
    return FeatvisSummary(
        units=len(rows),
        exceed_dataset_max=sum(r.exceeds_dataset_max for r in rows),
        median_ratio_to_dataset_max=float(np.median(ratios or [0.0])),
        units_never_active_on_test_set=sum(r.ratio_to_dataset_max is None for r in rows),
        logit_visualisations_classified_as_their_class=sum(r.assigned_class == r.unit for r in logits),
        logit_visualisations=len(logits),
    )


def _settings(steps, param, seed, n_diverse, spec) -> dict:
    return {
        "steps": steps,
        "parameterisation": param,
        "seed": seed,
        "diverse_images": n_diverse,
        "regulariser": "total variation, weight 1",
        "diversity_weight": 2.0,
        "diversity_layer": spec.stages[0].hook_post,
        "transforms": "pad 2, jitter 2, scale 0.9-1.1, rotate ±10°, jitter 1, crop to the input size",
        "unit_value": "channel: mean over positions; logit: the logit",
    }


def _figures(tmp, spec, assign, rows, renders, ex, x_test, n_diverse, vrange, class_names) -> None:
    from mechscope.cnn.report import figures

    n = len(assign)
    div = renders["diverse"].images
    div = div.view(n, n_diverse, *div.shape[1:])
    (tmp / "units").mkdir(exist_ok=True)
    for name in dict.fromkeys(layer for layer, _ in assign):
        idx = [i for i, (layer, _) in enumerate(assign) if layer == name]
        us = [assign[i][1] for i in idx]
        labels = []
        for i, u in zip(idx, us, strict=True):
            r = rows[i].ratio_to_dataset_max
            ratio = "never active\non test set" if r is None else f"×{r:.2f} of test max"
            labels.append({"label": f"{class_names[u] if name == 'hook_logits' else f'ch {u}'}\n{ratio}"})
        imgs = {
            "positive": figures.to_display(renders["positive"].images[idx], vrange),
            "negative": figures.to_display(renders["negative"].images[idx], vrange),
            "diverse": np.stack([figures.to_display(div[i], vrange) for i in idx]),
        }
        top = ex[name].top[us]  # [units, k]
        examples = np.stack([figures.to_display(x_test[row], vrange) for row in top])
        boxes = [list(rows[i].top_receptive_fields) for i in idx] if rows[idx[0]].top_receptive_fields else None
        short = FV.short_layer_name(name)
        figures.save(figures.featvis_grid(name, labels, imgs, examples, boxes), tmp / f"{short}.png")
        for j, u in enumerate(us):  # the same panel for each unit on its own
            one = {k: v[j : j + 1] for k, v in imgs.items()}
            box = boxes[j : j + 1] if boxes else None
            fig = figures.featvis_grid(name, labels[j : j + 1], one, examples[j : j + 1], box)
            figures.save(fig, tmp / "units" / f"{short}_{u}.png")


def visualize_run(run, out=None, layers=None, units=None, steps=512, param="fourier", seed=0, n_diverse=3,
                  dataset=None, data_dir=None, class_names=None, force=False):  # fmt: skip
    loaded = load_run(run)
    data = load_run_data(loaded, dataset, data_dir, class_names)
    out = Path(out) if out is not None else Path(run) / "featvis"
    return visualize_model(loaded.model, data, out, layers, units, steps, param, seed, n_diverse, force)
