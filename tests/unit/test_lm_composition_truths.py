"""Composition scores, the random baseline, their result, direct logit attribution and ``lm circuits``' helpers
against outside truths: Elhage et al. 2021's composition score written out in numpy, TransformerLens'
``composition_scores`` on the same weights, Cauchy-Schwarz's equality case on hand-built rank-one heads, the
baseline recomputed by a plain loop from the same seed, a plain forward's logits, and numbers set by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mechscope.core.errors import MechscopeError
from mechscope.lm.methods import circuits as C
from mechscope.lm.methods import weights_circuits as FW
from mechscope.lm.methods.composition import (
    Baseline,
    CompositionResult,
    all_composition,
    composition_scores,
    random_baseline,
)
from mechscope.lm.methods.direct import DirectLogitAttribution, direct_logit_attribution
from mechscope.lm.models.folding import analysis_weights, raw_weights
from mechscope.lm.models.transformer import HookedTransformer, TransformerConfig
from tests.unit.test_folding import random_model

D = 8


def heads_model(heads: dict, n_layers: int = 3, n_heads: int = 2, d_head: int = 1, n_ctx: int = 16):
    """An attention-only RMSNorm model with unit gains and no biases (the folded view is the model's own
    weights); ``heads`` maps (layer, head) to {"Q"|"K"|"V": [D, Dh], "O": [Dh, D]} numpy arrays, the rest zero."""
    cfg = TransformerConfig(
        d_model=D, n_layers=n_layers, n_heads=n_heads, d_head=d_head, d_vocab=10, n_ctx=n_ctx, attn_only=True,
        norm="rmsnorm", positional="learned", attn_bias=False, attn_out_bias=False, tie_embeddings=False,
    )  # fmt: skip
    m = HookedTransformer(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
        for b in m.blocks:
            b.ln1.w.fill_(1.0)
        m.ln_final.w.fill_(1.0)
        for (layer, h), mats in heads.items():
            a = m.blocks[layer].attn
            for name, w in mats.items():
                getattr(a, f"W_{name}")[h] = torch.as_tensor(w, dtype=torch.float32)
    return m.eval()


def e(*idx, dim: int = D) -> np.ndarray:
    v = np.zeros(dim)
    v[list(idx)] = 1.0
    return v / np.linalg.norm(v)


def col(v):
    return np.asarray(v, dtype=float)[:, None]


def test_rank_one_heads_compose_by_the_cosine_of_write_and_read_directions():
    """Cauchy-Schwarz's equality case: with d_head 1, W_OV¹ = v₁ o₁ᵀ and W_QK² = q₂ k₂ᵀ, so
    ‖W_OV¹ W_QK²‖ / (‖W_OV¹‖ ‖W_QK²‖) = |cos(o₁, q₂)|; K reads k₂, V reads v₂. Head 0.0 writes e1: 1.0 queries e1
    (Q 1, K 0, V 0), 1.1's keys read e1 (K 1), 2.0's values read (e1 + e2)/√2 (V 1/√2) and its queries what 1.0
    writes (Q 1); the zero head 0.1 scores 0
    (not NaN); nothing scores a source in the same or a later layer."""
    heads = {
        (0, 0): {"V": col(e(0)), "O": col(e(1)).T},
        (1, 0): {"Q": col(e(1)), "K": col(e(2)), "V": col(e(3)), "O": col(e(4)).T},
        (1, 1): {"Q": col(e(5)), "K": col(e(1)), "V": col(e(6)), "O": col(e(7)).T},
        (2, 0): {"Q": col(e(4)), "K": col(e(0)), "V": col(e(1, 2)), "O": col(e(5)).T},
    }
    s = {m: t.numpy() for m, t in composition_scores(analysis_weights(heads_model(heads))).items()}
    assert [s[m][0, 0, 1, 0] for m in "QKV"] == pytest.approx([1.0, 0.0, 0.0], abs=1e-6)
    assert [s[m][0, 0, 1, 1] for m in "QKV"] == pytest.approx([0.0, 1.0, 0.0], abs=1e-6)
    assert [s[m][0, 0, 2, 0] for m in "QKV"] == pytest.approx([0.0, 0.0, 2**-0.5], abs=1e-6)
    assert [s[m][1, 0, 2, 0] for m in "QKV"] == pytest.approx([1.0, 0.0, 0.0], abs=1e-6)  # 1.0 writes e4
    for m in "QKV":
        assert np.isfinite(s[m]).all() and (s[m][0, 1] == 0).all()
        assert (s[m][:, :, 0] == 0).all() and (s[m][1, :, 1] == 0).all() and (s[m][2] == 0).all()


def test_seeded_rank_one_heads_score_the_absolute_cosine():
    """Cauchy-Schwarz's equality case on seeded directions: every earlier → later pair of d_head-1 heads scores
    |cos(o_src, q_tgt)|, |cos(o_src, k_tgt)|, |cos(o_src, v_tgt)| for Q, K, V."""
    g = np.random.default_rng(11)
    vec = {(lay, h): {k: g.standard_normal(D) for k in "QKVO"} for lay in range(3) for h in range(2)}
    heads = {lh: {k: col(v) if k != "O" else col(v).T for k, v in d.items()} for lh, d in vec.items()}
    s = composition_scores(analysis_weights(heads_model(heads)))

    def cos(a, b):
        return abs(a @ b) / (np.linalg.norm(a) * np.linalg.norm(b))

    for (ls, hs), src in vec.items():
        for (lt, ht), tgt in vec.items():
            for m in "QKV":
                want = cos(src["O"], tgt[m]) if ls < lt else 0.0
                assert float(s[m][ls, hs, lt, ht]) == pytest.approx(want, abs=2e-6), (m, ls, hs, lt, ht)


def test_a_head_writing_into_a_two_dimensional_query_subspace_scores_one_over_root_two():
    """Projectors: W_OV¹ = W_QK² = P, the projector onto a plane, so ‖P P‖_F / ‖P‖_F² = √2 / 2 = 1/√2 (Q and,
    P being symmetric, K); 1.0's values read the orthogonal complement: V 0. The plane is a seeded rotation of
    (e0, e1), and 0.0's W_V has rank 1 only (a rank-deficient Gram matrix: its root must stay finite)."""
    q, _ = np.linalg.qr(np.random.default_rng(3).standard_normal((D, D)))
    basis, rest = q[:, :2], q[:, 2:4]
    heads = {
        (0, 0): {"V": basis, "O": basis.T},
        (0, 1): {"V": np.stack([basis[:, 0], 2 * basis[:, 0]], 1), "O": basis.T},  # W_OV rank 1
        (1, 0): {"Q": basis, "K": basis, "V": rest, "O": rest.T},
    }
    s = composition_scores(analysis_weights(heads_model(heads, n_layers=2, d_head=2)))
    assert [float(s[m][0, 0, 1, 0]) for m in "QKV"] == pytest.approx([2**-0.5, 2**-0.5, 0.0], abs=1e-6)
    ov = np.stack([basis[:, 0], 2 * basis[:, 0]], 1) @ basis.T
    qk = basis @ basis.T
    want = np.linalg.norm(ov @ qk) / (np.linalg.norm(ov) * np.linalg.norm(qk))
    assert float(s["Q"][0, 1, 1, 0]) == pytest.approx(want, abs=1e-6) and np.isfinite(s["Q"].numpy()).all()


def numpy_scores(view) -> dict[str, np.ndarray]:
    """Elhage et al. 2021 written out: every d_model × d_model W_OV = W_V W_O and W_QK = W_Q W_Kᵀ formed in
    float64; Q: ‖W_OV¹ W_QK²‖, K: ‖W_OV¹ W_QK²ᵀ‖, V: ‖W_OV¹ W_OV²‖, over the norms' product; 0 unless earlier."""
    wq, wk, wv, wo = (np.asarray(getattr(view, n)[:], dtype=np.float64) for n in ("W_Q", "W_K", "W_V", "W_O"))
    ov, qk = wv @ wo, wq @ wk.transpose(0, 1, 3, 2)  # [L, H, D, D]
    n = np.linalg.norm
    L, H = ov.shape[:2]
    out = {m: np.zeros((L, H, L, H)) for m in "QKV"}
    for ls, hs, lt, ht in np.ndindex(L, H, L, H):
        if ls < lt:
            a = ov[ls, hs]
            for m, b in (("Q", qk[lt, ht]), ("K", qk[lt, ht].T), ("V", ov[lt, ht])):
                out[m][ls, hs, lt, ht] = n(a @ b) / (n(a) * n(b))
    return out


def test_rank_deficient_heads_score_as_the_formula_written_out():
    """Formula written out (numpy_scores) on seeded heads of d_head 3 whose W_V, W_Q and W_K have rank 1: their
    Gram matrices are singular (eigenvalues that round below 0), and every score is still finite and the
    definition's."""
    g = np.random.default_rng(5)

    def rank1():
        return np.outer(g.standard_normal(D), g.standard_normal(3))

    heads = {(lay, h): {"Q": rank1(), "K": rank1(), "V": rank1(), "O": g.standard_normal((3, D))}
             for lay in range(2) for h in range(2)}  # fmt: skip
    view = analysis_weights(heads_model(heads, n_layers=2, d_head=3))
    got, want = composition_scores(view), numpy_scores(view)
    for m in "QKV":
        assert np.isfinite(got[m].numpy()).all(), m
        np.testing.assert_allclose(got[m].numpy(), want[m], atol=2e-6)


def test_a_subset_of_modes_in_any_order_is_those_modes_of_the_whole():
    """Formula written out (numpy_scores) on a seeded LayerNorm model: asking for ("V", "K") gives V and K, each the
    definition's, and nothing else; an unknown kind is refused."""
    view = analysis_weights(random_model("layernorm", seed=4))
    want = numpy_scores(view)
    got = composition_scores(view, ("V", "K"))
    assert set(got) == {"V", "K"}
    for m in ("V", "K"):
        np.testing.assert_allclose(got[m].numpy(), want[m], atol=2e-6)
    with pytest.raises(MechscopeError, match="Q, K, V"):
        composition_scores(view, ("O",))


def test_composition_is_transformer_lens_composition_scores_on_the_same_weights():
    """TransformerLens' composition_scores on FactoredMatrix(W_V, W_O) and FactoredMatrix(W_Q, W_K.T) (K: its
    transpose) of the same seeded grouped-query view, every earlier → later pair."""
    tl = pytest.importorskip("transformer_lens.utilities.matrix")
    from transformer_lens import FactoredMatrix

    view = analysis_weights(random_model("rmsnorm", kv_heads=2, gated=True, seed=6))
    ours = composition_scores(view)
    wq, wk, wv, wo = (getattr(view, n)[:].double() for n in ("W_Q", "W_K", "W_V", "W_O"))
    ov, qk = FactoredMatrix(wv, wo), FactoredMatrix(wq, wk.transpose(-1, -2))
    right = {"Q": qk, "K": qk.T, "V": ov}
    L = wq.shape[0]
    for m in "QKV":
        theirs = tl.composition_scores(ov, right[m])  # [L, H, L, H]
        later = (torch.arange(L)[:, None] < torch.arange(L)[None, :])[:, None, :, None].expand_as(theirs)
        torch.testing.assert_close(ours[m].double()[later], theirs[later], rtol=0, atol=2e-6)
        assert (ours[m][~later] == 0).all()


def baseline_by_loop(d_model: int, d_head: int, samples: int, seed: int) -> tuple[float, float]:
    """The random baseline recomputed plainly: one generator seeded with ``seed`` draws A¹, B¹, A², B² for every
    sample (in that order, float64 Gaussians), then per sample the d_model × d_model products in numpy and
    ‖A¹B¹ A²B²‖ / (‖A¹B¹‖ ‖A²B²‖); mean and population standard deviation over the samples."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(d_model, d_head), (d_head, d_model)] * 2
    a1, b1, a2, b2 = (torch.randn(samples, *s, generator=g, dtype=torch.float64).numpy() for s in shapes)
    n = np.linalg.norm
    scores = []
    for i in range(samples):
        w1, w2 = a1[i] @ b1[i], a2[i] @ b2[i]
        scores.append(n(w1 @ w2) / (n(w1) * n(w2)))
    return float(np.mean(scores)), float(np.std(scores))


@pytest.mark.parametrize("d_model, d_head, samples, seed", [(16, 4, 40, 7), (12, 2, 25, 0)])
def test_random_baseline_is_the_plain_loop_from_the_same_seed(d_model, d_head, samples, seed):
    """A plain loop over seeded samples (baseline_by_loop): the same mean and (population) sd, to float32."""
    b = random_baseline(d_model, d_head, samples, seed)
    mean, std = baseline_by_loop(d_model, d_head, samples, seed)
    assert (b.samples, b.seed) == (samples, seed)
    assert b.mean == pytest.approx(mean, rel=1e-5) and b.std == pytest.approx(std, rel=1e-4)


def test_random_baseline_with_blocks_of_unaligned_size_is_still_the_plain_loop(monkeypatch):
    """The plain loop (baseline_by_loop) where blocks of 3 samples would hold 3 × 4 × 2 = 24 numbers, not a multiple
    of 16: the baseline must still be the whole seeded draw's, whatever block size memory asks for."""
    from mechscope.lm.methods import composition

    monkeypatch.setattr(composition, "BASELINE_BLOCK_BYTES", 3 * 4 * 2 * 8)
    random_baseline.cache_clear()
    b = random_baseline(4, 2, 10, 1)
    random_baseline.cache_clear()
    mean, std = baseline_by_loop(4, 2, 10, 1)
    assert b.mean == pytest.approx(mean, rel=1e-5) and b.std == pytest.approx(std, rel=1e-4)


def test_all_composition_uses_the_models_shapes_seed_and_samples():
    """The plain loop for the model's own d_model 8 and d_head 1 (not d_model / n_heads = 4), the given 30 samples
    and seed 5, and by default 200 samples from seed 0 (random_baseline's default too); the folded flag is the
    view's (a raw view is not folded); top_n is kept."""
    model = heads_model({(0, 0): {"V": col(e(0)), "O": col(e(1)).T}, (1, 1): {"Q": col(e(1)), "K": col(e(2))}})
    r = all_composition(raw_weights(model), baseline_samples=30, seed=5, top_n=4)
    assert (r.baseline.samples, r.baseline.seed) == (30, 5) and r.folded is False and r.top_n == 4
    assert r.baseline.mean == pytest.approx(baseline_by_loop(D, 1, 30, 5)[0], rel=1e-5)
    d = all_composition(analysis_weights(model))
    assert (d.baseline.samples, d.baseline.seed, d.folded) == (200, 0, True)
    assert d.baseline.mean == pytest.approx(baseline_by_loop(D, 1, 200, 0)[0], rel=1e-5)
    assert random_baseline(D, 1) == d.baseline


def hand_result(std: float = 0.01, top_n: int = 20) -> CompositionResult:
    """Three layers of two heads with distinct K scores 0.01 … 0.12 on the 12 earlier → later pairs (and junk on
    pairs that are not earlier → later, which must never be read), baseline mean 0.05."""
    s = np.full((3, 2, 3, 2), 9.0)
    pairs = [(ls, hs, lt, ht) for ls, hs, lt, ht in np.ndindex(3, 2, 3, 2) if ls < lt]
    for i, p in enumerate(pairs):
        s[p] = 0.01 * (i + 1)
    return CompositionResult.of({"K": s}, Baseline(mean=0.05, std=std, samples=10, seed=0), True, top_n)


def test_top_pairs_list_every_earlier_pair_once_strongest_first():
    """By hand: 12 earlier → later pairs, so asking for 20 lists exactly 12, scores 0.12 down to 0.01; the last pair
    in layer order (1.1 → 2.1) is the strongest; z = (0.12 − 0.05) / 0.01 = 7; top_pairs(k) gives k of them, also
    after a round trip through the JSON."""
    r = hand_result()
    rows = r.top["K"]
    assert [row["score"] for row in rows] == pytest.approx([0.01 * i for i in range(12, 0, -1)])
    assert (rows[0]["source"], rows[0]["target"]) == ("1.1", "2.1") and rows[0]["z"] == pytest.approx(7.0)
    assert rows[-1]["above_baseline"] == pytest.approx(-0.04)
    assert len(r.top_pairs("K", 3)) == 3
    back = CompositionResult.from_dict(r.to_dict())
    assert back.top_n == 12 and [row["score"] for row in back.top_pairs("K", 2)] == pytest.approx([0.12, 0.11])


def test_a_baseline_without_spread_has_no_z():
    """By hand: a baseline with sd 0 gives no z (None), not ±inf."""
    assert all(row["z"] is None for row in hand_result(std=0.0).top["K"])


def test_above_baseline_and_into_read_only_earlier_sources():
    """By hand: above_baseline is score − 0.05 on earlier → later pairs and 0 elsewhere (the junk 9.0 never shows);
    into("K", 2, 1) is the [2, 2] scores of layers 0 and 1 into 2.1."""
    r = hand_result()
    a = r.above_baseline("K")
    assert a[1, 1, 2, 1] == pytest.approx(0.07) and a[0, 0, 1, 0] == pytest.approx(-0.04)
    assert (a[:, :, 0] == 0).all() and (a[1, :, 1] == 0).all() and (a[2] == 0).all()
    into = r.into("K", 2, 1)
    assert into.shape == (2, 2) and into.max() == pytest.approx(0.12)


def test_dla_adds_up_to_the_plain_forwards_centred_logit_with_a_large_norm_eps():
    """A plain forward: with the final RMSNorm's eps 0.5 (not negligible), the shares of the default target (the
    forward's argmax at the last position, reported as position P − 1) add up to its centred logit."""
    cfg = TransformerConfig(d_model=16, n_layers=2, n_heads=2, d_head=8, d_vocab=30, n_ctx=12, d_mlp=24,
                            norm="rmsnorm", positional="rotary", norm_eps=0.5)  # fmt: skip
    model = HookedTransformer(cfg)
    model.init_weights(torch.Generator().manual_seed(1), std=0.3)
    model.eval()
    tokens = torch.randint(0, 30, (9,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = model(tokens[None])[0, -1].double()
    dla = direct_logit_attribution(model, analysis_weights(model), tokens)
    assert dla.position == 8 and dla.target == int(logits.argmax())
    want = float(logits[dla.target] - logits.mean())
    assert dla.logit == pytest.approx(want, abs=1e-4) and dla.total == pytest.approx(want, abs=1e-4)


def test_top_components_rank_by_magnitude():
    """By hand: shares −3 (head 0.1), 2 (MLP 0), 0.5 (embed), 0.1 (head 0.0): the two largest in magnitude are −3
    and 2, a negative share ranking first."""
    dla = DirectLogitAttribution([1], 0, 1, np.array([[0.1, -3.0]]), np.array([2.0]), 0.5, 0.0, 0.0, 0.0)
    assert dla.top_components(3) == [("0.1", -3.0), ("MLP 0", 2.0), ("embed", 0.5)]


def test_default_heads_are_k_targets_then_sources_then_the_strongest_copiers():
    """By hand: the six strongest K pairs 0.0→1.0, 0.1→1.1, 0.0→1.2, 0.1→1.0, 0.0→1.1, 0.1→1.2 give, target before
    source and each once, 1.0, 0.0, 1.1, 0.1, 1.2; the highest eigenvalue positivity, 0.9 at 1.3, is the sixth
    head; with k = 7 the next, 0.8 at 0.3, joins."""
    k = np.zeros((2, 4, 2, 4))
    k[0, :, 1] = 0.001 * np.arange(1, 17).reshape(4, 4)  # the weak rest, distinct
    for i, (s, t) in enumerate([(0, 0), (1, 1), (0, 2), (1, 0), (0, 1), (1, 2)]):
        k[0, s, 1, t] = 0.9 - 0.1 * i
    comp = CompositionResult.of({"K": k}, Baseline(0.05, 0.01, 10, 0), True)
    eigen = np.array([[0.1, 0.2, 0.3, 0.8], [0.0, -0.5, 0.4, 0.9]])
    want = [(1, 0), (0, 0), (1, 1), (0, 1), (1, 2), (1, 3)]
    assert C.default_heads(comp, None, eigen) == want
    assert C.default_heads(comp, None, eigen, k=7) == want + [(0, 3)]


def test_the_induction_protocol_fits_the_context():
    """By hand: BOS + n + n tokens must fit n_ctx, so n = min(50, ⌊(n_ctx − 1)/2⌋): 50 at 1024, 6 at 13 (1 + 12 =
    13), 7 at 16; prefix-matching sequences BOS + 4 repeats: prefix_n = max(1, min(25, ⌊(n_ctx − 1)/4⌋)): 25, 3, 3."""
    for n_ctx, n, prefix in ((1024, 50, 25), (13, 6, 3), (16, 7, 3)):
        cfg = TransformerConfig(d_model=8, n_layers=1, n_heads=1, d_head=8, d_vocab=10, n_ctx=n_ctx, attn_only=True)
        p = C.induction_protocol(HookedTransformer(cfg))
        assert (p.n, p.prefix_n, p.per_head_ablation) == (n, prefix, False), n_ctx


def test_token_tables_up_to_the_vocabulary_limit_and_skip_trigrams_for_one_layer(monkeypatch):
    """By hand: a vocabulary of exactly MAX_TABLE_VOCAB still gets tables, one more does not; skip-trigrams only
    for a one-layer model (a two-layer one records why)."""
    monkeypatch.setattr(FW, "MAX_TABLE_VOCAB", 10)
    one = analysis_weights(heads_model({}, n_layers=1))
    gaps: dict = {}
    assert set(C._tables(one, gaps)) == {"bigrams", "skip_trigrams"} and gaps == {}
    two = analysis_weights(heads_model({}, n_layers=2))
    assert set(C._tables(two, gaps)) == {"bigrams"} and "one-layer" in gaps["skip_trigrams"]
    monkeypatch.setattr(FW, "MAX_TABLE_VOCAB", 9)
    gaps = {}
    assert C._tables(one, gaps) == {} and "small" in gaps["bigrams"]


def test_a_one_layer_model_has_no_induction_circuit():
    """By hand: one layer has no earlier head to compose with; the gap says so and nothing is run."""
    gaps: dict = {}
    model = heads_model({}, n_layers=1)
    assert C._induction(model, None, C.Timer("t"), gaps) is None
    assert gaps == {"induction_circuit": "a one-layer model has no earlier head to compose with"}
