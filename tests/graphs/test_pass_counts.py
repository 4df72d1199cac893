"""The forward passes each discovery method reports (what issue 25's counts and the reports' cost lines rest on)
against the passes the model adapters themselves counted: each adapter adds one per call of its ``forward``,
whatever method called it, so the reported figure, written as a formula in each method, is checked by a counter
it does not read."""

from __future__ import annotations

import pytest

from mechscope.cnn.methods.graph import CNNEdges
from mechscope.cnn.models.spec import walk
from mechscope.core.graphs import acdc, eap, eap_ig, edge_patching, faithfulness_curve
from mechscope.lm.methods.graph import TransformerEdges
from tests.unit.test_discovery_cnn import stroke_cnn, strokes
from tests.unit.test_discovery_lm import tiny, tokens

pytestmark = pytest.mark.usefixtures("one_thread")

METHODS = {
    "eap": lambda e, c, k, m: eap(e, c, k, metric=m),
    "eap-mean": lambda e, c, k, m: eap(e, c, k, metric=m, ablation="mean"),
    "eap-ig": lambda e, c, k, m: eap_ig(e, c, k, metric=m, steps=3),
    "edge-patching": lambda e, c, k, m: edge_patching(e, c, k, metric=m),
    "acdc": lambda e, c, k, m: acdc(e, c, k, metric=m, threshold=0.01),
}


def _language():
    return TransformerEdges(tiny("gpt2", layers=1)), tokens(b=2, p=6), tokens(b=2, p=6, seed=1), (
        lambda out: out[:, -1, 5].mean())  # fmt: skip


def _vision():
    x, _ = strokes(16)
    return CNNEdges(walk(stroke_cnn())), x[:8], x[8:], lambda out: out[:, 0].mean()


@pytest.mark.parametrize("wing", [_language, _vision], ids=["language", "vision"])
@pytest.mark.parametrize("method", list(METHODS))
def test_reported_forward_passes_are_the_adapters_own_count(wing, method):
    edges, clean, corrupted, metric = wing()
    before = edges.forwards
    result = METHODS[method](edges, clean, corrupted, metric)
    assert result.forward_passes == edges.forwards - before > 0
    assert result.backward_passes == {"eap": 1, "eap-mean": 1, "eap-ig": 3}.get(method, 0)


@pytest.mark.parametrize("wing", [_language, _vision], ids=["language", "vision"])
def test_a_faithfulness_curve_reports_the_passes_it_made(wing):
    edges, clean, corrupted, metric = wing()
    scores = eap(edges, clean, corrupted, metric=metric)
    before = edges.forwards
    curve = faithfulness_curve(edges, scores, clean, corrupted, metric=metric, fractions=(0.1, 0.5), n_random=2)
    assert curve.forward_passes == edges.forwards - before > 2
