"""The Building Blocks report: sentences and figures from a :class:`~mechscope.cnn.methods.blocks.BlocksResult`.

Computes nothing new: every number is a field of the result; the page is one self-contained
HTML file (figures inlined as base64 PNG).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from mechscope.cnn.report import blocks_figures as BF
from mechscope.core.render.html import render

LINK_MIN = 0.15  # links thinner than this share of the pair's strongest are left out of the flow figure


def _pct(v: float) -> str:
    return f"{100 * v:.1f}%"


def _flow_to_classes(r):
    return next(f for f in r.flows if f.target == "logits")


def shown_classes(r) -> list[int]:
    """Classes drawn in the flow: every class for typical images, else the 3 with the largest logit change."""
    flow = _flow_to_classes(r)
    if r.settings.get("typical"):
        return list(range(len(r.class_names)))
    return [int(c) for c in np.argsort(-flow.actual_change, kind="stable")[:3]]


def selection_line(r) -> str:
    s, names = r.selection, r.class_names
    if len(s.images) == 1:
        ok = "" if s.labels[0] == s.predictions[0] else f", predicted {names[s.predictions[0]]}"
        return (f"Test image {s.images[0]} (class {names[s.labels[0]]}{ok}; softmax probability of its class "
                f"{s.probabilities[0]:.3f}).")  # fmt: skip
    return f"{len(s.images)} test images: {s.how} (lowest probability among them {min(s.probabilities):.3f})."


EXACT_GAP = 1e-4  # groups + residual within this share of the largest actual change: gradient × activation is exact


def is_exact(f) -> bool:
    """Whether a flow's gradient × activation equals the actual change from zeroing its source (within EXACT_GAP)."""
    scale = max(float(np.abs(f.actual_change).max()), 1e-12)
    return bool(float(np.abs(f.completeness_gap).max()) <= EXACT_GAP * scale)


def layer_line(lb) -> str:
    g = lb.groups
    how = f"the smallest k reaching {_pct(g.threshold)}" if g.chosen_by == "threshold" else "set by --groups"
    neg = ""
    if g.negative_share > 1e-3:
        neg = f"; {_pct(g.negative_share)} of the squared activation is negative and left out"
    c, h, w = lb.shape
    return (f"{lb.stage} ({c} channels × {h}×{w} positions): k = {g.k} groups ({how}) explain "
            f"{_pct(g.explained)} of the squared activation; the largest group carries {_pct(g.share[0])} of the "
            f"groups' summed squared norm (Σ_g ‖W_g H_g‖²){neg}.")  # fmt: skip


def class_flow_line(r, c: int) -> str:
    f = _flow_to_classes(r)
    col = f.attribution[:, c]
    order = np.argsort(-np.abs(col), kind="stable")[:3]
    parts = ", ".join(f"{f.source} group {g + 1} {col[g]:+.2f} (measured, as is minus removed alone: "
                      f"{f.removal[g, c]:+.2f})" for g in order)  # fmt: skip
    how = ("exact here: groups + residual equal the measured contribution" if is_exact(f)
           else "a first-order estimate through the non-linearities")  # fmt: skip
    return (f"Logit {r.class_names[c]}, by gradient × activation along each group ({how}): {f.source}'s groups "
            f"contribute {col.sum():+.2f} of {f.source}'s measured contribution {f.actual_change[c]:+.2f} (the logit "
            f"as it is minus the logit with {f.source} set to zero; the rest, {f.residual[c]:+.2f}, outside the "
            f"groups); largest by |contribution|: {parts}. A contribution is as is minus without: positive raises "
            "the logit.")  # fmt: skip


def pair_line(f) -> str:
    a = f.attribution
    flat = np.argsort(-np.abs(a), axis=None, kind="stable")[:3]
    cells = [np.unravel_index(k, a.shape) for k in flat]
    parts = ", ".join(f"group {i + 1} → {f.targets[j]} {a[i, j]:+.2f} (measured, as is minus group {i + 1} removed "
                      f"alone: {f.removal[i, j]:+.2f})" for i, j in cells)  # fmt: skip
    how = "exact" if is_exact(f) else "a first-order estimate, not an ablation"
    return f"{f.source} → {f.target}, by gradient × activation ({how}): largest links by |attribution| {parts}."


def completeness_line(f) -> str:
    gap = np.abs(f.completeness_gap)
    scale = max(float(np.abs(f.actual_change).max()), 1e-12)
    if f.target == "logits" and is_exact(f):
        return (
            f"{f.source} → logits: groups + residual equal {f.source}'s measured contribution (as is minus set to "
            f"zero) for every class (largest gap {gap.max():.1e}; the read-out is linear, so gradient × activation is "
            "exact)."
        )
    return (f"{f.source} → {f.target}: groups + residual = gradient × activation, against {f.source}'s measured "
            f"contribution (as is minus set to zero): largest gap {gap.max():.3f} ({_pct(gap.max() / scale)} of the "
            "largest contribution), a first-order estimate through the non-linearities.")  # fmt: skip


def summary_lines(r) -> list[str]:
    lines = [selection_line(r)] + [layer_line(lb) for lb in r.layers]
    if not r.settings.get("typical"):
        f, shown = _flow_to_classes(r), shown_classes(r)
        lines.append(f"Logits followed here and in the flow figure: the {len(shown)} that {f.source} contributes most "
                     "to (measured, as is minus set to zero): "
                     + ", ".join(f"{r.class_names[c]} {f.actual_change[c]:+.2f}" for c in shown) + ".")
        lines += [class_flow_line(r, c) for c in shown]
    else:
        lines.append("Towards each class (mean over its typical images): " + "; ".join(
            f"{r.class_names[c]}: {_top_group(r, c)}" for c in range(len(r.class_names)))
            + " (the group with the largest gradient × activation towards each class; "
            + ("exact here: groups + residual equal the measured contribution)." if is_exact(_flow_to_classes(r))
               else "a first-order estimate through the non-linearities)."))  # fmt: skip
    lines += [pair_line(f) for f in r.flows if f.target != "logits"]
    lines += [completeness_line(f) for f in r.flows]
    return lines


def _top_group(r, c: int) -> str:
    f = _flow_to_classes(r)
    g = int(np.argmax(f.attribution[:, c]))
    return f"group {g + 1} {f.attribution[g, c]:+.2f}"


# ---- figures ---------------------------------------------------------------------------------


def to_input(heat: np.ndarray, stage, hw: tuple[int, int]) -> np.ndarray:
    """A stage's map [h, w] drawn over the input [H, W]: each pixel takes the position whose receptive field is
    centred nearest to it."""
    rf = stage.rf_out
    idx = []
    for a, n in enumerate(heat.shape):
        centre0 = rf.start[a] + (rf.size[a] - 1) / 2
        idx.append(np.clip(np.rint((np.arange(hw[a]) - centre0) / rf.jump[a]), 0, n - 1).astype(int))
    return heat[np.ix_(idx[0], idx[1])]


def _cell_box(spec_stage, lb, cell: int, hw: tuple[int, int]) -> tuple[int, int, int, int]:
    gh, gw = lb.grid
    _, h, w = lb.shape
    gy, gx = divmod(cell, gw)
    ys = (gy * h // gh, math.ceil((gy + 1) * h / gh) - 1)
    xs = (gx * w // gw, math.ceil((gx + 1) * w / gw) - 1)
    a, b = spec_stage.rf_out.box(ys[0], xs[0], *hw), spec_stage.rf_out.box(ys[1], xs[1], *hw)
    return (a[0], b[1], a[2], b[3])


def dictionary_rows(r, spec, lb, image: np.ndarray, vrange, n: int = 6) -> list[dict]:
    cells = BF._disp(r.images["cells"][lb.stage][0], vrange)
    chans = BF._disp(r.images["channels"][lb.stage], vrange)
    gw = lb.grid[1]
    rows = []
    for cell in np.argsort(-lb.cell_norms[0], kind="stable")[:n]:
        chs = [{"channel": int(c), "value": float(v), "image": chans[int(c)]}
               for c, v in zip(lb.top_channels[0, cell], lb.top_values[0, cell], strict=True)]  # fmt: skip
        rows.append({"input": image, "box": _cell_box(spec.stage(lb.stage), lb, int(cell), image.shape[:2]),
                     "cell": cells[cell], "cell_yx": divmod(int(cell), gw), "channels": chs})  # fmt: skip
    return rows


def group_rows(r, spec, lb, x_test, vrange) -> list[dict]:
    g = lb.groups
    c, h, w = lb.shape
    imgs = BF._disp(r.images["groups"][lb.stage], vrange)
    first = r.selection.images.index(r.selection.shown[0])
    maps = g.spatial[first * h * w : (first + 1) * h * w].reshape(h, w, g.k)
    rows = []
    for k in range(g.k):
        top = np.argsort(-g.directions[k])[:3]
        ex = BF._disp(x_test[lb.example_images[k]], vrange)
        chans = ", ".join(f"ch {int(t)}" for t in top)
        heat = to_input(maps[..., k], spec.stage(lb.stage), x_test.shape[2:])
        rows.append({"label": f"group {k + 1}\n{_pct(g.share[k])} of the norm²\n{chans}", "image": imgs[k], "map": heat,
                     "examples": ex, "boxes": lb.example_boxes[k].tolist()})  # fmt: skip
    return rows


def flow_figure(r, vrange) -> str:
    columns, links = [], []
    for lb in r.layers:
        imgs = BF._disp(r.images["groups"][lb.stage], vrange)
        columns.append({"name": lb.stage, "nodes": [{"label": f"group {k + 1}", "image": imgs[k]}
                                                     for k in range(lb.groups.k)]})  # fmt: skip
    classes = shown_classes(r)
    columns.append({"name": "classes", "nodes": [{"label": r.class_names[c], "image": None} for c in classes]})
    for col, f in enumerate(r.flows):
        a = f.attribution if f.target != "logits" else f.attribution[:, classes]
        top = max(float(np.abs(a).max()), 1e-12)
        for i, j in np.ndindex(*a.shape):
            if abs(a[i, j]) >= LINK_MIN * top:
                links.append({"col": col, "src": i, "dst": j, "value": float(a[i, j]), "width": abs(a[i, j]) / top})
    title = ("attribution (gradient × activation along each group) between the groups of adjacent stages and to the "
             f"classes\nred for, blue against; widths scaled per column pair; links under {LINK_MIN:.0%} of the "
             "pair's strongest left out")  # fmt: skip
    return BF.flow_fig(columns, links, title)


def layer_sections(r, spec, x_test, vrange) -> list[dict]:
    sel = r.selection
    out = []
    for lb in r.layers:
        rows = []
        for s_i, idx in enumerate(sel.shown):
            row = sel.images.index(idx)
            rows.append({"image": BF._disp(r.inputs[row : row + 1], vrange)[0], "norms": lb.cell_norms[s_i],
                         "cells": BF._disp(r.images["cells"][lb.stage][s_i], vrange),
                         "label": f"#{idx} {r.class_names[sel.labels[row]]}"})  # fmt: skip
        grids = [BF.grid_fig(rows, lb.grid, lb.stage, lb.crop)]
        first = BF._disp(r.inputs[sel.images.index(sel.shown[0]) :][:1], vrange)[0]
        out.append({
            "lb": lb, "line": layer_line(lb), "grids": grids,
            "dictionary": BF.dictionary_fig(dictionary_rows(r, spec, lb, first, vrange), lb.stage),
            "groups": BF.groups_fig(lb.stage, group_rows(r, spec, lb, x_test, vrange), first),
        })  # fmt: skip
    return out


def write_report(r, out: Path, vrange, spec, x_test) -> Path:
    """report.html for a :class:`~mechscope.cnn.methods.blocks.BlocksResult` (``x_test`` for the example images)."""
    sel = r.selection
    titles = [f"#{i} {r.class_names[y]}" for i, y in zip(sel.images, sel.labels, strict=True)]
    return render(
        "mechscope.cnn", "blocks.html.j2", out, r=r, summary=summary_lines(r),
        inputs=BF.input_fig(BF._disp(r.inputs, vrange)[:40], titles[:40]),
        curve=BF.curve_fig({lb.stage: lb.groups.curve for lb in r.layers},
                           {lb.stage: lb.groups.k for lb in r.layers}, r.layers[0].groups.threshold),
        flow=flow_figure(r, vrange), sections=layer_sections(r, spec, x_test, vrange),
        classes=shown_classes(r), exact=[is_exact(f) for f in r.flows],
    )  # fmt: skip
