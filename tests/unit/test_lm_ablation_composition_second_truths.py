"""Head ablations, attribution patching, key-side path patching and composition scores against outside truths
(a second pass after test_lm_ablation_scores_truths.py and test_lm_composition_truths.py): hooks of our own with
the loss by hand, a plain backward through the whole model with the dot product in numpy, numbers set by hand on
an asymmetric grid, the model's own grouping of query heads, and Elhage et al.'s formula written out in numpy.
Each test names its truth."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mechscope.core.hooks import hooks
from mechscope.lm.methods import ablation as HA
from mechscope.lm.methods import composition
from mechscope.lm.methods.composition import composition_scores
from mechscope.lm.methods.path_patching import Criterion, induction_edges
from mechscope.lm.methods.scores import induction_mask
from mechscope.lm.models.folding import analysis_weights
from tests.unit.test_folding import random_model
from tests.unit.test_heads import hand_built, repeated, second_half_loss_by_hand
from tests.unit.test_lm_ablation_scores_truths import N, _by_hook, sharp_random
from tests.unit.test_lm_composition_truths import numpy_scores

# ---- exact ablations ---------------------------------------------------------------------------------------------


def _clean_loss(model, tokens) -> torch.Tensor:
    with torch.no_grad():
        return second_half_loss_by_hand(model(tokens), tokens, N)


def test_zero_ablating_three_heads_of_a_layer_one_at_a_time_is_the_hooked_loss_of_each():
    """Truth: each of heads 0.3, 0.0 and 0.2 of a seeded sharp model zero-ablated alone by our own hook (every
    position, BOS's included, set to 0), second-half loss by hand minus the clean one, per sequence; three heads
    are more than one run's two sets, and they are asked out of order."""
    model, tokens = sharp_random(), repeated(8, b=3)
    clean = _clean_loss(model, tokens)
    cap = HA.capture(model, tokens, N)
    got = HA.exact(model, cap, tokens, N, 0, [3, 0, 2], "zero")
    assert got.shape == (3, 3)
    for row, h in zip(got, [3, 0, 2], strict=True):
        want = (_by_hook(model, tokens, {0: {h: "zero"}}) - clean).numpy()
        np.testing.assert_allclose(row, want, atol=1e-4, err_msg=str(h))
        assert np.abs(want).max() > 1e-3


@pytest.mark.parametrize("kind", ["zero", "resample"])
def test_heads_of_two_layers_ablated_together_under_each_kind_are_the_hooked_loss(kind):
    """Truth: heads 0.2 and 1.1 zero- or resample-ablated together by our own hooks (resample: sequence b takes
    b − 1's z, the first the last's), second-half loss by hand minus the clean one: group() is its mean and
    ablate_together() gives it per sequence."""
    model, tokens = sharp_random(5), repeated(3, b=4)
    clean = _clean_loss(model, tokens)
    want = (_by_hook(model, tokens, {0: {2: kind}, 1: {1: kind}}) - clean).numpy()
    cap = HA.capture(model, tokens, N)
    assert HA.group(model, cap, tokens, N, [(1, 1), (0, 2)], kind) == pytest.approx(want.mean(), abs=1e-4)
    r = HA.ablate_together(model, tokens, [(1, 1), (0, 2)], kind)
    np.testing.assert_allclose(r.per_sequence, want, atol=1e-4)
    assert r.kind == kind and abs(want.mean()) > 1e-3


# ---- attribution patching ----------------------------------------------------------------------------------------


def _plain_gradients(model, tokens):
    """z of every layer [B, P, H, Dh] and ∂(Σ_b second-half loss by hand)/∂z by one plain backward through the whole
    model (numpy, float64)."""
    zs = []

    def leaf(z, hp):
        zs.append(z.detach().requires_grad_(True))
        return zs[-1]

    names = [(f"blocks.{i}.attn.hook_z", leaf) for i in range(model.cfg.n_layers)]
    with torch.enable_grad(), hooks(model, fwd=names):
        loss = second_half_loss_by_hand(model(tokens), tokens, N).sum()
        grads = torch.autograd.grad(loss, zs)
    return [z.detach().double().numpy() for z in zs], [g.double().numpy() for g in grads]


def _replaced_by_hand(kind: str, z: np.ndarray) -> np.ndarray:
    b = z.shape[0]
    if kind == "zero":
        return np.zeros_like(z)
    if kind == "mean":
        return np.broadcast_to(z.sum(0, keepdims=True) / b, z.shape)
    return z[[(i - 1) % b for i in range(b)]]  # sequence i takes i − 1's


@pytest.mark.parametrize("kind", ["mean", "zero", "resample"])
def test_the_estimate_is_the_replacements_dot_product_with_a_plain_backward(kind):
    """Truth (Syed et al. 2023, Δloss ≈ (z_replaced − z) · ∂loss/∂z): a plain backward through the whole model of
    the by-hand second-half loss summed over sequences, and a plain loop over (layer, head, sequence) of the dot
    product in numpy over every position and dimension, the replacement built in numpy."""
    model, tokens = sharp_random(7), repeated(4, b=3)
    zs, gs = _plain_gradients(model, tokens)
    got = HA.estimate(HA.capture(model, tokens, N), kind)
    want = np.zeros((2, 4, 3))
    for layer, (z, g) in enumerate(zip(zs, gs, strict=True)):
        delta = _replaced_by_hand(kind, z) - z
        for h in range(4):
            for b in range(3):
                want[layer, h, b] = float(np.sum(delta[b, :, h] * g[b, :, h]))
    assert np.abs(want).max() > 1e-3
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-5)


# ---- the per-head summary ----------------------------------------------------------------------------------------


def _grid() -> HA.HeadAblation:
    """Two layers of three heads, by hand: estimates per sequence (2 sequences) 10·layer + head ± 1, so each head's
    mean is 10·layer + head and its sample sd √2; heads 0.2 and 1.0 measured: 0.2 → 4, 8 (mean 6, sd √8), 1.0 →
    −1, −3 (mean −2, sd √2)."""
    est = np.array([[[10 * lay + h - 1, 10 * lay + h + 1] for h in range(3)] for lay in range(2)], dtype=np.float32)
    exact = {(0, 2): np.array([4.0, 8.0]), (1, 0): np.array([-1.0, -3.0])}
    return HA.HeadAblation.measured("mean", est, exact)


def test_best_spread_and_mask_take_the_measurement_at_each_measured_head_only():
    """Truth, by hand on an asymmetric 2 × 3 grid (so a swapped (layer, head) lands elsewhere or out of range):
    best is the estimate's mean except 6 at 0.2 and −2 at 1.0; spread √2 except √8 at 0.2; the mask marks 0.2 and 1.0
    only; the measured heads' estimates are 2 (0.2) and 10 (1.0)."""
    a = _grid()
    want_best = np.array([[0.0, 1.0, 6.0], [-2.0, 11.0, 12.0]])
    np.testing.assert_allclose(a.best(), want_best)
    want_spread = np.full((2, 3), np.sqrt(2))
    want_spread[0, 2], want_spread[1, 0] = np.sqrt(8), np.sqrt(2)
    np.testing.assert_allclose(a.spread(), want_spread, rtol=1e-6)
    assert a.measured_mask().tolist() == [[False, False, True], [True, False, False]]
    assert a.measured_estimate == pytest.approx({(0, 2): 2.0, (1, 0): 10.0})
    assert a.errors() == pytest.approx({(0, 2): 2.0 - 6.0, (1, 0): 10.0 + 2.0})


def test_a_kind_rebuilt_from_its_summary_keeps_every_saved_number_at_its_head():
    """Truth, by hand: from_summary(to_dict(), best(), spread()) of _grid() gives the same measurements (6 ± √8 at
    0.2, −2 ± √2 at 1.0), the saved estimate (2, 10) at each measured head and the saved grid elsewhere (11 at 1.1),
    the same best(), spread() and mask; the estimate's own spread at a measured head was not saved: NaN."""
    a = _grid()
    back = HA.HeadAblation.from_summary(a.to_dict(), a.best(), a.spread())
    assert back.kind == "mean"
    assert back.exact_mean == pytest.approx({(0, 2): 6.0, (1, 0): -2.0})
    assert back.exact_std == pytest.approx({(0, 2): np.sqrt(8), (1, 0): np.sqrt(2)})
    assert back.estimate_mean[0, 2] == 2.0 and back.estimate_mean[1, 0] == 10.0 and back.estimate_mean[1, 1] == 11.0
    assert np.isnan(back.estimate_std[0, 2]) and np.isnan(back.estimate_std[1, 0])
    assert np.isnan(back.estimate_std).sum() == 2
    np.testing.assert_allclose(back.best(), a.best())
    np.testing.assert_allclose(back.spread(), a.spread(), rtol=1e-6)
    assert back.measured_mask().tolist() == a.measured_mask().tolist()
    assert back.agreement() == pytest.approx(a.agreement())


def test_the_random_sample_holds_exactly_the_asked_number_of_other_heads_in_the_seeded_order():
    """Truth, by a loop over torch.randperm(4) from the same seed: hand_built()'s 4 heads, the estimate's largest
    magnitude at 0.1 (top=1), and a random sample of 2 of the 3 others (so the sample is cut short, not exhausted): the
    first two heads of the permutation that are not 0.1, measured under mean-ablation only (3 heads in all)."""
    model, tokens = hand_built(), repeated(5)
    cap = HA.capture(model, tokens, N)
    est = np.zeros((2, 2, 4))
    est[0, 1] = -5.0
    out = HA.ablate_heads(model, cap, tokens, N, 1, 2, torch.Generator().manual_seed(4), kinds=("zero", "mean"),
                          estimates={"zero": est, "mean": est})  # fmt: skip
    order = [divmod(i, 2) for i in torch.randperm(4, generator=torch.Generator().manual_seed(4)).tolist()]
    sample = [lh for lh in order if lh != (0, 1)][:2]
    assert list(out["zero"].exact_mean) == [(0, 1)]
    assert sorted(out["mean"].exact_mean) == sorted([(0, 1), *sample])


def test_a_head_listed_twice_is_measured_once(monkeypatch):
    """Truth: the heads handed to the exact ablation, recorded by a wrapper. A head in ``always`` twice and again in
    ``named`` (and a list instead of a tuple) was measured as often as it was listed; each head is one exact
    ablation, under each kind."""
    model, tokens = hand_built(), repeated(5)
    cap = HA.capture(model, tokens, N)
    est = np.zeros((2, 2, 4))
    asked, exact = [], HA.exact

    def recording(model, cap, tokens, n, layer, heads, kind):
        asked.extend((kind, layer, h) for h in heads)
        return exact(model, cap, tokens, n, layer, heads, kind)

    monkeypatch.setattr(HA, "exact", recording)
    estimates = {"zero": est, "mean": est}
    HA.ablate_heads(model, cap, tokens, N, 0, 0, torch.Generator().manual_seed(0), kinds=("zero", "mean"),
                    always=[(1, 0), (1, 0), [1, 0]], named=[(1, 0), (0, 1)], estimates=estimates)  # fmt: skip
    assert sorted(asked) == [("mean", 0, 1), ("mean", 1, 0), ("zero", 1, 0)]


# ---- key-side path patching --------------------------------------------------------------------------------------


def _heads_fed_by(model, tokens, layer: int, kv_head: int) -> tuple[list[int], torch.Tensor]:
    """The query heads whose attention pattern changes when the model's own keys of one key/value head are scaled by
    our own hook (the model's grouping, whatever it is), and the clean pattern [B, H, P, K]."""
    got = {}

    def keep(p, hp):
        got["p"] = p.detach().clone()

    def scale(k, hp):
        k = k.clone()
        k[:, :, kv_head] *= 3.0
        return k

    pat = f"blocks.{layer}.attn.hook_pattern"
    with torch.no_grad():
        with hooks(model, fwd=[(pat, keep)]):
            model(tokens)
        clean = got["p"]
        with hooks(model, fwd=[(pat, keep), (f"blocks.{layer}.attn.hook_k", scale)]):
            model(tokens)
    diff = (got["p"] - clean).abs().amax((0, 2, 3))
    return [h for h in range(model.cfg.n_heads) if diff[h] > 1e-6], clean


def test_each_key_value_groups_path_patch_names_the_query_heads_its_keys_feed():
    """Truth: the model's own forward (_heads_fed_by): scaling the keys of key/value head g changes the patterns of
    exactly the query heads that share it; each path patch into group g reports those heads, with the JSON's
    "layer.head" names, and their clean induction scores read off the clean pattern by a loop (query q of the second
    copy on key q − n + 1)."""
    model = random_model("rmsnorm", kv_heads=2, attn_only=True, seed=3)
    n, b = 7, 3
    seq = torch.randint(1, model.cfg.d_vocab, (b, n), generator=torch.Generator().manual_seed(1))
    tokens = torch.cat([torch.zeros(b, 1, dtype=torch.long), seq, seq], 1)
    cap, mask = HA.capture(model, tokens, n), induction_mask(tokens.shape[1], n)
    loose = Criterion(min_drop=-1e9, min_share=-1e9)
    for g in (0, 1):
        fed, pattern = _heads_fed_by(model, tokens, 1, g)
        (pp,) = induction_edges(model, cap, tokens, n, {(1, g): [(0, 1)]}, mask, loose)
        assert len(fed) == 2 and list(pp.query_heads) == fed, g
        assert pp.to_dict()["query_heads"] == [f"1.{h}" for h in fed]
        p = pattern.double().numpy()
        want = [np.mean([p[s, h, q, q - n + 1] for s in range(b) for q in range(n + 1, 2 * n + 1)]) for h in fed]
        assert pp.induction_clean == pytest.approx(want, abs=1e-5)
        assert abs(want[0] - want[1]) > 1e-4


# ---- composition -------------------------------------------------------------------------------------------------


def test_composition_in_blocks_of_one_or_two_source_layers_is_the_formula_written_out(monkeypatch):
    """Truth: Elhage et al.'s formula written out in numpy (numpy_scores) on a seeded four-layer model, with the
    product block forced down to one and to two source layers (blocks that end short of the target layer, or
    would run past it): the same scores, and 0 wherever the source is not earlier."""
    from mechscope.lm.models.transformer import HookedTransformer, TransformerConfig

    cfg = TransformerConfig(d_model=16, n_layers=4, n_heads=2, d_head=4, d_vocab=20, n_ctx=8, attn_only=True)
    model = HookedTransformer(cfg).eval()
    model.init_weights(torch.Generator().manual_seed(9), std=0.3)
    view = analysis_weights(model)
    want = numpy_scores(view)
    per_layer = 2 * 4 * 3 * 2 * 4 * 4  # H · Dh · modes · H · Dh · 4 bytes: one source layer
    for layers in (1, 2):
        monkeypatch.setattr(composition, "PRODUCT_BYTES", layers * per_layer)
        got = composition_scores(view)
        for m in "QKV":
            np.testing.assert_allclose(got[m].numpy(), want[m], atol=2e-6, err_msg=f"{m} {layers}")
