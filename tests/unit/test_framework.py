"""The Mathematical Framework toolkit on models with known answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mechscope.lm.methods import weights_circuits as FW
from mechscope.lm.methods.composition import composition_scores, random_baseline
from mechscope.lm.methods.direct import direct_logit_attribution, logit_lens
from mechscope.lm.models.folding import analysis_weights
from mechscope.lm.models.transformer import HookedTransformer, TransformerConfig
from tests.unit.test_folding import CASES, random_model
from tests.unit.test_heads import CTX, V, hand_built


def test_composition_in_blocks_of_source_layers_is_the_whole_product(monkeypatch):
    """composition_scores multiplies a few source layers at a time (memory): the same numbers, bit for bit, as one
    product over every earlier layer, from one source layer per block to all of them."""
    from mechscope.lm.methods import composition

    view = analysis_weights(random_model("layernorm"))  # 3 layers: targets 1 and 2 see 1 and 2 source layers
    monkeypatch.setattr(composition, "PRODUCT_BYTES", 2**40)
    whole = composition_scores(view)
    monkeypatch.setattr(composition, "PRODUCT_BYTES", 1)
    blocks = composition_scores(view)
    for mode in ("Q", "K", "V"):
        assert torch.equal(blocks[mode], whole[mode]), mode
        assert (whole[mode][0, :, 2] > 0).all() and (whole[mode][1, :, 2] > 0).all()


def test_one_layers_readers_are_its_slice_of_all():
    """composition_scores forms one target layer's readers at a time (memory): the same bits as all layers' at once."""
    from mechscope.lm.methods.composition import readers

    view = analysis_weights(random_model("rmsnorm", kv_heads=2, gated=True))
    every = readers(view)
    for layer in range(view.n_layers):
        one = readers(view, layer)
        assert all(torch.equal(one[m], every[m][layer]) for m in "QKV"), layer


def test_double_product_in_blocks_is_the_whole_product(monkeypatch):
    """double_product converts a few rows and columns to float64 at a time (memory): the same bits as converting
    both factors whole, from one row and column per block to all of them; and so the same eigenvalue scores."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(24, 3000, generator=g), torch.randn(3000, 40, generator=g)
    whole = a.double() @ b.double()
    for size in (1, 8 * 3000 * 5, 2**40):
        monkeypatch.setattr(FW, "OPERAND_BYTES", size)
        assert torch.equal(FW.double_product(a, b), whole), size
    view = analysis_weights(random_model("layernorm"))
    monkeypatch.setattr(FW, "OPERAND_BYTES", 2**40)
    want = FW.ov_eigen_positivity(view)
    monkeypatch.setattr(FW, "OPERAND_BYTES", 8)
    assert np.array_equal(FW.ov_eigen_positivity(view), want)


def test_eigenvalue_positivity_is_that_of_the_whole_vocabulary_circuit():
    """Σλ / Σ|λ| of each head's V×V circuit W_E W_V W_O W_U, decomposed whole with numpy (ov_eigen_positivity
    decomposes the d_head × d_head product in torch), on random heads whose eigenvalues are complex, so the modulus
    matters (the only other check was a pure copier's 1.0)."""
    view = analysis_weights(random_model("layernorm"))
    e, u = view.W_E.double().numpy(), view.W_U.double().numpy()
    got = FW.ov_eigen_positivity(view)
    complex_seen = 0
    for layer in range(view.n_layers):
        for h in range(view.n_heads):
            full = e @ view.W_V[layer][h].double().numpy() @ view.W_O[layer][h].double().numpy() @ u  # [V, V]
            lam = np.linalg.eigvals(full)
            complex_seen += int((np.abs(lam.imag) > 1e-6 * np.abs(lam).max()).sum())
            assert got[layer, h] == pytest.approx(lam.sum().real / np.abs(lam).sum(), abs=1e-8), (layer, h)
    assert complex_seen > 0 and np.abs(got).max() < 0.99  # random heads: neither copiers nor anti-copiers


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_ov_copying_in_blocks_is_the_whole_computation(monkeypatch, norm):
    """ov_copying normalises the embedding, multiplies out W_O W_U and ranks the sampled rows a block at a time
    (memory): the whole float64 computation written out, from one row per block to all of them. The same bits where
    the BLAS sums each entry of a product the same way whatever the product's shape (MKL on the machines of 4-5
    December 2026, whose CPU was not recorded); on an AMD EPYC (6 December) a block's entries differ from the whole
    product's by an ulp or two, so the values are compared to 1e-14 and the tokens and ranks exactly."""
    view = analysis_weights(random_model(norm))
    heads, ids = [(0, 1), (2, 3)], FW.token_sample(50, 20, 0)
    emb, wu = FW.normalised(view.W_E, view), view.W_U.double()
    for size in (8, 8 * 32 * 7, 2**40):
        monkeypatch.setattr(FW, "OPERAND_BYTES", size)
        got = FW.ov_copying(view, heads, k=5, sample=20)
        for i, (layer, h) in enumerate(heads):
            ev, ou = emb @ view.W_V[layer, h].double(), view.W_O[layer, h].double() @ wu
            assert torch.equal(FW._embedded_values(view, view.W_V[layer, h].double()), ev), size
            diag = (ev * ou.T).sum(-1)
            rows = ev[ids] @ ou
            rank = (rows > rows.gather(1, ids[:, None])).sum(1).float()
            assert torch.equal(FW._own_rank(ev[ids], ou, ids), rank), size
            best = torch.topk(diag, 5)
            assert [t for t, _ in got.top_tokens[i]] == best.indices.tolist()
            assert [v for _, v in got.top_tokens[i]] == pytest.approx(best.values.tolist(), rel=1e-14, abs=0)
            assert got.median_rank[i] == float(rank.median())
            assert got.diagonal_mean[i] == pytest.approx(float(diag.mean()), rel=1e-14, abs=1e-16)
            assert got.top1[i] == float((rank == 0).float().mean()) and got.top5[i] == float((rank < 5).float().mean())


def test_logit_lens_in_chunks_of_layers_is_every_layer_at_once(monkeypatch):
    """logit_lens unembeds a few layers' rows at a time (memory): the same bits from one layer per chunk to all."""
    from mechscope.lm.methods import scores

    model = random_model("rmsnorm", gated=True)
    tokens = torch.randint(0, 50, (12,), generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(scores, "LOGITS_CHUNK_BYTES", 2**40)
    whole = logit_lens(model, tokens)
    for size in (1, 12 * 50 * 4 * 2):  # one layer per chunk; two
        monkeypatch.setattr(scores, "LOGITS_CHUNK_BYTES", size)
        got = logit_lens(model, tokens)
        for name in ("top", "top_prob", "next_logprob"):
            assert np.array_equal(getattr(got, name), getattr(whole, name)), (size, name)
    assert whole.top.shape == (4, 12) and whole.next_logprob.shape == (4, 11)


def test_composition_matches_the_definition_written_out():
    """Every pair, every kind, against ‖W_OV¹ W²‖ / (‖W_OV¹‖ ‖W²‖) with the d_model × d_model matrices formed."""
    view = analysis_weights(random_model("rmsnorm", kv_heads=2, gated=True))
    scores = composition_scores(view)
    L, H = view.n_layers, view.n_heads
    for ls in range(L):
        for hs in range(H):
            left = (view.W_V[ls, hs] @ view.W_O[ls, hs]).double()
            for lt in range(L):
                for ht in range(H):
                    qk = (view.W_Q[lt, ht] @ view.W_K[lt, ht].T).double()
                    ov = (view.W_V[lt, ht] @ view.W_O[lt, ht]).double()
                    for mode, right in (("Q", qk), ("K", qk.T), ("V", ov)):
                        want = (left @ right).norm() / (left.norm() * right.norm()) if ls < lt else 0.0
                        assert float(scores[mode][ls, hs, lt, ht]) == pytest.approx(float(want), abs=1e-6)


def test_random_baseline_is_about_one_over_root_d():
    b = random_baseline(256, 16, samples=100)
    assert abs(b.mean - 256**-0.5) < 0.01 and 0 < b.std < 0.01


@pytest.mark.parametrize("d_model, d_head, samples, block", [
    (576, 64, 200, 8), (576, 64, 200, 200), (256, 16, 100, 8), (8, 2, 13, 8), (7, 3, 10, 4),
])  # fmt: skip
def test_random_baseline_drawn_in_blocks_is_the_whole_draw(monkeypatch, d_model, d_head, samples, block):
    """The baseline draws its factors a block of samples at a time (memory): the same numbers, bit for bit, as
    drawing each factor whole and using gram_left / gram_right, with blocks of unequal size (13 = 8 + 5) and where
    blocks cannot reproduce the whole draw (7 × 3 numbers a sample: drawn whole)."""
    from mechscope.lm.methods import composition
    from mechscope.lm.methods.composition import Baseline, gram_left, gram_right

    monkeypatch.setattr(composition, "BASELINE_BLOCK_BYTES", block * d_model * d_head * 8)
    assert composition._spans(samples, d_model * d_head) == (
        [(0, samples)] if d_model * d_head % 2 else [(i, min(i + block, samples)) for i in range(0, samples, block)])

    g = torch.Generator().manual_seed(3)

    def draw():
        return (torch.randn(samples, d_model, d_head, generator=g, dtype=torch.float64),
                torch.randn(samples, d_head, d_model, generator=g, dtype=torch.float64))  # fmt: skip

    left, right = gram_left(*draw()), gram_right(*draw())
    num = (left @ right).pow(2).sum((-1, -2)).sqrt()
    score = (num / (left.pow(2).sum((-1, -2)).sqrt() * right.pow(2).sum((-1, -2)).sqrt())).numpy()
    whole = Baseline(mean=float(score.mean()), std=float(score.std()), samples=samples, seed=3)
    random_baseline.cache_clear()
    assert random_baseline(d_model, d_head, samples, seed=3) == whole


def test_hand_built_circuit_reads_as_tokens():
    """Head 1.0 copies the token it attends to (identity OV); head 0.0 attends to the previous position."""
    view = analysis_weights(hand_built())
    assert FW.ov_eigen_positivity(view)[1, 0] == pytest.approx(1.0, abs=1e-6)
    ov = FW.ov_copying(view, [(1, 0)], sample=50, token_range=(1, V))
    assert ov.top1[0] == 1.0 and ov.median_rank[0] == 0
    pos = FW.positional_qk(view, n=32)
    assert pos.previous_token()[0, 0] > 0.95  # by positions alone
    assert pos.previous_token()[0, 1] < 0.5  # a zero head spreads its attention
    # 1.0's keys read the previous-token slot that head 0.0 writes, not the embedding: its direct QK circuit is
    # empty, and only composition (K-composition of 0.0 into 1.0) shows where its keys come from
    qk = FW.qk_token_pairs(view, [(1, 0)], sample=V, k=5)
    assert max(abs(s) for _, _, s in qk.pairs[0]) < 1e-9
    assert composition_scores(view)["K"][0, 0, 1, 0] > 0.05


def blank_one_head(v: int, n_ctx: int) -> HookedTransformer:
    """One attention-only RMSNorm layer of one head, d_model = d_head = vocabulary ``v``: every weight zero, the
    norm gains one (a hand-built model's starting point: the caller writes the weights its answer needs)."""
    cfg = TransformerConfig(
        d_model=v, n_layers=1, n_heads=1, d_head=v, d_vocab=v, n_ctx=n_ctx, attn_only=True, norm="rmsnorm",
        positional="learned", attn_bias=False, attn_out_bias=False, tie_embeddings=False,
    )
    m = HookedTransformer(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
        for norm in (m.blocks[0].ln1, m.ln_final):
            norm.w.fill_(1.0)
    return m


def one_layer_skip_trigram_model() -> HookedTransformer:
    """One head: token 3 attends to earlier 7s (QK), and attending to a 7 raises token 9 (OV)."""
    v = 16
    m = blank_one_head(v, 8)
    with torch.no_grad():
        m.W_E.copy_(torch.eye(v) * 4)
        a = m.blocks[0].attn
        a.W_Q[0][3, 0] = 5.0  # query of token 3 ...
        a.W_K[0][7, 0] = 5.0  # ... matches the key of token 7
        a.W_V[0][7, 1] = 1.0
        a.W_O[0][1, 9] = 3.0  # attending to a 7 writes token 9's direction
        m.W_U_untied.copy_(torch.eye(v))
        m.W_U_untied[5, 6] = 2.0  # the direct path: 5 -> 6
    return m.eval()


def test_skip_trigrams_and_bigrams_known_answer():
    view = analysis_weights(one_layer_skip_trigram_model())
    tri = FW.skip_trigrams(view, k=1)
    ((a, b, c, s, o),) = tri.triples[0]
    assert (a, b, c) == (3, 7, 9) and s > 0 and o > 0
    assert FW.qk_token_pairs(view, [(0, 0)], sample=16, k=1).pairs[0][0][:2] == (3, 7)
    top = FW.bigrams(view).top(len(view.W_E) * 2)
    assert (5, 6) in [(x, y) for x, y, _ in top[:20]]


def test_big_vocabularies_are_refused_for_token_tables():
    from mechscope.core.errors import MechscopeError

    cfg = TransformerConfig(d_model=8, n_layers=1, n_heads=1, d_head=8, d_vocab=6000, n_ctx=4, attn_only=True)
    with pytest.raises(MechscopeError, match="small vocabulary"):
        FW.bigrams(analysis_weights(HookedTransformer(cfg)))


@pytest.mark.parametrize("case", CASES)
def test_direct_logit_attribution_adds_up(case):
    model = random_model(**CASES[case])
    view = analysis_weights(model)
    tokens = torch.randint(0, 50, (12,), generator=torch.Generator().manual_seed(3))
    for pos in (-1, 4):
        dla = direct_logit_attribution(model, view, tokens, position=pos)
        assert dla.total == pytest.approx(dla.logit, abs=1e-4)
        assert np.abs(dla.heads).max() > 1e-3
    with torch.no_grad():
        logits = model(tokens[None])[0]
    lens = logit_lens(model, tokens)
    assert (lens.top[-1] == logits.argmax(-1).numpy()).all()  # the last layer's lens is the model
    torch.testing.assert_close(
        torch.tensor(lens.next_logprob[-1]),
        torch.log_softmax(logits, -1)[:-1].gather(1, tokens[1:, None])[:, 0],
        rtol=1e-4,
        atol=1e-4,
    )


def test_partial_checkpoints_are_read_where_possible():
    cfg = TransformerConfig(d_model=16, n_layers=2, n_heads=2, d_head=8, d_vocab=20, n_ctx=CTX, d_mlp=32)
    model = HookedTransformer(cfg)
    model.W_E = torch.nn.Parameter(torch.empty(20, 16, device="meta"))
    model.missing_weights = ("W_E",)
    view = analysis_weights(model)
    assert view.W_E is None and view.W_U is None and view.W_pos is not None
    assert composition_scores(view)["K"].shape == (2, 2, 2, 2)
    from mechscope.core.errors import MechscopeError

    with pytest.raises(MechscopeError, match="needs W_E"):
        FW.ov_eigen_positivity(view)


def test_circuits_read_the_weights_once(monkeypatch):
    """read_circuits' induction protocol takes the view, eigenvalues and composition scores it already has (once per
    load), and folds its own only when the view it was given is not the fully folded one."""
    from mechscope.lm.methods import heads as H
    from mechscope.lm.methods.circuits import read_circuits
    from mechscope.lm.models.folding import raw_weights

    model = random_model("layernorm")
    calls = []
    monkeypatch.setattr(H, "analysis_weights", lambda *a, **k: calls.append(1) or analysis_weights(*a, **k))
    result = read_circuits(model, analysis_weights(model, mlp=False), "random")
    assert result.induction is not None and not calls
    assert read_circuits(model, raw_weights(model), "random").induction is not None and calls == [1]


@pytest.mark.parametrize("case", CASES)
def test_weight_readings_are_the_same_on_the_per_layer_view(case):
    """Composition, OV eigenvalues, OV copying, QK pairs and positional attention read the per-layer view (W_Q,
    W_K, W_V folded when read) to the same bits as the stacked one."""
    model = random_model(**CASES[case])
    full, lazy = analysis_weights(model, mlp=False), analysis_weights(model, mlp=False, per_layer=True)
    a, b = composition_scores(full), composition_scores(lazy)
    assert all(torch.equal(a[m], b[m]) for m in "QKV")
    assert np.array_equal(FW.ov_eigen_positivity(full), FW.ov_eigen_positivity(lazy))
    heads = [(2, 1), (0, 3)]
    assert FW.ov_copying(full, heads, sample=20).to_dict() == FW.ov_copying(lazy, heads, sample=20).to_dict()
    assert FW.qk_token_pairs(full, heads, sample=20).to_dict() == FW.qk_token_pairs(lazy, heads, sample=20).to_dict()
    if full.W_pos is not None:
        assert np.array_equal(FW.positional_qk(full, n=8).patterns, FW.positional_qk(lazy, n=8).patterns)
    assert np.array_equal(FW.bigrams(full).table, FW.bigrams(lazy).table)
    assert FW.skip_trigrams(full, 1).to_dict() == FW.skip_trigrams(lazy, 1).to_dict()
