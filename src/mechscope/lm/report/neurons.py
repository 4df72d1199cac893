"""The neurons report (``lm neurons``) and the SoLU-against-GELU report (``lm solu-compare``).

Contexts are drawn as inline HTML: each token a span whose background is the neuron's
activation there divided by the neuron's largest activation in the sample (10 steps of orange;
nothing below a twentieth), the top position outlined. No script, no network.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import markupsafe
import numpy as np

from mechscope.core.render.figures import subplots
from mechscope.core.render.html import figure_data_uri, render
from mechscope.lm.methods.neurons import NeuronsResult, max_entropy_bits

MAX_LISTED = 4096  # neurons listed one by one in a report; beyond it, the ranked ones only
# the most-monosemantic table ranks only neurons positive on less than this share of the positions: a neuron active on
# most tokens responds to far more than its top contexts show, however concentrated they are
DENSE = 0.5

COLOURS = ("#1b9e77", "#d95f02", "#7570b3", "#e7298a")


def shown_token(text: str) -> str:
    return text.replace("\n", "↵").replace("\t", "→").replace("\r", "␍") or "∅"


def label(text: str) -> str:
    """A token standing alone (in a table): spaces made visible."""
    return text.replace(" ", "␣")


class Decoder:
    """Token id -> text, memoised (a tokenizer's decode is slow per call)."""

    def __init__(self, decode: Callable[[int], str]) -> None:
        self.decode, self.seen = decode, {}

    def __call__(self, i: int) -> str:
        if i < 0:
            return "⟨start⟩"
        if i not in self.seen:
            self.seen[i] = shown_token(self.decode(int(i)))
        return self.seen[i]


def context_html(ctx: dict, tokens: np.ndarray, peak: float, decode: Decoder) -> markupsafe.Markup:
    """One context: tokens highlighted by activation / ``peak``."""
    row = tokens[ctx["seq"]]
    parts = []
    for j, a in enumerate(ctx["acts"]):
        p = ctx["start"] + j
        text = markupsafe.escape(decode(int(row[p])))
        level = int(np.clip(round(10 * a / peak), 0, 10)) if peak > 0 else 0
        top = p == ctx["pos"]
        if level == 0 and not top:
            parts.append(f"<span>{text}</span>")
        else:
            cls = f"a{level}" + (" top" if top else "")
            title = f' title="{a:.3g}"' if top else ""
            parts.append(f'<span class="{cls}"{title}>{text}</span>')
    return markupsafe.Markup(f'<div class="ctx"><b>{ctx["act"]:.3g}</b> {"".join(parts)}</div>')


def neuron_row(result: NeuronsResult, layer: int, neuron: int, decode: Decoder, tokens: np.ndarray) -> dict:
    lay = result.layer(layer)
    f = lay.figures[neuron]
    peak = lay.max[neuron]
    return {
        "id": f"{layer}.{neuron}",
        "n": f.n,
        "counted": f.n >= result.min_count,
        "entropy": f.entropy,
        "top_token": label(decode(f.top_token)) if f.n else "",
        "top_share": f.top_share,
        "prev_token": label(decode(f.prev_token)) if f.n else "",
        "prev_share": f.prev_share,
        "bigram": label(decode(f.bigram[0]) + decode(f.bigram[1])) if f.n else "",
        "bigram_share": f.bigram_share,
        "pattern": f.pattern if f.n else "",
        "max": peak,
        "density": lay.density[neuron],
        "contexts": [context_html(c, tokens, peak, decode) for c in lay.contexts[neuron]],
    }


def sparse(result: NeuronsResult, order: list[tuple[int, int]], dense: float = DENSE) -> list[tuple[int, int]]:
    """The neurons of ``order`` whose density is below ``dense``, in order."""
    return [(layer, i) for layer, i in order if result.layer(layer).density[i] < dense]


def ranked(result: NeuronsResult, n: int, decode: Decoder, tokens: np.ndarray,
           dense: float | None = None) -> tuple[list[dict], list[dict]]:  # fmt: skip
    """The ``n`` most monosemantic counted neurons (rows), among those of density below ``dense`` when given, and the
    ``n`` least monosemantic of all counted neurons."""
    order = result.ranking()
    top = order if dense is None else sparse(result, order, dense)
    most = [neuron_row(result, *ln, decode, tokens) for ln in top[:n]]
    least = [neuron_row(result, *ln, decode, tokens) for ln in order[::-1][:n]]
    return most, least


def _colours(n: int) -> tuple:
    """One colour per model or layer: the four of COLOURS, or viridis from first to last where there are more."""
    if n <= len(COLOURS):
        return COLOURS[:n]
    from matplotlib import colormaps

    return tuple(colormaps["viridis"](i / (n - 1)) for i in range(n))


def distribution_figure(results: dict[str, NeuronsResult], vocab: int) -> str:
    """Histograms of the current-token entropy and of the top share, one colour per model (or layer)."""
    fig, axes = subplots(1, 2, figsize=(12, 3.6), layout="constrained")
    first = next(iter(results.values()))
    k = first.k
    top = max_entropy_bits(k, vocab)
    bins = np.linspace(0, max(top, first.baseline["entropy_p95"]) + 0.05, 31)
    for (label, r), colour in zip(results.items(), _colours(len(results)), strict=True):
        ent = np.concatenate([lay.entropy()[lay.counted(r.min_count)] for lay in r.layers])
        share = np.concatenate([lay.top_share()[lay.counted(r.min_count)] for lay in r.layers])
        median = f"median {np.median(ent):.2f}" if len(ent) else f"no neuron with {r.min_count}+ firing contexts"
        axes[0].hist(ent, bins=bins, histtype="step", lw=2, color=colour, label=f"{label} ({median})")
        xs = np.sort(share)
        axes[1].plot(xs, 1 - np.arange(len(xs)) / max(len(xs), 1), color=colour, lw=2, label=label)
    b = first.baseline
    axes[0].axvspan(b["entropy_p05"], b["entropy_p95"], color="#999", alpha=0.3, lw=0, label="random positions (5–95%)")
    axes[0].set_xlabel(f"entropy of the current token over the firing contexts among the top {k} (bits)")
    axes[0].set_ylabel("neurons")
    axes[0].set_title("lower = more monosemantic (0: one token)")
    axes[0].legend(fontsize=8, ncol=1 + len(results) // 8)
    axes[1].axvline(b["top_share_mean"], color="#999", ls="--", label="random positions (mean)")
    axes[1].set_xlabel("share of the most common token among the top activations")
    axes[1].set_ylabel("share of neurons with at least this")
    axes[1].set_xlim(0, 1.01)
    axes[1].set_ylim(0, 1.01)
    axes[1].set_title("higher = more monosemantic (1: one token)")
    axes[1].legend(fontsize=8, ncol=1 + len(results) // 8)
    for ax in axes:
        ax.grid(alpha=0.3)
    return figure_data_uri(fig)


def by_layer(result: NeuronsResult) -> dict[str, NeuronsResult]:
    """One pseudo-result per layer (for the per-layer histograms of a single model)."""
    from dataclasses import replace

    if len(result.layers) == 1:
        return {f"layer {result.layers[0].layer}": result}
    return {f"layer {lay.layer}": replace(result, layers=(lay,)) for lay in result.layers}


def summary_lines(result: NeuronsResult) -> list[str]:
    s = result.summary()["all"]
    b = result.baseline
    if not s.get("neurons"):
        if result.k < result.min_count:  # none can be: say why rather than "at least 10 of its top 5"
            return [f"No neuron is counted: one counts when it fires (a positive activation) in at least "
                    f"{result.min_count} of its top contexts, and only the top {result.k} were read (--k)."]
        return [f"No neuron fired (a positive activation) in at least {result.min_count} of its top {result.k} "
                "contexts: every one is rarely active, and none is counted."]
    return [
        f"{s['neurons']:,} neurons counted ({s['rarely_active']:,} rarely active: fired in fewer than "
        f"{result.min_count} of their top {result.k} contexts).",
        f"Median entropy of the current token over each neuron's firing contexts (the positive ones among its top "
        f"{result.k} activations): "
        f"{s['entropy_median']:.2f} bits (quartiles {s['entropy_quartiles'][0]:.2f}–{s['entropy_quartiles'][1]:.2f}); "
        f"{result.k} positions at random: {b['entropy_mean']:.2f} bits (5–95%: {b['entropy_p05']:.2f}–"
        f"{b['entropy_p95']:.2f}).",
        f"{100 * s['share_one_token_ge_0.5']:.0f}% of the neurons have at least half of their top contexts on one "
        f"token, {100 * s['share_one_token_ge_0.9']:.0f}% at least 90%; counting the previous token as a pattern too, "
        f"{100 * s['share_pattern_ge_0.5']:.0f}% reach half.",
        dense_line(result),
    ]


def dense_line(result: NeuronsResult) -> str:
    """How many counted neurons the most-monosemantic table leaves out for their density (:data:`DENSE`)."""
    order = result.ranking()
    left = len(order) - len(sparse(result, order))
    return (f"{left:,} of the {len(order):,} counted neurons are positive on at least {100 * DENSE:.0f}% of the "
            "positions (density): active on half the tokens or more, they are left out of the table of the most "
            "monosemantic neurons, however concentrated their top contexts.")  # fmt: skip


def write_neurons_report(
    result: NeuronsResult, decode: Callable[[int], str], out: Path, asked: tuple = (), n_ranked: int = 20
) -> Path:
    return render("mechscope.lm", "neurons.html.j2", out, **report_context(result, decode, asked, n_ranked))


def report_context(result: NeuronsResult, decode: Callable[[int], str], asked: tuple = (), n_ranked: int = 20) -> dict:
    """What neurons.html.j2 draws (the file report and the notebook fragment)."""
    dec = Decoder(decode)
    tokens = result.tokens.numpy()
    most, least = ranked(result, n_ranked, dec, tokens, DENSE)
    order = result.ranking()
    total = sum(len(lay.figures) for lay in result.layers)
    listed = []
    if total <= MAX_LISTED:
        for lay in result.layers:
            listed.append((lay.layer, [neuron_row(result, lay.layer, i, dec, tokens) for i in range(len(lay.figures))]))
    vocab = len(set(tokens.reshape(-1).tolist()))
    return dict(
        result=result,
        summary=summary_lines(result),
        stats=result.summary(),
        figure=distribution_figure(by_layer(result), vocab),
        asked=[neuron_row(result, layer, n, dec, tokens) for layer, n in asked],
        most=most,
        least=least,
        dense=DENSE,
        counted=len(order),
        sparse=len(sparse(result, order)),
        listed=listed,
        total=total,
        max_listed=MAX_LISTED,
    )


def compare_lines(rows: list[dict]) -> list[str]:
    """Sentences of the SoLU-against-GELU summary, from the numbers (a model with no counted neuron says so
    instead of a median of nothing)."""
    by = {r["label"]: r for r in rows}
    g, s = by.get("GELU"), by.get("SoLU")
    if g is None or s is None:
        return []
    lines = [
        f"Held-out loss: GELU {g['held_out_loss']:.4f}, SoLU {s['held_out_loss']:.4f} nats per token "
        f"(SoLU {s['held_out_loss'] - g['held_out_loss']:+.4f}).",
    ]
    empty = [r["label"] for r in (g, s) if not r["stats"].get("neurons")]
    if empty:
        lines.append(
            f"No neuron of {' or '.join(empty)} has at least {g['min_count']} positive activations among its top "
            "contexts, so no monosemanticity figure compares the two."
        )
    else:
        lines += [
            f"Median current-token entropy of the top activations: GELU {g['stats']['entropy_median']:.2f} bits, "
            f"SoLU {s['stats']['entropy_median']:.2f} bits (random positions: {g['baseline']['entropy_mean']:.2f}; "
            "lower is more concentrated on one token).",
            f"Neurons with at least half of their top contexts on one token: GELU "
            f"{100 * g['stats']['share_one_token_ge_0.5']:.0f}%, "
            f"SoLU {100 * s['stats']['share_one_token_ge_0.5']:.0f}%; "
            f"at least 90%: GELU {100 * g['stats']['share_one_token_ge_0.9']:.0f}%, "
            f"SoLU {100 * s['stats']['share_one_token_ge_0.9']:.0f}%.",
        ]
    lines.append(
        f"Rarely active neurons (fewer than {g['min_count']} positive activations): "
        f"GELU {g['stats']['rarely_active']}, SoLU {s['stats']['rarely_active']}."
    )
    p = by.get("SoLU after its LayerNorm")
    if p and p["stats"].get("neurons"):
        lines.append(
            f"Read after SoLU's LayerNorm (hook_post) instead of before it: median entropy "
            f"{p['stats']['entropy_median']:.2f} bits, {100 * p['stats']['share_one_token_ge_0.5']:.0f}% at least half "
            "on one token."
        )
    return lines


def write_compare_report(result, out: Path) -> Path:
    """The page of a :class:`~mechscope.lm.methods.neurons.SoluComparison` (its models' neurons in memory)."""
    entries, results = result.models, result.neurons
    meta = {"settings": result.settings, "source": result.text, "vocab": result.vocab, "seconds": result.seconds}
    summary = result.summary
    dec = Decoder(next(iter(results.values())).decoder or str)
    rows = []
    for e in entries:
        r = results[e["label"]]
        most, least = ranked(r, 20, dec, r.tokens.numpy(), DENSE)  # as lm neurons ranks them
        rows.append(e | {"most": most, "least": least})
    first = next(iter(results.values()))
    vocab = len(set(first.tokens.numpy().reshape(-1).tolist()))
    return render(
        "mechscope.lm", "solu_compare.html.j2",
        out,
        rows=rows,
        meta=meta,
        summary=summary,
        figure=distribution_figure(results, vocab),
        k=first.k,
    )
