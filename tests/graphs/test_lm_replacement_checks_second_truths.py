"""The language wing's local replacement model and the core's graph checks against outside truths: the replacement's
logits against the unmodified model's for every family (with a large norm epsilon and an unembedding bias, where a
dropped term shows), frozen LayerNorm/RMSNorm scales recomputed in numpy, linearity of the frozen run by finite
differences, hand-picked distributions for the salient logits, the checks' thresholds at their exact boundaries,
hand-planted edge errors for check_edges, and parse_steer/check_asked on strings written here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mechscope.core.attribution_graph import check_asked, check_edges, intervene, parse_steer
from mechscope.core.attribution_graph.checks import GraphIntervention, disagree, gaps
from mechscope.core.errors import MechscopeError
from mechscope.lm.methods.replacement import LocalReplacement
from mechscope.lm.models.transformer import LayerNorm, RMSNorm
from tests.graphs.test_attribution_graph_truths import (
    F0,
    F1,
    IN0,
    IN1,
    L0,
    L1,
    E,
    FakeRep,
    _direct,
    dense,
    graph,
    hand_built,
)
from tests.unit.test_attribution_graph_lm import FAMILIES, TOKENS, random_transcoders, tiny
from tests.unit.test_attribution_graph_page_text import row
from tests.unit.test_lm_toy_replacement_truths import _relu_model

EPS = 0.3  # a norm epsilon large enough that dropping it moves the logits far beyond float rounding


def _wide_eps(model):
    for m in model.modules():
        if isinstance(m, (LayerNorm, RMSNorm)):
            m.eps = EPS
    return model


def _own_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS[None])[0]


# ---- the replacement model ---------------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
def test_replacement_logits_are_the_models_own_with_a_large_norm_epsilon(family):
    """Outside truth: the unmodified model's forward pass; error nodes make the replacement exact on the prompt,
    whatever the norms' epsilon (0.3 here, so a frozen scale without it is off by far more than 1e-5)."""
    model = _wide_eps(tiny(family))
    rep = LocalReplacement(model, random_transcoders(model), TOKENS)
    own = _own_logits(model)
    assert (rep.replacement_logits() - own).abs().max() < 1e-5
    cap = model.cfg.final_logit_softcap
    logits, _ = rep.run("direct")  # before any soft-cap: the capped run gives back the model's logits
    capped = logits if cap is None else torch.tanh(logits / cap) * cap
    assert (capped - own).abs().max() < 1e-5


def test_replacement_logits_keep_the_unembedding_bias():
    """Outside truth: the model's own logits with a nonzero unembedding bias b_U (the run's logits add it too)."""
    model = _relu_model("gelu", unembed_bias=True, tie_embeddings=False)
    assert model.b_U.abs().max() > 0.1
    rep = LocalReplacement(model, random_transcoders(model), TOKENS)
    own = _own_logits(model)
    assert (rep.replacement_logits() - own).abs().max() < 1e-5
    assert (rep.run("frozen")[0] - own).abs().max() < 1e-5


def _norm_input(model, module) -> np.ndarray:
    got = {}
    h = module.register_forward_hook(lambda m, a, o: got.__setitem__("x", a[0][0].double().numpy()))
    try:
        _own_logits(model)
    finally:
        h.remove()
    return got["x"]


@pytest.mark.parametrize("family,centred", [("gpt2", True), ("llama", False)])
def test_frozen_norm_scale_and_output_by_numpy(family, centred):
    """Outside truth, numpy: LayerNorm's scale is 1/sqrt(mean((x - mean x)^2) + eps), RMSNorm's 1/sqrt(mean(x^2) +
    eps) on the prompt's input x; frozen, the norm maps another input y to (y - mean y) s w + b (LayerNorm) or
    w (y s) (RMSNorm) with the prompt's s, not y's."""
    model = _wide_eps(tiny(family))
    rep = LocalReplacement(model, random_transcoders(model), TOKENS)
    ln = model.blocks[1].ln1
    x = _norm_input(model, ln)
    xc = x - x.mean(-1, keepdims=True) if centred else x
    s = 1.0 / np.sqrt((xc**2).mean(-1, keepdims=True) + EPS)
    np.testing.assert_allclose(rep.scales[id(ln)][0].double().numpy(), s, rtol=1e-5)
    y = np.random.default_rng(0).normal(size=x.shape) * 3.0
    w = ln.w.detach().double().numpy()
    want = (y - y.mean(-1, keepdims=True)) * s * w + ln.b.detach().double().numpy() if centred else w * (y * s)
    with rep.frozen(), torch.no_grad():
        got = ln(torch.tensor(y[None], dtype=torch.float32))[0].double().numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)


@pytest.mark.parametrize("family", ["gpt2", "gemma2", "llama"])
def test_the_direct_run_is_linear_in_every_source(family):
    """Outside truth: linearity by finite differences written here: with patterns and norms frozen, scaling a
    source by 1, 2, 3 moves the demeaned logits and the pre-activations by equal steps; the model itself
    (recomputed) is not linear in the same source."""
    model = _wide_eps(tiny(family))
    rep = LocalReplacement(model, random_transcoders(model), TOKENS)
    targets = torch.tensor([0, 5, 17])
    nf, P = rep.n_features, rep.P
    picks = [0, nf - 1, nf + 2, nf + P + 4, nf + 2 * P + 1]  # first and last feature, errors of both layers, input 1
    for s in picks:
        runs = [rep.run("direct", scale_source=(s, k)) for k in (1.0, 2.0, 3.0)]
        dem = [rep.demeaned(lg, targets, P - 1).double() for lg, _ in runs]
        pre = [p.double() for _, p in runs]
        assert torch.allclose(dem[2] - dem[1], dem[1] - dem[0], atol=2e-5), (family, s)
        assert torch.allclose(pre[2] - pre[1], pre[1] - pre[0], atol=2e-5), (family, s)
    s = nf + 2 * P + 1
    live = [rep.demeaned(rep.run("recomputed", scale_source=(s, k))[0], targets, P - 1) for k in (1, 2, 3)]
    assert not torch.allclose(live[2] - live[1], live[1] - live[0], atol=1e-4)


def test_error_sources_are_named_layer_major():
    """Outside truth: the documented order [features | errors (layer-major) | inputs] and node ids LAYER_-1_POS,
    E_TOKEN_POS written out here."""
    model = tiny("gpt2")
    rep = LocalReplacement(model, random_transcoders(model), TOKENS)
    nf, P = rep.n_features, rep.P
    assert rep.source_id(nf + 0 * P + 5) == "0_-1_5"
    assert rep.source_id(nf + 1 * P + 3) == "1_-1_3"
    assert rep.source_id(nf + 2 * P + 4) == f"E_{int(TOKENS[4])}_4"


def test_salient_logits_stop_when_the_share_is_reached_exactly():
    """Outside truth: a hand-picked distribution, four tokens of probability 1/4 (the rest -inf): reaching 0.5
    takes exactly two tokens, 0.75 three, and max_n caps the count."""
    model = tiny("gpt2")
    rep = LocalReplacement(model, random_transcoders(model), TOKENS)
    row_ = torch.full((model.cfg.d_vocab,), -math.inf)
    row_[[3, 8, 11, 20]] = 0.0
    rep.logits = rep.logits.clone()
    rep.logits[-1] = row_
    for desired, max_n, n in ((0.5, 10, 2), (0.75, 10, 3), (0.76, 10, 4), (1.0, 2, 2)):
        ids, probs = rep.salient_logits(max_n=max_n, desired=desired)
        assert len(ids) == n and set(ids.tolist()) <= {3, 8, 11, 20}, desired
        assert probs.tolist() == [0.25] * n


# ---- the checks ----------------------------------------------------------------------------------------------


def test_disagree_at_the_floor_and_between_floor_and_ten_times_it():
    """Outside truth: the documented rule with hand-picked values: a difference of exactly 1e-3 is noise (0.0 vs
    0.001), a difference just above it is not (0.0 vs 0.0015 and 0.004 vs -0.004 differ in sign)."""
    assert not disagree(0.0, 0.001) and not disagree(0.001, 0.0)
    assert disagree(0.0, 0.0015) and disagree(0.004, -0.004) and disagree(0.003, 0.0069)
    assert not disagree(0.003, 0.006)  # exactly twice, 3e-3 apart


def test_gaps_pass_over_a_step_with_no_finite_number():
    """Outside truth: the documented rule that a step with no finite number is passed over: the graph (+1) is then
    compared with the recomputed run (-1) directly."""
    for bad in (math.nan, math.inf, None):
        got = gaps({"predicted_full": 1.0, "frozen": bad, "recomputed": -1.0, "model": -1.0})
        assert got == [("predicted_full", "recomputed")], bad


def test_the_cli_line_says_a_step_that_does_not_move():
    """Outside truth: the sentence for a graph predicting +0.5 where the frozen run moves 0: not opposite signs."""
    line = GraphIntervention(description="ablate 0_1_2", changes={}, logits=(row("z", 0.5, 0.0, 0.0, 0.0),)).summary()
    assert "graph vs frozen disagree (one does not move)" in line
    line = GraphIntervention(description="d", changes={}, logits=(row("z", 0.5, -0.5, -0.5, -0.5),)).summary()
    assert "(opposite signs)" in line


def test_check_edges_counts_n_sources_and_is_relative_to_the_stored_largest_edge():
    """Outside truth: the hand-built model with one error planted on its largest edge (L0<-f1 measured 5.0, stored
    4.0): abs error 1.0 relative to the stored 4.0 is 0.25; asking for 2 sources checks 2."""
    true = dense()
    true[L0, F1] = 5.0
    got = check_edges(hand_built(), _direct(true), 10)
    assert got == pytest.approx(
        {"edges_sources_checked": 5, "edges_max_abs_error": 1.0, "edges_largest": 4.0, "edges_max_rel_error": 0.25}
    )
    assert check_edges(hand_built(), _direct(dense()), 2)["edges_sources_checked"] == 2
    assert check_edges(hand_built(), _direct(dense()), 0)["edges_sources_checked"] == 0


def test_check_edges_draws_its_sources_with_the_seed():
    """Outside truth: one distinct planted error per source (f0 .01, f1 .02, e .03, in0 .04, in1 .05): one source
    checked names itself by its error; seeds draw different sources, the same seed the same one."""
    true = dense()
    for k, (t, s) in enumerate([(L1, F0), (L0, F1), (L0, E), (F0, IN0), (L1, IN1)]):
        true[t, s] += 0.01 * (k + 1)
    errs = [round(check_edges(hand_built(), _direct(true), 1, seed=i)["edges_max_abs_error"], 6) for i in range(12)]
    assert set(errs) <= {0.01, 0.02, 0.03, 0.04, 0.05} and len(set(errs)) >= 2
    again = check_edges(hand_built(), _direct(true), 1, seed=7)["edges_max_abs_error"]
    assert again == pytest.approx(errs[7])


def test_an_interventions_changes_are_old_then_new():
    """Outside truth: the hand-built graph's f0 has activation 2.0 (ACT): ablated [2.0, 0.0], steered to 5 [2.0,
    5.0], scaled by 0.5 [2.0, 1.0]."""
    zero = lambda mode, ch: torch.zeros(2)  # noqa: E731
    assert intervene(graph(), FakeRep(), ["0_7_1"], zero).changes == {"0_7_1": [2.0, 0.0]}
    assert intervene(graph(), FakeRep(), "0_7_1", zero, value=5.0, scale=None).changes == {"0_7_1": [2.0, 5.0]}
    iv = intervene(graph(), FakeRep(), ["0_7_1"], zero, scale=0.5)
    assert iv.changes == {"0_7_1": [2.0, 1.0]} and iv.description == "scale by 0.5 0_7_1"


def test_parse_steer_on_strings_written_here():
    """Outside truth: NODE=VALUE strings written by hand: spaces around the node go, the value is a finite float of
    at most 1e6 in size, anything else is one line naming the example."""
    assert parse_steer(" 1_2_3 = -2.5", "1_2_3") == ("1_2_3", -2.5)
    assert parse_steer("0_40_7=-1e6", "x") == ("0_40_7", -1e6)
    for bad in ("1_2_3=4=5", "1_2_3", "1_2_3=abc", "1_2_3=nan", "1_2_3=-inf", "1_2_3=1000000.1"):
        with pytest.raises(MechscopeError) as e:
            parse_steer(bad, "9_9_9")
        assert "\n" not in str(e.value), bad


def test_check_asked_takes_whole_feature_ids_only():
    """Outside truth: ids written here: LAYER_FEATURE_POS and nothing more or less (spaces around it allowed)."""
    check_asked([[" 1_2_3 "]], [("0_4_1", 2.0)])
    for bad in ("1_2_3_4", "1_2_3x", "1_2", "E_5_0", "1_-1_3"):
        with pytest.raises(MechscopeError, match="only feature nodes"):
            check_asked([[bad]])
        with pytest.raises(MechscopeError, match="only feature nodes"):
            check_asked(None, [(bad, 1.0)])
