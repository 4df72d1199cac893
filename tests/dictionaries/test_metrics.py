"""Metrics against independent numpy float64 computations written another way."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mechscope.core.dictionaries import metrics as M
from mechscope.core.errors import MechscopeError

from .conftest import one_line_error


@pytest.fixture()
def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 12)) + 4.0  # a large mean: against-zero and against-mean differ
    x_hat = x + 0.5 * rng.normal(size=x.shape)
    f = np.maximum(rng.normal(size=(300, 40)) - 1.0, 0.0)
    return x, x_hat, f


def t(a):
    return torch.tensor(a, dtype=torch.float32)


def np_metrics(x, x_hat, f):
    n = x.shape[0]
    err = np.einsum("nd,nd->n", x - x_hat, x - x_hat)
    centred = x - x.sum(axis=0) / n
    cos = [float(np.dot(a, b) / math.sqrt(np.dot(a, a) * np.dot(b, b))) for a, b in zip(x, x_hat, strict=True)]
    ratio = [math.sqrt(np.dot(b, b)) / math.sqrt(np.dot(a, a)) for a, b in zip(x, x_hat, strict=True)]
    return {
        "l0": np.count_nonzero(f) / n,
        "mse": err.sum() / x.size,
        "squared_error": err.sum() / n,
        "explained_variance": 1 - err.sum() / np.einsum("nd,nd->", centred, centred),
        "cosine_similarity": sum(cos) / n,
        "l2_ratio": sum(ratio) / n,
        "relative_reconstruction_bias": np.einsum("nd,nd->", x_hat, x_hat) / np.einsum("nd,nd->", x, x_hat),
    }


def test_batch_metrics_match_numpy(data):
    x, x_hat, f = data
    want = np_metrics(x, x_hat, f)
    X, Xh = t(x), t(x_hat)
    got = {
        "l0": M.l0(t(f)),
        "mse": M.mse(X, Xh),
        "squared_error": M.squared_error(X, Xh),
        "explained_variance": M.explained_variance(X, Xh),
        "cosine_similarity": M.cosine_similarity(X, Xh),
        "l2_ratio": M.l2_ratio(X, Xh),
        "relative_reconstruction_bias": M.relative_reconstruction_bias(X, Xh),
    }
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_explained_variance_is_against_the_mean_not_zero(data):
    x, x_hat, _ = data
    against_zero = 1 - ((x - x_hat) ** 2).sum() / (x**2).sum()
    against_mean = 1 - ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    got = M.explained_variance(t(x), t(x_hat))
    assert against_zero > 0.98 and against_mean < 0.85  # the two really differ here
    assert got == pytest.approx(against_mean, rel=1e-5)
    # predicting the mean explains nothing; predicting zero explains less than nothing
    mean_pred = np.broadcast_to(x.mean(0), x.shape)
    assert M.explained_variance(t(x), t(mean_pred)) == pytest.approx(0.0, abs=1e-5)
    assert M.explained_variance(t(x), torch.zeros(x.shape)) < -10


def test_streaming_equals_one_batch(data):
    x, x_hat, f = data
    acc = M.StreamingMetrics(12, 40)
    for lo, hi in ((0, 7), (7, 150), (150, 151), (151, 300)):
        acc.update(t(x[lo:hi]), t(x_hat[lo:hi]), t(f[lo:hi]))
    r = acc.result()
    want = np_metrics(x, x_hat, f)
    for key, value in want.items():
        assert getattr(r, key) == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert r.tokens == 300
    freq = (f != 0).mean(0)
    assert r.dead_fraction == pytest.approx((freq == 0).mean())
    assert r.dense_fraction == pytest.approx((freq > 0.1).mean())
    assert r.to_dict()["schema"] == "mechscope.dictionary_metrics/1"


def test_dead_and_dense_latents():
    f = torch.zeros(100, 5)
    f[:3, 0] = 1.0  # 3%: alive, not dense
    f[:50, 1] = 2.0  # 50%: dense
    f[0, 3] = 0.5
    counts = (f != 0).sum(0)
    assert M.dead_latents(counts).tolist() == [2, 4]
    assert M.dense_latents(counts, 100).tolist() == [1]
    assert M.dense_latents(counts, 100, threshold=0.02).tolist() == [0, 1]


def test_spliced_effects_formulas():
    assert M.ce_loss_recovered(clean=2.0, spliced=2.5, zero_ablated=7.0) == pytest.approx(0.9)
    assert M.accuracy_recovered(clean=0.99, spliced=0.95, ablated=0.10) == pytest.approx(0.85 / 0.89)
    assert math.isnan(M.ce_loss_recovered(clean=2.0, spliced=2.0, zero_ablated=2.0))
    assert M.kl_recovered(kl_spliced=0.1, kl_zero_ablated=2.0) == pytest.approx(0.95)
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(4, 9, 30)), rng.normal(size=(4, 9, 30))
    p = np.exp(a) / np.exp(a).sum(-1, keepdims=True)
    q = np.exp(b) / np.exp(b).sum(-1, keepdims=True)
    want = (p * np.log(p / q)).sum(-1)
    assert M.kl_divergence(t(a), t(b)) == pytest.approx(want.mean(), rel=1e-5)
    torch.testing.assert_close(M.kl_divergence(t(a), t(b), reduction="none"), torch.tensor(want), rtol=1e-5, atol=1e-6)
    assert M.kl_divergence(t(a), t(a)) == pytest.approx(0.0, abs=1e-9)


def test_bad_metric_inputs_are_one_line_errors():
    with pytest.raises(MechscopeError) as e:
        M.mse(torch.zeros(3, 4), torch.zeros(3, 5))
    one_line_error(e)
    with pytest.raises(MechscopeError) as e:
        M.StreamingMetrics(4, 6).result()
    one_line_error(e)
