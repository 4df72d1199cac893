"""``mechscope cnn attribute``: attribution grids per method and the faithfulness checks that rank them."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from mechscope.cnn.methods.attributed import AttributionResult, Completeness
from mechscope.cnn.methods.attribution import GradCAM, IntegratedGradients, get_method, resolve_layer
from mechscope.cnn.methods.faithfulness import evaluate_faithfulness
from mechscope.cnn.models.spec import walk
from mechscope.cnn.runs import load_run, load_run_data, weights_hash, write_json
from mechscope.core.errors import MechscopeError
from mechscope.core.outputs import atomic_output
from mechscope.core.torch_utils import evaluating
from mechscope.core.validate import check_int, repeated

log = logging.getLogger(__name__)

DEFAULT_METHODS = (
    "saliency", "input_x_gradient", "integrated_gradients", "smoothgrad", "occlusion", "gradcam", "deeplift",
    "guided_backprop",
)  # fmt: skip
RELU_ONLY = ("deeplift", "guided_backprop")


def select_examples(labels, n: int, n_classes: int = 10) -> list[int]:
    """Indices of ``n`` test images, classes in turn (0, 1, ..., K-1, 0, ...), earliest first."""
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


def _methods(names, spec, layer: str, ig_steps: int) -> tuple[dict, dict]:
    twice = repeated(names or ())
    if twice:  # the second was silently the first again
        raise MechscopeError(f"--method {twice[0]} given more than once")
    layers = [*(x for s in spec.stages for x in s.layers), *spec.readout.layers]
    acts = sorted({x.type for x in layers if x.kind == "act"})
    chosen, skipped = {}, {}
    for name in names or DEFAULT_METHODS:
        m = get_method(name)
        if m.name in RELU_ONLY and acts != ["ReLU"]:
            why = f"needs ReLU activations only; the model has {', '.join(acts) or 'none'}"
            if names:
                raise MechscopeError(f"{m.name} {why}")
            skipped[m.name] = why
            continue
        if isinstance(m, IntegratedGradients):
            m = IntegratedGradients(n_steps=ig_steps)
        if isinstance(m, GradCAM):
            m = GradCAM(layer)
        chosen[m.name] = m
    return chosen, skipped


def parse_target(target: str | int, class_names) -> str:
    """pred, label, or a class by its name or its index (a string on the command line; an int in Python too)."""
    import numbers

    from mechscope.cnn.config import class_index

    if isinstance(target, numbers.Integral) and not isinstance(target, bool):  # 3 was an AttributeError
        return str(class_index(int(target), class_names, "target"))
    if not isinstance(target, str):
        raise MechscopeError(f"target must be pred, label or a class (index or name), got {target!r}")
    if target in ("pred", "label"):
        return target
    if target in class_names:
        return str(list(class_names).index(target))
    if target.isascii() and target.isdecimal() and 0 <= int(target) < len(class_names):  # not "²", which isdigit
        return str(int(target))
    what = "out of range" if target.lstrip("-").isdecimal() else "is not a class name"  # 'foo' is not a range
    raise MechscopeError(
        f"target {target!r} {what}; expected pred, label or a class 0..{len(class_names) - 1} (or its name)"
    )


def attribute_model(
    model, data, out, methods=None, n: int = 16, n_faithfulness: int = 64, force: bool = False,
    ig_steps: int = 64, target: str = "pred", layer: str | None = None,
) -> tuple[Path, AttributionResult]:  # fmt: skip
    """Attribution grids for ``n`` test images and faithfulness.json for every method, written atomically."""
    from mechscope.cnn.report import figures

    n_test = len(data.test_labels)
    for option, value in (("--n", n), ("--n-faithfulness", n_faithfulness)):
        check_int(value, option)  # 2.5 was a TypeError from range()
    check_int(ig_steps, "ig_steps", 1)
    spec = walk(model, data.shape)
    net = spec.model
    given_layer = layer
    layer = resolve_layer(net, layer or spec.last.hook_post)  # an unknown layer fails before any work
    conv_hooks = [h for s in spec.stages for h in (s.hook_pre, s.hook_post, s.hook_out)]
    if layer not in conv_hooks:
        raise MechscopeError(
            f"--layer {layer}: Grad-CAM needs a conv stage's hook point [B, C, H, W]; valid: {', '.join(conv_hooks)}"
        )
    chosen, skipped = _methods(methods, spec, layer, ig_steps)
    if given_layer is not None and not any(isinstance(m, GradCAM) for m in chosen.values()):
        raise MechscopeError(f"--layer {given_layer} is Grad-CAM's, and none of the methods asked for reads it")
    target = parse_target(target, data.class_names)
    for option, value in (("--n", n), ("--n-faithfulness", n_faithfulness)):  # after the methods, target and layer:
        if not 1 <= value <= n_test:  # a default 64 with fewer test images hid a misspelt method
            raise MechscopeError(f"{option} must be between 1 and the {n_test:,} test images, got {value}")
    names = data.class_names
    digest = weights_hash(model)  # recorded, so that explain links these grids only for the same weights
    counter = spec.work_counter()
    with atomic_output(out, force) as tmp, evaluating(net), counter.counting():
        idx = select_examples(data.test_labels, max(n, n_faithfulness), data.n_classes)
        x = data.to_float(data.test_images[idx])
        labels = data.test_labels[idx]
        lo = min(0.0, float(x.min()))
        vrange = (lo, max(1.0, float(x.max())))  # [0, 1] pixels unless the data are wider
        with torch.no_grad():
            probs = torch.softmax(net(x), 1)
        pred = probs.argmax(1)
        if target in ("pred", "label"):
            explained = pred if target == "pred" else labels
            target_text = "the predicted class" if target == "pred" else "the true label"
        else:
            explained, target_text = torch.full_like(pred, int(target)), f"class {names[int(target)]}"
        attributions, ig_delta = {}, None
        for name, m in chosen.items():
            log.info("attributing with %s", name)
            if isinstance(m, IntegratedGradients):
                m.baseline = lo
                attributions[name], ig_delta = m.attribute_with_delta(net, x, explained)
            else:
                attributions[name] = m.attribute(net, x, explained)
            titles = [f"{names[int(labels[i])]}→{names[int(pred[i])]} p={probs[i, pred[i]]:.2f}" for i in range(n)]
            fig = figures.attribution_grid(
                figures.to_display(x[:n], vrange), attributions[name][:n].sum(1).numpy(), name, titles,
                subtitle=f"target: {target_text}; column title: label→prediction (p of the prediction)",
            )  # fmt: skip
            figures.save(fig, tmp / f"{name}.png")
        xf, tf = x[:n_faithfulness], explained[:n_faithfulness]
        report = evaluate_faithfulness(
            net, xf, tf, chosen, layers_top_down=spec.parameter_groups(),
            attributions={k: v[:n_faithfulness] for k, v in attributions.items()}, baseline=lo,
        )  # fmt: skip
        completeness = _completeness(net, x, explained, ig_delta, lo, ig_steps) if ig_delta is not None else None
        result = AttributionResult(
            target, layer, tuple(names), tuple(idx[:n]), tuple(labels[:n].tolist()), tuple(pred[:n].tolist()),
            report, completeness, skipped, digest, counter.report("cnn attribute", len(x)), str(Path(out).absolute()),
        )  # fmt: skip
        write_json(tmp / AttributionResult.FILE, result.to_dict())
        deletion = {m.method: m.deletion_curve for m in report.methods} | {"random": report.random_deletion_curve}
        insertion = {m.method: m.insertion_curve for m in report.methods} | {"random": report.random_insertion_curve}
        figures.save(figures.faithfulness_curves(report.fractions, deletion, insertion), tmp / "faithfulness.png")
    return Path(out), result


def _completeness(net, x, t, delta, lo, steps) -> Completeness:
    with torch.no_grad():
        t_ = t[:, None]
        gap = (net(x).gather(1, t_) - net(torch.full_like(x, lo)).gather(1, t_)).squeeze(1)
    rel = delta.abs() / gap.abs().clamp(min=1e-12)
    return Completeness(steps, delta.abs().max().item(), rel.max().item())


def attribute_run(run, out=None, methods=None, n=16, n_faithfulness=64, dataset=None, data_dir=None,
                  class_names=None, force=False, ig_steps=64, target="pred", layer=None):  # fmt: skip
    loaded = load_run(run)
    data = load_run_data(loaded, dataset, data_dir, class_names)
    out = Path(out) if out is not None else Path(run) / "attribution"
    return attribute_model(loaded.model, data, out, methods, n, n_faithfulness, force, ig_steps, target, layer)
