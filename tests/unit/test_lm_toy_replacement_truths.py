"""Outside truths for the toy-model trainer (``lm.toy``), per-layer transcoders (``lm.methods.transcoders``), the local
replacement model (``lm.methods.replacement``) and transcoder training helpers (``lm.methods.replacement_training``):
formulas written out by hand with numpy, plain torch forward hooks, hand-built series and token rows with known
answers, and the documented orderings."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mechscope.core.dictionaries import DictionaryConfig, SparseDictionary
from mechscope.core.errors import MechscopeError
from mechscope.lm.methods.replacement import LocalReplacement
from mechscope.lm.methods.replacement_training import _batches, _contexts, _harvest, _quality
from mechscope.lm.methods.transcoders import Transcoders
from mechscope.lm.models.transformer import HookedTransformer, TransformerConfig
from mechscope.lm.toy import ToyConfig, detect_phase_change, icl_score, make_model, measure, repeat_spans
from tests.unit.test_attribution_graph_lm import TOKENS, random_transcoders, tiny
from tests.unit.test_graph_quality_rows import dictionary_forward, hand_dictionary, np_
from tests.unit.test_toy import TINY

pytestmark = pytest.mark.usefixtures("one_thread")

# ---- lm.toy -----------------------------------------------------------------------------------------------


def test_icl_score_is_last_tenth_minus_second_tenth_by_hand():
    """Truth: the documented formula on a ramp, by hand: mean(90..99) - mean(10..19) = 80."""
    assert icl_score(torch.arange(100.0)) == pytest.approx(94.5 - 14.5)
    assert icl_score(torch.arange(50.0)) == pytest.approx(np.mean(np.arange(45, 50)) - np.mean(np.arange(5, 10)))


def test_repeated_span_is_an_intact_earlier_span():
    """Truth: on rows of distinct tokens (x = position), each changed position p holds the token of an earlier
    position src < p that is itself unchanged, so the copy is a verbatim repeat of an earlier span that still stands;
    the changed positions form one contiguous run of at least min_span."""
    g = torch.Generator().manual_seed(0)
    n, length, span = 3000, 24, 3
    x = torch.arange(length).repeat(n, 1)
    y = repeat_spans(x, span, g)
    for row in y.tolist():
        changed = [p for p in range(length) if row[p] != p]
        assert changed == list(range(changed[0], changed[-1] + 1)) and len(changed) >= span
        offsets = {p - row[p] for p in changed}
        assert len(offsets) == 1 and min(offsets) > 0
        for p in changed:
            src = row[p]
            assert src < changed[0] and row[src] == src  # the source span is before the copy and intact


def test_measure_loss_and_icl_match_a_hand_cross_entropy():
    """Truth: the held-out loss and ICL score written out with log_softmax over the model's logits: ICL over the
    per-position loss (mean over the batch), positions n//10..n//5 early and the last n//10 late."""
    cfg = ToyConfig(**TINY)
    model = make_model(cfg, 16).eval()
    g = torch.Generator().manual_seed(3)
    held = torch.randint(1, 16, (6, 33), generator=g)
    probe = torch.cat([torch.zeros(4, 1, dtype=torch.long), torch.randint(1, 16, (4, 15), generator=g).repeat(1, 2)], 1)
    out = measure(model, held, probe)
    with torch.no_grad():
        lp = torch.log_softmax(model(held[:, :-1]), -1)
    nll = -lp.gather(-1, held[:, 1:, None])[..., 0].double().numpy()  # [B, 32]
    per_pos = nll.mean(0)
    assert out["held_out_loss"] == pytest.approx(nll.mean(), rel=1e-5)
    assert out["icl_score"] == pytest.approx(per_pos[29:].mean() - per_pos[3:6].mean(), rel=1e-4, abs=1e-6)


def test_phase_change_needs_twenty_percent_in_one_interval_and_reports_the_midpoint():
    """Truth: hand-built series. Induction rising in 8 equal steps of 1/8 of its range (each >= 0.1 but under 20% of
    the range) is not a phase change; one step carrying most of both ranges between steps 20 and 40 is, at step 30."""
    steps = list(range(0, 90, 10))
    ramp = [i / 8 for i in range(9)]
    slow = detect_phase_change(steps, ramp, [-v for v in ramp])
    assert slow["share_of_range"] == pytest.approx(0.125) and not slow["detected"]
    steps = [0, 10, 20, 40, 80]
    ind = [0.0, 0.02, 0.05, 0.8, 0.82]
    icl = [0.0, -0.01, -0.02, -1.0, -1.05]
    found = detect_phase_change(steps, ind, icl)
    assert found["detected"] and found["window"] == [20, 40] and found["step"] == 30
    assert found["induction_jump"] == pytest.approx(0.75) and found["icl_jump"] == pytest.approx(-0.98)


def test_min_span_must_fit_twice():
    """Truth: the documented rule: a span and its copy need 2 * min_span <= n_ctx (8 * 2 > 12 is refused)."""
    with pytest.raises(MechscopeError, match="does not fit twice"):
        ToyConfig(**{**TINY, "n_ctx": 12, "min_span": 8}).validate()
    ToyConfig(**{**TINY, "n_ctx": 16, "min_span": 8}).validate()


# ---- lm.methods.transcoders ----------------------------------------------------------------------------------


def _skip_dictionary(normalised: bool) -> SparseDictionary:
    g = torch.Generator().manual_seed(5)
    cfg = DictionaryConfig(d_in=16, d_sae=24, architecture="relu", transcoder=True, d_out=16, skip=True,
                           normalize_activations="expected_average_only_in" if normalised else "none")  # fmt: skip
    d = SparseDictionary(cfg, generator=g)
    with torch.no_grad():
        d.b_enc.normal_(0, 0.1, generator=g)
        d.b_dec.normal_(0, 0.3, generator=g)
        d.W_skip.normal_(0, 0.3, generator=g)
        if normalised:
            d.in_scale.fill_(2.5)
            d.out_scale.fill_(0.4)
    return d.eval()


@pytest.mark.parametrize("via", ["of", "padded"])
def test_transcoder_reconstruction_in_raw_units_matches_the_weights_by_hand(via):
    """Truth: the dictionary's forward written out with numpy from its weights and scales (``dictionary_forward``:
    s_in x, ReLU(x' W_enc + b_enc), f W_dec + b_dec + x' W_skip^T, divided by s_out); the skip path's constant
    write is b_dec + x W_skip^T of the folded weights."""
    d = _skip_dictionary(normalised=True)
    model = tiny("gpt2", n_layers=1)
    tcs = Transcoders.of([d]) if via == "of" else Transcoders.padded(model, {0: d})
    x = torch.randn(7, 16, generator=torch.Generator().manual_seed(1))
    y_hat, f = dictionary_forward(d, np_(x))
    feats = tcs.encode(0, x)
    np.testing.assert_allclose(np_(feats), f, atol=1e-5)
    np.testing.assert_allclose(np_(tcs.decode(0, {0: feats}, x)), y_hat, atol=1e-5)
    plain = _skip_dictionary(normalised=False)
    t2 = Transcoders.of([plain])
    const, skip = t2.constant_write(0, x[0])
    assert skip
    np.testing.assert_allclose(np_(const), np_(plain.b_dec) + np_(x[0]) @ np_(plain.W_skip).T, atol=1e-5)
    np.testing.assert_allclose(np_(t2.decode(0, {0: torch.zeros(7, 24)}, x)),
                               np_(plain.b_dec) + np_(x) @ np_(plain.W_skip).T, atol=1e-5)  # fmt: skip


def _relu_model(act: str = "relu", **kw) -> HookedTransformer:
    cfg = TransformerConfig(d_model=16, n_layers=2, n_heads=2, d_head=8, d_vocab=32, n_ctx=16, d_mlp=24, act=act, **kw)
    m = HookedTransformer(cfg)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if name.endswith(".w") else 0.0))
    return m.eval()


def test_mlp_neurons_are_exact_transcoders_by_plain_hooks():
    """Truth: plain torch forward hooks on each block's MLP module (its input and output) and the MLP written by
    hand (ReLU(x W_in^T + b_in) W_out^T + b_out, biases nonzero): the neuron transcoders reproduce it, so every error
    node is zero; a GELU MLP is refused."""
    model = _relu_model()
    for b in model.blocks:
        assert b.mlp.up.bias is not None and b.mlp.down.bias is not None
    tcs = Transcoders.from_mlp_neurons(model)
    seen = {}
    handles = [b.mlp.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(i, (a[0][0], o[0])))
               for i, b in enumerate(model.blocks)]  # fmt: skip
    try:
        with torch.no_grad():
            model(TOKENS[None])
    finally:
        for h in handles:
            h.remove()
    for i, b in enumerate(model.blocks):
        x, y = seen[i]
        by_hand = torch.relu(x @ b.mlp.up.weight.T + b.mlp.up.bias) @ b.mlp.down.weight.T + b.mlp.down.bias
        assert torch.allclose(by_hand, y, atol=1e-5)
        assert torch.allclose(tcs.decode(i, {i: tcs.encode(i, x)}, x), y, atol=1e-5)
    rep = LocalReplacement(model, tcs, TOKENS)
    assert rep.errors.abs().max() < 1e-5
    with pytest.raises(MechscopeError, match="plain ReLU"):
        Transcoders.from_mlp_neurons(_relu_model("gelu"))


def test_transcoders_writing_the_wrong_width_are_refused():
    """Truth: the documented contract: a transcoder must map d_model -> d_model (here d_out = d_model + 1)."""
    model = tiny("gpt2", n_layers=1)
    d = SparseDictionary(DictionaryConfig(d_in=16, d_sae=8, architecture="relu", transcoder=True, d_out=17))
    with pytest.raises(MechscopeError, match="maps 16 -> 17"):
        Transcoders.of([d]).check(model)


# ---- lm.methods.replacement ----------------------------------------------------------------------------------


def test_salient_logits_by_hand_cumulative_probability():
    """Truth: numpy: sort the softmax at the last position, keep the shortest prefix whose sum reaches 0.95 (or
    ``desired``), at most max_n."""
    model = tiny("gpt2")
    rep = LocalReplacement(model, random_transcoders(model), TOKENS)
    with torch.no_grad():
        logits = model(TOKENS[None])[0, -1].double().numpy()
    p = np.exp(logits - logits.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    for desired, max_n in ((0.95, 10), (0.5, 10), (0.999, 3)):
        cum = np.cumsum(p[order])
        n = min(int(np.searchsorted(cum, desired, side="left")) + 1, max_n)
        ids, probs = rep.salient_logits(max_n=max_n, desired=desired)
        assert ids.tolist() == order[:n].tolist(), desired
        np.testing.assert_allclose(probs.numpy(), p[order[:n]], rtol=1e-5)


def test_skip_first_leaves_position_zero_to_the_error_node():
    """Truth: plain hooks on the model: with skip_first no feature sits at position 0, the error node there is the MLP
    output minus the decoder bias (the reconstruction of zero latents), and the frozen run with nothing changed
    gives the model's own logits (position 0's features are not re-encoded)."""
    model = tiny("gpt2")
    tcs = random_transcoders(model, "relu")
    rep = LocalReplacement(model, tcs, TOKENS, skip_first=True)
    assert rep.n_features > 0 and (rep.feature_pos != 0).all()
    outs = {}
    handles = [b.mlp.register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, o[0]))
               for i, b in enumerate(model.blocks)]  # fmt: skip
    try:
        with torch.no_grad():
            own = model(TOKENS[None])[0]
    finally:
        for h in handles:
            h.remove()
    for i in range(2):
        assert torch.allclose(rep.errors[i, 0], outs[i][0] - tcs.layers[i].b_dec, atol=1e-5)
    for mode in ("frozen", "recomputed"):
        logits, _ = rep.run(mode)
        assert (logits - own).abs().max() < 1e-4, mode


def test_error_node_ids_are_layer_major_and_targets_default_to_the_last_position():
    """Truth: the documented source order [features | errors (layer-major) | inputs]: error (layer, pos) is source
    n_features + layer * P + pos; set_targets reads the last position by default."""
    model = tiny("gpt2")
    rep = LocalReplacement(model, random_transcoders(model), TOKENS)
    P, nf = len(TOKENS), rep.n_features
    for layer, pos in ((0, 3), (1, 0), (1, 6)):
        assert rep.source_of(f"{layer}_-1_{pos}") == nf + layer * P + pos
    rep.set_targets(torch.tensor([3, 4]))
    assert rep.logit_pos == P - 1


def test_logit_directions_and_offsets_give_the_demeaned_logit():
    """Truth: a plain forward hook on the final norm and the model's logits: final · direction + offset equals
    logit[t] - mean over the vocabulary, with the unembedding bias nonzero."""
    model = _relu_model("gelu", unembed_bias=True, tie_embeddings=False)
    assert model.b_U is not None and model.b_U.abs().max() > 0
    rep = LocalReplacement(model, random_transcoders(model), TOKENS)
    got = {}
    h = model.ln_final.register_forward_hook(lambda m, a, o: got.__setitem__("final", o[0]))
    try:
        with torch.no_grad():
            logits = model(TOKENS[None])[0].double().numpy()
    finally:
        h.remove()
    targets = torch.tensor([0, 7, 31])
    rep.set_targets(targets)
    pred = got["final"][-1] @ rep.logit_directions.T + rep.logit_offsets
    want = logits[-1, targets.numpy()] - logits[-1].mean()
    np.testing.assert_allclose(np_(pred), want, atol=1e-4)


def test_frozen_mode_freezes_the_final_norm_too():
    """Truth: structure: a last-layer feature feeds no later feature (no attention after its MLP), so re-encoding
    changes nothing and the frozen run must equal the direct run (whose edges the exactness test checks against
    interventions) when that feature is doubled."""
    model = tiny("gpt2")
    rep = LocalReplacement(model, random_transcoders(model), TOKENS)
    last = [s for s in range(rep.n_features) if int(rep.feature_layer[s]) == 1][:5]
    assert last
    for s in last:
        change = {s: 3.0 * float(rep.feature_activation[s])}
        direct, _ = rep.run("direct", features=change)
        frozen, _ = rep.run("frozen", features=change)
        assert (direct - frozen).abs().max() < 1e-5


# ---- lm.methods.replacement_training ------------------------------------------------------------------------


def test_contexts_by_hand():
    """Truth: hand-written rows: BOS then consecutive, non-overlapping chunks of n_ctx - 1 tokens; no BOS: n_ctx."""
    ids = list(range(10))
    assert _contexts(ids, 4, 99, 5).tolist() == [[99, 0, 1, 2], [99, 3, 4, 5], [99, 6, 7, 8]]
    assert _contexts(ids, 4, None, 5).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_harvest_matches_plain_hooks_from_position_skip_on():
    """Truth: plain torch forward hooks on each block's MLP (its input and output), positions 1.. of every row."""
    model = _relu_model()
    ctx = torch.randint(0, 32, (3, 6), generator=torch.Generator().manual_seed(2))
    xs, ys = _harvest(model, ctx, [0, 1], skip=1, batch=2)
    seen = {i: ([], []) for i in range(2)}

    def grab(i):
        def fn(module, args, output):
            seen[i][0].append(args[0])
            seen[i][1].append(output)

        return fn

    handles = [b.mlp.register_forward_hook(grab(i)) for i, b in enumerate(model.blocks)]
    try:
        with torch.no_grad():
            model(ctx)
    finally:
        for h in handles:
            h.remove()
    for i in range(2):
        x, y = seen[i][0][0][:, 1:].reshape(-1, 16), seen[i][1][0][:, 1:].reshape(-1, 16)
        assert xs[i].shape == (15, 16) and ys[i].shape == (15, 16)
        assert torch.allclose(xs[i].float(), x, atol=1e-2) and torch.allclose(ys[i].float(), y, atol=1e-2)


def test_batches_cover_each_epoch_once():
    """Truth: counting: 10 rows in batches of 5 for 2 epochs is 4 batches, each epoch a permutation of the rows."""
    x = torch.arange(10.0)[:, None]
    got = list(_batches(x, x * 2, 5, 2, torch.Generator().manual_seed(0)))
    assert len(got) == 4
    for e in range(2):
        rows = torch.cat([got[2 * e][0], got[2 * e + 1][0]])[:, 0]
        assert sorted(rows.tolist()) == list(range(10))
    assert all(torch.equal(b[1], b[0] * 2) for b in got)


def test_quality_explained_variance_and_l0_by_numpy():
    """Truth: numpy from the dictionary's weights (``dictionary_forward``): explained variance = 1 - Σ err² / Σ (y -
    mean y)², L0 = mean count of latents > 0."""
    d = hand_dictionary([1, 4, 5, 11, 19])
    g = torch.Generator().manual_seed(1)
    x = torch.randn(50, 6, generator=g) * 0.5
    y = torch.randn(50, 5, generator=g) + 3.0
    y_hat, f = dictionary_forward(d, np_(x))
    yn = np_(y)
    q = _quality(d, x, y)
    ev = 1 - ((yn - y_hat) ** 2).sum() / ((yn - yn.mean(0)) ** 2).sum()
    assert q["explained_variance"] == pytest.approx(ev, rel=1e-5)
    assert q["l0"] == pytest.approx((f > 0).sum(1).mean(), rel=1e-6)
