"""Figures of the microscope report, each drawn from a result object (numbers in, PNG data URI out).

Every function takes the typed result it draws (or arrays from it) and class names, builds a
:class:`matplotlib.figure.Figure` without pyplot (no global backend, no process-wide state) and
returns it inlined as a ``data:image/png;base64`` URI, so the page opens offline and a result's
``_repr_html_`` can call the same function.
"""

from __future__ import annotations

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator

from mechscope.cnn.report.summary import article, noun, plural
from mechscope.core.render.figures import text_colour
from mechscope.core.render.html import counted, figure_data_uri

DPI = 80


def uri(fig: Figure, dpi: int = DPI) -> str:
    """The figure as a PNG data URI at the microscope report's resolution."""
    return figure_data_uri(fig, dpi)


def cmap(name: str):
    """The named colour map with NaN (the gaps between tiles) drawn light grey."""
    return matplotlib.colormaps[name].with_extremes(bad="#f4f4f4")


def tile(arr: np.ndarray, cols: int, pad: int = 1) -> np.ndarray:
    """[N, h, w] -> one image of ``cols`` columns, NaN between tiles (drawn as background)."""
    n, h, w = arr.shape
    cols = max(1, min(cols, n))
    rows = -(-n // cols)
    out = np.full((rows * (h + pad) - pad, cols * (w + pad) - pad), np.nan)
    for i in range(n):
        r, c = divmod(i, cols)
        out[r * (h + pad) : r * (h + pad) + h, c * (w + pad) : c * (w + pad) + w] = arr[i]
    return out


def sym(a) -> float:
    a = np.asarray(a, dtype=float)
    m = float(np.nanmax(np.abs(a))) if np.isfinite(a).any() else 0.0
    return m if m > 0 else 1.0


def clean(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


def as_image(img, vrange: tuple[float, float]) -> tuple[np.ndarray, dict]:
    """An input image [C, H, W] as imshow arguments: grey for one channel, RGB scaled into [0, 1] for three."""
    img = np.asarray(img, dtype=float)
    lo, hi = vrange
    if img.shape[0] == 1:
        return img[0], {"cmap": "gray", "vmin": lo, "vmax": hi}
    return np.clip((img.transpose(1, 2, 0) - lo) / max(hi - lo, 1e-12), 0, 1), {}


def class_ticks(ax, names, axis: str = "x", rotate: bool | None = None) -> None:
    n = len(names)
    long = rotate if rotate is not None else (max(len(s) for s in names) > 2 or n > 12)
    size = 6 if n <= 20 else 4.5
    if axis == "x":
        ax.set_xticks(range(n))
        ax.set_xticklabels(names, fontsize=size, rotation=60 if long else 0, ha="right" if long else "center")
    else:
        ax.set_yticks(range(n))
        ax.set_yticklabels(names, fontsize=size)


# ---- overview --------------------------------------------------------------------------------


def confusion_fig(conf: np.ndarray, names) -> str:
    k = conf.shape[0]
    off = conf.astype(float).copy()
    np.fill_diagonal(off, np.nan)
    fig = Figure(figsize=(max(4.6, 0.3 * k + 1.5), max(4.0, 0.3 * k + 1.2)), layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(off, cmap=cmap("Reds"), vmin=0, vmax=max(1.0, float(np.nanmax(off)) if k > 1 else 1.0))
    if k <= 15:
        for i in range(k):
            for j in range(k):
                ax.text(j, i, str(conf[i, j]), ha="center", va="center", fontsize=6.5, color="black")
    class_ticks(ax, names, "x")
    class_ticks(ax, names, "y")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion matrix (colour: errors only)", fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.8)
    return uri(fig)


def filters_fig(w: np.ndarray, stage: str) -> str:
    """The first stage's filters [C, C_in, k, k]: one colour scale (grey input) or as RGB (colour input)."""
    n, c_in = w.shape[:2]
    cols = 8
    rows = -(-n // cols)
    vmax = sym(w)
    fig = Figure(figsize=(cols * 0.9, rows * 1.05 + 0.3), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for i, ax in enumerate(axes.flat):
        clean(ax)
        if i >= n:
            ax.axis("off")
        elif c_in == 1:
            ax.imshow(w[i, 0], cmap="RdBu_r", vmin=-vmax, vmax=vmax)
        else:
            ax.imshow(np.clip(0.5 + w[i, :3].transpose(1, 2, 0) / (2 * vmax), 0, 1))
        if i < n:
            ax.set_title(f"ch {i}", fontsize=7)
    text = "red: weights for bright pixels, blue: against" if c_in == 1 else "grey 0, colour: the weight per channel"
    fig.suptitle(f"{stage} filters ({text}; one scale)", fontsize=8)
    return uri(fig)


def connections_fig(conn) -> str:
    norm, ssum = conn.kernel_norm.numpy(), conn.kernel_sum.numpy()
    fig = Figure(figsize=(9, max(3.5, 0.17 * norm.shape[0] + 1.2)), layout="constrained")
    a, b = fig.subplots(1, 2)
    im = a.imshow(norm, cmap="viridis", aspect="auto")
    a.set_title(f"kernel norm ‖W[{conn.target} c, {conn.source} i]‖", fontsize=9)
    fig.colorbar(im, ax=a, shrink=0.7)
    v = sym(ssum)
    im = b.imshow(ssum, cmap="RdBu_r", vmin=-v, vmax=v, aspect="auto")
    b.set_title("signed sum of the kernel (excites + / inhibits −)", fontsize=9)
    fig.colorbar(im, ax=b, shrink=0.7)
    for ax in (a, b):
        ax.set_xlabel(f"{conn.source} channel")
        ax.set_ylabel(f"{conn.target} channel")
        ax.set_xticks(range(norm.shape[1]))
        ax.set_yticks(range(norm.shape[0]))
        ax.tick_params(labelsize=5.5)
    return uri(fig)


def _grid(n: int, cols: int = 5) -> tuple[int, int]:
    cols = min(cols, n)
    return -(-n // cols), cols


def templates_fig(templates: np.ndarray, class_channel: np.ndarray, names, stage: str) -> str:
    """templates [K, C, H, W]: each class's read-out weights, channels tiled 8 per row."""
    k, c, h, w = templates.shape
    vmax = sym(templates)
    rows, cols = _grid(k)
    fig = Figure(figsize=(11, 1.2 * rows + 2.4), layout="constrained")
    gs = fig.add_gridspec(rows + 1, cols, height_ratios=[0.8] * rows + [1.3])
    for d in range(k):
        ax = fig.add_subplot(gs[d // cols, d % cols])
        ax.imshow(tile(templates[d], 8), cmap=cmap("RdBu_r"), vmin=-vmax, vmax=vmax)
        ax.set_title(str(names[d]), fontsize=8)
        clean(ax)
    ax = fig.add_subplot(gs[rows, :])
    v = sym(class_channel)
    im = ax.imshow(class_channel, cmap="RdBu_r", vmin=-v, vmax=v, aspect="auto")
    ax.set_xlabel(f"{stage} channel")
    ax.set_xticks(range(c))
    class_ticks(ax, names, "y")
    ax.tick_params(labelsize=6)
    ax.set_title(f"read-out weights summed over each channel's {h}×{w} positions", fontsize=8)
    fig.colorbar(im, ax=ax, shrink=0.9)
    fig.suptitle(
        f"read-out templates: per class, the weight on each {stage} channel's {h}×{w} map (0-{c - 1}, 8 per row)",
        fontsize=9,
    )
    return uri(fig)


# ---- ablation, selectivity, patching ----------------------------------------------------------


PRINT_MIN = 0.5  # points: the ablation matrices print a cell's number where |change| ≥ this (the caption says so)


def points_text(v: float) -> str:
    """A change in points: one decimal below 10 (-0.9, not -1), whole points above (-12)."""
    return f"{v:.1f}" if abs(v) < 9.95 else f"{v:.0f}"


def ablation_fig(stages, kind: str, names) -> str:
    """Heat maps of the accuracy change (points) per channel and class, one panel per stage."""
    mats = [(st.stage, st.of(kind).numpy() * 100) for st in stages]
    v = max(sym(m) for _, m in mats)
    tallest = max(m.shape[0] for _, m in mats)
    fig = Figure(figsize=(max(5.0, 4.2 * len(mats) + 1.0), 0.18 * tallest + 1.9), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(mats)))
    for ax, (name, mat) in zip(axes, mats, strict=True):
        im = ax.imshow(mat, cmap="RdBu", vmin=-v, vmax=v, aspect="auto")
        if mat.size <= 800:
            for i, j in zip(*np.nonzero(np.abs(mat) >= PRINT_MIN), strict=True):
                ax.text(j, i, points_text(mat[i, j]), ha="center", va="center", fontsize=6.5,
                        color=text_colour(im.cmap(im.norm(mat[i, j]))))  # fmt: skip
        class_ticks(ax, names, "x")
        ax.set_xlabel(noun(names), fontsize=8)
        ax.set_ylabel(f"{name} channel")
        ax.set_yticks(range(mat.shape[0]))
        ax.tick_params(axis="y", labelsize=6)
        ax.set_title(f"{name}: {kind}-ablating one channel", fontsize=9)
    fig.colorbar(im, ax=axes.tolist(), shrink=0.6, label="change in the class's test accuracy (points)")
    return uri(fig)


def readout_ablation_fig(readout, kind: str, names, stage: str) -> str:
    """Each read-out input ablated: one panel per class, channels tiled as in the templates."""
    per_unit = readout.zero if kind == "zero" else readout.mean  # [C*H*W, K]
    k = per_unit.shape[1]
    maps = per_unit.numpy().T.reshape(k, *readout.shape) * 100  # [K, C, H, W]
    v = sym(maps)
    rows, cols = _grid(k)
    fig = Figure(figsize=(11, 1.6 * rows + 0.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for d, ax in enumerate(axes):
        clean(ax)
        if d >= k:
            ax.axis("off")
            continue
        im = ax.imshow(tile(maps[d], 8), cmap=cmap("RdBu"), vmin=-v, vmax=v)
        ax.set_title(str(names[d]), fontsize=8)
    fig.colorbar(im, ax=axes.tolist(), shrink=0.8, label="points")
    fig.suptitle(
        f"{kind}-ablating one read-out input ({stage} channel × {readout.shape[1]}×{readout.shape[2]} position), "
        "tiled as in the templates",
        fontsize=9,
    )
    return uri(fig)


def selectivity_fig(sel, names) -> str:
    means = sel.class_means.numpy()  # [C, K]
    order = list(sel.order)
    norm = means / np.maximum(np.abs(means).max(1, keepdims=True), 1e-12)
    fig = Figure(figsize=(max(4.8, 0.14 * len(names) + 3.2), 0.19 * len(order) + 1.4), layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(norm[order], cmap="magma", aspect="auto", vmin=min(0.0, float(norm.min())), vmax=1)
    ax.set_yticks(range(len(order)))
    ax.set_yticklabels([f"ch {c}  sel {float(sel.index[c]):.2f}" for c in order], fontsize=6.5)
    class_ticks(ax, names, "x")
    ax.set_title(
        f"{sel.stage}: mean activation per class (÷ the channel's max),\ngrouped by preferred class", fontsize=8
    )
    fig.colorbar(im, ax=ax, shrink=0.7)
    return uri(fig)


def patching_fig(pt, names, vrange) -> str:
    stages = pt.stages
    fig = Figure(figsize=(3.2 * len(stages) + 5.2, 5.4), layout="constrained")
    gs = fig.add_gridspec(2, len(stages) + 2, width_ratios=[0.5] + [1.4] * len(stages) + [1.3])
    for r, (img, cls, role) in enumerate(
        ((pt.clean_image, pt.clean_class, "clean"), (pt.corrupted_image, pt.corrupted_class, "corrupted"))
    ):
        ax = fig.add_subplot(gs[r, 0])
        im, kw = as_image(img.numpy(), vrange)
        ax.imshow(im, **kw)
        ax.set_title(f"{article_name(names[cls])} ({role})\nfirst pair", fontsize=7)
        clean(ax)
    for col, st in enumerate(stages, start=1):
        maps = st.position_mean.numpy() * 100
        v = sym(maps)
        ax = fig.add_subplot(gs[:, col])
        im = ax.imshow(tile(maps, 4), cmap=cmap("RdBu_r"), vmin=-v, vmax=v)
        ax.set_title(
            f"one {st.stage} unit patched\n({maps.shape[0]} channels × {maps.shape[1]}×{maps.shape[2]}, 4 per row)",
            fontsize=8,
        )
        clean(ax)
        fig.colorbar(im, ax=ax, shrink=0.8, orientation="horizontal", pad=0.03, label="% of the gap")
    last = stages[-1]
    ax = fig.add_subplot(gs[:, -1])
    ch, sd = last.channel_mean.numpy() * 100, last.channel_std.numpy() * 100
    ax.barh(range(len(ch)), ch, xerr=sd, color=["#d95f02" if v > 0 else "#7570b3" for v in ch], error_kw={"lw": 0.6})
    ax.set_yticks(range(len(ch)))
    ax.tick_params(labelsize=6)
    ax.invert_yaxis()
    ax.set_xlabel("% of the gap (mean ± sd over pairs)")
    ax.set_title(f"patching a whole {last.stage} channel", fontsize=8)
    a, b = names[pt.clean_class], names[pt.corrupted_class]
    fig.suptitle(
        f"Activation patching: run {article_name(b)}, take one unit from the paired {a}; how much of the "
        f"logit({a}) − logit({b}) gap comes back (mean over {pt.pairs} pairs)",
        fontsize=9,
    )
    return uri(fig)


def article_name(name: str) -> str:
    return article(name)


# ---- circuits ---------------------------------------------------------------------------------


def circuits_fig(study, names, n_channels: int) -> str:
    circ = study.circuits
    fig = Figure(figsize=(13, 3.8 + 0.05 * len(circ)), layout="constrained")
    a, b, c = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1.1, 1.2, 1.6]})
    for ci in circ:
        a.plot([p.size for p in ci.growth], [100 * p.accuracy for p in ci.growth], marker=".", label=names[ci.target])
    a.set_xlabel("channels kept (greedy order)")
    a.xaxis.set_major_locator(MaxNLocator(integer=True))  # a count of channels: no "2.5"
    a.set_ylabel("class accuracy, others mean-ablated (%)")
    a.set_title("greedy growth (before pruning)", fontsize=8)
    if len(circ) <= 12:
        a.legend(fontsize=6, ncol=2, title="class", title_fontsize=6)
    a.grid(alpha=0.3)
    xs = np.arange(len(circ))
    bars = (
        ("full_accuracy", "full model", "#999"),
        ("sufficiency", "only the circuit", "#1b9e77"),
        ("necessity", "circuit mean-ablated", "#d95f02"),
        ("necessity_resample", "circuit resample-ablated" + (" (data donors)" if study.resample_donors == "data"
                                                             else " (other-class donors)"), "#7570b3"),
    )
    w = 0.21
    for j, (key, label, colour) in enumerate(bars):
        b.bar(xs + (j - 1.5) * w, [getattr(ci, key) * 100 for ci in circ], w, label=label, color=colour)
    for x_, ci in zip(xs, circ, strict=True):
        b.text(x_, 101, str(ci.size), ha="center", fontsize=6)
    class_ticks(b, [names[ci.target] for ci in circ], "x")
    b.set_ylim(0, 135)  # headroom for the legend above the bars
    b.set_yticks(range(0, 101, 20))
    b.set_xlabel("class (number above: channels in its circuit)")
    b.set_ylabel("test accuracy on the class (%)")
    b.set_title("sufficiency and necessity", fontsize=8)
    b.legend(fontsize=6, loc="upper center", ncol=2, handlelength=1, columnspacing=0.6)
    member = np.full((len(circ), n_channels), np.nan)
    for i, ci in enumerate(circ):
        att = ci.attribution.numpy()
        for ch in ci.channels:
            member[i, ch] = att[ch]
    v = sym(member)
    im = c.imshow(member, cmap=cmap("RdBu_r"), vmin=-v, vmax=v, aspect="auto")
    class_ticks(c, [names[ci.target] for ci in circ], "y")
    c.set_xticks(range(n_channels))
    c.tick_params(axis="x", labelsize=6)
    c.set_xlabel(f"{study.stage} channel")
    c.set_title("circuit membership (colour: the class's logit with the channel alone\nrestored from its mean, "
                "minus with none; measured)", fontsize=8)  # two lines: one is wider than the panel
    fig.colorbar(im, ax=c, shrink=0.8)
    return uri(fig)


def class_circuit_fig(ci, study, names, maps_d: np.ndarray, templates_d: np.ndarray | None) -> str:
    """One class's circuit: each channel's mean map on the class (and read-out weights); accuracy per class."""
    chans = list(ci.channels)
    n = len(chans)
    fig = Figure(figsize=(11, 3.3))
    gs = fig.add_gridspec(2, n + 4, left=0.03, right=0.99, top=0.78, bottom=0.16, wspace=0.25, hspace=0.35)
    vmap = max(float(np.abs(maps_d[chans]).max()), 1e-12)
    for j, c in enumerate(chans):
        ax = fig.add_subplot(gs[0, j])
        ax.imshow(maps_d[c], cmap="magma", vmin=min(0.0, float(maps_d[chans].min())), vmax=vmap)
        ax.set_title(f"ch {c}", fontsize=7)
        clean(ax)
        if templates_d is not None:
            vt = sym(templates_d[chans])
            ax = fig.add_subplot(gs[1, j])
            ax.imshow(templates_d[c], cmap="RdBu_r", vmin=-vt, vmax=vt)
            clean(ax)
    name = names[ci.target]
    below = f" and read-out weights to {name} (bottom)" if templates_d is not None else ""
    fig.text(0.03, 0.875, f"mean activation on the {plural(name)} (top){below}", fontsize=7)
    ax = fig.add_subplot(gs[:, n + 1 :])
    xs = np.arange(len(names))
    bars = (
        (ci.per_class_accuracy_circuit_only, "circuit only", "#1b9e77"),
        (ci.per_class_accuracy_circuit_ablated, "mean-ablated", "#d95f02"),
        (ci.per_class_accuracy_circuit_resampled, "resampled", "#7570b3"),
    )
    for j, (vals, label, colour) in enumerate(bars):
        ax.bar(xs + (j - 1) * 0.28, vals.numpy() * 100, 0.28, label=label, color=colour)
    class_ticks(ax, names, "x")
    ax.set_ylim(0, 128)  # headroom for the legend above the bars
    ax.set_yticks(range(0, 101, 20))
    ax.tick_params(axis="y", labelsize=7)
    ax.set_title("test accuracy per class (%)", fontsize=8)
    ax.legend(fontsize=6, loc="upper center", ncol=3, handlelength=1, columnspacing=0.6)
    fig.suptitle(f"{noun(names)} {name}: {counted(n, f'{study.stage} channel')}", fontsize=9, x=0.03, ha="left")
    return uri(fig)


# ---- one figure per channel -------------------------------------------------------------------


def channel_fig(ch: dict, names, vrange) -> str:
    """One channel: its weights, read-out template, mean map, class profile, ablation, top images, input × gradient.

    ``ch`` holds numpy arrays: weights [h, w] and its title, template [K, H, W] or None, mean_map,
    profile [K], zero and mean [K], examples [k, C, H, W], labels, boxes, ixg [k, H, W].
    """
    has_t = ch["template"] is not None
    fig = Figure(figsize=(11, 4.6))
    n_top = 5 if has_t else 4
    gs = fig.add_gridspec(
        3, n_top, height_ratios=[1.25, 0.8, 0.8], hspace=0.5, wspace=0.35, left=0.04, right=0.99, top=0.9, bottom=0.03
    )
    ax = fig.add_subplot(gs[0, 0])
    v = sym(ch["weights"])
    ax.imshow(ch["weights"], cmap=cmap("RdBu_r"), vmin=-v, vmax=v)
    ax.set_title(ch["weights_title"], fontsize=7)
    clean(ax)
    col = 1
    if has_t:
        ax = fig.add_subplot(gs[0, col])
        v = sym(ch["template"])
        ax.imshow(tile(ch["template"], 5), cmap=cmap("RdBu_r"), vmin=-v, vmax=v)
        ax.set_title("read-out weights to each class (5 per row)", fontsize=7)
        clean(ax)
        col += 1
    profile = ch["profile"]
    ax = fig.add_subplot(gs[0, col])
    ax.imshow(ch["mean_map"], cmap="magma")
    ax.set_title(f"mean activation on {names[int(profile.argmax())]}", fontsize=7)
    clean(ax)
    _profile_axes(fig.add_subplot(gs[0, col + 1]), fig.add_subplot(gs[0, col + 2]), ch, names)
    _examples_row(fig.add_subplot(gs[1, :]), fig.add_subplot(gs[2, :]), ch, names, vrange)
    fig.suptitle(f"{ch['stage']} channel {ch['channel']}", fontsize=10, x=0.04, ha="left")
    return uri(fig)


def _profile_axes(a, b, ch, names) -> None:
    xs = np.arange(len(names))
    a.bar(xs, ch["profile"], color="#555")
    class_ticks(a, names, "x")
    a.set_title("mean activation per class", fontsize=7)
    b.bar(xs - 0.2, ch["zero"] * 100, 0.4, label="zero", color="#7570b3")
    b.bar(xs + 0.2, ch["mean"] * 100, 0.4, label="mean", color="#d95f02")
    b.axhline(0, color="black", lw=0.5)
    class_ticks(b, names, "x")
    b.set_title("ablation: Δ accuracy (points)", fontsize=7)
    b.legend(fontsize=5.5, loc="lower left")
    for ax in (a, b):
        ax.tick_params(axis="y", labelsize=6)


def _examples_row(ax, ax2, ch, names, vrange) -> None:
    ex = ch["examples"]  # [k, C, H, W]
    k, c, h, w = ex.shape
    if c == 1:
        ax.imshow(tile(ex[:, 0], k, pad=2), cmap=cmap("gray"), vmin=vrange[0], vmax=vrange[1])
    else:
        strip = np.ones((h, k * (w + 2) - 2, 3))
        for j in range(k):
            strip[:, j * (w + 2) : j * (w + 2) + w] = as_image(ex[j], vrange)[0]
        ax.imshow(strip)
    for j, (y0, y1, x0, x1) in enumerate(ch["boxes"]):
        ax.add_patch(Rectangle((j * (w + 2) + x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, ec="#ff7f0e", lw=1))
        ax.text(j * (w + 2) + 1, 2.5, str(names[ch["labels"][j]]), color="#ffdd55", fontsize=6.5, va="center")
    ax.set_title(
        "top test images (orange: receptive field of the most active position; yellow: label)", fontsize=7, loc="left"
    )
    clean(ax)
    v = sym(ch["ixg"])
    ax2.imshow(tile(ch["ixg"], k, pad=2), cmap=cmap("RdBu_r"), vmin=-v, vmax=v)
    ax2.set_title("input × gradient of that activation (red: pixels that raise it)", fontsize=7, loc="left")
    clean(ax2)
