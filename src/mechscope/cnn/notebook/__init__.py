"""The CNN half in a notebook: a renderer per result type, registered with :mod:`mechscope.core.show`.

Each renderer returns a whole page built from the report's figure functions and templates; the registry
turns it into a notebook fragment (``_repr_html_``) or writes it (``save_html``). Everything a renderer
reads is a declared field of its result.
"""

from __future__ import annotations

from pathlib import Path

from mechscope.cnn.methods.attributed import AttributionResult
from mechscope.cnn.methods.explained import ExplainResult
from mechscope.cnn.methods.faithfulness import final_rho
from mechscope.cnn.methods.featvis import short_layer_name
from mechscope.cnn.methods.visualised import FeatvisResult
from mechscope.cnn.report import figures
from mechscope.core.render.html import figure_data_uri, file_uri, render_string
from mechscope.core.show import esc, img, page, renders, table_html


@renders(ExplainResult)
def explain_page(r: ExplainResult, full: bool) -> tuple[str, list[str]]:
    from mechscope.cnn.report.microscope import report_context

    ctx = report_context(r, r.linked or {}, r.vrange or (0.0, 1.0), channels=full)
    return render_string("mechscope.cnn", "microscope.html.j2", **ctx), ([] if full else ["the per-channel sections"])


@renders(AttributionResult, keep_open=("Deletion and insertion curves",))
def attribution_page(r: AttributionResult, full: bool = True) -> str:
    rep = r.faithfulness
    rows = []
    for m in rep.ranking():
        rho, fg = (float("nan") if v is None else v for v in (final_rho(m.randomisation),
                                                               final_rho(m.randomisation_on_input)))  # fmt: skip
        rows.append([m.method, m.deletion_auc, m.insertion_auc, m.gap, fg, rho, "yes" if rep.passes(m) else "no"])
    rows.append(["random order", rep.random_deletion_auc, rep.random_insertion_auc,
                 rep.random_insertion_auc - rep.random_deletion_auc, float("nan"), float("nan"), ""])  # fmt: skip
    body = [
        "<h2>Faithfulness</h2>",
        f'<p class="muted">{rep.n_inputs} test images, target: {esc(r.target)}; deletion and insertion areas '
        f"(Petsiuk et al. 2018: lower deletion, higher insertion is more faithful), over the pixels that differ "
        f"from the baseline; ρ: Spearman correlation of |attribution| after randomising every layer "
        f"({', '.join(map(esc, rep.layers))}; Adebayo et al. 2018), passing when |ρ| &lt; {rep.sanity_threshold} on "
        "the image's non-zero pixels (the black background agrees for free). Best first.</p>",
        table_html(["method", "deletion AUC", "insertion AUC", "insertion − deletion", "ρ, non-zero pixels",
                    "ρ, whole image", "passes"], rows),  # fmt: skip
    ]
    if r.completeness is not None:
        c = r.completeness
        body.append(f'<p class="muted">Integrated gradients ({c.steps} steps): completeness gap at most '
                    f"{c.max_abs_delta:.2e} ({c.max_relative_delta:.2%} of the logit change).</p>")  # fmt: skip
    if r.skipped:
        body.append('<p class="muted">Skipped: ' + "; ".join(f"{esc(k)} ({esc(v)})" for k, v in r.skipped.items()))
    if rep.random_deletion_curve is not None:
        deletion = {m.method: m.deletion_curve for m in rep.methods} | {"random": rep.random_deletion_curve}
        insertion = {m.method: m.insertion_curve for m in rep.methods} | {"random": rep.random_insertion_curve}
        curves = figure_data_uri(figures.faithfulness_curves(rep.fractions, deletion, insertion))
        body += ["<h2>Deletion and insertion curves</h2>", img(curves, "faithfulness curves")]
    grids = [(m.method, Path(r.out) / f"{m.method}.png") for m in rep.ranking()] if r.out else []
    grids = [(name, p) for name, p in grids if p.is_file()]
    if grids:
        body.append("<h2>Attribution grids</h2>")
        body += [f"<h3>{esc(name)}</h3>" + img(file_uri(p), f"{name} attribution grid") for name, p in grids]
    return page("Attribution", "\n".join(body))


@renders(FeatvisResult)
def featvis_page(r: FeatvisResult, full: bool = True) -> str:
    s = r.summary
    body = [
        "<h2>Summary</h2>",
        f"<p>{s.exceed_dataset_max} of {s.units} units reach a higher activation on their visualisation than on "
        f"any test image (median ratio {s.median_ratio_to_dataset_max:.2f}); {s.units_never_active_on_test_set} "
        f"never active on the test set."
        + (
            f" {s.logit_visualisations_classified_as_their_class} of {s.logit_visualisations} logit visualisations "
            f"are classified as their own class."
            if s.logit_visualisations
            else ""
        )  # fmt: skip
        + "</p>",
        f'<p class="muted">{esc(r.settings.get("steps"))} steps, {esc(r.settings.get("parameterisation"))} '
        f"parameterisation, seed {esc(r.settings.get('seed'))}; {esc(r.settings.get('transforms', ''))}.</p>",
    ]
    if r.out:
        for layer in dict.fromkeys(u.layer for u in r.units):
            p = Path(r.out) / f"{short_layer_name(layer)}.png"
            if p.is_file():
                body += [f"<h2>{esc(layer)}</h2>", img(file_uri(p), f"{layer} feature visualisations")]
    classified = any(u.assigned_class is not None for u in r.units)  # the logits' visualisations only
    rows = [
        [u.layer, u.unit, u.activation, u.dataset_max,
         float("nan") if u.ratio_to_dataset_max is None else u.ratio_to_dataset_max]
        + ([] if not classified else ["—" if u.assigned_class is None else
                                      f"{r.class_names[u.assigned_class]} ({u.assigned_probability:.2f})"])
        for u in r.units
    ]  # fmt: skip
    head = ["layer", "unit", "on its visualisation", "test-set max", "ratio"]
    body += ["<h2>Every unit</h2>", table_html(head + (["classified as (logit units)"] if classified else []), rows)]
    return page("Feature visualisation", "\n".join(body))

# the renderers of the other results, each module registering its own
from mechscope.cnn.notebook import attribution_graph, discovery, sae  # noqa: E402, F401
