"""Training: determinism, checkpoints and resuming, dead latents, and the data it refuses."""

from __future__ import annotations

import json

import pytest
import torch

from mechscope.core.dictionaries import (
    DictionaryConfig,
    TrainConfig,
    estimate_batchtopk_threshold,
    planted_features,
    train,
)
from mechscope.core.dictionaries.dead import resample_dead
from mechscope.core.dictionaries.losses import step_loss
from mechscope.core.dictionaries.sae import SparseDictionary
from mechscope.core.errors import MechscopeError

from .conftest import one_line_error

PLANTED = planted_features(24, 12, probability=0.08, seed=0)


def data(n=40, bs=64):
    return list(PLANTED.batches(n, bs, seed=1))


def quick(**kw) -> TrainConfig:
    return TrainConfig(**({"lr": 3e-3, "progress": False, "log_every": 5, "init_rows": 256, "dead_window": 640} | kw))


CONFIGS = {
    "relu": DictionaryConfig(d_in=12, d_sae=32, l1_coefficient=1.0, normalize_activations="expected_average_only_in"),
    "topk": DictionaryConfig(d_in=12, d_sae=32, architecture="topk", k=3),
    "batchtopk": DictionaryConfig(d_in=12, d_sae=32, architecture="batchtopk", k=3),
    "jumprelu": DictionaryConfig(
        d_in=12, d_sae=32, architecture="jumprelu", l0_coefficient=0.5, bandwidth=0.1, init_threshold=0.1
    ),
}


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_same_seed_gives_bit_identical_weights(arch):
    batches = data(20)
    a = train(CONFIGS[arch], batches, quick(seed=7))
    b = train(CONFIGS[arch], batches, quick(seed=7))
    c = train(CONFIGS[arch], batches, quick(seed=8))
    assert same_weights(a.model, b.model)
    assert not same_weights(a.model, c.model)
    assert a.history == b.history and a.steps == 20 and a.rows == 20 * 64


@pytest.mark.parametrize("arch", ["relu", "batchtopk", "jumprelu"])
def test_resume_equals_an_uninterrupted_run(arch, tmp_path):
    batches = data(30)
    tc = quick(resample_every=10, lr_decay_steps=10, max_steps=30, sparsity_warmup_steps=10, lr_warmup_steps=5)
    whole = train(CONFIGS[arch], batches, tc)
    first = train(
        CONFIGS[arch], batches[:15], quick(**(tc.__dict__ | {"checkpoint_dir": str(tmp_path), "checkpoint_every": 5}))
    )
    assert first.steps == 15 and sorted(p.name for p in tmp_path.iterdir()) == ["step-000000010", "step-000000015"]
    rest = train(CONFIGS[arch], batches, tc, resume_from=tmp_path)
    assert rest.resumed_from_step == 15 and rest.steps == 30
    assert same_weights(whole.model, rest.model)
    assert rest.history == whole.history


def test_resume_with_other_settings_is_refused(tmp_path):
    batches = data(10)
    train(CONFIGS["topk"], batches, quick(checkpoint_dir=str(tmp_path)))
    other_model = DictionaryConfig(d_in=12, d_sae=32, architecture="topk", k=4)
    with pytest.raises(MechscopeError) as e:
        train(other_model, batches, quick(), resume_from=tmp_path)
    assert "k=3" in one_line_error(e) and "k=4" in str(e.value)
    with pytest.raises(MechscopeError) as e:
        train(CONFIGS["topk"], batches, quick(lr=1e-3), resume_from=tmp_path)
    assert "lr" in one_line_error(e)
    # settings that do not change the weights may differ
    train(CONFIGS["topk"], batches + data(2), quick(log_every=3), resume_from=tmp_path)


def test_bad_checkpoints_and_data_are_one_line_errors(tmp_path):
    with pytest.raises(MechscopeError) as e:
        train(CONFIGS["relu"], data(3), quick(), resume_from=tmp_path / "nothing")
    one_line_error(e)
    train(CONFIGS["relu"], data(3), quick(checkpoint_dir=str(tmp_path)))
    (tmp_path / "step-000000003" / "checkpoint.json").write_text("{not json")
    with pytest.raises(MechscopeError) as e:
        train(CONFIGS["relu"], data(3), quick(), resume_from=tmp_path)
    one_line_error(e)
    bad_data = [
        ([], "empty"),
        ([torch.randn(8, 13)], "[N, 12]"),
        ([torch.zeros(8, 12, dtype=torch.int64)], "float"),
        ([torch.full((8, 12), float("nan"))], "finite"),
        (["not a tensor"], "tensors"),
        (5, "iterable"),
    ]
    for batches, expected in bad_data:
        with pytest.raises(MechscopeError) as e:
            train(CONFIGS["relu"], batches, quick())
        assert expected in one_line_error(e), expected
    tc_cfg = DictionaryConfig(d_in=12, d_sae=16, transcoder=True, d_out=5)
    with pytest.raises(MechscopeError) as e:
        train(tc_cfg, data(2), quick())
    assert "pairs" in one_line_error(e)
    for kw in ({"lr": -1.0}, {"checkpoint_every": 5}, {"lr_decay_steps": 5}):
        with pytest.raises(MechscopeError) as e:
            quick(**kw)
        one_line_error(e)


def test_resampling_revives_dead_latents():
    cfg = DictionaryConfig(d_in=12, d_sae=32, l1_coefficient=1.0)
    model = SparseDictionary(cfg, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.cat(data(2))
    with torch.no_grad():
        model.b_enc[:16] = -100.0
    step_loss(model, x, x).total.backward()
    opt.step()
    assert not (model.encode(x)[:, :16] > 0).any()
    dead = torch.arange(32) < 16
    alive_norm = float(model.W_enc.detach()[:, 16:].norm(dim=0).mean())
    assert resample_dead(model, opt, dead, x, x, torch.Generator().manual_seed(1)) == 16
    torch.testing.assert_close(model.W_dec[:16].norm(dim=1), torch.ones(16))
    torch.testing.assert_close(model.W_enc[:, :16].norm(dim=0), torch.full((16,), 0.2 * alive_norm))
    assert torch.all(model.b_enc[:16] == 0) and torch.all(opt.state[model.W_dec]["exp_avg"][:16] == 0)
    assert (model.encode(x)[:, :16] > 0).any(0).all()  # each revived latent fires on some input


def test_batchtopk_threshold_reproduces_the_batch_sparsity():
    r = train(CONFIGS["batchtopk"], data(60), quick())
    model = r.model
    theta = float(model.threshold[0])
    assert theta > 0 and torch.all(model.threshold == theta)
    x = torch.cat(data(4))
    l0_inference = float((model.encode(x) > 0).sum(-1).double().mean())
    assert 1.5 < l0_inference < 6.0  # k = 3 on average while training
    estimate = estimate_batchtopk_threshold(model, data(4))
    assert estimate == pytest.approx(theta, rel=0.5)


def test_transcoder_trains_and_the_result_is_json(tmp_path):
    g = torch.Generator().manual_seed(0)
    out_dirs = torch.randn(24, 5, generator=g)
    pairs = []
    for _ in range(150):
        x, c = PLANTED.sample(64, g)
        pairs.append((x, c @ out_dirs))
    cfg = DictionaryConfig(
        d_in=12,
        d_sae=32,
        transcoder=True,
        d_out=5,
        skip=True,
        architecture="topk",
        k=4,
        normalize_activations="expected_average_only_in",
    )
    r = train(cfg, pairs, quick(log_every=25))
    assert r.history[-1]["explained_variance"] > max(0.4, r.history[0]["explained_variance"] + 0.2)
    assert r.in_scale != r.out_scale
    saved = json.loads(json.dumps(r.to_dict()))
    assert saved["schema"] == "mechscope.dictionary_training/1" and "model" not in saved
    assert type(r).from_dict(saved).steps == 150
