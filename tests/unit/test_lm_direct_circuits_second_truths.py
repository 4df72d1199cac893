"""Direct logit attribution, the logit lens and the weight circuits (second pass) against outside truths: plain
forwards and hook reads written out in numpy, a hand-built copying head whose full OV circuit is known in closed form,
and diagonals of the positional pattern read with np.diagonal."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mechscope.core.errors import MechscopeError
from mechscope.core.hooks import run_with_cache
from mechscope.lm.methods import weights_circuits as FW
from mechscope.lm.methods.circuits import CircuitsResult, _prefix_matching_rows, _readings
from mechscope.lm.methods.direct import direct_logit_attribution, logit_lens
from mechscope.lm.models.folding import analysis_weights
from mechscope.lm.models.transformer import HookedTransformer
from tests.parity.test_convert_folding_second_truths import _post_norm_model
from tests.unit.test_folding import random_model
from tests.unit.test_framework import blank_one_head, one_layer_skip_trigram_model
from tests.unit.test_lm_composition_truths import hand_result
from tests.unit.test_lm_weights_truths import _centred_direction
from tests.unit.test_sentences_heads import make_result


def _ln_direction(model: HookedTransformer, final: np.ndarray, target: int) -> tuple[np.ndarray, float]:
    """numpy: the unembedding column of ``target`` through ln_final's gain, centred over the vocabulary, and the
    final LayerNorm's divisor on ``final`` [D]."""
    w_u = model.W_U.detach().double().numpy() * model.ln_final.w.detach().double().numpy()[:, None]
    col = w_u[:, target] - w_u.mean(1)
    c = final - final.mean()
    return col, float(np.sqrt((c**2).mean() + model.cfg.norm_eps))


def test_dla_on_a_post_attention_norm_model_adds_up_to_the_plain_forwards_logit():
    """A plain forward (Gemma 2's post-attention norm, biases everywhere): the shares add up to the model's own
    logit of its prediction centred over the vocabulary, and with no attention biases each layer's head shares add
    up to that layer's hook_attn_out (after ln1_post) read onto the centred column over the final RMSNorm's scale."""
    model = _post_norm_model()
    tokens = torch.randint(0, 50, (9,), generator=torch.Generator().manual_seed(7))
    dla = direct_logit_attribution(model, analysis_weights(model), tokens, position=5)
    with torch.no_grad():
        logits = model(tokens[None])[0, 5].double()
    assert dla.target == int(logits.argmax())
    assert dla.total == pytest.approx(float(logits[dla.target] - logits.mean()), abs=1e-4)

    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.o.bias.zero_()
            for lin in (blk.attn.q, blk.attn.k, blk.attn.v):
                lin.bias.zero_()
    dla = direct_logit_attribution(model, analysis_weights(model), tokens, position=5)
    names = ["blocks.2.hook_resid_post"] + [f"blocks.{i}.hook_attn_out" for i in range(3)]
    _, cache = run_with_cache(model, tokens[None], names=names)
    direction = _centred_direction(model, cache[names[0]][0, 5], dla.target)
    want = [float(cache[n][0, 5].double() @ direction) for n in names[1:]]
    assert dla.heads.sum(1).tolist() == pytest.approx(want, abs=1e-4)
    assert min(abs(w) for w in want) > 1e-3


def test_dla_dict_keeps_embed_position_and_heads_apart():
    """numpy on hook reads: embed is hook_embed and pos_embed hook_pos_embed (distinct values), each centred as the
    final LayerNorm does, onto the centred gain-scaled column over the LayerNorm's scale; position −1 is reported as
    P − 1; the heads table is L rows of H (3 × 4) and the default top list has ten components, largest first."""
    model = random_model("layernorm")
    tokens = torch.randint(0, 50, (11,), generator=torch.Generator().manual_seed(8))
    dla = direct_logit_attribution(model, analysis_weights(model), tokens, position=-1)
    d = dla.to_dict()
    names = ["hook_embed", "hook_pos_embed", "blocks.2.hook_resid_post"]
    _, cache = run_with_cache(model, tokens[None], names=names)
    final = cache[names[2]][0, -1].double().numpy()
    col, scale = _ln_direction(model, final, dla.target)
    emb, pos = (cache[n][0, -1].double().numpy() for n in names[:2])
    want_embed, want_pos = ((x - x.mean()) @ col / scale for x in (emb, pos))
    assert abs(want_embed - want_pos) > 1e-3
    assert d["embed"] == pytest.approx(want_embed, abs=1e-4) and d["pos_embed"] == pytest.approx(want_pos, abs=1e-4)
    assert d["position"] == 10 and dla.position == 10
    assert [len(row) for row in d["heads"]] == [4, 4, 4]
    np.testing.assert_allclose(np.array(d["heads"]), dla.heads, atol=1e-5)
    shares = [c["share"] for c in d["top_components"]]
    assert len(shares) == 10 and [abs(s) for s in shares] == sorted((abs(s) for s in shares), reverse=True)


def test_dla_refuses_a_position_outside_the_tokens_and_a_target_outside_the_vocabulary():
    """Python's own indexing of 11 tokens: -11 is the first position and 10 the last; 11 and -12 are outside (the code
    before wrapped 11 to position 0 without a word); the vocabulary has 50 tokens, so target 50 is outside."""
    model = random_model("layernorm")
    view = analysis_weights(model)
    tokens = torch.randint(0, 50, (11,), generator=torch.Generator().manual_seed(8))
    assert direct_logit_attribution(model, view, tokens, position=-11).position == list(range(11))[-11] == 0
    for bad in (11, -12):
        with pytest.raises(MechscopeError, match=rf"position must be an integer from -11 to 10, got {bad}"):
            direct_logit_attribution(model, view, tokens, position=bad)
    with pytest.raises(MechscopeError, match="target must be an integer from 0 to 49, got 50"):
        direct_logit_attribution(model, view, tokens, target=50)


def test_dla_head_cells_are_each_heads_hook_result():
    """Hook reads: an RMSNorm model without biases, each cell heads[l, h] is that head's hook_result at the position
    onto the centred column over the final RMSNorm's scale (written out from the raw weights)."""
    model = random_model("rmsnorm", gated=True)
    tokens = torch.randint(0, 50, (10,), generator=torch.Generator().manual_seed(9))
    dla = direct_logit_attribution(model, analysis_weights(model), tokens, position=3)
    names = ["blocks.2.hook_resid_post"] + [f"blocks.{i}.attn.hook_result" for i in range(3)]
    _, cache = run_with_cache(model, tokens[None], names=names)
    direction = _centred_direction(model, cache[names[0]][0, 3], dla.target)
    want = np.array([(cache[n][0, 3].double() @ direction).numpy() for n in names[1:]])  # [L, H]
    np.testing.assert_allclose(dla.heads, want, atol=1e-5)
    assert len(np.unique(want.round(4))) == want.size  # distinct cells: a transpose or swap shows


def test_logit_lens_dict_rows_are_probabilities_and_log_probabilities():
    """A plain forward in numpy: the lens' last row (after the last block) unembedded by the model is its logits;
    top_prob in the dict is numpy's softmax maximum (a probability, in (0, 1]) and next_token_logprob numpy's
    log-softmax at the actual next token, both rounded to 4 places."""
    model = random_model("layernorm")
    tokens = torch.randint(0, 50, (8,), generator=torch.Generator().manual_seed(10))
    d = logit_lens(model, tokens).to_dict()
    with torch.no_grad():
        logits = model(tokens[None])[0].double().numpy()
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    assert d["top_prob"][-1] == pytest.approx(np.exp(logp.max(-1)).round(4).tolist(), abs=2e-4)
    nxt = [logp[i, t] for i, t in enumerate(tokens[1:].tolist())]
    assert d["next_token_logprob"][-1] == pytest.approx(np.round(nxt, 4).tolist(), abs=2e-4)
    assert d["top"][-1] == [str(t) for t in logits.argmax(-1)]


V_COPY = 12
# distinct: the copying strength of each token
GAINS = [3.0, -2.0, 0.5, 5.0, -4.0, 1.0, 2.5, -0.5, 4.0, 0.25, -1.0, 1.5]


def diagonal_copier() -> HookedTransformer:
    """One head whose full OV circuit is known in closed form: W_E = 2 I (so RMSNorm gives √(4/(4/V + eps))·… of
    e_t), W_V = diag(GAINS), W_O = W_U = I. Attending to t writes GAINS[t] e_t, so the centred circuit's row t is
    k·GAINS[t]·(e_t − 1/V): token t's own logit tops its row if GAINS[t] > 0 and is the lowest if GAINS[t] < 0."""
    m = blank_one_head(V_COPY, 4)
    with torch.no_grad():
        m.W_E.copy_(2 * torch.eye(V_COPY))
        m.blocks[0].attn.W_V[0].copy_(torch.diag(torch.tensor(GAINS)))
        m.blocks[0].attn.W_O[0].copy_(torch.eye(V_COPY))
        m.W_U_untied.copy_(torch.eye(V_COPY))
    return m.eval()


def test_ov_copying_of_a_diagonal_copier_is_the_closed_form():
    """Closed form (diagonal_copier): the diagonal is k·g_t·(1 − 1/V) with k = 2/√(4/V + eps), so the top tokens are
    the largest gains, positive first (not the largest |g|: −4 is not among the top 3); a token's rank is 0 for g > 0
    and V − 1 for g < 0, so top-1 and top-5 are the share of positive gains (8/12) and the median rank over the
    sorted ranks [0]*8 + [11]*4 is 0; the dict keeps top-1 and top-5 apart on a sample where they differ."""
    view = analysis_weights(diagonal_copier())
    eps = view.cfg.norm_eps
    k = 2 / np.sqrt(4 / V_COPY + eps)
    diag = k * np.array(GAINS) * (1 - 1 / V_COPY)
    ov = FW.ov_copying(view, [(0, 0)], k=3, sample=V_COPY)
    assert [t for t, _ in ov.top_tokens[0]] == [3, 8, 0]
    assert [v for _, v in ov.top_tokens[0]] == pytest.approx(diag[[3, 8, 0]].tolist(), rel=1e-6)
    assert ov.top1[0] == pytest.approx(8 / 12) and ov.top5[0] == pytest.approx(8 / 12)
    assert ov.median_rank[0] == 0.0
    assert ov.diagonal_mean[0] == pytest.approx(diag.mean(), rel=1e-6)
    assert ov.to_dict()["heads"][0]["top_tokens"][0] == {"token": 3, "text": "3", "logit": round(diag[3], 4)}


def test_ov_copying_top5_counts_rank_four_but_not_rank_five():
    """By hand: give token 0's row a logit for each of tokens 1…5 above its own (W_O W_U adds them), so token 0's
    own rank is 5 — just out of the top 5; token 6's row gets four above its own (rank 4: in the top 5, not the top 1).
    Over the whole vocabulary (every other rank 0): top-1 10/12 and top-5 11/12, kept apart in the dict."""
    model = diagonal_copier()
    with torch.no_grad():
        model.blocks[0].attn.W_V[0].copy_(torch.eye(V_COPY))
        w_u = torch.eye(V_COPY)
        w_u[0, 1:6] = 2.0  # attending to 0 writes e_0, which raises 1..5 twice as much as 0
        w_u[6, 7:11] = 2.0  # attending to 6 raises 7..10 above 6
        model.W_U_untied.copy_(w_u)
    view = analysis_weights(model)
    ov = FW.ov_copying(view, [(0, 0)], sample=2, seed=0, token_range=(0, 1))
    assert ov.top1[0] == 0.0 and ov.top5[0] == 0.0 and ov.median_rank[0] == 5.0
    ov = FW.ov_copying(view, [(0, 0)], sample=2, seed=0, token_range=(6, 7))
    assert ov.top1[0] == 0.0 and ov.top5[0] == 1.0 and ov.median_rank[0] == 4.0
    d = FW.ov_copying(view, [(0, 0)], sample=V_COPY).to_dict()["heads"][0]
    assert d["own_logit_top1"] == pytest.approx(10 / 12) and d["own_logit_top5"] == pytest.approx(11 / 12)


def test_positional_dict_ranks_heads_by_the_numpy_first_subdiagonal():
    """np.diagonal(offset=−1) of each head's positional pattern, averaged, is the previous-position mass; the dict's
    strongest heads are those masses in descending order, named layer.head (3 layers × 4 heads, so a swapped name
    like 1.0 ↔ 0.1 shows), and offset 0 is the diagonal itself."""
    pos = FW.positional_qk(analysis_weights(random_model("layernorm")), n=12)
    prev = np.array([[np.diagonal(p, offset=-1).mean() for p in layer] for layer in pos.patterns])
    self_mass = np.array([[np.diagonal(p).mean() for p in layer] for layer in pos.patterns])
    np.testing.assert_allclose(pos.previous_token(), prev, atol=1e-6)
    np.testing.assert_allclose(pos.offset_mass[..., 0], self_mass, atol=1e-6)
    rows = pos.to_dict()["strongest_previous_position_heads"]
    assert len(rows) == 10
    for row in rows:
        layer, h = map(int, row["head"].split("."))
        assert row["mass"] == pytest.approx(prev[layer, h], abs=1e-6)
    masses = [row["mass"] for row in rows]
    assert masses == sorted(masses, reverse=True) and masses[0] == pytest.approx(prev.max(), abs=1e-6)


def test_bigram_top_rows_are_current_then_next_token():
    """Hand-built direct path (one_layer_skip_trigram_model: W_U has an extra 2 at [5, 6]): the strongest bigram is
    current 5 → next 6, and every listed (a, b, s) is the table's cell [a, b] in descending order."""
    bi = FW.bigrams(analysis_weights(one_layer_skip_trigram_model()))
    top = bi.top(6)
    assert top[0][:2] == (5, 6)
    assert [s for _, _, s in top] == sorted((s for _, _, s in top), reverse=True)
    for a, b, s in top:
        assert bi.table[a, b] == pytest.approx(s)
    assert bi.to_dict(k=1)["top"] == [{"current": "5", "next": "6", "logit": round(top[0][2], 4)}]


def test_token_tables_are_made_up_to_the_vocabulary_limit(monkeypatch):
    """The limit's own words ("at most MAX_TABLE_VOCAB"): a vocabulary of exactly the limit (12) gets its bigram
    table, and with the limit one lower (11) it is refused."""
    view = analysis_weights(diagonal_copier())
    monkeypatch.setattr(FW, "MAX_TABLE_VOCAB", V_COPY)
    assert FW.bigrams(view).table.shape == (V_COPY, V_COPY)
    assert len(FW.skip_trigrams(view, k=2).triples[0]) == 2
    monkeypatch.setattr(FW, "MAX_TABLE_VOCAB", V_COPY - 1)
    with pytest.raises(MechscopeError, match="at most 11"):
        FW.bigrams(view)


def test_circuits_json_round_trip_keeps_each_part_in_its_place():
    """A JSON round trip (json.dumps / json.loads): after from_dict, OV copying and QK pairs are each the part saved
    under their own key (not swapped), the heads are the same tuples, and the eigenvalue positivity is the numpy
    computation to 5 places (values like 0.123456 that 2 places would change)."""
    view = analysis_weights(diagonal_copier())
    eigen = np.array([[0.123456]])
    r = CircuitsResult("toy", view.describe(), hand_result(), ((0, 0),), eigen_positivity=eigen,
                       ov=FW.ov_copying(view, [(0, 0)], k=2, sample=4),
                       qk=FW.qk_token_pairs(view, [(0, 0)], k=2, sample=4))  # fmt: skip
    d = json.loads(json.dumps(r.to_dict()))
    assert d["ov_eigen_positivity"] == [[0.12346]]
    back = CircuitsResult.from_dict(d)
    assert back.ov.data == d["ov_copying"] and "own_logit_top1" in back.ov.data["heads"][0]
    assert back.qk.data == d["qk_token_pairs"] and "pairs" in back.qk.data["heads"][0]
    assert back.heads == ((0, 0),) and back.eigen_positivity.tolist() == [[0.12346]]


def test_prefix_matching_rows_write_no_nan_eigenvalue():
    """JSON's own rule (json.dumps with allow_nan=False): a head whose eigenvalue positivity could not be read (NaN)
    gets None in its row, and a finite one keeps its value (0.7 on 1.2)."""
    r = make_result()
    s = {k: v.copy() for k, v in r.scores.items()}
    eig = np.full(s["prefix_matching"].shape, 0.7)
    eig[2, 0] = np.nan
    rows = {row["head"]: row for row in _prefix_matching_rows(make_result(scores=s | {"ov_eigen_positivity": eig}))}
    assert rows["2.0"]["ov_eigen_positivity"] is None and rows["1.2"]["ov_eigen_positivity"] == 0.7
    json.dumps(list(rows.values()), allow_nan=False)


def test_positional_qk_of_a_view_with_uncentred_writers_is_still_the_models_attention():
    """The model's own hook_pattern: with the token embedding zero, layer 0 attends by position alone; on a view that
    does not centre what writes to the residual (center_writing=False, so W_pos rows keep their mean), positional_qk
    must still centre them as the LayerNorm does to give the model's pattern."""
    model = random_model("layernorm", attn_only=True, seed=3)
    with torch.no_grad():
        model.W_E.zero_()
        model.W_pos.add_(0.7)  # a mean over d_model that only the LayerNorm's centring removes
        for lin in (model.blocks[0].attn.q, model.blocks[0].attn.k):
            lin.weight.mul_(0.5)
    view = analysis_weights(model, center_writing=False)
    assert abs(float(view.W_pos.mean())) > 0.5
    pos = FW.positional_qk(view, n=12)
    _, cache = run_with_cache(model, torch.zeros(1, 12, dtype=torch.long), names=["blocks.0.attn.hook_pattern"])
    np.testing.assert_allclose(pos.patterns[0], cache["blocks.0.attn.hook_pattern"][0].numpy(), atol=1e-5)


@pytest.mark.parametrize("off", ["center_unembed", "fold_value_biases"])
def test_readings_are_shared_only_from_the_fully_folded_view(off):
    """_readings' docstring: the weight scores are shared with the induction protocol only where the view is the one
    it folds itself (every option on); a view with one option off (its eigenvalues differ) is not shared."""
    model = random_model("layernorm", attn_only=True)
    eigen = np.zeros((3, 4))
    assert _readings(analysis_weights(model), eigen, {}) is not None
    assert _readings(analysis_weights(model, **{off: False}), eigen, {}) is None
