"""The induction-head finder, second pass: scores and labels against outside truths (plain numpy loops over
patterns read by hooks of our own, Olsson et al.'s definitions written out, numbers set by hand). Each test names
its truth; each was written to fail on a mutation of heads.py / scores.py that no earlier test noticed."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mechscope.core.errors import MechscopeError
from mechscope.core.hooks import hooks
from mechscope.lm.methods import ablation as HA
from mechscope.lm.methods import scores as S
from mechscope.lm.methods.heads import HeadProtocol, Thresholds, check_protocol, classify, find_induction_heads
from mechscope.lm.models.folding import analysis_weights
from mechscope.lm.models.transformer import HookedTransformer, TransformerConfig
from tests.unit.test_heads import hand_built, repeated
from tests.unit.test_lm_ablation_scores_truths import patterns, sharp_random
from tests.unit.test_sentences_heads import make_result

VOCAB = 40


def biased(norm: str, seed: int = 7, post_norm: bool = False) -> HookedTransformer:
    """A seeded 2-layer, 3-head attention-only model with every bias and norm gain/bias random (non-trivial value
    biases, final-norm gains and, for LayerNorm, norm biases), queries scaled up for sharp attention."""
    cfg = TransformerConfig(d_model=32, n_layers=2, n_heads=3, d_head=8, d_vocab=VOCAB, n_ctx=64, attn_only=True,
                            norm=norm, tie_embeddings=False, bos_token_id=0, post_attn_mlp_norm=post_norm)  # fmt: skip
    model = HookedTransformer(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    model.init_weights(g, std=0.3)
    with torch.no_grad():
        for b in model.blocks:
            b.attn.W_Q.mul_(8.0)
            b.attn.v.bias.copy_(torch.randn(b.attn.v.bias.shape, generator=g))
        posts = [b.ln1_post for b in model.blocks if b.ln1_post is not None]
        for norm_mod in [b.ln1 for b in model.blocks] + [model.ln_final] + posts:
            norm_mod.w.copy_(0.5 + torch.rand(norm_mod.w.shape, generator=g))
            if getattr(norm_mod, "b", None) is not None:
                norm_mod.b.copy_(torch.randn(norm_mod.b.shape, generator=g))
    return model


def copying_by_numpy(model: HookedTransformer, tokens: torch.Tensor, n: int) -> np.ndarray:
    """Olsson et al.'s copying, as the direct effect of each head on the centred logit of the token it attends to
    most, written as a plain loop in numpy: for each second-copy query q (n+1..2n), the head's output without the
    input-independent part of z (b_V + ln1's bias through W_V), times W_O, over the final norm's divisor at q (RMS of
    the residual, centred first under LayerNorm), read by the gain-scaled unembedding centred over the vocabulary."""
    cfg, L = model.cfg, model.cfg.n_layers
    got = {}

    def keep(name):
        def hook(x, hp):
            got[name] = x.detach().double().numpy()

        return hook

    last = f"blocks.{L - 1}.hook_resid_post"
    names = [f"blocks.{i}.attn.hook_{k}" for i in range(L) for k in ("pattern", "z")] + [last]
    with torch.no_grad(), hooks(model, fwd=[(nm, keep(nm)) for nm in names]):
        model(tokens)
    resid = got[last]
    u = model.ln_final.w.detach().double().numpy()[:, None] * model.W_U.detach().double().numpy()
    u = u - u.mean(1, keepdims=True)
    ln = cfg.norm == "layernorm"
    out = np.zeros((L, cfg.n_heads))
    for layer in range(L):
        attn = model.blocks[layer].attn
        W_V, W_O = attn.W_V.detach().double().numpy(), attn.W_O.detach().double().numpy()
        b_V = attn.v.bias.detach().double().numpy().reshape(cfg.n_heads, cfg.d_head)
        ln_b = model.blocks[layer].ln1.b.detach().double().numpy() if ln else np.zeros(cfg.d_model)
        pat, z = got[f"blocks.{layer}.attn.hook_pattern"], got[f"blocks.{layer}.attn.hook_z"]
        post = model.blocks[layer].ln1_post
        if post is not None:  # Gemma's norm on the attention output: its gain and divisor apply to each head's share
            raw = np.einsum("bphd,hdm->bpm", z, W_O) + attn.b_O.detach().double().numpy()
            div = np.sqrt((raw**2).mean(-1) + post.eps)  # [B, P]
            W_O = W_O * post.w.detach().double().numpy()
        for h in range(cfg.n_heads):
            vals = []
            for b in range(tokens.shape[0]):
                for q in range(n + 1, 2 * n + 1):
                    t = int(tokens[b, int(np.argmax(pat[b, h, q]))])
                    r = (z[b, q, h] - b_V[h] - ln_b @ W_V[h]) @ W_O[h] / (div[b, q] if post is not None else 1.0)
                    x = resid[b, q] - (resid[b, q].mean() if ln else 0.0)
                    r = r - (r.mean() if ln else 0.0)
                    vals.append(r @ u[:, t] / np.sqrt(np.mean(x**2) + cfg.norm_eps))
            out[layer, h] = np.mean(vals)
    return out


@pytest.mark.parametrize("norm,post_norm", [("layernorm", False), ("rmsnorm", False), ("rmsnorm", True)])
def test_copying_is_the_direct_effect_on_the_centred_logit_by_numpy(norm, post_norm):
    """Truth: copying_by_numpy() (a plain loop over hooked patterns, z and the final residual stream) on a model
    whose value biases, norm gains and LayerNorm biases are all random (and one with Gemma's norm after attention);
    the scores vary in sign and size."""
    model = biased(norm, post_norm=post_norm)
    n = 7
    tokens = S.repeated_tokens(model, n, 3, 2, torch.Generator().manual_seed(1), (1, VOCAB))
    got = S.score_pass(model, tokens, n, analysis_weights(model, mlp=False, per_layer=True)).scores["copying"]
    want = copying_by_numpy(model, tokens, n)
    assert np.ptp(want) > 0.1
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


PROTO = HeadProtocol(n=8, batch=3, seed=5, token_range=(1, 6), prefix_n=6, prefix_repeats=3, prefix_batch=2, top_k=1,
                     random_draws=2, per_head_ablation=False)  # fmt: skip


@pytest.fixture(scope="module")
def found():
    """sharp_random() through find_induction_heads with a 5-token range (copies repeat inside every copy), real
    text of 12 seeded tokens, and head 0.3 asked to be shown; the protocol's two token batches regenerated as the
    code draws them from one generator seeded with the protocol's seed (repeated tokens first, prefix tokens next)."""
    model = sharp_random()
    text = torch.randint(1, 100, (2, 12), generator=torch.Generator().manual_seed(9))
    g = torch.Generator().manual_seed(PROTO.seed)
    S.repeated_tokens(model, PROTO.n, PROTO.batch, 2, g, PROTO.token_range)
    ptoks = S.repeated_tokens(model, PROTO.prefix_n, PROTO.prefix_batch, PROTO.prefix_repeats, g, PROTO.token_range)
    return model, text, ptoks, find_induction_heads(model, PROTO, text_tokens=text, show=[(0, 3)])


def test_find_induction_heads_prefix_matching_counts_queries_from_the_second_copy_only(found):
    """Truth (Olsson et al.): prefix matching = attention from query q to the keys k ≤ q whose previous token is q's
    token, averaged over the queries with such a key from the second copy on (q ≥ 1 + n'); a plain loop. With five
    tokens the first copy repeats tokens too, so counting its queries would change the score."""
    model, _, ptoks, r = found
    t = ptoks.numpy()
    for layer, pat in enumerate(patterns(model, ptoks)):
        for head in range(4):
            vals = []
            for s in range(t.shape[0]):
                for q in range(1 + PROTO.prefix_n, t.shape[1]):
                    keys = [k for k in range(1, q + 1) if t[s, k - 1] == t[s, q]]
                    if keys:
                        vals.append(sum(pat[s, head, q, k] for k in keys))
            assert r.scores["prefix_matching"][layer, head] == pytest.approx(np.mean(vals), abs=1e-5), (layer, head)


def test_previous_token_on_text_is_the_mean_attention_to_the_position_before(found):
    """Truth: mean over (sequence, query q ≥ 1) of the text pattern's entry [q, q − 1], a plain loop over patterns
    read by our own hook on the text given."""
    model, text, _, r = found
    for layer, pat in enumerate(patterns(model, text)):
        want = [np.mean([pat[s, h, q, q - 1] for s in range(2) for q in range(1, 12)]) for h in range(4)]
        np.testing.assert_allclose(r.scores["previous_token_text"][layer], want, atol=1e-5)


def test_the_viewer_shows_the_asked_head_then_the_top_three_induction_and_top_two_previous_token_heads(found):
    """Truth: the heads ranked by a plain sort of the result's own scores (highest first): the asked head 0.3, then
    the three best by induction score, then the two best by previous-token score, each once, in that order."""
    _, _, _, r = found

    def top(name, k):
        s = r.scores[name].ravel()
        return [f"{i // 4}.{i % 4}" for i in sorted(range(s.size), key=lambda i: -s[i])[:k]]

    want = list(dict.fromkeys(["0.3", *top("induction", 3), *top("previous_token", 2)]))
    assert r.examples["heads"] == want


def _labels(**cols) -> list[list[str]]:
    """classify() on one layer of heads whose scores are the given columns (zeros elsewhere)."""
    k = len(next(iter(cols.values())))
    s = {name: np.zeros((1, k)) for name in ("induction", "prefix_matching", "previous_token", "duplicate_token",
                                             "copying", "previous_token_text")}  # fmt: skip
    for name, v in cols.items():
        s[name][0] = v
    return classify(s, Thresholds(induction=0.5, previous_token=0.3, duplicate_token=0.7))[0]


def test_each_threshold_is_met_at_its_value_and_the_first_rule_wins():
    """Truth, by hand, with distinct thresholds (induction 0.5, previous token 0.3, duplicate 0.7): prefix matching
    exactly 0.5 with positive copying is induction, with copying exactly 0 is not; previous token exactly 0.3 is a
    previous-token head, 0.29 is not; duplicate exactly 0.7 is a duplicate-token head, 0.69 is not; a head meeting
    the previous-token and duplicate rules is labelled by the first; a high previous-token score on text alone, or a
    high induction score without prefix matching, labels nothing."""
    got = _labels(
        prefix_matching=[0.5, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        copying=[0.2, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.9],
        previous_token=[0.0, 0.0, 0.3, 0.29, 0.0, 0.0, 0.3, 0.0, 0.0],
        duplicate_token=[0.0, 0.0, 0.0, 0.0, 0.7, 0.69, 0.9, 0.0, 0.0],
        previous_token_text=[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.9, 0.0],
        induction=[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.9],
    )
    assert got == ["induction", "none", "previous_token", "none", "duplicate_token", "none", "previous_token",
                   "none", "none"]  # fmt: skip


def test_protocol_defaults_follow_olsson_and_the_context():
    """Truth, by hand: hand_built() has a 64-token context and 2 × 2 heads: prefix_n = min(25, ⌊63 / 4⌋) = 15
    (1 + 4·15 = 61 positions), top_k = min(5, 4 / 2) = 2; a 4 × 4-head model with a 256-token context gets Olsson
    et al.'s 25 and top_k 5; with 3 repeats ⌊63 / 3⌋ = 21 fills the 64 positions exactly."""
    p, _ = check_protocol(hand_built(), HeadProtocol(n=20, batch=4))
    assert (p.prefix_n, p.top_k) == (15, 2)
    p, _ = check_protocol(hand_built(), HeadProtocol(n=20, batch=4, prefix_repeats=3))
    assert p.prefix_n == 21
    cfg = TransformerConfig(d_model=16, n_layers=4, n_heads=4, d_head=4, d_vocab=50, n_ctx=256, attn_only=True)
    p, _ = check_protocol(HookedTransformer(cfg), HeadProtocol(n=20, batch=4, token_range=(1, 50)))
    assert (p.prefix_n, p.top_k) == (25, 5)


def test_a_protocol_that_exactly_fills_the_context_is_allowed():
    """Truth, by hand: 64 positions fit a 64-token context: BOS + 3 × 21 prefix tokens is allowed, 3 × 22 (67) is
    refused; BOS + 2 × 31 = 63 repeated tokens fit, 2 × 32 = 65 do not."""
    model = hand_built()
    check_protocol(model, HeadProtocol(n=20, batch=4, prefix_n=21, prefix_repeats=3))
    check_protocol(model, HeadProtocol(n=31, batch=2, prefix_n=10))
    for bad in (HeadProtocol(n=20, batch=4, prefix_n=22, prefix_repeats=3), HeadProtocol(n=32, batch=2, prefix_n=10)):
        with pytest.raises(MechscopeError, match="context is 64"):
            check_protocol(model, bad)


def test_the_default_token_range_switches_at_a_20000_token_vocabulary():
    """Truth, by hand: a BPE vocabulary of 20,000 tokens or more starts at id 1000 and ends at 10,000; 19,999 tokens
    is a small vocabulary, [1, 19999); a one-token vocabulary is [0, 1)."""

    def rng(v):
        return S.default_token_range(SimpleNamespace(cfg=SimpleNamespace(d_vocab=v)))

    assert rng(20000) == (1000, 10000) and rng(19999) == (1, 19999) and rng(1) == (0, 1)


def test_ranked_lists_every_head_highest_first():
    """Truth: the hand-made result's induction scores (0.85 on 2.0, 0.7 on 1.2, 0.45 on 2.1, zeros elsewhere)
    sorted by hand; the induction-labelled list holds 2.0 then 1.2 (2.1 is labelled none)."""
    r = make_result()
    assert [(d["layer"], d["head"]) for d in r.ranked("induction")[:3]] == [(2, 0), (1, 2), (2, 1)]
    assert [d["score"] for d in r.ranked("induction")[:3]] == pytest.approx([0.85, 0.7, 0.45])
    assert [(d["layer"], d["head"]) for d in r.ranked("induction", "induction")] == [(2, 0), (1, 2)]
    assert r.to_dict()["induction_heads"][0]["head"] == 0 and r.to_dict()["induction_heads"][0]["layer"] == 2


def test_the_random_control_never_draws_a_top_head():
    """Truth: hand_built() has one head (1.0) with a high induction score; with top_k 1 the random control mean-ablates
    one of the three other heads per draw, of which only 0.0 writes anything, so every draw's loss increase is
    either that of 0.0 alone or 0 (never 1.0's, which is the top-k number)."""
    model = hand_built()
    p = HeadProtocol(n=10, batch=3, prefix_n=5, top_k=1, random_draws=16, token_range=(1, 100), per_head_ablation=False)
    k = find_induction_heads(model, p).top_k_ablation
    assert k["heads"] == [{"layer": 1, "head": 0}] and k["induction_heads_loss_increase"] > 1.0
    draws = np.array(k["random_draws"])
    assert len(draws) == 16 and (draws == 0).any() and (draws > 0.1).any()  # 0.0 drawn, and a zero head drawn
    assert np.all(np.abs(draws - k["induction_heads_loss_increase"]) > 0.5)


def test_agreement_reports_spearmans_rank_correlation_beside_pearsons():
    """Truth: scipy.stats' spearmanr and pearsonr of estimates [1, 2, 3] against measurements [1, 10, 2] (ranks
    1, 3, 2: ρ = 1 − 6·2 / (3·8) = 0.5 by hand), which differ."""
    from scipy import stats

    est = np.array([[[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]])
    exact = {(0, 0): np.array([1.0, 1.0]), (0, 1): np.array([10.0, 10.0]), (0, 2): np.array([2.0, 2.0])}
    ag = HA.HeadAblation.measured("mean", est, exact).agreement()
    rho, r = stats.spearmanr([1, 2, 3], [1, 10, 2])[0], stats.pearsonr([1, 2, 3], [1, 10, 2])[0]
    assert rho == pytest.approx(0.5) and abs(r - rho) > 0.1
    assert ag["spearman"] == pytest.approx(rho, abs=1e-6) and ag["pearson"] == pytest.approx(r, abs=1e-6)


def test_ablate_heads_ranks_by_the_mean_over_sequences_and_measures_the_heads_always_asked():
    """Truth, by hand: head 0.1's estimates over 4 sequences are −5, 0, 0, 0 (mean −1.25), head 1.0's 0, 3, 3, 3
    (mean 2.25): with top=1 the larger mean magnitude, 1.0, is measured (the first sequence alone would pick 0.1);
    head 1.1, asked always, is measured too under zero-ablation though its estimate is 0; each measurement equals
    exact() alone."""
    model, tokens = hand_built(), repeated(5)
    cap = HA.capture(model, tokens, 20)
    est = np.zeros((2, 2, 4))
    est[0, 1, 0], est[1, 0, 1:] = -5.0, 3.0
    out = HA.ablate_heads(model, cap, tokens, 20, 1, 0, torch.Generator().manual_seed(0), kinds=("zero",),
                          always=[(1, 1)], estimates={"zero": est})["zero"]  # fmt: skip
    assert sorted(out.exact_mean) == [(1, 0), (1, 1)]
    np.testing.assert_allclose(out.exact[(1, 0)], HA.exact(model, cap, tokens, 20, 1, [0], "zero")[0])
    assert out.best()[1, 0] == pytest.approx(out.exact_mean[(1, 0)]) and out.best()[0, 1] == pytest.approx(-1.25)
