"""One renderer per result type: the report's figure functions and templates, made into a notebook fragment.

A renderer returns a whole HTML page (the report, or for results without a report of their own a
small page built from the report's figure functions); :func:`to_html` turns it into a fragment
(:func:`~mechscope.notebook.fragment.page_to_fragment`) and :func:`save_html` writes the page.
"""

from __future__ import annotations

import base64
import html as H
from dataclasses import fields, is_dataclass
from pathlib import Path
from types import SimpleNamespace

import markupsafe
import numpy as np

from mechscope.notebook.fragment import MAX_CHARS, page_to_fragment

PAGE_CSS = """
 body { font-family: system-ui, sans-serif; color: #222; }
 h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 1.2em; }
 table { border-collapse: collapse; font-size: .85em; margin: .5em 0; } td, th { border: 1px solid #ddd; padding: .2em .5em; text-align: right; }
 th { background: #f4f4f4; } td.l, th.l { text-align: left; } img { max-width: 100%; } .muted { color: #777; font-size: .9em; }
 .grid { display: flex; flex-wrap: wrap; gap: 1em; } .grid figure { margin: 0; }
"""  # noqa: E501


def page(title: str, body: str) -> str:
    """A minimal self-contained page in the reports' style."""
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{H.escape(title)}</title>'
        f"<style>{PAGE_CSS}</style></head>\n<body>\n<h1>{H.escape(title)}</h1>\n{body}\n</body></html>"
    )


def esc(x) -> str:
    return str(markupsafe.escape(x))


def table_html(columns: list[str], rows: list[list]) -> str:
    def cell(v):
        if isinstance(v, float):
            return "—" if np.isnan(v) else f"{v:.3f}"
        return esc(v)

    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def img(uri: str, alt: str) -> str:
    return f'<img src="{uri}" alt="{esc(alt)}">'


def uri_of_png(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


# ---- the CNN half -----------------------------------------------------------------------------


def explain_page(r, full: bool) -> tuple[str, list[str]]:
    from mechscope.report.html import render_string
    from mechscope.report.microscope import report_context

    ctx = report_context(r, getattr(r, "_linked", None) or {}, getattr(r, "_vrange", (0.0, 1.0)), channels=full)
    return render_string("microscope.html.j2", **ctx), ([] if full else ["the per-channel sections"])


def attribution_page(r) -> str:
    from mechscope.report import figures
    from mechscope.report.html import figure_data_uri

    rep = r.faithfulness
    rows = []
    for m in rep.ranking():
        rho = list(m.randomisation.values())[-1] if m.randomisation else float("nan")
        rows.append([m.method, m.deletion_auc, m.insertion_auc, m.gap, rho, "yes" if rep.passes(m) else "no"])
    rows.append(["random order", rep.random_deletion_auc, rep.random_insertion_auc,
                 rep.random_insertion_auc - rep.random_deletion_auc, float("nan"), ""])  # fmt: skip
    body = [
        "<h2>Faithfulness</h2>",
        f'<p class="muted">{rep.n_inputs} test images, target: {esc(r.target)}; deletion and insertion areas '
        f"(Petsiuk et al. 2018: lower deletion, higher insertion is more faithful); ρ: Spearman correlation of "
        f"|attribution| after randomising every layer ({', '.join(map(esc, rep.layers))}; Adebayo et al. 2018), "
        f"passing when |ρ| &lt; {rep.sanity_threshold}. Best first.</p>",
        table_html(
            ["method", "deletion AUC", "insertion AUC", "insertion − deletion", "ρ after randomisation", "passes"], rows
        ),  # fmt: skip
    ]
    if r.completeness is not None:
        c = r.completeness
        body.append(f'<p class="muted">Integrated gradients ({c.steps} steps): completeness gap at most '
                    f"{c.max_abs_delta:.2e} ({c.max_relative_delta:.2%} of the logit change).</p>")  # fmt: skip
    if r.skipped:
        body.append('<p class="muted">Skipped: ' + "; ".join(f"{esc(k)} ({esc(v)})" for k, v in r.skipped.items()))
    deletion = {m.method: m.deletion_curve for m in rep.methods} | {"random": rep.random_deletion_curve}
    insertion = {m.method: m.insertion_curve for m in rep.methods} | {"random": rep.random_insertion_curve}
    curves = figure_data_uri(figures.faithfulness_curves(rep.fractions, deletion, insertion))
    body += ["<h2>Deletion and insertion curves</h2>", img(curves, "faithfulness curves")]
    out = getattr(r, "_out", None)
    grids = [(m.method, Path(out) / f"{m.method}.png") for m in rep.ranking()] if out else []
    grids = [(name, p) for name, p in grids if p.is_file()]
    if grids:
        body.append("<h2>Attribution grids</h2>")
        body += [f"<h3>{esc(name)}</h3>" + img(uri_of_png(p), f"{name} attribution grid") for name, p in grids]
    return page("Attribution", "\n".join(body))


def featvis_page(r) -> str:
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
    out = getattr(r, "_out", None)
    if out:
        from mechscope.methods.featvis import short_layer_name

        for layer in dict.fromkeys(u.layer for u in r.units):
            p = Path(out) / f"{short_layer_name(layer)}.png"
            if p.is_file():
                body += [f"<h2>{esc(layer)}</h2>", img(uri_of_png(p), f"{layer} feature visualisations")]
    rows = [
        [u.layer, u.unit, u.activation, u.dataset_max,
         float("nan") if u.ratio_to_dataset_max is None else u.ratio_to_dataset_max,
         "" if u.assigned_class is None else f"{r.class_names[u.assigned_class]} ({u.assigned_probability:.2f})"]
        for u in r.units
    ]  # fmt: skip
    body += [
        "<h2>Every unit</h2>",
        table_html(["layer", "unit", "on its visualisation", "test-set max", "ratio", "classified as"], rows),
    ]
    return page("Feature visualisation", "\n".join(body))


# ---- the language half ------------------------------------------------------------------------


def _token_text(result) -> dict[str, list[str]]:
    text = result.examples.get("token_text") or {}
    return {k: text.get(k) or [str(i) for i in v["tokens"]] for k, v in result.examples.items()
            if k in ("repeated", "text")}  # fmt: skip


def heads_page(result) -> str:
    from mechscope.report.heads import report_context
    from mechscope.report.html import render_string

    return render_string("heads.html.j2", **report_context(result, _token_text(result)))


def heads_table(result, n: int | None = 20):
    from mechscope.notebook.viewer import Table
    from mechscope.report.heads import TABLE_SCORES, table_rows

    total = result.scores["induction"].size
    rows = table_rows(result, total if n is None else n)
    cols = ["head", "label", *TABLE_SCORES, "ablation_sd", "measured"]
    return Table(rows, cols, title=f"{result.model}: heads ranked by induction score")


def heads_show(result, layer: int, head: int, model=None):
    from mechscope.errors import MechscopeError
    from mechscope.lm import _pattern, check_head
    from mechscope.notebook.viewer import AttentionViewer

    ex = result.examples
    key = f"{layer}.{head}"
    rep = ex["repeated"]
    text = _token_text(result)["repeated"]
    if key in rep["patterns"]:
        pattern = np.asarray(rep["patterns"][key])
    else:
        ref = ex.get("model")
        model = model if model is not None else (ref() if ref is not None else None)
        if model is None:
            raise MechscopeError(f"head {key} was not kept for the viewer; pass model= to compute it")
        layer, head = check_head(model, layer, head)
        import torch

        pattern = _pattern(model, torch.tensor([rep["tokens"]]), layer, head)
    return AttentionViewer(text, pattern, layer, head, f"head {key} on repeated random tokens")


def composition_page(comp) -> str:
    from mechscope.report.circuits import composition_figure

    holder = SimpleNamespace(composition=comp)
    many = comp.scores["K"].shape[0] > 1
    body = [
        "<h2>Strongest pairs</h2>",
        f"<p>Q-, K- and V-composition (Elhage et al. 2021) of every pair of heads in different layers, on the folded "
        f"weights: ‖W_OV¹ · W²‖ / (‖W_OV¹‖ ‖W²‖). Random matrices of these shapes score {comp.baseline.mean:.4f} ± "
        f"{comp.baseline.std:.4f} ({comp.baseline.samples} seeded draws); “above baseline” subtracts that mean.</p>",
        '<div class="grid">',
    ]
    for mode in ("Q", "K", "V"):
        rows = [[f"{p['source']} → {p['target']}", p["score"], p["above_baseline"]] for p in comp.top_pairs(mode, 10)]
        body.append(table_html([f"{mode}: source → target", "score", "above baseline"], rows))
    body.append("</div>")
    if many:
        body.append("<h2>Every pair</h2>")
        body += [img(composition_figure(holder, m), f"{m}-composition") for m in ("Q", "K", "V")]
    return page("Composition between heads", "\n".join(body))


def circuits_page(result) -> str:
    from mechscope.report.circuits import report_context
    from mechscope.report.html import render_string

    nb = getattr(result, "_notebook", None) or {}
    return render_string("circuits.html.j2", **report_context(result, nb.get("decode", str), nb.get("prompt_text")))


def toy_page(toy) -> str:
    from mechscope.report.html import render_string
    from mechscope.report.toy import report_context

    return render_string("toy.html.j2", **report_context(toy.series))


def neurons_page(result) -> str:
    from mechscope.report.html import render_string
    from mechscope.report.neurons import report_context

    nb = getattr(result, "_notebook", None) or {}
    return render_string("neurons.html.j2", **report_context(result, nb.get("decode", str)))


def head_scores_page(r) -> str:
    from mechscope.report.heads import TITLES, layer_head_figure, loss_plot

    best = r.ranked("induction")[0]
    body = [
        "<h2>Summary</h2>",
        f"<p>On {r.tokens.shape[0]} sequences of BOS + {r.n} random tokens + the same {r.n} again, the loss falls "
        f"from {r.loss_first_half:.2f} nats on the first copy to {r.loss_second_half:.2f} on the second. The "
        f"highest induction score is {r.scores['induction'][best]:.2f} (head {best[0]}.{best[1]}).</p>",
        "<h2>Heads ranked by induction score</h2>",
        r.table(10)._repr_html_(),
        "<h2>Loss per position</h2>",
        img(loss_plot(r.loss_per_position, r.n), "loss per position"),
        "<h2>Scores for every head</h2>",
        '<div class="grid">'
        + "".join(img(layer_head_figure(v, TITLES.get(k, k), False), k) for k, v in r.scores.items())
        + "</div>",
    ]
    return page(f"Attention scores — {r.model}", "\n".join(body))


def ablation_page(r) -> str:
    heads = ", ".join(f"{layer}.{h}" for layer, h in r.heads)
    sd = float(np.std(r.per_sequence))
    body = [
        "<h2>Loss on the second copy</h2>",
        table_html(
            ["heads", "ablation", "clean loss", "ablated loss", "increase (mean ± sd over sequences)"],
            [[heads, r.kind, r.clean_loss, r.ablated_loss, f"{r.loss_increase:+.3f} ± {sd:.3f}"]],
        ),  # fmt: skip
    ]
    return page(f"{r.kind.capitalize()}-ablation of {heads}", "\n".join(body))


# ---- anything else: its fields ----------------------------------------------------------------


def _short(v) -> str:
    import torch

    if isinstance(v, torch.Tensor | np.ndarray):
        return f"array {list(v.shape)}"
    if is_dataclass(v) and not isinstance(v, type):
        return type(v).__name__
    if isinstance(v, dict):
        return f"dict of {len(v)}" if len(v) > 8 else ", ".join(f"{k}: {_short(x)}" for k, x in v.items())
    if isinstance(v, list | tuple):
        return f"{len(v)} items" if len(v) > 12 else "[" + ", ".join(_short(x) for x in v) + "]"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def fields_page(obj) -> str:
    rows = [[f.name, _short(getattr(obj, f.name))] for f in fields(obj)] if is_dataclass(obj) else []
    return page(type(obj).__name__, "<h2>Fields</h2>" + table_html(["field", "value"], rows))


# ---- dispatch ---------------------------------------------------------------------------------

PAGES = {
    "AttributionResult": attribution_page,
    "FeatvisResult": featvis_page,
    "HeadsResult": heads_page,
    "CompositionResult": composition_page,
    "CircuitsResult": circuits_page,
    "ToyTraining": toy_page,
    "NeuronsResult": neurons_page,
    "HeadScores": head_scores_page,
    "AblationResult": ablation_page,
}


def _page(obj, full: bool) -> tuple[str, list[str]]:
    name = type(obj).__name__
    if name == "ExplainResult":
        return explain_page(obj, full)
    if name == "AblationResult" and not hasattr(obj, "heads"):  # the CNN's ablation study: its fields
        return fields_page(obj), []
    return PAGES.get(name, fields_page)(obj), []


KEEP_OPEN = {  # besides the first section: what a notebook user most wants to see at once
    "HeadsResult": ("Heads ranked by induction score", "Attention patterns"),
    "HeadScores": ("Heads ranked by induction score",),
    "AttributionResult": ("Deletion and insertion curves",),
}


def summary_text(obj) -> str:
    """One line for IPython's text/plain beside the HTML."""
    name = type(obj).__name__
    what = getattr(obj, "model", None)
    what = f" of {what}" if isinstance(what, str) and what else ""
    return f"<mechscope {name}{what}: shown as HTML; .save_html(path) writes its report>"


def to_html(obj, max_chars: int = MAX_CHARS) -> str:
    """``obj``'s notebook fragment: its report section, summary open, the rest folded, under ``max_chars``."""
    text, omitted = _page(obj, full=False)
    keep = KEEP_OPEN.get(type(obj).__name__, ())
    return page_to_fragment(text, keep_open=keep, max_chars=max_chars, omitted=omitted)


def save_html(obj, path) -> Path:
    """Write ``obj``'s whole report page (every section; one self-contained file) to ``path``."""
    path = Path(path)
    text, _ = _page(obj, full=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path
