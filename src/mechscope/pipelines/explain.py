"""``mechscope mnist explain``: how the CNN classifies digits, from measured numbers.

Strings the methods together (weights, ablation, selectivity, activation patching, per-digit
circuits, per-channel examples and attributions) into ``mechanisms.json`` and the microscope
report. The numbers are computed here; report/microscope.py only draws and writes them.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from mechscope.data.mnist import MNIST, load_mnist
from mechscope.errors import MechscopeError
from mechscope.hooks import run_with_cache
from mechscope.methods import ablation as A
from mechscope.methods import circuits as C
from mechscope.methods import featvis as FV
from mechscope.runs import check_out_dir, load_run, prepare_out_dir, write_json

log = logging.getLogger(__name__)

LAYERS = {"conv1": "conv1.hook_out", "conv2": "conv2.hook_out"}  # ablation and patching sites
POST = {"conv1": "conv1.hook_post", "conv2": "conv2.hook_post"}  # where examples and maps are read
N_MEAN = 10_000  # training images the mean activations are taken over
HELD_OUT = (10_000, 20_000)  # training images for the circuits' held-out check
RESAMPLE_SEED = 0  # donors for resample-ablation


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


def _region(mean_map: np.ndarray) -> str:
    """Where a non-negative [H, W] map has its mass, in words (thirds of the image)."""
    total = mean_map.sum()
    if total <= 0:
        return "nowhere (never active)"
    h, w = mean_map.shape
    ys, xs = np.mgrid[0:h, 0:w]
    cy, cx = (mean_map * ys).sum() / total / (h - 1), (mean_map * xs).sum() / total / (w - 1)
    vert = "upper" if cy < 0.4 else "lower" if cy > 0.6 else "middle"
    horiz = "left" if cx < 0.4 else "right" if cx > 0.6 else "centre"
    return "centre" if (vert, horiz) == ("middle", "centre") else f"{vert} {horiz}"


def check_digits(digits: list[int] | None, n_classes: int) -> list[int]:
    digits = list(range(n_classes)) if not digits else list(dict.fromkeys(digits))
    for d in digits:
        if not 0 <= d < n_classes:
            raise MechscopeError(f"digit {d} out of range: expected 0..{n_classes - 1}")
    return digits


def explain_mnist(
    run: str | Path,
    out: str | Path | None = None,
    digits: list[int] | None = None,
    patch_classes: tuple[int, int] = (8, 3),
    n_pairs: int = 16,
    tolerance: float = 0.01,
    data_dir: str | Path | None = None,
    force: bool = False,
    batch_size: int = 2048,
    test_limit: int | None = None,
) -> tuple[Path, dict]:
    """Explain a trained MNIST CNN; write mechanisms.json and report.html to ``out``.

    ``test_limit`` uses only the first N test images (for quick looks and tests; the default,
    all 10,000, is what the numbers in a report should rest on).
    """
    from mechscope.methods.layer_attribution import class_channel_to_channel
    from mechscope.report.microscope import write_report

    timer = Timer()
    with timer.section("load"):
        loaded = load_run(run)
        model = loaded.model
        cfg = model.config
        k_cls = cfg.n_classes
        digits = check_digits(digits, k_cls)
        clean_cls, corrupt_cls = patch_classes
        for c in patch_classes:
            if not 0 <= c < k_cls:
                raise MechscopeError(f"patching class {c} out of range: expected 0..{k_cls - 1}")
        if clean_cls == corrupt_cls:
            raise MechscopeError(f"patching needs two different classes, got {clean_cls} and {corrupt_cls}")
        if n_pairs < 1:
            raise MechscopeError(f"--pairs must be at least 1, got {n_pairs}")
        if test_limit is not None and test_limit < 100:
            raise MechscopeError(f"--test-limit must be at least 100 images, got {test_limit}")
        if not 0 <= tolerance < 1:
            raise MechscopeError(f"--tolerance must be in [0, 1), got {tolerance}")
        out = Path(out) if out is not None else Path(run) / "explain"
        check_out_dir(out, force=force)
        data = load_mnist(data_dir)
        x = MNIST.to_float(data.test_images[:test_limit])  # [N, 1, 28, 28]
        y = data.test_labels[:test_limit]
        missing = sorted(set(range(k_cls)) - set(y.unique().tolist()))
        if missing:
            raise MechscopeError(f"the first {len(y)} test images hold no image of digit(s) {missing}; use more")
        x_ref = MNIST.to_float(data.train_images[:N_MEAN])
        x_held = MNIST.to_float(data.train_images[HELD_OUT[0] : HELD_OUT[1]])
        y_held = data.train_labels[HELD_OUT[0] : HELD_OUT[1]]

    with timer.section("forward"):
        names = [*LAYERS.values(), *POST.values()]
        logits_chunks, caches = [], {n: [] for n in LAYERS.values()}
        map_sums: dict[str, torch.Tensor] = {}  # per-class sums of the post-ReLU maps ("where is it active")
        for s in range(0, len(x), batch_size):
            lo, cache = run_with_cache(model, x[s : s + batch_size], names=names)
            logits_chunks.append(lo)
            for n in LAYERS.values():
                caches[n].append(cache[n])
            for key, n in POST.items():
                part = torch.zeros(k_cls, *cache[n].shape[1:], dtype=torch.float64)
                part.index_add_(0, y[s : s + batch_size], cache[n].double())
                map_sums[key] = part if key not in map_sums else map_sums[key] + part
        logits = torch.cat(logits_chunks)  # [N, K]
        acts = {n: torch.cat(v) for n, v in caches.items()}  # [N, C, H, W] at the ablation sites
        class_counts = torch.bincount(y, minlength=k_cls).double()
        maps = {key: (v / class_counts.view(-1, 1, 1, 1)).float() for key, v in map_sums.items()}  # [K, C, H, W]
        pred = logits.argmax(1)
        acc_reduce = A.class_accuracy(y, k_cls)
        base_per_class = acc_reduce(logits[None])[0]  # [K]
        test_acc = float((pred == y).double().mean())
        confusion = torch.zeros(k_cls, k_cls, dtype=torch.long)
        confusion.index_put_((y, pred), torch.ones_like(y), accumulate=True)
        means = A.layer_means(model, x_ref, list(LAYERS.values()))

    fc_w, fc_b = model.fc.weight.detach(), model.fc.bias.detach()  # [K, C*H*W]
    c2_shape = tuple(acts[LAYERS["conv2"]].shape[1:])  # (32, 4, 4)
    c1_shape = tuple(acts[LAYERS["conv1"]].shape[1:])  # (16, 12, 12)
    a2 = acts[LAYERS["conv2"]].flatten(1)  # [N, 512] the read-out's inputs
    m2 = means[LAYERS["conv2"]].flatten()  # [512]

    with timer.section("weights"):
        w1 = model.conv1.conv.weight.detach()[:, 0]  # [16, 5, 5]
        w2 = model.conv2.conv.weight.detach()  # [32, 16, 5, 5]
        w_view = fc_w.view(k_cls, c2_shape[0], -1)  # [K, C, P] read-out weights per channel and position
        weights = {
            "conv1_filters": w1.tolist(),
            "conv1_to_conv2_kernel_norm": w2.flatten(2).norm(dim=2).tolist(),  # [conv2 channel][conv1 channel]
            "conv1_to_conv2_kernel_sum": w2.flatten(2).sum(2).tolist(),
            "readout_templates": fc_w.view(k_cls, *c2_shape).tolist(),  # [class][channel][y][x]
            "readout_class_channel_sum": w_view.sum(2).tolist(),
        }

    with timer.section("ablation"):
        ablation = {
            "metric": "change in test accuracy per class (ablated − full), fractions of 1",
            "baseline_per_class": base_per_class.tolist(),
            "mean_reference": f"per-position mean over the first {N_MEAN:,} training images",
            "sites": dict(LAYERS),
            "layers": {},
        }

        def overall(per_class: torch.Tensor) -> list[float]:  # [n, K] -> [n] test accuracy
            return ((per_class * class_counts).sum(1) / class_counts.sum()).tolist()

        closed_form = "closed form through the linear read-out (checked against hooked forwards in the tests)"
        described = {
            "conv1": (list(range(c1_shape[0])), f"hooked forward passes on the {len(y):,} test images"),
            "conv2": (list(range(c2_shape[0])), closed_form),
            "readout": ([f"c{c} y{i} x{j}" for c, i, j in np.ndindex(*c2_shape)], closed_form),
        }
        for key, (units, method) in described.items():
            entry = {"units": units, "method": method}
            for kind in ("zero", "mean"):
                if key == "conv1":
                    masks = A.channel_masks(c1_shape)
                    per = A.ablate(
                        model, x, LAYERS["conv1"], masks, kind, means[LAYERS["conv1"]], acc_reduce, batch_size
                    )
                else:  # conv2 channels and single read-out inputs: the closed form (the read-out is linear)
                    masks = A.channel_masks(c2_shape).flatten(1) if key == "conv2" else A.unit_masks((a2.shape[1],))
                    rep = 0.0 if kind == "zero" else m2
                    per = A.readout_intervene(fc_w, fc_b, a2, masks, rep, acc_reduce, logits=logits)
                entry[kind] = (per - base_per_class).tolist()
                entry[f"{kind}_overall"] = (np.array(overall(per)) - test_acc).tolist()
            ablation["layers"][key] = entry
        whole = {}
        for key, shape in (("conv1", c1_shape), ("conv2", c2_shape)):
            every = torch.ones(1, *shape, dtype=torch.bool)
            whole[key] = {}
            for kind in ("zero", "mean"):
                out_ = A.ablate(model, x, LAYERS[key], every, kind, means[LAYERS[key]], batch_size=batch_size)[0]
                per = acc_reduce(out_[None])[0]
                share = torch.bincount(out_.argmax(1), minlength=k_cls).double() / len(y)  # [K]
                whole[key][kind] = {
                    "per_class": per.tolist(),
                    "test_accuracy": overall(per[None])[0],
                    "predicted_share": share.tolist(),  # share of test images called each digit
                    "reads_as": int(share.argmax()),  # the layer's replacement value is read as this digit
                }
        ablation["whole_layer"] = whole

    with timer.section("selectivity"):
        selectivity = {}
        for key in ("conv1", "conv2"):
            cm = C.class_means(acts[LAYERS[key]].flatten(2).mean(2), y, k_cls)  # [C, K] spatial-mean activation
            sel = C.selectivity_index(cm)
            pref = cm.argmax(1)
            selectivity[key] = {
                "activation": f"{LAYERS[key]}, mean over positions",
                "class_means": cm.tolist(),
                "index": sel.tolist(),
                "preferred_class": pref.tolist(),
                "order": C.order_by_profile(cm),
                "region_on_preferred_class": [_region(maps[key][int(pref[c]), c].numpy()) for c in range(cm.shape[0])],
            }

    with timer.section("patching"):
        ok = pred == y
        clean_idx = ((y == clean_cls) & ok).nonzero().flatten()[:n_pairs]
        corrupt_idx = ((y == corrupt_cls) & ok).nonzero().flatten()[:n_pairs]
        n = min(len(clean_idx), len(corrupt_idx))
        if n == 0:
            raise MechscopeError(
                f"no correctly classified test images of {clean_cls} and {corrupt_cls} to patch between"
            )
        clean_idx, corrupt_idx = clean_idx[:n], corrupt_idx[:n]
        xc, xr = x[clean_idx], x[corrupt_idx]
        ld_clean = (logits[clean_idx, clean_cls] - logits[clean_idx, corrupt_cls]).double()
        ld_corr = (logits[corrupt_idx, clean_cls] - logits[corrupt_idx, corrupt_cls]).double()
        gap = ld_clean - ld_corr  # [n]

        def recovered(out: torch.Tensor) -> torch.Tensor:  # [k, n, K] -> [k, n] fraction of the gap recovered
            ld = (out[..., clean_cls] - out[..., corrupt_cls]).double()
            return (ld - ld_corr) / gap

        patching = {
            "clean_class": clean_cls,
            "corrupted_class": corrupt_cls,
            "pairs": n,
            "clean_test_indices": clean_idx.tolist(),
            "corrupted_test_indices": corrupt_idx.tolist(),
            "metric": f"(LD_patched − LD_{corrupt_cls}) / (LD_{clean_cls} − LD_{corrupt_cls}), "
            f"LD = logit {clean_cls} − logit {corrupt_cls}; 0: no change, 1: the {clean_cls}'s decision fully restored",
            "logit_difference_clean_mean": float(ld_clean.mean()),
            "logit_difference_corrupted_mean": float(ld_corr.mean()),
        }
        for key, shape in (("conv1", c1_shape), ("conv2", c2_shape)):
            pos = A.patch(model, xr, xc, LAYERS[key], A.unit_masks(shape), recovered, batch_size)  # [U, n]
            ch = A.patch(model, xr, xc, LAYERS[key], A.channel_masks(shape), recovered, batch_size)  # [C, n]
            top = pos.mean(1).abs().argsort(descending=True)[:5]
            patching[key] = {
                "top_units": [
                    {
                        "channel": int(u) // (shape[1] * shape[2]),
                        "y": int(u) // shape[2] % shape[1],
                        "x": int(u) % shape[2],
                        "recovered": float(pos[u].mean()),
                    }
                    for u in top
                ],
                "position_mean": pos.mean(1).view(shape).tolist(),
                "channel_mean": ch.mean(1).tolist(),
                "channel_std": ch.std(1).tolist() if n > 1 else [0.0] * shape[0],
            }

    with timer.section("circuits"):
        circuits = []
        n_c2 = c2_shape[0]
        m2c = means[LAYERS["conv2"]].view(n_c2, -1)  # [C, P]
        ref_logits, contrib = A.readout_channel_contributions(fc_w, a2.view(len(a2), n_c2, -1), m2c, fc_b)
        held_logits, held_cache = run_with_cache(model, x_held, names=[LAYERS["conv2"]])
        a2_held = held_cache[LAYERS["conv2"]]
        _, contrib_held = A.readout_channel_contributions(fc_w, a2_held.flatten(2), m2c, fc_b)
        pred_held = held_logits.argmax(1)

        def kept_pred(contrib_: torch.Tensor, keep: list[int]) -> torch.Tensor:  # [N] predictions, others mean-ablated
            return (ref_logits + contrib_[:, keep].sum(1)).argmax(1)

        def rates(p: torch.Tensor, labels: torch.Tensor, d: int) -> tuple[float, float]:
            """(accuracy on the d's, share of the other digits labelled d)."""
            is_d = labels == d
            return float((p[is_d] == d).double().mean()), float((p[~is_d] == d).double().mean())

        donors = A.resample_donors(y, seed=RESAMPLE_SEED)  # [N] a test image of another digit for each image
        a2_donor = acts[LAYERS["conv2"]][donors]  # [N, C, H, W]
        feed_idx = [(y == d).nonzero().flatten()[:200] for d in digits]  # up to 200 test images per digit
        feeders_by_digit = class_channel_to_channel(
            model,
            x[torch.cat(feed_idx)],
            torch.cat([torch.full((len(ix),), i) for i, ix in enumerate(feed_idx)]),
            source=LAYERS["conv1"],
            target_layer=POST["conv2"],
            n_classes=len(digits),
        )  # [digits, C2, C1]
        for i, d in enumerate(digits):
            sel_d = y == d
            full_acc, full_fp = rates(pred, y, d)
            held_acc, held_fp = rates(pred_held, y_held, d)

            def margin(keep: list[int], d=d, full_acc=full_acc, full_fp=full_fp) -> float:
                acc_d, fp_d = rates(kept_pred(contrib, keep), y, d)
                return min(acc_d - (full_acc - tolerance), (full_fp + tolerance) - fp_d)

            attribution = contrib[sel_d][:, :, d].mean(0)  # [C] each channel's pull on logit d vs its mean
            ranking = attribution.argsort(descending=True).tolist()
            circuit = C.find_circuit(margin, n_c2, ranking, target=d)
            chosen = circuit.channels
            # re-measure with hooked forward passes through the real model (not the closed form of the search)
            in_set = A.group_mask(c2_shape, chosen)
            ref = means[LAYERS["conv2"]]
            only_out = A.ablate(model, x, LAYERS["conv2"], ~in_set, "mean", ref, batch_size=batch_size)[0]
            without_out = A.ablate(model, x, LAYERS["conv2"], in_set, "mean", ref, batch_size=batch_size)[0]
            resampled_out = A.intervene(model, x, LAYERS["conv2"], in_set, a2_donor, batch_size=batch_size)[0]
            suff, fp = rates(only_out.argmax(1), y, d)
            nec, _ = rates(without_out.argmax(1), y, d)
            nec_resample, _ = rates(resampled_out.argmax(1), y, d)
            h_suff, h_fp = rates(kept_pred(contrib_held, chosen), y_held, d)
            growth = []
            for k in range(1, len(circuit.greedy_order) + 1):
                g_acc, g_fp = rates(kept_pred(contrib, circuit.greedy_order[:k]), y, d)
                growth.append({"size": k, "accuracy": g_acc, "other_digits_called_d": g_fp})
            feed = feeders_by_digit[i][chosen].sum(0)  # [C1] contribution of each conv1 channel to the set
            order = feed.abs().argsort(descending=True).tolist()
            total = float(feed.abs().sum()) or 1.0
            entry = circuit.to_dict()
            entry.pop("target")
            entry.update(
                digit=d,
                size=len(chosen),
                full_accuracy=full_acc,
                sufficiency=suff,
                necessity=nec,
                necessity_resample=nec_resample,
                other_digits_called_d_full_model=full_fp,
                other_digits_called_d_with_only_the_circuit=fp,
                meets_criterion=suff >= full_acc - tolerance and fp <= full_fp + tolerance,
                accuracy_criterion_met=suff >= full_acc - tolerance,
                per_class_accuracy_circuit_only=acc_reduce(only_out[None])[0].tolist(),
                per_class_accuracy_circuit_ablated=acc_reduce(without_out[None])[0].tolist(),
                per_class_accuracy_circuit_resampled=acc_reduce(resampled_out[None])[0].tolist(),
                held_out_full_accuracy=held_acc,
                held_out_sufficiency=h_suff,
                held_out_other_digits_called_d_full_model=held_fp,
                held_out_other_digits_called_d_with_only_the_circuit=h_fp,
                growth=growth,
                attribution=attribution.tolist(),
                readout_weight_to_digit=[float(w_view[d, c].sum()) for c in chosen],
                feeders=[
                    {"conv1_channel": c, "contribution": float(feed[c]), "share": float(feed[c].abs()) / total}
                    for c in order[:3]
                ],
                feeders_all=feed.tolist(),
            )
            circuits.append(entry)

    with timer.section("examples"):
        ex = FV.dataset_examples(model, x, list(POST.values()), k=8)
        examples = {}
        for key, name in POST.items():
            e = ex[name]
            n_units, k = e.top.shape
            idx = e.top.flatten()  # [U*k]
            xs = x[idx].clone().requires_grad_(True)
            unit = torch.arange(n_units).repeat_interleave(k)
            py, px = e.positions[..., 0].flatten(), e.positions[..., 1].flatten()
            with torch.enable_grad():
                _, cache = run_with_cache(model, xs, names=[name], grad=True)
                val = cache[name][torch.arange(len(idx)), unit, py, px]  # each row's own unit at its top position
                (g,) = torch.autograd.grad(val.sum(), xs)
            ixg = (xs.detach() * g)[:, 0].view(n_units, k, *x.shape[2:])  # input × gradient
            examples[key] = {
                "top_labels": y[e.top].tolist(),
                "boxes": [
                    [list(FV.receptive_field(model, name, int(py_), int(px_))) for py_, px_ in row]
                    for row in e.positions.tolist()
                ],
                "images": x[e.top][:, :, 0].numpy(),  # [U, k, 28, 28] (for the report, not the JSON)
                "input_x_gradient": ixg.numpy(),
            }

    with timer.section("linked outputs"):
        linked = _linked_outputs(Path(run))

    mechanisms = {
        "run": str(Path(run)),
        "test_images": len(y),
        "architecture": _architecture(model),
        "test_accuracy": test_acc,
        "per_class_accuracy": base_per_class.tolist(),
        "confusion_matrix": confusion.tolist(),
        "weights": weights,
        "ablation": ablation,
        "selectivity": selectivity,
        "patching": patching,
        "circuits": circuits,
        "settings": {
            "tolerance": tolerance,
            "circuit_criterion": "with only the circuit's conv2 channels (every other conv2 channel mean-ablated): "
            f"accuracy on the digit ≥ the full model's − {tolerance:g}, and the share of other digits' test images "
            f"labelled as the digit ≤ the full model's + {tolerance:g}",
            "circuit_layer": LAYERS["conv2"],
            "circuit_search": "attribution-ranked prefix and greedy forward selection, each pruned to 1-minimal; "
            "the smaller kept and shrunk by 2-for-1 swaps while one exists; searched with the closed-form read-out, "
            "verified with hooked forward passes",
            "necessity": "accuracy on the digit with the circuit's channels mean-ablated (the rest intact)",
            "necessity_resample": "accuracy on the digit with the circuit's channels replaced by their values on a "
            f"random test image of another digit (seed {RESAMPLE_SEED}); free of the mean's bias towards the class "
            "the mean activation is read as",
            "resample_seed": RESAMPLE_SEED,
            "held_out_check": f"training images {HELD_OUT[0]:,}-{HELD_OUT[1]:,} (not used for the means), closed form",
            "feeders": "conv1.hook_out → conv2.hook_post activation × gradient summed over the circuit's channels, "
            "mean over up to 200 test images of the digit",
        },
    }
    with timer.section("summary"):
        mechanisms["summary"] = summarise(mechanisms, linked)
    mechanisms["seconds"] = timer.seconds  # the report section adds itself after the page is written
    prepare_out_dir(out, force=force)
    with timer.section("report"):
        arrays = {
            "maps": maps,
            "examples": examples,
            "conv2_kernels": w2.numpy(),
            "clean_image": xc[0, 0].numpy(),
            "corrupted_image": xr[0, 0].numpy(),
        }
        write_report(mechanisms, arrays, linked, out / "report.html")
    write_json(out / "mechanisms.json", mechanisms)
    return out, mechanisms


def _architecture(model) -> list[dict]:
    cfg = model.config
    rows = [
        {"layer": "input", "shape": [1, cfg.image_size, cfg.image_size], "parameters": 0, "hook": "hook_input"},
    ]
    for name, block, size in (("conv1", model.conv1, cfg.conv1_size), ("conv2", model.conv2, cfg.conv2_size)):
        c = block.conv
        rows.append(
            {
                "layer": f"{name}: conv {c.in_channels}→{c.out_channels} {cfg.kernel_size}×{cfg.kernel_size}, ReLU",
                "shape": [c.out_channels, size, size],
                "parameters": sum(p.numel() for p in c.parameters()),
                "hook": f"{name}.hook_post",
            }
        )
        rows.append(
            {
                "layer": f"{name}: max-pool {cfg.pool}×{cfg.pool}",
                "shape": [c.out_channels, size // cfg.pool, size // cfg.pool],
                "parameters": 0,
                "hook": f"{name}.hook_out",
            }
        )
    rows.append(
        {
            "layer": f"read-out: linear {model.fc.in_features}→{model.fc.out_features}",
            "shape": [model.fc.out_features],
            "parameters": sum(p.numel() for p in model.fc.parameters()),
            "hook": "hook_logits",
        }
    )
    return rows


def _linked_outputs(run: Path) -> dict:
    """Outputs of `mnist visualize` and `mnist attribute` in their default places, when present."""
    linked: dict = {"featvis": None, "attribution": None}
    fv = run / "featvis"
    if (fv / "featvis.json").is_file():
        try:
            data = json.loads((fv / "featvis.json").read_text())
            units = {}
            for row in data.get("units", []):
                short = FV.short_layer_name(row["layer"])
                png = fv / "units" / f"{short}_{row['unit']}.png"
                if png.is_file():
                    units[f"{short}_{row['unit']}"] = {"png": png, **row}
            linked["featvis"] = {"dir": fv, "units": units, "summary": data.get("summary", {})}
        except (json.JSONDecodeError, KeyError, TypeError):
            log.warning("%s: unreadable featvis.json; the report leaves feature visualisation out", fv)
    at = run / "attribution"
    if (at / "faithfulness.json").is_file():
        try:
            data = json.loads((at / "faithfulness.json").read_text())
            pngs = {p.stem: p for p in sorted(at.glob("*.png"))}
            linked["attribution"] = {"dir": at, "ranking": data.get("ranking", []), "pngs": pngs}
        except json.JSONDecodeError:
            log.warning("%s: unreadable faithfulness.json; the report leaves attribution out", at)
    return linked


def _pts(v: float) -> str:
    return f"{100 * v:.1f}"


def _a(digit) -> str:
    return f"{'an' if int(digit) == 8 else 'a'} {digit}"


def summarise(m: dict, linked: dict) -> list[str]:
    """Sentences written from the numbers in ``m`` (each one is shown in a table of the report)."""
    lines = []
    n_c2 = len(m["selectivity"]["conv2"]["index"])
    conf = np.array(m["confusion_matrix"])
    errors = int(conf.sum() - np.trace(conf))
    off = conf.copy()
    np.fill_diagonal(off, 0)
    t, p = np.unravel_index(off.argmax(), off.shape)
    lines.append(
        f"Test accuracy {_pts(m['test_accuracy'])}% ({errors} errors in {int(conf.sum()):,}); the most common "
        f"confusion is {_a(t)} read as {_a(p)} ({int(off[t, p])} images)."
    )
    whole = m["ablation"]["whole_layer"]
    lines.append(
        f"Mean-ablating every channel of a layer leaves {_pts(whole['conv1']['mean']['test_accuracy'])}% (conv1) "
        f"and {_pts(whole['conv2']['mean']['test_accuracy'])}% (conv2) test accuracy; chance is 10%. "
        f"Zero-ablating them: {_pts(whole['conv1']['zero']['test_accuracy'])}% and "
        f"{_pts(whole['conv2']['zero']['test_accuracy'])}%."
    )
    mean_class = whole["conv2"]["mean"]["reads_as"]
    share = whole["conv2"]["mean"]["predicted_share"][mean_class]
    called = "every test image" if share >= 0.9995 else f"{_pts(share)}% of test images"
    lines.append(
        f"Mean-ablation is not neutral here: with every conv2 channel at its mean the network calls "
        f"{called} {_a(mean_class)} "
        f"(the mean conv2 map reads as {_a(mean_class)}), so mean-ablating conv2 channels pushes images towards "
        f"{mean_class} and cannot show that a channel is needed for the {mean_class}s. The circuits below also "
        "report resample-ablation (each image's channels taken from a random image of another digit), which "
        "has no such bias."
    )
    for key in ("conv1", "conv2"):
        layer = m["ablation"]["layers"][key]
        ov = np.array(layer["mean_overall"])
        c = int(ov.argmin())
        per = np.array(layer["mean"])
        worst_digit = np.unravel_index(per.argmin(), per.shape)
        lines.append(
            f"{key}: the costliest single channel to mean-ablate is channel {c} ({_pts(-ov[c])} points of test "
            f"accuracy); the largest cost to one digit is channel {worst_digit[0]} on digit {worst_digit[1]} "
            f"({_pts(-per[worst_digit])} points); {int((ov > -0.001).sum())} of {len(ov)} channels cost under 0.1 "
            "points each."
        )
    # specialised conv2 channels: one digit pays, the others do not
    sel = m["selectivity"]["conv2"]
    per = np.array(m["ablation"]["layers"]["conv2"]["mean"])  # [C, K]
    cost = -per
    specialists = []
    for c in range(cost.shape[0]):
        d = int(cost[c].argmax())
        rest = np.delete(cost[c], d).max()
        if cost[c, d] >= 0.005:
            specialists.append((cost[c, d], c, d, rest))
    for value, c, d, rest in sorted(specialists, reverse=True)[:3]:
        lines.append(
            f"conv2 channel {c} is most active on digit {sel['preferred_class'][c]} (selectivity "
            f"{sel['index'][c]:.2f}), mostly in the {sel['region_on_preferred_class'][c]} of the image; "
            f"mean-ablating it costs digit {d} {_pts(value)} points and no other digit more than {_pts(max(rest, 0))}."
        )
    circ = m["circuits"]
    if circ:
        sizes = [c["size"] for c in circ]
        met = sum(c["meets_criterion"] for c in circ)
        small, large = circ[int(np.argmin(sizes))], circ[int(np.argmax(sizes))]
        lines.append(
            f"Per-digit circuits in conv2: {met} of {len(circ)} meet the criterion (with every other channel "
            f"mean-ablated, the digit's accuracy within {_pts(m['settings']['tolerance'])} points of the full model's "
            "and other digits not called that digit more often than by the full model, within the same margin; "
            "no channel can be dropped and no two traded for one). Sizes run from "
            f"{small['size']} channels (digit {small['digit']}) to {large['size']} (digit {large['digit']}), "
            f"mean {np.mean(sizes):.1f} of {n_c2}."
        )
        for c in circ:
            f0 = c["feeders"][0] if c["feeders"] else None
            lines.append(
                f"Digit {c['digit']}: conv2 channels {', '.join(map(str, c['channels']))} alone keep "
                f"{_pts(c['sufficiency'])}% (full model {_pts(c['full_accuracy'])}%); mean-ablating just them leaves "
                f"{_pts(c['necessity'])}%, resample-ablating them {_pts(c['necessity_resample'])}%; with only them, "
                f"{_pts(c['other_digits_called_d_with_only_the_circuit'])}% "
                f"of other digits are called {c['digit']} (full model {_pts(c['other_digits_called_d_full_model'])}%)."
                + (
                    f" Their strongest conv1 input is channel {f0['conv1_channel']} "
                    f"({100 * f0['share']:.0f}% of the total)."
                    if f0
                    else ""
                )
            )
        resampled = [c["necessity_resample"] for c in circ]
        meaned = [c["necessity"] for c in circ]
        lower = sum(r < mn for r, mn in zip(resampled, meaned, strict=True))
        verdict = (
            ": by this measure mean-ablation understates how much the digits need their circuits"
            if 2 * lower > len(circ)
            else ""
        )
        lines.append(
            f"Resample-ablating a circuit leaves its digit less accuracy than mean-ablating it for {lower} of "
            f"{len(circ)} digits (median {_pts(float(np.median(resampled)))}% against "
            f"{_pts(float(np.median(meaned)))}%){verdict}."
        )
        c = next((c for c in circ if c["digit"] == mean_class), None)
        if c is not None:
            lines.append(
                f"For the {mean_class}s, the digit the mean reads as, the circuit's job is mostly to say "
                f'"not {mean_class}": with every conv2 channel mean-ablated the network calls {called} '
                f"{_a(mean_class)}; keeping the circuit's {c['size']} channels brings that down to "
                f"{_pts(c['other_digits_called_d_with_only_the_circuit'])}% of the other digits."
            )
        shared = C.circuit_membership(circ)
        ch, ds = max(shared.items(), key=lambda kv: (len(kv[1]), -kv[0]))
        lines.append(
            f"conv2 channel {ch} is in the most circuits ({len(ds)}: digits {', '.join(map(str, ds))}); "
            f"{n_c2 - len(shared)} of {n_c2} channels are in none."
        )
    pt = m["patching"]
    u = pt["conv2"]["top_units"][0]
    ch2 = np.array(pt["conv2"]["channel_mean"])
    best = int(np.abs(ch2).argmax())
    lines.append(
        f"Patching from {_a(pt['clean_class'])} into {_a(pt['corrupted_class'])} ({pt['pairs']} pairs): the single "
        f"conv2 unit that moves the logit difference most is channel {u['channel']} at ({u['y']}, {u['x']}) "
        f"({100 * u['recovered']:.0f}% of the gap on average); the strongest whole channel is {best} "
        f"({100 * ch2[best]:.0f}%)."
    )
    fv = linked.get("featvis")
    if fv and fv.get("summary"):
        s = fv["summary"]
        lines.append(
            f"Feature visualisation (from {fv['dir']}): {s.get('exceed_dataset_max')} of {s.get('units')} units "
            "reach a higher activation than any test image."
        )
    return lines
