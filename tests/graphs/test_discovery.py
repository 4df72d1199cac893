"""EAP, EAP-IG, edge patching and ACDC on hand-made models with planted circuits (known answers)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from mechscope.core.errors import MechscopeError
from mechscope.core.graphs import (
    EdgeScores,
    acdc,
    capture,
    circuit_faithfulness,
    cut_circuit,
    eap,
    eap_ig,
    edge_patching,
    faithfulness_curve,
    find_circuit,
    receiver_gradients,
    score_circuit,
)
from mechscope.core.graphs.acdc import _harm
from tests.graphs.toys import (
    CONV_PLANTED,
    PLANTED_EDGES,
    PLANTED_NODES,
    batches,
    conv_batches,
    logit_diff,
    planted_conv,
    planted_residual,
    redundant_or,
    small_contributions,
)


def _edges(scores: EdgeScores, ids) -> set:
    return {scores.graph.edges[e] for e in ids}


@pytest.mark.parametrize(("make", "data"), [(planted_residual, batches), (planted_conv, conv_batches)])
def test_eap_equals_exact_edge_ablation_in_the_linear_case(make, data):
    model, (clean, corrupted) = make("linear"), data()
    est = eap(model, clean, corrupted, metric=logit_diff)
    exact = edge_patching(model, clean, corrupted, metric=logit_diff)
    np.testing.assert_allclose(est.scores, exact.scores, rtol=1e-10, atol=1e-12)
    planted = PLANTED_EDGES if make is planted_residual else CONV_PLANTED
    assert _edges(exact, np.flatnonzero(np.abs(exact.scores) > 1e-12)) == planted


def test_eap_correlates_with_exact_ablation_when_nonlinear():
    model, (clean, corrupted) = planted_residual("tanh"), batches()
    exact = edge_patching(model, clean, corrupted, metric=logit_diff).scores
    r_eap = np.corrcoef(eap(model, clean, corrupted, metric=logit_diff).scores, exact)[0, 1]
    r_ig = np.corrcoef(eap_ig(model, clean, corrupted, metric=logit_diff, steps=10).scores, exact)[0, 1]
    assert r_eap > 0.85 and r_ig > r_eap  # measured: 0.912 and 0.948
    assert np.all(np.abs(eap(model, clean, corrupted, metric=logit_diff).scores[np.abs(exact) < 1e-12]) < 1e-12)


def test_eap_is_first_order_exact_for_small_corruptions_through_relu():
    model, (clean, noise) = planted_conv("relu"), conv_batches()
    corrupted = clean + 1e-4 * noise
    est = eap(model, clean, corrupted, metric=logit_diff).scores
    exact = edge_patching(model, clean, corrupted, metric=logit_diff).scores
    assert np.corrcoef(est, exact)[0, 1] > 0.999


def test_eap_is_the_textbook_formula_on_receiver_gradients():
    # score(s->r) = (out'_s - out_s) . dM/d in_r, summed over the batch: the weight-gradient trick gives the same
    model, (clean, corrupted) = planted_residual("tanh"), batches()
    _, clean_s = capture(model, clean)
    _, corrupted_s = capture(model, corrupted)
    m, grads = receiver_gradients(model, clean, logit_diff)
    g = model.graph
    pairs = zip(g.edge_sender.tolist(), g.edge_receiver.tolist(), strict=True)
    by_hand = [float(((corrupted_s[s] - clean_s[s]) * grads[r]).sum()) for s, r in pairs]
    est = eap(model, clean, corrupted, metric=logit_diff)
    np.testing.assert_allclose(est.scores, by_hand, rtol=1e-10, atol=1e-14)
    assert m == pytest.approx(est.metric_clean)


@pytest.mark.parametrize(("make", "data"), [(planted_residual, batches), (planted_conv, conv_batches)])
def test_eap_ig_with_one_step_is_eap(make, data):
    model, (clean, corrupted) = make("tanh" if make is planted_residual else "relu"), data()
    np.testing.assert_allclose(
        eap_ig(model, clean, corrupted, metric=logit_diff, steps=1).scores,
        eap(model, clean, corrupted, metric=logit_diff).scores,
        rtol=1e-12,
        atol=1e-14,
    )


def test_eap_ig_through_the_adapters_interpolate_matches_the_input_nodes():
    class Interpolating(type(planted_residual())):
        def interpolate(self, clean, corrupted, alpha):
            return corrupted + alpha * (clean - corrupted)  # embed is linear in x: the same path

    base = planted_residual("tanh")
    model = Interpolating(base.W_E, base.heads, base.W_U, "tanh")
    clean, corrupted = batches()
    a = eap_ig(model, clean, corrupted, metric=logit_diff, steps=4)
    b = eap_ig(base, clean, corrupted, metric=logit_diff, steps=4)
    assert a.settings["interpolate"] == "adapter" and b.settings["interpolate"] == "input nodes"
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-10, atol=1e-12)


def test_pass_counts_are_what_the_model_saw():
    model, (clean, corrupted) = planted_residual("tanh"), batches()
    for run, expected in [
        (lambda: eap(model, clean, corrupted, metric=logit_diff), (2, 1)),
        (lambda: eap_ig(model, clean, corrupted, metric=logit_diff, steps=3), (5, 3)),
    ]:
        model.forwards = 0
        res = run()
        assert (res.forward_passes, res.backward_passes) == expected == (model.forwards, expected[1])
    model.forwards = 0
    res = acdc(model, clean, corrupted, metric=logit_diff, threshold=1e-6)
    assert res.forward_passes == model.forwards == 2 + res.settings["edges_tried"]
    assert res.settings["edges_tried"] < model.graph.n_edges  # dead nodes cost no forward pass


@pytest.mark.parametrize("act", ["linear", "tanh"])
@pytest.mark.parametrize("ablation", ["patch", "zero"])
def test_acdc_recovers_the_planted_circuit_exactly(act, ablation):
    model, (clean, corrupted) = planted_residual(act), batches()
    res = acdc(model, clean, corrupted, metric=logit_diff, threshold=1e-6, ablation=ablation)
    circuit = res.circuit()
    assert set(circuit.edges) == PLANTED_EDGES
    assert set(circuit.nodes) == PLANTED_NODES | {"embed", "logits"}
    assert res.settings["metric_circuit"] == pytest.approx(res.metric_clean, abs=1e-12)


def test_acdc_judges_each_removal_against_the_circuit_so_far():
    """ACDC's defining step: a removal is judged against the current circuit, not the clean model. Of two heads
    that each alone carry the signal into a saturating reader, removing the first changes the metric by 1e-4 (the
    other still carries it); removing the second then loses everything, so one path is kept whole. And small
    removals add up (the planted CNN and residual circuits, with every other edge exactly 0, could not tell: judging
    against the clean model passed every ACDC test, review36)."""
    model, clean, corrupted, metric = redundant_or()
    scores = acdc(model, clean, corrupted, metric=metric, threshold=0.01)
    kept = {model.graph.edges[e] for e in scores.kept}
    paths = [{("embed", f"blocks.0.h{h}", "q"), (f"blocks.0.h{h}", "blocks.1.h0", "q")} for h in (0, 1)]
    assert sum(p <= kept for p in paths) == 1 and ("blocks.1.h0", "logits", "in") in kept
    again = circuit_faithfulness(model, list(scores.kept), clean, corrupted, metric=metric)
    assert scores.settings["metric_circuit"] == pytest.approx(again["metric"], abs=1e-12)
    assert again["metric"] == pytest.approx(math.tanh(5 * math.tanh(9)), abs=1e-9)  # one path: g = tanh(5·tanh(9))
    # and small removals add up: five heads each worth 0.004 all go at tau 0.01, each judged against the circuit
    # left by the removals before it (judged against the clean model, the third would be kept: 0.012 > tau)
    model, clean, corrupted, metric = small_contributions()
    scores = acdc(model, clean, corrupted, metric=metric, threshold=0.01)
    assert not {e for e in scores.kept if model.graph.edges[e][0].startswith("blocks.0")}
    assert scores.settings["metric_circuit"] == pytest.approx(0.0, abs=1e-12)
    assert scores.metric_clean == pytest.approx(0.02, abs=1e-15)


def test_acdc_recovers_the_planted_cnn_circuit():
    model, (clean, corrupted) = planted_conv("relu"), conv_batches()
    res = acdc(model, clean, corrupted, metric=logit_diff, threshold=1e-6)
    assert set(res.circuit().edges) == CONV_PLANTED


def test_a_large_threshold_removes_everything_and_costs_one_pass_per_live_edge():
    model, (clean, corrupted) = planted_residual("tanh"), batches()
    res = acdc(model, clean, corrupted, metric=logit_diff, threshold=1e9)
    assert res.kept == () and res.settings["edges_tried"] == 7  # only the edges into the logits are live


def test_harm_direction():
    assert _harm(-0.5, None) == 0.5 and _harm(-0.5, "higher") == 0.5 and _harm(-0.5, "lower") == -0.5


def test_best_method_reaches_node_recall_one_at_the_planted_size():
    model, (clean, corrupted) = planted_residual("tanh"), batches()
    for scores in (
        eap(model, clean, corrupted, metric=logit_diff),
        eap_ig(model, clean, corrupted, metric=logit_diff, steps=5),
    ):
        s = score_circuit(scores, PLANTED_EDGES)
        assert s.node_recall_at_size == 1.0 and s.edge_recall == 1.0 and s.edge_auroc == 1.0


def test_circuit_sizes_and_json_round_trip():
    model, (clean, corrupted) = planted_residual("tanh"), batches()
    res = eap(model, clean, corrupted, metric=logit_diff, better="higher")
    assert len(res.circuit(7)) == 7 and len(res.circuit(0.5)) == 21 and len(res.circuit(1.0)) == 43
    assert set(res.circuit(7).edges) == PLANTED_EDGES
    rows = res.table(7)
    assert len(rows) == 7 and {(s, r) for s, r, _ in rows} == {(s, f"{n}<{t}>") for s, n, t in PLANTED_EDGES}
    assert len(res.table()) == 43 and abs(rows[0][2]) == np.abs(res.scores).max()
    assert res.circuit(7, ranking="signed").edges[0] in PLANTED_EDGES
    back = EdgeScores.from_dict(json.loads(json.dumps(res.to_dict())))
    np.testing.assert_array_equal(back.scores, res.scores)
    assert back.graph == res.graph and back.better == "higher" and back.forward_passes == 2
    assert res.to_dict()["top_edges"][0][0] in {model.graph.edge_name(model.graph.edge_id(*e)) for e in PLANTED_EDGES}
    kept = acdc(model, clean, corrupted, metric=logit_diff, threshold=1e-6)
    assert EdgeScores.from_dict(json.loads(json.dumps(kept.to_dict()))).kept == kept.kept


def test_on_path_finds_the_edges_that_join_the_input_to_the_output():
    g = planted_residual("tanh").graph
    ids = [g.edge_id(*e) for e in sorted(PLANTED_EDGES)]
    assert g.on_path(ids).all()  # the planted circuit: embed -> h0 -> h1 -> h2 -> logits, embed -> h2
    cut = [g.edge_id("embed", "blocks.0.h0", "q"), g.edge_id("blocks.2.h0", "logits", "in")]
    assert not g.on_path(cut).any()  # the two ends, nothing between them (what a top-k cut can give)
    dangling = ids + [g.edge_id("embed", "blocks.1.h0", "k")]  # h1 is on the path, so this joins up
    assert g.on_path(dangling).all()
    mixed = [g.edge_id("embed", "blocks.2.h0", "k"), g.edge_id("blocks.2.h0", "logits", "in"),
             g.edge_id("embed", "blocks.0.h0", "q")]  # fmt: skip
    assert g.on_path(mixed).tolist() == [True, True, False]  # h0 feeds nothing here
    assert g.on_path([]).shape == (0,)


def test_on_path_counts_a_shared_key_or_value_through_the_heads_that_read_it():
    from mechscope.core.graphs import transformer_graph

    g = transformer_graph(2, 2, n_kv_heads=1, mlp=False, pos_embed=False)  # h1 reads h0's k and v (grouped query)
    e = g.edge_id
    into_shared = e("embed", "blocks.0.attn.h0", "k")
    assert g.on_path([into_shared, e("blocks.0.attn.h1", "unembed", "out")]).all()  # through the reader h1
    chain = [e("embed", "blocks.0.attn.h0", "q"), e("blocks.0.attn.h0", "blocks.1.attn.h0", "v"),
             e("blocks.1.attn.h1", "unembed", "out")]  # fmt: skip
    assert g.on_path(chain).all() and not g.on_path(chain[1:]).any()  # without its input edge, nothing joins


def test_the_summary_says_when_the_cut_does_not_join_up():
    from types import SimpleNamespace

    from mechscope.core.render.discovery import cli_lines, discovery_lines

    g = planted_residual("tanh").graph
    v = np.zeros(g.n_edges)
    v[[g.edge_id("embed", "blocks.0.h0", "q"), g.edge_id("blocks.2.h0", "logits", "in")]] = [2.0, 1.0]
    scores = EdgeScores(method="eap", graph=g, scores=v, seconds=0.1)
    result = SimpleNamespace(scores=scores, circuit=scores.circuit(2), faithfulness=None, circuit_faithfulness=None,
                             method="eap", metric="logit_diff", task_description="a toy")  # fmt: skip
    line = discovery_lines(result, "toy")[1]
    assert line == ("The circuit: 2 edges over 4 nodes. None of its edges lies on a path from the input to the "
                    "output: they do not join up, so alone it passes nothing of the input on (a larger --size may "
                    "join them).")  # fmt: skip
    assert cli_lines(result)[1].startswith("circuit: 2 edges (0 on a path from the input to the output), 4 nodes")
    v = v.copy()
    v[g.edge_id("blocks.0.h0", "blocks.2.h0", "q")] = 1.5  # the edge between them
    joined = SimpleNamespace(**{**vars(result), "circuit": EdgeScores(method="eap", graph=g, scores=v).circuit(3)})
    assert discovery_lines(joined, "toy")[1] == "The circuit: 3 edges over 4 nodes."


def test_the_random_baseline_is_said_as_its_draws_allow():
    """Truth: the sample sd of one draw is undefined and of none there is no mean. --random 1 printed "random circuits
    0.325 ± nan", --random 0 "(random nan)"; two draws give mean ± sd."""
    from types import SimpleNamespace

    from mechscope.core.render.discovery import _random_cpr, cli_lines

    g = planted_residual("tanh").graph
    scores = EdgeScores(method="eap", graph=g, scores=np.arange(g.n_edges, dtype=float), seconds=0.1)

    def curve(n, mean, sd):
        return SimpleNamespace(n_random=n, cpr=0.9, cmd=0.1, random_cpr=mean, random_cpr_sd=sd, random_cmd=mean)

    said = {n: (_random_cpr(curve(n, m, sd)), cli_lines(SimpleNamespace(
        scores=scores, circuit=scores.circuit(2), faithfulness=curve(n, m, sd), circuit_faithfulness=None,
        method="eap", metric="logit_diff"))[-1]) for n, m, sd in ((0, math.nan, math.nan), (1, 0.325, math.nan),
                                                               (2, 0.325, 0.05))}  # fmt: skip
    assert said[0] == ("no random circuits drawn", "faithfulness: CPR 0.900, CMD 0.100 (no random baseline drawn)")
    assert said[1] == ("one random circuit 0.325, no spread from one",
                       "faithfulness: CPR 0.900 (random 0.325), CMD 0.100 (random 0.325)")  # fmt: skip
    assert said[2][0] == "random circuits 0.325 ± 0.050"
    assert not any("nan" in line for pair in said.values() for line in pair)


@pytest.mark.parametrize("ablation", ["mean", "zero"])
def test_mean_and_zero_ablation_eap_is_exact_in_the_linear_case(ablation):
    model, (clean, _) = planted_residual("linear"), batches()
    res = eap(model, clean, metric=logit_diff, ablation=ablation)
    exact = edge_patching(model, clean, metric=logit_diff, ablation=ablation)
    np.testing.assert_allclose(res.scores, exact.scores, atol=1e-12)
    assert res.settings["ablation"] == ablation and np.isnan(res.metric_corrupted)


# ---- user errors ----------------------------------------------------------------------------------


def _model_and_data():
    return planted_residual("tanh"), *batches()


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda m, c, x: eap(m, c, x, metric=lambda o: o.sum(0)), "scalar"),
        (lambda m, c, x: eap(m, c, x, metric=lambda o: "high"), "scalar tensor"),
        (lambda m, c, x: eap(m, c, x, metric=lambda o: torch.tensor(1.0)), "no gradient"),
        (lambda m, c, x: eap(m, c, x, metric=lambda o: o.argmax()), "float"),
        (lambda m, c, x: eap(m, c, x, metric=42), "callable"),
        (lambda m, c, x: eap(m, c, metric=logit_diff), "corrupted"),
        (lambda m, c, x: eap(m, c, x, metric=logit_diff, ablation="resample"), "unknown ablation"),
        (lambda m, c, x: eap(m, c, x[:5], metric=logit_diff), "batch size"),
        (lambda m, c, x: eap(m, c, x, metric=logit_diff, better="up"), "better"),
        (lambda m, c, x: eap(object(), c, x, metric=logit_diff), "not an EdgeModel"),
        (lambda m, c, x: eap_ig(m, c, x, metric=logit_diff, steps=0), "steps"),
        (lambda m, c, x: eap_ig(m, c, x, metric=logit_diff, steps=2.5), "steps"),
        (lambda m, c, x: eap_ig(m, c, None, metric=logit_diff), "corrupted"),
        (lambda m, c, x: acdc(m, c, x, metric=logit_diff, threshold=-0.1), "threshold"),
        (lambda m, c, x: acdc(m, c, x, metric=logit_diff, threshold=float("nan")), "threshold"),
        (lambda m, c, x: acdc(m, c, x, metric=logit_diff, threshold=float("inf")), "threshold"),
        (lambda m, c, x: acdc(m, c, x, metric=logit_diff, threshold="0.1"), "threshold"),
        (lambda m, c, x: acdc(m, c, x, metric=logit_diff, threshold=True), "threshold"),
        (lambda m, c, x: acdc(m, c, x, metric=lambda o: o[:, 0], threshold=0.1), "scalar"),
        (lambda m, c, x: eap(m, c, x, metric=logit_diff).circuit(), "pass a size"),
        (lambda m, c, x: eap(m, c, x, metric=logit_diff).circuit(1.5), "fraction"),
        (lambda m, c, x: eap(m, c, x, metric=logit_diff).circuit(44), "circuit size 44 is more than the"),
        (lambda m, c, x: eap(m, c, x, metric=logit_diff).circuit("7"), "edge count"),
        (lambda m, c, x: eap(m, c, x, metric=logit_diff).circuit(3, ranking="signed"), "better"),
        (lambda m, c, x: eap(m, c, x, metric=logit_diff).circuit(3, ranking="best"), "unknown ranking"),
        (lambda m, c, x: EdgeScores(method="x", graph=m.graph, scores=np.zeros(3)), "3 scores"),
    ],
)
def test_user_errors_raise_one_line(call, match):
    m, c, x = _model_and_data()
    with pytest.raises(MechscopeError, match=match) as e:
        call(m, c, x)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("method", ["eap", "eap-ig", "edge-patching", "acdc"])
def test_find_circuit_cuts_the_planted_circuit_and_measures_it_whole(method):
    """One run as both wings' discover make it: at the planted size every method's circuit is the planted one, and
    the drawn circuit alone recovers the full model's metric (faithfulness 1) where the empty circuit does not."""
    model, (clean, corrupted) = planted_residual("linear"), batches()
    cut = {"threshold": 1e-6} if method == "acdc" else {"size": len(PLANTED_EDGES)}  # ACDC cuts its own circuit
    found = find_circuit(model, clean, corrupted, metric=logit_diff, better=None, metric_name="logit_diff",
                         differentiable=True, method=method, n_random=2, **cut)  # fmt: skip
    assert set(found.circuit.edges) == PLANTED_EDGES
    drawn = found.circuit_faithfulness
    assert drawn["faithfulness"] == pytest.approx(1.0, abs=1e-9)
    assert abs(drawn["metric_full"] - drawn["metric_empty"]) > 1
    assert set(found.seconds) == {"discovery", "faithfulness"}


def test_acdc_default_threshold_is_one_percent_of_the_metrics_change():
    model, (clean, corrupted) = planted_residual("tanh"), batches()
    found = find_circuit(model, clean, corrupted, metric=logit_diff, better="higher", metric_name="logit_diff",
                         differentiable=True, method="acdc", curve=False)  # fmt: skip
    change = abs(float(logit_diff(model.forward(clean)[0]) - logit_diff(model.forward(corrupted)[0])))
    assert found.threshold == pytest.approx(0.01 * change, rel=1e-12) and found.scores.settings["threshold"] == (
        found.threshold
    )


def test_find_circuit_cuts_by_threshold_or_default_size():
    model, (clean, corrupted) = planted_residual("tanh"), batches()
    kw = {"metric": logit_diff, "better": "higher", "metric_name": "logit_diff", "differentiable": True, "curve": False}
    found = find_circuit(model, clean, corrupted, method="eap", threshold=1e-3, **kw)
    assert len(found.circuit.edges) == int(np.sum(np.abs(found.scores.scores) >= 1e-3)) > 0
    assert found.faithfulness is None and found.circuit_faithfulness is None
    small = find_circuit(model, clean, corrupted, method="eap", default_size=2, **kw)
    assert len(small.circuit.edges) == 2 == len(cut_circuit(small.scores, "eap", None, None, default=2).edges)


def test_a_size_cuts_acdcs_kept_edges_and_never_adds_a_pruned_one():
    model, (clean, corrupted) = planted_residual("tanh"), batches()
    kw = {"metric": logit_diff, "better": "higher", "metric_name": "logit_diff", "differentiable": True, "curve": False}
    found = find_circuit(model, clean, corrupted, method="acdc", **kw)
    kept = found.scores.kept
    assert 1 < len(kept) < model.graph.n_edges
    smaller = cut_circuit(found.scores, "acdc", len(kept) - 1, None)
    ids = {model.graph.edges.index(e) for e in smaller.edges}
    assert len(ids) == len(kept) - 1 and ids <= set(kept)
    with pytest.raises(MechscopeError, match=f"acdc kept {len(kept)} edges: a circuit of {len(kept) + 1} would add"):
        cut_circuit(found.scores, "acdc", len(kept) + 1, None)
    with pytest.raises(MechscopeError, match="eap-ig integrates from the corrupted input's activations: it does not "
                                             "read ablation='mean'"):  # the Python argument, not the CLI's option
        find_circuit(model, clean, corrupted, method="eap-ig", ablation="mean", **kw)


def test_steps_are_read_by_eap_ig_only():
    """``steps`` given to another method was silently unread through the Python API (the CLI refused it); EAP-IG's
    default is 5 and the settings record what ran."""
    model, (clean, corrupted) = planted_residual("linear"), batches()
    kw = {"metric": logit_diff, "better": "higher", "metric_name": "logit_diff", "differentiable": True, "curve": False}
    with pytest.raises(MechscopeError, match="steps is EAP-IG's interpolation steps; method='eap' does not read it"):
        find_circuit(model, clean, corrupted, method="eap", steps=3, **kw)
    assert find_circuit(model, clean, corrupted, method="eap-ig", **kw).scores.settings["steps"] == 5
    assert find_circuit(model, clean, corrupted, method="eap-ig", steps=2, **kw).scores.settings["steps"] == 2
    assert "steps" not in find_circuit(model, clean, corrupted, method="eap", **kw).scores.settings


@pytest.mark.parametrize(("method", "name", "differentiable", "match"), [
    ("eap-ig", "accuracy", False, "needs a differentiable metric"),
    ("eap", "kl", True, "gradient is 0 at the clean run"),
])  # fmt: skip
def test_find_circuit_refuses_a_method_its_metric_cannot_serve(method, name, differentiable, match):
    model, (clean, corrupted) = planted_residual("linear"), batches()
    with pytest.raises(MechscopeError, match=match):
        find_circuit(model, clean, corrupted, metric=logit_diff, better="higher", metric_name=name,
                     differentiable=differentiable, method=method)  # fmt: skip


def test_counts_without_an_end_are_refused_before_any_work():
    """EAP-IG's steps and the curve's random orders are bounded (10**8 steps and 10**7 orders ran without end, 2**64
    orders raised tqdm's OverflowError); the curve's seed is a 64-bit seed; find_circuit checks them first."""
    model, (clean, corrupted) = planted_residual("linear"), batches()
    with pytest.raises(MechscopeError, match="EAP-IG steps must be an integer from 1 to 1,000"):
        eap_ig(model, clean, corrupted, metric=logit_diff, steps=10**8)
    scores = eap(model, clean, corrupted, metric=logit_diff)
    with pytest.raises(MechscopeError, match="n_random must be an integer from 0 to 10,000"):
        faithfulness_curve(model, scores, clean, corrupted, metric=logit_diff, n_random=2**64)
    with pytest.raises(MechscopeError, match="seed must be an integer from 0 to 2"):
        faithfulness_curve(model, scores, clean, corrupted, metric=logit_diff, seed=2**64)
    calls = []
    counting = type("Counting", (), {"graph": model.graph, "forward": lambda s, *a, **k: calls.append(1),
                                     "edge_mix": model.edge_mix})()  # fmt: skip
    with pytest.raises(MechscopeError, match="n_random must be an integer from 0 to 10,000"):
        find_circuit(counting, clean, corrupted, metric=logit_diff, better=None, metric_name="m", differentiable=True,
                     method="eap", n_random=10**7)  # fmt: skip
    assert calls == []  # refused before the scoring ran a forward pass
    with pytest.raises(MechscopeError, match="seed must be an integer from 0 to 2"):  # with or without the curve
        find_circuit(counting, clean, corrupted, metric=logit_diff, better=None, metric_name="m", differentiable=True,
                     method="eap", curve=False, seed=2**64)  # fmt: skip


def test_find_circuits_inputs_of_the_wrong_kind_are_one_line():
    """Truth: the documented argument types. A string for the edges was "'str' object has no attribute 'graph'",
    curve="no" drew the curve (a true string), a corrupted batch of another size torch's "Size does not match", a
    metric giving NaN "the full model and the empty circuit give the same metric (nan)"."""
    model, (clean, corrupted) = planted_residual("linear"), batches()
    kw = dict(metric=logit_diff, better=None, metric_name="m", differentiable=True, method="eap")
    for edges, clean_, corrupted_, extra, said in (
        ("edges", clean, corrupted, {}, "str is not an EdgeModel: it needs a graph"),
        (model, clean, corrupted, {"curve": "no"}, "curve must be True or False, got 'no'"),
        (model, clean, corrupted[:1], {}, f"{len(clean)} clean inputs and 1 corrupted ones: patching takes one"),
        (model, clean, corrupted, {"metric": lambda out: out.sum() * math.nan}, "the m is not finite on the clean"),
        (model, clean, corrupted, {"method": "acdc", "metric": lambda out: out.sum() * math.nan}, "the m is not fin"),
    ):  # ACDC's own threshold was "the ACDC threshold must be a finite number >= 0, got nan", never given
        with pytest.raises(MechscopeError, match=said):
            find_circuit(edges, clean_, corrupted_, **(kw | extra))
    nan_corrupted = lambda out: torch.log(logit_diff(out) + 1)  # noqa: E731  0.32 clean, -1.50 corrupted: NaN there
    assert math.isfinite(float(nan_corrupted(model.forward(clean)[0])))
    assert math.isnan(float(nan_corrupted(model.forward(corrupted)[0])))
    with pytest.raises(MechscopeError, match="the m is not finite on the clean or the corrupted inputs"):
        find_circuit(model, clean, corrupted, **(kw | {"metric": nan_corrupted}))  # was "the same metric (-0.09)"
    for ablation in ("mean", "zero"):  # a reference batch of another size: as before, no refusal
        found = find_circuit(model, clean, corrupted[:3], **(kw | {"ablation": ablation, "curve": 1}))
        assert found.faithfulness is not None


@pytest.mark.parametrize("method", ["eap", "acdc"])
def test_find_circuit_refuses_inputs_its_metric_cannot_tell_apart(method):
    """Clean and corrupted with the same metric (cnn discover --metric detect on a class both batches were called)
    scored every edge 0 and wrote a circuit of nothing at threshold 0; scrub already refused the same case."""
    model, (clean, _) = planted_residual("linear"), batches()
    with pytest.raises(MechscopeError, match="the clean and the corrupted inputs give the same logit_diff"):
        find_circuit(model, clean, clean.clone(), metric=logit_diff, better="higher", metric_name="logit_diff",
                     differentiable=True, method=method, curve=False)  # fmt: skip


def test_the_summary_says_mean_or_zero_ablation_runs_no_corrupted_input():
    from types import SimpleNamespace

    from mechscope.core.render.discovery import _ends

    assert _ends(SimpleNamespace(metric_clean=1.0, metric_corrupted=0.25)) == "clean 1, corrupted 0.25"
    mean = _ends(SimpleNamespace(metric_clean=1.0, metric_corrupted=float("nan")))
    assert mean == "clean 1 (no corrupted metric: removed edges carry the corrupted batch's mean, or zero)"
    assert "nan" not in mean


def test_python_arguments_are_named_as_python_names_them():
    model, (clean, corrupted) = planted_residual("linear"), batches()
    with pytest.raises(MechscopeError, match="^threshold must be >= 0, got -1"):  # the CLI's check says --threshold
        find_circuit(model, clean, corrupted, metric=logit_diff, better="higher", metric_name="logit_diff",
                     differentiable=True, method="acdc", threshold=-1.0)  # fmt: skip
