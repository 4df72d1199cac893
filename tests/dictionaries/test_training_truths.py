"""The training side of the dictionaries against outside truths written apart from the code under test.

Truths: the losses in numpy from their papers (Bricken et al. 2023 / Anthropic's April 2024 update: the L1 of f
weighted by the decoder row norms; Rajamanoharan et al. 2024: the L0 penalty; Gao et al. 2024: TopK and AuxK with
a constant residual, its W_dec gradient by hand); Adam's first step (Kingma & Ba 2015: ``lr g / (|g| + eps)``)
followed by the tangent projection, row renormalisation and threshold clamp the module docstrings promise; the
normalisation factor and decoder bias of the first ``init_rows`` rows in numpy; dead latents, resampling and
logged metrics by plain loops over the recorded steps; Towards Monosemanticity's resampling of the encoder column
and Adam moments; numpy's ``array_split`` for the rank slices; the planted magnitudes' uniform law.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

import mechscope.core.dictionaries.train  # noqa: F401  (the module; the package re-exports the function)
from mechscope.core.dictionaries import DictionaryConfig, SparseDictionary, TrainConfig, planted_features, train
from mechscope.core.dictionaries.dead import resample_dead
from mechscope.core.dictionaries.losses import step_loss
from mechscope.core.dictionaries.parallel import split

from .test_outside_truths import np64
from .test_training import data, quick

TRAIN = sys.modules["mechscope.core.dictionaries.train"]


def np_latents(model, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x' normalised, z, f) in numpy float64 for relu, jumprelu and topk (the paper's forward pass)."""
    cfg = model.cfg
    W_enc, b_enc, b_dec = (np64(p) for p in (model.W_enc, model.b_enc, model.b_dec))
    xn = x * float(model.in_scale) if cfg.normalize_activations != "none" else x
    z = (xn - b_dec) @ W_enc + b_enc
    if cfg.architecture == "relu":
        f = np.maximum(z, 0)
    elif cfg.architecture == "jumprelu":
        f = np.where(z > np64(model.threshold), z, 0.0)
    else:  # topk, row by row
        f = np.zeros_like(z)
        for n, row in enumerate(z):
            top = np.argsort(row)[::-1][: cfg.k]
            f[n, top] = np.maximum(row[top], 0)
    return xn, z, f


# ---- the losses ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["relu", "jumprelu", "topk"])
def test_step_loss_terms_equal_the_papers_formulas_in_numpy(arch, random_model):
    """rec = mean_n sum_d (y' - y_hat')^2; relu: l1 * s * mean_n sum_i f_ni ||W_dec,i|| (rows made non-unit here);
    jumprelu: l0 * s * mean_n #{i: z_ni > theta_i}; topk: no penalty, latents ReLU(TopK(z))."""
    model = random_model(architecture=arch, k=4, l1_coefficient=0.7, l0_coefficient=0.3,
                         normalize_activations="expected_average_only_in")  # fmt: skip
    with torch.no_grad():
        model.in_scale.fill_(1.7)
        model.out_scale.fill_(1.7)
        model.W_dec.mul_(torch.linspace(0.5, 2.0, 10)[:, None])
    x = torch.randn(30, 6, generator=torch.Generator().manual_seed(2))
    xn, z, f = np_latents(model, x.double().numpy())
    out = f @ np64(model.W_dec) + np64(model.b_dec)
    rec = ((out - xn) ** 2).sum(1).mean()
    if arch == "relu":
        penalty = 0.7 * (f * np.linalg.norm(np64(model.W_dec), axis=1)).sum(1).mean()
    elif arch == "jumprelu":
        penalty = 0.3 * (z > np64(model.threshold)).sum(1).mean()
    else:
        penalty = 0.0
        assert ((z > 0).sum(1) < 4).any()  # some kept pre-activations are <= 0: ReLU(TopK) zeroes them
    got = step_loss(model, x, x, sparsity_scale=0.25)
    np.testing.assert_allclose(np64(got.latents), f, rtol=1e-5, atol=1e-6)
    assert float(got.reconstruction.detach()) == pytest.approx(rec, rel=1e-5)
    assert float(got.sparsity.detach()) == pytest.approx(0.25 * penalty, rel=1e-5, abs=1e-12)
    assert float(got.total.detach()) == pytest.approx(rec + 0.25 * penalty, rel=1e-5)


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])  # the sparse fast path and the dense one
def test_aux_k_gradient_treats_the_residual_as_a_constant(arch, random_model):
    """Gao et al. A.2: e = y' - y_hat' is a fixed target, e_hat = A W_dec (A: dead latents' top-k_aux ReLU'd
    pre-activations), so d/dW_dec alpha mean_n ||e_hat_n - e_n||^2 = 2 alpha / N A^T (A W_dec - e), by hand."""
    model = random_model(architecture=arch, k=2)
    x = torch.randn(40, 6, generator=torch.Generator().manual_seed(5))
    dead = torch.zeros(10, dtype=torch.bool)
    dead[[0, 2, 3, 5, 6, 8, 9]] = True
    out = step_loss(model, x, x, dead_mask=dead)
    W_dec, b_dec = np64(model.W_dec), np64(model.b_dec)
    e = x.double().numpy() - (np64(out.latents) @ W_dec + b_dec)  # the kept latents are checked elsewhere
    _, z, _ = np_latents(model, x.double().numpy())  # only z: the pre-activations
    A = np.zeros_like(z)
    dead_idx = np.flatnonzero(dead.numpy())
    for n in range(z.shape[0]):
        chosen = dead_idx[np.argsort(z[n, dead_idx])[::-1][: model.cfg.k_aux]]
        A[n, chosen] = np.maximum(z[n, chosen], 0)
    want = 2 * model.cfg.aux_k_coefficient / z.shape[0] * A.T @ (A @ W_dec - e)
    out.aux.backward()
    assert np.abs(want).max() > 1e-3
    np.testing.assert_allclose(np64(model.W_dec.grad), want, rtol=1e-4, atol=1e-6)


# ---- one training step by hand ------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["relu", "jumprelu"])
def test_one_training_step_is_adams_first_step_projected_and_renormalised(arch):
    """Adam's first step moves each weight by lr g / (|g| + eps) (bias-corrected moments m = g, v = g^2); the
    decoder gradient loses its component along each row before it, the rows are renormalised and the thresholds
    clamped at 0 after it; the sparsity coefficient is at 1/4 of its warm-up at step 1."""
    cfg = DictionaryConfig(d_in=6, d_sae=16, architecture=arch, l1_coefficient=0.5, l0_coefficient=0.001,
                           bandwidth=0.5, init_threshold=0.001, dtype="float64")  # fmt: skip
    x = torch.randn(32, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    lr = 0.01
    tc = TrainConfig(lr=lr, b_dec_init="zeros", init_rows=32, seed=5, progress=False, sparsity_warmup_steps=4)
    trained = train(cfg, [x], tc).model
    hand = SparseDictionary(cfg, generator=torch.Generator().manual_seed(5))
    step_loss(hand, x, x, sparsity_scale=0.25).total.backward()
    want = {}
    for name, p in hand.named_parameters():
        g = p.grad.clone()
        if name == "W_dec":
            unit = p.detach() / p.detach().norm(dim=1, keepdim=True)
            g -= (g * unit).sum(1, keepdim=True) * unit
        want[name] = p.detach() - lr * g / (g.abs() + 1e-8)
    want["W_dec"] = want["W_dec"] / want["W_dec"].norm(dim=1, keepdim=True)
    if arch == "jumprelu":
        assert (want["threshold"] < 0).any()  # the clamp matters here
        want["threshold"] = want["threshold"].clamp_min(0)
    for name, p in trained.named_parameters():
        torch.testing.assert_close(p.detach(), want[name], rtol=0, atol=1e-10, msg=name)


# ---- initialisation from the first rows ------------------------------------------------------------------------


@pytest.mark.parametrize("transcoder", [False, True])
def test_normalisation_and_decoder_bias_come_from_the_first_init_rows(transcoder):
    """s = sqrt(d / mean_n ||x_n||^2) over the first init_rows = 100 rows (not the 128 of the two batches read
    for them), in and out separately for a transcoder; b_dec "mean" = the mean of those target rows times s_out."""
    xs = data(3)
    batches = [(x, 2 * x[:, :5] + 1) for x in xs] if transcoder else xs
    cfg = DictionaryConfig(d_in=12, d_sae=16, transcoder=transcoder, d_out=5 if transcoder else None,
                           normalize_activations="expected_average_only_in")  # fmt: skip
    tc = TrainConfig(lr=1e-9, init_rows=100, b_dec_init="mean", max_steps=1, progress=False)
    r = train(cfg, batches, tc)
    x = torch.cat(xs).double().numpy()[:100]
    y = 2 * x[:, :5] + 1 if transcoder else x
    s_in = np.sqrt(x.shape[1] / (x**2).sum(1).mean())
    s_out = np.sqrt(y.shape[1] / (y**2).sum(1).mean())
    assert r.in_scale == pytest.approx(s_in, rel=1e-9) and r.out_scale == pytest.approx(s_out, rel=1e-9)
    np.testing.assert_allclose(np64(r.model.b_dec), s_out * y.mean(0), atol=1e-6)


# ---- dead latents and resampling by a plain loop ----------------------------------------------------------------


def record_steps(monkeypatch) -> tuple[list, list]:
    """Each step's StepLoss and dead mask, and each resampling's (dead mask), recorded around the real code."""
    steps, resamples = [], []
    real_loss, real_resample = TRAIN.step_loss, TRAIN.resample_dead

    def loss(*args, **kw):
        out = real_loss(*args, **kw)
        steps.append((out, kw["dead_mask"].clone()))
        return out

    def resample(model, opt, dead, *args, **kw):
        resamples.append((len(steps), dead.clone()))
        return real_resample(model, opt, dead, *args, **kw)

    monkeypatch.setattr(TRAIN, "step_loss", loss)
    monkeypatch.setattr(TRAIN, "resample_dead", resample)
    return steps, resamples


def test_dead_latents_and_resampling_follow_a_plain_count_over_the_batches(monkeypatch):
    """A latent is dead once silent for >= window = 128 tokens (2 batches of 64: the boundary is hit); resampling
    at steps 3, 6, 9 takes the dead set and restarts their counts; the logged dead fraction is the count after."""
    steps, resamples = record_steps(monkeypatch)
    cfg = DictionaryConfig(d_in=12, d_sae=32, l1_coefficient=10.0)
    tc = quick(lr=0.05, dead_window=128, resample_every=3, log_every=1, max_steps=9)
    r = train(cfg, data(9), tc)
    since = [0] * 32
    expected_resamples, fractions, seen_dead = [], [], 0
    for step, (out, dead_mask) in enumerate(steps, start=1):
        assert dead_mask.tolist() == [s >= 128 for s in since], step
        fired = (out.latents.detach() > 0).any(0).tolist()
        since = [0 if fired[i] else since[i] + 64 for i in range(32)]
        if step % 3 == 0:
            expected_resamples.append((step, [s >= 128 for s in since]))
            seen_dead += sum(s >= 128 for s in since)
            since = [0 if s >= 128 else s for s in since]
        fractions.append(sum(s >= 128 for s in since) / 32)
    assert seen_dead > 0 and any(0 < f < 1 for f in [d.double().mean() for _, d in steps])
    assert [(s, d.tolist()) for s, d in resamples] == expected_resamples
    assert [h["dead_fraction"] for h in r.history] == pytest.approx(fractions)


RESUMED = {
    "relu-resampling": DictionaryConfig(d_in=12, d_sae=32, l1_coefficient=10.0),
    "topk-auxk": DictionaryConfig(d_in=12, d_sae=32, architecture="topk", k=1),
}


@pytest.mark.parametrize(("name", "at"), [("relu-resampling", 5), ("relu-resampling", 7), ("topk-auxk", 5)])
def test_a_run_resumed_while_latents_are_dead_equals_the_uninterrupted_one(name, at, tmp_path):
    """Bit for bit (train's docstring), with latents dead at the checkpoint: their silent counts at step 5 decide the
    resampling at step 6 (relu) or AuxK's dead set (topk); at step 7 the generator has drawn for step 6's resampling
    and draws again at step 9."""
    tc = quick(lr=0.05, dead_window=128, resample_every=3 if name.startswith("relu") else None, log_every=1,
               max_steps=9, lr_decay_steps=4)  # fmt: skip
    whole = train(RESUMED[name], data(9), tc)
    assert whole.history[at - 1]["dead_fraction"] > 0  # dead latents at the checkpoint
    train(RESUMED[name], data(at), quick(**(tc.__dict__ | {"checkpoint_dir": str(tmp_path), "checkpoint_every": at})))
    rest = train(RESUMED[name], data(9), tc, resume_from=tmp_path)
    a, b = whole.model.state_dict(), rest.model.state_dict()
    assert rest.resumed_from_step == at and all(torch.equal(a[k], b[k]) for k in a)
    assert rest.history == whole.history


def test_resampling_sets_the_encoder_column_and_zeroes_only_the_dead_moments(random_model):
    """Towards Monosemanticity: the encoder column is the drawn input as the encoder sees it (s x - b_dec), at
    0.2 x the mean norm of the living columns; both Adam moments of the dead latents' weights are zeroed and the
    living latents' moments are kept."""
    model = random_model(normalize_activations="expected_average_only_in")
    with torch.no_grad():
        model.in_scale.fill_(2.0)
        model.out_scale.fill_(2.0)
    x = torch.randn(64, 6, generator=torch.Generator().manual_seed(0))
    x[17] = 100 * torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0, 0.25])  # the worst reconstructed: always drawn
    opt = torch.optim.Adam(model.parameters())
    step_loss(model, x, x).total.backward()
    opt.step()
    dead = torch.tensor([True, False, True, True, False, False, False, False, True, False])
    before = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()}
    W_enc = np64(model.W_enc)
    alive_norm = np.linalg.norm(W_enc[:, ~dead.numpy()], axis=0).mean()
    enc_in = 2.0 * x[17].double().numpy() - np64(model.b_dec)
    resample_dead(model, opt, dead, x, x, torch.Generator().manual_seed(0))
    for i in (0, 2, 3, 8):
        np.testing.assert_allclose(np64(model.W_enc[:, i]), 0.2 * alive_norm * enc_in / np.linalg.norm(enc_in),
                                   rtol=1e-5, atol=1e-6)  # fmt: skip
    axes = {"W_enc": 1, "W_dec": 0, "b_enc": 0}
    for name, p in model.named_parameters():
        for key in ("exp_avg", "exp_avg_sq"):
            old, new = before[id(p)][key], opt.state[p][key]
            if name not in axes:
                assert torch.equal(old, new), (name, key)
                continue
            dead_part, alive_part = (new.index_select(axes[name], torch.nonzero(m).flatten()) for m in (dead, ~dead))
            assert torch.all(dead_part == 0), (name, key)
            keep = old.index_select(axes[name], torch.nonzero(~dead).flatten())
            assert torch.equal(alive_part, keep) and keep.abs().sum() > 0, (name, key)


# ---- logged metrics -------------------------------------------------------------------------------------------


def test_logged_metrics_are_the_recorded_steps_by_hand(monkeypatch):
    """Each logged step: loss = the step's total loss, l0 = mean nonzero latents per token, explained variance =
    1 - sum ||t - o||^2 / sum ||t - mean_n t||^2 (against the batch mean), all in numpy from the step's tensors."""
    steps, _ = record_steps(monkeypatch)
    cfg = DictionaryConfig(
        d_in=12, d_sae=32, architecture="topk", k=3, normalize_activations="expected_average_only_in"
    )
    r = train(cfg, data(5), quick(log_every=1))
    assert len(r.history) == 5
    for h, (out, _) in zip(r.history, steps, strict=True):
        t, o, f = np64(out.target), np64(out.output), np64(out.latents)
        ev = 1 - ((t - o) ** 2).sum() / ((t - t.mean(0)) ** 2).sum()
        assert h["loss"] == pytest.approx(float(out.total.detach()), rel=1e-6)
        assert h["l0"] == pytest.approx(np.count_nonzero(f) / f.shape[0])
        assert h["explained_variance"] == pytest.approx(ev, rel=1e-6)
    assert 0 < r.history[-1]["explained_variance"] < 1 and r.history[-1]["l0"] > 1


# ---- rank slices and planted magnitudes ------------------------------------------------------------------------


def test_rank_slices_are_numpys_array_split():
    for n in (0, 1, 5, 7, 12, 13):
        for world in (1, 2, 3, 5):
            want = np.array_split(np.arange(n), world)
            for rank in range(world):
                assert list(range(n))[split(n, rank, world)] == want[rank].tolist(), (n, rank, world)


def test_planted_magnitudes_are_uniform_on_the_given_range():
    """c_i = a_i m_i with m_i ~ U[low, high]: the firing coefficients lie in [0.5, 2.0] with mean 1.25 and the
    quartiles of U[0.5, 2] (0.875, 1.25, 1.625); each fires with p = 0.1."""
    planted = planted_features(16, 8, probability=0.1, magnitude=(0.5, 2.0), seed=0)
    x, c = planted.sample(20000, torch.Generator().manual_seed(1))
    fired = c[c > 0].double().numpy()
    assert fired.min() >= 0.5 and fired.max() <= 2.0
    np.testing.assert_allclose(np.quantile(fired, [0.25, 0.5, 0.75]), [0.875, 1.25, 1.625], atol=0.03)
    assert abs(fired.size / c.numel() - 0.1) < 0.005
    np.testing.assert_allclose(x.double().numpy(), c.double().numpy() @ np64(planted.features), atol=1e-5)
