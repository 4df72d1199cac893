"""The folded analysis view on every family's tiny checkpoint: the same function where it can be
run as a model; the gains folded by hand where it cannot (QK-norm, post-sublayer norms)."""

from __future__ import annotations

import pytest
import torch

from mechscope.core.errors import MechscopeError
from mechscope.lm.methods.direct import direct_logit_attribution
from mechscope.lm.models.folding import analysis_weights, folded_model
from mechscope.lm.models.loading import load_model
from tests.parity.families import SEQ, tokens

pytest.importorskip("transformers")

RUNNABLE = ["gpt_neox-parallel", "gpt_neox-sequential", "gpt_neo", "gptj", "opt", "llama-biases", "qwen2", "mistral",
            "gemma", "phi3"]  # fmt: skip
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


def _cos(a, b):
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)


@pytest.mark.parametrize("name", sorted(SCALE_FREE))
def test_scale_free_folds_point_where_transformers_does(name, tiny_family, one_thread):
    """Outside truth for the folds that hold only as directions: transformers' own tensors after each norm the view
    folds past. Its QK-norm outputs are parallel, position by position and head by head, to the view's queries and
    keys read from ln1's input normalised with unit gain (x / rms x); its post-attention and post-MLP norm outputs
    are parallel to what the view's W_O and W_out write from the heads' z and the MLP's hidden units. Each gain
    (about 1 ± 0.1 in the tiny checkpoints) left unfolded turns the smallest cosine to 0.989-0.994 (measured)."""
    hf, path = tiny_family(name)
    model, _ = load_model(path)
    view = analysis_weights(model)
    layer, seen = hf.model.layers[1], {}

    def keep(key, pre=False):
        if pre:
            return lambda m, args: seen.__setitem__(key, args[0].detach())
        return lambda m, args, out: seen.__setitem__(key, (out[0] if isinstance(out, tuple) else out).detach())

    def heads_third(t):  # [B, P, heads, Dh]: Gemma 3 normalises queries and keys after moving heads forward
        return t if t.shape[1] == SEQ else t.transpose(1, 2)

    hooks = [layer.input_layernorm.register_forward_pre_hook(keep("x", pre=True)),
             layer.self_attn.o_proj.register_forward_pre_hook(keep("z", pre=True)),
             layer.mlp.down_proj.register_forward_pre_hook(keep("h", pre=True))]  # fmt: skip
    if "qk_norm" in view.scale_free:
        hooks += [layer.self_attn.q_norm.register_forward_hook(keep("q")),
                  layer.self_attn.k_norm.register_forward_hook(keep("k"))]  # fmt: skip
    if "post_attn_mlp_norm" in view.scale_free:
        hooks += [layer.post_attention_layernorm.register_forward_hook(keep("attn")),
                  layer.post_feedforward_layernorm.register_forward_hook(keep("mlp"))]  # fmt: skip
    try:
        with torch.no_grad():
            hf(tokens())
    finally:
        for h in hooks:
            h.remove()
    x = seen["x"].float()
    unit = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + hf.config.rms_norm_eps)
    groups = model.cfg.n_heads // model.cfg.kv_heads
    want = {}
    if "qk_norm" in view.scale_free:
        read = {w: torch.einsum("bpd,hde->bphe", unit, getattr(view, f"W_{w}")[1]) + getattr(view, f"b_{w}")[1]
                for w in "QK"}  # fmt: skip
        want["q"] = (heads_third(seen["q"]), read["Q"])
        want["k"] = (heads_third(seen["k"]).repeat_interleave(groups, 2), read["K"])
    if "post_attn_mlp_norm" in view.scale_free:
        z = seen["z"].unflatten(-1, (model.cfg.n_heads, model.cfg.d_head))
        want["attn"] = (seen["attn"], torch.einsum("bphe,hed->bpd", z, view.W_O[1]) + view.b_O[1])
        want["mlp"] = (seen["mlp"], seen["h"] @ view.W_out[1] + view.b_out[1])
    assert len(want) == 2 * len(view.scale_free)
    for key, (theirs, ours) in want.items():
        assert _cos(theirs, ours).min() > 1 - 1e-6, key
