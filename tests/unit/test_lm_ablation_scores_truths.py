"""Head scores and head ablations of the language wing against outside truths (a second look after
test_lm_heads_truths.py): plain loops over each attention pattern, F.cross_entropy by hand, hooks of our own,
numpy's mean and sample sd, numbers built by hand. Each test names its truth."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mechscope.core.errors import MechscopeError
from mechscope.core.hooks import hooks
from mechscope.lm.methods import ablation as HA
from mechscope.lm.methods import scores as S
from mechscope.lm.methods.heads import find_induction_heads
from mechscope.lm.models.transformer import HookedTransformer, TransformerConfig
from tests.unit.test_heads import CTX, PROTOCOL, V, hand_built, repeated, second_half_loss_by_hand

N = 20


def sharp_random(seed: int = 3, bos: int | None = 0) -> HookedTransformer:
    """A seeded 2-layer, 4-head attention-only model whose queries are scaled up so attention is far from uniform."""
    cfg = TransformerConfig(d_model=64, n_layers=2, n_heads=4, d_head=16, d_vocab=V, n_ctx=CTX, attn_only=True,
                            bos_token_id=bos)  # fmt: skip
    model = HookedTransformer(cfg).eval()
    model.init_weights(torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for b in model.blocks:
            b.attn.W_Q.mul_(60.0)
    return model


def patterns(model, tokens) -> list[np.ndarray]:
    """Every layer's pattern [B, H, P, K] from a hook of our own."""
    got = {}

    def grab(layer):
        def hook(p, hp):
            got[layer] = p.detach().double().numpy()

        return hook

    names = [(f"blocks.{i}.attn.hook_pattern", grab(i)) for i in range(model.cfg.n_layers)]
    with torch.no_grad(), hooks(model, fwd=names):
        model(tokens)
    return [got[i] for i in range(model.cfg.n_layers)]


def loop_scores(pat: np.ndarray, tokens: np.ndarray, n: int) -> dict[str, np.ndarray]:
    """Olsson et al.'s definitions as plain loops over one layer's pattern [B, H, P, K]: induction (second-copy query
    q to key q − n + 1, the token after its first occurrence), previous token (q to q − 1, q ≥ 1), duplicate token
    (mass on earlier copies of q's token, over queries that have one); each a mean over (sequence, query)."""
    b, h, p, _ = pat.shape
    out = {k: np.zeros(h) for k in S.REPEATED_SCORES}
    for head in range(h):
        ind, prev, dup = [], [], []
        for s in range(b):
            for q in range(p):
                if n + 1 <= q <= 2 * n:
                    ind.append(pat[s, head, q, q - n + 1])
                if q >= 1:
                    prev.append(pat[s, head, q, q - 1])
                keys = [k for k in range(q) if tokens[s, k] == tokens[s, q]]
                if keys:
                    dup.append(sum(pat[s, head, q, k] for k in keys))
        out["induction"][head], out["previous_token"][head] = np.mean(ind), np.mean(prev)
        out["duplicate_token"][head] = np.mean(dup)
    return out


def test_score_pass_scores_are_the_definitions_as_plain_loops():
    """Truth: loop_scores() on patterns read by our own hook; tokens from a 10-token range so that copies repeat
    inside a half (the duplicate score's queries then vary per sequence). On hand_built() with distinct tokens the
    planted heads score ≈ 1 (0.0 previous token, 1.0 induction)."""
    g = torch.Generator().manual_seed(11)
    tokens = S.repeated_tokens(sharp_random(), N, 3, 2, g, (1, 11))
    for model in (sharp_random(), hand_built()):
        sp = S.score_pass(model, tokens, N)
        for layer, pat in enumerate(patterns(model, tokens)):
            want = loop_scores(pat, tokens.numpy(), N)
            for name in S.REPEATED_SCORES:
                np.testing.assert_allclose(sp.scores[name][layer], want[name], atol=1e-5, err_msg=f"{name} {layer}")
    seq = torch.randperm(V - 1, generator=torch.Generator().manual_seed(2))[:N] + 1  # distinct tokens
    sp = S.score_pass(hand_built(), torch.cat([torch.zeros(1, dtype=torch.long), seq, seq])[None], N)
    assert sp.scores["previous_token"][0, 0] > 0.99 and sp.scores["induction"][1, 0] > 0.99


def test_prefix_matching_is_the_loop_from_the_first_query():
    """Truth (Olsson et al.): prefix matching = attention from q to keys k ≤ q whose previous token equals q's
    token, averaged over the queries from the second copy on that have such a key; a plain loop. The small token
    range puts repeats inside the first copy, whose queries must not count."""
    model, n = sharp_random(), 6
    toks = S.repeated_tokens(model, n, 3, 3, torch.Generator().manual_seed(4), (1, 5))
    got = S.attention_scores(model, toks, {"pm": S.prefix_mask(toks, 1 + n)})["pm"]
    t = toks.numpy()
    for layer, pat in enumerate(patterns(model, toks)):
        for head in range(4):
            vals = []
            for s in range(t.shape[0]):
                for q in range(1 + n, t.shape[1]):
                    keys = [k for k in range(1, q + 1) if t[s, k - 1] == t[s, q]]
                    if keys:
                        vals.append(sum(pat[s, head, q, k] for k in keys))
            assert got[layer, head] == pytest.approx(np.mean(vals), abs=1e-5), (layer, head)


def test_head_scores_halves_and_kept_patterns():
    """Truth: F.cross_entropy by hand per position averaged over the batch; first half positions 1..n−1, second
    n+1..2n−1; the kept patterns are the top 3 heads by induction and top 2 by previous token, ranked by numpy's
    argsort written here, each equal to our own hook's pattern of the first sequence."""
    model = sharp_random()
    tokens = repeated(9, n=N, b=3)
    r = S.head_scores(model, tokens, [str(t) for t in tokens[0].tolist()], "m")
    with torch.no_grad():
        logits = model(tokens)[:, :-1].double()
    loss = F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none").mean(0).numpy()
    np.testing.assert_allclose(r.loss_per_position, loss, rtol=1e-5)
    assert r.loss_first_half == pytest.approx(loss[1:N].mean(), rel=1e-5)
    assert r.loss_second_half == pytest.approx(loss[N + 1 : 2 * N].mean(), rel=1e-5)
    pats = patterns(model, tokens)
    want = set()
    for name, k in (("induction", 3), ("previous_token", 2)):
        s = r.scores[name].ravel()
        order = sorted(range(s.size), key=lambda i: -s[i])[:k]
        want |= {f"{i // 4}.{i % 4}" for i in order}
    assert set(r.patterns) == want and len(want) >= 4
    for key, pat in r.patterns.items():
        layer, h = map(int, key.split("."))
        np.testing.assert_allclose(pat, pats[layer][0, h], atol=1e-6)


def test_capture_patterns_reach_the_last_layer_asked():
    """Truth: our own hook's pattern of the first sequence for heads in layers 0 and 1 (rounded to 4 places)."""
    model, tokens = sharp_random(), repeated(3, n=5, b=2)
    got = S.capture_patterns(model, tokens, [(0, 2), (1, 3)])
    pats = patterns(model, tokens)
    assert set(got) == {"0.2", "1.3"}
    np.testing.assert_allclose(got["1.3"], pats[1][0, 3], atol=1e-4)
    np.testing.assert_allclose(got["0.2"], pats[0][0, 2], atol=1e-4)


def test_token_ranges_bos_and_head_bounds():
    """Truth, by hand: a 100-token vocabulary's default range is [1, 100) (0 is BOS); [5, 100) ends at the
    vocabulary and is allowed, [5, 101) is not; BOS is the config's id (7), or LOW without one; layer 2 of a
    2-layer model is out of range."""
    m7, none = sharp_random(bos=7), sharp_random(bos=None)
    assert S.default_token_range(m7) == (1, 100) and S.token_range_of(m7, None) == (1, 100)
    assert S.token_range_of(m7, (5, 100)) == (5, 100)
    with pytest.raises(MechscopeError, match="outside the vocabulary"):
        S.token_range_of(m7, (5, 101))
    g = torch.Generator().manual_seed(0)
    assert S.repeated_tokens(m7, 4, 2, 2, g, (20, 30))[:, 0].tolist() == [7, 7]
    t = S.repeated_tokens(none, 4, 2, 3, g, (20, 30))
    assert t[:, 0].tolist() == [20, 20] and torch.equal(t[:, 1:5], t[:, 9:13])
    with pytest.raises(MechscopeError, match="out of range"):
        S.check_heads(m7, [(2, 0)])


def _by_hook(model, tokens, edits: dict[int, dict[int, str]]) -> torch.Tensor:
    """Per-sequence second-half loss with head z's replaced by a hook of our own: per layer, head -> "zero",
    "mean" (each position's mean over the batch) or "resample" (sequence b takes sequence b − 1's, cyclically)."""
    clean = {}

    def grab(layer):
        def hook(z, hp):
            clean[layer] = z.clone()

        return hook

    def edit(layer):
        def hook(z, hp):
            z, c = z.clone(), clean[layer]
            for h, kind in edits[layer].items():
                src = c[:, :, h]
                z[:, :, h] = 0 if kind == "zero" else src.mean(0) if kind == "mean" else src[[-1, *range(len(src) - 1)]]
            return z

        return hook

    with torch.no_grad():
        with hooks(model, fwd=[(f"blocks.{i}.attn.hook_z", grab(i)) for i in edits]):
            model(tokens)
        with hooks(model, fwd=[(f"blocks.{i}.attn.hook_z", edit(i)) for i in edits]):
            return second_half_loss_by_hand(model(tokens), tokens, N)


def test_exact_resample_ablation_is_another_sequences_output():
    """Truth: head 1.0 of hand_built() resample-ablated by our own hook (sequence b takes b − 1's z), second-half
    loss by hand, minus the clean loss by hand; per sequence."""
    model, tokens = hand_built(), repeated(5)
    with torch.no_grad():
        clean = second_half_loss_by_hand(model(tokens), tokens, N)
    cap = HA.capture(model, tokens, N)
    got = HA.exact(model, cap, tokens, N, 1, [0], "resample")[0]
    want = (_by_hook(model, tokens, {1: {0: "resample"}}) - clean).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert want.mean() > 1.0


def test_ablating_heads_of_two_layers_together_is_the_hooked_loss():
    """Truth: heads 0.0 (previous token) and 1.0 (induction) mean-ablated together by our own hooks; group(), and
    ablate_together() per sequence, equal the by-hand loss increase; ablated minus clean, not the reverse."""
    model, tokens = sharp_random(), repeated(8, b=4)
    with torch.no_grad():
        clean = second_half_loss_by_hand(model(tokens), tokens, N)
    heads = [(0, 1), (1, 2)]
    want = (_by_hook(model, tokens, {0: {1: "mean"}, 1: {2: "mean"}}) - clean).numpy()
    cap = HA.capture(model, tokens, N)
    assert HA.group(model, cap, tokens, N, heads) == pytest.approx(want.mean(), abs=1e-4)
    r = HA.ablate_together(model, tokens, heads, "mean")
    np.testing.assert_allclose(r.per_sequence, want, atol=1e-4)
    assert r.clean_loss == pytest.approx(float(clean.mean()), abs=1e-4)
    assert r.loss_increase == pytest.approx(want.mean(), abs=1e-4) and abs(want.mean()) > 1e-3


def _made_up() -> HA.HeadAblation:
    """Estimates [1, 2, 3] by hand: head 0.0 → 1, 2, 6; 0.1 → 0, 0, 3; measured 0.0 → 2, 4, 9 and 0.1 → 1, 1, 4."""
    est = np.array([[[1.0, 2.0, 6.0], [0.0, 0.0, 3.0]]])
    return HA.HeadAblation.measured("mean", est, {(0, 0): np.array([2.0, 4.0, 9.0]), (0, 1): np.array([1.0, 1, 4])})


def test_head_ablation_summary_is_numpys_mean_and_sample_sd():
    """Truth: numpy mean and sample sd (ddof 1) of the hand numbers in _made_up(): estimate 3 ± √7 and 1 ± √3,
    measured 5 ± √13 and 2 ± √3; estimate − measurement −2 and −1; the spread is the measurement's sd."""
    a = _made_up()
    np.testing.assert_allclose(a.estimate_mean, [[3.0, 1.0]])
    np.testing.assert_allclose(a.estimate_std, [[np.sqrt(7), np.sqrt(3)]], rtol=1e-6)
    assert a.exact_mean == pytest.approx({(0, 0): 5.0, (0, 1): 2.0})
    assert a.exact_std[(0, 0)] == pytest.approx(np.std([2, 4, 9], ddof=1)) == pytest.approx(np.sqrt(13))
    np.testing.assert_allclose(a.spread(), [[np.sqrt(13), np.sqrt(3)]])
    assert a.errors() == pytest.approx({(0, 0): -2.0, (0, 1): -1.0})
    ag = a.agreement()
    assert ag["max_abs_error"] == pytest.approx(2.0) and ag["median_abs_error"] == pytest.approx(1.5)
    assert ag["median_abs_measured"] == pytest.approx(3.5) and ag["pearson"] == pytest.approx(1.0)
    rows = a.to_dict()["measured"]
    assert rows[0] == pytest.approx({"head": "0.0", "mean": 5.0, "std": np.sqrt(13), "estimate": 3.0})


def test_ablate_heads_measures_the_largest_magnitude_and_the_random_sample_for_mean_only():
    """Truth, by hand: given estimates with head 0.1 at −5 (largest in magnitude) and 1.0 at +1, top=1 measures 0.1
    alone under zero-ablation (no named head, no random sample for it); under mean-ablation with 3 random heads of
    the 3 others, every one of the 4 heads is measured once, and each measurement equals exact() alone."""
    model, tokens = hand_built(), repeated(5)
    cap = HA.capture(model, tokens, N)
    est = np.zeros((2, 2, 4))
    est[0, 1], est[1, 0] = -5.0, 1.0
    out = HA.ablate_heads(model, cap, tokens, N, 1, 3, torch.Generator().manual_seed(0), kinds=("zero", "mean"),
                          named=[(1, 1)], estimates={"zero": est, "mean": est})  # fmt: skip
    assert list(out["zero"].exact_mean) == [(0, 1)]
    assert sorted(out["mean"].exact_mean) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    np.testing.assert_allclose(out["mean"].exact[(1, 0)], HA.exact(model, cap, tokens, N, 1, [0], "mean")[0])


def test_random_heads_control_is_numpys_mean_and_sample_sd_of_its_draws():
    """Truth: numpy mean and sample sd (ddof 1) of the random draws find_induction_heads keeps (the draws
    themselves are not rebuilt here: only their summary's arithmetic is checked)."""
    k = find_induction_heads(hand_built(), PROTOCOL).top_k_ablation
    draws = np.array(k["random_draws"])
    assert len(draws) == PROTOCOL.random_draws and draws.std() > 0
    assert k["random_heads_loss_increase_mean"] == pytest.approx(draws.mean())
    assert k["random_heads_loss_increase_std"] == pytest.approx(draws.std(ddof=1))
