"""Induction-head finding on constructed models: heads set by hand are found; none where there are none."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mechscope.core.hooks import attached_hooks
from mechscope.lm.methods.heads import HeadProtocol, find_induction_heads
from mechscope.lm.methods.scores import induction_mask, masked_score, prefix_mask
from mechscope.lm.models.transformer import HookedTransformer, TransformerConfig

V, CTX = 100, 64


def hand_built(scale: float = 40.0) -> HookedTransformer:
    """A 2-layer attention-only model: head 0.0 attends to the previous token and writes it into a
    "previous token" subspace; head 1.0 attends where that subspace matches its own token, and
    copies the token there into the logits. Heads 0.1 and 1.1 are zero.

    Residual stream: [token one-hot (V) | position one-hot (CTX) | previous-token one-hot (V)].
    """
    d, dh = 2 * V + CTX, V
    cfg = TransformerConfig(
        d_model=d,
        n_layers=2,
        n_heads=2,
        d_head=dh,
        d_vocab=V,
        n_ctx=CTX,
        attn_only=True,
        norm="rmsnorm",
        positional="learned",
        attn_bias=False,
        attn_out_bias=False,
        tie_embeddings=False,
        bos_token_id=0,
    )
    m = HookedTransformer(cfg)
    tok, pos, prev = slice(0, V), slice(V, V + CTX), slice(V + CTX, 2 * V + CTX)
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
        for p in (m.blocks[0].ln1.w, m.blocks[1].ln1.w, m.ln_final.w):
            p.fill_(1.0)
        m.W_E[:, tok] = torch.eye(V)
        m.W_pos[:, pos] = torch.eye(CTX)
        a0, a1 = m.blocks[0].attn, m.blocks[1].attn
        # layer 0, head 0: query reads position i, key reads position j, match when j = i - 1
        a0.W_Q[0][pos, : CTX - 1] = scale * torch.eye(CTX)[:, 1:]  # q_i = e_i (dims 0..CTX-2 hold i-1)
        a0.W_K[0][pos, : CTX - 1] = torch.eye(CTX)[:, : CTX - 1]  # k_j = e_j
        a0.W_V[0][tok, :] = torch.eye(V)
        a0.W_O[0][:, prev] = torch.eye(V)  # writes the attended (previous) token into `prev`
        # layer 1, head 0: query reads the current token, key reads the previous-token subspace
        a1.W_Q[0][tok, :] = scale * torch.eye(V)
        a1.W_K[0][prev, :] = torch.eye(V)
        a1.W_V[0][tok, :] = torch.eye(V)
        a1.W_O[0][:, tok] = 5 * torch.eye(V)  # copies the attended token, strongly, into the logits
        m.W_U_untied[tok, :] = torch.eye(V)
    return m.eval()


PROTOCOL = HeadProtocol(
    n=20, batch=4, prefix_n=10, prefix_repeats=4, prefix_batch=2, top_k=1, random_draws=3, token_range=(1, V)
)


def test_masks():
    target, queries = induction_mask(7, 3)  # BOS a b c a b c
    assert target.nonzero().tolist() == [[4, 2], [5, 3], [6, 4]]
    assert queries.nonzero().flatten().tolist() == [4, 5, 6]
    tokens = torch.tensor([[0, 5, 6, 5, 6]])
    t, q = prefix_mask(tokens, 3)
    assert t[0, 3].nonzero().flatten().tolist() == [2] and t[0, 4].nonzero().flatten().tolist() == [3]
    assert q[0].tolist() == [False, False, False, True, True]
    pattern = torch.zeros(1, 1, 7, 7)
    pattern[0, 0, 4, 2] = pattern[0, 0, 5, 3] = 1.0
    pattern[0, 0, 6, 0] = 1.0
    target, queries = induction_mask(7, 3)
    assert masked_score(pattern, target, queries).item() == pytest.approx(2 / 3)


def test_hand_built_heads_are_found():
    model = hand_built()
    r = find_induction_heads(model, PROTOCOL)
    s = r.scores
    assert s["previous_token"][0, 0] > 0.9 and s["induction"][1, 0] > 0.8 and s["prefix_matching"][1, 0] > 0.8
    assert r.labels == [["previous_token", "none"], ["induction", "none"]]
    assert s["copying"][1, 0] > 0 and s["ov_eigen_positivity"][1, 0] > 0.99
    # the circuit: head 0.0 feeds head 1.0's keys, confirmed by key-side path patching; the zero head does not
    (edge,) = r.edges()
    assert edge["source"] == "0.0" and edge["targets"] == ["1.0"] and edge["loss_increase"] > 0.5
    (row,) = r.circuit()
    tests = {t["source"]: t for t in row["path_patching"]}
    assert tests["0.0"]["confirmed"] and tests["0.0"]["drop"] > 0.1
    assert not tests["0.1"]["confirmed"] and tests["0.1"]["drop"] == 0.0
    # K-composition on the folded weights: the previous-token head composes, the zero head does not
    assert row["top_k_composition"][0]["head"] == "0.0" and row["top_k_composition"][0]["above_baseline"] > 0
    # causal: the model copies, so the second copy is predictable, and ablating 1.0 breaks that
    assert r.loss_second_half < 0.5 * r.loss_first_half
    for kind in ("mean", "zero", "resample"):
        measured = r.ablation[kind].exact
        assert measured[(1, 0)].mean() > 1.0 and abs(measured[(1, 1)].mean()) < 1e-5  # a zero head costs nothing
        assert measured[(1, 0)].shape == (PROTOCOL.batch,)  # one value per sequence
    assert r.top_k_ablation["heads"] == [{"layer": 1, "head": 0}]
    assert r.top_k_ablation["induction_heads_loss_increase"] > r.top_k_ablation["random_heads_loss_increase_mean"]
    json.dumps(r.to_dict(), allow_nan=False)  # valid JSON
    assert attached_hooks(model) == []


def test_without_per_head_ablations_only_the_confirmed_path_sources_are_measured(tmp_path):
    """lm circuits' protocol: no per-head ablations but the source of each confirmed edge (0.0 here), measured as
    the full protocol measures it; lm heads --no-ablation measures nothing."""
    from dataclasses import replace

    model = hand_built()
    full = find_induction_heads(model, PROTOCOL)
    circuits = find_induction_heads(model, replace(PROTOCOL, per_head_ablation=False, exact_path_sources=True))
    none = find_induction_heads(model, replace(PROTOCOL, per_head_ablation=False))
    assert [e["source"] for e in circuits.edges()] == ["0.0"]
    mean = circuits.ablation["mean"]
    assert list(mean.exact_mean) == [(0, 0)] and mean.exact_mean[(0, 0)] > 0.5
    assert mean.exact_mean[(0, 0)] == full.ablation["mean"].exact_mean[(0, 0)]  # the same measurement, bit for bit
    assert np.array_equal(mean.exact[(0, 0)], full.ablation["mean"].exact[(0, 0)])
    assert circuits.scores["ablation_loss_increase"][0, 0] == mean.exact_mean[(0, 0)]
    assert not circuits.ablation["zero"].exact_mean and not none.ablation["mean"].exact_mean
    assert np.array_equal(mean.estimate_mean, none.ablation["mean"].estimate_mean)  # every estimate kept
    from mechscope.lm.report.heads import write_report

    for result, says in ((circuits, "Only the source of each confirmed path-patching edge was ablated alone"),
                         (none, "No head was ablated alone exactly in this run")):  # fmt: skip
        assert says in write_report(result, tmp_path / "report.html").read_text()


def repeated(seed: int, n: int = 20, b: int = 4) -> torch.Tensor:
    seq = torch.randint(1, V, (b, n), generator=torch.Generator().manual_seed(seed))
    return torch.cat([torch.zeros(b, 1, dtype=torch.long), seq, seq], 1)


def second_half_loss_by_hand(logits: torch.Tensor, tokens: torch.Tensor, n: int = 20) -> torch.Tensor:
    """Loss of the predictions inside the second copy, per sequence, written out independently."""
    lp = torch.log_softmax(logits.double(), -1)
    rows = []
    for b in range(tokens.shape[0]):
        rows.append(-torch.stack([lp[b, p, tokens[b, p + 1]] for p in range(n + 1, 2 * n)]).mean())
    return torch.stack(rows)


def test_mean_ablation_is_per_position_over_the_batch():
    """Mean-ablating a head by hand (each position's z set to that position's batch mean) gives the
    measured value: the standard of ARENA 1.2, not a mean pooled over positions."""
    from mechscope.core.hooks import hooks
    from mechscope.lm.methods.ablation import capture, exact

    model = hand_built()
    tokens = repeated(5)
    measured = exact(model, capture(model, tokens, 20), tokens, 20, 0, [0], "mean")[0]
    z = {}

    def grab(act, hook):
        z["z"] = act.clone()

    def ablate(act, hook):
        act = act.clone()
        act[:, :, 0] = z["z"][:, :, 0].mean(0)  # [P, Dh]: per position, over the batch
        return act

    with torch.no_grad():
        with hooks(model, fwd=[("blocks.0.attn.hook_z", grab)]):
            clean = second_half_loss_by_hand(model(tokens), tokens)
        with hooks(model, fwd=[("blocks.0.attn.hook_z", ablate)]):
            ablated = second_half_loss_by_hand(model(tokens), tokens)
    np.testing.assert_allclose(measured, (ablated - clean).numpy(), rtol=1e-4, atol=1e-4)
    assert measured.mean() > 0.5


def test_attribution_patching_matches_a_small_linear_change():
    """The first-order estimate equals the measurement when the change is small enough to be linear:
    zero-ablating a head that writes almost nothing into the logits."""
    from mechscope.lm.methods.ablation import capture, estimate, exact

    model = hand_built()
    with torch.no_grad():
        model.blocks[1].attn.W_V[1][: V, :] = torch.eye(V)
        model.blocks[1].attn.W_O[1][:, :V] = 1e-3 * torch.randn(V, V, generator=torch.Generator().manual_seed(0))
    tokens = repeated(6)
    cap = capture(model, tokens, 20)
    est = estimate(cap, "zero")[1, 1]  # [B]
    ex = exact(model, cap, tokens, 20, 1, [1], "zero")[0]
    assert np.abs(ex).max() > 1e-5
    np.testing.assert_allclose(est, ex, rtol=0.05, atol=1e-6)


def test_random_model_has_no_induction_heads():
    cfg = TransformerConfig(
        d_model=64, n_layers=2, n_heads=4, d_head=16, d_vocab=V, n_ctx=CTX, attn_only=True, bos_token_id=0
    )
    model = HookedTransformer(cfg).eval()
    model.init_weights(torch.Generator().manual_seed(3))
    r = find_induction_heads(model, PROTOCOL)
    assert all(label == "none" for row in r.labels for label in row)
    assert r.to_dict()["induction_heads"] == [] and np.max(r.scores["induction"]) < 0.2


@pytest.mark.parametrize(
    "protocol, show, message",
    [
        (HeadProtocol(n=40), None, r"^--n \(n\) 40 needs 81 positions \(a BOS and two copies of 40 tokens\); the "
                                   "model's context is 64: use --n 31 or fewer$"),
        (HeadProtocol(n=20, prefix_n=30), None, r"^the prefix-matching test needs 121 positions \(a BOS and 4 "
                                                 r"copies of prefix_n = 30 tokens\); the model's context is 64"),
        (PROTOCOL, [(2, 0)], r"head 2.0 out of range: layers 0..1, heads 0..1"),
        (PROTOCOL, [(1, 0), (0, 1), (1, 0)], r"head 1.0 given more than once"),  # the API, as the CLI refuses it
        (HeadProtocol(n=20, prefix_n=10, token_range=(0, 500)), None, r"token range \[0, 500\) outside"),
        (HeadProtocol(n=20, prefix_n=10, top_k=9), None, r"--top-k \(top_k\) must be between 1 and 2 .half the 4"),
        (HeadProtocol(n=1, prefix_n=10), None, r"^--n \(n\) must be at least 2 \(the second copy"),  # the flag too
        (HeadProtocol(n=20, prefix_n=10, batch=1), None, r"^--batch \(batch\) must be at least 2 \(mean- and"),
    ],
)
def test_bad_protocols(protocol, show, message):
    from mechscope.core.errors import MechscopeError

    with pytest.raises(MechscopeError, match=message):
        find_induction_heads(hand_built(), protocol, show=show)


@pytest.mark.parametrize("chunk", [1, 2**40])
def test_capture_layer_by_layer_equals_one_backward(monkeypatch, chunk):
    """capture recomputes each layer from its cached input for the backward (activation checkpointing), from the
    final gradient taken a chunk of sequences at a time (one sequence, or the whole batch): the head outputs and
    their gradients are those of one forward and backward through the whole model, bit for bit."""
    from mechscope.core.hooks import hooks
    from mechscope.lm.methods import scores
    from mechscope.lm.methods.ablation import capture, second_half_loss

    torch.manual_seed(0)
    cfg = TransformerConfig(d_model=48, n_layers=3, n_heads=4, d_head=12, d_vocab=V, n_ctx=CTX, d_mlp=96)
    model = HookedTransformer(cfg).eval()
    tokens = repeated(4)
    zs = []

    def leaf(z, hp):
        zs.append(z.detach().requires_grad_(True))
        return zs[-1]

    with torch.enable_grad(), hooks(model, fwd=[(f"blocks.{i}.attn.hook_z", leaf) for i in range(3)]):
        loss = second_half_loss(model, model.run_blocks(model.embed(tokens)), tokens, 20)
        grads = torch.autograd.grad(loss.sum(), zs)
    calls = []
    unembed = model.unembed
    monkeypatch.setattr(model, "unembed", lambda r: calls.append(r.shape[0]) or unembed(r))
    monkeypatch.setattr(scores, "LOGITS_CHUNK_BYTES", chunk)
    cap = capture(model, tokens, 20)
    assert calls == ([1] * 4 if chunk == 1 else [4])
    assert torch.equal(cap.clean, loss.detach())
    for i in range(3):
        assert torch.equal(cap.z[i], zs[i].detach()) and torch.equal(cap.grad[i], grads[i]), i
    assert all(g.abs().sum() > 0 for g in cap.grad)


def test_token_losses_in_chunks_are_the_whole_unembedding(monkeypatch):
    """token_losses makes the logits a few sequences at a time: the same numbers, bit for bit, as unembedding the
    whole batch and taking every position's loss; with a gradient wanted it keeps the batch whole (one graph)."""
    from mechscope.lm.methods import scores
    from mechscope.lm.methods.scores import token_losses

    torch.manual_seed(0)
    cfg = TransformerConfig(d_model=48, n_layers=2, n_heads=4, d_head=12, d_vocab=V, n_ctx=CTX, d_mlp=96)
    model = HookedTransformer(cfg).eval()
    tokens = repeated(7, b=7)  # [7, 41]
    with torch.no_grad():
        resid = model.run_blocks(model.embed(tokens))
        logits = model.unembed(resid)[:, :40]  # every position but the last predicts the next token: [7, 40, V]
        whole = F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none")
        second = F.cross_entropy(model.unembed(resid[:, 21:40]).transpose(1, 2), tokens[:, 22:41], reduction="none")
        for per in (1, 3, 7):  # chunks of 1, of 3 (3 + 3 + 1) and the whole batch
            monkeypatch.setattr(scores, "LOGITS_CHUNK_BYTES", per * 40 * V * 4)
            assert torch.equal(token_losses(model, resid, tokens, slice(0, 40)), whole), per
            monkeypatch.setattr(scores, "LOGITS_CHUNK_BYTES", per * 19 * V * 4)
            assert torch.equal(token_losses(model, resid, tokens, slice(21, 40)), second), per
    calls = []
    unembed = model.unembed
    monkeypatch.setattr(model, "unembed", lambda r: calls.append(r.shape[0]) or unembed(r))
    monkeypatch.setattr(scores, "LOGITS_CHUNK_BYTES", 2 * 40 * V * 4)  # two sequences' logits
    with torch.no_grad():
        token_losses(model, resid, tokens, slice(0, 40))
    assert calls == [2, 2, 2, 1]
    calls.clear()
    monkeypatch.setattr(scores, "LOGITS_CHUNK_BYTES", 1)
    x = resid.clone().requires_grad_(True)
    loss = token_losses(model, x, tokens, slice(0, 40))
    assert torch.equal(loss.detach(), whole)
    (g,) = torch.autograd.grad(loss.sum(), x)
    assert g.abs().sum() > 0 and calls == [7]


def test_key_patch_two_sources_at_a_time_equals_each_source_alone():
    """key_patch runs the target block on two sources' batches at a time (memory does not grow with the number of
    sources); each source's patched induction scores are those it gets patched alone."""
    from mechscope.lm.methods.ablation import capture
    from mechscope.lm.methods.path_patching import key_patch

    model = hand_built()
    tokens = repeated(5)
    cap = capture(model, tokens, 20)
    mask = induction_mask(tokens.shape[1], 20)
    sources = [(0, 0), (0, 1), (0, 0), (0, 1), (0, 0)]  # five: runs of 2, 2 and 1
    clean, patched, keys = key_patch(model, cap, 1, 0, sources, mask)
    assert patched.shape == (5, 1, 4) and keys.shape[0] == 5 * 4  # [S, query heads, B]; [S·B, P, Dh]
    for i, src in enumerate(sources):
        c1, p1, k1 = key_patch(model, cap, 1, 0, [src], mask)
        assert np.array_equal(c1, clean) and np.array_equal(p1[0], patched[i])
        assert torch.equal(k1, keys[4 * i : 4 * i + 4])
    assert patched[0].mean() < clean.mean() - 0.1  # the previous-token head's key path carries the induction
    assert np.array_equal(patched[1], clean)  # head 0.1 writes nothing
    assert attached_hooks(model) == []


def test_weight_readings_given_are_the_ones_computed(monkeypatch):
    """A caller that read the weights already (``lm circuits``) passes them in: the same result, field by field,
    without folding or scoring the weights again."""
    from mechscope.lm.methods import heads as H
    from mechscope.lm.methods.composition import composition_scores
    from mechscope.lm.methods.weights_circuits import ov_eigen_positivity
    from mechscope.lm.models.folding import analysis_weights

    model = hand_built()
    view = analysis_weights(model, mlp=False)
    scores = {m: t.numpy() for m, t in composition_scores(view).items()}
    readings = H.WeightReadings(view, ov_eigen_positivity(view), scores)
    own = find_induction_heads(model, PROTOCOL).to_dict()
    for name in ("analysis_weights", "ov_eigen_positivity"):
        monkeypatch.setattr(H, name, lambda *a, **k: pytest.fail("the weights were read again"))
    monkeypatch.setattr(H, "all_composition", _no_scoring(H.all_composition))
    shared = find_induction_heads(model, PROTOCOL, readings=readings).to_dict()
    own.pop("seconds"), shared.pop("seconds")
    assert json.dumps(shared, sort_keys=True) == json.dumps(own, sort_keys=True)


def _no_scoring(all_composition):
    def wrapped(view, *a, scores=None, **k):
        assert scores is not None, "the composition was scored again"
        return all_composition(view, *a, scores=scores, **k)

    return wrapped


def test_the_random_heads_control_draws_from_the_other_heads(monkeypatch):
    from types import SimpleNamespace

    from mechscope.lm.methods import heads as HM

    drawn = []
    monkeypatch.setattr(HM.HA, "group", lambda model, cap, tokens, n, heads: drawn.append(list(heads)) or 0.0)
    model = SimpleNamespace(cfg=SimpleNamespace(n_heads=2))
    scores = {"induction": np.array([[0.1, 0.9], [0.8, 0.2]])}  # 4 heads; the top 2: 0.1 and 1.0
    out = HM._top_k(model, None, None, 5, scores, 2, 20, torch.Generator().manual_seed(0))
    assert out["heads"] == [{"layer": 0, "head": 1}, {"layer": 1, "head": 0}]
    assert len(drawn) == 21 and sorted(drawn[-1]) == [(0, 1), (1, 0)]  # the top k, measured after the draws
    assert all(sorted(d) == [(0, 0), (1, 1)] for d in drawn[:-1])  # every random draw: the two other heads
