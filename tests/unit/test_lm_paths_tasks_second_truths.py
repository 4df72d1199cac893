"""Path patching, the induction task's batches and features, and the circuits helpers against outside truths (second
pass): thresholds met exactly, hand-made path patches and their JSON, attention mass summed in plain loops, a plain
two-forward path patch, token offsets read off by loops, and the documented choices of default heads."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mechscope.core.errors import MechscopeError
from mechscope.lm.methods.circuits import _prefix_matching_rows, default_heads, induction_protocol
from mechscope.lm.methods.graph import pad_sequences
from mechscope.lm.methods.path_patching import Criterion, PathPatch, induction_edges, per_sequence_score
from mechscope.lm.methods.tasks import PADDED, Task, feature_values, induction_task, unread_settings
from tests.unit.test_discovery_lm import tiny
from tests.unit.test_heads import hand_built
from tests.unit.test_sentences_heads import make_result

# ---- path patching ---------------------------------------------------------------------------------------------


def test_criterion_confirms_at_the_threshold_itself_and_needs_both_conditions():
    """Truth, by hand in exactly representable numbers (docstring: "falls by at least min_drop and by at least
    min_share of its clean value"): clean 1.0, patched 0.75 under (0.25, 0.125) is a drop of exactly 0.25: confirmed.
    Default (0.05, 0.20): drop 0.0625 from a clean 0.5 clears 0.05 but not 0.2 × 0.5 = 0.1: not confirmed; the same
    drop from a clean 0.3 clears 0.2 × 0.3 = 0.06: confirmed; a drop of 0.03 from 0.1 clears 0.02 but not 0.05."""
    at = Criterion(min_drop=0.25, min_share=0.125)
    assert at.confirms(np.array([[1.0, 1.0]]), np.array([[0.75, 0.75]])) == (True,)
    clean = np.array([[0.5, 0.5], [0.3, 0.3], [0.1, 0.1]])
    patched = clean - np.array([[0.0625], [0.0625], [0.03]])
    assert Criterion().confirms(clean, patched) == (False, True, False)


def test_margins_with_no_spread_are_infinite_with_the_gaps_sign():
    """Truth, by hand: with a drop sd of 0 the margin is +inf above the threshold and −inf below it (the
    docstring's "±inf where the drop has no spread"): drops 0.3 and 0.01 against max(0.05, 0.2 × 0.5) = 0.1."""
    pp = PathPatch((0, 0), 1, 0, (0, 1), (0.5, 0.5), (0.2, 0.49), (0.3, 0.01), (0.0, 0.0), (True, False))
    assert Criterion().margins(pp, 8) == (np.inf, -np.inf)


def test_measured_path_patch_statistics_are_numpys():
    """Truth: numpy's mean and ddof=1 standard deviation of hand-made per-sequence scores [2 query heads, 3
    sequences] and losses; the JSON names the query heads by the target layer (2), not the key/value head (1)."""
    clean = np.array([[0.9, 0.8, 0.7], [0.4, 0.2, 0.6]])
    patched = np.array([[0.1, 0.5, 0.4], [0.4, 0.1, 0.1]])
    loss = np.array([1.0, 2.0, 4.0])
    pp = PathPatch.measured((0, 3), 2, 1, (4, 5), clean, patched, (True, False), loss)
    assert pp.induction_clean == pytest.approx(clean.mean(1).tolist())
    assert pp.induction_patched == pytest.approx(patched.mean(1).tolist())
    assert pp.drop == pytest.approx((clean - patched).mean(1).tolist())
    assert pp.drop_std == pytest.approx(np.std(clean - patched, axis=1, ddof=1).tolist())
    assert pp.loss_increase == pytest.approx(7 / 3) and pp.loss_increase_std == pytest.approx(np.std(loss, ddof=1))
    d = pp.to_dict()
    assert d["source"] == "0.3" and d["target_layer"] == 2 and d["kv_head"] == 1
    assert d["query_heads"] == ["2.4", "2.5"] and d["loss_increase_std"] == pytest.approx(np.std(loss, ddof=1))
    back = PathPatch.from_dict(d)
    assert (back.source, back.layer, back.kv_head, back.query_heads) == ((0, 3), 2, 1, (4, 5))
    assert back.loss_increase_std == pytest.approx(np.std(loss, ddof=1)) and back.confirmed == (True, False)


def test_per_sequence_score_is_the_weighted_mass_by_loops():
    """Truth: plain loops over a seeded random pattern: for each sequence and head, the attention on the target keys
    summed per query, averaged over the queries the weight marks (3 of 5; not over every position)."""
    g = torch.Generator().manual_seed(0)
    pattern = torch.rand(2, 3, 5, 5, generator=g)
    target = (torch.rand(5, 5, generator=g) > 0.5).float()
    queries = torch.tensor([0.0, 1.0, 0.0, 1.0, 1.0])
    got = per_sequence_score(pattern, target, queries).numpy()
    p, t = pattern.numpy(), target.numpy()
    want = np.zeros((2, 3))
    for b in range(2):
        for h in range(3):
            masses = [sum(p[b, h, i, j] * t[i, j] for j in range(5)) for i in (1, 3, 4)]
            want[b, h] = sum(masses) / 3
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_loss_is_measured_when_any_query_head_of_the_group_confirms():
    """Truth: the two-forward path patch (_two_forward_path_patch: the source mean-ablated in a plain forward, the
    target's keys copied from there) on a model with two query heads per key/value head; a criterion set between
    the two heads' drops confirms one of them, and the docstring's "for confirmed edges, the second-half loss
    change" is then still measured, and equals the plain forward's."""
    from mechscope.lm.methods.ablation import capture
    from mechscope.lm.methods.scores import induction_mask
    from tests.unit.test_folding import random_model
    from tests.unit.test_lm_circuits_discovery_truths import _two_forward_path_patch

    model = random_model("rmsnorm", kv_heads=2, attn_only=True, seed=3)
    n, b = 7, 5
    seq = torch.randint(1, model.cfg.d_vocab, (b, n), generator=torch.Generator().manual_seed(0))
    tokens = torch.cat([torch.zeros(b, 1, dtype=torch.long), seq, seq], 1)
    cap, mask, src = capture(model, tokens, n), induction_mask(tokens.shape[1], n), (0, 2)
    patched, loss, clean, clean_loss = _two_forward_path_patch(model, tokens, n, src, 1, 0)
    drops = (clean - patched).mean(-1)
    assert abs(drops[0] - drops[1]) > 1e-3
    mid = Criterion(min_drop=float(drops.mean()), min_share=-1e9)
    (pp,) = induction_edges(model, cap, tokens, n, {(1, 0): [src]}, mask, mid)
    assert pp.confirmed == tuple(bool(d > drops.mean()) for d in drops) and sum(pp.confirmed) == 1
    assert pp.loss_increase == pytest.approx(float((loss - clean_loss).mean()), abs=1e-4)


# ---- the induction task -----------------------------------------------------------------------------------------


def test_induction_corrupted_rows_are_the_next_rows():
    """Truth, by a loop (docstring: "corrupted = the other sequences (each row gets the next row's tokens)"):
    corrupted row i is clean row i + 1, the last row the first."""
    task = induction_task(hand_built(), n=6, batch=4, seed=1, token_range=(1, 100))
    b = task.clean.shape[0]
    for i in range(b):
        assert torch.equal(task.corrupted[i], task.clean[(i + 1) % b])
    assert not torch.equal(task.corrupted, task.clean)


@pytest.mark.parametrize("metric", ["loss", "logprob", "kl", "logit_diff"])
def test_each_metrics_better_direction_prefers_the_model_that_predicts(metric):
    """Truth: hand_built() predicts the second copy's next token, so its clean output must score better, in the
    task's own ``better`` direction, than uniform logits (all zeros) that predict nothing."""
    model = hand_built()
    task = induction_task(model, metric, n=8, batch=3, seed=0, token_range=(1, 100))
    with torch.no_grad():
        good = float(task.metric(model(task.clean)))
    bad = float(task.metric(torch.zeros(3, 17, 100)))
    assert (good > bad + 0.5) if task.better == "higher" else (good < bad - 0.5)


def test_distinct_tokens_fill_a_range_of_exactly_n_after_the_models_bos():
    """Truth, by the docstring: with a token range of exactly n tokens [1, 11) every row's copy is a permutation of
    1..10, each copy repeated, after the model's own BOS (0, outside the range)."""
    task = induction_task(hand_built(), n=10, batch=3, seed=2, token_range=(1, 11), distinct=True)
    ids = task.clean
    assert ids.shape == (3, 21) and ids[:, 0].tolist() == [0, 0, 0]
    for row in ids.tolist():
        assert sorted(row[1:11]) == list(range(1, 11)) and row[1:11] == row[11:21]


def test_induction_needs_n_of_two_and_fits_the_context_exactly():
    """Truth: the docstring's n >= 2 (n = 1 refused); BOS + 2 × 12 = 25 positions fit a context of exactly 25,
    13 do not."""
    model = tiny("gpt2", n_ctx=25)
    with pytest.raises(MechscopeError, match="n >= 2"):
        induction_task(model, n=1, batch=2)
    assert induction_task(model, n=12, batch=2).clean.shape == (2, 25)
    with pytest.raises(MechscopeError, match="do not fit"):
        induction_task(model, n=13, batch=2)


def test_unread_settings_at_their_default_pass_others_are_named():
    """Truth, by the docstring: a setting the tracr task does not read is tolerated at its default (n = 20, batch
    8) and named otherwise."""
    assert unread_settings("tracr", {"n": 20, "batch": 8}) == []
    assert unread_settings("tracr", {"n": 21, "batch": 8, "distinct": True}) == ["distinct", "n"]


# ---- features of the input ----------------------------------------------------------------------------------------


def _ids_task(period=None):
    ids = torch.arange(2 * 7).view(2, 7) + 10
    return ids, Task("induction", "loss", "lower", ids, ids, lambda out: 0, period=period)


@pytest.mark.parametrize("name,back", [("token[i-2]", 2), ("token[i+2]", -2), ("token[i-0]", 0), ("prev_token", 1)])
def test_token_offsets_are_read_off_by_a_loop(name, back):
    """Truth: a plain loop: position p reads the token at p − back of its own row, −1 where that is outside."""
    ids, task = _ids_task()
    got = feature_values(name, task)
    for b in range(2):
        for p in range(7):
            want = int(ids[b, p - back]) if 0 <= p - back < 7 else -1
            assert int(got[b, p]) == want, (name, b, p)


def test_one_repeat_back_plus_k_is_n_minus_k_positions_back():
    """Truth, by a loop (FEATURES: token[i-n+K] is "the token n−K positions back"): with n = 3, token[i-n+1] reads 2
    back and token[i-n-1] reads 4 back."""
    ids, task = _ids_task(period=3)
    for name, back in (("token[i-n+1]", 2), ("token[i-n-1]", 4), ("token[i-n]", 3)):
        got = feature_values(name, task)
        want = [[int(ids[b, p - back]) if p >= back else -1 for p in range(7)] for b in range(2)]
        assert got.tolist() == want, name


def test_an_offset_of_the_whole_sequence_is_refused_one_less_is_not():
    """Truth: with 7 positions, 6 back leaves one real value per row (position 6 reads position 0); 7 back leaves
    none, a constant feature, and is refused."""
    ids, task = _ids_task()
    assert feature_values("token[i-6]", task)[:, 6].tolist() == ids[:, 0].tolist()
    with pytest.raises(MechscopeError, match="beyond"):
        feature_values("token[i-7]", task)


def test_padded_positions_read_padded():
    """Truth, by hand: rows of lengths 4 and 2 padded to 4; per-position features read PADDED past each row's length
    and the value there inside it; per-row features are left as they are."""
    clean = pad_sequences([[5, 6, 7, 8], [5, 9]], 0)
    task = Task("tracr", "logit", "higher", clean, clean, lambda out: 0)
    assert feature_values("token", task).tolist() == [[5, 6, 7, 8], [5, 9, PADDED, PADDED]]
    assert feature_values("position", task).tolist() == [[0, 1, 2, 3], [0, 1, PADDED, PADDED]]
    assert feature_values("length", task).tolist() == [4, 2]


# ---- circuits helpers ---------------------------------------------------------------------------------------------


def test_prefix_matching_rows_include_the_threshold_and_sort_highest_first():
    """Truth, by a loop over hand-set scores: heads at or above the induction threshold 0.4 (one exactly at it, one
    at 0.39 left out), with their own copying scores, highest prefix-matching first."""
    r = make_result()
    s = {k: v.copy() for k, v in r.scores.items()}
    s["prefix_matching"][2, 1], s["prefix_matching"][0, 3], s["copying"][2, 1] = 0.4, 0.39, 0.25
    r = make_result(scores=s)
    rows = _prefix_matching_rows(r)
    pm, cp = s["prefix_matching"], s["copying"]
    want = [(f"{i}.{j}", pm[i, j], cp[i, j]) for i in range(pm.shape[0]) for j in range(pm.shape[1]) if pm[i, j] >= 0.4]
    want.sort(key=lambda w: w[1], reverse=True)
    assert [(row["head"], row["prefix_matching"], row["copying"]) for row in rows] == want
    assert [row["head"] for row in rows] == ["2.0", "1.2", "2.1"]


class _Ranked:
    def __init__(self, rows):
        self.rows = rows

    def ranked(self, score, label):
        return [{"layer": layer, "head": h} for layer, h in self.rows[label]]

    def top_pairs(self, kind, k):
        assert kind == "K"
        return [{"target": t, "source": s} for t, s in self.rows["K"][:k]]


def test_default_heads_follow_the_documented_order():
    """Truth, by the docstring: the induction circuit's top 3 induction and top 2 previous-token heads, then the K
    pairs' targets before their sources, then the two strongest copiers (eigen [3 layers, 2 heads], non-square),
    duplicates dropped, at most k."""
    ind = _Ranked({"induction": [(2, 0), (1, 1), (2, 1), (1, 0)], "previous_token": [(0, 1), (0, 0), (0, 2)]})
    comp = _Ranked({"K": [("1.0", "0.2")]})
    assert default_heads(comp, ind, None, k=10) == [(2, 0), (1, 1), (2, 1), (0, 1), (0, 0), (1, 0), (0, 2)]
    eigen = np.array([[0.1, 0.2], [0.9, 0.3], [0.4, 0.8]])
    comp = _Ranked({"K": [("2.1", "1.0"), ("2.1", "0.0")]})
    assert default_heads(comp, None, eigen, k=10) == [(2, 1), (1, 0), (0, 0)]
    comp = _Ranked({"K": [("2.0", "0.1")]})
    assert default_heads(comp, None, eigen, k=10) == [(2, 0), (0, 1), (1, 0), (2, 1)]
    assert default_heads(comp, ind, eigen) == [(2, 0), (1, 1), (2, 1), (0, 1), (0, 0), (1, 0)]  # k = 6


@pytest.mark.parametrize("n_ctx,n,prefix_n", [(64, 31, 15), (1024, 50, 25), (13, 6, 3)])
def test_the_circuits_protocol_is_the_longest_that_fits_the_context(n_ctx, n, prefix_n):
    """Truth, by a loop: the largest n (at most 50) with BOS + 2n ≤ n_ctx, and the largest prefix_n (at most 25)
    with BOS + 4 × prefix_n ≤ n_ctx (four repeats, HeadProtocol's default)."""
    model = tiny("gpt2", n_ctx=n_ctx)
    p = induction_protocol(model)
    assert max(k for k in range(1, 51) if 1 + 2 * k <= n_ctx) == n == p.n
    assert max(k for k in range(1, 26) if 1 + p.prefix_repeats * k <= n_ctx) == prefix_n == p.prefix_n
    assert p.per_head_ablation is False and p.exact_path_sources is True


# ---- the tracr task ---------------------------------------------------------------------------------------------


def _tracr(name: str, metric: str, limit: int = 8):
    """A tracr model's task and its examples.json read with json (the outside record of the compiled outputs)."""
    import json

    from mechscope.lm.methods.tasks import make_task
    from mechscope.lm.models.loading import load_model
    from tests.conftest import shared_data_root

    root = shared_data_root()
    if root is None or not (root / "tracr" / name / "config.json").is_file():
        pytest.skip("tracr models not found in $MECHSCOPE_DATA or ../shared/data")
    model = load_model(str(root / "tracr" / name))[0]
    examples = json.loads((root / "tracr" / name / "examples.json").read_text())["examples"][:limit]
    return make_task(model, "tracr", metric, limit=limit), examples


@pytest.mark.parametrize("metric", ["logit", "logprob"])
def test_tracr_categorical_metrics_by_a_loop_over_examples_json(metric):
    """Truth: a loop over hist's first 8 examples and their positions 1..n (BOS left out), reading the expected class
    from examples.json's model_output_ids, on seeded random logits; the mean over every such position."""
    task, examples = _tracr("hist", metric)
    out = torch.randn(*task.clean.ids.shape, 7, generator=torch.Generator().manual_seed(4)).double()
    lp = torch.log_softmax(out, -1) if metric == "logprob" else out
    vals = [float(lp[b, p, ex["model_output_ids"][p - 1]]) for b, ex in enumerate(examples)
            for p in range(1, len(ex["ids"]))]  # fmt: skip
    assert float(task.metric(out)) == pytest.approx(np.mean(vals), rel=1e-9)


def test_tracr_logit_diff_of_the_compiled_outputs_is_against_the_corrupted_runs_class():
    """Truth: examples.json's compiled logits of hist are 1 on the expected class and 0 elsewhere; against the class
    the corrupted example's run predicts, the clean outputs' logit difference is 1 where the two classes differ and
    0 where they agree: between 0 and 1, and above 0 since the corrupted inputs are other inputs (it would be 0 if
    the other class were the clean run's own)."""
    task, examples = _tracr("hist", "logit_diff")
    out = torch.zeros(*task.clean.ids.shape, 7, dtype=torch.float64)
    for b, ex in enumerate(examples):
        out[b, : len(ex["ids"])] = torch.tensor(ex["model_logits"], dtype=torch.float64)
    assert 0.05 < float(task.metric(out)) <= 1.0


def test_tracr_projection_and_mse_of_the_compiled_outputs():
    """Truth: frac_prevs' compiled outputs from examples.json (model_output at positions 1..n) are the clean run: the
    documented projection (y − y')·(y₀ − y')/|y₀ − y'|² is 1 there and the MSE against the clean output is 0."""
    task, examples = _tracr("frac_prevs", "projection")
    out = torch.zeros(*task.clean.ids.shape, 1, dtype=torch.float64)
    for b, ex in enumerate(examples):
        out[b, 1 : len(ex["ids"]), 0] = torch.tensor(ex["model_output"], dtype=torch.float64)
    assert float(task.metric(out)) == pytest.approx(1.0, abs=1e-4)
    mse, _ = _tracr("frac_prevs", "mse")
    assert float(mse.metric(out)) == pytest.approx(0.0, abs=1e-8)


@pytest.mark.parametrize("layers", [1, 2])
def test_skip_trigrams_are_read_for_one_layer_only(layers):
    """Truth, by the module docstring: toy models get the bigram table, and "with one layer, skip-trigrams"; a
    two-layer model's gap says why."""
    from mechscope.lm.methods.circuits import _tables
    from mechscope.lm.models.folding import analysis_weights

    gaps: dict = {}
    got = _tables(analysis_weights(tiny("gpt2", layers=layers, dtype=torch.float32)), gaps)
    assert "bigrams" in got and ("skip_trigrams" in got) == (layers == 1)
    assert ("skip_trigrams" in gaps) == (layers == 2)
