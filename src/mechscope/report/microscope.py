"""The microscope report for the MNIST CNN: figures and one self-contained HTML page.

Draws what pipelines/explain.py measured; computes nothing new. Every figure is inlined as a
base64 PNG, so the page opens offline.
"""

from __future__ import annotations

import base64
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from mechscope.methods.circuits import circuit_membership  # noqa: E402
from mechscope.report.html import figure_data_uri, render  # noqa: E402

DPI = 80


def tile(arr: np.ndarray, cols: int, pad: int = 1) -> np.ndarray:
    """[N, h, w] -> one image of ``cols`` columns, NaN between tiles (drawn as background)."""
    n, h, w = arr.shape
    rows = -(-n // cols)
    out = np.full((rows * (h + pad) - pad, cols * (w + pad) - pad), np.nan)
    for i in range(n):
        r, c = divmod(i, cols)
        out[r * (h + pad) : r * (h + pad) + h, c * (w + pad) : c * (w + pad) + w] = arr[i]
    return out


def _sym(a: np.ndarray) -> float:
    m = float(np.nanmax(np.abs(a))) if np.isfinite(a).any() else 0.0
    return m if m > 0 else 1.0


def _clean(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


def _cmap(name: str):
    """The named colour map with NaN (the gaps between tiles) drawn light grey."""
    return plt.get_cmap(name).with_extremes(bad="#f4f4f4")


def uri_of_file(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


# ---- overview figures ----------------------------------------------------------------------


def confusion_fig(conf: np.ndarray) -> str:
    k = conf.shape[0]
    off = conf.astype(float).copy()
    np.fill_diagonal(off, np.nan)
    fig, ax = plt.subplots(figsize=(4.6, 4.0), layout="constrained")
    im = ax.imshow(off, cmap=_cmap("Reds"))
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(conf[i, j]), ha="center", va="center", fontsize=6.5, color="black")
    ax.set_xticks(range(k))
    ax.set_yticks(range(k))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion matrix (colour: errors only)", fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.8)
    return figure_data_uri(fig, DPI)


def filters_fig(w1: np.ndarray) -> str:
    n = len(w1)
    cols = 8
    rows = -(-n // cols)
    vmax = _sym(w1)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.9, rows * 1.05 + 0.3), squeeze=False, layout="constrained")
    for i, ax in enumerate(axes.flat):
        _clean(ax)
        if i < n:
            ax.imshow(w1[i], cmap="RdBu_r", vmin=-vmax, vmax=vmax)
            ax.set_title(f"ch {i}", fontsize=7)
        else:
            ax.axis("off")
    fig.suptitle("conv1 filters (red: weights for bright pixels, blue: against; one colour scale)", fontsize=8)
    return figure_data_uri(fig, DPI)


def connections_fig(norm: np.ndarray, ssum: np.ndarray) -> str:
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 6.2), layout="constrained")
    im = a.imshow(norm, cmap="viridis", aspect="auto")
    a.set_title("kernel norm ‖W[conv2 c, conv1 i]‖", fontsize=9)
    fig.colorbar(im, ax=a, shrink=0.7)
    v = _sym(ssum)
    im = b.imshow(ssum, cmap="RdBu_r", vmin=-v, vmax=v, aspect="auto")
    b.set_title("signed sum of the 5×5 kernel (excites + / inhibits −)", fontsize=9)
    fig.colorbar(im, ax=b, shrink=0.7)
    for ax in (a, b):
        ax.set_xlabel("conv1 channel")
        ax.set_ylabel("conv2 channel")
        ax.set_xticks(range(norm.shape[1]))
        ax.set_yticks(range(norm.shape[0]))
        ax.tick_params(labelsize=6)
    return figure_data_uri(fig, DPI)


def templates_fig(templates: np.ndarray, class_channel: np.ndarray) -> str:
    """templates [K, C, H, W]: each class's read-out weights, channels tiled 8 per row."""
    k, c, h, w = templates.shape
    vmax = _sym(templates)
    fig = plt.figure(figsize=(11, 5.0), layout="constrained")
    gs = fig.add_gridspec(3, 5, height_ratios=[0.8, 0.8, 1.3])
    for d in range(k):
        ax = fig.add_subplot(gs[d // 5, d % 5])
        ax.imshow(tile(templates[d], 8), cmap=_cmap("RdBu_r"), vmin=-vmax, vmax=vmax)
        ax.set_title(f"digit {d}", fontsize=8)
        _clean(ax)
    ax = fig.add_subplot(gs[2, :])
    v = _sym(class_channel)
    im = ax.imshow(class_channel, cmap="RdBu_r", vmin=-v, vmax=v, aspect="auto")
    ax.set_xlabel("conv2 channel")
    ax.set_ylabel("digit")
    ax.set_xticks(range(c))
    ax.set_yticks(range(k))
    ax.tick_params(labelsize=6)
    ax.set_title(f"read-out weights summed over each channel's {h}×{w} positions", fontsize=8)
    fig.colorbar(im, ax=ax, shrink=0.9)
    fig.suptitle(
        f"read-out templates: per digit, the weight on each conv2 channel's {h}×{w} map (0-{c - 1}, 8 per row)",
        fontsize=9,
    )
    return figure_data_uri(fig, DPI)


def ablation_fig(layers: dict, kind: str) -> str:
    """Heat maps of the accuracy change (points) per channel and digit for conv1 and conv2."""
    c1, c2 = np.array(layers["conv1"][kind]) * 100, np.array(layers["conv2"][kind]) * 100
    v = max(_sym(c1), _sym(c2))
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 7.2), layout="constrained", gridspec_kw={"width_ratios": [1, 1]})
    for ax, mat, name in ((axes[0], c1, "conv1"), (axes[1], c2, "conv2")):
        im = ax.imshow(mat, cmap="RdBu", vmin=-v, vmax=v, aspect="auto")
        for i in range(mat.shape[0]):
            for j in range(mat.shape[1]):
                if abs(mat[i, j]) >= 0.5:
                    ax.text(j, i, f"{mat[i, j]:.0f}", ha="center", va="center", fontsize=5.5)
        ax.set_xlabel("digit")
        ax.set_ylabel(f"{name} channel")
        ax.set_xticks(range(mat.shape[1]))
        ax.set_yticks(range(mat.shape[0]))
        ax.tick_params(labelsize=6)
        ax.set_title(f"{name}: {kind}-ablating one channel", fontsize=9)
    fig.colorbar(im, ax=axes, shrink=0.6, label="change in the digit's test accuracy (points)")
    return figure_data_uri(fig, DPI)


def readout_ablation_fig(per_unit: np.ndarray, shape: tuple[int, int, int], kind: str) -> str:
    """per_unit [C*H*W, K] accuracy change: one panel per digit, channels tiled as in the templates."""
    k = per_unit.shape[1]
    maps = per_unit.T.reshape(k, *shape) * 100  # [K, C, H, W]
    v = _sym(maps)
    fig, axes = plt.subplots(2, 5, figsize=(11, 3.6), layout="constrained")
    for d, ax in enumerate(axes.flat):
        im = ax.imshow(tile(maps[d], 8), cmap=_cmap("RdBu"), vmin=-v, vmax=v)
        ax.set_title(f"digit {d}", fontsize=8)
        _clean(ax)
    fig.colorbar(im, ax=axes, shrink=0.8, label="points")
    fig.suptitle(
        f"{kind}-ablating one read-out input (conv2 channel × {shape[1]}×{shape[2]} position), tiled as in the "
        "templates",
        fontsize=9,
    )
    return figure_data_uri(fig, DPI)


def selectivity_fig(sel: dict, name: str) -> str:
    means = np.array(sel["class_means"])  # [C, K]
    order = sel["order"]
    norm = means / np.maximum(means.max(1, keepdims=True), 1e-12)
    fig, ax = plt.subplots(figsize=(4.8, 0.19 * len(order) + 1.2), layout="constrained")
    im = ax.imshow(norm[order], cmap="magma", aspect="auto", vmin=0, vmax=1)
    ax.set_yticks(range(len(order)))
    ax.set_yticklabels([f"ch {c}  sel {sel['index'][c]:.2f}" for c in order], fontsize=6.5)
    ax.set_xticks(range(means.shape[1]))
    ax.set_xlabel("digit")
    ax.set_title(f"{name}: mean activation per digit (÷ the channel's max),\ngrouped by preferred digit", fontsize=8)
    fig.colorbar(im, ax=ax, shrink=0.7)
    return figure_data_uri(fig, DPI)


def patching_fig(pt: dict, clean_img: np.ndarray, corrupt_img: np.ndarray) -> str:
    c1 = np.array(pt["conv1"]["position_mean"]) * 100
    c2 = np.array(pt["conv2"]["position_mean"]) * 100
    fig = plt.figure(figsize=(11, 5.4), layout="constrained")
    gs = fig.add_gridspec(2, 4, width_ratios=[0.5, 1.5, 0.8, 1.4])
    for r, (img, title) in enumerate(
        ((clean_img, f"a {pt['clean_class']} (clean)"), (corrupt_img, f"a {pt['corrupted_class']} (corrupted)"))
    ):
        ax = fig.add_subplot(gs[r, 0])
        ax.imshow(img, cmap="gray", vmin=0, vmax=1)
        ax.set_title(title + "\nfirst pair", fontsize=7)
        _clean(ax)
    for col, (layer, maps) in enumerate((("conv1", c1), ("conv2", c2)), start=1):
        v = _sym(maps)
        ax = fig.add_subplot(gs[:, col])
        im = ax.imshow(tile(maps, 4), cmap=_cmap("RdBu_r"), vmin=-v, vmax=v)
        ax.set_title(
            f"one {layer} unit patched\n({maps.shape[0]} channels × {maps.shape[1]}×{maps.shape[2]}, 4 per row)",
            fontsize=8,
        )
        _clean(ax)
        fig.colorbar(im, ax=ax, shrink=0.8, orientation="horizontal", pad=0.03, label="% of the gap")
    ax = fig.add_subplot(gs[:, 3])
    ch = np.array(pt["conv2"]["channel_mean"]) * 100
    sd = np.array(pt["conv2"]["channel_std"]) * 100
    ax.barh(range(len(ch)), ch, xerr=sd, color=["#d95f02" if v > 0 else "#7570b3" for v in ch], error_kw={"lw": 0.6})
    ax.set_yticks(range(len(ch)))
    ax.tick_params(labelsize=6)
    ax.invert_yaxis()
    ax.set_xlabel("% of the gap (mean ± sd over pairs)")
    ax.set_title("patching a whole conv2 channel", fontsize=8)
    fig.suptitle(
        f"Activation patching: run a {pt['corrupted_class']}, take one unit from the paired {pt['clean_class']}; "
        f"how much of the logit({pt['clean_class']}) − logit({pt['corrupted_class']}) gap comes back "
        f"(mean over {pt['pairs']} pairs)",
        fontsize=9,
    )
    return figure_data_uri(fig, DPI)


def circuits_fig(circuits: list[dict], n_channels: int) -> str:
    fig, (a, b, c) = plt.subplots(
        1, 3, figsize=(13, 3.8), layout="constrained", gridspec_kw={"width_ratios": [1.1, 1.2, 1.6]}
    )
    for ci in circuits:
        g = ci["growth"]
        a.plot([p["size"] for p in g], [100 * p["accuracy"] for p in g], marker=".", label=str(ci["digit"]))
    a.set_xlabel("channels kept (greedy order)")
    a.set_ylabel("digit accuracy, others mean-ablated (%)")
    a.set_title("greedy growth (before pruning)", fontsize=8)
    a.legend(fontsize=6, ncol=2, title="digit", title_fontsize=6)
    a.grid(alpha=0.3)
    ds = [ci["digit"] for ci in circuits]
    xs = np.arange(len(ds))
    bars = (
        ("full_accuracy", "full model", "#999"),
        ("sufficiency", "only the circuit", "#1b9e77"),
        ("necessity", "circuit mean-ablated", "#d95f02"),
        ("necessity_resample", "circuit resample-ablated", "#7570b3"),
    )
    w = 0.21
    for j, (key, label, colour) in enumerate(bars):
        b.bar(xs + (j - 1.5) * w, [ci[key] * 100 for ci in circuits], w, label=label, color=colour)
    for x_, ci in zip(xs, circuits, strict=True):
        b.text(x_, 101, str(ci["size"]), ha="center", fontsize=6)
    b.set_xticks(xs)
    b.set_xticklabels(ds)
    b.set_ylim(0, 108)
    b.set_xlabel("digit (number above: channels in its circuit)")
    b.set_ylabel("test accuracy on the digit (%)")
    b.set_title("sufficiency and necessity", fontsize=8)
    b.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)  # below: the bars fill the axes
    member = np.full((len(circuits), n_channels), np.nan)
    for i, ci in enumerate(circuits):
        att = np.array(ci["attribution"])
        for ch in ci["channels"]:
            member[i, ch] = att[ch]
    v = _sym(member)
    im = c.imshow(member, cmap=_cmap("RdBu_r"), vmin=-v, vmax=v, aspect="auto")
    c.set_yticks(range(len(ds)))
    c.set_yticklabels(ds)
    c.set_xticks(range(n_channels))
    c.tick_params(labelsize=6)
    c.set_xlabel("conv2 channel")
    c.set_ylabel("digit")
    c.set_title("circuit membership (colour: the channel's mean contribution to the digit's logit)", fontsize=8)
    fig.colorbar(im, ax=c, shrink=0.8)
    return figure_data_uri(fig, DPI)


def digit_circuit_fig(ci: dict, maps_d: np.ndarray, templates_d: np.ndarray) -> str:
    """One digit's circuit: each channel's mean map on the digit and read-out weights to it; per-digit accuracy."""
    chans = ci["channels"]
    n = len(chans)
    fig = plt.figure(figsize=(11, 3.3))
    gs = fig.add_gridspec(2, n + 4, left=0.03, right=0.99, top=0.82, bottom=0.12, wspace=0.25, hspace=0.35)
    vmap = max(float(maps_d[chans].max()), 1e-12)
    vt = _sym(templates_d[chans])
    for j, c in enumerate(chans):
        ax = fig.add_subplot(gs[0, j])
        ax.imshow(maps_d[c], cmap="magma", vmin=0, vmax=vmap)
        ax.set_title(f"ch {c}", fontsize=7)
        _clean(ax)
        ax = fig.add_subplot(gs[1, j])
        ax.imshow(templates_d[c], cmap="RdBu_r", vmin=-vt, vmax=vt)
        _clean(ax)
    fig.text(
        0.03,
        0.86,
        f"mean activation on the {ci['digit']}s (top) and read-out weights to {ci['digit']} (bottom)",
        fontsize=7,
    )
    ax = fig.add_subplot(gs[:, n + 1 :])
    xs = np.arange(len(ci["per_class_accuracy_circuit_only"]))
    bars = (
        ("per_class_accuracy_circuit_only", "circuit only", "#1b9e77"),
        ("per_class_accuracy_circuit_ablated", "mean-ablated", "#d95f02"),
        ("per_class_accuracy_circuit_resampled", "resampled", "#7570b3"),
    )
    for j, (key, label, colour) in enumerate(bars):
        ax.bar(xs + (j - 1) * 0.28, np.array(ci[key]) * 100, 0.28, label=label, color=colour)
    ax.set_xticks(xs)
    ax.set_ylim(0, 128)  # headroom for the legend above the bars
    ax.set_yticks(range(0, 101, 20))
    ax.tick_params(labelsize=7)
    ax.set_xlabel("digit", fontsize=7)
    ax.set_title("test accuracy per digit (%)", fontsize=8)
    ax.legend(fontsize=6, loc="upper center", ncol=3, handlelength=1, columnspacing=0.6)
    fig.suptitle(f"digit {ci['digit']}: {n} conv2 channels", fontsize=9, x=0.03, ha="left")
    return figure_data_uri(fig, DPI)


# ---- one figure per channel ----------------------------------------------------------------


def channel_fig(
    layer: str,
    c: int,
    weights_img: np.ndarray,
    weights_title: str,
    template: np.ndarray | None,
    mean_map: np.ndarray,
    profile: np.ndarray,
    ablation: dict[str, np.ndarray],
    examples: np.ndarray,
    labels: list[int],
    boxes: list[list[int]],
    ixg: np.ndarray,
) -> str:
    n_top = 5 if template is not None else 4
    fig = plt.figure(figsize=(11, 4.6))
    gs = fig.add_gridspec(
        3, n_top, height_ratios=[1.25, 0.8, 0.8], hspace=0.45, wspace=0.35, left=0.04, right=0.99, top=0.9, bottom=0.03
    )
    ax = fig.add_subplot(gs[0, 0])
    v = _sym(weights_img)
    ax.imshow(weights_img, cmap=_cmap("RdBu_r"), vmin=-v, vmax=v)
    ax.set_title(weights_title, fontsize=7)
    _clean(ax)
    col = 1
    if template is not None:
        ax = fig.add_subplot(gs[0, col])
        v = _sym(template)
        ax.imshow(tile(template, 5), cmap=_cmap("RdBu_r"), vmin=-v, vmax=v)
        ax.set_title("read-out weights to digits 0-4 / 5-9", fontsize=7)
        _clean(ax)
        col += 1
    ax = fig.add_subplot(gs[0, col])
    ax.imshow(mean_map, cmap="magma")
    ax.set_title(f"mean activation on digit {int(profile.argmax())}", fontsize=7)
    _clean(ax)
    ax = fig.add_subplot(gs[0, col + 1])
    ax.bar(range(len(profile)), profile, color="#555")
    ax.set_xticks(range(len(profile)))
    ax.tick_params(labelsize=6)
    ax.set_title("mean activation per digit", fontsize=7)
    ax = fig.add_subplot(gs[0, col + 2])
    xs = np.arange(len(profile))
    ax.bar(xs - 0.2, ablation["zero"] * 100, 0.4, label="zero", color="#7570b3")
    ax.bar(xs + 0.2, ablation["mean"] * 100, 0.4, label="mean", color="#d95f02")
    ax.axhline(0, color="black", lw=0.5)
    ax.set_xticks(xs)
    ax.tick_params(labelsize=6)
    ax.set_title("ablation: Δ accuracy (points)", fontsize=7)
    ax.legend(fontsize=5.5, loc="lower left")
    k = len(examples)
    ax = fig.add_subplot(gs[1, :])
    ax.imshow(tile(examples, k, pad=2), cmap=_cmap("gray"), vmin=0, vmax=1)
    h, w = examples.shape[1:]
    for j, (y0, y1, x0, x1) in enumerate(boxes):
        ax.add_patch(Rectangle((j * (w + 2) + x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, ec="#ff7f0e", lw=1))
        ax.text(j * (w + 2) + 1, 3, str(labels[j]), color="#ffdd55", fontsize=7, va="center")
    ax.set_title(
        "top test images (orange: receptive field of the most active position; yellow: label)", fontsize=7, loc="left"
    )
    _clean(ax)
    ax = fig.add_subplot(gs[2, :])
    v = _sym(ixg)
    ax.imshow(tile(ixg, k, pad=2), cmap=_cmap("RdBu_r"), vmin=-v, vmax=v)
    ax.set_title("input × gradient of that activation (red: pixels that raise it)", fontsize=7, loc="left")
    _clean(ax)
    fig.suptitle(f"{layer} channel {c}", fontsize=10, x=0.04, ha="left")
    return figure_data_uri(fig, DPI)


# ---- the page ------------------------------------------------------------------------------


def write_report(m: dict, arrays: dict, linked: dict, out: Path) -> Path:
    """Render report.html from the measurements of :func:`mechscope.pipelines.explain.explain_mnist`.

    ``arrays`` holds what is drawn but not kept in the JSON: "maps" (per-digit mean activation
    maps per layer [K, C, H, W]), "examples" (per layer: top images, labels, boxes, input ×
    gradient), "conv2_kernels" [32, 16, 5, 5], "clean_image" and "corrupted_image" [28, 28].
    """
    maps, examples = arrays["maps"], arrays["examples"]
    w = m["weights"]
    w1 = np.array(w["conv1_filters"])  # [16, 5, 5]
    norm = np.array(w["conv1_to_conv2_kernel_norm"])  # [32, 16]
    ssum = np.array(w["conv1_to_conv2_kernel_sum"])
    templates = np.array(w["readout_templates"])  # [K, 32, 4, 4]
    abl = m["ablation"]["layers"]
    figs = {
        "confusion": confusion_fig(np.array(m["confusion_matrix"])),
        "filters": filters_fig(w1),
        "connections": connections_fig(norm, ssum),
        "templates": templates_fig(templates, np.array(w["readout_class_channel_sum"])),
        "ablation_mean": ablation_fig(abl, "mean"),
        "ablation_zero": ablation_fig(abl, "zero"),
        "readout_mean": readout_ablation_fig(np.array(abl["readout"]["mean"]), templates.shape[1:], "mean"),
        "selectivity_conv1": selectivity_fig(m["selectivity"]["conv1"], "conv1"),
        "selectivity_conv2": selectivity_fig(m["selectivity"]["conv2"], "conv2"),
    }
    pt = m["patching"]
    figs["patching"] = patching_fig(pt, arrays["clean_image"], arrays["corrupted_image"])
    if m["circuits"]:
        figs["circuits"] = circuits_fig(m["circuits"], norm.shape[0])
    digit_figs = {
        ci["digit"]: digit_circuit_fig(ci, maps["conv2"][ci["digit"]].numpy(), templates[ci["digit"]])
        for ci in m["circuits"]
    }

    circuits_of = circuit_membership(m["circuits"])
    fv = linked.get("featvis") or {}
    sections = []
    for layer in ("conv1", "conv2"):
        sel = m["selectivity"][layer]
        ex = examples[layer]
        n_ch = len(sel["index"])
        for c in range(n_ch):
            profile = np.array(sel["class_means"][c])
            zero = np.array(abl[layer]["zero"][c])
            mean = np.array(abl[layer]["mean"][c])
            if layer == "conv1":
                wimg, wtitle, tmpl = w1[c], "5×5 filter", None
                strongest = np.argsort(-norm[:, c])[:5]
                links = [
                    {"layer": "conv2", "channel": int(j), "norm": float(norm[j, c]), "sum": float(ssum[j, c])}
                    for j in strongest
                ]
            else:
                wimg = tile(arrays["conv2_kernels"][c], 8)
                wtitle = "incoming 5×5 kernels from conv1 channels 0-15"
                tmpl = templates[:, c]  # [K, 4, 4]
                strongest = np.argsort(-norm[c])[:5]
                links = [
                    {"layer": "conv1", "channel": int(i), "norm": float(norm[c, i]), "sum": float(ssum[c, i])}
                    for i in strongest
                ]
            fig = channel_fig(
                layer,
                c,
                wimg,
                wtitle,
                tmpl,
                maps[layer][int(profile.argmax()), c].numpy(),
                profile,
                {"zero": zero, "mean": mean},
                ex["images"][c],
                ex["top_labels"][c],
                ex["boxes"][c],
                ex["input_x_gradient"][c],
            )
            unit = fv.get("units", {}).get(f"{layer}_{c}")
            sections.append(
                {
                    "id": f"{layer}-{c}",
                    "layer": layer,
                    "channel": c,
                    "figure": fig,
                    "featvis": uri_of_file(unit["png"]) if unit else None,
                    "featvis_ratio": unit.get("ratio_to_dataset_max") if unit else None,
                    "preferred": int(profile.argmax()),
                    "selectivity": sel["index"][c],
                    "region": sel["region_on_preferred_class"][c],
                    "profile": profile.tolist(),
                    "zero": (zero * 100).tolist(),
                    "mean": (mean * 100).tolist(),
                    "zero_overall": abl[layer]["zero_overall"][c] * 100,
                    "mean_overall": abl[layer]["mean_overall"][c] * 100,
                    "links": links,
                    "circuits": circuits_of.get(c, []) if layer == "conv2" else [],
                    "patching": pt[layer]["channel_mean"][c] * 100,
                }
            )
    at = linked.get("attribution")
    attribution = None
    if at:
        shown = [name for name in at["ranking"][:2] if name in at["pngs"]]
        attribution = {
            "dir": str(at["dir"]),
            "ranking": at["ranking"],
            "figures": [(name, uri_of_file(at["pngs"][name])) for name in shown],
        }
    return render(
        "microscope.html.j2",
        out,
        m=m,
        figs=figs,
        sections=sections,
        digit_figs=digit_figs,
        attribution=attribution,
        featvis=({"dir": str(fv["dir"]), "summary": fv.get("summary", {})} if fv else None),
        seconds=m.get("seconds", {}),
    )
