"""The sparse-dictionary plumbing (metrics' thresholds, latent summaries, config limits, checkpoints, the batch
stream, the activation store's defaults and pairing, staging, torchrun detection, the sparsifying functions)
against outside truths.

Each expected value comes from outside the code under test: counts and sums written as plain Python loops or numpy
over hand-built inputs; files read back with ``json`` and ``safetensors`` directly; rows carrying their own ids,
so where each landed is known by construction; autograd through the dense formula for the sparse backward; and
the papers' or SAELens' definitions (the rectangle kernel ``1[-1/2 < u < 1/2]``, ``H(z - theta)`` strict).
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mechscope.core import validate
from mechscope.core.dictionaries import ActivationReader, DictionaryConfig, LatentCollector, harvest, harvest_many
from mechscope.core.dictionaries import checkpoint as ck
from mechscope.core.dictionaries import metrics as M
from mechscope.core.dictionaries import parallel as P
from mechscope.core.dictionaries.activations import GatherPre, batch_topk, jumprelu, rectangle, sparse_decode
from mechscope.core.dictionaries.config import check_options
from mechscope.core.dictionaries.latents import check_shown, latent_summary
from mechscope.core.dictionaries.staged import staging, store_reader, training_fields
from mechscope.core.dictionaries.stream import BatchStream
from mechscope.core.errors import MechscopeError

from .conftest import one_line_error
from .test_store import corpus, shard_tensors


def refused(call, needle: str) -> None:
    with pytest.raises(MechscopeError) as e:
        call()
    assert needle in one_line_error(e), needle


# ---- metrics: dense threshold, frequencies, evaluate on a transcoder ------------------------------------------


def firing(counts: list[int], n: int = 100) -> torch.Tensor:
    """[n, len(counts)] latents, latent j firing (value j + 1) on its first counts[j] rows."""
    f = torch.zeros(n, len(counts))
    for j, c in enumerate(counts):
        f[:c, j] = j + 1.0
    return f


def test_dense_is_strictly_above_ten_percent_by_default():
    """The module docstring: dense = fired on *more than* 10% of the tokens. Counts 10, 11, 7, 0 of 100: only the
    11 is dense (10 is at the limit, 7 under even a 5% limit); frequencies are counts / 100, one dead of four."""
    counts = [10, 11, 7, 0]
    assert M.dense_latents(torch.tensor(counts), 100).tolist() == [1]
    assert M.dense_latents(torch.tensor(counts), 100, threshold=0.07).tolist() == [0, 1]
    f = firing(counts)
    acc = M.StreamingMetrics(2, 4)
    for lo, hi in ((0, 37), (37, 100)):
        acc.update(torch.ones(hi - lo, 2), torch.ones(hi - lo, 2), f[lo:hi])
    r = acc.result()
    assert r.dense_fraction == 0.25 and r.dead_fraction == 0.25 and r.dense_threshold == 0.1
    np.testing.assert_allclose(r.latent_frequency, [c / 100 for c in counts])


def test_relative_reconstruction_bias_is_nan_when_x_and_x_hat_never_align():
    """Rajamanoharan et al. 2024a, eq. 10: mean ||x_hat||^2 / mean <x, x_hat>. By hand: x_hat = x / 2 gives
    0.25 / 0.5 = 0.5; an x_hat orthogonal to x (or all zero, a dead dictionary) has nothing to divide by: NaN in the
    batch function as in the streaming sums (the batch one gave inf and NaN)."""
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    cases = {"half": (x / 2, 0.5), "orthogonal": (x.flip(1) * torch.tensor([1.0, -1.0]), None), "zero": (0 * x, None)}
    for name, (x_hat, want) in cases.items():
        acc = M.StreamingMetrics(2, 1)
        acc.update(x, x_hat, torch.zeros(2, 1))
        for got in (M.relative_reconstruction_bias(x, x_hat), acc.result().relative_reconstruction_bias):
            assert np.isnan(got) if want is None else got == pytest.approx(want), (name, got)


def test_evaluate_a_transcoder_scores_its_output_against_the_target(random_model):
    """A transcoder 6 -> 4 on pairs (x, y): every metric is a plain loop over (y, output), not over x; the mse is
    per element of the 4-wide output; the dense threshold asked (0.45) is the one used (numpy frequencies)."""
    model = random_model(transcoder=True, d_out=4).eval()
    g = torch.Generator().manual_seed(11)
    x, y = torch.randn(50, 6, generator=g), torch.randn(50, 4, generator=g) + 2.0
    with torch.no_grad():
        out, f = model(x)
    yy, oo, ff = y.double().numpy(), out.double().numpy(), f.double().numpy()
    sq = sum(float(((yy[n] - oo[n]) ** 2).sum()) for n in range(50))
    centred = sum(float(((yy[n] - yy.mean(0)) ** 2).sum()) for n in range(50))
    freq = (ff != 0).mean(0)
    assert 0 < (freq > 0.45).mean() < 1  # the threshold matters here
    r = M.evaluate(model, [(x[:20], y[:20]), (x[20:], y[20:])], dense_threshold=0.45)
    assert r.mse == pytest.approx(sq / (50 * 4)) and r.squared_error == pytest.approx(sq / 50)
    assert r.explained_variance == pytest.approx(1 - sq / centred)
    assert r.dense_fraction == pytest.approx((freq > 0.45).mean()) and r.dense_threshold == 0.45


def test_explained_variance_of_a_constant_target_is_nan():
    """Nothing to explain (sum ||x - mean||^2 = 0): NaN, as the docstring says, not a perfect 1."""
    x = torch.full((5, 3), 2.0)
    assert np.isnan(M.explained_variance(x, x)) and np.isnan(M.explained_variance(x, x + 1))


# ---- latent summaries ---------------------------------------------------------------------------------------------


def test_latent_summary_defaults_and_band_order():
    """Latent 0 fires on rows 0..29 with value (row * 7 mod 30) + 1 (1..30 shuffled). Defaults: the top 10 rows
    (a numpy argsort of the planted column); each band's samples largest first; latent 1 (of 2) is the last one,
    latent 2 is out of range."""
    f = np.zeros((40, 2), dtype=np.float32)
    f[:30, 0] = (np.arange(30) * 7) % 30 + 1
    col = LatentCollector(2)
    col.update(torch.tensor(f))
    acts = col.result()
    s = latent_summary(acts, 0)
    assert s.top_rows == tuple(np.argsort(-f[:, 0])[:10].tolist())
    for vals in s.band_values:
        assert len(vals) == 4 and list(vals) == sorted(vals, reverse=True)
    assert acts.of(1)[0].size == 0
    refused(lambda: acts.of(2), "out of range")


def test_check_shown_accepts_up_to_d_sae(monkeypatch):
    """``sae show``: latents 0..d_sae-1 exist; a typed count equal to d_sae (all of them) is fine, d_sae + 1 not; an
    untyped (default) count above d_sae is "up to"."""
    monkeypatch.setattr(validate, "typed_options", lambda exclude=(): ["--random"])
    check_shown([0, 7], {"--random": 8, "--selective": 99}, 8)
    refused(lambda: check_shown([8], {"--random": 1}, 8), "out of range")
    refused(lambda: check_shown([], {"--random": 9}, 8), "--random 9")
    for bad, said in (([1.5], "--latent must be an integer, got 1.5"), (["3"], '--latent must be an integer, got "3"'),
                      (3, "latents must be a list of latent indices (--latent, repeatable), got 3")):  # fmt: skip
        refused(lambda b=bad: check_shown(b, {}, 8), said)  # 1.5 drew latent 1, "3" latent 3, 3 was a TypeError
    refused(lambda: check_shown([1], {}, 8, k=0), "--k must be an integer from 1")  # empty dashboards
    check_shown((np.int64(2),), {}, 8, k=1)


# ---- config limits ------------------------------------------------------------------------------------------------


def test_config_fields_at_and_just_past_their_limits():
    """k = d_sae is allowed, d_sae + 1 not; a zero L1/L0/AuxK weight is allowed, a negative one not; the kernel
    width must be > 0; unknown keys are refused and a config round-trips through JSON."""
    DictionaryConfig(d_in=4, d_sae=8, architecture="topk", k=8)
    refused(lambda: DictionaryConfig(d_in=4, d_sae=8, architecture="batchtopk", k=9), "k <= d_sae")
    DictionaryConfig(d_in=4, d_sae=8, l1_coefficient=0.0, l0_coefficient=0, aux_k_coefficient=0.0)
    refused(lambda: DictionaryConfig(d_in=4, d_sae=8, aux_k_coefficient=-1e-12), "aux_k_coefficient")
    DictionaryConfig(d_in=4, d_sae=8, architecture="jumprelu", bandwidth=1e-9, init_threshold=1e-9)
    refused(lambda: DictionaryConfig(d_in=4, d_sae=8, init_threshold=0.0), "init_threshold")
    cfg = DictionaryConfig(d_in=4, d_sae=8, architecture="topk", k=3, transcoder=True, d_out=5)
    assert DictionaryConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    refused(lambda: DictionaryConfig.from_dict(cfg.to_dict() | {"k_aux": 2}), "k_aux")


def test_train_options_at_and_just_past_their_limits(monkeypatch):
    """``sae train`` options: --steps/--d-sae 1 fine and 0 refused; --l1 0 fine, below refused; checkpoint every 0
    (never) fine, -1 refused; --d-sae with --expansion refused; a typed --k read by batchtopk, not by relu."""
    check_options(d_sae=1, steps=1, l1_coefficient=0.0, checkpoint_every=0)
    refused(lambda: check_options(steps=0), "--steps")
    refused(lambda: check_options(d_sae=0), "--d-sae")
    check_options(k=1)
    refused(lambda: check_options(k=0), "--k must be")  # was the config's own 'expected k to be...', no option named
    refused(lambda: check_options(l1_coefficient=-0.5), "--l1")
    refused(lambda: check_options(checkpoint_every=-1), "--checkpoint-every")
    refused(lambda: check_options(d_sae=64, expansion=4), "not both")
    monkeypatch.setattr(validate, "typed_options", lambda exclude=(): ["--k"])
    check_options(architecture="batchtopk")
    refused(lambda: check_options(architecture="relu"), "--k not read")
    refused(lambda: check_options(architecture="relu", k=0), "--k not read")  # not its range: relu never reads it
    refused(lambda: check_options(architecture="topk", k=0), "--k must be")


# ---- checkpoints --------------------------------------------------------------------------------------------------


def test_checkpoints_keep_the_newest_by_step_number(tmp_path):
    """Steps 9, 10 and 100 saved with keep=2: the folders left (listed by the OS) are steps 10 and 100, the newest is
    100 by number (not by string order); its JSON (read with json) and tensors (read with safetensors) are what was
    written."""
    for step in (9, 10, 100):
        w = torch.arange(6.0).reshape(2, 3) * step
        ck.save_checkpoint(tmp_path, step, {"rows": 64 * step}, {"model.W": w}, keep=2)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert [int(n.split("-")[1]) for n in left] == [10, 100] and len(left) == 2
    newest = ck.find_checkpoint(tmp_path)
    meta = json.loads((newest / "checkpoint.json").read_text())
    assert meta == {"schema": "mechscope.dictionary_checkpoint/1", "step": 100, "rows": 6400}
    assert torch.equal(load_file(str(newest / "state.safetensors"))["model.W"], torch.arange(6.0).reshape(2, 3) * 100)
    (newest / "checkpoint.json").write_text(json.dumps({"schema": "other/1", "step": 100}))
    refused(lambda: ck.load_checkpoint(newest), "expected a mechscope.dictionary_checkpoint/1 record")


def test_checkpoints_past_a_billion_steps_stay_in_step_order(tmp_path):
    """Truth: step numbers compared as numbers. Past 10^9 steps the name's nine digits of padding run out, so the
    names of steps 999,999,999 and 1,000,000,000 sort the other way as text: the newest is still the larger step,
    and keep=1 removes the smaller."""
    for step in (999_999_999, 1_000_000_000):
        ck.save_checkpoint(tmp_path, step, {}, {"model.W": torch.full((2,), float(step % 7))}, keep=1)
    assert [p.name for p in tmp_path.iterdir()] == ["step-1000000000"]
    ck.save_checkpoint(tmp_path / "both", 999_999_999, {}, {"model.W": torch.zeros(2)}, keep=0)
    ck.save_checkpoint(tmp_path / "both", 1_000_000_000, {}, {"model.W": torch.zeros(2)}, keep=0)
    assert json.loads((ck.find_checkpoint(tmp_path / "both") / "checkpoint.json").read_text())["step"] == 10**9


def test_a_setting_only_this_run_has_refuses_to_resume():
    """A key the checkpoint lacks (saved None) but this run sets is a difference, as is a changed value."""
    ck.check_same_settings("ck", {"lr": 1e-3}, {"lr": 1e-3}, "training")
    refused(lambda: ck.check_same_settings("ck", {"lr": 1e-3}, {"lr": 1e-3, "seed": 5}, "training"), "seed=5")
    refused(lambda: ck.check_same_settings("ck", {"lr": 1e-3}, {"lr": 2e-3}, "training"), "lr=0.002")


# ---- the batch stream ---------------------------------------------------------------------------------------------


def numbered(n_batches: int, rows: int = 10, d: int = 3) -> list[torch.Tensor]:
    return [torch.arange(b * rows, (b + 1) * rows, dtype=torch.float32)[:, None].repeat(1, d) for b in range(n_batches)]


def test_the_stream_yields_peeked_batches_first_in_order():
    """Batches of 10 rows: peeking 25 rows holds 3 batches (the fewest reaching 25); then the stream yields all 5
    in the input order (ids by construction)."""
    stream = BatchStream(DictionaryConfig(d_in=3, d_sae=4), numbered(5), None)
    assert len(stream.peek_rows(25)) == 3 and len(stream.peek_rows(30)) == 3
    assert [int(x[0, 0]) for x, _ in stream] == [0, 10, 20, 30, 40]


def test_a_transcoder_stream_checks_the_target_against_d_out():
    """d_in 3, d_out 5: a [N, 5] target passes; a [N, 3] target, a NaN in the target or a target with other rows
    than its input are one-line errors."""
    cfg = DictionaryConfig(d_in=3, d_sae=4, transcoder=True, d_out=5)
    x = torch.ones(4, 3)
    assert next(BatchStream(cfg, [(x, torch.ones(4, 5))], None))[1].shape == (4, 5)
    refused(lambda: next(BatchStream(cfg, [(x, torch.ones(4, 3))], None)), "target")
    bad = torch.ones(4, 5)
    bad[2, 1] = float("nan")
    refused(lambda: next(BatchStream(cfg, [(x, bad)], None)), "finite")
    refused(lambda: next(BatchStream(cfg, [(x, torch.ones(6, 5))], None)), "6 targets")


# ---- the activation store ----------------------------------------------------------------------------------------


def test_default_buffer_is_four_shards(tmp_path):
    """500 rows in shards of 50 with the documented default buffer (4 shards = 200 rows): the manifest (read with
    json) records 200 and 3 windows (200 + 200 + 100), and shards 0..3 hold exactly ids 0..199."""
    harvest(corpus(5), tmp_path, shard_rows=50, progress=False)
    m = json.loads((tmp_path / "manifest.json").read_text())
    assert m["buffer_rows"] == 200 and m["windows"] == 3 and len(m["shards"]) == 10
    first = torch.cat(shard_tensors(tmp_path)[:4])[:, 0].long()
    assert sorted(first.tolist()) == list(range(200))


def test_windows_are_not_all_shuffled_alike(tmp_path):
    """Each window has its own permutation (seeded by its index): window 1's ids minus 200 are not window 0's order."""
    harvest(corpus(4), tmp_path, shard_rows=100, buffer_rows=200, seed=2, progress=False)
    ids = torch.cat(shard_tensors(tmp_path))[:, 0].long()
    assert sorted(ids[200:400].tolist()) == list(range(200, 400))
    assert not torch.equal(ids[200:400] - 200, ids[:200])


def test_harvest_many_keeps_the_rows_of_one_input_paired(tmp_path):
    """Two stores (widths 2 and 5) from one pass: row i of one store and row i of the other come from the same input
    row (both carry its id), and a step whose blocks differ in rows is refused."""

    def steps():
        for b in range(3):
            ids = torch.arange(b * 40, (b + 1) * 40, dtype=torch.float32)[:, None]
            yield [ids.repeat(1, 2), -ids.repeat(1, 5)]

    a, b = tmp_path / "a", tmp_path / "b"
    ra, rb = harvest_many(steps(), [a, b], shard_rows=40, buffer_rows=80, seed=4, progress=False)
    assert (ra.rows, ra.width, rb.rows, rb.width) == (120, 2, 120, 5)
    xa, xb = torch.cat(shard_tensors(a)), torch.cat(shard_tensors(b))
    assert torch.equal(xa[:, 0], -xb[:, 4]) and sorted(xa[:, 0].long().tolist()) == list(range(120))
    step = [[torch.ones(4, 2), torch.ones(5, 5)]]
    refused(lambda: harvest_many(step, [tmp_path / "c", tmp_path / "d"], progress=False), "same number of rows")


def test_a_store_refuses_another_seed_and_an_empty_split(tmp_path):
    """Resuming a store with another seed is refused (it would shuffle differently); split (8, 0) is not a pair."""
    harvest(corpus(2), tmp_path, shard_rows=50, seed=1, progress=False)
    refused(lambda: harvest(corpus(2), tmp_path, shard_rows=50, seed=2, progress=False), "seed")
    refused(lambda: ActivationReader(tmp_path, 4, split=(8, 0)), "split")


# ---- staging ------------------------------------------------------------------------------------------------------


def test_store_reader_passes_its_seed_and_accepts_exactly_one_batch(tmp_path):
    """A store of 200 rows feeds a batch of 200; store_reader(seed=5) streams what ActivationReader(seed=5) streams
    (and not seed 6's)."""
    harvest(corpus(2), tmp_path, shard_rows=50, progress=False)
    cfg = DictionaryConfig(d_in=8, d_sae=4)
    assert next(iter(store_reader(tmp_path, cfg, 200))).shape == (200, 8)
    got = next(iter(store_reader(tmp_path, cfg, 16, seed=5)))
    assert torch.equal(got, next(iter(ActivationReader(tmp_path, 16, seed=5))))
    assert not torch.equal(got, next(iter(ActivationReader(tmp_path, 16, seed=6))))


def test_staging_and_training_fields_by_hand(tmp_path):
    """``out.html`` stages in ``out.html.partial`` beside it; the record's fields are the config's (d_in 3, d_out 5
    kept apart) and the last logged step's metrics."""
    assert staging(tmp_path / "out.html") == tmp_path / "out.html.partial"
    cfg = DictionaryConfig(d_in=3, d_sae=7, architecture="topk", k=2, transcoder=True, d_out=5).to_dict()
    history = ({"step": 10, "loss": 3.0}, {"step": 20, "loss": 1.5})
    r = SimpleNamespace(config=cfg, train_config={"lr": 1e-3}, steps=20, rows=640, seconds=2.0,
                        rows_per_second=320.0, world_size=1, resumed_from_step=0, history=history)  # fmt: skip
    f = training_fields(r, model="m", hook="h", target="t", store=tmp_path, batch_size=32, epochs=2)
    assert (f["d_in"], f["d_sae"], f["d_out"], f["architecture"]) == (3, 7, 5, "topk")
    assert f["final"] == {"step": 20, "loss": 1.5} and f["store"] == str(tmp_path) and f["epochs"] == 2


# ---- torchrun detection -------------------------------------------------------------------------------------------


def test_torchrun_means_more_than_one_process(monkeypatch):
    """torchrun's variables with WORLD_SIZE=1 are one process (not data-parallel); 2 is; --distributed outside
    torchrun is a one-line error; without a group this process is rank 0 of 1."""
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(k, v)
    assert not P.launched_by_torchrun()
    refused(lambda: P.init_from_env(True), "torchrun")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert P.launched_by_torchrun() and P.rank_world() == (0, 1)


# ---- the sparsifying functions ------------------------------------------------------------------------------------


def test_batch_topk_keeps_ties_at_the_threshold():
    """k = 1, B = 2: keep the 2 largest of ReLU(pre) = t = 2, and every entry >= t (the ties, as documented):
    3, 2, 2 in row 0 and 2 in row 1; negatives and zeros never."""
    pre = torch.tensor([[3.0, 2.0, 2.0, 1.0], [2.0, 0.0, -1.0, 0.5]])
    want = torch.tensor([[3.0, 2.0, 2.0, 0.0], [2.0, 0.0, 0.0, 0.0]])
    assert torch.equal(batch_topk(pre, 1), want)


def test_rectangle_kernel_and_jumprelu_are_strict():
    """K(u) = 1[-1/2 < u < 1/2] (Rajamanoharan et al. 2024; SAELens' RectangleFunction): 0 at u = +-1/2; and
    JumpReLU is z H(z - theta) with H(0) = 0: z equal to theta gives 0."""
    u = torch.tensor([-0.5, -0.25, 0.0, 0.25, 0.5])
    assert rectangle(u).tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]
    z = torch.tensor([[0.5, 0.75, 0.25]])
    assert jumprelu(z, torch.full((3,), 0.5), 0.1).tolist() == [[0.0, 0.75, 0.0]]


def test_sparse_backward_and_decode_equal_the_dense_formula():
    """GatherPre's hand-written sparse backward equals autograd through (x W + b).gather (the dense formula), for x,
    W and b; sparse_decode equals a plain loop sum_j v_nj W_dec[i_nj]."""
    g = torch.Generator().manual_seed(3)
    x, w, b = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((5, 4), (4, 9), (9,)))
    idx = torch.tensor([[0, 3], [3, 8], [1, 1], [7, 2], [8, 0]])
    up = torch.randn(5, 2, generator=g, dtype=torch.float64)
    dense = [t.clone().requires_grad_() for t in (x, w, b)]
    ((dense[0] @ dense[1] + dense[2]).gather(1, idx) * up).sum().backward()
    sparse = [t.clone().requires_grad_() for t in (x, w, b)]
    pre = (x @ w + b).detach()
    (GatherPre.apply(*sparse, pre, idx) * up).sum().backward()
    for d, s in zip(dense, sparse, strict=True):
        torch.testing.assert_close(s.grad, d.grad)
    w_dec = torch.randn(9, 3, generator=g, dtype=torch.float64)
    loop = np.zeros((5, 3))
    for n in range(5):
        for j in range(2):
            loop[n] += up[n, j].item() * w_dec[idx[n, j]].numpy()
    np.testing.assert_allclose(sparse_decode(idx, up, w_dec).numpy(), loop, rtol=1e-12)
