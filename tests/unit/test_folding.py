"""The folded analysis view: the same function, and free of choices that do not change it."""

from __future__ import annotations

import pytest
import torch

from mechscope.lm.models.folding import LAZY, CentredRows, FoldedLayers, analysis_weights, folded_model, raw_weights
from mechscope.lm.models.transformer import HookedTransformer, TransformerConfig


def random_model(norm="layernorm", kv_heads=None, attn_only=False, gated=False, seed=0, act=None) -> HookedTransformer:
    cfg = TransformerConfig(
        d_model=32,
        n_layers=3,
        n_heads=4,
        n_kv_heads=kv_heads,
        d_head=8,
        d_vocab=50,
        n_ctx=16,
        d_mlp=None if attn_only else 48,
        act=act or ("silu" if gated else "gelu_new"),
        gated_mlp=gated,
        norm=norm,
        positional="learned" if norm == "layernorm" else "rotary",
        attn_bias=norm == "layernorm",
        attn_out_bias=norm == "layernorm",
        mlp_bias=norm == "layernorm",
        attn_only=attn_only,
        tie_embeddings=norm == "layernorm",
    )
    model = HookedTransformer(cfg)
    g = torch.Generator().manual_seed(seed)
    model.init_weights(g, std=0.3)
    with torch.no_grad():  # non-trivial gains and biases, so a missed fold shows
        for name, p in model.named_parameters():
            if name.endswith(".w"):
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))
            elif p.dim() == 1:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


CASES = {
    "gpt2-like": dict(norm="layernorm"),
    "solu": dict(norm="layernorm", act="solu_ln"),
    "attn-only": dict(norm="layernorm", attn_only=True),
    "llama-gqa": dict(norm="rmsnorm", kv_heads=2, gated=True),
    "llama-mqa": dict(norm="rmsnorm", kv_heads=1, gated=True),
}


def centred(x):
    return x - x.mean(-1, keepdim=True)


@pytest.mark.parametrize("case", CASES)
def test_folded_model_computes_the_same_function(case):
    model = random_model(**CASES[case])
    tokens = torch.randint(0, 50, (3, 16), generator=torch.Generator().manual_seed(1))
    folded, b_U = folded_model(analysis_weights(model))
    with torch.no_grad():
        ours, theirs = model(tokens), folded(tokens) + b_U
        exact = centred(model.double()(tokens))  # the same function in float64: the reference for both
    # equal up to one shift per position (the centred unembedding), and far from trivially so. The tolerance is
    # the float32 model's own rounding error against float64 (times 4), never below 64 float32 ulps of the
    # logits' scale: a property of the computation, not of the machine (a missed fold is off by ~0.1-1)
    own = (centred(ours).double() - exact).abs().max().item()
    tol = max(4 * own, 64 * torch.finfo(torch.float32).eps * exact.abs().max().item())
    assert (centred(theirs).double() - exact).abs().max().item() <= tol
    assert centred(ours).abs().max() > 1.0


@pytest.mark.parametrize("case", CASES)
def test_raw_view_is_the_checkpoint(case):
    model = random_model(**CASES[case])
    raw = raw_weights(model)
    groups = model.cfg.n_heads // model.cfg.kv_heads
    torch.testing.assert_close(raw.W_Q[1], model.blocks[1].attn.W_Q, rtol=0, atol=0)
    torch.testing.assert_close(raw.W_K[2], model.blocks[2].attn.W_K.repeat_interleave(groups, 0), rtol=0, atol=0)
    torch.testing.assert_close(raw.W_U, model.W_U, rtol=0, atol=0)


def test_layernorm_view_ignores_an_all_ones_component():
    """Adding c·1 to W_O and b_O does not change a LayerNorm model's function; it must not change the view."""
    model = random_model("layernorm")
    tokens = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(2))
    before = analysis_weights(model)
    with torch.no_grad():
        logits = model(tokens)
        c = torch.randn(model.cfg.n_heads * model.cfg.d_head, 1) * 3
        model.blocks[1].attn.o.weight.add_(c.T.expand(model.cfg.d_model, -1))  # every output unit gets c·z
        model.blocks[1].attn.o.bias.add_(2.0)
        torch.testing.assert_close(model(tokens), logits, rtol=1e-4, atol=1e-4)
    after = analysis_weights(model)
    torch.testing.assert_close(after.W_O, before.W_O, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(after.b_O, before.b_O, rtol=1e-5, atol=1e-5)
    assert (raw_weights(model).W_O[1] - before.W_O[1]).abs().max() > 1.0


def test_rmsnorm_gets_gains_only():
    model = random_model("rmsnorm", kv_heads=2, gated=True)
    view = analysis_weights(model)
    w = model.blocks[0].ln1.w.detach()
    torch.testing.assert_close(view.W_Q[0], model.blocks[0].attn.W_Q.detach() * w[:, None])
    # no centring of writing weights on an RMSNorm model
    torch.testing.assert_close(view.W_O, raw_weights(model).W_O)
    # the unembedding is centred over the vocabulary (softmax ignores a shared shift)
    assert view.W_U.mean(-1).abs().max() < 1e-6


def test_folded_view_by_hand_on_one_head():
    """An independent, written-out fold of one head's query weights and bias for a LayerNorm model."""
    model = random_model("layernorm")
    view = analysis_weights(model)
    ln, attn = model.blocks[2].ln1, model.blocks[2].attn
    h = 3
    W = attn.q.weight.detach()[h * 8 : (h + 1) * 8].T  # [D, Dh]
    expected_b = attn.q.bias.detach()[h * 8 : (h + 1) * 8] + ln.b.detach() @ W
    expected_W = ln.w.detach()[:, None] * W
    expected_W = expected_W - expected_W.mean(0, keepdim=True)
    torch.testing.assert_close(view.W_Q[2, h], expected_W)
    torch.testing.assert_close(view.b_Q[2, h], expected_b)
    # value biases live in b_O once folded
    assert view.b_V.abs().max() == 0 and view.value_bias.abs().max() > 0


@pytest.mark.parametrize("norm,gated", [("layernorm", False), ("rmsnorm", True)])
def test_view_without_the_mlps_keeps_every_other_weight(norm, gated):
    """``mlp=False`` (what `lm heads` uses) leaves the MLPs out and every attention, embedding and unembedding
    weight exactly as the full view has it."""
    model = random_model(norm, gated=gated)
    full, heads_only = analysis_weights(model), analysis_weights(model, mlp=False)
    assert full.W_in is not None and full.W_out is not None
    assert heads_only.W_in is heads_only.W_out is heads_only.W_gate is heads_only.b_in is heads_only.b_out is None
    for name in ("W_Q", "b_Q", "W_K", "b_K", "W_V", "b_V", "W_O", "b_O", "W_E", "W_pos", "W_U", "b_U", "value_bias"):
        a, b = getattr(full, name), getattr(heads_only, name)
        assert (a is None and b is None) or torch.equal(a, b), name


@pytest.mark.parametrize("case", CASES)
def test_per_layer_view_is_the_stacked_view(case):
    """``per_layer=True`` (what `lm heads` and `lm circuits` use) folds W_Q, W_K and W_V when read: every layer,
    head and slice has the stacked view's bits, in any order of reading, and every other weight is the same."""
    model = random_model(**CASES[case])
    full, lazy = analysis_weights(model, mlp=False), analysis_weights(model, mlp=False, per_layer=True)
    for name in LAZY:
        w, want = getattr(lazy, name), getattr(full, name)
        assert isinstance(w, FoldedLayers) and w.shape == want.shape and len(w) == 3 and w.dim() == 4
        assert torch.equal(w[:], want) and torch.equal(w[1:], want[1:])
        for layer in (2, 0, -1, 1, 1):
            assert torch.equal(w[layer], want[layer]) and torch.equal(w[layer, 1], want[layer, 1])
            assert torch.equal(w[layer, 3, :, 2], want[layer, 3, :, 2])
        with pytest.raises(IndexError):
            w[3]
    for name in ("b_Q", "b_K", "b_V", "W_O", "b_O", "W_pos", "W_U", "b_U", "value_bias"):
        a, b = getattr(full, name), getattr(lazy, name)
        assert (a is None and b is None) or torch.equal(a, b), name
    assert all(torch.equal(lazy.OV(i), full.OV(i)) and torch.equal(lazy.QK(i), full.QK(i)) for i in range(3))
    want, w = full.W_E, lazy.W_E  # a LayerNorm model's centred W_E is centred as read
    assert isinstance(w, CentredRows) == (model.cfg.norm == "layernorm") and w.shape == want.shape
    ids = torch.tensor([7, 0, 49, 7])
    for index in (slice(None), slice(3, 20), ids, 5, (slice(None), slice(2, 9)), (slice(10, 30), 4), (ids, 3)):
        assert torch.equal(w[index], want[index]), index
