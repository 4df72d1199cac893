"""Second review of the training loop, the batch stream, the activation store, checkpoints and the metrics, against
outside truths written apart from the code under test.

Truths: SAELens' ``l2_ratio`` convention (an input norm strictly below 1e-4 counts as 1, so a norm of exactly 1e-4
divides); the module docstring's ``l0 = #{i : f_ni != 0}``; torch's own ``Module.training`` flag read back;
Bussmann et al. 2024's BatchTopK threshold (mean of each batch's k B-th largest ReLU(z), in numpy); rows carrying
their own ids, so where each one landed is known by construction; manifests and checkpoints read back with ``json``
and ``safetensors``; hand traces of the shuffle buffer and of step and row counts."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from mechscope.core.dictionaries import ActivationReader, DictionaryConfig, estimate_batchtopk_threshold, harvest, train
from mechscope.core.dictionaries import metrics as M
from mechscope.core.dictionaries.stream import BatchStream

from .test_dictionaries_plumbing_truths import refused
from .test_store import corpus, interrupted, shard_tensors
from .test_training import CONFIGS, data, quick
from .test_training_truths import np_latents, record_steps

# ---- metrics --------------------------------------------------------------------------------------------------


def test_l2_ratio_divides_by_an_input_norm_of_exactly_1e_4():
    """SAELens (evals.py): ``l2_norm_in_for_div[abs(l2_norm_in) < 0.0001] = 1``, strict. Row 0: ||x|| = 1e-4 exactly
    (float64), ||x_hat|| = 5e-4 -> ratio 5; row 1: ||x|| = 5e-5 counts as 1, ||x_hat|| = 2 -> ratio 2."""
    x = torch.tensor([[1e-4, 0.0], [0.0, 5e-5]], dtype=torch.float64)
    x_hat = torch.tensor([[3e-4, 4e-4], [2.0, 0.0]], dtype=torch.float64)
    assert float(x[0].norm()) == 1e-4  # the boundary is really hit
    assert M.l2_ratio(x, x_hat) == pytest.approx((5.0 + 2.0) / 2)
    acc = M.StreamingMetrics(2, 3)
    acc.update(x, x_hat, torch.zeros(2, 3))
    assert acc.result().l2_ratio == pytest.approx(3.5)


def test_l0_counts_every_nonzero_latent_negative_ones_included():
    """The module docstring: l0 = (1/N) sum_n #{i : f_ni != 0}. Rows (-1, 0, 2) and (0, 0, -0.5) hold 2 and 1
    nonzero latents: l0 = 1.5 for the batch function and the streaming one, and no latent of three is dead."""
    f = torch.tensor([[-1.0, 0.0, 2.0], [0.0, 0.0, -0.5]])
    assert M.l0(f) == 1.5
    acc = M.StreamingMetrics(2, 3)
    acc.update(torch.ones(2, 2), torch.ones(2, 2), f)
    assert acc.result().l0 == 1.5 and acc.result().dead_fraction == pytest.approx(1 / 3)


@pytest.mark.parametrize("training", [False, True])
def test_evaluate_gives_the_model_back_in_the_mode_it_came_in(training, random_model):
    """evaluate() switches to eval mode for the measurement and restores ``model.training`` as the caller left it
    (read back from torch's own flag), for a model in eval mode and for one in training mode."""
    model = random_model().train(training)
    M.evaluate(model, [torch.randn(8, 6, generator=torch.Generator().manual_seed(0))])
    assert model.training is training


# ---- the batch stream -----------------------------------------------------------------------------------------


def test_an_empty_batch_is_refused_by_the_stream():
    """The stream promises non-empty batches: a [0, 3] tensor between two [4, 3] ones is a one-line error when it
    is reached (the first batch still comes out)."""
    stream = BatchStream(DictionaryConfig(d_in=3, d_sae=4), [torch.ones(4, 3), torch.ones(0, 3)], None)
    assert next(stream)[0].shape == (4, 3)
    refused(lambda: next(stream), "non-empty")


# ---- the activation store -------------------------------------------------------------------------------------


def test_peak_rows_held_is_the_fullest_buffer_plus_the_incoming_batch(tmp_path):
    """Four batches of 25 rows into a 40-row buffer, by hand: held 0+25, 25+25 (flush at 40, 10 stay), 10+25,
    35+25 = 60 (flush, 20 stay). The peak is 60 rows, not one batch (25) nor one buffer (40)."""
    r = harvest(corpus(4, rows=25, d=3), tmp_path, shard_rows=10, buffer_rows=40, progress=False)
    assert r.peak_rows_held == 60 and r.rows == 100


def test_a_finished_store_is_not_read_again(tmp_path):
    """A finished store is not redone: harvesting into it again reads only the first batch (it needs one to learn
    the width) and stops, even though the input given now would end too early; the manifest is unchanged."""
    harvest(corpus(3, rows=20, d=3), tmp_path, shard_rows=20, buffer_rows=40, progress=False)
    before = (tmp_path / "manifest.json").read_text()

    def one_then_fail():
        yield from corpus(1, rows=20, d=3)
        raise AssertionError("read past the first batch of a finished store")

    r = harvest(one_then_fail(), tmp_path, shard_rows=20, buffer_rows=40, progress=False)
    assert (r.rows, r.resumed_rows, r.shards) == (60, 60, 3)
    assert (tmp_path / "manifest.json").read_text() == before


def test_the_manifest_records_the_rows_each_shard_really_holds(tmp_path):
    """25 rows in shards of 10 (buffer 20): the last shard holds the 5 left over. The manifest (read with json)
    says 10, 10, 5, as the shard files (read with safetensors) hold, and the reader streams all 25 ids once."""
    harvest(corpus(1, rows=25, d=2), tmp_path, shard_rows=10, buffer_rows=20, progress=False)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert [s["rows"] for s in manifest["shards"]] == [t.shape[0] for t in shard_tensors(tmp_path)] == [10, 10, 5]
    rows = torch.cat(list(ActivationReader(tmp_path, 4, drop_last=False)))
    assert sorted(rows[:, 0].long().tolist()) == list(range(25))


def test_a_caller_resumed_harvest_reports_the_speed_of_the_rows_it_was_given(tmp_path):
    """Batches 0-2 of 100 rows stored before an interruption; the caller resumes at row 300 with batches 3-4: the
    store holds 500 rows, 300 of them from before, and this session's speed is over its 200 input rows."""
    with pytest.raises(KeyboardInterrupt):
        harvest(interrupted(5, 3), tmp_path, shard_rows=100, buffer_rows=100, progress=False)
    rest = itertools.islice(corpus(5), 3, None)
    r = harvest(rest, tmp_path, shard_rows=100, buffer_rows=100, progress=False, input_offset=300)
    assert (r.rows, r.resumed_rows) == (500, 300)
    assert r.rows_per_second * r.seconds == pytest.approx(200)


# ---- training: resuming ---------------------------------------------------------------------------------------


def test_a_resumed_run_stops_at_max_steps_and_counts_all_rows(tmp_path):
    """Steps 1-4 checkpointed, then resumed with max_steps 9 on 12 batches of 64: it stops at step 9 (5 more, not 9
    more), counts 9 x 64 = 576 rows in all, and its speed is over the 5 x 64 = 320 rows of this session
    (rows_per_second x seconds)."""
    cfg = CONFIGS["relu"]
    train(cfg, data(4), quick(checkpoint_dir=str(tmp_path), checkpoint_every=4))
    r = train(cfg, data(12), quick(checkpoint_dir=str(tmp_path), checkpoint_every=4, max_steps=9), resume_from=tmp_path)
    assert (r.steps, r.rows, r.resumed_from_step) == (9, 576, 4)
    assert r.rows_per_second * r.seconds == pytest.approx(320)


def test_the_last_step_is_logged_when_it_is_not_a_multiple_of_log_every(monkeypatch):
    """max_steps 7, log_every 5: the history holds steps 5 and 7 (the run's final metrics, which the staged record
    reports as ``final``); step 7's L0 is its latents' nonzero count per token, counted in numpy."""
    steps, _ = record_steps(monkeypatch)
    r = train(CONFIGS["topk"], data(9), quick(max_steps=7, log_every=5))
    assert [h["step"] for h in r.history] == [5, 7] and len(steps) == 7
    f = steps[-1][0].latents.detach().double().numpy()
    assert r.history[-1]["l0"] == pytest.approx(np.count_nonzero(f) / f.shape[0])


def test_a_run_ending_between_checkpoints_saves_its_last_step(tmp_path):
    """checkpoint_every 4 over 6 steps: steps 4 and 6 are on disk (listed by the OS), the result points at step 6 and
    its checkpoint.json (read with json) says step 6 and 6 x 64 = 384 rows."""
    r = train(CONFIGS["relu"], data(6), quick(checkpoint_dir=str(tmp_path), checkpoint_every=4))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000000004", "step-000000006"]
    meta = json.loads((tmp_path / "step-000000006" / "checkpoint.json").read_text())
    assert r.checkpoint == str(tmp_path / "step-000000006") and (meta["step"], meta["rows"]) == (6, 384)


def test_max_steps_must_match_on_resume_only_when_the_lr_decays_to_it(tmp_path):
    """With lr_decay_steps the rate at step s is lr (max_steps - s + 1) / decay_steps, so max_steps shapes the
    weights: resuming a max_steps 8 run with max_steps 9 is refused, naming it; without decay it is allowed."""
    decay, plain = tmp_path / "decay", tmp_path / "plain"
    train(CONFIGS["relu"], data(4), quick(checkpoint_dir=str(decay), checkpoint_every=4, max_steps=8, lr_decay_steps=4))
    tc = quick(checkpoint_dir=str(decay), checkpoint_every=4, max_steps=9, lr_decay_steps=4)
    refused(lambda: train(CONFIGS["relu"], data(9), tc, resume_from=decay), "max_steps=8")
    train(CONFIGS["relu"], data(4), quick(checkpoint_dir=str(plain), checkpoint_every=4, max_steps=8))
    r = train(CONFIGS["relu"], data(9), quick(checkpoint_dir=str(plain), max_steps=9), resume_from=plain)
    assert (r.steps, r.resumed_from_step) == (9, 4)


def test_estimated_batchtopk_threshold_is_the_mean_of_each_batchs_smallest_kept_value(random_model):
    """Bussmann et al. 2024: theta = mean over batches of the smallest activation BatchTopK keeps (the k B-th largest
    of ReLU(z) over the whole batch), with z in numpy; three batches of different spread so mean, max and min differ.
    """
    model = random_model(architecture="batchtopk", k=2).eval()
    g = torch.Generator().manual_seed(5)
    batches = [scale * torch.randn(16, 6, generator=g) for scale in (0.5, 1.0, 3.0)]
    smallest = []
    for x in batches:
        _, z, _ = np_latents(model, x.double().numpy())
        smallest.append(np.sort(np.maximum(z, 0).ravel())[::-1][2 * 16 - 1])
    assert min(smallest) > 0 and max(smallest) > 1.5 * min(smallest)
    got = estimate_batchtopk_threshold(model, batches)
    assert got == pytest.approx(np.mean(smallest), rel=1e-5)
    assert float(model.threshold[0]) == pytest.approx(np.mean(smallest), rel=1e-5) and not model.training


def test_each_epoch_visits_every_shard_once_in_a_new_order(tmp_path):
    """Eight shards of 10 rows (ids by construction, each shard's id set read back with safetensors), read one
    shard per batch for two epochs: every shard once per epoch, and epoch 2 does not replay epoch 1's order."""
    harvest(corpus(8, rows=10, d=2), tmp_path, shard_rows=10, buffer_rows=10, progress=False)
    shard_of = {frozenset(t[:, 0].long().tolist()): i for i, t in enumerate(shard_tensors(tmp_path))}
    seen = [
        shard_of[frozenset(b[:, 0].long().tolist())] for b in ActivationReader(tmp_path, 10, mix_shards=1, epochs=2)
    ]
    assert sorted(seen[:8]) == sorted(seen[8:]) == list(range(8))
    assert seen[:8] != seen[8:]
