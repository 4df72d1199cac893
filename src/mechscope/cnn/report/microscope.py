"""The microscope report: one self-contained HTML page from an :class:`ExplainResult`.

Draws what the methods measured (figures in :mod:`mechscope.cnn.report.cnn_figures`); computes
nothing new. Every figure is inlined as a base64 PNG, so the page opens offline.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mechscope.cnn.report import cnn_figures as F
from mechscope.cnn.report.summary import noun, plural
from mechscope.core.render.html import file_uri, render
from mechscope.core.render.parallel import draw_all


def overview_figures(r, vrange) -> dict[str, str]:
    names = r.class_names
    w = r.weights
    first = r.stage_names[0]
    figs = {
        "confusion": F.confusion_fig(np.array(r.overview.confusion_matrix), names),
        "filters": F.filters_fig(w.first_filters.numpy(), first),
        "connections": [F.connections_fig(c) for c in w.connections],
        "ablation_mean": F.ablation_fig(r.ablation.stages, "mean", names),
        "ablation_zero": F.ablation_fig(r.ablation.stages, "zero", names),
        "selectivity": [F.selectivity_fig(s, names) for s in r.selectivity],
    }
    last = r.stage_names[-1]
    if w.readout_templates is not None:
        tm, cc = w.readout_templates.numpy(), w.readout_class_channel_sum.numpy()
        figs["templates"] = F.templates_fig(tm, cc, names, last)
    if r.ablation.readout is not None:
        figs["readout_mean"] = F.readout_ablation_fig(r.ablation.readout, "mean", names, last)
    if r.patching is not None:
        figs["patching"] = F.patching_fig(r.patching, names, vrange)
    cs = r.circuits
    if cs.circuits:
        figs["circuits"] = F.circuits_fig(cs, names, len(r.selectivity_of(cs.stage).index))
    return figs


def circuit_figures(r) -> dict[int, str]:
    cs = r.circuits
    maps = r.selectivity_of(cs.stage).maps.numpy()  # [K, C, H, W]
    templates = r.weights.readout_templates
    use_t = templates is not None and cs.stage == r.stage_names[-1]
    return {
        ci.target: F.class_circuit_fig(
            ci, cs, r.class_names, maps[ci.target], templates[ci.target].numpy() if use_t else None
        )
        for ci in cs.circuits
    }


def _weights_image(r, stage_index: int, c: int) -> tuple[np.ndarray, str]:
    if stage_index == 0:
        w = r.weights.first_filters[c].numpy()  # [C_in, k, k]
        k = w.shape[-1]
        return (w[0], f"{k}×{k} filter") if w.shape[0] == 1 else (F.tile(w, 3), f"{k}×{k} filter per input channel")
    conn = r.weights.connections[stage_index - 1]
    kern = conn.kernels[c].numpy()  # [C_prev, k, k]
    return F.tile(kern, 8), f"incoming {kern.shape[-1]}×{kern.shape[-1]} kernels from {conn.source} channels"


def _links(r, stage_index: int, c: int) -> list[dict]:
    conns = r.weights.connections
    if stage_index > 0:
        conn = conns[stage_index - 1]
        norm, ssum = conn.kernel_norm.numpy(), conn.kernel_sum.numpy()
        return [
            {"layer": conn.source, "channel": int(i), "norm": float(norm[c, i]), "sum": float(ssum[c, i])}
            for i in np.argsort(-norm[c])[:5]
        ]
    if not conns:
        return []
    conn = conns[0]
    norm, ssum = conn.kernel_norm.numpy(), conn.kernel_sum.numpy()
    return [
        {"layer": conn.target, "channel": int(j), "norm": float(norm[j, c]), "sum": float(ssum[j, c])}
        for j in np.argsort(-norm[:, c])[:5]
    ]


def channel_sections(r, linked: dict, vrange) -> tuple[list[dict], list[tuple]]:
    """Each channel's section and the arguments of its figure (:func:`~mechscope.cnn.report.cnn_figures.channel_fig`),
    drawn by the caller: the section's ``figure`` is filled in from the second list."""
    names = r.class_names
    fv = (linked or {}).get("featvis") or {}
    tuning = ((linked or {}).get("tuning") or {}).get("units", {})  # `cnn tuning` of the same weights
    members = r.circuits.membership()
    templates = r.weights.readout_templates
    sections, jobs = [], []
    for i, stage in enumerate(r.stage_names):
        sel, ex, ab = r.selectivity_of(stage), r.examples_of(stage), r.ablation.stage(stage)
        last = i == len(r.stage_names) - 1
        for c in range(len(sel.index)):
            profile = sel.class_means[c].numpy()
            weights, title = _weights_image(r, i, c)
            ch = {
                "stage": stage, "channel": c, "weights": weights, "weights_title": title,
                "template": templates[:, c].numpy() if (last and templates is not None) else None,
                "mean_map": sel.maps[int(profile.argmax()), c].numpy(), "profile": profile,
                "zero": ab.zero[c].numpy(), "mean": ab.mean[c].numpy(), "examples": ex.images[c].numpy(),
                "labels": ex.top_labels[c].tolist(), "boxes": ex.boxes[c].tolist(),
                "ixg": ex.input_x_gradient[c].numpy(),
            }  # fmt: skip
            unit = fv.get("units", {}).get(f"{stage}_{c}")
            pt = r.patching.stage(stage).channel_mean[c] * 100 if r.patching is not None else None
            jobs.append((ch, names, vrange))
            sections.append(
                {
                    "id": f"{stage}-{c}", "stage": stage, "channel": c, "figure": None,
                    "featvis": file_uri(unit["png"]) if unit else None,
                    "featvis_ratio": unit.get("ratio_to_dataset_max") if unit else None,
                    "preferred": names[int(profile.argmax())], "selectivity": float(sel.index[c]),
                    "region": sel.region_on_preferred_class[c], "profile": profile.tolist(),
                    "zero": (ab.zero[c] * 100).tolist(), "mean": (ab.mean[c] * 100).tolist(),
                    "zero_overall": float(ab.zero_overall[c]) * 100, "mean_overall": float(ab.mean_overall[c]) * 100,
                    "links": _links(r, i, c), "outgoing": i == 0,
                    "circuits": [names[d] for d in members.get(c, [])] if stage == r.circuits.stage else [],
                    "patching": float(pt) if pt is not None else None,
                    "tuning": _tuning_view(tuning.get(f"{stage}_{c}")),
                }
            )  # fmt: skip
    return sections, jobs


def _tuning_view(row: dict | None) -> dict | None:
    """A channel's tuning curves (RUN/tuning/units/STAGE_C.png) and label, for its section."""
    if not row or row.get("png") is None:
        return None
    return {"uri": file_uri(row["png"]), "label": row["label"], "tuned": row["tuned"], "reason": row["reason"]}


def write_report(r, out: Path) -> Path:
    """Render report.html from an :class:`~mechscope.cnn.methods.explained.ExplainResult`: its ``linked`` outputs of
    ``visualize``, ``attribute``, ``tuning`` and ``blocks`` found beside the run, drawn in its ``vrange``."""
    return render("mechscope.cnn", "microscope.html.j2", out, **report_context(r, r.linked or {}, r.vrange))


def report_context(r, linked: dict, vrange: tuple[float, float] = (0.0, 1.0), channels: bool = True) -> dict:
    """What microscope.html.j2 draws; ``channels=False`` leaves out the per-channel sections (a notebook's
    summary view: they are most of the page's size and drawing time)."""
    at = (linked or {}).get("attribution")
    attribution = None
    if at:
        shown = [name for name in at["ranking"][:2] if name in at["pngs"]]
        attribution = {
            "dir": str(at["dir"]),
            "ranking": at["ranking"],
            "checks": at.get("checks", []),
            "threshold": at.get("threshold"),
            "figures": [(name, file_uri(at["pngs"][name])) for name in shown],
        }
    fv = (linked or {}).get("featvis")
    sections, jobs = channel_sections(r, linked, vrange) if channels else ([], [])
    pngs, (figs, class_figs) = draw_all(F.channel_fig, jobs, lambda: (overview_figures(r, vrange), circuit_figures(r)))
    for section, png in zip(sections, pngs, strict=True):
        section["figure"] = png
    return dict(
        r=r,
        word=noun(r.class_names),
        words=plural(noun(r.class_names)),
        names=r.class_names,
        figs=figs,
        sections=sections,
        class_figs=class_figs,
        attribution=attribution,
        featvis=({"dir": str(fv["dir"]), "summary": fv.get("summary", {})} if fv else None),
        tuning=(linked or {}).get("tuning"),  # RUN/tuning: {"dir", "stale": why not shown or None, "units"}
        link_notes=(linked or {}).get("notes", []),  # outputs beside the run left out (made from other weights)
        blocks=(linked or {}).get("blocks"),  # relative link to the run's Building Blocks report
        seconds=r.seconds,
    )
