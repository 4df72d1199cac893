"""The language half in a notebook: a renderer and views per result type, registered with :mod:`mechscope.core.show`.

Each renderer returns a whole page (the report's template, or for results without a report of their own a
small page built from the report's figure functions); the registry turns it into a notebook fragment
(``_repr_html_``) or writes it (``save_html``). Views (``result.table()``, ``result.show(layer, head)``) are
registered here too, so that no result or method imports rendering. Everything a renderer reads is a declared
field of its result.
"""

from __future__ import annotations

import numpy as np

from mechscope.core.errors import MechscopeError
from mechscope.core.render.html import render_string
from mechscope.core.render.viewer import AttentionViewer, Table
from mechscope.core.show import img, page, renders, table_html, views
from mechscope.core.stats import sample_sd
from mechscope.lm.methods.ablation import HeadAblationResult
from mechscope.lm.methods.circuits import CircuitsResult
from mechscope.lm.methods.composition import CompositionResult
from mechscope.lm.methods.heads import HeadsResult
from mechscope.lm.methods.neurons import NeuronsResult
from mechscope.lm.methods.scores import HeadScores, attention_pattern, check_head
from mechscope.lm.toy import ToyTraining


@renders(HeadsResult, keep_open=("Heads ranked by induction score", "Attention patterns"))
def heads_page(result: HeadsResult, full: bool = True) -> str:
    from mechscope.lm.report.heads import report_context

    return render_string("mechscope.lm", "heads.html.j2", **report_context(result))


def _rows(n) -> int:
    """A table's row count: an integer from 1 (-1 was a slice that dropped the last head; 0 an empty table)."""
    from mechscope.core.validate import check_int

    return check_int(n, "n (the rows shown; None: every head)", 1)


@views(HeadsResult, "table")
def heads_table(result: HeadsResult, n: int | None = 20) -> Table:
    from mechscope.lm.report.heads import TABLE_SCORES, table_rows

    total = result.scores["induction"].size
    rows = table_rows(result, total if n is None else _rows(n))
    cols = ["head", "label", *TABLE_SCORES, "ablation_sd", "measured"]
    return Table(rows, cols, title=f"{result.model}: heads ranked by induction score")


@views(HeadsResult, "show")
def heads_show(result: HeadsResult, layer: int, head: int, model=None) -> AttentionViewer:
    ex = result.examples or {}
    key = f"{layer}.{head}"
    rep = ex.get("repeated")
    if rep is None:
        raise MechscopeError("this result keeps no token sequences (it was loaded from heads.json)")
    from mechscope.lm.report.heads import token_texts

    text = token_texts(result)["repeated"]
    if key in rep["patterns"]:
        pattern = np.asarray(rep["patterns"][key])
    else:
        ref = result.model_ref
        model = model if model is not None else (ref() if ref is not None else None)
        if model is None:
            raise MechscopeError(f"head {key} was not kept for the viewer; pass model= to compute it")
        layer, head = check_head(model, layer, head)
        import torch

        pattern = attention_pattern(model, torch.tensor([rep["tokens"]]), layer, head)
    return AttentionViewer(text, pattern, layer, head, f"head {key} on repeated random tokens")


@renders(CompositionResult)
def composition_page(comp: CompositionResult, full: bool = True) -> str:
    from mechscope.lm.report.circuits import composition_figure

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
    if comp.scores is not None and comp.scores["K"].shape[0] > 1:
        body.append("<h2>Every pair</h2>")
        body += [img(composition_figure(comp, m), f"{m}-composition") for m in ("Q", "K", "V")]
    return page("Composition between heads", "\n".join(body))


@renders(CircuitsResult)
def circuits_page(result: CircuitsResult, full: bool = True) -> str:
    from mechscope.lm.report.circuits import report_context

    return render_string("mechscope.lm", "circuits.html.j2", **report_context(result))


@renders(ToyTraining)
def toy_page(toy: ToyTraining, full: bool = True) -> str:
    from mechscope.lm.report.toy import report_context

    return render_string("mechscope.lm", "toy.html.j2", **report_context(toy.series))


@renders(NeuronsResult)
def neurons_page(result: NeuronsResult, full: bool = True) -> str:
    from mechscope.lm.report.neurons import report_context

    return render_string("mechscope.lm", "neurons.html.j2", **report_context(result, result.decoder or str))


@renders(HeadScores, keep_open=("Heads ranked by induction score",))
def head_scores_page(r: HeadScores, full: bool = True) -> str:
    from mechscope.lm.report.heads_figures import TITLES, layer_head_figure, loss_plot

    best = r.ranked("induction")[0]
    body = [
        "<h2>Summary</h2>",
        f"<p>On {r.tokens.shape[0]} sequences of BOS + {r.n} random tokens + the same {r.n} again, the loss falls "
        f"from {r.loss_first_half:.2f} nats on the first copy to {r.loss_second_half:.2f} on the second. The "
        f"highest induction score is {r.scores['induction'][best]:.2f} (head {best[0]}.{best[1]}).</p>",
        "<h2>Heads ranked by induction score</h2>",
        head_scores_table(r, 10)._repr_html_(),
        "<h2>Loss per position</h2>",
        img(loss_plot(list(r.loss_per_position), r.n), "loss per position"),
        "<h2>Scores for every head</h2>",
        '<div class="grid">'
        + "".join(img(layer_head_figure(v, TITLES.get(k, k), False), k) for k, v in r.scores.items())
        + "</div>",
    ]
    return page(f"Attention scores — {r.model}", "\n".join(body))


@views(HeadScores, "table")
def head_scores_table(r: HeadScores, n: int | None = 20) -> Table:
    rows = [
        {"head": f"{layer}.{h}", **{k: float(v[layer, h]) for k, v in r.scores.items()}}
        for layer, h in r.ranked("induction")[: None if n is None else _rows(n)]
    ]
    return Table(rows, title=f"{r.model}: heads ranked by induction score (repeated random tokens)")


@views(HeadScores, "show")
def head_scores_show(r: HeadScores, layer: int, head: int, model=None) -> AttentionViewer:
    pattern = r.patterns.get(f"{layer}.{head}")
    if pattern is None:
        model = model if model is not None else (r.model_ref() if r.model_ref is not None else None)
        if model is None:
            raise MechscopeError(f"head {layer}.{head} was not kept; pass model= to compute it")
        check_head(model, layer, head)
        pattern = attention_pattern(model, r.tokens[:1], layer, head)
    return AttentionViewer(list(r.token_text), np.asarray(pattern), layer, head,
                           f"head {layer}.{head} on repeated random tokens")  # fmt: skip


@renders(HeadAblationResult)
def ablation_page(r: HeadAblationResult, full: bool = True) -> str:
    heads = ", ".join(f"{layer}.{h}" for layer, h in r.heads)
    sd = float(sample_sd(r.per_sequence))  # over the sequences, as lm heads' ± values
    body = [
        "<h2>Loss on the second copy</h2>",
        table_html(
            ["heads", "ablation", "clean loss (nats)", "ablated loss (nats)",
             "increase, nats (mean ± sd over sequences)"],
            [[heads, r.kind, r.clean_loss, r.ablated_loss, f"{r.loss_increase:+.3f} ± {sd:.3f}"]],
        ),  # fmt: skip
    ]
    return page(f"{r.kind.capitalize()}-ablation of {heads}", "\n".join(body))

# the renderers of the other results, each module registering its own
from mechscope.lm.notebook import attribution_graph, discovery, sae  # noqa: E402, F401
