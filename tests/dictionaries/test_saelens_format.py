"""SAELens' directory layout: our round trip, hand-written SAELens directories, and every bad input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from mechscope.core.dictionaries import load_saelens, save_saelens
from mechscope.core.errors import MechscopeError

from .conftest import one_line_error

ROUND_TRIP = {
    "relu": dict(architecture="relu", l1_coefficient=3.0),
    "topk": dict(architecture="topk", k=3),
    "batchtopk": dict(architecture="batchtopk", k=3),
    "jumprelu": dict(architecture="jumprelu", bandwidth=0.05),
    "transcoder": dict(transcoder=True, d_out=4),
    "skip_transcoder": dict(transcoder=True, d_out=4, skip=True),
    "jumprelu_skip_transcoder": dict(architecture="jumprelu", transcoder=True, d_out=4, skip=True),
    "topk_transcoder": dict(architecture="topk", k=2, transcoder=True, d_out=4),
}


@pytest.mark.parametrize("name", list(ROUND_TRIP))
def test_save_then_load_is_bit_exact(name, random_model, tmp_path):
    model = random_model(**ROUND_TRIP[name]).eval()
    save_saelens(
        model, tmp_path, hook_name="blocks.3.hook_resid_post", hook_layer=3, model_name="toy", context_size=128
    )
    loaded, meta = load_saelens(tmp_path)
    assert loaded.cfg == model.cfg
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert meta["hook_name"] == "blocks.3.hook_resid_post" and meta["hook_layer"] == 3 and meta["context_size"] == 128
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    for key in (
        "d_in",
        "d_sae",
        "architecture",
        "hook_name",
        "hook_layer",
        "dtype",
        "device",
        "normalize_activations",
        "apply_b_dec_to_input",
        "model_name",
        "context_size",
        "prepend_bos",
        "dataset_path",
    ):
        assert key in cfg, key
    names = set(load_file(str(tmp_path / "sae_weights.safetensors")))
    assert {"W_enc", "b_enc", "W_dec", "b_dec"} <= names
    assert ("threshold" in names) == model.cfg.uses_threshold and ("W_skip" in names) == model.cfg.skip
    if model.cfg.architecture == "topk":
        assert cfg["k"] == model.cfg.k
    x = torch.randn(9, 6)
    assert torch.equal(model(x).output, loaded(x).output)


def test_normalisation_is_folded_into_the_saved_weights(random_model, tmp_path):
    model = random_model(architecture="jumprelu", normalize_activations="expected_average_only_in").eval()
    with torch.no_grad():
        model.in_scale.fill_(2.5)
        model.out_scale.fill_(2.5)
    save_saelens(model, tmp_path)
    loaded = load_saelens(tmp_path).model
    assert json.loads((tmp_path / "cfg.json").read_text())["normalize_activations"] == "none"
    folded = model.folded()
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in folded.state_dict().items())
    x = torch.randn(20, 6)
    torch.testing.assert_close(loaded(x).output, model(x).output, rtol=1e-5, atol=1e-5)


def write_dir(path, cfg: dict, tensors: dict):
    path.mkdir(parents=True, exist_ok=True)
    (path / "cfg.json").write_text(json.dumps(cfg))
    save_file(tensors, str(path / "sae_weights.safetensors"))
    return path


def weights(d_in=4, d_sae=8, d_out=None, **extra):
    g = torch.Generator().manual_seed(0)
    d_out = d_out or d_in
    out = {
        "W_enc": torch.randn(d_in, d_sae, generator=g),
        "b_enc": torch.randn(d_sae, generator=g),
        "W_dec": torch.randn(d_sae, d_out, generator=g),
        "b_dec": torch.randn(d_out, generator=g),
    }
    return out | extra


def test_a_saelens_6_directory_loads(tmp_path):
    # as SAELens 6 writes it: flat settings, hook and model under "metadata"
    cfg = {
        "d_in": 4,
        "d_sae": 8,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": "6.54.12",
            "model_name": "gpt2",
            "hook_name": "blocks.0.hook_resid_pre",
            "context_size": 128,
            "prepend_bos": True,
            "dataset_path": "x/y",
        },
        "architecture": "standard",
    }
    w = weights()
    model, meta = load_saelens(write_dir(tmp_path, cfg, w))
    assert model.cfg.architecture == "relu" and meta["hook_name"] == "blocks.0.hook_resid_pre"
    x = torch.randn(5, 4)
    want = ((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]).relu() @ w["W_dec"] + w["b_dec"]
    torch.testing.assert_close(model(x).output, want)
    topk = {k: v for k, v in cfg.items() if k != "architecture"} | {
        "architecture": "topk",
        "k": 2,
        "rescale_acts_by_decoder_norm": False,
    }
    model, _ = load_saelens(write_dir(tmp_path / "topk", topk, w))
    assert model.cfg.architecture == "topk" and model.cfg.k == 2


def test_older_saelens_key_spellings_load(tmp_path):
    cfg = {
        "d_in": 4,
        "expansion_factor": 2,
        "hook_point": "blocks.1.hook_resid_pre",
        "hook_point_layer": 1,
        "activation_fn_str": "relu",
        "normalize_activations": False,
        "dtype": "torch.float32",
        "model_name": "gelu-1l",
        "context_size": 64,
        "apply_b_dec_to_input": True,
    }
    model, meta = load_saelens(write_dir(tmp_path / "a", cfg, weights(scaling_factor=torch.ones(8))))
    assert model.cfg.d_sae == 8 and meta["hook_name"] == "blocks.1.hook_resid_pre" and meta["hook_layer"] == 1
    old_topk = {
        "d_in": 4,
        "d_sae": 8,
        "architecture": "standard",
        "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": 2},
        "dtype": "float32",
        "hook_name": "h",
    }
    model, _ = load_saelens(write_dir(tmp_path / "b", old_topk, weights()))
    assert model.cfg.architecture == "topk" and model.cfg.k == 2
    assert int((model.encode(torch.randn(6, 4)) > 0).sum(-1).max()) <= 2
    jump = {"d_in": 4, "d_sae": 8, "architecture": "jumprelu", "dtype": "float32", "apply_b_dec_to_input": False}
    model, _ = load_saelens(write_dir(tmp_path / "c", jump, weights(log_threshold=torch.zeros(8))))
    assert torch.equal(model.threshold.detach(), torch.ones(8))
    skip = {
        "d_in": 4,
        "d_sae": 8,
        "d_out": 3,
        "architecture": "skip_transcoder",
        "dtype": "float32",
        "apply_b_dec_to_input": False,
        "hook_name": "blocks.0.ln2.hook_normalized",
        "hook_name_out": "blocks.0.hook_mlp_out",
    }
    model, meta = load_saelens(write_dir(tmp_path / "d", skip, weights(d_out=3, W_skip=torch.randn(3, 4))))
    assert model.cfg.transcoder and model.cfg.skip and meta["hook_name_out"] == "blocks.0.hook_mlp_out"


def test_expected_average_only_in_needs_the_factor(tmp_path):
    cfg = {
        "d_in": 4,
        "d_sae": 8,
        "architecture": "standard",
        "dtype": "float32",
        "normalize_activations": "expected_average_only_in",
    }
    path = write_dir(tmp_path, cfg, weights())
    with pytest.raises(MechscopeError) as e:
        load_saelens(path)
    assert "norm_scaling_factor" in one_line_error(e)
    model = load_saelens(path, norm_scaling_factor=3.0).model
    x = torch.randn(5, 4)
    torch.testing.assert_close(model(x).output, model.folded()(x).output, rtol=1e-5, atol=1e-5)


def test_a_factor_for_a_file_without_normalisation_is_refused(tmp_path):
    """A file that says normalize_activations none holds its normalisation in the weights (save_saelens folds it):
    a factor given with it would be silently ignored, so it is refused; the same file loads without one."""
    cfg = {"d_in": 4, "d_sae": 8, "architecture": "standard", "dtype": "float32", "normalize_activations": "none"}
    path = write_dir(tmp_path, cfg, weights())
    with pytest.raises(MechscopeError) as e:
        load_saelens(path, norm_scaling_factor=2.0)
    assert "takes no norm_scaling_factor" in one_line_error(e)
    assert load_saelens(path).model.cfg.normalize_activations == "none"


def bad_cases():
    base = {"d_in": 4, "d_sae": 8, "architecture": "standard", "dtype": "float32"}
    w = weights()
    yield "corrupt json", "{not json", w, "JSON"
    yield "json list", "[1, 2]", w, "JSON object"
    yield "gated", base | {"architecture": "gated"}, w, "gated"
    yield "layer norm", base | {"normalize_activations": "layer_norm"}, w, "layer_norm"
    yield "no d_sae", {k: v for k, v in base.items() if k != "d_sae"}, w, "expansion_factor"
    yield "bad d_in", base | {"d_in": -4}, w, "d_in"
    yield "string d_in", base | {"d_in": "4"}, w, "d_in"
    yield "topk without k", base | {"architecture": "topk"}, w, "expected k (active latents"
    yield "k > d_sae", base | {"architecture": "topk", "k": 9}, w, "k <= d_sae"
    yield "other activation", base | {"activation_fn_str": "tanh-relu"}, w, "tanh-relu"
    yield "bad dtype name", base | {"dtype": "int8"}, w, "dtype"
    yield "bool apply", base | {"apply_b_dec_to_input": "yes"}, w, "apply_b_dec_to_input"
    yield "missing tensor", base, {k: v for k, v in w.items() if k != "b_enc"}, "b_enc"
    yield "missing threshold", base | {"architecture": "jumprelu"}, w, "threshold"
    yield "extra tensor", base, w | {"W_gate": torch.zeros(2)}, "W_gate"
    yield "shape mismatch", base | {"d_in": 5}, w, "shape"
    yield "d_sae mismatch", base | {"d_sae": 9}, w, "shape"
    yield "non-finite", base, w | {"W_dec": torch.full((8, 4), float("inf"))}, "NaN or infinite"
    yield "wrong dtype", base, w | {"W_enc": w["W_enc"].half()}, "float16"
    yield "integer tensor", base, w | {"b_enc": torch.zeros(8, dtype=torch.int32)}, "int32"
    yield "dtype says float16", base | {"dtype": "float16"}, w, "float32"
    yield "finetuning scale", base, w | {"scaling_factor": torch.full((8,), 2.0)}, "scaling_factor"
    yield "transcoder without d_out", base | {"architecture": "transcoder"}, w, "d_out"
    topk = base | {"architecture": "topk", "k": 3}
    yield "architecture a list", base | {"architecture": ["topk"]}, w, "expected architecture to be a string"
    yield "k disagrees", topk | {"activation_fn_kwargs": {"k": 2}}, w, "k is 3 but activation_fn_kwargs.k is 2"
    meta = {"metadata": {"hook_point": "blocks.2.hook_resid_pre"}}
    yield "metadata disagrees", base | {"hook_name": "blocks.1.hook_resid_pre"} | meta, w, "but metadata.hook_point"
    yield "metadata a list", base | {"metadata": [{"hook_name": "blocks.1.hook_resid_pre"}]}, w, "metadata to be"
    yield "kwargs a list", topk | {"activation_fn_kwargs": [2]}, w, "activation_fn_kwargs to be a JSON object"


@pytest.mark.parametrize("name, cfg, tensors, expected", list(bad_cases()), ids=[c[0] for c in bad_cases()])
def test_bad_directories_are_one_line_errors(name, cfg, tensors, expected, tmp_path):
    tmp_path.joinpath("cfg.json").write_text(cfg if isinstance(cfg, str) else json.dumps(cfg))
    save_file(tensors, str(tmp_path / "sae_weights.safetensors"))
    with pytest.raises(MechscopeError) as e:
        load_saelens(tmp_path)
    assert expected in one_line_error(e)


def test_missing_and_corrupt_files_are_one_line_errors(tmp_path, random_model):
    with pytest.raises(MechscopeError) as e:
        load_saelens(tmp_path / "absent")
    one_line_error(e)
    save_saelens(random_model(), tmp_path)
    (tmp_path / "sae_weights.safetensors").write_bytes(b"\x00" * 40)
    with pytest.raises(MechscopeError) as e:
        load_saelens(tmp_path)
    assert "safetensors" in one_line_error(e)
    (tmp_path / "sae_weights.safetensors").unlink()
    with pytest.raises(MechscopeError) as e:
        load_saelens(tmp_path)
    assert "not found" in one_line_error(e)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    cfg["mechscope"]["config"]["d_sae"] = 11
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    save_saelens(random_model(), tmp_path / "again")
    (tmp_path / "again" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(MechscopeError) as e:
        load_saelens(tmp_path / "again")
    assert "mechscope block" in one_line_error(e)
