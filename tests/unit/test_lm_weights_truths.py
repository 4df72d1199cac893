"""Direct logit attribution, the logit lens, composition pairs and weight circuits against outside truths: models
built by hand with known answers, plain forwards and hook reads, and the formulas written out."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mechscope.core.hooks import run_with_cache
from mechscope.lm.methods import weights_circuits as FW
from mechscope.lm.methods.direct import direct_logit_attribution, logit_lens
from mechscope.lm.models.folding import analysis_weights
from mechscope.lm.models.transformer import HookedTransformer, TransformerConfig
from tests.unit.test_folding import random_model
from tests.unit.test_heads import hand_built, repeated
from tests.unit.test_sentences_heads import _composition


def _centred_direction(model: HookedTransformer, resid: torch.Tensor, target: int) -> torch.Tensor:
    """The unembedding column of ``target`` centred over the vocabulary, through the final RMSNorm's gain and
    divided by its scale on ``resid`` [D], written out from the model's own weights (not the folded view)."""
    w_u = model.W_U.detach().double() * model.ln_final.w.detach().double()[:, None]
    col = w_u[:, target] - w_u.mean(1)
    scale = (resid.double().pow(2).mean() + model.cfg.norm_eps).sqrt()
    return col / scale


def test_dla_on_the_hand_built_induction_model_is_head_1_0_alone():
    """Known answer: in hand_built() only head 1.0 writes into the rows W_U reads (the token rows); W_pos writes
    into rows W_U never reads, so the position share is exactly 0, and each share equals that component's own
    output (hook_result, hook_embed read from a plain forward) through the final norm onto the centred column."""
    model = hand_built()
    tokens = repeated(5, b=1)[0]
    dla = direct_logit_attribution(model, analysis_weights(model), tokens, position=30)
    assert dla.heads[0].tolist() == [0.0, 0.0] and dla.heads[1, 1] == 0.0 and dla.heads[1, 0] > 5
    assert dla.pos_embed == 0.0 and dla.mlps.tolist() == [0.0, 0.0]

    names = ["hook_embed", "blocks.1.hook_resid_post", "blocks.1.attn.hook_result"]
    _, cache = run_with_cache(model, tokens[None], names=names)
    direction = _centred_direction(model, cache["blocks.1.hook_resid_post"][0, 30], dla.target)
    head = cache["blocks.1.attn.hook_result"][0, 30].double() @ direction  # [H]
    assert dla.heads[1].tolist() == pytest.approx(head.tolist(), abs=1e-5)
    embed = float(cache["hook_embed"][0, 30].double() @ direction)
    assert embed < -0.01 and dla.embed == pytest.approx(embed, abs=1e-6)  # ≈ −1/V / scale: not the target's row


def test_dla_puts_each_mlp_share_in_its_own_layer():
    """Known answer: with the first MLP's output weight and bias zeroed its share is exactly 0 and the last MLP's is
    not; each share equals that layer's hook_mlp_out, centred over d_model as the final LayerNorm does, onto the
    gain-scaled column centred over the vocabulary, over the LayerNorm's scale (written out)."""
    model = random_model("layernorm")
    with torch.no_grad():
        model.blocks[0].mlp.down.weight.zero_()
        model.blocks[0].mlp.down.bias.zero_()
    tokens = torch.randint(0, 50, (10,), generator=torch.Generator().manual_seed(2))
    dla = direct_logit_attribution(model, analysis_weights(model), tokens, position=-1)
    assert dla.mlps[0] == 0.0 and abs(dla.mlps[-1]) > 1e-3

    names = ["blocks.2.hook_resid_post"] + [f"blocks.{i}.hook_mlp_out" for i in range(3)]
    _, cache = run_with_cache(model, tokens[None], names=names)
    final = cache["blocks.2.hook_resid_post"][0, -1].double()
    w_u = model.W_U.detach().double() * model.ln_final.w.detach().double()[:, None]
    col = w_u[:, dla.target] - w_u.mean(1)
    scale = ((final - final.mean()).pow(2).mean() + model.cfg.norm_eps).sqrt()
    outs = [cache[f"blocks.{i}.hook_mlp_out"][0, -1].double() for i in range(3)]
    want = [float((out - out.mean()) @ col / scale) for out in outs]  # LayerNorm centres what it reads
    assert dla.mlps.tolist() == pytest.approx(want, abs=1e-4)


def test_logit_lens_row_0_is_the_embeddings_unembedded():
    """Plain forward: row 0 of the lens is log_softmax(unembed(embed(tokens))) — the embeddings read directly —
    gathered at the next tokens, and its top tokens are that row's argmax."""
    model = random_model("layernorm")
    tokens = torch.randint(0, 50, (12,), generator=torch.Generator().manual_seed(4))
    lens = logit_lens(model, tokens)
    with torch.no_grad():
        logp = torch.log_softmax(model.unembed(model.embed(tokens[None]))[0].double(), -1)
    want = logp[:-1].gather(1, tokens[1:, None])[:, 0]
    np.testing.assert_allclose(lens.next_logprob[0], want.numpy(), atol=1e-4)
    assert lens.top[0].tolist() == logp.argmax(-1).tolist()
    np.testing.assert_allclose(lens.top_prob[0], logp.max(-1).values.exp().numpy(), atol=1e-5)


def test_top_composition_pair_reports_score_excess_and_z_written_out():
    """Formula: for hand scores whose strongest K pair is 0.10 (0.2 → 2.0) against a baseline of mean 0.04 and
    std 0.002, the pair's score is 0.10, above the baseline 0.10 − 0.04 = 0.06 and z = 0.06 / 0.002 = 30."""
    top = _composition().top["K"][0]
    assert (top["source"], top["target"]) == ("0.2", "2.0")
    assert top["score"] == pytest.approx(0.10)
    assert top["above_baseline"] == pytest.approx(0.06)
    assert top["z"] == pytest.approx(30.0)


def test_positional_qk_is_the_attention_of_a_model_without_token_embeddings():
    """The model's own attention: with the token embedding zero, layer 0 attends by position alone, so its
    hook_pattern from a plain forward is positional_qk's pattern of layer 0 (queries and keys scaled down so the
    softmax is not saturated and the 1/√d_head scale shows)."""
    model = random_model("layernorm", attn_only=True)
    with torch.no_grad():
        model.W_E.zero_()
        for lin in (model.blocks[0].attn.q, model.blocks[0].attn.k):
            lin.weight.mul_(0.5)
            lin.bias.mul_(0.5)
    pos = FW.positional_qk(analysis_weights(model), n=16)
    _, cache = run_with_cache(model, torch.zeros(1, 16, dtype=torch.long), names=["blocks.0.attn.hook_pattern"])
    pattern = cache["blocks.0.attn.hook_pattern"][0]
    assert pattern.max(-1).values[:, 4:].mean() < 0.8  # not saturated: a wrong temperature would show
    np.testing.assert_allclose(pos.patterns[0], pattern.numpy(), atol=1e-5)


def test_bigram_table_is_the_logits_of_a_model_whose_attention_writes_nothing():
    """The model's own logits: a 1-layer attention-only LayerNorm model whose attention writes nothing (W_O and its
    bias zero) and with no position embedding predicts from the token alone, so bigrams(view).table[a] is its
    logits on the one-token input [a], centred over the vocabulary — ln_final's random gain and bias and b_U
    included."""
    cfg = TransformerConfig(
        d_model=16, n_layers=1, n_heads=2, d_head=8, d_vocab=20, n_ctx=4, attn_only=True, norm="layernorm",
        positional="learned", tie_embeddings=False, unembed_bias=True,
    )  # fmt: skip
    model = HookedTransformer(cfg)
    g = torch.Generator().manual_seed(5)
    model.init_weights(g, std=0.5)
    with torch.no_grad():
        model.blocks[0].attn.o.weight.zero_()
        model.blocks[0].attn.o.bias.zero_()
        model.W_pos.zero_()
        model.ln_final.w.copy_(1 + 0.5 * torch.randn(16, generator=g))
        model.ln_final.b.copy_(torch.randn(16, generator=g))
        model.b_U.copy_(torch.randn(20, generator=g))
        logits = model(torch.arange(20)[:, None])[:, 0].double()  # each token alone
    want = logits - logits.mean(-1, keepdim=True)
    np.testing.assert_allclose(FW.bigrams(analysis_weights(model.eval())).table, want.numpy(), atol=1e-5)
