"""``lm heads`` / ``lm circuits`` against outside truths: a hand-built model's known answer, a plain forward with
F.cross_entropy by hand, a formula written out, numbers constructed by hand. Each test names its truth; each was
written to fail on one mutation of the source that no other test noticed."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mechscope.core.hooks import hooks
from mechscope.lm.methods import ablation as HA
from mechscope.lm.methods.circuits import CircuitsResult
from mechscope.lm.methods.heads import (
    HeadProtocol,
    Thresholds,
    check_protocol,
    circuit_rows,
    classify,
    find_induction_heads,
    path_tests,
)
from mechscope.lm.methods.path_patching import Criterion, PathPatch
from mechscope.lm.methods.scores import repeated_tokens
from mechscope.lm.models.folding import analysis_weights
from tests.unit.test_heads import PROTOCOL, V, hand_built, second_half_loss_by_hand
from tests.unit.test_sentences_heads import LABELS, _composition, _scores, make_result

N = PROTOCOL.n


@pytest.fixture(scope="module")
def run():
    """hand_built() under the test protocol, and the protocol's repeated tokens regenerated as the code makes them:
    a generator seeded with the protocol's seed, its first draw the BOS + n + n batch."""
    model = hand_built()
    p, token_range = check_protocol(model, PROTOCOL)
    tokens = repeated_tokens(model, p.n, p.batch, 2, torch.Generator().manual_seed(p.seed), token_range)
    return model, tokens, find_induction_heads(model, PROTOCOL)


def test_the_half_losses_are_the_by_hand_cross_entropy_without_bos(run):
    """Truth: a plain forward and F.cross_entropy per position (position p predicts token p + 1), averaged over the
    batch; the first half is positions 1..n−1 (BOS's prediction of the first random token left out: nothing could
    predict it), the second positions n+1..2n−1 (each predicting a token inside the second copy)."""
    model, tokens, r = run
    with torch.no_grad():
        logits = model(tokens)[:, :-1].float()
    loss = F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none").mean(0).double()
    assert loss.shape == (2 * N,)
    np.testing.assert_allclose(r.loss_per_position, loss.numpy(), rtol=1e-5)
    assert r.loss_first_half == pytest.approx(float(loss[1:N].mean()), rel=1e-5)
    assert r.loss_second_half == pytest.approx(float(loss[N + 1 : 2 * N].mean()), rel=1e-5)
    assert abs(loss[0] - loss[1:N].mean()) > 0.5  # BOS's position is unlike the rest: including it would show


def test_above_baseline_is_the_score_minus_the_random_baseline():
    """Truth, by hand: in _composition() the strongest K-composition source of 2.0 is 0.2 at 0.10, the random
    baseline 0.04, so it lies 0.10 − 0.04 = 0.06 above the baseline; 1.2's strongest is 0.3 at 0.06: 0.02 above."""
    rows = circuit_rows(_scores(), LABELS, _composition(), (), 2, 4)
    top = {row["induction_head"]["layer"]: row["top_k_composition"][0] for row in rows}
    assert top[2]["head"] == "0.2" and top[2]["k_composition"] == pytest.approx(0.10)
    assert top[2]["above_baseline"] == pytest.approx(0.06)
    assert top[1]["head"] == "0.3" and top[1]["above_baseline"] == pytest.approx(0.02)


def test_a_path_tests_k_composition_is_the_definition_written_out(run):
    """Truth: K-composition of 0.0 into 1.0 written out on the folded view, ‖W_OV⁰·⁰ (W_Q¹·⁰ W_K¹·⁰ᵀ)ᵀ‖ /
    (‖W_OV⁰·⁰‖ ‖W_QK¹·⁰‖); head 0.0 writes only the previous-token subspace, which 1.0's queries never read, so its
    Q-composition written out is 0: a path test that read the Q scores would show 0."""
    model, _, r = run
    view = analysis_weights(model, mlp=False)
    left = (view.W_V[0, 0] @ view.W_O[0, 0]).double()
    qk = (view.W_Q[1, 0] @ view.W_K[1, 0].T).double()
    k_comp = float((left @ qk.T).norm() / (left.norm() * qk.norm()))
    q_comp = float((left @ qk).norm() / (left.norm() * qk.norm()))
    assert k_comp > 0.05 and q_comp == pytest.approx(0.0, abs=1e-6)
    (row,) = r.circuit()
    tests = {t["source"]: t for t in row["path_patching"]}
    assert tests["0.0"]["k_composition"] == pytest.approx(k_comp, abs=1e-6)
    assert tests["0.1"]["k_composition"] == pytest.approx(0.0, abs=1e-6)  # a zero head composes with nothing


def test_path_tests_take_the_strongest_k_composition_sources():
    """Truth, by hand: with no previous-token heads and one extra candidate, each induction head's key/value group
    is tested against its single largest K-composition source in _composition(): 0.3 (0.06) into 1.2 (kv head 1 of
    layer 1), 0.2 (0.10) into 2.0 (kv head 0 of layer 2)."""
    labels = [["none" if lab == "previous_token" else lab for lab in row] for row in LABELS]
    assert path_tests(labels, _composition(), 2, 1) == {(1, 1): [(0, 3)], (2, 0): [(0, 2)]}


def test_prefix_matching_without_copying_is_not_induction():
    """Truth (Olsson et al.): an induction head both prefix-matches and copies. Hand scores: a head with prefix
    matching 0.9 and copying −0.1 is no induction head; the same with copying +0.1 is."""
    z = np.zeros((1, 2))
    s = {k: z.copy() for k in ("induction", "prefix_matching", "previous_token", "duplicate_token", "copying")}
    s["prefix_matching"][0] = 0.9
    s["copying"][0] = (-0.1, 0.1)
    assert classify(s, Thresholds()) == [["none", "induction"]]


def test_an_anti_induction_head_is_not_labelled_induction():
    """Truth: hand_built() with head 1.0's output negated on the token rows attends exactly as before (prefix
    matching high) but lowers the logit of the token it attends to (copying < 0): an anti-induction head."""
    model = hand_built()
    with torch.no_grad():
        model.blocks[1].attn.W_O[0][:, :V] *= -1
    r = find_induction_heads(model, replace(PROTOCOL, per_head_ablation=False))
    assert r.scores["prefix_matching"][1, 0] > 0.8 and r.scores["copying"][1, 0] < 0
    assert r.labels[1][0] != "induction" and r.induction_heads() == []


def test_top_k_ablation_is_the_mean_over_sequences_of_the_by_hand_ablation(run):
    """Truth: with top_k 1, head 1.0 mean-ablated alone by a hook of our own (each position's z of head 1.0 set to
    that position's mean over the batch), second-half loss by hand, averaged over the sequences; the same number as
    the per-head exact measurement of 1.0."""
    model, tokens, r = run
    z = {}

    def grab(act, hook):
        z["z"] = act.clone()

    def ablate(act, hook):
        act = act.clone()
        act[:, :, 0] = z["z"][:, :, 0].mean(0)
        return act

    with torch.no_grad():
        with hooks(model, fwd=[("blocks.1.attn.hook_z", grab)]):
            clean = second_half_loss_by_hand(model(tokens), tokens, N)
        with hooks(model, fwd=[("blocks.1.attn.hook_z", ablate)]):
            ablated = second_half_loss_by_hand(model(tokens), tokens, N)
    by_hand = float((ablated - clean).mean())
    assert r.top_k_ablation["heads"] == [{"layer": 1, "head": 0}] and by_hand > 1.0
    assert r.top_k_ablation["induction_heads_loss_increase"] == pytest.approx(by_hand, abs=1e-5)
    assert r.top_k_ablation["induction_heads_loss_increase"] == pytest.approx(r.ablation["mean"].exact_mean[(1, 0)],
                                                                              abs=1e-5)  # fmt: skip


def test_the_largest_estimate_is_the_one_measured(run):
    """Truth: in hand_built() only heads 0.0 and 1.0 write anything, and zero-ablating the copying head 1.0 has
    the largest first-order estimate (the two zero heads estimate exactly 0); with top=1 and no random sample it
    alone is measured, and costs nats."""
    model, tokens, _ = run
    cap = HA.capture(model, tokens, N)
    est = HA.estimate(cap, "zero").mean(-1)
    assert np.argmax(np.abs(est)) == 2 and est[0, 1] == 0 and est[1, 1] == 0  # (1, 0) flattened
    out = HA.ablate_heads(model, cap, tokens, N, 1, 0, torch.Generator().manual_seed(0), kinds=("zero",))
    assert list(out["zero"].exact_mean) == [(1, 0)] and out["zero"].exact_mean[(1, 0)] > 1.0


def test_the_criterion_needs_the_share_as_well_as_the_drop():
    """Truth, by hand with the defaults (min_drop 0.05, min_share 0.2): clean 0.9, patched 0.8 drops 0.10, above
    0.05 but below 0.2 × 0.9 = 0.18: not confirmed; patched 0.7 drops 0.20 ≥ 0.18: confirmed."""
    c = Criterion()
    assert (c.min_drop, c.min_share) == (0.05, 0.2)
    clean = np.full((1, 4), 0.9)
    assert c.confirms(clean, np.full((1, 4), 0.8)) == (False,)
    assert c.confirms(clean, np.full((1, 4), 0.7)) == (True,)


def test_drop_std_is_the_sample_sd_of_the_drop():
    """Truth, by hand: clean 1 on four sequences, patched 0, .5, 1, .5: drops 1, .5, 0, .5, mean 0.5, sample sd
    (ddof 1) √((.25 + 0 + .25 + 0) / 3) = √(1/6)."""
    pp = PathPatch.measured((0, 0), 1, 0, (0,), np.ones((1, 4)), np.array([[0.0, 0.5, 1.0, 0.5]]), (True,))
    assert pp.drop == pytest.approx((0.5,)) and pp.induction_clean == pytest.approx((1.0,))
    assert pp.drop_std == pytest.approx((np.sqrt(1 / 6),))


def test_circuits_json_lists_the_heads_at_or_above_the_protocols_threshold():
    """Truth, by hand: the hand-made result's prefix-matching scores are 0.9 (2.0), 0.8 (1.2), 0.5 (2.1), plus 0.3
    on 1.0 added here; at the protocol's threshold 0.4 the first three are listed, highest first; at a threshold of
    0.25 set in the protocol, 1.0 joins them."""
    scores = _scores()
    scores["prefix_matching"][1, 0] = 0.3
    heads = make_result(scores=scores)

    def listed(result):
        d = CircuitsResult("hand-made", "folded", _composition(), ((1, 2),), induction=result).to_dict()
        return [row["head"] for row in d["induction_circuit"]["prefix_matching_heads"]]

    assert heads.protocol["thresholds"]["induction"] == 0.4
    assert listed(heads) == ["2.0", "1.2", "2.1"]
    low = HeadProtocol(batch=4, thresholds=Thresholds(induction=0.25)).to_dict() | {"token_range": [10, 100]}
    assert listed(replace(heads, protocol=low)) == ["2.0", "1.2", "2.1", "1.0"]
