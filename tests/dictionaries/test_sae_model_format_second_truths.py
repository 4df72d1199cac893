"""The sparse dictionary model and SAELens' directory layout, second pass, against outside truths.

Expected values come from outside the code under test: the forward pass written out in numpy (SAELens' JumpReLU
``ReLU(z) * (z > theta)``, the normalised SAE ``y = (f(s x) W_dec + b_dec) / s``), ``cfg.json`` read back with
``json`` and compared with the field names SAELens (3-5 and 6) reads, older SAELens files written by hand with
``safetensors`` + ``json``, and hand-chosen distinct values (scales, hooks, layers) that cannot be swapped unnoticed.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as np_load_file

from mechscope.core.dictionaries import DictionaryConfig, SparseDictionary, load_saelens, save_saelens
from mechscope.core.errors import MechscopeError

from .conftest import one_line_error
from .test_dictionaries_format_truths import np64, saelens_forward
from .test_saelens_format import weights, write_dir


def read_cfg(path) -> dict:
    return json.loads((path / "cfg.json").read_text())


# ---- folding ---------------------------------------------------------------------------------------------------


def test_folding_an_inference_batchtopk_keeps_its_threshold_rule():
    """Truth: numpy ``f = z * (z > theta)`` with ``z = (s x - b_dec) W_enc + b_enc`` (the BatchTopK inference rule,
    SAELens' JumpReLU with one threshold). The folded copy of an eval-mode model must stay at inference; a copy in
    training mode would keep the batch's top ``k * B`` instead, a different number of latents."""
    g = torch.Generator().manual_seed(11)
    cfg = DictionaryConfig(
        d_in=6, d_sae=10, architecture="batchtopk", k=3, normalize_activations="expected_average_only_in"
    )
    model = SparseDictionary(cfg, generator=g)
    with torch.no_grad():
        model.b_dec.normal_(0, 0.3, generator=g)
        model.b_enc.normal_(0, 0.2, generator=g)
        model.threshold.fill_(0.15)
        model.in_scale.fill_(2.0)
        model.out_scale.fill_(2.0)
    model.eval()
    x = torch.randn(16, 6, generator=g)
    w_enc, b_enc, b_dec = np64(model.W_enc), np64(model.b_enc), np64(model.b_dec)
    z = (2.0 * np64(x) - b_dec) @ w_enc + b_enc
    f = z * (z > 0.15)
    assert int((f > 0).sum()) != 3 * 16  # the case: the threshold rule and the batch top-k keep different sets
    folded = model.folded()
    assert not folded.training
    with torch.no_grad():
        np.testing.assert_allclose(np64(folded.encode(x)), f, rtol=1e-5, atol=1e-6)


def test_saved_directory_records_the_scales_it_folded_in(random_model, tmp_path):
    """Truth: hand-chosen scales s_in = 2.5, s_out = 0.4 (distinct, so a swap shows). The mechscope block records
    them, cfg.json says "none" (SAELens keeps no factor), and the stored W_enc and W_dec are s_in W_enc and
    W_dec / s_out, read back with safetensors.numpy."""
    model = random_model(normalize_activations="expected_average_only_in").eval()
    with torch.no_grad():
        model.in_scale.fill_(2.5)
        model.out_scale.fill_(0.4)
    save_saelens(model, tmp_path)
    cfg = read_cfg(tmp_path)
    assert cfg["normalize_activations"] == "none"
    block = cfg["mechscope"]
    assert block["folded_in_scale"] == 2.5 and block["folded_out_scale"] == 0.4
    assert block["normalize_activations"] == "expected_average_only_in"
    stored = np_load_file(str(tmp_path / "sae_weights.safetensors"))
    np.testing.assert_allclose(stored["W_enc"], 2.5 * np64(model.W_enc), rtol=1e-6)
    np.testing.assert_allclose(stored["W_dec"], np64(model.W_dec) / 0.4, rtol=1e-6)


# ---- cfg.json as SAELens reads it --------------------------------------------------------------------------------


@pytest.mark.parametrize("kw, fn", [(dict(architecture="topk", k=3), "topk"), (dict(architecture="relu"), "relu")])
def test_activation_function_is_written_under_both_saelens_spellings(kw, fn, random_model, tmp_path):
    """Truth: SAELens 6 reads ``activation_fn``, SAELens 3-5 read ``activation_fn_str``; both must name the
    activation (a TopK file without ``activation_fn_str: topk`` runs as a ReLU SAE in the older SAELens)."""
    save_saelens(random_model(**kw).eval(), tmp_path)
    cfg = read_cfg(tmp_path)
    assert cfg["activation_fn"] == fn and cfg["activation_fn_str"] == fn


def test_transcoder_hooks_are_written_flat_and_nested(random_model, tmp_path):
    """Truth: SAELens' transcoder fields (``hook_name``/``hook_layer`` for the input, ``hook_name_out``/
    ``hook_layer_out`` for the output), flat and under ``metadata`` as SAELens 6 nests them, with distinct hand
    values; ``prepend_bos`` defaults to true as in SAELens."""
    model = random_model(transcoder=True, d_out=4).eval()
    hooks = dict(hook_name="blocks.2.ln2.hook_normalized", hook_layer=2,
                 hook_name_out="blocks.2.hook_mlp_out", hook_layer_out=5)  # fmt: skip
    save_saelens(model, tmp_path, **hooks)
    cfg = read_cfg(tmp_path)
    for where in (cfg, cfg["metadata"]):
        assert {k: where[k] for k in hooks} == hooks
        assert where["prepend_bos"] is True
    assert cfg["d_out"] == 4 and cfg["d_in"] == 6 and cfg["architecture"] == "transcoder"
    meta = load_saelens(tmp_path).metadata
    assert {k: meta[k] for k in hooks} == hooks
    with pytest.raises(MechscopeError, match="cfg.json: a file; give the dictionary's folder, which holds cfg.json"):
        load_saelens(tmp_path / "cfg.json")  # was ".../cfg.json/cfg.json: not found"
    from mechscope.lm.pipelines.sae import sae_evaluate, sae_show

    cfg = tmp_path / "cfg.json"
    for call in (lambda: sae_evaluate("any", cfg), lambda: sae_show("any", cfg)):
        with pytest.raises(MechscopeError, match="cfg.json: a file; give the dictionary's folder"):
            call()  # the default output folder beside it was ".../cfg.json/evaluation: ... is not a directory"


# ---- files other tools wrote -----------------------------------------------------------------------------------


def test_older_saelens_head_index_is_renamed(tmp_path):
    """Truth: SAELens 3's ``hook_point_head_index`` is today's ``hook_head_index`` (written by hand here)."""
    cfg = {"d_in": 4, "d_sae": 8, "hook_point": "blocks.0.attn.hook_z", "hook_point_layer": 0,
           "hook_point_head_index": 3, "dtype": "float32"}  # fmt: skip
    meta = load_saelens(write_dir(tmp_path, cfg, weights())).metadata
    assert meta["hook_head_index"] == 3 and meta["hook_name"] == "blocks.0.attn.hook_z" and meta["hook_layer"] == 0


@pytest.mark.parametrize("d_in, factor, d_sae", [(8, 0.5, 4), (4, 2.5, 10), (4, 2, 8)])
def test_expansion_factor_gives_d_sae(d_in, factor, d_sae, tmp_path):
    """Truth: older SAELens files give ``d_sae = d_in * expansion_factor`` (hand products, one below 1)."""
    cfg = {"d_in": d_in, "expansion_factor": factor, "dtype": "float32"}
    model = load_saelens(write_dir(tmp_path, cfg, weights(d_in=d_in, d_sae=d_sae))).model
    assert model.cfg.d_sae == d_sae and tuple(model.W_enc.shape) == (d_in, d_sae)


def test_expansion_factor_giving_a_fraction_of_a_latent_is_refused(tmp_path):
    """Truth: 4 * 1.3 = 5.2 latents is no whole number of latents."""
    cfg = {"d_in": 4, "expansion_factor": 1.3, "dtype": "float32"}
    with pytest.raises(MechscopeError) as e:
        load_saelens(write_dir(tmp_path, cfg, weights(d_sae=5)))
    assert "expansion_factor" in one_line_error(e)


def test_older_boolean_normalisation_needs_and_uses_the_factor(tmp_path):
    """Truth: older SAELens wrote ``normalize_activations: true`` for a normalised SAE; its forward pass in numpy
    is ``y = (f(s x) W_dec + b_dec) / s`` with ``f = ReLU((s x - b_dec) W_enc + b_enc)`` (s = 0.5 by hand)."""
    cfg = {"d_in": 4, "d_sae": 8, "architecture": "standard", "dtype": "float32", "apply_b_dec_to_input": True,
           "normalize_activations": True}  # fmt: skip
    path = write_dir(tmp_path, cfg, weights())
    with pytest.raises(MechscopeError) as e:
        load_saelens(path)
    assert "norm_scaling_factor" in one_line_error(e)
    model = load_saelens(path, norm_scaling_factor=0.5).model
    x = torch.randn(12, 4, generator=torch.Generator().manual_seed(5)) * 3
    f, y = saelens_forward(path, 0.5 * np64(x))
    assert (f > 0).any() and (f == 0).any()
    with torch.no_grad():
        np.testing.assert_allclose(np64(model.encode(x)), f, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np64(model(x).output), y / 0.5, rtol=1e-5, atol=1e-4)


def test_missing_apply_b_dec_key_follows_saelens_defaults(tmp_path):
    """Truth: with no ``apply_b_dec_to_input`` key an SAE subtracts b_dec from its input (SAELens' default) and a
    transcoder cannot (its b_dec [d_out = 3] lives in output space, d_in = 4); numpy forward passes by hand."""
    sae = write_dir(tmp_path / "sae", {"d_in": 4, "d_sae": 8, "dtype": "float32"}, weights())
    tc_cfg = {"d_in": 4, "d_sae": 8, "d_out": 3, "architecture": "transcoder", "dtype": "float32"}
    tc = write_dir(tmp_path / "tc", tc_cfg, weights(d_out=3))
    x = torch.randn(10, 4, generator=torch.Generator().manual_seed(6))
    for path, sub in ((sae, True), (tc, False)):
        w = {k: v.astype(np.float64) for k, v in np_load_file(str(path / "sae_weights.safetensors")).items()}
        f = np.maximum(((np64(x) - w["b_dec"]) if sub else np64(x)) @ w["W_enc"] + w["b_enc"], 0)
        model = load_saelens(path).model
        assert model.cfg.apply_b_dec_to_input is sub
        with torch.no_grad():
            np.testing.assert_allclose(np64(model(x).output), f @ w["W_dec"] + w["b_dec"], rtol=1e-5, atol=1e-5)


def test_a_block_contradicting_saelens_architecture_is_refused(random_model, tmp_path):
    """Truth: SAELens runs what cfg.json's ``architecture`` says. A ReLU SAE's directory edited to say TopK (k = 2)
    would run as TopK in SAELens; reading it as the mechscope block's ReLU would disagree, so it is refused."""
    save_saelens(random_model().eval(), tmp_path)
    cfg = read_cfg(tmp_path)
    cfg |= {"architecture": "topk", "k": 2, "activation_fn": "topk", "activation_fn_str": "topk"}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(MechscopeError) as e:
        load_saelens(tmp_path)
    assert "architecture" in one_line_error(e)
