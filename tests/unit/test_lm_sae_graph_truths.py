"""The language wing's sparse dictionaries and component graph against truths computed outside the code under test:
a transcoder spliced in, written out in numpy on activations captured by plain torch forward hooks; the direct
logit effect measured by nudging the final residual and running the model's own final norm and unembedding; the
MLP that writes a residual hook point, measured through its down projection; hook firing order and widths seen by
plain torch hooks; harvested rows against those hooks; contexts and the induction ranking counted by hand; and the
post-LN refusal of the component graph shown on the model (its residual is not the sum of its writers)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mechscope.core.dictionaries import DictionaryConfig, SparseDictionary
from mechscope.core.errors import MechscopeError
from mechscope.lm.methods import sae as S
from mechscope.lm.methods.graph import TransformerEdges
from tests.unit.test_sae_lm import tiny_model, tokens
from tests.unit.test_sae_outside_truths import after_bos, forward_with, hand_metrics, kl_rows, log_softmax, module

pytestmark = pytest.mark.usefixtures("one_thread")


def random_transcoder(d_in: int, d_sae: int, d_out: int, seed: int) -> SparseDictionary:
    g = torch.Generator().manual_seed(seed)
    tc = SparseDictionary(DictionaryConfig(d_in=d_in, d_sae=d_sae, architecture="relu", transcoder=True, d_out=d_out))
    with torch.no_grad():
        tc.W_enc.copy_(torch.randn(d_in, d_sae, generator=g) * 0.5)
        tc.b_enc.copy_(-0.3 * torch.rand(d_sae, generator=g))
        tc.W_dec.copy_(torch.randn(d_sae, d_out, generator=g) * 0.3)
        tc.b_dec.copy_(torch.randn(d_out, generator=g) * 0.1)
    return tc.eval()


def np_transcoder(tc: SparseDictionary):
    """Dunefsky et al. 2024's transcoder in float64 numpy: f = relu(x W_enc + b_enc), y_hat = f W_dec + b_dec (the
    decoder bias lives in output space: it is not subtracted from the input)."""
    we, be, wd, bd = (p.detach().double().numpy() for p in (tc.W_enc, tc.b_enc, tc.W_dec, tc.b_dec))

    def run(x: np.ndarray):
        f = np.maximum(x @ we + be, 0.0)
        return f @ wd + bd, f

    return run


# ---- sae.py: a transcoder spliced in --------------------------------------------------------------------------


def test_transcoder_splice_effect_and_metrics_against_numpy_and_plain_hooks():
    """Truth: the MLP input (``blocks.1.mlp.hook_in``) and output (``hook_mlp_out``) captured by plain torch forward
    hooks; the transcoder written out in numpy on the input; the MLP output replaced by it (positions after the BOS)
    with a plain hook; CE, KL(P_clean || P_spliced) and reconstruction metrics (against the MLP's real output, not
    its input) by hand."""
    model, toks = tiny_model(11), tokens(4, 12, 11)
    hook, target = "blocks.1.mlp.hook_in", "blocks.1.hook_mlp_out"
    ins: list[torch.Tensor] = []
    outs: list[torch.Tensor] = []
    forward_with(model, toks, hook, record=ins)
    clean = forward_with(model, toks, target, record=outs)
    x = ins[0].double().numpy()[:, 1:].reshape(-1, 16)
    y = outs[0].double().numpy()[:, 1:].reshape(-1, 16)
    tc = random_transcoder(16, 24, 16, seed=5)
    y_hat, f = np_transcoder(tc)(x)
    assert 0 < (f > 0).mean() < 1 and np.abs(y - y_hat).max() > 0.1
    spliced = forward_with(model, toks, target, after_bos(y_hat))
    zeroed = forward_with(model, toks, target, after_bos())
    effect, metrics = S.splice_effect(model, toks, tc, hook, target, skip_first=1, batch=3)

    expected = hand_metrics(y, y_hat, f)
    for key, value in expected.items():
        assert getattr(metrics, key) == pytest.approx(value, rel=1e-4, abs=1e-7), key
    nxt = toks[:, 1:].numpy()

    def ce(logits):
        return float(-np.take_along_axis(log_softmax(logits[:, :-1]), nxt[..., None], -1).mean())

    lc, ls, lz = ce(clean), ce(spliced), ce(zeroed)
    assert abs(ls - lc) > 1e-4
    assert effect.loss_clean == pytest.approx(lc, rel=1e-9)
    assert effect.loss_spliced == pytest.approx(ls, rel=1e-5)
    assert effect.loss_zero_ablated == pytest.approx(lz, rel=1e-9)
    assert effect.kl_spliced == pytest.approx(kl_rows(clean, spliced).mean(), rel=1e-4)


# ---- sae.py: the direct logit effect through the final norm --------------------------------------------------


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_direct_logit_effect_is_what_nudging_the_final_residual_does(norm):
    """Truth (Bricken et al. 2023's logit weights, measured): add eps * d to the last residual at one position with a
    plain torch hook and read the model's own logits there. For d chosen so that the norm's Jacobian maps it to
    its centred part (LayerNorm: centred d orthogonal to the centred residual; RMSNorm: d orthogonal to the
    residual), the change is (eps / sigma) * gain * d(centred) @ W_U, sigma the norm's scale computed here. The
    final gain is random and d has a nonzero mean, so a dropped gain or a dropped centring shows."""
    model = tiny_model(12, norm=norm, tie_embeddings=False).double()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        model.ln_final.w.copy_(0.5 + torch.rand(16, generator=g, dtype=torch.float64) * 2)
    toks = tokens(1, 8, 12)
    site, pos = "blocks.1.hook_resid_post", 5
    seen: list[torch.Tensor] = []
    base = forward_with(model, toks, site, record=seen)
    xr = seen[0][0, pos].double()
    d = torch.randn(16, generator=g, dtype=torch.float64)
    if norm == "layernorm":
        xc = xr - xr.mean()
        dc = d - d.mean()
        d = d - (dc @ xc) / (xc @ xc) * xc  # centred part orthogonal to the centred residual; the mean kept
        sigma = float((xc.pow(2).mean() + model.ln_final.eps).sqrt())
    else:
        d = d - (d @ xr) / (xr @ xr) * xr
        sigma = float((xr.pow(2).mean() + model.ln_final.eps).sqrt())
    d = d + 0.7  # a shared offset: LayerNorm removes it, RMSNorm does not (re-orthogonalise for RMSNorm)
    if norm == "rmsnorm":
        d = d - (d @ xr) / (xr @ xr) * xr
    eps = 1e-4

    def nudge(out):
        new = out.clone()
        new[0, pos] += eps * d.to(out.dtype)
        return new

    moved = forward_with(model, toks, site, nudge)
    measured = (moved[0, pos] - base[0, pos]) / eps
    measured -= measured.mean()  # softmax ignores a shared shift
    predicted = (d.float() @ S.unembedding(model)).double().numpy() / sigma
    tol = 1e-3 if norm == "layernorm" else 5e-3  # RMSNorm normalises in float32
    np.testing.assert_allclose(measured, predicted, rtol=0, atol=tol * np.abs(predicted).max())
    effects = S.logit_effects(d.float()[None], S.unembedding(model), [0], k=3)[0]
    assert list(effects.promoted) == np.argsort(-measured, kind="stable")[:3].tolist()
    assert list(effects.suppressed) == np.argsort(measured, kind="stable")[:3].tolist()


# ---- sae.py: which MLP writes a residual hook point --------------------------------------------------------------


@pytest.mark.parametrize("hook", ["blocks.1.hook_resid_mid", "blocks.1.hook_mlp_in"])
def test_neuron_comparison_on_the_residual_mid_names_the_previous_blocks_mlp(hook):
    """Truth: the residual between block 1's attention and its MLP was last written by block 0's MLP (block 1's has
    not run yet); neuron 7's output direction measured through block 0's down projection. A latent writing twice
    that direction is that neuron at cosine 1."""
    model = tiny_model(13)
    mlp0 = model.blocks[0].mlp
    with torch.no_grad():
        w0 = mlp0.down(torch.eye(32)) - mlp0.down(torch.zeros(1, 32))  # [M, D]
    sae = SparseDictionary(DictionaryConfig(d_in=16, d_sae=4), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.W_dec[1] = 2 * w0[7]
    out = S.neuron_comparison(model, sae, hook, None, [1], k=1)
    assert out[1][0][0] == "neuron 0.7" and out[1][0][1] == pytest.approx(1.0, abs=1e-5)


def test_mlp_in_is_the_residual_stream_so_its_decoder_rows_are_residual_directions():
    """Truth: ``hook_mlp_in`` (before ln2) carries exactly ``hook_resid_mid`` (recorded by plain torch hooks), the
    residual stream itself, so a dictionary writing there writes its decoder rows into the stream as they are."""
    model, toks = tiny_model(14), tokens(2, 6, 14)
    a: list[torch.Tensor] = []
    b: list[torch.Tensor] = []
    forward_with(model, toks, "blocks.1.hook_mlp_in", record=a)
    forward_with(model, toks, "blocks.1.hook_resid_mid", record=b)
    assert torch.equal(a[0], b[0])
    sae = SparseDictionary(DictionaryConfig(d_in=16, d_sae=5), generator=torch.Generator().manual_seed(1))
    dirs = S.residual_directions(model, sae, "blocks.1.hook_mlp_in")
    assert dirs is not None and torch.equal(dirs, sae.W_dec.detach())


# ---- sae.py: transcoder pairs checked against the model --------------------------------------------------------


def firing_order(model, names: list[str]) -> list[str]:
    order: list[str] = []
    handles = [module(model, n).register_forward_hook(lambda m, a, o, n=n: order.append(n)) for n in names]
    try:
        with torch.no_grad():
            model(tokens(1, 3))
    finally:
        for h in handles:
            h.remove()
    return order


def test_transcoder_whose_target_fires_first_is_refused():
    """Truth: plain torch hooks see ``blocks.0.hook_mlp_out`` fire before ``blocks.1.mlp.hook_in``: a transcoder
    reading the latter cannot replace the former (its input does not exist yet)."""
    model = tiny_model()
    hook, target = "blocks.1.mlp.hook_in", "blocks.0.hook_mlp_out"
    assert firing_order(model, [hook, target]) == [target, hook]
    tc = SparseDictionary(DictionaryConfig(d_in=16, d_sae=8, transcoder=True, d_out=16))
    with pytest.raises(MechscopeError, match="must run after its input hook"):
        S.check_dictionary(model, tc, hook, target)
    S.check_dictionary(model, tc, "blocks.0.mlp.hook_in", "blocks.0.hook_mlp_out")  # the right order passes


def test_a_transcoder_needs_a_target_and_an_sae_takes_none():
    """Truth (the definitions of the module docstring): a transcoder replaces another hook (its target) by a function
    of its input hook, an SAE reads and writes one hook; a transcoder given no target would otherwise be spliced in
    as if it reconstructed its own input, silently."""
    model = tiny_model()
    tc = SparseDictionary(DictionaryConfig(d_in=16, d_sae=8, transcoder=True, d_out=16))
    with pytest.raises(MechscopeError, match="a transcoder needs its target hook"):
        S.check_dictionary(model, tc, "blocks.0.mlp.hook_in", None)
    sae = SparseDictionary(DictionaryConfig(d_in=16, d_sae=8))
    with pytest.raises(MechscopeError, match="an SAE reads and writes one hook"):
        S.check_dictionary(model, sae, "blocks.0.hook_resid_post", "blocks.0.hook_mlp_out")


def test_transcoder_output_width_is_checked_against_the_target():
    """Truth: the target's width is the last dimension plain torch hooks record there (16); a transcoder writing 12
    cannot replace it."""
    model = tiny_model()
    seen: list[torch.Tensor] = []
    forward_with(model, tokens(1, 3), "blocks.0.hook_mlp_out", record=seen)
    assert seen[0].shape[-1] == 16
    tc = SparseDictionary(DictionaryConfig(d_in=16, d_sae=8, transcoder=True, d_out=12))
    with pytest.raises(MechscopeError, match="d_out=12; blocks.0.hook_mlp_out of this model has width 16"):
        S.check_dictionary(model, tc, "blocks.0.mlp.hook_in", "blocks.0.hook_mlp_out")


# ---- sae.py: harvesting ---------------------------------------------------------------------------------------


def test_harvested_rows_of_every_rank_are_the_plainly_hooked_activations():
    """Truth: activations recorded by plain torch forward hooks, positions after the BOS, contexts split between
    two ranks as contiguous slices (the first gets the extra one); a rank left with no context yields an empty
    store of the full width (input + target for a transcoder pair)."""
    model, toks = tiny_model(15), tokens(3, 7, 15)
    hook, target = "blocks.0.mlp.hook_in", "blocks.0.hook_mlp_out"
    rec = {}
    for name in ("blocks.1.hook_resid_post", hook, target):
        got: list[torch.Tensor] = []
        forward_with(model, toks, name, record=got)
        rec[name] = got[0][:, 1:]  # [B, P-1, D]
    specs = [S.HarvestSpec("blocks.1.hook_resid_post"), S.HarvestSpec(hook, target)]
    for rank, ctx in ((0, [0, 1]), (1, [2])):
        [(sae_rows, tc_rows)] = list(S.harvest_batches(model, toks, specs, batch=3, skip_first=1, rank=rank, world=2))
        want = rec["blocks.1.hook_resid_post"][ctx].reshape(-1, 16)
        assert torch.allclose(sae_rows, want, atol=1e-6)
        pair = torch.cat([rec[hook][ctx].reshape(-1, 16), rec[target][ctx].reshape(-1, 16)], 1)
        assert torch.allclose(tc_rows, pair, atol=1e-6)
    [(empty_sae, empty_tc)] = list(S.harvest_batches(model, toks[:1], specs, batch=1, skip_first=1, rank=1, world=2))
    assert empty_sae.shape == (0, 16) and empty_tc.shape == (0, 32)
    # progress counts the positions the model ran (BOS included), as a plain pre-hook on the model sees them
    fed: list[int] = []
    counted: list[int] = []
    handle = model.register_forward_pre_hook(lambda m, args: fed.append(args[0].numel()))
    try:
        for _ in S.harvest_batches(model, toks, specs[:1], batch=2, skip_first=1, on_batch=counted.append):
            pass
    finally:
        handle.remove()
    assert sum(counted) == sum(fed[1:]) == 3 * 7  # fed[0]: the two-token probe of the hooks' widths


def test_contexts_limit_keeps_the_first_contexts():
    """Truth: the stream 1..40 cut by hand into 7-token bodies after a BOS 0; a limit keeps the first ones, and a
    limit above what the stream holds keeps them all."""
    ids = list(range(1, 41))
    expected = torch.tensor([[0, *range(1 + 7 * i, 8 + 7 * i)] for i in range(5)])
    assert torch.equal(S.contexts(ids, 8, bos=0), expected)
    assert torch.equal(S.contexts(ids, 8, bos=0, limit=2), expected[:2])
    assert torch.equal(S.contexts(ids, 8, bos=0, limit=99), expected)


# ---- sae.py: the induction ranking counts the copies, not the BOS --------------------------------------------


def test_induction_rates_leave_the_bos_out_of_the_first_copy():
    """Truth: a planted position embedding puts 1 on dimension 3 at the BOS and on the whole second copy; latent 0
    reads it. Counted by hand on the layout BOS + n + n: it fires on no position of the first copy (rate 0) and on
    every one of the second (rate 1); the BOS belongs to neither copy."""
    n, seqs = 6, 3
    model = tiny_model(16)
    with torch.no_grad():
        model.W_E[:, 3] = 0.0
        model.W_pos[:, 3] = 0.0
        model.W_pos[0, 3] = 1.0
        model.W_pos[n + 1 : 2 * n + 1, 3] = 1.0
    sae = SparseDictionary(DictionaryConfig(d_in=16, d_sae=3, architecture="relu"))
    with torch.no_grad():
        for p in sae.parameters():
            p.zero_()
        sae.W_enc[3, 0], sae.b_enc[0] = 1.0, -0.5
        sae.b_enc[1:] = -1.0
    r = S.induction_latents(model, sae.eval(), "blocks.0.hook_resid_pre", n=n, sequences=seqs, seed=1)
    assert r.ranked == (0,)
    assert r.rate_first == (0.0,) and r.rate_second == (1.0,)
    assert r.mean_first == (0.0,) and r.mean_second == pytest.approx((0.5,), abs=1e-6)
    assert r.activations[0] == pytest.approx([0.5] + [0.0] * n + [0.5] * n, abs=1e-6)


# ---- graph.py: the component graph refuses a residual stream that is not a sum ---------------------------------


def writers_sum_error(model, toks) -> float:
    """|last resid_post - (embed + pos_embed + every attn_out + every mlp_out)|, all recorded by plain hooks."""
    names = ["hook_embed", "hook_pos_embed"] + [f"blocks.{L}.hook_{k}_out" for L in range(2) for k in ("attn", "mlp")]
    total = 0
    for name in names:
        got: list[torch.Tensor] = []
        forward_with(model, toks, name, record=got)
        total = total + got[0].double()
    last: list[torch.Tensor] = []
    forward_with(model, toks, "blocks.1.hook_resid_post", record=last)
    return float((last[0].double() - total).abs().max())


def test_post_ln_model_is_refused_because_its_residual_is_not_the_sum_of_its_writers():
    """Truth, measured with plain hooks: in a pre-LN model the last residual is the sum of the embeddings and every
    attention and MLP output (the graph's premise); in a post-LN model (norm_after_residual, OPT-350m) it is not,
    and the component graph must refuse it in one line."""
    toks = tokens(2, 6, 17)
    assert writers_sum_error(tiny_model(17), toks) < 1e-5
    post = tiny_model(17, norm_after_residual=True)
    assert writers_sum_error(post, toks) > 1e-2
    with pytest.raises(MechscopeError, match="post-LN blocks") as e:
        TransformerEdges(post)
    assert "\n" not in str(e.value)
