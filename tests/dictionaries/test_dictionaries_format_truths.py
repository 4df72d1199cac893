"""Sparse dictionaries' model, storage and formats against outside truths.

Every expected value here comes from outside the code under test: SAELens' file conventions and forward pass
written out in numpy on the tensors read back with ``safetensors.numpy`` and the ``cfg.json`` read with ``json``;
the papers' definitions (Gao et al. 2024 for TopK, its initialisation and AuxK defaults; Rajamanoharan et al. 2024
/ SAELens for JumpReLU, ``f = ReLU(z) * (z > theta)``); SAELens' metric conventions (``l2_ratio`` counts an input
norm below 1e-4 as 1; ``torch.nn.functional.cosine_similarity`` gives 0 for a zero vector); numpy's quantiles and
histograms; and planted rows and latents whose answers are known by construction.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as np_load_file
from safetensors.torch import load_file, save_file

from mechscope.core.dictionaries import (
    ActivationReader,
    DictionaryConfig,
    LatentCollector,
    SparseDictionary,
    harvest,
    latent_summary,
    load_saelens,
    save_saelens,
)
from mechscope.core.dictionaries import metrics as M
from mechscope.core.dictionaries.latents import densities, maxima
from mechscope.core.dictionaries.staged import _check_stream, store_reader
from mechscope.core.dictionaries.store import stored_rows
from mechscope.core.errors import MechscopeError

from .conftest import one_line_error
from .test_store import corpus, interrupted


def np64(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def saelens_forward(path, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """SAELens' forward pass written out in numpy from the directory's own files (cfg.json by json, tensors by
    safetensors.numpy): z = (x - a b_dec) W_enc + b_enc; standard: ReLU(z); topk: ReLU of each row's k largest;
    jumprelu: ReLU(z) * (z > threshold); y = f W_dec + b_dec (+ x W_skip^T)."""
    cfg = json.loads((path / "cfg.json").read_text())
    w = {k: v.astype(np.float64) for k, v in np_load_file(str(path / "sae_weights.safetensors")).items()}
    arch = cfg["architecture"]
    z = (x - w["b_dec"] if cfg["apply_b_dec_to_input"] else x) @ w["W_enc"] + w["b_enc"]
    if arch.startswith("jumprelu"):
        f = np.maximum(z, 0) * (z > w["threshold"])
    elif arch.startswith("topk"):
        k = cfg["activation_fn_kwargs"]["k"]
        f = np.zeros_like(z)
        for n, row in enumerate(z):
            top = np.argsort(row)[::-1][:k]
            f[n, top] = np.maximum(row[top], 0)
    else:
        f = np.maximum(z, 0)
    y = f @ w["W_dec"] + w["b_dec"]
    if "W_skip" in w:
        y = y + x @ w["W_skip"].T
    return f, y


# ---- the model ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["jumprelu", "batchtopk"])
def test_negative_thresholds_act_as_zero_like_saelens_relu_then_mask(arch, random_model):
    """SAELens' JumpReLU is ``ReLU(z) * (z > theta)``: a negative threshold never lets a negative pre-activation
    through (numpy, by hand)."""
    model = random_model(architecture=arch, k=3).eval()
    with torch.no_grad():
        model.threshold.copy_(torch.linspace(-0.5, 0.3, 10))
    x = torch.randn(200, 6, generator=torch.Generator().manual_seed(2))
    z = (np64(x) - np64(model.b_dec)) @ np64(model.W_enc) + np64(model.b_enc)
    theta = np64(model.threshold)
    want = np.maximum(z, 0) * (z > theta)
    assert ((z < 0) & (z > theta)).any()  # pre-activations between a negative threshold and 0 exist here
    np.testing.assert_allclose(np64(model.encode(x)), want, rtol=1e-5, atol=1e-6)
    assert float(model(x).latents.detach().min()) >= 0


def test_batchtopk_inference_is_strictly_above_the_threshold_as_saelens_jumprelu():
    """BatchTopK saves as a SAELens JumpReLU (mask ``z > theta``, strict): a pre-activation exactly at the threshold
    is off. Identity encoder, inputs planted exactly at, below and above theta = 0.5."""
    cfg = DictionaryConfig(d_in=4, d_sae=4, architecture="batchtopk", k=1, apply_b_dec_to_input=False)
    model = SparseDictionary(cfg).eval()
    with torch.no_grad():
        model.W_enc.copy_(torch.eye(4))
        model.threshold.fill_(0.5)
    x = torch.tensor([[0.5, 0.25, 0.75, 0.5], [1.0, 0.5, 0.0, 0.5]])
    want = np.where(np64(x) > 0.5, np64(x), 0.0)
    np.testing.assert_array_equal(np64(model.encode(x)), want)


def test_initialisation_unit_decoder_rows_and_encoder_transposed():
    """Gao et al. 2024, A.1: decoder rows random unit vectors, the SAE's encoder their transpose, biases zero
    (numpy norms)."""
    model = SparseDictionary(DictionaryConfig(d_in=7, d_sae=13), generator=torch.Generator().manual_seed(0))
    w_dec = np64(model.W_dec)
    np.testing.assert_allclose(np.linalg.norm(w_dec, axis=1), np.ones(13), rtol=1e-6)
    np.testing.assert_allclose(np64(model.W_enc), w_dec.T, rtol=1e-6)
    assert not np64(model.b_enc).any() and not np64(model.b_dec).any()


def test_decoder_directions_are_the_unit_decoder_rows():
    """Each latent's direction is its decoder row over that row's L2 norm (numpy, row by row)."""
    model = SparseDictionary(DictionaryConfig(d_in=5, d_sae=8))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        model.W_dec.copy_(torch.randn(8, 5, generator=g) * torch.linspace(0.2, 5.0, 8)[:, None])
    w = np64(model.W_dec)
    want = np.stack([row / math.sqrt(float(row @ row)) for row in w])
    np.testing.assert_allclose(np64(model.decoder_directions), want, rtol=1e-6)


def test_skip_transcoder_decode_and_target_scaling_by_hand():
    """A normalised skip transcoder (s_in = 2.5, s_out = 0.4): ``decode(f, x) = (f W_dec + b_dec + s_in x W_skip^T)
    / s_out`` and ``normalise_target(y) = s_out y`` (the module's formulas, in numpy)."""
    cfg = DictionaryConfig(d_in=6, d_sae=9, transcoder=True, d_out=4, skip=True,
                           normalize_activations="expected_average_only_in", dtype="float64")  # fmt: skip
    model = SparseDictionary(cfg, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        model.W_skip.copy_(torch.randn(4, 6, generator=g, dtype=torch.float64))
        model.b_dec.copy_(torch.randn(4, generator=g, dtype=torch.float64))
        model.in_scale.fill_(2.5)
        model.out_scale.fill_(0.4)
    x = torch.randn(11, 6, generator=g, dtype=torch.float64)
    f = torch.rand(11, 9, generator=g, dtype=torch.float64)
    want = (np64(f) @ np64(model.W_dec) + np64(model.b_dec) + 2.5 * np64(x) @ np64(model.W_skip).T) / 0.4
    np.testing.assert_allclose(np64(model.decode(f, x)), want, rtol=1e-10)
    y = torch.randn(11, 4, generator=g, dtype=torch.float64)
    np.testing.assert_allclose(np64(model.normalise_target(y)), 0.4 * np64(y), rtol=1e-12)
    # and the whole forward pass, by hand
    z = 2.5 * np64(x) @ np64(model.W_enc) + np64(model.b_enc)
    fz = np.maximum(z, 0)
    out = (fz @ np64(model.W_dec) + np64(model.b_dec) + 2.5 * np64(x) @ np64(model.W_skip).T) / 0.4
    np.testing.assert_allclose(np64(model(x).output), out, rtol=1e-10)


def test_aux_k_defaults_are_gao_et_al():
    """Gao et al. 2024, B.1 / A.2: k_aux defaults to d_model / 2 and the AuxK coefficient to 1/32."""
    cfg = DictionaryConfig(d_in=12, d_sae=100, architecture="topk", k=4)
    assert cfg.k_aux == 6 and cfg.aux_k_coefficient == pytest.approx(1 / 32)
    assert DictionaryConfig(d_in=12, d_sae=4, architecture="topk", k=2).k_aux == 4  # never more than d_sae


# ---- the SAELens directory -------------------------------------------------------------------------------------


def test_sae_without_decoder_bias_subtraction_is_written_as_such(random_model, tmp_path):
    """An SAE with apply_b_dec_to_input=False: cfg.json (read by json) says false, and SAELens' forward pass on the
    files (numpy) reproduces the model."""
    model = random_model(apply_b_dec_to_input=False).eval()
    save_saelens(model, tmp_path)
    assert json.loads((tmp_path / "cfg.json").read_text())["apply_b_dec_to_input"] is False
    x = torch.randn(40, 6, generator=torch.Generator().manual_seed(0))
    f, y = saelens_forward(tmp_path, np64(x))
    out, latents = model(x)
    np.testing.assert_allclose(np64(latents), f, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np64(out), y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kw, arch",
    [
        (dict(architecture="batchtopk", k=3), "jumprelu"),
        (dict(architecture="topk", k=3), "topk"),
        (dict(architecture="jumprelu", normalize_activations="expected_average_only_in"), "jumprelu"),
        (dict(transcoder=True, d_out=4, skip=True, normalize_activations="expected_average_only_in"),
         "skip_transcoder"),
    ],
)  # fmt: skip
def test_saved_files_run_as_saelens_reads_them(kw, arch, random_model, tmp_path):
    """The saved directory read back with json and safetensors.numpy, run through SAELens' forward pass in numpy,
    gives the model's latents and outputs on raw inputs (BatchTopK as a JumpReLU with its one threshold in every
    entry; the normalisation folded into the weights)."""
    model = random_model(**kw).eval()
    with torch.no_grad():
        if model.cfg.architecture == "batchtopk":
            model.threshold.fill_(0.15)
        if model.cfg.normalize_activations != "none":
            model.in_scale.fill_(2.0)
            model.out_scale.fill_(2.0 if not model.cfg.transcoder else 0.5)
    save_saelens(model, tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["architecture"] == arch and cfg["normalize_activations"] == "none"
    if arch == "topk":
        assert cfg["k"] == 3 and cfg["activation_fn_kwargs"] == {"k": 3}
    stored = np_load_file(str(tmp_path / "sae_weights.safetensors"))
    if model.cfg.architecture == "batchtopk":
        np.testing.assert_array_equal(stored["threshold"], np.full(10, 0.15, dtype=np.float32))
    x = torch.randn(60, 6, generator=torch.Generator().manual_seed(1)) * 0.7
    f, y = saelens_forward(tmp_path, np64(x))
    out, latents = model(x)
    assert (f > 0).any() and (f == 0).any()
    np.testing.assert_allclose(np64(latents), f, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np64(out), y, rtol=1e-4, atol=1e-4)


def test_decoder_norm_rescaling_is_refused(tmp_path):
    """SAELens' ``rescale_acts_by_decoder_norm=true`` changes the forward pass; reading it as a plain TopK would
    give wrong latents, so it is refused in one line."""
    g = torch.Generator().manual_seed(0)
    w = {"W_enc": torch.randn(4, 8, generator=g), "b_enc": torch.zeros(8), "W_dec": torch.randn(8, 4, generator=g),
         "b_dec": torch.zeros(4)}  # fmt: skip
    cfg = {"d_in": 4, "d_sae": 8, "architecture": "topk", "k": 2, "dtype": "float32",
           "rescale_acts_by_decoder_norm": True}  # fmt: skip
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    save_file(w, str(tmp_path / "sae_weights.safetensors"))
    with pytest.raises(MechscopeError) as e:
        load_saelens(tmp_path)
    assert "rescale_acts_by_decoder_norm" in one_line_error(e)


def test_mechscope_directory_marked_normalised_uses_the_factor(random_model, tmp_path):
    """A mechscope-written directory whose cfg.json says expected_average_only_in (as SAELens writes a normalised
    SAE): loaded with factor s, the SAELens formula ``y = (f(s x) W_dec + b_dec) / s`` (numpy) holds."""
    model = random_model(architecture="jumprelu").eval()
    save_saelens(model, tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    cfg["normalize_activations"] = "expected_average_only_in"
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    s = 0.3
    loaded = load_saelens(tmp_path, norm_scaling_factor=s).model
    x = torch.randn(30, 6, generator=torch.Generator().manual_seed(4)) * 3
    f, y_scaled = saelens_forward(tmp_path, s * np64(x))
    np.testing.assert_allclose(np64(loaded(x).output), y_scaled / s, rtol=1e-4, atol=1e-4)


# ---- the activation store ---------------------------------------------------------------------------------------


def test_split_pairs_are_the_stored_columns_in_order(tmp_path):
    """Rows ``[x | y]`` planted with x = (id, id + 0.25, id + 0.5) and y = -(id + j): each pair the reader yields
    has x the first 3 columns and y the last 5 of the same row (known by construction)."""

    def rows():
        for b in range(4):
            ids = torch.arange(b * 50, (b + 1) * 50, dtype=torch.float32)[:, None]
            yield torch.cat([ids + torch.tensor([0.0, 0.25, 0.5]), -(ids + torch.arange(1.0, 6.0))], 1)

    harvest(rows(), tmp_path, shard_rows=50, buffer_rows=100, progress=False)
    for x, y in ActivationReader(tmp_path, 20, split=(3, 5)):
        ids = x[:, 0]
        torch.testing.assert_close(x, ids[:, None] + torch.tensor([0.0, 0.25, 0.5]))
        torch.testing.assert_close(y, -(ids[:, None] + torch.arange(1.0, 6.0)))
    cfg = DictionaryConfig(d_in=3, d_sae=4, transcoder=True, d_out=5)
    x, y = next(iter(store_reader(tmp_path, cfg, 20)))
    torch.testing.assert_close(y, -(x[:, :1] + torch.arange(1.0, 6.0)))


def test_every_row_once_per_epoch_across_shard_groups(tmp_path):
    """2000 planted row ids in 10 shards read 3 shards at a time in batches of 64 (groups not a multiple of the
    batch): each epoch's batches hold each id at most once and, with drop_last=False, all 2 x 2000 ids are read
    (a hand count of the ids)."""
    harvest(corpus(20), tmp_path, shard_rows=200, buffer_rows=400, seed=0, progress=False)
    batches = list(ActivationReader(tmp_path, 64, seed=5, mix_shards=3, epochs=2, drop_last=False))
    ids = torch.cat(batches)[:, 0].long()
    assert np.bincount(ids.numpy(), minlength=2000).tolist() == [2] * 2000
    assert sum(b.shape[0] for b in batches[:-1]) == 64 * (len(batches) - 1)
    dropped = list(ActivationReader(tmp_path, 64, seed=5, mix_shards=3, epochs=2))
    assert len(dropped) == 4000 // 64  # only the last part batch is dropped, not one per group


def test_a_caller_resumed_harvest_with_input_offset_stores_every_row_once(tmp_path):
    """Interrupted after 1300 rows (two 512-row windows written), resumed by a caller that replays the input from
    row 1000 (``input_offset=1000``): the store ends with ids 0..2499 each exactly once (planted ids)."""
    with pytest.raises(KeyboardInterrupt):
        harvest(interrupted(), tmp_path, shard_rows=256, buffer_rows=512, seed=1, progress=False)
    assert stored_rows(tmp_path) == 1024
    rest = (b for i, b in enumerate(corpus(25)) if i >= 10)
    r = harvest(rest, tmp_path, shard_rows=256, buffer_rows=512, seed=1, progress=False, input_offset=1000)
    assert r.rows == 2500 and r.resumed_rows == 1024
    m = json.loads((tmp_path / "manifest.json").read_text())
    ids = torch.cat([load_file(str(tmp_path / s["file"]))["activations"] for s in m["shards"]])[:, 0].long()
    assert np.bincount(ids.numpy(), minlength=2500).tolist() == [1] * 2500


def test_a_shard_not_matching_its_manifest_is_refused(tmp_path):
    """A shard rewritten (with the safetensors library) to hold 150 of its manifest's 200 rows is a one-line error,
    not silently fewer rows."""
    harvest(corpus(4), tmp_path, shard_rows=200, buffer_rows=400, progress=False)
    where = tmp_path / "shard-000001.safetensors"
    rows = load_file(str(where))["activations"]
    save_file({"activations": rows[:150].contiguous()}, str(where))
    with pytest.raises(MechscopeError) as e:
        list(ActivationReader(tmp_path, 50, mix_shards=1))
    assert "manifest" in one_line_error(e)


def test_staged_training_refuses_other_streams_and_small_stores(tmp_path):
    """A checkpoint's stream record (written here by hand with json) must match to resume; a store of fewer rows
    than one batch is refused (a hand count: 200 rows < 256)."""
    where = tmp_path / "ck"
    where.mkdir()
    (where / "stream.json").write_text(json.dumps({"store": "/s", "batch_size": 64, "epochs": 1, "rows": 100}))
    _check_stream(where, {"store": "/s", "batch_size": 64, "epochs": 1, "rows": 100}, True, True)
    with pytest.raises(MechscopeError) as e:
        _check_stream(where, {"store": "/s", "batch_size": 128, "epochs": 1, "rows": 100}, True, True)
    assert "batch_size" in one_line_error(e)
    harvest(corpus(2), tmp_path / "store", shard_rows=100, progress=False)
    with pytest.raises(MechscopeError) as e:
        store_reader(tmp_path / "store", DictionaryConfig(d_in=8, d_sae=4), 256)
    assert "fewer than one batch" in one_line_error(e)


# ---- metrics ------------------------------------------------------------------------------------------------------


def test_zero_vectors_follow_saelens_conventions():
    """SAELens: an input norm below 1e-4 counts as 1 in l2_ratio; cosine similarity of a zero vector is 0 (as
    ``torch.nn.functional.cosine_similarity``, eps 1e-8). Rows: x = 0 with x_hat = (3, 4): ratio 5, cosine 0."""
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    x_hat = torch.tensor([[3.0, 4.0], [2.0, 0.0], [0.0, 0.0]])
    ratio = (5.0 / 1 + 2.0 / 1 + 0.0 / 2) / 3
    cos = float(torch.nn.functional.cosine_similarity(x.double(), x_hat.double(), dim=-1).mean())
    assert cos == pytest.approx(1 / 3)
    assert M.l2_ratio(x, x_hat) == pytest.approx(ratio)
    assert M.cosine_similarity(x, x_hat) == pytest.approx(cos)
    acc = M.StreamingMetrics(2, 3)
    acc.update(x, x_hat, torch.zeros(3, 3))
    r = acc.result()
    assert r.l2_ratio == pytest.approx(ratio) and r.cosine_similarity == pytest.approx(cos)


def test_evaluate_uses_the_inference_threshold_of_a_training_batchtopk(random_model):
    """evaluate() on a BatchTopK model left in training mode measures the inference JumpReLU (L0 by numpy:
    ``#{z > theta}`` per token), not the batch's top k, and leaves the model in training mode."""
    model = random_model(architecture="batchtopk", k=2).train()
    with torch.no_grad():
        model.threshold.fill_(0.05)
    x = torch.randn(128, 6, generator=torch.Generator().manual_seed(7))
    z = (np64(x) - np64(model.b_dec)) @ np64(model.W_enc) + np64(model.b_enc)
    want = float((z > 0.05).sum(1).mean())
    assert abs(want - 2) > 0.5  # the threshold's L0 differs from k here
    r = M.evaluate(model, [x[:64], x[64:]])
    assert r.l0 == pytest.approx(want) and model.training


# ---- latents --------------------------------------------------------------------------------------------------------


def planted_latents():
    """[100, 5] latents: latent 1 fires on 40 of 100 rows with the values 1..40 in a shuffled order (row 2 i + 3 ->
    (7 i mod 40) + 1, so its last row is not its largest), latent 3 on row 97 only (value 7), latent 4 on 10 rows
    (value 0.5), 0 and 2 never."""
    f = np.zeros((100, 5), dtype=np.float32)
    for i in range(40):
        f[2 * i + 3, 1] = (7 * i) % 40 + 1
    f[97, 3] = 7.0
    f[50:60, 4] = 0.5
    return f


def test_collector_densities_maxima_and_dense_rows_of_planted_latents():
    """Fed in batches of 30, 45 and 25 rows: densities 0, .4, 0, .01, .1; maxima 0, 40, 0, 7, .5; latent 1's rows
    and values and its dense column are the planted ones (rows numbered across batches)."""
    f = planted_latents()
    col = LatentCollector(5)
    for lo, hi in ((0, 30), (30, 75), (75, 100)):
        col.update(torch.tensor(f[lo:hi]))
    acts = col.result()
    np.testing.assert_allclose(densities(acts), [0, 0.4, 0, 0.01, 0.1])
    np.testing.assert_allclose(maxima(acts), [0, 40, 0, 7, 0.5])
    rows, values = acts.of(1)
    assert rows.tolist() == [2 * i + 3 for i in range(40)] and values.tolist() == [(7 * i) % 40 + 1 for i in range(40)]
    assert acts.of(3)[0].tolist() == [97]
    np.testing.assert_array_equal(acts.dense(1), f[:, 1])


def test_latent_summary_against_numpy_quantiles_and_histogram():
    """Latent 1 (values 1..40 on 40 of 100 rows): density .4, max 40, mean when active 20.5, top rows those of
    40, 39, 38 (found by numpy in the planted array); band edges numpy's quartiles, each band's samples inside its
    (lo, hi] (the first [lo, hi], so the minimum 1 is drawable), and the histogram numpy's over [0, max]."""
    f = planted_latents()
    row_of = {float(f[r, 1]): r for r in np.flatnonzero(f[:, 1])}
    col = LatentCollector(5)
    col.update(torch.tensor(f))
    acts = col.result()
    s = latent_summary(acts, 1, k=3, bands=4, per_band=10, bins=8)
    values = np.arange(1, 41, dtype=np.float64)
    assert s.density == pytest.approx(0.4) and s.max == 40 and s.mean_when_active == pytest.approx(20.5)
    assert s.top_values == (40.0, 39.0, 38.0) and s.top_rows == tuple(np.argsort(-f[:, 1])[:3].tolist())
    edges = np.quantile(values, [0, 0.25, 0.5, 0.75, 1])
    np.testing.assert_allclose(s.band_edges, edges)
    for i, (brows, bvals) in enumerate(zip(s.band_rows, s.band_values, strict=True)):
        inside = values[(values > edges[i]) & (values <= edges[i + 1])] if i else values[values <= edges[1]]
        assert len(bvals) == 10 and set(bvals) <= set(inside), i
        assert list(brows) == [row_of[v] for v in bvals]
    assert 1.0 in s.band_values[0]  # the first band is closed: 10 of its 10 values drawn include the minimum
    counts, hedges = np.histogram(values, bins=8, range=(0.0, 40.0))
    assert s.hist_counts == tuple(counts.tolist())
    np.testing.assert_allclose(s.hist_edges, hedges)


def test_folding_an_sae_whose_two_scales_differ_keeps_its_latents_and_output():
    """Truth: the unfolded dictionary's own definition, written out in numpy: z = (s_in x - b_dec) W_enc + b_enc,
    f = ReLU(z), y = (f W_dec + b_dec) / s_out. Training and SAELens files give an SAE one scale for both sides; a
    dictionary whose scales are set apart by hand must fold to the same latents and output (b_dec subtracted at the
    input is read at s_in but stored at 1/s_out, so b_enc takes up the difference)."""
    from mechscope.core.dictionaries import DictionaryConfig, SparseDictionary

    g = torch.Generator().manual_seed(7)
    d = SparseDictionary(DictionaryConfig(d_in=6, d_sae=10, normalize_activations="expected_average_only_in"),
                         generator=g)  # fmt: skip
    with torch.no_grad():
        d.b_dec.normal_(0, 0.5, generator=g)
        d.b_enc.normal_(0, 0.2, generator=g)
        d.in_scale.fill_(2.5)
        d.out_scale.fill_(0.4)
    d.eval()
    x = torch.randn(9, 6, generator=g)
    W_enc, W_dec = d.W_enc.detach().double().numpy(), d.W_dec.detach().double().numpy()
    b_enc, b_dec = d.b_enc.detach().double().numpy(), d.b_dec.detach().double().numpy()
    f = np.maximum((2.5 * x.double().numpy() - b_dec) @ W_enc + b_enc, 0)
    y = (f @ W_dec + b_dec) / 0.4
    assert (f > 0).any() and np.abs(b_dec @ W_enc).max() > 0.05  # the case: b_dec reaches the latents
    folded = d.folded()
    with torch.no_grad():
        np.testing.assert_allclose(folded.encode(x).double().numpy(), f, atol=1e-5)
        np.testing.assert_allclose(folded(x).output.double().numpy(), y, atol=1e-4)
        np.testing.assert_allclose(d(x).output.double().numpy(), y, atol=1e-4)
