"""Weight circuits, QK attribution, path patching and discovery's edge comparison against outside truths: the
model's own attention scores read by a hook, the full OV circuit written out in numpy from the raw (unfolded)
weights, a Wang et al. path patch run as two plain forwards, and ranks counted by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mechscope.core.hooks import run_with_cache
from mechscope.lm.methods import weights_circuits as FW
from mechscope.lm.models.folding import analysis_weights
from tests.unit.test_folding import random_model


def _positionless(layers_attn_only=True):
    """random_model's LayerNorm family (every bias and gain random), attention only, no position embedding: layer 0
    sees each token by its embedding alone."""
    model = random_model("layernorm", attn_only=layers_attn_only)
    with torch.no_grad():
        model.W_pos.zero_()
    return model


def _layer0_score(model, key_tok: int, query_tok: int, head: int) -> float:
    """The model's own pre-softmax attention score of layer 0 from the query token to the key token: input
    [key, query], hook_attn_scores at (query pos 1, key pos 0)."""
    _, cache = run_with_cache(model, torch.tensor([[key_tok, query_tok]]), names=["blocks.0.attn.hook_attn_scores"])
    return float(cache["blocks.0.attn.hook_attn_scores"][0, head, 1, 0])


def _full_ov_by_hand(model, layer: int, head: int) -> np.ndarray:
    """[V, V] the full OV circuit written out in numpy from the raw weights: each embedding row through the layer's
    LayerNorm (centred, over √(var + eps), times its gain; the norm's offset and b_V go to the bias, not the
    circuit), W_V W_O of the head, centred over d_model as the final LayerNorm does, times its gain, through W_U,
    and centred over the vocabulary."""
    e = model.W_E.detach().double().numpy()
    eps = model.cfg.norm_eps
    n = (e - e.mean(1, keepdims=True)) / np.sqrt(e.var(1, keepdims=True) + eps)
    n = n * model.blocks[layer].ln1.w.detach().double().numpy()
    a = model.blocks[layer].attn
    out = n @ a.W_V[head].detach().double().numpy() @ a.W_O[head].detach().double().numpy()  # [V, D]
    out = (out - out.mean(1, keepdims=True)) * model.ln_final.w.detach().double().numpy()
    logits = out @ model.W_U.detach().double().numpy()
    return logits - logits.mean(1, keepdims=True)


def test_qk_token_pairs_scores_are_the_models_own_attention_scores():
    """Truth: the model's hook_attn_scores. With no position embedding, layer 0's score from query token q to key
    token k on the input [k, q] is the full QK circuit's entry (q, k), biases b_Q, b_K and the LayerNorm's gain and
    offset included, scaled by 1/√d_head; every reported pair's score is that, and the pairs are the largest."""
    model = _positionless()
    view = analysis_weights(model)
    V = model.cfg.d_vocab
    got = FW.qk_token_pairs(view, [(0, 1), (0, 3)], k=5, sample=V)
    assert got.sample == V
    for (_, h), pairs in zip(got.heads, got.pairs, strict=True):
        for q, k, s in pairs:
            assert s == pytest.approx(_layer0_score(model, k, q, h), abs=1e-4), (h, q, k)
        # the largest of every pair: no pair of a few drawn scores beats the fifth
        g = torch.Generator().manual_seed(h)
        for q, k in torch.randint(0, V, (20, 2), generator=g).tolist():
            assert _layer0_score(model, k, q, h) <= pairs[-1][2] + 1e-4


def test_skip_trigram_scores_are_the_models_attention_and_the_written_out_ov_circuit():
    """Truths: each skip-trigram's QK score is layer 0's hook_attn_scores on [B, A] (no position embedding), and
    its C and OV logit are the argmax and value of row B of the full OV circuit written out in numpy from the raw
    weights (embeddings of different norms: the normalisation shows)."""
    model = _positionless()
    view = analysis_weights(model)
    tri = FW.skip_trigrams(view, layer=0, k=3)
    for (_, h), rows in zip(tri.heads, tri.triples, strict=True):
        ov = _full_ov_by_hand(model, 0, h)
        for a, b, c, s, o in rows:
            assert s == pytest.approx(_layer0_score(model, b, a, h), abs=1e-4), (h, a, b)
            assert c == int(ov[b].argmax()) and o == pytest.approx(ov[b, c], abs=1e-6), (h, b)


def test_ov_copying_reads_the_token_range_against_the_numpy_circuit():
    """Truth: the full OV circuit written out in numpy from the raw weights. Its diagonal's top tokens and mean
    are ov_copying's; with a sample as large as the token range every token of the range (and no other) is
    ranked: top-1, top-5 shares and the (lower) median of how many logits beat the token's own in its row."""
    model = _positionless()
    view = analysis_weights(model)
    lo, hi = 10, 30
    got = FW.ov_copying(view, [(0, 1), (0, 2)], k=4, sample=1000, token_range=(lo, hi))
    assert got.sample == hi - lo
    for i, (_, h) in enumerate(got.heads):
        ov = _full_ov_by_hand(model, 0, h)
        diag = np.diag(ov)
        top = np.argsort(-diag)[:4]
        assert [t for t, _ in got.top_tokens[i]] == top.tolist()
        assert [v for _, v in got.top_tokens[i]] == pytest.approx(diag[top].tolist(), abs=1e-6)
        assert got.diagonal_mean[i] == pytest.approx(diag.mean(), abs=1e-6)
        rank = np.array([(ov[t] > ov[t, t]).sum() for t in range(lo, hi)])
        assert got.top1[i] == pytest.approx((rank == 0).mean())
        assert got.top5[i] == pytest.approx((rank < 5).mean())
        assert got.median_rank[i] == np.sort(rank)[(len(rank) - 1) // 2]


def test_positional_offset_mass_is_the_mean_of_each_diagonal_of_the_pattern():
    """Truth, numpy by hand: offset_mass[..., o] is the mean over query positions i ≥ o of the positional pattern
    at (i, i − o) — every position that has a key o back, the first included."""
    model = random_model("layernorm", attn_only=True)
    pos = FW.positional_qk(analysis_weights(model), n=12, max_offset=3)
    for o in range(4):
        want = np.mean([pos.patterns[..., i, i - o] for i in range(o, 12)], axis=0)
        np.testing.assert_allclose(pos.offset_mass[..., o], want, atol=1e-6)
    np.testing.assert_allclose(pos.previous_token(), pos.offset_mass[..., 1])


def test_qk_attribution_parts_are_the_models_scores_and_add_up():
    """Truths: the model's own hook_attn_scores and hook_pattern on the prompt (the replacement reproduces it), and
    the decomposition written out: every query source's part plus the query bias term is the score; every source
    pair plus both bias terms is the score; every writer pair plus the writers' bias terms is the score; every
    query writer plus the writers' query bias is the score; the top keys are the pattern's largest, largest first."""
    from mechscope.lm.methods.attribution_graph_qk import qk_attribution
    from mechscope.lm.methods.replacement import LocalReplacement
    from tests.unit.test_attribution_graph_lm import TOKENS, random_transcoders, tiny

    for family in ("gpt2", "llama"):
        model = tiny(family)
        rep = LocalReplacement(model, random_transcoders(model), TOKENS, batch_size=8)
        q = qk_attribution(rep, 1, 1, 7, n=100_000)
        names = ["blocks.1.attn.hook_attn_scores", "blocks.1.attn.hook_pattern"]
        _, cache = run_with_cache(model, TOKENS[None], names=names)
        scores, pattern = cache[names[0]][0, 1, 7], cache[names[1]][0, 1, 7]
        tol = 1e-4 * max(1.0, abs(q.score))
        assert q.score == pytest.approx(float(scores[q.key_pos]), abs=tol), family
        assert [k["pos"] for k in q.top_keys] == pattern.argsort(descending=True)[:5].tolist(), family
        b = q.bias
        assert sum(s["score"] for s in q.query_sources) + b["query_bias_x_key"] == pytest.approx(q.score, abs=tol)
        pairs = sum(p["score"] for p in q.pairs)
        assert pairs + b["query_bias_x_key"] + b["query_x_key_bias"] == pytest.approx(q.score, abs=tol), family
        wpairs = sum(p["score"] for p in q.writer_pairs)
        assert wpairs + b["writers_query_bias"] + b["writers_key_bias"] == pytest.approx(q.score, abs=tol), family
        wq = sum(s["score"] for s in q.query_writers)
        assert wq + b["writers_query_bias"] == pytest.approx(q.score, abs=tol), family


def test_qk_attribution_writers_are_the_frozen_layernorm_written_out():
    """Truth, by hand from the model's hooks: in the local replacement model the LayerNorm's scale is frozen, so a
    writer v at the query position moves the query by W_Qᵀ(γ ⊙ (v − mean v) / σ), σ = √(var + eps) of the residual
    there; its part of the score is that times the prompt's key (hook_k) times 1/√d_head; likewise on the key
    side with the prompt's query. Checked for the token and position embeddings and each layer-0 head."""
    from mechscope.lm.methods.attribution_graph_qk import qk_attribution
    from mechscope.lm.methods.replacement import LocalReplacement
    from tests.unit.test_attribution_graph_lm import TOKENS, random_transcoders, tiny

    model = tiny("gpt2")
    rep = LocalReplacement(model, random_transcoders(model), TOKENS, batch_size=8)
    q = qk_attribution(rep, 1, 1, 7, n=100_000)
    names = ["hook_embed", "hook_pos_embed", "blocks.0.attn.hook_result", "blocks.1.hook_resid_pre",
             "blocks.1.attn.hook_q", "blocks.1.attn.hook_k"]  # fmt: skip
    _, c = run_with_cache(model, TOKENS[None], names=names)
    attn, ln = model.blocks[1].attn, model.blocks[1].ln1
    scale = model.cfg.d_head**-0.5
    checked = 0
    for side, writers, pos, w, other in (
        ("q", q.query_writers, q.query_pos, attn.W_Q[1], c["blocks.1.attn.hook_k"][0, q.key_pos, 1]),
        ("k", q.key_writers, q.key_pos, attn.W_K[1], c["blocks.1.attn.hook_q"][0, q.query_pos, 1]),
    ):
        resid = c["blocks.1.hook_resid_pre"][0, pos].double()
        sigma = (resid.var(unbiased=False) + model.cfg.norm_eps).sqrt()
        vecs = {f"head 0.{h}": c["blocks.0.attn.hook_result"][0, pos, h] for h in range(2)}
        vecs["position embedding @" + str(pos)] = c["hook_pos_embed"][0, pos]
        for row in writers:
            label = row["label"]
            v = c["hook_embed"][0, pos] if label.startswith("token embedding") else vecs.get(label)
            if v is None:
                continue
            v = v.double()
            moved = ((v - v.mean()) / sigma * ln.w.detach().double()) @ w.detach().double()
            assert row["score"] == pytest.approx(float(scale * moved @ other.double()), abs=1e-4), (side, label)
            checked += 1
    assert checked == 8  # token, position, two heads on each side


def _two_forward_path_patch(model, tokens, n, source, layer, kv_head):
    """Wang et al. 2022's path patch written as two plain forwards of an attention-only model: (1) the source head's
    z replaced by each position's batch mean, the target layer's keys read (in an attention-only model whose source
    sits in the layer below, the only path from the source into those keys is the direct one); (2) a clean forward
    with those keys in place for the target key/value head only. Returns the per-sequence induction score [Hq, B]
    (attention on the token after the earlier copy, averaged over the second copy's queries) and the second-half
    loss [B], patched, and the same clean."""
    from mechscope.core.hooks import hooks
    from tests.unit.test_heads import second_half_loss_by_hand

    ls, hs = source
    got = {}

    def ablate(z, hp):
        z = z.clone()
        z[:, :, hs] = z[:, :, hs].mean(0, keepdim=True)
        return z

    def keep(name):
        def fn(x, hp):
            got[name] = x.detach().clone()

        return fn

    kname, pname = f"blocks.{layer}.attn.hook_k", f"blocks.{layer}.attn.hook_pattern"
    with torch.no_grad(), hooks(model, fwd=[(f"blocks.{ls}.attn.hook_z", ablate), (kname, keep("k"))]):
        model(tokens)
    ablated_k = got["k"]

    def put(k, hp):
        k = k.clone()
        k[:, :, kv_head] = ablated_k[:, :, kv_head]
        return k

    groups = model.cfg.n_heads // model.cfg.kv_heads
    heads = list(range(kv_head * groups, (kv_head + 1) * groups))
    q = torch.arange(n + 1, 2 * n + 1)

    def induction(pattern):  # [B, H, P, K]
        return pattern[:, heads][:, :, q, q - n + 1].double().mean(-1).T.numpy()  # [Hq, B]

    out = []
    for fwd in ([(pname, keep("p"))], [(pname, keep("p")), (kname, put)]):
        with torch.no_grad(), hooks(model, fwd=fwd):
            logits = model(tokens)
        out.append((induction(got["p"]), second_half_loss_by_hand(logits, tokens, n).numpy()))
    return out[1][0], out[1][1], out[0][0], out[0][1]


@pytest.mark.parametrize("norm,kv", [("layernorm", None), ("rmsnorm", 2)])
def test_key_path_patches_are_two_plain_forwards(norm, kv):
    """Truth: the path patch of Wang et al. written as two plain forwards with hooks (_two_forward_path_patch) on a
    random attention-only model (LayerNorm with biases; RMSNorm with rotary and two query heads per key/value head):
    induction scores clean and patched per query head, the drop's sample sd over sequences, and the loss change of
    each source, every source confirmed by a criterion that accepts any drop."""
    from mechscope.core.stats import sample_sd
    from mechscope.lm.methods.ablation import capture
    from mechscope.lm.methods.path_patching import Criterion, induction_edges
    from mechscope.lm.methods.scores import induction_mask

    model = random_model(norm, kv_heads=kv, attn_only=True, seed=3)
    n, b = 7, 5
    seq = torch.randint(1, model.cfg.d_vocab, (b, n), generator=torch.Generator().manual_seed(0))
    tokens = torch.cat([torch.zeros(b, 1, dtype=torch.long), seq, seq], 1)
    cap = capture(model, tokens, n)
    sources = [(0, 0), (0, 2), (0, 3)]
    loose = Criterion(min_drop=-1e9, min_share=-1e9)  # clean scores are positive: any drop
    for g in range(model.cfg.kv_heads):
        pps = induction_edges(model, cap, tokens, n, {(1, g): sources}, induction_mask(tokens.shape[1], n), loose)
        for pp, src in zip(pps, sources, strict=True):
            patched, loss, clean, clean_loss = _two_forward_path_patch(model, tokens, n, src, 1, g)
            assert pp.induction_clean == pytest.approx(clean.mean(-1).tolist(), abs=1e-5)
            assert pp.induction_patched == pytest.approx(patched.mean(-1).tolist(), abs=1e-5), (g, src)
            assert pp.drop_std == pytest.approx(sample_sd(clean - patched).tolist(), abs=1e-5)
            assert np.abs(clean - patched).max() > 1e-4  # the patch moves something
            assert all(pp.confirmed)
            assert pp.loss_increase == pytest.approx(float((loss - clean_loss).mean()), abs=1e-4), (g, src)


def test_margins_are_the_gap_to_the_threshold_in_standard_errors():
    """Truth, by hand: clean 0.5, drop 0.3 with sd 0.2 over 16 sequences: threshold max(0.05, 0.2 × 0.5) = 0.1,
    gap 0.2, standard error 0.2 / 4 = 0.05, margin 4; clean 0.1: threshold max(0.05, 0.02) = 0.05, margin 5."""
    from mechscope.lm.methods.path_patching import Criterion, PathPatch

    pp = PathPatch((0, 0), 1, 0, (0, 1), (0.5, 0.1), (0.2, -0.2), (0.3, 0.3), (0.2, 0.2), (True, True))
    assert Criterion().margins(pp, 16) == pytest.approx((4.0, 5.0))


def test_compare_edges_ranks_and_auroc_counted_by_hand():
    """Truths: ranks counted by hand (1 + how many edges have a larger |score|, over every edge and over the edges
    into the hand edges' slots) and sklearn's roc_auc_score of |score| against the hand labels. The planted hand
    edges have large negative scores (the ranking is by magnitude), and one sits exactly at rank ``top``."""
    from sklearn.metrics import roc_auc_score

    from mechscope.core.graphs import EdgeScores
    from mechscope.lm.methods.discovery import compare_edges
    from mechscope.lm.methods.graph import TransformerEdges
    from tests.unit.test_discovery_lm import tiny

    g = TransformerEdges(tiny("gpt2", layers=2)).graph
    slot = np.array([g.edges[e][2] for e in range(g.n_edges)])
    k_edges, q_edges = np.flatnonzero(slot == "k"), np.flatnonzero(slot == "q")
    hand_ids = [int(k_edges[3]), int(k_edges[7]), int(q_edges[2])]
    s = np.random.default_rng(0).normal(size=g.n_edges)
    s[hand_ids[0]], s[hand_ids[1]] = -50.0, -40.0  # first and second by magnitude, both negative
    top = 6
    s[hand_ids[2]] = -(np.sort(np.abs(np.delete(s, hand_ids)))[::-1][top - 3] + 1e-3)  # rank exactly `top`
    scores = EdgeScores("planted", g, s)
    c = compare_edges(scores, [g.edges[e] for e in hand_ids], top)

    mag = np.abs(s)
    labels = np.isin(np.arange(g.n_edges), hand_ids)
    same = np.isin(slot, ["k", "q"])
    ranks = [int((mag > mag[e]).sum()) + 1 for e in hand_ids]
    assert ranks == [1, 2, top]
    assert [row["rank"] for row in c["edges"]] == ranks
    assert [row["rank_in_slot"] for row in c["edges"]] == [int((mag[same] > mag[e]).sum()) + 1 for e in hand_ids]
    assert [row["score"] for row in c["edges"]] == [s[e] for e in hand_ids]
    assert c["slots"] == ["k", "q"] and c["n_slot_edges"] == int(same.sum()) and c["n_edges"] == g.n_edges
    assert c["auroc"] == pytest.approx(roc_auc_score(labels, mag))
    assert c["auroc_in_slot"] == pytest.approx(roc_auc_score(labels[same], mag[same]))
    assert c["auroc_in_slot"] != pytest.approx(c["auroc"])  # the two populations differ here
    assert c["in_top"] == 3 and c["top"] == top


def test_qk_attribution_embedding_sources_of_layer_0_and_the_default_key():
    """Truths from the model's hooks. In layer 0 a side's only source is the embedding node at its position (token
    plus position embedding); its part of the score, the other side whole, is the frozen LayerNorm written out (as
    for the writers) times the prompt's other vector (hook_q / hook_k) times 1/√d_head — the query's and key's bias
    parts (b_Q, b_K, the norm's offset) kept whole on the other side. And the default key of a head whose
    attention's largest share is on position 0 is the largest among the later positions of hook_pattern."""
    from mechscope.lm.methods.attribution_graph_qk import qk_attribution
    from mechscope.lm.methods.replacement import LocalReplacement
    from tests.unit.test_attribution_graph_lm import TOKENS, random_transcoders, tiny

    model = tiny("gpt2")
    rep = LocalReplacement(model, random_transcoders(model), TOKENS, batch_size=8)
    names = ["hook_embed", "hook_pos_embed", "blocks.0.hook_resid_pre", "blocks.0.attn.hook_q",
             "blocks.0.attn.hook_k", "blocks.1.attn.hook_pattern"]  # fmt: skip
    _, c = run_with_cache(model, TOKENS[None], names=names)
    attn, ln = model.blocks[0].attn, model.blocks[0].ln1
    scale = model.cfg.d_head**-0.5

    def part(pos, w, other):
        resid = c["blocks.0.hook_resid_pre"][0, pos].double()
        v = (c["hook_embed"][0, pos] + c["hook_pos_embed"][0, pos]).double()
        moved = ((v - v.mean()) / (resid.var(unbiased=False) + model.cfg.norm_eps).sqrt() * ln.w.double()) @ w
        return float(scale * moved @ other.double())

    with torch.no_grad():
        q = qk_attribution(rep, 0, 1, 7, n=100_000)
        kp = q.key_pos
        want_k = part(kp, attn.W_K[1].double(), c["blocks.0.attn.hook_q"][0, 7, 1])
        want_q = part(7, attn.W_Q[1].double(), c["blocks.0.attn.hook_k"][0, kp, 1])
    ksrc = {s["id"]: s["score"] for s in q.key_sources}
    qsrc = {s["id"]: s["score"] for s in q.query_sources}
    assert ksrc[f"E_{int(TOKENS[kp])}_{kp}"] == pytest.approx(want_k, abs=1e-4)
    assert qsrc[f"E_{int(TOKENS[7])}_7"] == pytest.approx(want_q, abs=1e-4)

    pattern = c["blocks.1.attn.hook_pattern"][0, 0, 7]
    assert int(pattern.argmax()) == 0  # head 1.0 at the last position sinks on position 0
    assert qk_attribution(rep, 1, 0, 7, n=3).key_pos == int(pattern[1:].argmax()) + 1


def test_tracr_discovery_draws_as_many_edges_as_the_compiled_circuits_primary_set():
    """Truth: tracr's compiled circuit.json (read here as plain JSON): with no size given, the drawn circuit of a
    tracr model has as many edges as its primary edge set, and those are the known edges reported."""
    import json

    from mechscope.lm.methods.discovery import discover
    from mechscope.lm.methods.tasks import make_task
    from mechscope.lm.models.convert.tracr import check_circuit
    from mechscope.lm.models.loading import load_model
    from tests.unit.test_attribution_graph_lm import TRACR

    if not (TRACR / "hist" / "circuit.json").is_file():
        pytest.skip(f"tracr's hist not found under {TRACR}")
    model = load_model(str(TRACR / "hist"))[0]
    primary = json.loads((TRACR / "hist" / "circuit.json").read_text())["edge_sets"]["primary"]
    res = discover(model, make_task(model), "eap", known=check_circuit(model.tracr.directory, model.cfg),
                   curve=False, n_random=0)  # fmt: skip
    assert len(primary) < res.scores.graph.n_edges
    assert len(res.circuit) == len(primary) == len(res.known_edges)


@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm", "none"])
def test_bigrams_follow_the_models_own_norm_and_eps(norm):
    """Truth: the model's own logits on each token alone (attention writing nothing, no position embedding), centred
    — for a model whose norm_eps (1e-2) is not the 1e-5 normalised() once assumed, on small embeddings, and for a
    model without norms (its rows are not normalised at all)."""
    from mechscope.lm.models.transformer import HookedTransformer, TransformerConfig

    cfg = TransformerConfig(
        d_model=16, n_layers=1, n_heads=2, d_head=8, d_vocab=20, n_ctx=4, attn_only=True, norm=norm,
        positional="learned", tie_embeddings=False, norm_eps=1e-2,
    )  # fmt: skip
    model = HookedTransformer(cfg)
    model.init_weights(torch.Generator().manual_seed(5), std=0.1)
    with torch.no_grad():
        model.blocks[0].attn.o.weight.zero_()
        model.W_pos.zero_()
        logits = model(torch.arange(20)[:, None])[:, 0].double()
    want = logits - logits.mean(-1, keepdim=True)
    np.testing.assert_allclose(FW.bigrams(analysis_weights(model.eval())).table, want.numpy(), atol=1e-5)
