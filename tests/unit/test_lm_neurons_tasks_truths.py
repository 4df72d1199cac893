"""`lm neurons` and the induction task's metrics against outside truths: texts built so a neuron's previous token,
firing count and top token are known, a baseline sample of all-distinct tokens (log2 k bits), densities counted by
hand from the cache, a summary of hand-made entropies, and the induction metrics written out (logit differences by
hand, the KL from torch.distributions)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.distributions import Categorical, kl_divergence

from mechscope.core.hooks import run_with_cache
from mechscope.lm.methods.neurons import (
    Concentration,
    LayerNeurons,
    NeuronsResult,
    random_baseline,
    read_neurons,
    top_activations,
)
from mechscope.lm.methods.tasks import induction_task
from tests.unit.test_folding import random_model
from tests.unit.test_heads import hand_built
from tests.unit.test_neurons import P, constructed_model, zipf_text

TRIGGER, BEFORE = 5, 3  # constructed_model's neuron 0 fires on token 5 only


def trigger_text(places: int, seed: int) -> torch.Tensor:
    """Zipf windows [300, P] with every token 5 replaced (by 6), then "3 5" written at ``places`` seeded spots, none at
    a window's start, none overlapping: token 5 occurs exactly ``places`` times, always after a 3."""
    tokens = zipf_text(300 * P, seed=seed).view(300, P).clone()
    tokens[tokens == TRIGGER] = TRIGGER + 1
    g = torch.Generator().manual_seed(seed)
    rows = torch.randperm(300, generator=g)[:places]  # one spot per window: no overlap
    cols = torch.randint(1, P, (places,), generator=g)  # the 5's position: 1..P-1, so a 3 precedes it in-window
    tokens[rows, cols - 1] = BEFORE
    tokens[rows, cols] = TRIGGER
    assert int((tokens == TRIGGER).sum()) == places
    return tokens


def test_previous_token_is_the_one_before_the_trigger():
    """Truth: in this text token 5 (neuron 0's trigger) always follows token 3, so its firing contexts' previous
    token is 3 (share 1) and their bigram is (3, 5); reading the current token as the previous gives (5, 5)."""
    tokens = trigger_text(150, seed=1)
    f = read_neurons(constructed_model(), tokens, name="constructed", k=100, n_contexts=0).layers[0].figures[0]
    assert f.n == 100 and f.top_token == TRIGGER and f.top_share == 1.0
    assert f.prev_token == BEFORE and f.prev_share == 1.0
    assert f.bigram == (BEFORE, TRIGGER) and f.bigram_share == 1.0


def test_only_firing_contexts_are_counted():
    """Truth: token 5 occurs 20 times (a hand count), and neuron 0 is positive there only; with k = 100 its
    firing contexts are those 20 (one token: entropy 0, share 1), not all 100 of its top activations."""
    tokens = trigger_text(20, seed=2)
    r = read_neurons(constructed_model(), tokens, name="constructed", k=100, min_count=10, n_contexts=0)
    f = r.layers[0].figures[0]
    assert f.n == int((tokens == TRIGGER).sum()) == 20
    assert f.top_token == TRIGGER and f.top_share == 1.0 and f.entropy == 0.0
    assert r.layers[0].counted(10)[0]


def test_baseline_leaves_out_the_skipped_bos():
    """Truth: after the BOS column (token 0) the 80 tokens are 1..80, all distinct, so every draw of k = 80 of them
    holds each once: log2(80) bits, top share 1/80, in every draw (the BOS would bring repeats of 0)."""
    tokens = torch.cat([torch.zeros(10, 1, dtype=torch.long), torch.arange(1, 81).view(10, 8)], 1)
    b = random_baseline(tokens, k=80, seed=0, skip_first=1)
    assert b["k"] == 80
    for key in ("entropy_mean", "entropy_p05", "entropy_p95"):
        assert b[key] == pytest.approx(math.log2(80), abs=1e-12)
    assert b["top_share_mean"] == pytest.approx(1 / 80, abs=1e-15)


def test_density_per_layer_is_the_hand_counted_share():
    """Truth: per layer, a neuron's density is the share of counted positions (after the BOS) where hook_post is
    positive, counted by hand from one cached run; each layer on its own, not shared among the layers read."""
    model = random_model(seed=0).eval()
    tokens = torch.randint(0, 50, (12, 16), generator=torch.Generator().manual_seed(4))
    layers = [0, 2]
    top = top_activations(model, tokens, layers, k=20, batch=5, skip_first=1)
    names = [f"blocks.{i}.mlp.hook_post" for i in layers]
    with torch.no_grad():
        _, cache = run_with_cache(model, tokens, names=names)
    for j, name in enumerate(names):
        act = cache[name][:, 1:]  # [12, 15, 48]
        by_hand = (act > 0).float().mean((0, 1))
        assert 0.05 < float(by_hand.mean()) < 0.95  # neither all nor none: the share means something
        assert top.density[j].tolist() == pytest.approx(by_hand.tolist(), abs=1e-6)
        assert top.mean[j].tolist() == pytest.approx(act.float().mean((0, 1)).tolist(), abs=1e-5)


def test_below_baseline_share_is_against_the_5th_percentile():
    """Truth: counted entropies 0.0, 3.0, 3.2 against a baseline 5th percentile of 2.5 (mean 3.1): only 0.0 is
    below, 1/3 (below the mean would be 2/3); a rarely active neuron (n = 3) is not counted."""

    def fig(n, e):
        return Concentration(n, e, 1, 0.5, 2, 0.1, (2, 1), 0.1)

    figs = (fig(20, 0.0), fig(20, 3.0), fig(20, 3.2), fig(3, 0.0))
    lay = LayerNeurons(0, "blocks.0.mlp.hook_post", figs, (1.0,) * 4, (0.1,) * 4, ((),) * 4)
    base = {"k": 20, "draws": 8, "entropy_mean": 3.1, "entropy_p05": 2.5, "entropy_p95": 3.6, "top_share_mean": 0.2,
            "top_share_p95": 0.3}  # fmt: skip
    sample = {"sequences": 1, "length": 4, "tokens": 4, "seed": 0, "source": "hand", "skip_first": 0}
    r = NeuronsResult("hand-made", 20, 10, sample, base, (lay,), tokens=torch.tensor([[1, 2, 1, 3]]))
    s = r.summary()
    assert s["all"]["neurons"] == 3 and s["all"]["rarely_active"] == 1
    assert s["all"]["below_baseline_p05"] == pytest.approx(1 / 3)
    assert s["layer 0"]["below_baseline_p05"] == pytest.approx(1 / 3)


def _induction(metric: str):
    model = hand_built()
    task = induction_task(model, metric, n=10, batch=4, seed=0, token_range=(1, 100))
    with torch.no_grad():
        clean = model(task.clean)
    return task, clean


def test_induction_logit_diff_written_out():
    """Truth: the metric is mean over second-copy positions q = n+1..2n-1 of out[b, q, clean next token] -
    out[b, q, corrupted next token], written out in loops; hand_built() predicts the clean next token, so on its
    clean run the metric is large and positive."""
    task, clean = _induction("logit_diff")
    assert float(task.metric(clean)) > 3.0  # about +7.40 here (n = 10, batch 4, seed 0)
    n, ids, bad = 10, task.clean, task.corrupted
    out = torch.randn(clean.shape, generator=torch.Generator().manual_seed(7))
    diffs = [float(out[b, q, ids[b, q + 1]] - out[b, q, bad[b, q + 1]])
             for b in range(ids.shape[0]) for q in range(n + 1, 2 * n)]  # fmt: skip
    assert len(diffs) == 4 * 9 and float(task.metric(out)) == pytest.approx(np.mean(diffs), rel=1e-6, abs=1e-9)


def test_induction_kl_is_from_the_clean_predictions():
    """Truth: the documented "KL divergence from the clean run's predictions" is KL(clean || out) per second-copy
    position q = n+1..2n-1 (torch.distributions), averaged; against uniform logits (out = 0) the reverse direction
    differs by about 0.75 nats, and at the clean run itself it is 0."""
    task, clean = _induction("kl")
    q = torch.arange(11, 20)
    out = torch.zeros_like(clean)
    p_clean, p_out = Categorical(logits=clean[:, q].double()), Categorical(logits=out[:, q].double())
    truth = float(kl_divergence(p_clean, p_out).mean())
    reverse = float(kl_divergence(p_out, p_clean).mean())
    assert abs(reverse - truth) > 0.5  # the two directions are told apart here (about 4.08 against 3.33)
    assert float(task.metric(out)) == pytest.approx(truth, rel=1e-6)
    assert float(task.metric(clean)) == pytest.approx(0.0, abs=1e-9)
