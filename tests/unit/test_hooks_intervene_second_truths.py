"""Second pass over hooks and interventions, each checked against an outside truth.

The transformer's hook points are read against a GPT-2 forward written out in numpy (a loop over heads, float64,
every weight and bias random so that a dropped bias or a swapped tensor shows); the intervention helpers against
plain loops of masked forwards and numpy read-outs.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from mechscope.core import intervene as ivn
from mechscope.core.errors import HookError, MechscopeError
from mechscope.core.hooks import HookPoint, describe_names, hooks, run_with_cache
from mechscope.lm.models.transformer import HookedTransformer, TransformerConfig
from tests.unit.test_attribution_graph_lm import tiny
from tests.unit.test_core_plumbing_truths import B2, W2, Tiny, by_hand, no_hooks_left, xt

H, DH, D, M, V, CTX = 2, 4, 16, 24, 11, 8
TOL = 1e-6  # hooking the pattern takes the explicit path, whose softmax runs in float32 even for float64
TOKENS = torch.tensor([[3, 7, 1, 9, 0, 5], [10, 2, 2, 6, 4, 8]])


@pytest.fixture(scope="module")
def gpt():
    """A 2-layer GPT-2-style model in float64 with every parameter random (gains near one, biases non-zero)."""
    cfg = TransformerConfig(d_model=D, n_layers=2, n_heads=H, d_head=DH, d_vocab=V, n_ctx=CTX, d_mlp=M)
    model = HookedTransformer(cfg).double().eval()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float64)
            p.copy_(1.0 + 0.2 * noise if name.endswith(".w") else 0.4 * noise)
    return model


def params(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def ln(x, w, b, eps=1e-5):
    """LayerNorm by its formula; returns (normalised, scaled)."""
    c = x - x.mean(-1, keepdims=True)
    n = c / np.sqrt((c**2).mean(-1, keepdims=True) + eps)
    return n, n * w + b


def gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def np_gpt2(p, tokens, edits=None):
    """GPT-2 by hand in numpy, one head at a time; ``edits`` {hook name: fn(array) -> array} mimics forward hooks.
    Returns the activations by mechscope's hook names (TransformerLens' layout) and the logits."""
    edits, acts = edits or {}, {}

    def put(name, a):
        acts[name] = edits.get(name, lambda t: t)(a)
        return acts[name]

    tok = tokens.numpy()
    b, n = tok.shape
    x = put("hook_embed", p["W_E"][tok]) + put("hook_pos_embed", np.broadcast_to(p["W_pos"][:n], (b, n, D)))
    for layer in range(2):
        pre = f"blocks.{layer}."
        x = put(pre + "hook_resid_pre", x)
        norm, h = ln(x, p[pre + "ln1.w"], p[pre + "ln1.b"])
        put(pre + "ln1.hook_normalized", norm)
        qkv = {c: (h @ p[f"{pre}attn.{c}.weight"].T + p[f"{pre}attn.{c}.bias"]).reshape(b, n, H, DH) for c in "qkv"}
        q, k, v = (put(f"{pre}attn.hook_{c}", qkv[c]) for c in "qkv")
        scores = np.full((b, H, n, n), -np.inf)
        z = np.zeros((b, n, H, DH))
        for hd in range(H):
            for i in range(n):
                scores[:, hd, i, : i + 1] = (q[:, i, hd, None, :] * k[:, : i + 1, hd, :]).sum(-1) / math.sqrt(DH)
        scores = put(pre + "attn.hook_attn_scores", scores)
        e = np.exp(scores - scores.max(-1, keepdims=True))
        pattern = put(pre + "attn.hook_pattern", e / e.sum(-1, keepdims=True))
        for hd in range(H):
            z[:, :, hd] = pattern[:, hd] @ v[:, :, hd]
        z = put(pre + "attn.hook_z", z)
        w_o = p[pre + "attn.o.weight"]  # [D, H*DH]
        result = np.stack([z[:, :, hd] @ w_o[:, hd * DH : (hd + 1) * DH].T for hd in range(H)], 2)
        result = put(pre + "attn.hook_result", result)
        attn_out = put(pre + "hook_attn_out", result.sum(2) + p[pre + "attn.o.bias"])
        x = put(pre + "hook_resid_mid", x + attn_out)
        norm, h = ln(put(pre + "hook_mlp_in", x), p[pre + "ln2.w"], p[pre + "ln2.b"])
        put(pre + "ln2.hook_normalized", norm)
        h = put(pre + "mlp.hook_in", h)
        hid = put(pre + "mlp.hook_pre", h @ p[pre + "mlp.up.weight"].T + p[pre + "mlp.up.bias"])
        post = put(pre + "mlp.hook_post", gelu_tanh(hid))
        mlp_out = put(pre + "hook_mlp_out", post @ p[pre + "mlp.down.weight"].T + p[pre + "mlp.down.bias"])
        x = put(pre + "hook_resid_post", x + mlp_out)
    norm, h = ln(x, p["ln_final.w"], p["ln_final.b"])
    put("ln_final.hook_normalized", norm)
    return acts, h @ p["W_E"].T


# ---- transformer hook points ------------------------------------------------------------------------------------


def test_every_gpt2_hook_point_sees_the_numpy_tensor_of_its_name(gpt):
    """Truth: a numpy GPT-2 forward (per-head loop, LayerNorm by formula, tanh-GELU); scores are masked with -inf
    above the diagonal before the hook, as TransformerLens' hook_attn_scores are."""
    truth, logits = np_gpt2(params(gpt), TOKENS)
    names = [n for n in truth if not n.startswith("blocks.0.")]  # layer 1 only: layer indices cannot hide
    names += ["blocks.0.attn.hook_z"]
    out, cache = run_with_cache(gpt, TOKENS, names=names)
    assert set(cache) == set(names)
    for name in names:
        got, want = cache[name].numpy(), truth[name]
        assert got.shape == want.shape, name
        finite = np.isfinite(want)
        assert np.array_equal(np.isfinite(got), finite), name
        np.testing.assert_allclose(got[finite], want[finite], rtol=TOL, atol=TOL, err_msg=name)
    np.testing.assert_allclose(out.numpy(), logits, rtol=TOL, atol=TOL)
    assert no_hooks_left(gpt)


def test_hooking_every_point_leaves_the_logits_as_numpys(gpt):
    """Truth: the numpy logits. Hooking a norm, the pattern or the per-head result switches to explicit code paths
    (LayerNorm by formula, attention by matmul, per-head output plus bias) which must compute the same function."""
    _, logits = np_gpt2(params(gpt), TOKENS)
    names = ["ln_final.hook_normalized"]
    for layer in range(2):
        names += [f"blocks.{layer}.{n}" for n in ("ln1.hook_normalized", "ln2.hook_normalized")]
        names += [f"blocks.{layer}.attn.{n}" for n in ("hook_attn_scores", "hook_pattern", "hook_result")]
    with torch.no_grad(), hooks(gpt, fwd=[(n, lambda a, h: None) for n in names]):
        out = gpt(TOKENS)
    np.testing.assert_allclose(out.numpy(), logits, rtol=TOL, atol=TOL)


def _zero_head(hd):
    def edit(a):
        a = a.copy()
        a[:, :, hd] = 0
        return a

    return edit


@pytest.mark.parametrize("point", ["hook_z", "hook_result"])
def test_an_edit_at_z_or_result_reaches_the_logits(gpt, point):
    """Truth: the numpy forward with head 1 of layer 0 zeroed at the same tensor (z, or its per-head output)."""
    name = f"blocks.0.attn.{point}"
    _, want = np_gpt2(params(gpt), TOKENS, {name: _zero_head(1)})
    _, plain = np_gpt2(params(gpt), TOKENS)
    assert np.abs(want - plain).max() > 1e-3  # the edit matters

    def hook(a, h):
        a = a.clone()
        a[:, :, 1] = 0
        return a

    with torch.no_grad(), hooks(gpt, fwd=[(name, hook)]):
        out = gpt(TOKENS)
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-9, atol=1e-9)


def test_the_first_silent_name_asked_is_the_one_reported(gpt):
    """Truth: learned positions never call the rotary hook points; the error names the first of the asked names
    that did not fire, in the order asked."""
    asked = ["blocks.0.attn.hook_z", "blocks.1.attn.hook_rot_k", "blocks.0.attn.hook_rot_q"]
    with pytest.raises(HookError, match=r"'blocks\.1\.attn\.hook_rot_k' does not fire"):
        run_with_cache(gpt, TOKENS, names=asked)
    assert no_hooks_left(gpt)


# ---- hooks ------------------------------------------------------------------------------------------------------


def test_two_forward_hooks_on_one_point_compose_in_the_order_given():
    """Truth: hand arithmetic, (a + 1) * 2 for [add one, double] and a * 2 + 1 for the reverse, on numpy's ReLU."""
    tiny = Tiny().eval()
    act = by_hand()[1]

    def add(a, h):
        return a + 1

    def dbl(a, h):
        return a * 2

    for fns, want in (((add, dbl), (act + 1) * 2), ((dbl, add), act * 2 + 1)):
        with torch.no_grad(), hooks(tiny, fwd=[("hook_act", f) for f in fns]):
            out = tiny(xt())
        np.testing.assert_allclose(out.numpy(), want @ W2.T + B2, rtol=1e-12)
    assert no_hooks_left(tiny)


def test_backward_hooks_are_removed_and_the_gradient_is_numpys():
    """Truth: d(sum of outputs)/d(act) = column sums of W2 for every input; no hook of any kind is left."""
    tiny = Tiny().eval()
    seen = []
    with hooks(tiny, bwd=[("hook_act", lambda g, h: seen.append(g.clone()))]):
        tiny(xt().requires_grad_()).sum().backward()
    np.testing.assert_allclose(seen[0].numpy(), np.tile(W2.sum(0), (4, 1)), rtol=1e-12)
    assert no_hooks_left(tiny)


def test_describe_names_keeps_first_seen_order_and_a_single_layer_plain():
    """Truth: the documented form blocks.{lo..hi}.x, groups in the order they first appear, one layer written bare."""
    names = ["hook_embed", "blocks.0.mlp.hook_post", "blocks.2.attn.hook_z", "blocks.1.mlp.hook_post", "ln_final.x"]
    assert describe_names(names) == "hook_embed, blocks.{0..1}.mlp.hook_post, blocks.2.attn.hook_z, ln_final.x"


# ---- interventions ----------------------------------------------------------------------------------------------


def test_unit_masks_follow_the_flattened_c_y_x_order():
    """Truth: numpy's unravel_index (C order) of each mask's index."""
    masks = ivn.unit_masks((2, 3, 2))
    assert masks.shape == (12, 2, 3, 2)
    for i in range(12):
        assert masks[i].nonzero().flatten().tolist() == list(np.unravel_index(i, (2, 3, 2)))


def test_a_channel_equal_to_the_count_is_refused():
    """Truth: channels of a 3-channel layer are 0, 1, 2: 3 is out of range."""
    with pytest.raises(MechscopeError, match="channel 3 out of range"):
        ivn.channel_masks((3, 2), [3])


def test_ablate_defaults_to_mean_ablation():
    """Truth: the numpy forward with hidden unit 2 set to a hand-chosen mean (the docstring's default kind)."""
    mean = torch.tensor([0.25, -0.75, 1.5], dtype=torch.float64)
    out = ivn.ablate(Tiny().eval(), xt(), "hook_act", ivn.channel_masks((3,), [2]), mean=mean)[0]
    want = by_hand(edit=lambda a: np.concatenate([a[:, :2], np.full((4, 1), 1.5)], 1))[2]
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-12)


def test_class_accuracy_defaults_to_ten_classes():
    """Truth: the docstring's n_classes=10 default: one column per class 0..9."""
    labels = torch.tensor([1, 3, 3])
    acc = ivn.class_accuracy(labels)(torch.eye(10)[[1, 3, 0]][None].double())
    assert acc.shape == (1, 10)
    assert acc[0, 1].item() == 1.0 and acc[0, 3].item() == 0.5


class BNNet(nn.Module):
    """x [B, 3] -> BatchNorm1d -> hook_bn -> linear: BatchNorm in train mode updates its running statistics."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.bn, self.hook_bn, self.lin = nn.BatchNorm1d(3).double(), HookPoint(), nn.Linear(3, 2).double()

    def forward(self, x):
        return self.lin(self.hook_bn(self.bn(x)))


def test_intervene_on_a_training_model_leaves_its_batchnorm_statistics_alone():
    """Truth: BatchNorm's running mean starts at zero and only a train-mode forward moves it; the result is a plain
    eval-mode forward with unit 0 zeroed by hand, and the model is back in train mode after."""
    net = BNNet().train()
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, -5.0, 6.0], [0.5, 0.0, -1.0]], dtype=torch.float64)
    out = ivn.intervene(net, x, "hook_bn", ivn.channel_masks((3,), [0]), 0.0)[0]
    assert net.training and torch.equal(net.bn.running_mean, torch.zeros(3))
    with torch.no_grad():
        h = (x / math.sqrt(1 + 1e-5)).numpy()  # eval BatchNorm with running mean 0, var 1, gain 1, bias 0
    h[:, 0] = 0
    want = h @ net.lin.weight.detach().numpy().T + net.lin.bias.detach().numpy()
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-12)


def test_readout_with_group_masks_is_a_loop_of_numpy_readouts():
    """Truth: for each mask, numpy's (a with the masked units set to r) @ Wᵀ + b, r a per-unit reference."""
    g = np.random.default_rng(3)
    acts, w, b, ref = g.normal(size=(5, 6)), g.normal(size=(4, 6)), g.normal(size=4), g.normal(size=6)
    masks = np.array([[1, 0, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0], [0, 1, 1, 1, 0, 1]], dtype=bool)
    got = ivn.readout_intervene(*map(torch.from_numpy, (w, b, acts, masks, ref))).numpy()
    for i, m in enumerate(masks):
        a = np.where(m, ref, acts)
        np.testing.assert_allclose(got[i], a @ w.T + b, rtol=1e-12, atol=1e-12)


def test_channel_contributions_with_a_bias_rebuild_the_kept_logits():
    """Truth: numpy's read-out of acts with every channel outside S replaced by the reference, bias included."""
    g = np.random.default_rng(4)
    acts, ref = g.normal(size=(3, 4, 2)), g.normal(size=(4, 2))
    w, b = g.normal(size=(5, 8)), g.normal(size=5)
    base, contrib = ivn.readout_channel_contributions(*map(torch.from_numpy, (w, acts, ref, b)))
    keep = [0, 3]
    kept = np.where(np.isin(np.arange(4), keep)[None, :, None], acts, ref[None])
    want = kept.reshape(3, 8) @ w.T + b
    np.testing.assert_allclose((base + contrib[:, keep].sum(1)).numpy(), want, rtol=1e-10, atol=1e-12)


def test_head_masks_on_z_in_shared_forwards_equal_a_loop_of_numpy_forwards(gpt):
    """Truth: for each mask, the numpy GPT-2 with those heads of layer 0 zeroed; batch_size 4 puts two masks of the
    three in one forward over the 2 inputs (repeated per mask) and the third in its own."""
    masks = torch.zeros(3, TOKENS.shape[1], H, DH, dtype=torch.bool)
    masks[0, :, 1], masks[1, :, 0], masks[2, 2:] = True, True, True
    got = ivn.intervene(gpt, TOKENS, "blocks.0.attn.hook_z", masks, 0.0, batch_size=4).numpy()
    for i, m in enumerate(masks.numpy()):
        _, want = np_gpt2(params(gpt), TOKENS, {"blocks.0.attn.hook_z": lambda z, m=m: np.where(m, 0.0, z)})
        np.testing.assert_allclose(got[i], want, rtol=TOL, atol=TOL)


@pytest.mark.parametrize("family", ["gpt2", "llama", "neox"])
def test_hooking_the_pattern_of_a_float64_model_leaves_its_logits(family):
    """Outside truth: a hook that returns nothing is the identity, so the float64 logits with hook_pattern hooked (the
    explicit softmax path) equal those of PyTorch's fused attention without it, to float64 rounding; the softmax ran
    in float32 there and moved them by 2e-7 to 1e-6."""
    model = tiny(family).double()
    x = torch.randint(0, 32, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = model(x)
        with hooks(model, fwd=[("blocks.0.attn.hook_pattern", lambda t, hook: None)]):
            hooked = model(x)
    assert (plain - hooked).abs().max().item() < 1e-12


def test_no_masks_at_all_is_named_in_one_line():
    """Outside truth: zero masks is zero interventions, a caller's slip; the message says so (it was torch.cat's
    "expected a non-empty list of Tensors")."""
    x = torch.ones(2, 3, dtype=torch.float64)
    with pytest.raises(MechscopeError, match="no masks for hook_bn: give at least one"):
        ivn.intervene(BNNet().eval(), x, "hook_bn", torch.zeros(0, 3, dtype=torch.bool), 0.0)
    with pytest.raises(MechscopeError, match="no masks: give at least one"):
        ivn.readout_intervene(torch.ones(2, 3), None, torch.ones(4, 3), torch.zeros(0, 3, dtype=torch.bool), 0.0)
