"""Induction-head finding on constructed models: heads set by hand are found; none where there are none."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mechscope.hooks import attached_hooks
from mechscope.methods.heads import (
    HeadProtocol,
    find_induction_heads,
    induction_mask,
    k_composition,
    masked_score,
    prefix_mask,
)
from mechscope.models.transformer import HookedTransformer, TransformerConfig

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
    # the circuit: head 0.0 feeds head 1.0's keys; the zero head does not
    (comp,) = r.composition
    assert comp["induction_head"] == {"layer": 1, "head": 0, "induction_score": pytest.approx(s["induction"][1, 0])}
    assert [(f["layer"], f["head"]) for f in comp["previous_token_heads_feeding"]] == [(0, 0)]
    # causal: the model copies, so the second copy is predictable, and ablating 1.0 breaks that
    assert r.loss_second_half < 0.5 * r.loss_first_half
    assert r.scores["ablation_loss_increase"][1, 0] > 1.0
    assert r.top_k_ablation["heads"] == [{"layer": 1, "head": 0}]
    assert r.top_k_ablation["induction_heads_loss_increase"] > r.top_k_ablation["random_heads_loss_increase_mean"]
    json.dumps(r.to_dict(), allow_nan=False)  # valid JSON
    assert attached_hooks(model) == []


def test_k_composition_known_answer():
    model = hand_built()
    scores = k_composition(model, [(1, 0)])[(1, 0)]
    assert scores[0, 0] > 0.05 and scores[0, 1] == 0.0


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
        (HeadProtocol(n=40), None, "N = 40 needs 81 positions"),
        (PROTOCOL, [(2, 0)], r"head 2.0 out of range: layers 0..1, heads 0..1"),
        (HeadProtocol(n=20, prefix_n=10, token_range=(0, 500)), None, r"token range \[0, 500\) outside"),
        (HeadProtocol(n=20, prefix_n=10, top_k=9), None, "top_k must be between 1 and 4"),
    ],
)
def test_bad_protocols(protocol, show, message):
    from mechscope.errors import MechscopeError

    with pytest.raises(MechscopeError, match=message):
        find_induction_heads(hand_built(), protocol, show=show)
