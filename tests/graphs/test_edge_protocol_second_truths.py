"""The edge-intervention protocol itself (``Term``, ``run``, the residual buffer, the weight gradient, the
residual and generic edge attributions, ``gather_rows``, the ablation values, the metric) against outside truths:
the toys' plain forward written out in ``test_discovery_core_truths`` (each receiver's input the sum of what its
edges carry), finite differences of it, products written as plain loops in numpy, and fancy indexing written as
loops. Weights are fractional and negative on purpose, and sender values distinct, so that a sign, a filter on
``weight > 0`` or a swapped axis shows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mechscope.core.errors import MechscopeError
from mechscope.core.graphs import acdc, eap, edge_patching, find_circuit, residual_edge_attribution, residual_edge_mix
from mechscope.core.graphs.protocol import (
    Term,
    ablation_values,
    capture,
    edge_attribution,
    edge_weight,
    gather_rows,
    gradients,
    metric_of,
    run,
)
from tests.graphs.test_discovery_core_truths import EPS, directional, plain, wide_batches, wide_toy
from tests.graphs.toys import batches, conv_batches, logit_diff, planted_conv, planted_residual

# ---- helpers -------------------------------------------------------------------------------------


def _toy(name):
    """planted (7 senders, summed one by one), slow (11 senders, generic edge_mix), fast (11: the buffer)."""
    if name == "planted":
        return planted_residual("tanh"), *batches(6)
    return wide_toy(name == "fast"), *wide_batches()


def _names(model):
    g = model.graph
    return [g.nodes[g.senders[s]].name for s in range(g.n_senders)]


def _weights(n, seed=0):
    """Distinct weights in [-1.5, 1.5], a quarter of them exactly 0, some negative."""
    rng = np.random.default_rng(seed)
    w = rng.uniform(-1.5, 1.5, size=n)
    w[rng.permutation(n)[: n // 4]] = 0.0
    assert (w < 0).any() and (w > 0).any()
    return w


def _sender_values(model, x):
    """The plain forward's sender outputs on ``x``, in graph.senders order (numpy-free, by name)."""
    _, sent = plain(model, x)
    return [sent[n] for n in _names(model)]


# ---- one patched forward ---------------------------------------------------------------------------


@pytest.mark.parametrize("toy", ["planted", "slow", "fast"])
@pytest.mark.parametrize("relative", [True, False])
def test_a_weighted_term_adds_each_edges_weighted_value_in_a_plain_forward(toy, relative):
    """Outside truth: the module docstring's rule in the plain forward, edge e = s->r carrying
    ``current + w_e (value - current)`` (relative) or ``current + w_e value`` (absolute), with negative and
    fractional weights; the values are the corrupted run's senders (relative) or the corrupted batch mean."""
    model, clean, corrupted = _toy(toy)
    g = model.graph
    w = _weights(g.n_edges, seed=3)
    corr = _sender_values(model, corrupted)
    values = corr if relative else [v.mean(0, keepdim=True) for v in corr]
    by_name = dict(zip(_names(model), values, strict=True))
    wt = {g.edges[e]: w[e] for e in range(g.n_edges)}

    def carry(e, v):
        return v + wt[e] * (by_name[e[0]] - (v if relative else 0))

    want = logit_diff(plain(model, clean, carry)[0])
    term = Term(torch.as_tensor(w), values, relative=relative)
    got = metric_of(model, clean, logit_diff, [term])
    assert got == pytest.approx(float(want), rel=1e-12, abs=1e-12)
    assert abs(float(want) - metric_of(model, clean, logit_diff)) > 1e-3  # the patch changes something


@pytest.mark.parametrize("toy", ["planted", "fast"])
def test_two_terms_add_and_a_term_into_no_receiver_of_a_call_changes_nothing(toy):
    """Outside truth: the plain forward with both terms' contributions summed per edge (each relative to the
    same current value), one term patching only the logits' edges, the other only layer 0's."""
    model, clean, corrupted = _toy(toy)
    g = model.graph
    corr = _sender_values(model, corrupted)
    zero = [0 * v[:1] for v in corr]
    late = np.where([e[1] == "logits" for e in g.edges], -0.7, 0.0)
    early = np.where([e[1].startswith("blocks.0.") for e in g.edges], 0.4, 0.0)
    by_corr, by_zero = dict(zip(_names(model), corr, strict=True)), dict(zip(_names(model), zero, strict=True))
    wl, we = {g.edges[e]: late[e] for e in range(g.n_edges)}, {g.edges[e]: early[e] for e in range(g.n_edges)}

    def carry(e, v):
        return v + wl[e] * (by_corr[e[0]] - v) + we[e] * (by_zero[e[0]] - v)

    want = float(logit_diff(plain(model, clean, carry)[0]))
    terms = [Term(torch.as_tensor(late), corr), Term(torch.as_tensor(early), zero)]
    assert metric_of(model, clean, logit_diff, terms) == pytest.approx(want, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("toy", ["planted", "slow", "fast"])
def test_the_gradient_with_respect_to_edge_weights_at_zero_is_the_eap_score(toy):
    """Outside truth: Syed et al. 2023, d M / d w_e at w = 0 = (corrupted - clean sender output) . dM/d in_r, by
    central finite differences of the plain forward (the protocol's docstring: no algorithm needs more)."""
    model, clean, corrupted = _toy(toy)
    g = model.graph
    corr, cl = _sender_values(model, corrupted), _sender_values(model, clean)
    names = _names(model)
    w = torch.zeros(g.n_edges, dtype=torch.float64, requires_grad=True)
    out, _ = run(model, clean, [Term(w, corr)], grad=True)
    (got,) = torch.autograd.grad(logit_diff(out), w)
    want = [directional(model, clean, e, corr[names.index(e[0])] - cl[names.index(e[0])]) for e in g.edges]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-8)
    assert np.abs(want).max() > 1e-2


def test_gradients_under_a_term_are_the_receivers_gradients_of_the_patched_forward():
    """Outside truth: dM/d in_r of the plain forward patched by hand, by finite differences on one receiver's
    input (``blocks.1.h0<q>``) along a fixed random direction."""
    model, clean, corrupted = _toy("planted")
    g = model.graph
    corr = _sender_values(model, corrupted)
    by = dict(zip(_names(model), corr, strict=True))
    w = np.where([e[0] == "embed" for e in g.edges], 0.5, 0.0)
    wt = {g.edges[e]: w[e] for e in range(g.n_edges)}
    m, grads, _ = gradients(model, clean, logit_diff, [Term(torch.as_tensor(w), corr)])
    r = g.receivers_of(g.node_id("blocks.1.h0"))[0]
    d = torch.randn(clean.shape[0], 12, generator=torch.Generator().manual_seed(7), dtype=torch.float64)

    def at(t):
        def carry(e, v):
            return v + wt[e] * (by[e[0]] - v) + (t * d if e == ("embed", "blocks.1.h0", "q") else 0)

        return float(logit_diff(plain(model, clean, carry)[0]))

    assert m == pytest.approx(at(0.0), rel=1e-12)
    assert float((grads[r] * d).sum()) == pytest.approx((at(EPS) - at(-EPS)) / (2 * EPS), rel=1e-6, abs=1e-9)


# ---- attribution products --------------------------------------------------------------------------


def _random_values_and_grads(model, seed=5):
    g = model.graph
    gen = torch.Generator().manual_seed(seed)
    values = [torch.randn(4, 6, generator=gen, dtype=torch.float64) for _ in range(g.n_senders)]
    values[3] = None  # a sender without a value scores 0 on all its edges
    values[5] = values[5][:1]  # a batch of 1 broadcasts
    grads = [torch.randn(4, 6, generator=gen, dtype=torch.float64) for _ in range(g.n_receivers)]
    return values, grads


def _dots_by_loop(g, values, grads):
    out = np.zeros(g.n_edges)
    for e in range(g.n_edges):
        s, r = int(g.edge_sender[e]), int(g.edge_receiver[e])
        if values[s] is not None:
            v, gr = np.broadcast_to(values[s].numpy(), grads[r].shape), grads[r].numpy()
            out[e] = sum(float(a) * float(b) for a, b in zip(v.ravel(), gr.ravel(), strict=True))
    return out


@pytest.mark.parametrize("chunk", [1, 2, 3, 64])
def test_residual_edge_attribution_is_each_edges_dot_product(chunk):
    """Outside truth: <values[s], grads[r]> per edge as a plain Python loop over the numbers, whatever the
    chunk of senders the core multiplies at once."""
    g = wide_toy(True).graph
    values, grads = _random_values_and_grads(wide_toy(True))
    got = residual_edge_attribution(g, values, grads, chunk=chunk).numpy()
    want = _dots_by_loop(g, values, grads)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    assert got.dtype == np.float64 and (want[g.edge_sender == 3] == 0).all()


def test_the_generic_edge_attribution_is_the_adjoint_of_residual_edge_mix():
    """Outside truth: the same plain loop, through the slow toy's residual_edge_mix and autograd."""
    model = wide_toy(False)
    values, grads = _random_values_and_grads(model)
    np.testing.assert_allclose(edge_attribution(model, values, grads).numpy(), _dots_by_loop(model.graph, values,
                               grads), rtol=1e-12, atol=1e-12)  # fmt: skip


def test_residual_edge_mix_sums_weighted_sender_values_by_a_loop():
    """Outside truth: for each receiver, sum over its edges of w_e * values[s] written as a loop; a receiver
    whose senders all have no value gets None."""
    model = planted_residual()
    g = model.graph
    gen = torch.Generator().manual_seed(2)
    values = [torch.randn(3, 12, generator=gen, dtype=torch.float64) for _ in range(g.n_senders)]
    values[0] = None  # embed: the only sender into layer 0
    w = torch.as_tensor(_weights(g.n_edges, seed=9))
    receivers = list(range(g.n_receivers))[::-1]
    got = residual_edge_mix(g, values, w, receivers)
    for r, out in zip(receivers, got, strict=True):
        eids = [e for e in range(g.n_edges) if g.edge_receiver[e] == r and values[g.edge_sender[e]] is not None]
        if not eids:
            assert out is None
            continue
        want = sum(float(w[e]) * values[g.edge_sender[e]].numpy() for e in eids)
        np.testing.assert_allclose(out.numpy(), want, rtol=1e-12, atol=1e-12)
    assert got[-1] is None and got[-2] is None  # blocks.0.h0<q>, <k>: only embed feeds them


def test_conv_eap_is_exact_in_float64_on_the_linear_toy():
    """Outside truth: in the linear conv toy the metric is linear in each edge, so EAP equals exact single-edge
    patching (the plain difference of two metrics) to float64 precision, in float64 weights."""
    model, (clean, corrupted) = planted_conv("linear"), conv_batches()
    est, exact = eap(model, clean, corrupted, metric=logit_diff).scores, edge_patching(
        model, clean, corrupted, metric=logit_diff).scores  # fmt: skip
    np.testing.assert_allclose(est, exact, rtol=1e-11, atol=1e-13)
    assert edge_weight(model, [None, clean], fill=0.25).dtype == torch.float64
    assert edge_weight(model, [None, clean], fill=0.25).tolist() == [0.25] * model.graph.n_edges


# ---- gathered values (causal scrubbing's treeification) ---------------------------------------------


def test_gather_rows_by_rows_and_by_rows_per_position_as_loops():
    """Outside truth: x[index[m]] and x[index[m, p], p] written as Python loops, with N, M, P all different."""
    x = torch.arange(5 * 3 * 2, dtype=torch.float64).reshape(5, 3, 2)
    rows = torch.tensor([4, 0, 0, 2])
    per = torch.tensor([[4, 0, 1], [2, 2, 3], [0, 4, 4], [1, 3, 0]])
    want1 = np.stack([x[int(i)].numpy() for i in rows])
    want2 = np.array([[x[int(per[m, p]), p].numpy() for p in range(3)] for m in range(4)])
    np.testing.assert_array_equal(gather_rows(x, rows).numpy(), want1)
    np.testing.assert_array_equal(gather_rows(x, per).numpy(), want2)


@pytest.mark.parametrize("toy", ["planted", "fast"])
@pytest.mark.parametrize("relative", [True, False])
def test_an_indexed_term_carries_the_runs_own_sender_on_other_rows(toy, relative):
    """Outside truth: the plain forward where an edge with weight w carries ``current + w (current[perm] -
    current)`` (relative) or ``current + w current[perm]`` (absolute), the permutation drawn with a seed."""
    model, clean, _ = _toy(toy)
    g = model.graph
    perm = torch.randperm(clean.shape[0], generator=torch.Generator().manual_seed(4))
    assert (perm != torch.arange(len(perm))).any()
    w = _weights(g.n_edges, seed=1)
    wt = {g.edges[e]: w[e] for e in range(g.n_edges)}

    def carry(e, v):
        return v + wt[e] * (v[perm] - (v if relative else 0))

    want = float(logit_diff(plain(model, clean, carry)[0]))
    index = [perm] * g.n_senders
    term = Term(torch.as_tensor(w), [None] * g.n_senders, relative=relative, index=index)
    assert metric_of(model, clean, logit_diff, [term]) == pytest.approx(want, rel=1e-12, abs=1e-12)


# ---- ablation values and the metric ----------------------------------------------------------------


def test_ablation_values_are_the_corrupted_senders_their_numpy_mean_or_zero():
    """Outside truth: the plain forward's senders on the corrupted batch, their mean over the batch in numpy
    (over the clean batch when there is no corrupted one), and zeros, one forward each."""
    model, clean, corrupted = _toy("planted")
    corr, cl = _sender_values(model, corrupted), _sender_values(model, clean)
    patch, out, n = ablation_values(model, clean, corrupted, "patch")
    assert n == 1 and torch.allclose(out, plain(model, corrupted)[0], rtol=1e-12, atol=1e-12)
    for got, v in zip(patch, corr, strict=True):
        np.testing.assert_allclose(got.numpy(), v.numpy(), rtol=1e-12, atol=1e-12)
    for source, want in ((corrupted, corr), (None, cl)):
        mean, out, n = ablation_values(model, clean, source, "mean")
        assert out is None and n == 1
        for got, v in zip(mean, want, strict=True):
            np.testing.assert_allclose(got.numpy(), np.mean(v.numpy(), axis=0, keepdims=True), rtol=1e-12)
    zero, _, _ = ablation_values(model, clean, corrupted, "zero")
    assert all(z.shape == (1, 12) and not z.any() for z in zero)


def test_a_python_float_metric_is_read_exactly_and_a_two_number_one_is_refused():
    """Outside truth: the float 1/3 as Python holds it (float32 would give 0.3333333432674408); a metric of two
    numbers or of one number in a 1-element tensor."""
    model, clean, _ = _toy("planted")
    assert metric_of(model, clean, lambda out: 1 / 3) == 1 / 3
    assert metric_of(model, clean, lambda out: out[:1, 0]) == float(plain(model, clean)[0][0, 0])
    with pytest.raises(MechscopeError, match=r"scalar, got a tensor of shape \(2,\)"):
        metric_of(model, clean, lambda out: out[:2, 0])


# ---- adapters that break the protocol --------------------------------------------------------------


class _Lossy:
    """The planted toy, but dropping the last sender or skipping ``edit`` for the logits' receiver."""

    def __init__(self, drop_sender=False, skip_logits=False):
        self.inner, self.graph = planted_residual(), planted_residual().graph
        self.drop_sender, self.skip_logits = drop_sender, skip_logits

    def forward(self, x, edit=None):
        def ed(ids, ins, cur):
            logits = list(ids) == list(self.graph.receivers_of(self.graph.node_id("logits")))
            return ins if (self.skip_logits and logits) or edit is None else edit(ids, ins, cur)

        out, senders = self.inner.forward(x, ed)
        return out, senders[:-1] if self.drop_sender else senders

    def edge_mix(self, values, weight, receivers):
        return residual_edge_mix(self.graph, values, weight, receivers)


def test_an_adapter_that_drops_a_sender_or_a_receiver_is_refused_in_one_line():
    """Outside truth: the graph's own counts (7 senders, 13 receivers) against what the adapter returned."""
    clean, _ = batches(4)
    g = planted_residual().graph
    assert (g.n_senders, g.n_receivers) == (7, 13)
    with pytest.raises(MechscopeError, match="returned 6 sender outputs for a graph of 7 senders"):
        capture(_Lossy(drop_sender=True), clean)
    with pytest.raises(MechscopeError, match="passed 12 of the graph's 13 receivers"):
        gradients(_Lossy(skip_logits=True), clean, logit_diff)


def test_an_object_with_a_graph_that_is_not_a_component_graph_is_not_an_edge_model():
    """Outside truth: the protocol's definition (graph must be a ComponentGraph)."""
    fake = _Lossy()
    fake.graph = "not a graph"
    with pytest.raises(MechscopeError, match="is not an EdgeModel"):
        eap(fake, *batches(4), metric=logit_diff)


# ---- find_circuit passes its options on --------------------------------------------------------------


@pytest.mark.parametrize("ablation", ["zero", "mean"])
def test_find_circuit_scores_and_measures_with_the_ablation_it_was_given(ablation):
    """Outside truth: edge patching (and ACDC) called directly with the same ablation, and the faithfulness of the
    drawn circuit patched by hand with the corrupted batch's mean or zero."""
    model, clean, corrupted = _toy("planted")
    kw = {"metric": logit_diff, "better": None, "metric_name": "logit_diff", "differentiable": True}
    found = find_circuit(model, clean, corrupted, method="edge-patching", ablation=ablation, size=5, n_random=0, **kw)
    direct = edge_patching(model, clean, corrupted, metric=logit_diff, ablation=ablation)
    np.testing.assert_allclose(found.scores.scores, direct.scores, rtol=1e-12, atol=1e-12)
    corr = _sender_values(model, corrupted)
    src = dict(zip(_names(model), [v.mean(0, keepdim=True) if ablation == "mean" else 0 * v[:1] for v in corr],
                   strict=True))  # fmt: skip
    kept = set(found.circuit.edges)

    def m(removed):
        return float(logit_diff(plain(model, clean, lambda e, v: src[e[0]] if e in removed else v)[0]))

    full, empty, alone = m(set()), m(set(model.graph.edges)), m(set(model.graph.edges) - kept)
    assert found.circuit_faithfulness["faithfulness"] == pytest.approx((alone - empty) / (full - empty), abs=1e-10)
    tau = 0.05
    a = find_circuit(model, clean, corrupted, method="acdc", ablation=ablation, threshold=tau, curve=False, **kw)
    direct = acdc(model, clean, corrupted, metric=logit_diff, threshold=tau, ablation=ablation)
    patched = acdc(model, clean, corrupted, metric=logit_diff, threshold=tau)
    np.testing.assert_allclose(a.scores.scores, direct.scores, rtol=1e-12, atol=1e-12)
    assert a.scores.kept == direct.kept and np.abs(direct.scores - patched.scores).max() > 1e-3


def test_find_circuit_draws_its_random_baseline_with_the_seed_it_was_given():
    """Outside truth: the random-order baseline circuits reproduced with numpy's generator
    seeded 7 (the first ``k`` edges of ``default_rng(7).permutation(n)`` kept), each patched by hand."""
    model, clean, corrupted = _toy("planted")
    g = model.graph
    kw = {"metric": logit_diff, "better": None, "metric_name": "logit_diff", "differentiable": True}
    found = find_circuit(model, clean, corrupted, method="eap", size=5, n_random=1, seed=7, **kw).faithfulness
    corr = dict(zip(_names(model), _sender_values(model, corrupted), strict=True))

    def m(removed):
        return float(logit_diff(plain(model, clean, lambda e, v: corr[e[0]] if e in removed else v)[0]))

    full, empty = m(set()), m(set(g.edges))
    perm = np.random.default_rng(7).permutation(g.n_edges)
    want = [(m({g.edges[e] for e in perm[k:]}) - empty) / (full - empty) for k in found.edge_counts]
    assert found.seed == 7 and found.random_mean == pytest.approx(want, abs=1e-10)


# ---- a compiled model whose every edge is known -----------------------------------------------------


@pytest.mark.parametrize(("ablation", "edge_set"), [("patch", "primary"), ("zero", "functional")])
def test_tracr_hist_edges_that_change_the_metric_are_the_compiled_ones(ablation, edge_set):
    """Outside truth: tracr's compiled ``hist`` (shared/data/tracr, its circuit.json read with json): patching an
    edge to the corrupted run changes the metric exactly on the ``primary`` edges (those that carry
    input-dependent values), zeroing it exactly on the ``functional`` ones; every other edge (pos_embed's, embed
    and the head straight into the unembedding) writes what its receiver does not read, and scores 0."""
    import json

    from mechscope.lm.methods.graph import TransformerEdges
    from mechscope.lm.methods.tasks import make_task
    from mechscope.lm.models.loading import load_model
    from tests.unit.test_tracr import tracr_root

    folder = tracr_root() / "hist"
    truth = {tuple(e) for e in json.loads((folder / "circuit.json").read_text())["edge_sets"][edge_set]}
    model = load_model(folder, device="cpu")[0]
    task = make_task(model)
    edges = TransformerEdges(model)
    scores = edge_patching(edges, task.clean, task.corrupted, metric=task.metric, ablation=ablation).scores
    moved = {e for e, v in zip(edges.graph.edges, scores, strict=True) if abs(v) > 1e-3}
    assert moved == truth and len(truth) in (4, 6)
    assert np.abs(scores[[e not in truth for e in edges.graph.edges]]).max() < 1e-6
