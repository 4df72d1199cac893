"""The dictionary models: the formulas by hand, identity reproductions, folding, and bad settings."""

from __future__ import annotations

import pytest
import torch

from mechscope.core.dictionaries import DictionaryConfig, SparseDictionary
from mechscope.core.dictionaries.activations import batch_topk, jumprelu, step
from mechscope.core.errors import MechscopeError

from .conftest import one_line_error


def test_identity_sae_reproduces_non_negative_input_exactly():
    d = 8
    model = SparseDictionary(DictionaryConfig(d_in=d, d_sae=d, architecture="relu", apply_b_dec_to_input=False))
    with torch.no_grad():
        model.W_enc.copy_(torch.eye(d))
        model.W_dec.copy_(torch.eye(d))
        model.b_enc.zero_()
        model.b_dec.zero_()
    x = torch.rand(50, d, generator=torch.Generator().manual_seed(0))
    out, f = model(x)
    assert torch.equal(out, x) and torch.equal(f, x)


@pytest.mark.parametrize("arch", ["relu", "topk", "batchtopk", "jumprelu"])
def test_forward_matches_the_formula(arch, random_model):
    model = random_model(architecture=arch, k=3).eval()
    x = torch.randn(20, 6, generator=torch.Generator().manual_seed(1))
    z = (x - model.b_dec) @ model.W_enc + model.b_enc
    if arch == "relu":
        f = z.relu()
    elif arch == "topk":
        kth = z.topk(3, dim=1).values[:, -1:]
        f = torch.where(z >= kth, z, torch.zeros_like(z)).relu()
    else:  # jumprelu, and batchtopk at inference: a threshold per latent
        f = torch.where(z > model.threshold, z, torch.zeros_like(z))
    y = f @ model.W_dec + model.b_dec
    out, latents = model(x)
    torch.testing.assert_close(latents, f)
    torch.testing.assert_close(out, y)
    torch.testing.assert_close(model.decode(model.encode(x)), y)


def test_leading_dimensions_are_kept(random_model):
    model = random_model(architecture="topk", k=2)
    out, f = model(torch.randn(2, 3, 6))
    assert out.shape == (2, 3, 6) and f.shape == (2, 3, 10)


def test_skip_transcoder_formula(random_model):
    model = random_model(transcoder=True, d_out=4, skip=True)
    with torch.no_grad():
        model.W_skip.copy_(torch.randn(4, 6, generator=torch.Generator().manual_seed(5)))
    x = torch.randn(7, 6)
    f = (x @ model.W_enc + model.b_enc).relu()
    out, latents = model(x)
    torch.testing.assert_close(out, f @ model.W_dec + model.b_dec + x @ model.W_skip.T)
    torch.testing.assert_close(model.decode(latents, x), out)


@pytest.mark.parametrize("kw", [dict(architecture="jumprelu"), dict(transcoder=True, d_out=5, skip=True)])
def test_folding_the_normalisation_keeps_outputs_and_latents(kw, random_model):
    model = random_model(normalize_activations="expected_average_only_in", **kw).eval()
    with torch.no_grad():
        model.in_scale.fill_(3.5)
        model.out_scale.fill_(3.5 if not model.cfg.transcoder else 0.25)
    x = torch.randn(30, 6, dtype=torch.float32) * 0.3
    folded = model.folded()
    assert folded.cfg.normalize_activations == "none"
    (out_a, f_a), (out_b, f_b) = model(x), folded(x)
    torch.testing.assert_close(f_a, f_b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_a, out_b, rtol=1e-5, atol=1e-5)


def test_decoder_norm_constraint():
    model = SparseDictionary(DictionaryConfig(d_in=5, d_sae=7), generator=torch.Generator().manual_seed(0))
    model.W_dec.grad = torch.randn(7, 5)
    model.remove_parallel_decoder_grad()
    assert (model.W_dec.grad * model.W_dec).sum(1).abs().max() < 1e-6
    with torch.no_grad():
        model.W_dec.mul_(3)
    model.set_decoder_unit_norm()
    torch.testing.assert_close(model.W_dec.norm(dim=1), torch.ones(7))


def test_batch_topk_keeps_k_per_token_on_average():
    pre = torch.randn(16, 40, generator=torch.Generator().manual_seed(0))
    f = batch_topk(pre, 3)
    assert int((f > 0).sum()) == 48
    assert f[f > 0].min() >= pre.relu().flatten().topk(48).values.min()


def test_jumprelu_pseudo_derivatives_match_the_paper():
    z = torch.tensor([[0.10, 0.52, 0.95]])
    theta = torch.tensor([0.5, 0.5, 0.5], requires_grad=True)
    eps = 0.1
    jumprelu(z, theta, eps).sum().backward()
    # d/dtheta = -(theta/eps) K((z - theta)/eps): only 0.52 lies within eps/2 of theta
    torch.testing.assert_close(theta.grad, torch.tensor([0.0, -5.0, 0.0]))
    theta.grad = None
    step(z, theta, eps).sum().backward()
    torch.testing.assert_close(theta.grad, torch.tensor([0.0, -10.0, 0.0]))


@pytest.mark.parametrize(
    "kw, expected",
    [
        (dict(architecture="topk", k=11), "k <= d_sae"),
        (dict(architecture="topk"), "expected k"),
        (dict(l1_coefficient=-1.0), "l1_coefficient"),
        (dict(l1_coefficient=float("nan")), "l1_coefficient"),
        (dict(d_sae=0), "d_sae"),
        (dict(architecture="gated"), "architecture"),
        (dict(skip=True), "transcoder"),
        (dict(transcoder=True, apply_b_dec_to_input=True), "apply_b_dec_to_input"),
        (dict(d_out=3), "d_out"),
        (dict(normalize_activations="layer_norm"), "normalize_activations"),
        (dict(architecture="jumprelu", bandwidth=0.0), "bandwidth"),
    ],
)
def test_bad_settings_are_one_line_errors(kw, expected):
    with pytest.raises(MechscopeError) as e:
        DictionaryConfig(**({"d_in": 6, "d_sae": 10} | kw))
    assert expected in one_line_error(e)


def test_input_of_the_wrong_width_is_refused(random_model):
    model = random_model()
    with pytest.raises(MechscopeError) as e:
        model(torch.randn(4, 7))
    assert "6" in one_line_error(e)
