"""Figures of the clip reports, drawn from result objects (matplotlib without pyplot, inlined as PNG data URIs)."""

from __future__ import annotations

import numpy as np

from mechscope.core.render.figures import subplots, text_colour
from mechscope.core.render.html import array_uri, figure_data_uri


def _show(ax, pixels: np.ndarray, title: str = "", box=None, note: str = "") -> None:
    """An image with ``title`` above it, a red ``box`` (top, left, bottom, right; pixels) on it, and a red ``note``
    under it (what the box would say where there is no box to draw)."""
    img = np.asarray(pixels, dtype=float)
    img = img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)
    ax.imshow(np.clip(img, 0, 1), cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
    if box is not None:
        from matplotlib.patches import Rectangle

        top, left, bottom, right = box
        ax.add_patch(Rectangle((left - 0.5, top - 0.5), right - left, bottom - top, fill=False, ec="#e33", lw=1.5))
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=7)
    if note:
        ax.set_xlabel(note, fontsize=7, color="#e33")


def wrapped(text: str, width: int = 20, lines: int = 3) -> str:
    """``text`` wrapped at ``width`` characters into at most ``lines`` lines, the last cut with "…" when more would
    be needed (the report lists each name in full beside the figure)."""
    import textwrap

    parts = textwrap.wrap(str(text), width, break_on_hyphens=False) or [""]
    if len(parts) > lines:
        parts = parts[:lines]
        parts[-1] = parts[-1][: width - 1] + "…"
    return "\n".join(parts)


def image_uri(pixels: np.ndarray, scale: int = 4) -> str:
    img = np.asarray(pixels, dtype=float)
    return array_uri(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0), scale)


def history_figure(history) -> str:
    steps = [h["step"] for h in history]
    fig, (a, b) = subplots(1, 2, figsize=(9, 2.8), layout="constrained")
    a.plot(steps, [h["loss"] for h in history], color="#36c")
    a.set_xlabel("step")
    a.set_ylabel("contrastive loss")
    b.plot(steps, [h["accuracy"] for h in history], color="#c63")
    b.set_xlabel("step")
    b.set_ylabel("image → caption accuracy (batch)")
    b.set_ylim(0, 1)
    return figure_data_uri(fig)


def confusion_figure(acc, names, title: str) -> str:
    """Counts per true and predicted class, shaded by the share of the true class; each title line wrapped whole."""
    import textwrap

    import matplotlib

    conf = np.asarray(acc.confusion, dtype=int)
    share = conf / np.maximum(conf.sum(1, keepdims=True), 1)
    cmap = matplotlib.colormaps["Blues"]
    fig, ax = subplots(figsize=(3.8, 3.6), layout="constrained")
    im = ax.imshow(share, cmap=cmap, vmin=0, vmax=1)
    for i, j in zip(*np.nonzero(conf), strict=True):
        ax.text(j, i, str(conf[i, j]), ha="center", va="center", fontsize=5, color=text_colour(cmap(share[i, j])))
    ax.set_xticks(range(len(names)), [n[:5] for n in names], fontsize=6, rotation=90)
    ax.set_yticks(range(len(names)), [n[:5] for n in names], fontsize=6)
    ax.set_xlabel("predicted", fontsize=7)
    ax.set_ylabel("true", fontsize=7)
    ax.set_title("\n".join(textwrap.fill(line, 44) for line in title.split("\n")), fontsize=7)
    bar = fig.colorbar(im, ax=ax, shrink=0.8)
    bar.set_label("share of the true class (cells: counts)", fontsize=6)
    bar.ax.tick_params(labelsize=6)
    return figure_data_uri(fig)


def multimodality_figure(mm) -> str:
    rows = mm.concepts
    x = np.arange(len(rows))
    fig, ax = subplots(figsize=(max(5, 0.6 * len(rows) + 2) + 2.6, 3.2), layout="constrained")
    ax.bar(x - 0.25, [r.score for r in rows], 0.25, color=["#c33" if r.multimodal else "#e99" for r in rows],
           label="best neuron")  # fmt: skip
    ax.bar(x, [r.null_max for r in rows], 0.25, color="#999",
           label="mismatched name: highest score of any neuron (max over names)")  # fmt: skip
    ax.bar(x + 0.25, [r.control_mean for r in rows], 0.25, yerr=[r.control_sd for r in rows], color="#6a9",
           label=f"{mm.n_controls} random control neurons (mean ± population sd)")  # fmt: skip
    ax.axhline(mm.min_score, color="#333", lw=0.8, ls="--", label=f"least score to count ({mm.min_score:g})")
    ax.set_xticks(x, [r.concept for r in rows], fontsize=8, rotation=30)
    ax.set_ylabel("multimodality: min(d′ pictures, d′ name)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars, not over them
    return figure_data_uri(fig)


def scatter_figure(mm, index: int, column: int | None = None) -> str | None:
    """Every neuron of concept ``index`` at (d′ pictures, d′ drawn name); red: the concept's best neuron, the one at
    ``column`` (its column of ``mm.picture_d``; None: found again as the largest min(d′ pictures, d′ name))."""
    if mm.picture_d is None or mm.word_d is None:
        return None
    r = mm.concepts[index]
    pd, wd = np.asarray(mm.picture_d[index]), np.asarray(mm.word_d[index])
    fig, ax = subplots(figsize=(3.4, 3.2), layout="constrained")
    ax.scatter(pd, wd, s=4, color="#999")
    col = int(np.argmax(np.minimum(pd, wd))) if column is None else int(column)
    ax.scatter([pd[col]], [wd[col]], s=30, color="#c33", label=f"neuron {r.neuron}")
    ax.axhline(0, color="#ccc", lw=0.6)
    ax.axvline(0, color="#ccc", lw=0.6)
    ax.set_xlabel(f"d′ pictures of {r.concept}", fontsize=8)
    ax.set_ylabel(f"d′ drawn {'/'.join(r.forms)}", fontsize=8)
    ax.legend(fontsize=7)
    return figure_data_uri(fig)


CLS_NOTE = "max at CLS token"


def top_image_rows(r) -> list[dict]:
    """Per top image of a reading: its name, its response, the pixel box (top, left, bottom, right) of the patch
    where the neuron fires most, and that place in words. :func:`mechscope.clip.methods.neurons.hot_patch` gives no
    box (None) for an image whose largest activation at the neuron's layer is at the class token (CLS), which is no
    patch of the image: nothing is boxed there, and ``note`` (drawn under the image) says where the maximum is."""
    patches = list(r.top_patches or ())
    rows = []
    for i, (name, value) in enumerate(zip(r.top_images, r.top_values, strict=False)):
        recorded = i < len(patches)
        box = tuple(int(v) for v in patches[i]) if recorded and patches[i] is not None else None
        cls = recorded and box is None
        if box is not None:
            where = f"patch at pixel rows {box[0]}–{box[2] - 1}, columns {box[1]}–{box[3] - 1} (red box)"
        else:
            where = "class token (CLS), no patch of the image: no box" if cls else "not recorded"
        rows.append({"rank": i + 1, "name": name, "value": value, "box": box, "cls": cls,
                     "note": CLS_NOTE if cls else "", "where": where})  # fmt: skip
    return rows


def reading_figure(reading) -> str | None:
    """The feature visualisation, then each top image with its name (wrapped), its response and a red box on the
    patch where the neuron fires most; an image whose largest activation is at the class token has no patch to box
    and says so under it (:func:`top_image_rows`). Integrated gradients below."""
    if reading.featvis is None or reading.top_pixels is None:
        return None
    k = len(reading.top_pixels)
    attr = reading.top_attribution
    rows = 2 if attr is not None and len(attr) == k else 1
    tops = top_image_rows(reading)
    titles = [f"{wrapped(t['name'])}\n{t['value']:.2f}" for t in tops]
    lines = max([t.count("\n") + 1 for t in titles] + [2])
    first = 1.25 + 0.14 * lines + (0.2 if any(t["cls"] for t in tops) else 0.0)  # image, title lines, note
    fig, axes = subplots(rows, k + 1, figsize=(1.3 * (k + 1), first + 1.3 * (rows - 1)), layout="constrained",
                         squeeze=False, gridspec_kw={"height_ratios": [first] + [1.3] * (rows - 1)})  # fmt: skip
    _show(axes[0, 0], reading.featvis, f"feature vis.\n{reading.featvis_response:.2f}")
    for i in range(k):
        t = tops[i] if i < len(tops) else {"box": None, "note": ""}
        _show(axes[0, i + 1], reading.top_pixels[i], titles[i] if i < len(titles) else "", t["box"], t["note"])
    if rows == 2:
        axes[1, 0].axis("off")
        axes[1, 0].text(0.5, 0.5, "integrated\ngradients\n(red +, blue −)", ha="center", va="center", fontsize=7)
        for i in range(k):
            a = np.asarray(attr[i], dtype=np.float64)
            m = float(np.abs(a).max()) or 1.0
            axes[1, i + 1].imshow(a, cmap="bwr", vmin=-m, vmax=m, interpolation="nearest")
            axes[1, i + 1].set_xticks([])
            axes[1, i + 1].set_yticks([])
    return figure_data_uri(fig)


def diverse_figure(reading) -> str | None:
    if reading.diverse is None or not len(reading.diverse):
        return None
    n = len(reading.diverse)
    fig, axes = subplots(1, n, figsize=(1.3 * n, 1.6), layout="constrained", squeeze=False)
    for i in range(n):
        r = reading.diverse_responses[i] if i < len(reading.diverse_responses) else float("nan")
        _show(axes[0, i], reading.diverse[i], f"diverse {i + 1}\n{r:.2f}")
    return figure_data_uri(fig)


def bars_figure(words, values, title: str, n: int = 12) -> str:
    words, values = list(words)[:n], list(values)[:n]
    fig, ax = subplots(figsize=(3.6, 0.22 * len(words) + 0.8), layout="constrained")
    ax.barh(range(len(words))[::-1], values, color="#48a")
    ax.set_yticks(range(len(words))[::-1], words, fontsize=7)
    ax.set_title(title, fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    return figure_data_uri(fig)


def attack_examples_figure(finding, classes) -> str | None:
    if finding.examples is None or not len(finding.examples):
        return None
    ex, pr = finding.examples, finding.probabilities
    n = len(ex)
    fig, axes = subplots(2, n, figsize=(1.25 * n, 3.0), layout="constrained", squeeze=False)
    for i in range(n):
        for row, (label, p) in enumerate((("clean", pr[i, 0]), ("attacked", pr[i, 1]))):
            top = int(np.argmax(p))
            title = f"{label}: {classes[top][:8]} {p[top]:.0%}"
            if row == 1:
                ab = pr[i, 2]
                title += f"\nablated: {classes[int(np.argmax(ab))][:8]}"
            _show(axes[row, i], ex[i, row], title)
    return figure_data_uri(fig)


def attack_summary_figure(summary, k: int, sets: int = 0, sd: str = "sd") -> str:
    """Held-out attack success: nothing ablated, the top ``k`` ablated, ``sets`` random sets of ``k`` ablated (their
    mean, the error bar the ``sd`` named; no bar without a control) and the neurons the user named."""
    s = summary
    bars = [("held out,\nattacked", s.heldout_success, 0.0, "#c33"),
            (f"top {k} neurons\nablated", s.heldout_success_ablated, 0.0, "#36c")]  # fmt: skip
    if sets > 0 and s.control_success_mean == s.control_success_mean:
        spread = f"{sets} sets,\nmean ± {sd}" if sets > 1 else "1 set"
        err = s.control_success_sd if sets > 1 and s.control_success_sd == s.control_success_sd else 0.0
        bars.append((f"{k} random neurons\nablated ({spread})", s.control_success_mean, err, "#999"))
    if s.given:  # the neurons the user named (--ablate)
        names = ", ".join(s.given[:3]) + (" ..." if len(s.given) > 3 else "")
        bars.append((f"asked for\n({names})\nablated", s.given_success, 0.0, "#e90"))
    labels, values, errors, colours = (list(c) for c in zip(*bars, strict=True))
    fig, ax = subplots(figsize=(1.15 * len(values) + 1.0, 2.9), layout="constrained")
    drawn = ax.bar(range(len(values)), values, yerr=errors, color=colours)
    ax.bar_label(drawn, labels=[f"{v:.0%}" for v in values], fontsize=7, padding=2)
    ax.set_xticks(range(len(values)), labels, fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel("attack success rate (held-out half)", fontsize=8)
    return figure_data_uri(fig)


def effects_figure(neurons, n: int = 15) -> str | None:
    rows = list(neurons)[:n]
    if not rows:
        return None
    fig, ax = subplots(figsize=(4.2, 0.22 * len(rows) + 0.9), layout="constrained")
    y = np.arange(len(rows))[::-1]
    ax.barh(y + 0.2, [r.effect for r in rows], 0.4, color="#36c", label="measured")
    ax.barh(y - 0.2, [r.estimated for r in rows], 0.4, color="#9bd", label="attribution estimate")
    ax.set_yticks(y, [r.neuron for r in rows], fontsize=7)
    ax.set_xlabel("margin change when ablated alone (discovery half)", fontsize=8)
    ax.legend(fontsize=7)
    return figure_data_uri(fig)
