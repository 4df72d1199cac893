"""The only place that strings steps together: data -> model -> methods -> outputs."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from mechscope.config import TrainConfig
from mechscope.data.mnist import load_mnist
from mechscope.models.cnn import n_parameters
from mechscope.runs import check_out_dir, prepare_out_dir, save_run
from mechscope.training import train_cnn

log = logging.getLogger(__name__)


def train_mnist(
    out: str | Path,
    config: TrainConfig | None = None,
    data_dir: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
) -> tuple[Path, dict]:
    """Train the CNN on MNIST and write a run directory; returns its path and metrics."""
    config = config or TrainConfig()
    config.validate()
    out = Path(out)
    check_out_dir(out, force=force)  # fail before a minute of training, not after
    data = load_mnist(data_dir)
    result = train_cnn(data, config, progress=progress)
    metrics = {
        **result.evaluation.to_dict(),
        "train_seconds": result.train_seconds,
        "n_parameters": n_parameters(result.model),
        "steps": result.steps,
        "history": result.history,
    }
    run_config = {
        "training": config.to_dict(),
        "seed": config.seed,
        "data": {"directory": str(data.directory), "md5": data.md5},
    }
    save_run(prepare_out_dir(out, force=force), result.model, run_config, metrics)
    return out, metrics


def select_examples(labels, n: int, n_classes: int = 10) -> list[int]:
    """Indices of ``n`` test images, classes in turn (0, 1, ..., 9, 0, ...), earliest first."""
    by_class = [(labels == k).nonzero().flatten().tolist() for k in range(n_classes)]
    picked, round_ = [], 0
    while len(picked) < n:
        added = False
        for k in range(n_classes):
            if round_ < len(by_class[k]) and len(picked) < n:
                picked.append(by_class[k][round_])
                added = True
        if not added:
            break
        round_ += 1
    return picked


DEFAULT_METHODS = (
    "saliency",
    "input_x_gradient",
    "integrated_gradients",
    "smoothgrad",
    "occlusion",
    "gradcam",
    "deeplift",
    "guided_backprop",
)


def attribute_mnist(
    run: str | Path,
    out: str | Path | None = None,
    methods: list[str] | None = None,
    n: int = 16,
    n_faithfulness: int = 64,
    data_dir: str | Path | None = None,
    force: bool = False,
    ig_steps: int = 64,
    target: str = "pred",
    layer: str = "conv2.hook_post",
) -> tuple[Path, dict]:
    """Attribution grids for ``n`` test images and faithfulness.json for every method."""
    import torch

    from mechscope.data.mnist import MNIST
    from mechscope.errors import MechscopeError
    from mechscope.methods.attribution import IntegratedGradients, get_method
    from mechscope.methods.faithfulness import evaluate_faithfulness
    from mechscope.report import figures
    from mechscope.runs import load_run, write_json

    if n < 1 or n_faithfulness < 1:
        raise MechscopeError(f"--n must be at least 1, got {min(n, n_faithfulness)}")
    names = list(methods or DEFAULT_METHODS)
    chosen = {}
    for name in names:
        m = get_method(name)
        if isinstance(m, IntegratedGradients):
            m = IntegratedGradients(n_steps=ig_steps)
        chosen[m.name] = m
    loaded = load_run(run)
    from mechscope.methods.attribution import GradCAM, resolve_layer

    resolve_layer(loaded.model, layer)  # an unknown layer fails before any work
    for name, m in chosen.items():
        if isinstance(m, GradCAM):
            chosen[name] = GradCAM(layer)
    if target not in ("pred", "label") and not (target.isdigit() and 0 <= int(target) < loaded.model.config.n_classes):
        raise MechscopeError(
            f"target {target!r} out of range; expected pred, label or a class 0..{loaded.model.config.n_classes - 1}"
        )
    out = Path(out) if out is not None else Path(run) / "attribution"
    check_out_dir(out, force=force)
    data = load_mnist(data_dir)
    model = loaded.model
    idx = select_examples(data.test_labels, max(n, n_faithfulness))
    x = MNIST.to_float(data.test_images[idx])
    labels = data.test_labels[idx]
    with torch.no_grad():
        probs = torch.softmax(model(x), 1)
    pred = probs.argmax(1)
    explained = pred if target == "pred" else labels if target == "label" else torch.full_like(pred, int(target))
    prepare_out_dir(out, force=force)

    attributions = {}
    ig_delta = None
    target_text = {"pred": "the predicted class", "label": "the true label"}.get(target, f"class {target}")
    for name, m in chosen.items():
        log.info("attributing with %s", name)
        if isinstance(m, IntegratedGradients):
            attributions[name], ig_delta = m.attribute_with_delta(model, x, explained)
        else:
            attributions[name] = m.attribute(model, x, explained)
        titles = [f"{int(labels[i])}→{int(pred[i])} p={probs[i, pred[i]]:.2f}" for i in range(n)]
        fig = figures.attribution_grid(
            x[:n, 0].numpy(),
            attributions[name][:n].sum(1).numpy(),
            name,
            titles,
            subtitle=f"target: {target_text}; column title: label→prediction (p of the prediction)",
        )
        figures.save(fig, out / f"{name}.png")

    xf, tf = x[:n_faithfulness], explained[:n_faithfulness]
    report = evaluate_faithfulness(
        model, xf, tf, chosen, attributions={k: v[:n_faithfulness] for k, v in attributions.items()}
    )
    result = report.to_dict()
    if ig_delta is not None:
        with torch.no_grad():
            t_ = explained[:, None]
            gap = (model(x).gather(1, t_) - model(torch.zeros_like(x)).gather(1, t_)).squeeze(1)
        rel = ig_delta.abs() / gap.abs().clamp(min=1e-12)
        result["integrated_gradients_completeness"] = {
            "steps": ig_steps,
            "max_abs_delta": ig_delta.abs().max().item(),
            "max_relative_delta": rel.max().item(),
        }
    result["target"] = target
    result["gradcam_layer"] = layer
    result["examples"] = {"test_indices": idx[:n], "labels": labels[:n].tolist(), "predictions": pred[:n].tolist()}
    write_json(out / "faithfulness.json", result)

    deletion = {m.method: m.deletion_curve for m in report.methods} | {"random": report.random_deletion_curve}
    insertion = {m.method: m.insertion_curve for m in report.methods} | {"random": report.random_insertion_curve}
    fractions = report.fractions
    figures.save(figures.faithfulness_curves(fractions, deletion, insertion), out / "faithfulness.png")
    return out, result


def visualize_mnist(
    run: str | Path,
    out: str | Path | None = None,
    layers: list[str] | None = None,
    units: list[int] | None = None,
    steps: int = 512,
    param: str = "fourier",
    seed: int = 0,
    n_diverse: int = 3,
    data_dir: str | Path | None = None,
    force: bool = False,
) -> tuple[Path, dict]:
    """Feature visualisations for every unit of the CNN beside real test images; featvis.json."""
    import torch

    from mechscope.data.mnist import MNIST
    from mechscope.errors import MechscopeError
    from mechscope.hooks import describe_names, hook_points, run_with_cache
    from mechscope.methods import featvis as FV
    from mechscope.report import figures
    from mechscope.runs import load_run, write_json

    if steps < 1:
        raise MechscopeError(f"--steps must be at least 1, got {steps}")
    loaded = load_run(run)
    model = loaded.model
    names = [FV.LAYER_ALIASES.get(layer, layer) for layer in (layers or ["conv1", "conv2", "logits"])]
    points = hook_points(model)
    for name in names:
        if name not in points or name in ("hook_input",):
            raise MechscopeError(
                f"unknown layer {name!r}; valid layers: conv1, conv2, logits, {describe_names(points)}"
            )
    size = {}
    with torch.no_grad():
        _, probe = run_with_cache(model, torch.zeros(1, *model.input_shape), names=names)
    for name in names:
        size[name] = probe[name].shape[1]
        for u in units or []:
            if not 0 <= u < size[name]:
                raise MechscopeError(f"unit {u} out of range for {name}: valid units 0..{size[name] - 1}")
    out = Path(out) if out is not None else Path(run) / "featvis"
    check_out_dir(out, force=force)
    data = load_mnist(data_dir)
    x_test = MNIST.to_float(data.test_images)

    assign = [(name, u) for name in names for u in (units if units is not None else range(size[name]))]
    n = len(assign)
    base = FV.units_objective(assign)
    reg = FV.total_variation() * 1.0
    log.info("optimising %d units x %d images for %d steps", n, 2 + n_diverse, steps)
    positive = FV.render(model, base - reg, n, steps, param, seed=seed)
    # minimise before the ReLU: after it a channel bottoms out at 0 and any dark image "wins"
    below = [(name.replace("hook_post", "hook_pre"), u) for name, u in assign]
    negative = FV.render(model, -FV.units_objective(below) - reg, n, steps, param, seed=seed + 1)
    diverse_assign = [a for a in assign for _ in range(n_diverse)]
    diverse_obj = FV.units_objective(diverse_assign) - reg
    if n_diverse > 1:
        diverse_obj = diverse_obj + 2.0 * FV.diversity("conv1.hook_post", n_diverse)
    diverse = FV.render(model, diverse_obj, n * n_diverse, steps, param, seed=seed + 2)

    ex = FV.dataset_examples(model, x_test, names, k=8)  # one pass over the test set for every unit
    best = {name: ex[name].value_max for name in names}
    with torch.no_grad():
        logits, cache = run_with_cache(model, positive.images, names=names)
        reached = base(cache)
        probs = torch.softmax(logits, 1)
    prepare_out_dir(out, force=force)
    results = []
    for i, (name, u) in enumerate(assign):
        dmax = float(best[name][u])
        ratio = float(reached[i]) / dmax if dmax > 0 else None  # a unit never active on the test set
        row = {
            "layer": name,
            "unit": u,
            "activation": float(reached[i]),
            "dataset_max": dmax,
            "ratio_to_dataset_max": ratio,
            "exceeds_dataset_max": bool(reached[i] > dmax),
            "objective_first": positive.history[0],
            "top_test_images": ex[name].top[u].tolist(),
            "bottom_test_images": ex[name].bottom[u].tolist(),
        }
        if ex[name].positions is not None:
            row["top_receptive_fields"] = [
                list(FV.receptive_field(model, name, int(y), int(x))) for y, x in ex[name].positions[u]
            ]  # (y0, y1, x0, x1) in the input around each top image's most active position
        if name == "hook_logits":
            row["assigned_class"] = int(probs[i].argmax())
            row["assigned_probability"] = float(probs[i].max())
        results.append(row)

    for name in names:
        idx = [i for i, (lay, _) in enumerate(assign) if lay == name]
        us = [assign[i][1] for i in idx]
        rows = []
        for i, u in zip(idx, us, strict=True):
            r = results[i]["ratio_to_dataset_max"]
            ratio = "never active\non test set" if r is None else f"×{r:.2f} of test max"
            rows.append({"label": f"{'digit' if name == 'hook_logits' else 'ch'} {u}\n{ratio}"})
        imgs = {
            "positive": positive.images[idx, 0].numpy(),
            "negative": negative.images[idx, 0].numpy(),
            "diverse": diverse.images.view(n, n_diverse, *diverse.images.shape[1:])[idx, :, 0].numpy(),
        }
        top = ex[name].top[us]  # [units, k]
        examples = x_test[top.flatten(), 0].view(*top.shape, *x_test.shape[2:]).numpy()
        boxes = None
        if ex[name].positions is not None:
            pos = ex[name].positions[us]
            boxes = [[FV.receptive_field(model, name, int(y), int(x)) for y, x in row] for row in pos]
        short = FV.short_layer_name(name)
        figures.save(figures.featvis_grid(name, rows, imgs, examples, boxes), out / f"{short}.png")
        (out / "units").mkdir(exist_ok=True)
        for j, u in enumerate(us):  # the same panel for each unit on its own
            one = {k: v[j : j + 1] for k, v in imgs.items()}
            fig = figures.featvis_grid(
                name, rows[j : j + 1], one, examples[j : j + 1], boxes[j : j + 1] if boxes else None
            )
            figures.save(fig, out / "units" / f"{short}_{u}.png")

    exceed = sum(r["exceeds_dataset_max"] for r in results)
    logits = [r for r in results if r["layer"] == "hook_logits"]
    summary = {
        "units": len(results),
        "exceed_dataset_max": exceed,
        "median_ratio_to_dataset_max": float(
            np.median([r["ratio_to_dataset_max"] for r in results if r["ratio_to_dataset_max"] is not None] or [0.0])
        ),
        "units_never_active_on_test_set": sum(r["ratio_to_dataset_max"] is None for r in results),
        "logit_visualisations_classified_as_their_digit": sum(r["assigned_class"] == r["unit"] for r in logits),
        "logit_visualisations": len(logits),
    }
    settings = {
        "steps": steps,
        "parameterisation": param,
        "seed": seed,
        "diverse_images": n_diverse,
        "regulariser": "total variation, weight 1",
        "diversity_weight": 2.0,
        "transforms": "pad 2, jitter 2, scale 0.9-1.1, rotate ±10°, jitter 1, crop to 28x28",
        "unit_value": "channel: mean over positions; logit: the logit",
    }
    result = {"settings": settings, "summary": summary, "units": results}
    write_json(out / "featvis.json", result)
    return out, result
