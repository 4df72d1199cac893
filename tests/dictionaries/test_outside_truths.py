"""Dictionaries against outside truths computed independently of the code under test.

Each expected value comes from scipy, numpy float64 or a hand count/schedule written from the cited definition,
never from the helper under test: the geometric median (scipy's minimiser of sum ||p - m||), the training
schedule (hand factors, and the rates Adam really used), AuxK (Gao et al. 2024, A.2, by hand), resampling
(Towards Monosemanticity: draws proportional to loss^2, the decoder row the drawn target less b_dec), dead and
dense fractions and the recovered fraction (hand counts), MCC (scipy's Hungarian matching), the SAELens loader
(SAELens' JumpReLU forward with a norm scaling factor, by hand) and BatchTopK's threshold (Bussmann et al.
2024: the mean over batches of the smallest kept activation; SAELens' running average of it).
"""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from scipy.optimize import linear_sum_assignment, minimize
from torch.optim.optimizer import register_optimizer_step_pre_hook

import mechscope.core.dictionaries.train  # noqa: F401  (the module; the package re-exports the function)
from mechscope.core.dictionaries import (
    DictionaryConfig,
    SparseDictionary,
    StreamingMetrics,
    TrainConfig,
    estimate_batchtopk_threshold,
    load_saelens,
    mcc,
    planted_features,
    recovery,
    train,
)
from mechscope.core.dictionaries.dead import resample_dead
from mechscope.core.dictionaries.initialisation import decoder_bias_init, geometric_median
from mechscope.core.dictionaries.losses import step_loss

TRAIN = sys.modules["mechscope.core.dictionaries.train"]


def np64(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


# ---- geometric median -----------------------------------------------------------------------------------


def outlier_points() -> np.ndarray:
    rng = np.random.default_rng(0)
    pts = rng.normal(size=(30, 3))
    return np.vstack([pts, [[400.0, -300.0, 500.0]]])  # one far outlier drags the mean by ~12 per axis


def scipy_median(pts: np.ndarray) -> np.ndarray:
    def total(m):
        return np.sqrt(((pts - m) ** 2).sum(1)).sum()

    def grad(m):
        diff = m - pts
        return (diff / np.sqrt((diff**2).sum(1))[:, None]).sum(0)

    res = minimize(total, np.median(pts, axis=0), jac=grad, method="BFGS", options={"gtol": 1e-12})
    res = minimize(total, res.x, method="Nelder-Mead", options={"xatol": 1e-12, "fatol": 1e-14, "maxiter": 20000})
    return res.x


def test_geometric_median_is_scipys_minimiser_of_summed_distances():
    pts = outlier_points()
    want = scipy_median(pts)
    assert np.linalg.norm(want - pts.mean(0)) > 10  # the mean is far from the answer here
    got = geometric_median(torch.tensor(pts, dtype=torch.float32)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(decoder_bias_init(torch.tensor(pts), "geometric_median").numpy(), want, atol=1e-5)
    # and training starts its decoder bias there (one step at a negligible rate moves it by ~1e-9)
    cfg = DictionaryConfig(d_in=3, d_sae=4)
    r = train(cfg, [torch.tensor(pts, dtype=torch.float32)], TrainConfig(lr=1e-9, init_rows=31, progress=False))
    np.testing.assert_allclose(np64(r.model.b_dec), want, atol=1e-5)


# ---- the training schedule --------------------------------------------------------------------------------

# lr_warmup 4, lr_decay 5, sparsity_warmup 8, max_steps 12. Warm-up: step/4 up to 1. Decay: linear to 0 over
# the last 5 steps (8 < s <= 12), each of them 1/5 lower than the one before, the last at 1/5 (step 13 would be 0).
SCHEDULE = dict(lr_warmup_steps=4, lr_decay_steps=5, sparsity_warmup_steps=8, max_steps=12)
HAND_LR = [0.25, 0.5, 0.75, 1, 1, 1, 1, 1, 0.8, 0.6, 0.4, 0.2]
HAND_SPARSITY = [0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1, 1, 1, 1, 1]


def test_schedule_factors_at_hand_steps():
    tc = TrainConfig(progress=False, **SCHEDULE)
    for step, (lr, sp) in enumerate(zip(HAND_LR, HAND_SPARSITY, strict=True), start=1):
        assert TRAIN._factors(tc, step) == pytest.approx((lr, sp)), step


def test_a_training_run_uses_the_hand_schedule(monkeypatch):
    seen_lr, seen_sparsity = [], []
    real_step_loss = TRAIN.step_loss

    def recording_step_loss(*args, **kw):
        seen_sparsity.append(kw["sparsity_scale"])
        return real_step_loss(*args, **kw)

    monkeypatch.setattr(TRAIN, "step_loss", recording_step_loss)
    handle = register_optimizer_step_pre_hook(lambda opt, a, k: seen_lr.append([g["lr"] for g in opt.param_groups]))
    try:
        cfg = DictionaryConfig(d_in=12, d_sae=16, l1_coefficient=1.0)
        batches = list(planted_features(24, 12, seed=0).batches(15, 32, seed=1))
        train(cfg, batches, TrainConfig(lr=2e-3, progress=False, init_rows=64, **SCHEDULE))
    finally:
        handle.remove()
    assert len(seen_lr) == 12 and all(len(set(g)) == 1 for g in seen_lr)
    assert [g[0] for g in seen_lr] == pytest.approx([2e-3 * f for f in HAND_LR])
    assert seen_sparsity == pytest.approx(HAND_SPARSITY)


# ---- AuxK ---------------------------------------------------------------------------------------------------


def hand_aux_k(model, x: np.ndarray, dead: np.ndarray, batch: bool) -> float:
    """Gao et al. A.2 in numpy: e = x - x_hat (the model's own TopK/BatchTopK output), e_hat = the dead latents'
    top k_aux ReLU'd pre-activations through W_dec (no bias); alpha * mean_n ||e - e_hat||^2."""
    cfg = model.cfg
    W_enc, b_enc, W_dec, b_dec = (np64(p) for p in (model.W_enc, model.b_enc, model.W_dec, model.b_dec))
    pre = (x - b_dec) @ W_enc + b_enc
    acts = np.maximum(pre, 0)
    if batch:  # the k * N largest of the batch
        cut = np.sort(acts.ravel())[::-1][cfg.k * x.shape[0] - 1]
        f = np.where((acts >= cut) & (acts > 0), acts, 0)
    else:
        f = np.zeros_like(pre)
        for n, row in enumerate(pre):
            top = np.argsort(row)[::-1][: cfg.k]
            f[n, top] = np.maximum(row[top], 0)
    residual = x - (f @ W_dec + b_dec)
    k_aux = min(cfg.k_aux, int(dead.sum()))
    dead_idx = np.flatnonzero(dead)
    e_hat = np.zeros_like(x)
    for n in range(x.shape[0]):
        chosen = dead_idx[np.argsort(pre[n, dead_idx])[::-1][:k_aux]]
        e_hat[n] = np.maximum(pre[n, chosen], 0) @ W_dec[chosen]
    return cfg.aux_k_coefficient * float(((residual - e_hat) ** 2).sum(1).mean())


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])  # topk: the sparse fast path; batchtopk: the dense one
@pytest.mark.parametrize("dead_latents", [[0, 2, 3, 5, 6, 8, 9], [1, 7]])  # n_dead > k_aux = 3, and < it
def test_aux_k_loss_equals_a_hand_topk_over_the_dead_latents(arch, dead_latents, random_model):
    model = random_model(architecture=arch, k=2)
    x = torch.randn(40, 6, generator=torch.Generator().manual_seed(5))
    dead = torch.zeros(10, dtype=torch.bool)
    dead[dead_latents] = True
    want = hand_aux_k(model, x.double().numpy(), dead.numpy(), batch=arch == "batchtopk")
    assert want > 1e-3
    out = step_loss(model, x, x, dead_mask=dead)
    assert float(out.aux.detach()) == pytest.approx(want, rel=1e-4)
    assert float(out.total.detach()) == pytest.approx(float(out.reconstruction.detach()) + want, rel=1e-4)
    assert float(step_loss(model, x, x, dead_mask=torch.zeros(10, dtype=torch.bool)).aux) == 0.0


# ---- resampling ---------------------------------------------------------------------------------------------


def test_resampling_points_the_decoder_at_the_worst_input_sign_included(random_model):
    model = random_model(normalize_activations="expected_average_only_in")
    with torch.no_grad():
        model.in_scale.fill_(2.0)
        model.out_scale.fill_(2.0)
    x = torch.randn(64, 6, generator=torch.Generator().manual_seed(0))
    x[17] = 100 * torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0, 0.25])  # reconstructed terribly: loss^2 picks it
    dead = torch.tensor([True, False, True, True, False, False, False, False, True, False])
    opt = torch.optim.Adam(model.parameters())
    want = 2.0 * x[17].double().numpy() - np64(model.b_dec)  # the target in training units, less b_dec
    want /= np.linalg.norm(want)
    assert resample_dead(model, opt, dead, x, x, torch.Generator().manual_seed(0)) == 4
    for i in (0, 2, 3, 8):
        np.testing.assert_allclose(np64(model.W_dec[i]), want, atol=1e-6)


def test_resampling_draws_inputs_in_proportion_to_squared_loss():
    """All latents dead, so the output is b_dec and row n's loss is ||x_n - b_dec||^2 = n + 1 for n = 0, 1, 2
    (row 3 is exactly b_dec: loss 0). Draws by loss^2: 1:4:9 (/14); by loss: 1:2:3 (/6); uniform: 1/4 each."""
    cfg = DictionaryConfig(d_in=4, d_sae=3000, dtype="float64")
    model = SparseDictionary(cfg, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    dirs = torch.randn(3, 4, generator=g, dtype=torch.float64)
    dirs /= dirs.norm(dim=1, keepdim=True)
    c = torch.tensor([0.3, -0.2, 0.1, 0.5], dtype=torch.float64)
    with torch.no_grad():
        model.b_dec.copy_(c)
        model.b_enc.fill_(-1e3)
    x = torch.stack([c + math.sqrt(n + 1) * dirs[n] for n in range(3)] + [c])
    opt = torch.optim.Adam(model.parameters())
    assert resample_dead(model, opt, torch.ones(3000, dtype=torch.bool), x, x, torch.Generator().manual_seed(2)) == 3000
    dist = torch.cdist(model.W_dec.detach(), dirs)  # each new row is one of the three directions, sign included
    assert float(dist.min(dim=1).values.max()) < 1e-6
    freq = np.bincount(dist.argmin(dim=1).numpy(), minlength=3) / 3000
    np.testing.assert_allclose(freq, np.array([1, 4, 9]) / 14, atol=0.03)


# ---- dead, dense, MCC and recovered fractions ----------------------------------------------------------------


def test_dead_and_dense_fractions_of_planted_latents():
    n, f = 200, torch.zeros(200, 10)
    # latents 0-2 never fire; 3: 10 tokens (5%); 4: 180 (90%); 5: 20 (10%, not above it); 6: 22 (11%); 7-9: 1
    for latent, tokens in {3: 10, 4: 180, 5: 20, 6: 22, 7: 1, 8: 1, 9: 1}.items():
        rows = torch.randperm(n, generator=torch.Generator().manual_seed(latent))[:tokens]
        f[rows, latent] = 0.5 + latent
    x = torch.randn(n, 4, generator=torch.Generator().manual_seed(0))
    for threshold, dense in ((0.1, 2), (0.04, 4), (0.95, 0)):
        acc = StreamingMetrics(4, 10, dense_threshold=threshold)
        acc.update(x[:73], x[:73] * 0.9, f[:73])
        acc.update(x[73:], x[73:] * 0.9, f[73:])
        r = acc.result()
        assert r.dead_fraction == pytest.approx(3 / 10)
        assert r.dense_fraction == pytest.approx(dense / 10), threshold


def test_mcc_uses_the_optimal_matching_not_the_greedy_one():
    """|corr| = [[.6, .5], [.5, 0]] by construction: greedy takes .6 then 0 (mean .3), Hungarian .5 + .5."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 4))
    u, _ = np.linalg.qr(a - a.mean(0))  # orthonormal, zero-mean columns
    coefficients = u[:, :2]
    first = 0.6 * u[:, 0] + 0.5 * u[:, 1] + math.sqrt(0.39) * u[:, 2]  # unit norm: corr = the coefficients
    second = 0.5 * u[:, 0] + math.sqrt(0.75) * u[:, 3]
    latents = np.stack([first, second], 1)
    corr = np.abs(np.corrcoef(coefficients.T, latents.T)[:2, 2:])
    np.testing.assert_allclose(corr, [[0.6, 0.5], [0.5, 0.0]], atol=1e-9)
    assert mcc(torch.tensor(coefficients), torch.tensor(latents)) == pytest.approx(0.5)
    # a bigger random case against scipy on numpy's correlations
    c, f = rng.normal(size=(300, 5)), rng.normal(size=(300, 7))
    f[:, :5] += 0.8 * c[:, [1, 0, 0, 3, 2]] + 0.6 * c[:, [0, 1, 4, 4, 3]]
    corr = np.abs(np.corrcoef(c.T, f.T)[:5, 5:])
    rows, cols = linear_sum_assignment(corr, maximize=True)
    assert mcc(torch.tensor(c), torch.tensor(f)) == pytest.approx(corr[rows, cols].mean(), rel=1e-9)


def test_recovered_fraction_is_the_share_of_features_with_a_close_decoder_row():
    planted = planted_features(8, 16, seed=0)
    F = planted.features.double()
    g = torch.Generator().manual_seed(4)

    def at_cosine(i, cos):  # a unit vector at the given cosine with feature i
        v = torch.randn(16, generator=g, dtype=torch.float64)
        v = v - (v @ F[i]) * F[i]
        return cos * F[i] + math.sqrt(1 - cos**2) * v / v.norm()

    rows = [F[0], at_cosine(1, 0.95), at_cosine(2, 0.85), -F[3], at_cosine(4, 0.905), at_cosine(5, 0.5)]
    rows += [torch.randn(16, generator=g, dtype=torch.float64) for _ in range(4)]
    model = SparseDictionary(DictionaryConfig(d_in=16, d_sae=10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.W_dec.copy_(torch.stack([r / r.norm() for r in rows]).float())
    d = np.stack([np64(r) / np.linalg.norm(np64(r)) for r in rows])
    best = (np64(F) @ d.T).max(1)  # signed: a negated direction is not a recovery
    for cut in (0.9, 0.8):
        want = float(np.count_nonzero(best >= cut)) / 8
        assert 0 < want < 1
        assert recovery(model, planted, tokens=256, threshold=cut).recovered_fraction == pytest.approx(want), cut
    assert recovery(model, planted, tokens=256, threshold=0.9).recovered_fraction == pytest.approx(3 / 8)


# ---- the SAELens loader --------------------------------------------------------------------------------------


def test_saelens_jumprelu_with_log_threshold_and_norm_factor_matches_the_saelens_formula(tmp_path):
    """SAELens' JumpReLU with normalize_activations=expected_average_only_in and factor s:
    x' = s x; z = (x' - b_dec) W_enc + b_enc; f = ReLU(z) * (z > exp(log_threshold)); y = (f W_dec + b_dec) / s."""
    g = torch.Generator().manual_seed(0)
    w = {
        "W_enc": torch.randn(5, 8, generator=g),
        "b_enc": 0.3 * torch.randn(8, generator=g),
        "W_dec": torch.randn(8, 5, generator=g),
        "b_dec": torch.randn(5, generator=g),
        "log_threshold": torch.log(torch.linspace(0.1, 0.8, 8)),
    }
    cfg = {"d_in": 5, "d_sae": 8, "architecture": "jumprelu", "dtype": "float32", "apply_b_dec_to_input": True,
           "normalize_activations": "expected_average_only_in"}  # fmt: skip
    tmp_path.joinpath("cfg.json").write_text(json.dumps(cfg))
    save_file(w, str(tmp_path / "sae_weights.safetensors"))
    s = 0.37
    model = load_saelens(tmp_path, norm_scaling_factor=s).model
    W = {k: v.double().numpy() for k, v in w.items()}
    x = torch.randn(200, 5, generator=g)
    z = (s * x.double().numpy() - W["b_dec"]) @ W["W_enc"] + W["b_enc"]
    theta = np.exp(W["log_threshold"])
    f = np.maximum(z, 0) * (z > theta)
    y = (f @ W["W_dec"] + W["b_dec"]) / s
    assert 0.1 < (f > 0).mean() < 0.9 and ((z > 0) & (z <= theta)).any()  # the threshold matters here
    out, latents = model(x)
    np.testing.assert_allclose(np64(latents), f, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np64(out), y, rtol=1e-5, atol=1e-4)


# ---- BatchTopK's inference threshold --------------------------------------------------------------------------


BTK = DictionaryConfig(d_in=12, d_sae=32, architecture="batchtopk", k=3)
BTK_DATA = planted_features(24, 12, probability=0.08, seed=0)


def test_batchtopk_threshold_is_the_running_average_of_the_smallest_kept_activation(monkeypatch):
    """SAELens / Bussmann et al.'s code: theta <- (1 - lr) theta + lr * min(kept), here started at the first
    batch's minimum; recomputed by hand from each step's latents."""
    minima = []
    real_step_loss = TRAIN.step_loss

    def recording_step_loss(*args, **kw):
        out = real_step_loss(*args, **kw)
        kept = out.latents.detach().double()
        minima.append(float(kept[kept > 0].min()))
        return out

    monkeypatch.setattr(TRAIN, "step_loss", recording_step_loss)
    tc = TrainConfig(lr=3e-3, progress=False, init_rows=256, batchtopk_threshold_lr=0.05)
    model = train(BTK, list(BTK_DATA.batches(40, 64, seed=1)), tc).model
    want = minima[0]
    for m in minima[1:]:
        want = 0.95 * want + 0.05 * m
    assert len(minima) == 40 and float(model.threshold[0]) == pytest.approx(want, rel=1e-5)


def test_batchtopk_threshold_reproduces_k_after_a_run_long_enough_for_the_average():
    """After 300 steps (the first batch's weight 0.99^299 = 5%) the running threshold is the paper's estimate
    with the final model (mean over held-out batches of the smallest kept activation, computed here by hand) and
    the inference L0 on held-out tokens is k = 3 within 15%."""
    model = train(BTK, BTK_DATA.batches(300, 64, seed=1), TrainConfig(lr=3e-3, progress=False, init_rows=256)).model
    theta = float(model.threshold[0])
    held_out = list(BTK_DATA.batches(20, 64, seed=99))
    minima = []
    with torch.no_grad():
        W_enc, b_enc, b_dec = (np64(p) for p in (model.W_enc, model.b_enc, model.b_dec))
        for x in held_out:
            acts = np.maximum((x.double().numpy() - b_dec) @ W_enc + b_enc, 0).ravel()
            minima.append(np.sort(acts)[::-1][3 * 64 - 1])  # the (k B)-th largest: the smallest kept
    assert theta == pytest.approx(float(np.mean(minima)), rel=0.1)
    l0 = float((model.encode(torch.cat(held_out)) > 0).sum(-1).double().mean())
    assert abs(l0 - 3) < 0.45, (theta, l0)
    assert estimate_batchtopk_threshold(model, held_out) == pytest.approx(float(np.mean(minima)), rel=1e-5)
