"""Second pass over the dictionaries' building blocks (losses, activations, latents, synthetic data, config, dead
latents, initialisation) against outside truths written apart from the code under test.

Truths: Rajamanoharan et al. 2024 ("Jumping Ahead"): JumpReLU ``z H(z - theta)`` with the threshold kept >= 0, its
L0 penalty, and the rectangle-kernel pseudo-derivatives (eqs. 11-13) written as plain loops, ``d/dz`` against
central finite differences; Bussmann et al. 2024 BatchTopK: the ``k B`` largest of the batch by a numpy sort;
Gao et al. 2024 (B.1): ``k_aux = d_in / 2`` and ``alpha = 1/32``; the TopK sparse fast path against the dense
path's autograd; hand-planted latents with known rows, values and frequencies counted by plain loops; the Gaussian
copula of the planted data against scipy's bivariate normal; dead latents by a plain count; the normalisation
factor and decoder bias in numpy.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from scipy.stats import multivariate_normal, norm

from mechscope.core.dictionaries import DictionaryConfig, mcc, planted_features
from mechscope.core.dictionaries.activations import batch_topk, jumprelu, step, topk_relu
from mechscope.core.dictionaries.dead import LatentActivity
from mechscope.core.dictionaries.initialisation import decoder_bias_init, norm_scale
from mechscope.core.dictionaries.latents import LatentCollector, densities, latent_summary, maxima
from mechscope.core.dictionaries.losses import step_loss
from mechscope.core.dictionaries.synthetic import _greedy_matching
from mechscope.core.errors import MechscopeError

from .test_outside_truths import np64

# ---- JumpReLU and its L0 penalty -----------------------------------------------------------------------------


def test_jumprelu_l0_penalty_counts_entries_above_the_threshold_clamped_at_zero(random_model):
    """Jumping Ahead eq. 10 with the threshold kept >= 0 (config docstring): l0 * s * mean_n #{i: z_ni > max(theta_i,
    0)}, z by numpy. Some thresholds are negative and some pre-activations lie between them and 0."""
    model = random_model(architecture="jumprelu", l0_coefficient=0.7)
    theta = torch.tensor([-0.5, -0.2, -0.05, 0.0, 0.02, 0.05, 0.1, -1.0, 0.2, 0.3])
    with torch.no_grad():
        model.threshold.copy_(theta)
    x = torch.randn(30, 6, generator=torch.Generator().manual_seed(11)) * 0.3
    z = (np64(x) - np64(model.b_dec)) @ np64(model.W_enc) + np64(model.b_enc)
    between = (z > theta.numpy()[None]) & (z <= 0)
    assert between.sum() > 5  # the clamp matters on this batch
    count = sum(int(z[n, i] > max(float(theta[i]), 0.0)) for n in range(30) for i in range(10))
    out = step_loss(model, x, x, sparsity_scale=0.25)
    assert float(out.sparsity.detach()) == pytest.approx(0.7 * 0.25 * count / 30, rel=1e-6)


def test_jumprelu_forward_is_zero_at_the_threshold_and_its_gradients_follow_the_paper():
    """JumpReLU(z) = z H(z - theta) with H(0) = 0 (SAELens: ``x * (x > threshold)``); d/dz = H(z - theta) (checked
    against central finite differences away from the jump); d/dtheta = -(theta/eps) K((z - theta)/eps) with K the
    open rectangle 1[|u| < 1/2], summed over tokens (eq. 11), by a plain loop. eps = 0.5 and dyadic values make
    u = +-1/2 exact."""
    eps = 0.5
    theta0 = [0.25, 0.75, 1.5]
    z0 = [[0.25, 0.5, 1.25], [0.0, 0.75, 1.75], [0.375, 1.0, 2.0], [0.125, 0.625, 1.5]]
    z = torch.tensor(z0, dtype=torch.float64, requires_grad=True)
    theta = torch.tensor(theta0, dtype=torch.float64, requires_grad=True)
    w = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0], [10.0, 11.0, 12.0]], dtype=torch.float64)
    f = jumprelu(z, theta, eps)
    want_f = [[zv if zv > theta0[i] else 0.0 for i, zv in enumerate(row)] for row in z0]
    np.testing.assert_array_equal(f.detach().numpy(), want_f)
    (f * w).sum().backward()
    want_theta = [0.0, 0.0, 0.0]
    for n, row in enumerate(z0):
        for i, zv in enumerate(row):
            u = (zv - theta0[i]) / eps
            want_theta[i] += -(theta0[i] / eps) * float(-0.5 < u < 0.5) * float(w[n, i])
    np.testing.assert_allclose(theta.grad.numpy(), want_theta)
    zz = z.detach().clone()
    fd = np.zeros_like(z0)
    for n in range(4):
        for i in range(3):
            if zz[n, i] == theta0[i]:
                fd[n, i] = 0.0  # at the jump: the documented H(0) = 0
                continue
            h = torch.zeros_like(zz)
            h[n, i] = 1e-6
            up, down = jumprelu(zz + h, theta.detach(), eps), jumprelu(zz - h, theta.detach(), eps)
            fd[n, i] = float(((up - down) * w).sum()) / 2e-6
    np.testing.assert_allclose(z.grad.numpy(), fd, atol=1e-6)


def test_step_pseudo_gradient_is_minus_kernel_over_eps_summed_over_tokens():
    """Jumping Ahead eq. 13: d/dtheta H(z - theta) = -(1/eps) K((z - theta)/eps), K = 1[|u| < 1/2], a plain loop;
    H has no gradient in z. Same dyadic grid as above, eps = 0.5."""
    eps = 0.5
    theta0 = [0.25, 0.75, 1.5]
    z0 = [[0.25, 0.5, 1.25], [0.0, 0.75, 1.75], [0.375, 1.0, 2.0], [0.125, 0.625, 1.5]]
    theta = torch.tensor(theta0, dtype=torch.float64, requires_grad=True)
    w = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0], [10.0, 11.0, 12.0]], dtype=torch.float64)
    h = step(torch.tensor(z0, dtype=torch.float64), theta, eps)
    np.testing.assert_array_equal(h.detach().numpy(), [[float(v > theta0[i]) for i, v in enumerate(r)] for r in z0])
    (h * w).sum().backward()
    want = [0.0, 0.0, 0.0]
    for n, row in enumerate(z0):
        for i, zv in enumerate(row):
            want[i] += -(1 / eps) * float(-0.5 < (zv - theta0[i]) / eps < 0.5) * float(w[n, i])
    np.testing.assert_allclose(theta.grad.numpy(), want)


def test_topk_relu_rectifies_kept_negatives_row_by_row():
    """Gao et al. eq. 2, ReLU(TopK(z)), by a plain loop with numpy argsort: each row keeps its k = 3 largest and
    zeroes the negative ones among them (row 1 has only one positive entry)."""
    pre = torch.tensor([[0.5, -0.2, 1.5, 0.25, -3.0], [-0.1, -0.4, 0.75, -2.0, -0.3], [2.0, 1.0, 3.0, 4.0, 0.0]])
    want = np.zeros((3, 5))
    for n, row in enumerate(pre.numpy()):
        for i in np.argsort(row)[::-1][:3]:
            want[n, i] = max(float(row[i]), 0.0)
    assert np.count_nonzero(want[1]) == 1
    np.testing.assert_array_equal(topk_relu(pre, 3).numpy(), want)


# ---- BatchTopK ------------------------------------------------------------------------------------------------


def test_batch_topk_keeps_every_entry_tied_with_the_kth_largest():
    """Bussmann et al. eq. 3 with the documented ties rule: t = the (k B)-th largest ReLU(pre) of the batch (numpy
    sort), kept = ReLU(pre) >= t and > 0. Here k B = 3 and the 3rd largest value 1.5 appears three times."""
    pre = torch.tensor([[3.0, 1.5, -1.0, 0.5], [1.5, 2.0, 0.25, -2.0], [1.5, 0.0, -0.5, 1.0]])
    acts = np.maximum(pre.numpy(), 0)
    t = np.sort(acts.ravel())[::-1][3 - 1]
    want = np.where((acts >= t) & (acts > 0), acts, 0.0)
    assert np.count_nonzero(want) == 5
    np.testing.assert_array_equal(batch_topk(pre, 1).numpy(), want)


# ---- the TopK sparse fast path ---------------------------------------------------------------------------------


def hand_topk_loss(params: dict, cfg, x, y, dead) -> torch.Tensor:
    """Gao et al. eq. 2 and A.2 written densely in float64 with the kept sets chosen by numpy argsort: f = ReLU(z)
    on each row's top k, y_hat = f W_dec + b_dec (+ x W_skip^T), rec = mean_n ||y - y_hat||^2, plus
    alpha mean_n ||e - e_hat||^2 with e = (y - y_hat) held constant and e_hat from the top min(k_aux, #dead) dead z."""
    x_in = x - params["b_dec"] if cfg.apply_b_dec_to_input else x
    z = x_in @ params["W_enc"] + params["b_enc"]
    zn = z.detach().numpy()
    keep, aux_keep = np.zeros(zn.shape), np.zeros(zn.shape)
    dead_idx = np.flatnonzero(dead)
    for n, row in enumerate(zn):
        keep[n, np.argsort(row)[::-1][: cfg.k]] = 1
        aux_keep[n, dead_idx[np.argsort(row[dead_idx])[::-1][: min(cfg.k_aux, len(dead_idx))]]] = 1
    out = (z.relu() * torch.tensor(keep)) @ params["W_dec"] + params["b_dec"]
    if cfg.skip:
        out = out + x @ params["W_skip"].T
    e = (y - out).detach()
    e_hat = (z.relu() * torch.tensor(aux_keep)) @ params["W_dec"]
    return (y - out).pow(2).sum(1).mean() + cfg.aux_k_coefficient * (e - e_hat).pow(2).sum(1).mean()


@pytest.mark.parametrize("kw", [{}, {"transcoder": True, "skip": True, "d_out": 5}])
def test_topk_fast_path_loss_and_gradients_equal_autograd_of_the_dense_formula(kw, random_model):
    """The sparse fast path (float32, GatherPre and an embedding bag) against autograd through the dense formula
    above in float64: the same loss and the same gradient of every parameter. Two dead latents, fewer than
    k_aux = d_in / 2 = 3, so AuxK uses min(3, 2) = 2 (never a living latent)."""
    model = random_model(architecture="topk", k=3, **kw)
    g = torch.Generator().manual_seed(21)
    x = torch.randn(12, 6, generator=g)
    y = torch.randn(12, model.cfg.d_out, generator=g) if kw else x
    dead = torch.zeros(10, dtype=torch.bool)
    dead[[1, 4]] = True
    params = {k: p.detach().double().requires_grad_() for k, p in model.named_parameters()}
    want = hand_topk_loss(params, model.cfg, x.double(), y.double(), dead.numpy())
    want.backward()
    got = step_loss(model, x, y, dead_mask=dead)
    assert float(got.aux.detach()) > 1e-3
    assert float(got.total.detach()) == pytest.approx(float(want.detach()), rel=1e-5)
    got.total.backward()
    for name, p in model.named_parameters():
        np.testing.assert_allclose(p.grad.double().numpy(), params[name].grad.numpy(), rtol=1e-4, atol=1e-5)


# ---- latent statistics -----------------------------------------------------------------------------------------

# rows 0-2 arrive in one batch, rows 3-7 in the next; latent 0 never fires, latent 1 fires once (row 6)
F = np.array(
    [
        [0.0, 0.0, 0.7, 0.0],
        [0.0, 0.0, 0.2, 1.1],
        [0.0, 0.0, 0.0, 1.3],
        [0.0, 0.0, 0.9, 0.4],
        [0.0, 0.0, 0.5, 0.0],
        [0.0, 0.0, 0.1, 0.8],
        [0.0, 2.5, 0.6, 0.0],
        [0.0, 0.0, 0.3, 0.0],
    ],
    dtype=np.float32,
)


def collected():
    c = LatentCollector(4)
    c.update(torch.tensor(F[:3]))
    c.update(torch.tensor(F[3:]))
    return c.result()


def test_collected_activations_are_the_nonzero_cells_numbered_across_batches():
    """A plain loop over the hand-built [8, 4] latents: every nonzero (row, latent, value), rows numbered in the
    order fed across the two batches, sorted by latent then row; densities = fires / 8, maxima by hand."""
    acts = collected()
    cells = sorted((j, i, float(F[i, j])) for i in range(8) for j in range(4) if F[i, j] != 0)
    got = list(zip(acts.latents.tolist(), acts.rows.tolist(), acts.values.tolist(), strict=True))
    assert [(j, i) for j, i, _ in got] == [(j, i) for j, i, _ in cells]
    np.testing.assert_allclose([v for *_, v in got], [v for *_, v in cells], rtol=1e-6)
    assert acts.n_rows == 8
    np.testing.assert_allclose(densities(acts), [0 / 8, 1 / 8, 7 / 8, 4 / 8])
    np.testing.assert_allclose(maxima(acts), [0.0, 2.5, 0.9, 1.3], rtol=1e-6)
    np.testing.assert_array_equal(acts.dense(3), F[:, 3])


def test_latent_summary_of_a_hand_built_latent():
    """Latent 2 fires on rows 0,1,3,4,5,6,7 with 0.7,0.2,0.9,0.5,0.1,0.6,0.3: density 7/8, max 0.9, mean when
    active 3.3/7 (not over all 8 rows), the top 3 rows 3,0,6 in decreasing order, and a 3-bin histogram of
    [0, 0.9] counted by hand."""
    s = latent_summary(collected(), 2, k=3, bins=3)
    assert s.density == pytest.approx(7 / 8)
    assert s.max == pytest.approx(0.9)
    assert s.mean_when_active == pytest.approx(3.3 / 7)
    assert s.top_rows == (3, 0, 6)
    np.testing.assert_allclose(s.top_values, [0.9, 0.7, 0.6], rtol=1e-6)
    vals = [0.7, 0.2, 0.9, 0.5, 0.1, 0.6, 0.3]
    counts = [sum(1 for v in vals if lo <= v < lo + 0.3 or (b == 2 and v == 0.9)) for b, lo in enumerate((0, 0.3, 0.6))]
    assert counts == [2, 2, 3]
    assert s.hist_counts == tuple(counts)
    np.testing.assert_allclose(s.hist_edges, [0.0, 0.3, 0.6, 0.9], rtol=1e-6)


def test_quantile_bands_hold_every_row_of_their_band_largest_first():
    """Bands (q_i, q_{i+1}] of latent 2's nonzero values, the first closed at the minimum (module docstring); with
    per_band above any band's size every row of a band is drawn. numpy's quantiles of the 7 values, a plain loop."""
    vals = {0: 0.7, 1: 0.2, 3: 0.9, 4: 0.5, 5: 0.1, 6: 0.6, 7: 0.3}
    edges = np.quantile(np.array(list(vals.values()), dtype=np.float32).astype(np.float64), [0, 0.5, 1])
    s = latent_summary(collected(), 2, bands=2, per_band=10)
    np.testing.assert_allclose(s.band_edges, edges)
    want = []
    for b in range(2):
        inside = [r for r, v in vals.items() if (edges[b] < np.float32(v) or b == 0) and np.float32(v) <= edges[b + 1]]
        want.append(tuple(sorted(inside, key=lambda r: -vals[r])))
    assert want == [(4, 7, 1, 5), (3, 0, 6)]
    assert s.band_rows == tuple(want)
    assert [len(v) for v in s.band_values] == [4, 3]
    assert list(s.band_values[0]) == sorted(s.band_values[0], reverse=True)


# ---- planted data ----------------------------------------------------------------------------------------------


def test_correlated_firing_is_a_gaussian_copula_with_scipys_joint_probabilities():
    """Sharkey et al.'s correlated features as the module docstring states them: feature i fires when
    sqrt(rho) s_g + sqrt(1 - rho) e_i > Phi^-1(1 - p), groups of 3 consecutive features. Each fires with p = 0.2;
    two of one group fire together with scipy's bivariate normal orthant probability at correlation rho = 0.5;
    features of different groups independently (p^2)."""
    p, rho = 0.2, 0.5
    planted = planted_features(6, 4, probability=p, rho=rho, group_size=3, seed=2)
    _, c = planted.sample(40000, torch.Generator().manual_seed(7))
    fires = (c > 0).double().numpy()
    np.testing.assert_allclose(fires.mean(0), p, atol=0.01)
    cut = norm.ppf(1 - p)
    both = 1 - 2 * norm.cdf(cut) + multivariate_normal([0, 0], [[1, rho], [rho, 1]]).cdf([cut, cut])
    assert both > 2 * p**2
    for i, j in ((0, 1), (1, 2), (3, 5)):  # same group
        assert (fires[:, i] * fires[:, j]).mean() == pytest.approx(both, abs=0.006), (i, j)
    for i, j in ((2, 3), (0, 4), (1, 5)):  # different groups
        assert (fires[:, i] * fires[:, j]).mean() == pytest.approx(p**2, abs=0.005), (i, j)


def test_greedy_matching_without_scipy_is_one_to_one():
    """The fallback matching (scipy absent) by hand: on |corr| = [[.9, .8, .2], [.85, .1, .3]] greedy takes .9
    at (0, 0), which retires row 0 and column 0, then .3 at (1, 2): mean .6 (not .875 reusing column 0)."""
    c = torch.tensor([[0.9, 0.8, 0.2], [0.85, 0.1, 0.3]], dtype=torch.float64)
    assert _greedy_matching(c) == pytest.approx((0.9 + 0.3) / 2)


def test_mcc_counts_anti_correlated_latents_by_their_absolute_correlation():
    """MCC = mean |corr| over scipy's optimal matching of numpy's corrcoef (Khemakhem et al. 2020): latents that
    are negated, permuted, noisy copies of the coefficients score as well as their positive twins."""
    rng = np.random.default_rng(5)
    c = rng.normal(size=(400, 4))
    f = -c[:, [2, 0, 3, 1]] + 0.7 * rng.normal(size=(400, 4))
    corr = np.abs(np.corrcoef(c.T, f.T)[:4, 4:])
    rows, cols = linear_sum_assignment(corr, maximize=True)
    assert corr[rows, cols].mean() > 0.7
    assert mcc(torch.tensor(c), torch.tensor(f)) == pytest.approx(corr[rows, cols].mean(), rel=1e-9)


# ---- config ----------------------------------------------------------------------------------------------------


def test_aux_k_defaults_are_gao_et_als_b1():
    """Gao et al. 2024 B.1: k_aux = d_in / 2 (d_in = 10, d_sae = 40 apart so they cannot be swapped), capped at
    d_sae; alpha = 1/32; k = d_sae is allowed (keep every latent)."""
    cfg = DictionaryConfig(d_in=10, d_sae=40, architecture="topk", k=40)
    assert cfg.k_aux == 5
    assert cfg.aux_k_coefficient == 1 / 32
    assert DictionaryConfig(d_in=64, d_sae=12, architecture="topk", k=3).k_aux == 12
    assert DictionaryConfig(d_in=64, d_sae=40, architecture="topk", k=3, aux_k=50).k_aux == 40
    assert DictionaryConfig(d_in=64, d_sae=40, architecture="topk", k=3, aux_k=7).k_aux == 7


# ---- dead latents ----------------------------------------------------------------------------------------------


def test_dead_latents_are_those_silent_for_at_least_the_window_by_a_plain_count():
    """A latent is dead once it has not fired on any of the last `window` tokens: a plain loop over steps of
    17, 5, 9 and 30 tokens counts tokens since each latent last fired (a latent firing this step: 0)."""
    fired_steps = [[1, 0, 0, 1], [0, 0, 1, 1], [0, 1, 0, 0], [0, 0, 0, 1]]
    tokens = [17, 5, 9, 30]
    activity = LatentActivity(4)
    since = [0, 0, 0, 0]
    for fired, n in zip(fired_steps, tokens, strict=True):
        activity.update(torch.tensor(fired, dtype=torch.bool), n)
        since = [0 if f else s + n for f, s in zip(fired, since, strict=True)]
    assert since == [44, 30, 39, 0]
    assert activity.since.tolist() == since
    for window in (30, 39, 40, 44, 45):
        want = [s >= window for s in since]
        assert activity.dead(window).tolist() == want, window


# ---- initialisation --------------------------------------------------------------------------------------------


def test_norm_scale_makes_the_mean_squared_norm_the_width():
    """Anthropic's April 2024 update: s x has E||s x||^2 = d, checked in numpy on a [50, 7] sample (M != d)."""
    x = torch.randn(50, 7, generator=torch.Generator().manual_seed(3)) * 2.5 + 0.4
    s = norm_scale(x)
    assert float(((s * np64(x)) ** 2).sum(1).mean()) == pytest.approx(7.0, rel=1e-9)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e200])
def test_norm_scale_of_non_finite_activations_is_refused_saying_so(bad):
    """A NaN gives no factor (it was refused as "no non-zero norm"), an infinite value gave a factor of 0 without a
    word, and 1e200 squares past float64 (1e400 > 1.8e308) to the same: each is one line naming the cause."""
    x = torch.ones(4, 3, dtype=torch.float64)
    x[2, 1] = bad
    with pytest.raises(MechscopeError, match="expected finite activations"):
        norm_scale(x)


def test_decoder_bias_mean_and_zeros_are_numpys():
    """'mean' is the column mean (numpy float64), not a median; 'zeros' is zeros of the output width."""
    x = torch.tensor([[0.0, 1.0, 5.0], [1.0, 2.0, 0.0], [8.0, 3.0, 1.0], [3.0, 10.0, 2.0]])
    np.testing.assert_allclose(decoder_bias_init(x, "mean").numpy(), np64(x).mean(0))
    np.testing.assert_array_equal(decoder_bias_init(x, "zeros").numpy(), np.zeros(3))


def test_geometric_median_is_not_stuck_on_a_data_point_at_the_mean():
    """Points on a line at -5, 0, 1, 2, 2 (mean 0, itself a point): the sum of distances is 10 at 0 and 9 at the
    1-D median 1, its unique minimiser (a hand sum)."""
    pts = torch.tensor([[-5.0, 0.0], [0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [2.0, 0.0]])
    m = decoder_bias_init(pts, "geometric_median")
    total = sum(float(np.linalg.norm(np64(p) - m.numpy())) for p in pts)
    assert total == pytest.approx(9.0, abs=1e-6)
    np.testing.assert_allclose(m.numpy(), [1.0, 0.0], atol=1e-4)
