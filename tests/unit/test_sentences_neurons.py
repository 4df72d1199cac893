"""The neurons and SoLU-against-GELU reports' sentences (``lm neurons``, ``lm solu-compare``: report/neurons.py),
from hand-made results."""

from __future__ import annotations

from dataclasses import replace

import torch

from mechscope.core.render.html import render_string
from mechscope.lm.methods.neurons import Concentration, LayerNeurons, NeuronsResult
from mechscope.lm.report import neurons as N

BASELINE = {"entropy_mean": 3.2, "entropy_p05": 2.9, "entropy_p95": 3.5, "top_share_mean": 0.2, "k": 20, "draws": 8}


SAMPLE = {"sequences": 1, "length": 4, "tokens": 4, "seed": 0, "source": "hand", "skip_first": 0}


def neurons(entropies, shares, n=20, density=None) -> NeuronsResult:
    figs = tuple(Concentration(n, e, 1, s, 2, 0.1, (2, 1), 0.1) for e, s in zip(entropies, shares, strict=True))
    density = tuple(density or (0.1,) * len(figs))
    lay = LayerNeurons(0, "blocks.0.mlp.hook_post", figs, (1.0,) * len(figs), density, ((),) * len(figs))
    return NeuronsResult("hand-made", 20, 10, SAMPLE, BASELINE, (lay,), tokens=torch.tensor([[1, 2, 1, 3]]))


def test_the_distribution_sentences():
    lines = N.summary_lines(neurons([0.0, 1.0, 2.0, 3.0], [1.0, 0.6, 0.4, 0.2]))
    assert lines[0] == "4 neurons counted (0 rarely active: fired in fewer than 10 of their top 20 contexts)."
    assert "1.50 bits (quartiles 0.75–2.25); 20 positions at random: 3.20 bits (5–95%: 2.90–3.50)" in lines[1]
    assert lines[2].startswith("50% of the neurons have at least half of their top contexts on one token, 25% at least")
    assert N.summary_lines(neurons([0.0], [1.0], n=3)) == [
        "No neuron fired (a positive activation) in at least 10 of its top 20 contexts: every one is rarely active, "
        "and none is counted."
    ]
    few = N.summary_lines(replace(neurons([0.0], [1.0], n=3), k=5))  # --k 5: "at least 10 of its top 5" read oddly
    assert few == ["No neuron is counted: one counts when it fires (a positive activation) in at least 10 of its top "
                   "contexts, and only the top 5 were read (--k)."]  # fmt: skip


def test_most_monosemantic_table_leaves_out_dense_neurons():
    """Neurons 0.0 (0 bits, positive on 80% of the positions, like the audit's 0.7 at 0.63) and 0.2 (at the 0.5
    threshold) are not ranked most monosemantic; the page and the summary say how many were left out and why."""
    r = neurons([0.0, 0.5, 1.0, 2.0], [1.0, 0.9, 0.6, 0.4], density=[0.8, 0.2, 0.5, 0.1])
    ctx = N.report_context(r, str)
    assert [row["id"] for row in ctx["most"]] == ["0.1", "0.3"]
    assert [row["id"] for row in ctx["least"]] == ["0.3", "0.2", "0.1", "0.0"]  # every counted neuron
    assert N.summary_lines(r)[3].startswith("2 of the 4 counted neurons are positive on at least 50% of the positions")
    html = render_string("mechscope.lm", "neurons.html.j2", **ctx)
    assert "The 2 most monosemantic neurons" in html and "The 4 least monosemantic neurons" in html
    assert "among the 2 counted neurons positive on less than 50% of the positions (density below 0.5)" in html
    assert "The other 2 are left out" in html
    # solu-compare's JSON ranks them the same way (it listed dense neurons the neurons page leaves out)
    from mechscope.lm.pipelines.neurons import _entry

    assert _entry({"label": "gelu"}, r)["most_monosemantic"] == ["0.1", "0.3"]


def row(label, loss, median, half, rare, neurons=50):
    stats = {"neurons": neurons, "rarely_active": rare}
    if neurons:
        stats |= {"entropy_median": median, "share_one_token_ge_0.5": half, "share_one_token_ge_0.9": half / 2}
    return {"label": label, "held_out_loss": loss, "stats": stats, "baseline": BASELINE, "min_count": 10}


def test_solu_against_gelu():
    lines = N.compare_lines([row("GELU", 1.5, 2.5, 0.2, 3), row("SoLU", 1.6, 1.5, 0.4, 5)])
    assert lines[0] == "Held-out loss: GELU 1.5000, SoLU 1.6000 nats per token (SoLU +0.1000)."
    assert "GELU 2.50 bits, SoLU 1.50 bits (random positions: 3.20; lower is more concentrated" in lines[1]
    assert lines[-1] == "Rarely active neurons (fewer than 10 positive activations): GELU 3, SoLU 5."


def test_no_counted_neuron_gives_no_median():
    lines = N.compare_lines([row("GELU", 1.5, 0, 0, 16, neurons=0), row("SoLU", 1.6, 1.5, 0.4, 5)])
    assert "No neuron of GELU has at least 10 positive activations" in lines[1]
    assert not any("Median" in s for s in lines)
