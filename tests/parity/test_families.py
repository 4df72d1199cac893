"""Every family against transformers on a tiny random checkpoint with its variant switches set.

For each: logits within 1e-4 in float32; greedy generation of 20 tokens identical; in bfloat16,
our error against transformers' float32 logits within the error transformers' own bfloat16
path has (measured here, on the same tokens); every switch the family sets changes the logits
(so the parity above would catch a switch ignored); hook points on the explicit attention path.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mechscope.core.hooks import attached_hooks, run_with_cache  # noqa: E402
from mechscope.lm.models.loading import load_model  # noqa: E402
from mechscope.lm.models.transformer import HookedTransformer, attention_mask  # noqa: E402
from tests.parity.families import configs, tokens  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
warnings.filterwarnings("ignore", module="transformers")
transformers.logging.set_verbosity_error()

FAMILIES = list(configs(transformers))
# the switches that go together (a sliding window needs its layers)
PAIRED = {"sliding_window_layers": "sliding_window"}


@pytest.fixture(params=FAMILIES)
def family(request, tiny_family):
    ref, path = tiny_family(request.param)
    return request.param, ref, path


def test_logits_float32(family):
    _, ref, path = family
    model, _ = load_model(path, device="cpu", dtype="float32")
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x).logits, rtol=1e-4, atol=1e-4)


def test_greedy_generation(family):
    _, ref, path = family
    model, _ = load_model(path, device="cpu")
    x = tokens(1, 6, seed=3)
    ours = model.generate(x, 20, stop_at_eos=False)
    theirs = ref.generate(x, max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert ours.shape == (1, 26) and torch.equal(ours, theirs)


def test_bfloat16_within_transformers_own_error(family):
    """Our bf16 error against fp32 is no worse than transformers' bf16 error (max 1.5x, mean 1.1x)."""
    _, ref, path = family
    model, _ = load_model(path, device="cpu", dtype="bfloat16")
    assert model.W_E.dtype == torch.bfloat16
    x = tokens(4, seed=1)
    with torch.no_grad():
        exact = ref(x).logits
        theirs = (copy.deepcopy(ref).to(torch.bfloat16)(x).logits.float() - exact).abs()
        ours = (model(x).float() - exact).abs()
    assert ours.max() <= 1.5 * theirs.max(), (ours.max(), theirs.max())
    assert ours.mean() <= 1.1 * theirs.mean(), (ours.mean(), theirs.mean())


def _without(model: HookedTransformer, switch: str) -> HookedTransformer:
    """The same weights with one switch (and its partner) back at its default."""
    cfg = model.cfg
    default = {f.name: f.default for f in dataclasses.fields(cfg)}
    changes = {switch: default[switch]}
    for a, b in PAIRED.items():
        if switch in (a, b):
            changes.update({a: default[a], b: default[b]})
    other = HookedTransformer(dataclasses.replace(cfg, **changes))
    theirs = other.state_dict()
    same = {k: v for k, v in model.state_dict().items() if k in theirs and v.shape == theirs[k].shape}
    other.load_state_dict(same, strict=False)
    return other.eval()


def test_every_switch_matters(family):
    """Each switch the converter sets moves the logits by far more than the parity tolerance."""
    name, _, path = family
    model, _ = load_model(path, device="cpu")
    switches = [v.split("=")[0] for v in model.cfg.variants()]
    switches = [s for s in switches if s != "attn_scores_float32"]  # a no-op in float32 (checked in bf16)
    assert switches or name in ("opt", "llama-biases"), "a tiny checkpoint should set its family's switches"
    x = tokens()
    with torch.no_grad():
        base = model(x)
        for switch in switches:
            moved = (_without(model, switch)(x) - base).abs().max().item()
            assert moved > 1e-3, f"{name}: turning {switch} off moves the logits by only {moved:.1e}"


def test_hooks_on_the_explicit_path(family):
    """Hooked attention (explicit path) gives the fused path's logits; patterns respect windows."""
    _, _, path = family
    model, _ = load_model(path, device="cpu")
    x = tokens()
    names = [f"blocks.{i}.attn.hook_pattern" for i in range(model.cfg.n_layers)]
    with torch.no_grad():
        plain = model(x)
        logits, cache = run_with_cache(model, x, names=names + ["blocks.0.attn.hook_z"])
    torch.testing.assert_close(logits, plain, rtol=1e-5, atol=1e-5)
    for i, name in enumerate(names):
        pattern = cache[name]  # [B,H,P,K]
        torch.testing.assert_close(pattern.sum(-1), torch.ones(pattern.shape[:-1]))
        seen = attention_mask(x.shape[1], model.blocks[i].attn.window, "cpu")
        assert pattern[..., ~seen].abs().max() == 0  # nothing outside the causal (and sliding) window
    assert cache["blocks.0.attn.hook_z"].shape == (2, x.shape[1], model.cfg.n_heads, model.cfg.d_head)
    assert attached_hooks(model) == []
