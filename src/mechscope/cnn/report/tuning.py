"""The report of ``cnn tuning``: tuning curves, preferred stimuli, sharpness and labels of every conv unit.

Draws what :mod:`mechscope.cnn.methods.tuning` measured and writes the summary's sentences from its
fields; computes nothing new. One PNG per unit (``units/conv1_3.png``, also shown by the
microscope report) and one self-contained report.html with every figure inlined.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from mechscope.cnn.methods.tuning import CV_MAX, DRIVE_MIN, FALLOFF_MIN
from mechscope.core.render.html import figure_png, png_uri, render

COLOURS = {"line": "#1f77b4", "edge": "#d62728", "curve": "#2ca02c", "line_end": "#9467bd", "corner": "#ff7f0e",
           "blob": "#8c564b", "ring": "#17becf"}  # fmt: skip
NAMES = {"line": "lines", "edge": "edges", "curve": "arcs", "line_end": "line endings", "corner": "corners",
         "blob": "blobs", "ring": "loops"}  # fmt: skip


def png_bytes(fig: Figure, dpi: int = 80) -> bytes:
    """A figure as PNG bytes at this report's resolution (also written as units/STAGE_UNIT.png)."""
    return figure_png(fig, dpi)


def _grey(img) -> np.ndarray:
    a = np.asarray(img, dtype=np.float32)
    return a[0] if a.shape[0] == 1 else np.clip(a.transpose(1, 2, 0), 0, 1)


def _fmt_fixed(fixed: dict) -> str:
    return ", ".join(f"{k} {v:g}" + ("°" if k in ("angle", "opening") else "") for k, v in fixed.items())


UNIT_DPI = 80


def unit_figure(u) -> Figure:
    """Angle curves of every oriented family, arc curvature, size; the preferred (and the labelled) stimulus.

    The stimuli are pasted as pixels (``figimage``, no axes): drawing axes' ticks is most of a figure's cost.
    """
    scale = u.dataset_max if u.dataset_max > 0 else 1.0
    fig = Figure(figsize=(11.5, 2.7), dpi=UNIT_DPI)
    gs = fig.add_gridspec(1, 3, width_ratios=[3.4, 1.5, 1.5], wspace=0.3, left=0.05, right=0.73, top=0.7,
                          bottom=0.17)  # fmt: skip
    ax = fig.add_subplot(gs[0])
    for c in u.curves:
        if c.axis != "angle":
            continue
        y = np.array(c.response) / scale
        lw = 2.4 if c.family == (u.label_family or u.preferred.family) else 1.1
        label = f"{NAMES[c.family]} CV {c.circular_variance:.2f}"
        ax.plot(c.x, y, "-o", ms=2, lw=lw, color=COLOURS[c.family], label=label)
        if c.family == (u.label_family or u.preferred.family):
            ax.plot(c.x, np.array(c.response_centre) / scale, "--", lw=1, color=COLOURS[c.family])
    ax.axhline(DRIVE_MIN, color="#999", lw=0.8, ls=":")
    ax.set_xticks(range(0, 361, 45))
    ax.set_xlim(0, 345)
    ax.set_xlabel("angle (°)", fontsize=7)
    ax.set_ylabel("response / test max", fontsize=7)
    ax.tick_params(labelsize=6)
    ax.legend(fontsize=6, ncol=3, loc="lower left", bbox_to_anchor=(0, 1.0), frameon=False, borderaxespad=0.2)
    for k, (family, axis, xlabel) in enumerate(
        [("curve", "curvature", "arc curvature (1/px)"), (None, "radius", "radius (px)")], start=1
    ):
        ax = fig.add_subplot(gs[k], sharey=fig.axes[0])
        for c in u.curves:
            if c.axis == axis and (family is None or c.family == family):
                ax.plot(c.x, np.array(c.response) / scale, "-o", ms=2, color=COLOURS[c.family],
                        label=NAMES[c.family] + (f" ({_fmt_fixed(c.fixed)})" if c.fixed else ""))  # fmt: skip
        ax.axhline(DRIVE_MIN, color="#999", lw=0.8, ls=":")
        ax.set_xlabel(xlabel, fontsize=7)
        ax.tick_params(labelsize=6)
        ax.legend(fontsize=6, loc="lower left", bbox_to_anchor=(0, 1.0), frameon=False, borderaxespad=0.2)
    shown = [(u.preferred_image, "preferred")]
    if u.label_image is not None and u.label_stimulus != u.preferred:
        shown.append((u.label_image, "labelled"))
    width = fig.get_figwidth() * UNIT_DPI
    for k, (img, title) in enumerate(shown):
        g = _grey(img.numpy() if hasattr(img, "numpy") else img)
        zoom = max(1, 100 // g.shape[0])  # 84 pixels for 28×28 stimuli
        g = np.repeat(np.repeat(g, zoom, 0), zoom, 1)
        framed = np.full((g.shape[0] + 2, g.shape[1] + 2, *g.shape[2:]), 0.6, dtype=np.float32)
        framed[1:-1, 1:-1] = g
        x0 = int(width - (len(shown) - k) * (framed.shape[1] + 14))  # right-aligned: every panel inside the figure
        fig.figimage(framed if framed.ndim == 3 else np.repeat(framed[..., None], 3, 2), xo=x0, yo=int(0.2 * 216),
                     origin="upper")  # fmt: skip
        fig.text((x0 + framed.shape[1] / 2) / width, 0.8, title, ha="center", fontsize=7)
    verdict = u.label if u.tuned else f"{u.label} ({u.reason})"
    fig.suptitle(f"{u.stage} channel {u.channel}: {verdict}", fontsize=8.5, x=0.01, y=0.99, ha="left",
                 color="#111" if u.tuned else "#666")  # fmt: skip
    return fig


def stage_figure(stage) -> Figure:
    """Sharpness against drive for every unit of a stage, with the thresholds: the labelled corner shaded."""
    fig = Figure(figsize=(6.0, 3.4), layout="constrained")
    ax = fig.add_subplot()
    for u in stage.units:
        fb = u.family_best[u.label_family or u.preferred.family]
        if fb["sharpness_kind"] != "circular variance":
            continue
        ax.scatter(fb["drive"], fb["sharpness"], s=22, color=COLOURS[u.label_family or u.preferred.family],
                   edgecolor="black" if u.tuned else "none", zorder=3)  # fmt: skip
        ax.annotate(str(u.channel), (fb["drive"], fb["sharpness"]), fontsize=6, xytext=(2, 2),
                    textcoords="offset points")  # fmt: skip
    drives = [u.family_best[u.label_family or u.preferred.family]["drive"] for u in stage.units]
    right = max([1.05, *drives]) + 0.03
    ax.fill_between([DRIVE_MIN, right], 0, CV_MAX, color="#e3f4ea", zorder=0)
    ax.set_xlim(min([DRIVE_MIN, *drives]) - 0.05, right)
    ax.axvline(DRIVE_MIN, color="#999", ls=":")
    ax.axhline(CV_MAX, color="#999", ls=":")
    ax.set_xlabel("drive of the family's best image (/ test-set max)", fontsize=8)
    ax.set_ylabel("circular variance", fontsize=8)
    ax.set_ylim(0, 1.02)
    ax.set_title(f"{stage.stage}, oriented families: sharpness and drive (labelled: outlined)", fontsize=9)
    handles = [ax.scatter([], [], color=c, s=20, label=NAMES[f]) for f, c in COLOURS.items()
               if f not in ("blob", "ring")]  # fmt: skip
    ax.legend(handles=handles, fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)  # beside
    return fig


def stimuli_figure(stim, n_per_family: int = 8) -> Figure:
    """A few stimuli of each family as drawn (position 0), one row per family, in one mosaic."""
    fams = list(dict.fromkeys(s.family for s in stim.stimuli))
    h, w = stim.size
    pad = max(1, h // 8)
    mosaic = np.full((len(fams) * (h + pad) - pad, n_per_family * (w + pad) - pad), 0.35, dtype=np.float32)
    for i, f in enumerate(fams):
        idx = [j for j, s in enumerate(stim.stimuli) if s.family == f and s.position == 0]
        pick = idx if len(idx) <= n_per_family else [idx[round(k * (len(idx) - 1) / max(n_per_family - 1, 1))]
                                                       for k in range(n_per_family)]  # fmt: skip
        for k, j in enumerate(pick):
            y, x = i * (h + pad), k * (w + pad)
            mosaic[y : y + h, x : x + w] = stim.images[j, 0].numpy()
    fig = Figure(figsize=(n_per_family * 0.75 + 1.0, len(fams) * 0.75 + 0.3), layout="constrained")
    ax = fig.add_subplot()
    ax.imshow(mosaic, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_yticks([i * (h + pad) + h / 2 for i in range(len(fams))], [NAMES[f] for f in fams], fontsize=7)
    ax.set_xticks([])
    ax.set_title("examples of the stimuli (white on black, as drawn)", fontsize=8)
    return fig


def summary_lines(r, n_named: int = 10) -> list[str]:
    """Sentences from the fields of a :class:`~mechscope.cnn.methods.tuning.TuningResult`."""
    units, tuned = r.units, r.tuned
    per_stage = ", ".join(f"{s.stage} {len(s.tuned)} of {len(s.units)}" for s in r.stages)
    lines = [
        f"{len(tuned)} of {len(units)} units are tuned to these stimuli ({per_stage}): sharp tuning (circular "
        f"variance ≤ {CV_MAX} or size fall-off ≥ {FALLOFF_MIN}) with a best image reaching at least "
        f"{DRIVE_MIN:g} of the unit's test-set maximum."
    ]
    if tuned:
        order = sorted(tuned, key=_sharpest_first)
        named = "; ".join(
            f"{u.stage} {u.channel}: {u.label} ({_sharp_words(u)}, drive {u.drive:.2f})" for u in order[:n_named]
        )
        more = f"; and {len(order) - n_named} more in the table" if len(order) > n_named else ""
        lines.append(
            f"Tuned units, sharpest first (lowest circular variance, then highest size fall-off): {named}{more}."
        )
        fams: dict[str, int] = {}
        for u in tuned:
            fams[u.label_family] = fams.get(u.label_family, 0) + 1
        lines.append("Labels by family: " + ", ".join(f"{NAMES[f]} {n}" for f, n in sorted(
            fams.items(), key=lambda p: -p[1])) + ".")  # fmt: skip
        lines += _stronger_sentence(order, n_named)
    untuned = [u for u in units if not u.tuned]
    if untuned:
        broad = sum(1 for u in untuned if u.sharpness is not None and not _is_sharp(u))
        weak = sum(1 for u in untuned if u.drive < DRIVE_MIN)
        silent = sum(1 for u in untuned if not u.dataset_max > 0)
        lines.append(
            f"{len(untuned)} units are not tuned to these stimuli: for their preferred family {broad} are too broadly "
            f"tuned (circular variance above {CV_MAX} or size fall-off below {FALLOFF_MIN}) and {weak} are driven to "
            f"less than {DRIVE_MIN:g} of their test-set maximum (a unit can be both)"
            + (f"; {silent} never respond to a test image" if silent else "")
            + _largest_radius(untuned)
            + "."
        )
    lines.append(
        f"{len(r.stimuli):,} stimulus images of {r.stimuli.size[0]}×{r.stimuli.size[1]} pixels "
        f"({len(r.stimuli) // max(len(r.stimuli.offsets), 1):,} shapes, each drawn at {len(r.stimuli.offsets)} "
        f"positions; seed {r.stimuli.seed}), every unit read at hook_post."
    )
    return lines


def _stronger_sentence(tuned, n_named: int) -> list[str]:
    """Labelled units that another, broadly tuned family drives harder: a label is not the unit's strongest
    response."""
    more = [u for u in tuned if u.stronger()]
    if not more:
        return []

    def one(u) -> str:
        f = u.stronger()[0]
        return (f"{u.stage} {u.channel} ({u.label_family.replace('_', ' ')} {u.drive:.2f} against "
                f"{f.replace('_', ' ')} {u.family_best[f]['drive']:.2f})")

    rest = f" and {len(more) - n_named} more" if len(more) > n_named else ""
    return [
        f"{len(more)} of the {len(tuned)} labelled units respond more strongly to a family they are not sharply "
        "tuned to, so a label names the unit's sharpest well-driven tuning, not what drives it most (drive of the "
        "labelled family against the strongest other): " + "; ".join(one(u) for u in more[:n_named]) + rest + "."
    ]


def _largest_radius(untuned) -> str:
    """Untuned units whose preferred family is a size one and peaks at the largest radius drawn (fall-off 0 by
    definition: the stimuli stop before the unit's response does)."""
    n = sum(1 for u in untuned if (u.family_best.get(u.preferred.family) or {}).get("at_largest_radius"))
    return (f"; {n} of them respond most to a blob or loop at the largest radius drawn, so the stimuli end before "
            "any fall-off could show") if n else ""


def _sharpest_first(u) -> tuple:
    """Oriented labels by circular variance (lowest first), then size labels by fall-off (highest first)."""
    cv = u.sharpness_kind == "circular variance"
    return (not cv, u.sharpness if cv else -u.sharpness)


def _is_sharp(u) -> bool:
    if u.sharpness_kind == "circular variance":
        return u.sharpness <= CV_MAX
    return u.sharpness >= FALLOFF_MIN


def _sharp_words(u) -> str:
    return f"{'CV' if u.sharpness_kind == 'circular variance' else 'size fall-off'} {u.sharpness:.2f}"


def write_report(r, out: Path) -> Path:
    """units/STAGE_C.png for every unit and report.html (figures inlined) into the directory ``out``."""
    units_dir = out / "units"
    units_dir.mkdir(parents=True, exist_ok=True)
    sections = []
    for u in r.units:
        png = png_bytes(unit_figure(u), dpi=UNIT_DPI)
        (units_dir / f"{u.name}.png").write_bytes(png)
        sections.append({"u": u, "uri": png_uri(png)})
    stage_figs = [png_uri(png_bytes(stage_figure(s), dpi=90)) for s in r.stages]
    return render(
        "mechscope.cnn", "tuning.html.j2", out / "report.html", r=r, sections=sections, stage_figs=stage_figs,
        stimuli_fig=png_uri(png_bytes(stimuli_figure(r.stimuli), dpi=90)), names=NAMES,
        thresholds={"cv": CV_MAX, "falloff": FALLOFF_MIN, "drive": DRIVE_MIN},
    )  # fmt: skip


def microscope_sentence(linked: dict, n_named: int = 6) -> str | None:
    """The explain summary's sentence on the tuning curves linked beside the run (:func:`linked_tuning`)."""
    units = list((linked or {}).get("units", {}).values())
    if not units:
        return None
    tuned = sorted((u for u in units if u["tuned"]), key=_sharpest_first_row)
    text = f"Tuning curves on synthetic stimuli (from {linked['dir']}): {len(tuned)} of {len(units)} units tuned"
    if not tuned:
        return text + "."

    def words(u: dict) -> str:
        kind = "CV" if u["sharpness_kind"] == "circular variance" else "size fall-off"
        return f"{u['stage']} {u['channel']} {u['label']} ({kind} {u['sharpness']:.2f})"

    named = "; ".join(words(u) for u in tuned[:n_named])
    more = f"; {len(tuned) - n_named} more in their sections" if len(tuned) > n_named else ""
    harder = sum(1 for u in tuned if u.get("stronger"))
    harder = (f" {harder} of the {len(tuned)} respond more strongly to a family they are not sharply tuned to (their "
              "sections say which), so a label is the sharpest well-driven tuning, not the strongest response."
              ) if harder else ""  # fmt: skip
    return f"{text}, sharpest first: {named}{more}.{harder}"


def _sharpest_first_row(u: dict) -> tuple:
    cv = u["sharpness_kind"] == "circular variance"
    return (not cv, u["sharpness"] if cv else -u["sharpness"])
