"""Pages of ``cnn sae``: evaluation, training and the dashboards of a dictionary, one self-contained HTML file each.

Image examples are drawn as ``cnn explain`` draws a channel's top images (:mod:`mechscope.cnn.report.cnn_figures`):
the receptive field of the position outlined in orange on the image, and beside it the patch itself, enlarged.
The per-latent charts are small inline SVGs and the images PNGs made with PIL: a dashboard page holds dozens of
them, and matplotlib would take seconds each on a busy machine; the page-wide figures use matplotlib.
"""

from __future__ import annotations

import markupsafe
import numpy as np

from mechscope.core.render.figures import subplots
from mechscope.core.render.html import array_uri, figure_data_uri, render_string

DPI = 80


def bars_svg(values, labels=None, title: str = "", width: int = 230, height: int = 80, edges=None) -> markupsafe.Markup:
    """A small inline SVG bar chart (no matplotlib: a dashboard draws several per latent): bars up in blue, down in
    red, the zero line, the labels under the bars; ``edges`` (a histogram's) label the x axis at both ends."""
    v = np.asarray(values, dtype=float)
    if v.size == 0:
        return markupsafe.Markup("")
    top, bot = max(float(v.max()), 0.0), min(float(v.min()), 0.0)
    span = (top - bot) or 1.0
    plot_h = height - 26
    zero = 12 + plot_h * top / span
    bw = (width - 10) / len(v)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">',
             f'<text x="2" y="9" font-size="8" fill="#444">{markupsafe.escape(title)}</text>']
    for i, x in enumerate(v):
        h = plot_h * abs(x) / span
        y = zero - h if x >= 0 else zero
        colour = "#3182bd" if x >= 0 else "#de2d26"
        parts.append(f'<rect x="{5 + i * bw:.1f}" y="{y:.1f}" width="{max(bw - 1, 0.5):.1f}" height="{h:.1f}" '
                     f'fill="{colour}"><title>{markupsafe.escape(labels[i] if labels else i)}: {x:.3g}</title></rect>')
    parts.append(f'<line x1="5" x2="{width - 5}" y1="{zero:.1f}" y2="{zero:.1f}" stroke="#333" stroke-width="0.5"/>')
    if labels and len(labels) <= 40:
        for i, lab in enumerate(labels):
            parts.append(f'<text x="{5 + (i + 0.5) * bw:.1f}" y="{height - 3}" font-size="7" text-anchor="middle" '
                         f'fill="#444">{markupsafe.escape(str(lab)[:6])}</text>')
    elif edges is not None and len(edges):
        parts.append(f'<text x="5" y="{height - 3}" font-size="7" fill="#444">{edges[0]:.3g}</text>')
        parts.append(f'<text x="{width - 5}" y="{height - 3}" font-size="7" text-anchor="end" fill="#444">'
                     f'{edges[-1]:.3g}</text>')
    parts.append("</svg>")
    return markupsafe.Markup("".join(parts))


def _grey_rgb(img: np.ndarray, vrange) -> np.ndarray:
    """[C, H, W] input values -> [H, W, 3] in [0, 1]."""
    lo, hi = vrange
    a = np.clip((np.asarray(img, dtype=float) - lo) / max(hi - lo, 1e-12), 0, 1)
    return np.repeat(a[0][..., None], 3, 2) if a.shape[0] == 1 else a[:3].transpose(1, 2, 0)


def example_tiles(examples, images: dict, names, vrange, scale: int = 3) -> list[dict]:
    """Per example: the image with the receptive field outlined in orange, the patch itself enlarged (PNG data
    URIs made with PIL, no matplotlib) and a caption (activation, label)."""
    out = []
    for e in examples:
        if e.image not in images:
            continue
        rgb = _grey_rgb(images[e.image], vrange)
        big = rgb.repeat(scale, 0).repeat(scale, 1)
        y0, y1, x0, x1 = (v * scale for v in e.box)
        orange = np.array([1.0, 0.5, 0.05])
        big[y0:y1, [x0, max(x1 - 1, x0)]] = orange
        big[[y0, max(y1 - 1, y0)], x0:x1] = orange
        by0, by1, bx0, bx1 = e.box
        patch = rgb[by0:by1, bx0:bx1]
        zoom = max(1, (28 * scale) // max(patch.shape[0], 1))
        out.append({"image": array_uri(big, 1), "patch": array_uri(patch, zoom),
                    "caption": f"{e.value:.3g} · {names[e.label]} · ({e.position[0]},{e.position[1]})"})  # fmt: skip
    return out


def _profile(board, names) -> list[markupsafe.Markup]:
    out = [bars_svg(board.class_means, list(names), f"mean per class (selectivity {board.selectivity:.2f})"),
           bars_svg(board.hist_counts, None, f"activations where it fires ({sum(board.hist_counts):,})",
                    edges=board.hist_edges)]  # fmt: skip
    if board.class_effect is not None:
        out.append(bars_svg(board.class_effect, list(names), "direct effect on the logits (centred)"))
    return out


def _featvis_uri(board, vrange) -> str | None:
    if board.featvis is None:
        return None
    return array_uri(_grey_rgb(np.asarray(board.featvis), vrange), 3)


def comparison_fig(result) -> str:
    """Selectivity of channels and alive latents (histograms, the same bins)."""
    fig, ax = subplots(figsize=(6.5, 2.3), layout="constrained")
    bins = np.linspace(0, 1, 21)
    lt = np.asarray(result.latent_selectivity)
    dens = result.densities
    alive = lt if dens is None else lt[np.asarray(dens) > 0]
    ax.hist(alive, bins=bins, density=True, alpha=0.6, color="#e6550d", label=f"latents ({len(alive)} alive)")
    ax.hist(result.channel_selectivity, bins=bins, density=True, histtype="step", lw=2, color="#3182bd",
            label=f"channels ({len(result.channel_selectivity)})")  # fmt: skip
    ax.axvline(result.comparison["threshold"], color="#777", ls="--", lw=1)
    ax.set_xlabel("class selectivity index (shifted)", fontsize=8)
    ax.set_ylabel("density of units", fontsize=8)
    ax.legend(fontsize=7)
    ax.tick_params(labelsize=7)
    return figure_data_uri(fig, 90)


def decoder_svg(result, board) -> markupsafe.Markup:
    """The decoder direction's largest channel weights, each channel named with its preferred class and index."""
    labels = [f"ch{c}" for c, _ in board.mixes]
    svg = bars_svg([w for _, w in board.mixes], labels, "decoder: largest channel weights", width=200)
    rows = "".join(
        f"<tr><td>{c}</td><td>{w:+.3f}</td><td class='l'>"
        f"{markupsafe.escape(result.class_names[result.channel_preferred[c]])}"
        f"</td><td>{result.channel_selectivity[c]:.2f}</td></tr>"
        for c, w in board.mixes
    )
    table = f"<table><tr><th>channel</th><th>weight</th><th>its class</th><th>its selectivity</th></tr>{rows}</table>"
    return markupsafe.Markup(str(svg) + table)


def dashboards_page(result) -> str:
    names, vrange, images = result.class_names, result.value_range, result.example_images or {}
    boards = []
    for b in result.latents:
        bands = [
            {"lo": b.band_edges[i], "hi": b.band_edges[i + 1], "tiles": example_tiles(band, images, names, vrange)}
            for i, band in enumerate(b.bands)
        ][::-1]  # fmt: skip
        boards.append({
            "b": b, "top": example_tiles(b.top, images, names, vrange), "bands": bands,
            "profile": _profile(b, names), "featvis": _featvis_uri(b, vrange),
            "decoder": decoder_svg(result, b) if b.mixes else None, "preferred": names[b.preferred_class],
        })  # fmt: skip
    channels = []
    for c, s in enumerate(result.channel_selectivity):
        t = result.channel_tuning[c] if result.channel_tuning else None
        channels.append((c, names[result.channel_preferred[c]], s, t.label if t else "", t.tuned if t else False))
    return render_string("mechscope.cnn", "sae_dashboards.html.j2", r=result, boards=boards,
                         comparison=comparison_fig(result), channels=channels, c=result.comparison)  # fmt: skip


def evaluation_page(result) -> str:
    return render_string("mechscope.cnn", "sae_evaluation.html.j2", r=result, mt=result.metrics, e=result.effect,
                         summary=evaluation_lines(result.metrics, result.effect))  # fmt: skip


def _splice_line(e) -> str:
    """What splicing the reconstruction in keeps; a share of nothing (zeroing the activation changes neither the
    accuracy nor the logits) is said as such, not printed as nan%."""
    import math

    if not math.isfinite(e.accuracy_recovered):
        return (f"Zeroing the activation does not change the test accuracy ({e.acc_clean:.2%}), so no share of it can "
                f"be recovered; spliced in: {e.acc_spliced:.2%}.")  # fmt: skip
    kl = (f"KL recovered {e.kl_recovered:.1%} (1 − the logits' KL to clean spliced in / zeroed)"
          if math.isfinite(e.kl_recovered) else "zeroing leaves the logits' KL at 0, so no KL share")  # fmt: skip
    return (f"Spliced in, it keeps {e.accuracy_recovered:.1%} of the test accuracy that zeroing the activation loses "
            f"({e.acc_spliced:.2%} against {e.acc_clean:.2%} clean and {e.acc_ablated:.2%} zeroed); {kl}.")


LOW_VARIANCE = 0.5  # below this explained variance the reconstruction misses most of the activation


def evaluation_lines(mt, e) -> list[str]:
    """The evaluation page's reading of its two tables: how close the reconstruction is, and what splicing it in
    keeps, with the caution where the two disagree. ``mt`` and ``e``: the result's metrics and effect (objects or
    the dicts a record holds)."""
    from types import SimpleNamespace

    mt, e = (SimpleNamespace(**x) if isinstance(x, dict) else x for x in (mt, e))
    lines = [
        f"The reconstruction keeps {mt.explained_variance:.1%} of the activation's variance about its mean (cosine "
        f"{mt.cosine_similarity:.3f}); its norm is {mt.l2_ratio:.2f}× the activation's on average over positions "
        "(1: the same size; a position with a small activation weighs as much as a large one).",
        _splice_line(e),
    ]
    if mt.explained_variance < LOW_VARIANCE and e.accuracy_recovered >= 0.9:  # NaN: False
        lines.append(
            f"So the model's answer survives a reconstruction that misses {1 - mt.explained_variance:.0%} of the "
            "activation's variance: the layers after the hook tolerate the error. The accuracy measures the "
            "dictionary's use to the answer, not how well its latents describe the activation."
        )
    return lines


def training_page(result) -> str:
    from mechscope.cnn.report.cnn_figures import uri

    curve = None
    if result.history:
        steps = [h["step"] for h in result.history]
        fig, axes = subplots(1, 3, figsize=(10, 2.4), layout="constrained")
        for ax, key in zip(axes, ("loss", "l0", "explained_variance"), strict=True):
            ax.plot(steps, [h.get(key) for h in result.history], color="#3182bd")
            ax.set_title(key.replace("_", " "), fontsize=8)
            ax.tick_params(labelsize=7)
        curve = uri(fig)
    return render_string("mechscope.cnn", "sae_training.html.j2", r=result, curve=curve)



def _share(n: int, of: int) -> str:
    return f"{100 * n / max(of, 1):.1f}%"


def summary_lines(r) -> list[str]:
    """``cnn sae show``'s summary: the dictionary's latents against the stage's channels and, where it was measured,
    the untrained control, with what the control's numbers say about the gain."""
    c = r.comparison
    ch, lt = c["channels"], c["latents"]
    lines = [
        f"{r.architecture} SAE of {r.d_sae:,} latents on {r.hook} ({r.d_in} channels): "
        f"{100 * r.dead_fraction:.1f}% never fire on {r.images:,} test images",
        f"class-selective (index >= {c['threshold']}): {lt['selective']} of {lt['units']} alive latents "
        f"({_share(lt['selective'], lt['units'])}) against {ch['selective']} of {ch['units']} channels "
        f"({_share(ch['selective'], ch['units'])}); median index {lt['median_index']:.2f} against "
        f"{ch['median_index']:.2f}",
    ]
    rc = c.get("random_sparse")
    if rc:
        lines.append(
            f"control, an untrained TopK dictionary of the same size and L0 ({rc['k']}): {rc['selective']} of "
            f"{rc['units']} alive latents class-selective ({_share(rc['selective'], rc['units'])}, median index "
            f"{rc['median_index']:.2f})" + (f", {rc['tuned']} stroke-tuned" if "tuned" in rc else "")
            + ": " + control_verdict(ch, lt, rc)
        )
    if "tuned" in lt:
        lines.append(
            f"stroke-tuned (a tuning label): {lt['tuned']} latents ({_share(lt['tuned'], lt['units'])}) "
            f"against {ch['tuned']} channels ({_share(ch['tuned'], ch['units'])}); selective or tuned: "
            f"{lt['selective_or_tuned']} latents, {ch['selective_or_tuned']} channels"
        )
    return lines


def control_verdict(ch: dict, lt: dict, rc: dict) -> str:
    """What the untrained control says about the trained dictionary's gain over the channels in the share of
    class-selective units: all of it (the control matches or beats it), part of it (the share it reaches), or
    none (the control is no more selective than the channels)."""
    if not lt["units"]:
        return "the trained dictionary has no alive latent, so there is no selectivity to account for"
    share = {k: d["selective"] / max(d["units"], 1) for k, d in (("ch", ch), ("lt", lt), ("rc", rc))}
    gain, control_gain = share["lt"] - share["ch"], share["rc"] - share["ch"]
    if share["rc"] >= share["lt"]:
        return ("the untrained control is at least as selective as the trained dictionary, so by this measure "
                "sparsity alone accounts for the latents' selectivity and training adds none")  # fmt: skip
    if gain <= 0:
        return "the trained dictionary is no more selective than the channels, so there is no gain to account for"
    if control_gain <= 0:
        return ("the control is no more selective than the channels, so the trained dictionary's gain "
                f"({100 * gain:+.1f} points) comes from training, not from sparsity alone")  # fmt: skip
    return (f"sparsity alone gives {control_gain / gain:.0%} of the trained dictionary's gain over the channels "
            f"({100 * control_gain:+.1f} of {100 * gain:+.1f} points of selective share); training adds the rest")
