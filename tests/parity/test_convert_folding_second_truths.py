"""The folded view and four converters (GPT-Neo, OPT, GPT-J, Phi-3) against outside truths, second pass.

Each test names its truth: the gains folded by hand in numpy (a post-MLP norm with MLP biases, which the tiny
Gemma checkpoints lack), transformers' config defaults on config.json files that leave the fields out, transformers'
logits on checkpoints it built with the switches the tiny families keep at one value, and the written-out
conventions of the view (its sentence, its slices).
"""

from __future__ import annotations

import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch

from mechscope.lm.models.folding import analysis_weights
from mechscope.lm.models.transformer import HookedTransformer
from tests.parity.test_loading_folding_truths import _cosines, gains_model
from tests.unit.test_folding import random_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _post_norm_model() -> HookedTransformer:
    """An RMSNorm model with post-attention and post-MLP norms and biases on every Linear (gains 1 ± 0.5)."""
    base = random_model("rmsnorm", kv_heads=2, gated=True)
    cfg = replace(base.cfg, post_attn_mlp_norm=True, attn_bias=True, attn_out_bias=True, mlp_bias=True)
    return gains_model(cfg, 11)


def test_post_mlp_norm_gain_scales_the_mlp_output_bias():
    """Outside truth: RMSNorm(v)·g ∝ v⊙g, so what the MLP writes after ln2_post points along (h W_out + b_out)⊙g:
    a numpy cosine of 1 between the model's own modules and the view's W_out, b_out read from the hidden units h
    (the tiny Gemma checkpoints have no MLP biases, so an unscaled b_out goes unseen there)."""
    model = _post_norm_model()
    view, block = analysis_weights(model), model.blocks[1]
    h = torch.randn(model.cfg.d_mlp, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        theirs = block.ln2_post(block.mlp.down(h)).numpy()
    ours = h.numpy() @ view.W_out[1].numpy() + view.b_out[1].numpy()
    assert abs(_cosines(theirs, ours) - 1.0) < 1e-5
    assert view.scale_free == ("post_attn_mlp_norm",)


@pytest.mark.parametrize(
    "norm, options, said, unsaid",
    [
        ("layernorm", {}, ["reading weights centred", "unembedding centred", "value biases folded"], []),
        ("layernorm", {"center_unembed": False}, ["value biases folded"], ["unembedding centred"]),
        ("layernorm", {"fold_value_biases": False}, ["unembedding centred"], ["value biases folded"]),
        ("rmsnorm", {}, ["norm gains folded", "unembedding centred"], ["LayerNorm biases", "reading weights centred"]),
    ],
)
def test_the_sentence_names_exactly_the_steps_taken(norm, options, said, unsaid):
    """Outside truth: the module's own list of steps (TransformerLens' options); a step switched off, or one that an
    RMSNorm model never gets (LayerNorm biases, centring), is not claimed; the view's tensors agree (b_V zero only
    when the value biases were folded; W_U's numpy mean over the vocabulary zero only when centred)."""
    model = random_model(norm, kv_heads=None if norm == "layernorm" else 2, gated=norm == "rmsnorm")
    view = analysis_weights(model, **options)
    text = view.describe()
    assert all(s in text for s in said) and not any(s in text for s in unsaid), text
    assert (view.b_V.abs().max().item() == 0) == ("value biases folded" in text)
    centred = np.abs(np.asarray(view.W_U, np.float64).mean(axis=-1)).max() < 1e-6
    assert centred == ("unembedding centred" in text)


def test_per_layer_slices_with_a_head_index_are_the_stacked_views():
    """Outside truth: numpy indexing of the stacked view (a range of layers, then a head or a column): the per-layer
    view's ``w[a:b, head]`` is the stacked tensor's ``[a:b, head]``, not the whole heads of those layers."""
    model = random_model("layernorm")
    full, lazy = analysis_weights(model, mlp=False), analysis_weights(model, mlp=False, per_layer=True)
    want = full.W_K.numpy()
    np.testing.assert_array_equal(lazy.W_K[0:2, 3].numpy(), want[0:2, 3])
    np.testing.assert_array_equal(lazy.W_K[1:, :, 5].numpy(), want[1:, :, 5])
    assert tuple(lazy.W_K[0:2, 3].shape) == (2, 32, 8)


def test_view_counts_layers_and_heads():
    """Outside truth: the model's config (3 layers of 4 heads, 8 dims each, d_model 32: no two alike), and the
    stacked W_Q's numpy shape [L, H, D, Dh]."""
    view = analysis_weights(random_model("layernorm"))
    assert (view.n_layers, view.n_heads) == (3, 4)
    assert np.asarray(view.W_Q).shape == (3, 4, 32, 8)


def _no_norm_model() -> HookedTransformer:
    """random_model's RMSNorm model with no normalisation at all (``norm="none"``, as tracr's compiled models)."""
    base = random_model("rmsnorm", kv_heads=2, gated=True)
    model = HookedTransformer(replace(base.cfg, norm="none"))
    # weights x 0.4: without norms the raw ones (std 0.3) grow the logits to ~1e7
    model.load_state_dict({k: 0.4 * v for k, v in base.state_dict().items() if not k.endswith(".w")}, strict=False)
    return model.eval()


def test_a_model_without_norms_folds_nothing_into_its_readers():
    """Outside truth: with no norm there is no gain or bias to fold, so the view's reading weights are the raw
    checkpoint's bit for bit (numpy equality), key/value heads expanded by numpy's repeat; the unembedding is still
    centred over the vocabulary (numpy mean zero)."""
    model = _no_norm_model()
    view, raw = analysis_weights(model), analysis_weights(model, False, False, False, False)
    np.testing.assert_array_equal(view.W_Q[1].numpy(), model.blocks[1].attn.W_Q.detach().numpy())
    np.testing.assert_array_equal(view.W_K[2].numpy(), np.repeat(model.blocks[2].attn.W_K.detach().numpy(), 2, 0))
    np.testing.assert_array_equal(view.W_in.numpy(), raw.W_in.numpy())
    assert np.abs(np.asarray(view.W_U, np.float64).mean(axis=-1)).max() < 1e-6


def test_folded_model_of_a_model_without_norms_is_the_same_function():
    """Outside truth: the model's own logits, up to one shift per position (the centred unembedding): the view of a
    norm-free model (which analysis_weights accepts) run as a model computes them."""
    from mechscope.lm.models.folding import folded_model

    model = _no_norm_model()
    folded, b_U = folded_model(analysis_weights(model))
    x = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(x), folded(x) + b_U
    assert float(ours.std()) > 0.05  # logits that vary, so a missed fold shows
    torch.testing.assert_close(theirs - theirs.mean(-1, keepdim=True), ours - ours.mean(-1, keepdim=True))


def test_qk_and_ov_are_the_bilinear_and_linear_maps_of_the_heads():
    """Outside truth: a head's query-key score x_q W_Q W_Kᵀ x_kᵀ and its output x W_V W_O written as plain numpy
    dot products of the view's per-head factors: QK(layer)[h] is the matrix of that bilinear form (query side on
    the left, not its transpose), OV(layer)[h] that of the linear map."""
    view = analysis_weights(random_model("layernorm"))
    rng = np.random.default_rng(4)
    xq, xk = rng.standard_normal(32), rng.standard_normal(32)
    Wq, Wk, Wv, Wo = (np.asarray(getattr(view, n)[2][1], np.float64) for n in ("W_Q", "W_K", "W_V", "W_O"))
    score = np.dot(xq @ Wq, xk @ Wk)
    assert xq @ view.QK(2)[1].double().numpy() @ xk == pytest.approx(score, rel=1e-5)
    np.testing.assert_allclose(xq @ view.OV(2)[1].double().numpy(), (xq @ Wv) @ Wo, rtol=1e-5, atol=1e-6)
    assert abs(score - xk @ view.QK(2)[1].double().numpy() @ xq) > 1e-3  # the form is not symmetric


# ---------------------------------------------------------------------------------------------------------------
# Converters: config.json files that leave fields to transformers' defaults, and switches the tiny families fix

transformers = pytest.importorskip("transformers")
warnings.filterwarnings("ignore", module="transformers")

from mechscope.lm.models.loading import load_model  # noqa: E402
from tests.parity.families import V, save_random  # noqa: E402
from tests.parity.test_family_configs_truths import TOL, max_diff  # noqa: E402
from tests.parity.test_family_inputs import edited  # noqa: E402

NEO_DEFAULTED = ("attention_types", "attention_layers", "layer_norm_epsilon", "activation_function",
                 "tie_word_embeddings", "intermediate_size", "max_position_embeddings", "window_size")  # fmt: skip
OPT_DEFAULTED = ("activation_function", "do_layer_norm_before", "enable_bias", "word_embed_proj_dim",
                 "layer_norm_elementwise_affine", "tie_word_embeddings", "max_position_embeddings",
                 "_remove_final_layer_norm")  # fmt: skip
GPTJ_DEFAULTED = ("n_positions", "n_inner", "activation_function", "layer_norm_epsilon", "tie_word_embeddings")

PHI3 = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1)
PHI3["pad_token_id"] = 0  # Phi3Config's default pad id 32000 lies outside the 256-token vocabulary
NEO = dict(vocab_size=V, hidden_size=16, num_layers=24, num_heads=2, bos_token_id=0, eos_token_id=0)
OPT = dict(vocab_size=V, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, ffn_dim=24)
GPTJ = dict(vocab_size=V, n_embd=32, n_layer=2, n_head=2, rotary_dim=8, bos_token_id=0, eos_token_id=0)
# (config class, its arguments, the fields then removed from config.json). GPT-Neo has 24 layers: its default
# attention_types alternate global and local 12 times
DEFAULTED = {
    "gpt_neo": ("GPTNeoConfig", NEO, NEO_DEFAULTED),
    "opt": ("OPTConfig", OPT, OPT_DEFAULTED),
    "gptj": ("GPTJConfig", GPTJ, GPTJ_DEFAULTED),
    # Phi-3 without rope_parameters: rotary base 10000 over whole heads (partial_rotary_factor 1)
    "phi3": ("Phi3Config", dict(PHI3, intermediate_size=40, max_position_embeddings=64), ("rope_parameters",)),
}


@pytest.mark.parametrize("family", DEFAULTED)
def test_fields_left_out_take_transformers_defaults(family, tmp_path):
    """Outside truth: transformers' config class reading a config.json without the fields (its defaults: GPT-Neo's
    global/local alternation over 24 layers, epsilon 1e-5, gelu_new, a 4·d MLP, 2048 positions, tied; OPT's ReLU,
    pre-LN with biases and a final norm; GPT-J's untied head) and its logits on that folder; our config's epsilon,
    MLP width and context length are transformers' own values."""
    kind, kwargs, fields = DEFAULTED[family]
    save_random(transformers, getattr(transformers, kind)(**kwargs), tmp_path / "src")
    path = edited(tmp_path / "src", tmp_path / "defaulted", **dict.fromkeys(fields))
    theirs = transformers.AutoConfig.from_pretrained(path)
    model, _ = load_model(path, device="cpu", dtype="float32")
    eps = getattr(theirs, "layer_norm_epsilon", None) or getattr(theirs, "rms_norm_eps", 1e-5)  # OPT: torch's
    assert model.cfg.norm_eps == pytest.approx(eps)
    assert model.cfg.n_ctx == theirs.max_position_embeddings
    assert model.cfg.d_mlp == {"gpt_neo": 4 * 16, "opt": 24, "gptj": 4 * 32, "phi3": 40}[family]  # 4·d without a width
    if family == "gpt_neo":
        assert model.cfg.sliding_window_layers == tuple(range(1, 24, 2))
    assert max_diff(path) < TOL


def test_gpt_neo_attention_types_must_cover_every_layer():
    """Outside truth: transformers' GPTNeoConfig refuses attention_types that expand to 2 layers for a 3-layer model
    (its validator: ``len(config.attention_layers) == config.num_layers``); so does our converter, in one line
    naming the layers, and it accepts them for 2 layers as transformers expands them."""
    from mechscope.core.errors import MechscopeError
    from mechscope.lm.models.convert.gpt_neo import attention_layers

    types = [[["global", "local"], 1]]
    with pytest.raises(Exception, match=r"len\(config.attention_layers\)` == `config.num_layers`"):
        transformers.GPTNeoConfig(num_layers=3, attention_types=types)
    with pytest.raises(MechscopeError, match="attention layers .* for 3 layers"):
        attention_layers({"num_layers": 3, "attention_types": types})
    assert (
        attention_layers({"num_layers": 2, "attention_types": types})
        == transformers.GPTNeoConfig(num_layers=2, attention_types=types).attention_layers
    )


OPT_PROJECTED = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, ffn_dim=48)
BUILT = {
    # OPT-350m's projections around the stack, pre-LN, with an lm_head of its own (not the embedding)
    "opt-projected-untied": ("OPTConfig", dict(OPT_PROJECTED, word_embed_proj_dim=16, tie_word_embeddings=False)),
    # ... and tied (the projected embedding read back through project_out)
    "opt-projected-tied": ("OPTConfig", dict(OPT_PROJECTED, word_embed_proj_dim=16)),
    # Phi-3 with no sliding window and whole-head rotary (the tiny family slides and rotates half)
    "phi3-no-window-full-rotary": ("Phi3Config", dict(PHI3, intermediate_size=40, max_position_embeddings=64)),
}


@pytest.mark.parametrize("case", BUILT)
def test_built_checkpoint_matches_transformers(case, tmp_path):
    """Outside truth: transformers' logits on a checkpoint it built and saved with the switch set."""
    kind, kwargs = BUILT[case]
    ref = save_random(transformers, getattr(transformers, kind)(**kwargs), tmp_path)
    if case == "opt-projected-untied":
        assert not torch.equal(ref.lm_head.weight, ref.model.decoder.embed_tokens.weight)
    assert max_diff(tmp_path) < TOL
