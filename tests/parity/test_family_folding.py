"""The folded analysis view on every family's tiny checkpoint: the same function where it can be
run as a model; the gains folded by hand where it cannot (QK-norm, post-sublayer norms)."""

from __future__ import annotations

import pytest
import torch

from mechscope.core.errors import MechscopeError
from mechscope.lm.methods.direct import direct_logit_attribution
from mechscope.lm.models.folding import analysis_weights, folded_model
from mechscope.lm.models.loading import load_model
from tests.parity.families import tokens

pytest.importorskip("transformers")

RUNNABLE = ["gpt_neox-parallel", "gpt_neox-sequential", "gpt_neo", "gptj", "opt", "qwen2", "mistral", "gemma", "phi3"]
SCALE_FREE = {"qwen3": ("qk_norm",), "gemma2": ("post_attn_mlp_norm",), "gemma3": ("qk_norm", "post_attn_mlp_norm")}


def centred(x):
    return x - x.mean(-1, keepdim=True)


@pytest.mark.parametrize("name", RUNNABLE)
def test_folded_model_is_the_same_function(name, tiny_family, one_thread):
    _, path = tiny_family(name)
    model, _ = load_model(path)
    view = analysis_weights(model)
    assert view.scale_free == ()
    folded, b_U = folded_model(view)
    x = tokens()
    with torch.no_grad():
        ours, theirs = model(x), folded(x) + b_U
    torch.testing.assert_close(centred(theirs), centred(ours), rtol=1e-4, atol=1e-4)
    dla = direct_logit_attribution(model, view, x[0])
    assert dla.total == pytest.approx(dla.logit, abs=1e-3)


@pytest.mark.parametrize("name", sorted(SCALE_FREE))
def test_scale_free_folds_by_hand(name, tiny_family, one_thread):
    _, path = tiny_family(name)
    model, _ = load_model(path)
    view = analysis_weights(model)
    assert view.scale_free == SCALE_FREE[name]
    with pytest.raises(MechscopeError, match="up to per-position scales"):
        folded_model(view)
    dla = direct_logit_attribution(model, view, tokens()[0])  # exact despite the folds: scales put back
    assert dla.total == pytest.approx(dla.logit, abs=1e-3)
    block = model.blocks[1]
    groups = model.cfg.n_heads // model.cfg.kv_heads
    gain = block.ln1.gain.detach().float()
    if "qk_norm" in view.scale_free:  # W_K' = diag(ln1 gain) W_K diag(k_norm gain), query heads expanded
        want = gain[:, None] * block.attn.W_K.detach().float() * block.attn.k_norm.gain.detach().float()
        torch.testing.assert_close(view.W_K[1], want.repeat_interleave(groups, 0))
    if "post_attn_mlp_norm" in view.scale_free:  # W_O' = W_O diag(post-attention norm gain)
        want = block.attn.W_O.detach().float() * block.ln1_post.gain.detach().float()
        torch.testing.assert_close(view.W_O[1], want)


def test_post_ln_is_refused(tiny_family, one_thread):
    _, path = tiny_family("opt-postln-projected")
    model, _ = load_model(path)
    with pytest.raises(MechscopeError, match="post-LN model"):
        analysis_weights(model)


@pytest.mark.parametrize("name", RUNNABLE + sorted(SCALE_FREE))
def test_per_layer_view_on_every_family(name, tiny_family, one_thread):
    """The per-layer view (W_Q, W_K, W_V folded when read) has the stacked view's bits on every family: grouped
    key/value heads, QK-norm and post-sublayer norms included."""
    _, path = tiny_family(name)
    model, _ = load_model(path)
    full, lazy = analysis_weights(model, mlp=False), analysis_weights(model, mlp=False, per_layer=True)
    for w in ("W_Q", "W_K", "W_V"):
        assert torch.equal(getattr(lazy, w)[:], getattr(full, w))
        assert all(torch.equal(getattr(lazy, w)[i], getattr(full, w)[i]) for i in range(model.cfg.n_layers))
