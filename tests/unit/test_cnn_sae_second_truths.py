"""Sparse dictionaries on a CNN, second pass of outside truths: the splice's accuracies, KLs and reconstruction
by a forward hook of our own and numpy; the random control's documented construction; the feature visualisation's
objective by finite differences; and the pipeline's harvest, train, evaluate and show outputs against numpy
recomputations of a planted dictionary on a tiny CNN (rows unfolded by a plain loop)."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mechscope.cnn.data.images import ImageDataset
from mechscope.cnn.methods import sae as S
from mechscope.cnn.models.spec import walk
from mechscope.cnn.pipelines import sae as CS
from mechscope.core.dictionaries import DictionaryConfig, SparseDictionary, save_saelens
from tests.unit.test_sae_cnn import images, interrupt_harvest_after, tiny_cnn

pytestmark = pytest.mark.usefixtures("one_thread")

HOOK = "conv2.hook_out"  # tiny_cnn: 6 channels on a 4x4 map


def plain_acts(model, x, replace=None) -> tuple[np.ndarray, np.ndarray]:
    """(conv2's pooled output [N, 6, 4, 4], logits) read with a torch forward hook of our own on the pool module;
    ``replace(out) -> new out`` splices."""
    seen = []

    def hook(m, i, o):
        seen.append(o.detach().double().numpy())
        return replace(o) if replace is not None else None

    handle = model.conv2.pool.register_forward_hook(hook)
    try:
        with torch.no_grad():
            logits = model(x)
    finally:
        handle.remove()
    return seen[0], logits.double().numpy()


def unfold(a: np.ndarray) -> np.ndarray:
    """[N, C, H, W] -> rows [N*H*W, C] by a plain loop, row n*H*W + y*W + x."""
    n, c, h, w = a.shape
    return np.array([a[b, :, y, x] for b in range(n) for y in range(h) for x in range(w)]).reshape(-1, c)


def fold(rows: np.ndarray, shape) -> np.ndarray:
    n, c, h, w = shape
    out = np.zeros(shape)
    for r, v in enumerate(rows):
        b, pos = divmod(r, h * w)
        out[b, :, pos // w, pos % w] = v
    return out


def kl_np(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    lp = p_logits - np.log(np.exp(p_logits).sum(1, keepdims=True))
    lq = q_logits - np.log(np.exp(q_logits).sum(1, keepdims=True))
    return (np.exp(lp) * (lp - lq)).sum(1)


def test_splice_effect_accuracies_kls_and_reconstruction_by_hand():
    """Truth: a forward hook of our own replacing conv2's pooled output by the dictionary's reconstruction of rows
    unfolded by a loop (or by zeros); accuracies as numpy means, KL(softmax clean || softmax other) in numpy,
    averaged over the 50 images (batches of 16: the last holds 2), recovered shares by the module's formulas, mse
    and l0 of the rows."""
    model, x = tiny_cnn(1), images(50, 3)
    y = torch.randint(0, 3, (50,), generator=torch.Generator().manual_seed(5))
    sae = SparseDictionary(DictionaryConfig(d_in=6, d_sae=10, architecture="topk", k=2),
                           generator=torch.Generator().manual_seed(0)).eval()  # fmt: skip

    def splice(o):
        rows = torch.from_numpy(unfold(o.double().numpy())).float()
        with torch.no_grad():
            return torch.from_numpy(fold(sae(rows)[0].double().numpy(), o.shape)).float()

    a, clean = plain_acts(model, x)
    _, spl = plain_acts(model, x, splice)
    _, zero = plain_acts(model, x, torch.zeros_like)
    yy = y.numpy()
    acc = [float(np.mean(lg.argmax(1) == yy)) for lg in (clean, spl, zero)]
    kls, klz = kl_np(clean, spl).mean(), kl_np(clean, zero).mean()
    effect, metrics = S.splice_effect(walk(model), x, y, sae, HOOK, batch=16)
    assert effect.images == 50
    assert [effect.acc_clean, effect.acc_spliced, effect.acc_ablated] == pytest.approx(acc)
    assert effect.kl_spliced == pytest.approx(kls, rel=1e-4) and effect.kl_ablated == pytest.approx(klz, rel=1e-4)
    assert kls != pytest.approx(klz, rel=0.05)  # the two KLs differ: a swap shows
    assert effect.kl_recovered == pytest.approx((klz - kls) / klz, rel=1e-4)
    if acc[0] != acc[2]:
        assert effect.accuracy_recovered == pytest.approx((acc[1] - acc[2]) / (acc[0] - acc[2]))
    rows = unfold(a)
    with torch.no_grad():
        out, f = (t.double().numpy() for t in sae(torch.from_numpy(rows).float()))
    assert metrics.mse == pytest.approx(((rows - out) ** 2).mean(), rel=1e-4) and metrics.mse > 0
    assert metrics.l0 == pytest.approx((f != 0).sum(1).mean())


def test_random_control_is_the_documented_topk():
    """Truth: the docstring: a TopK dictionary of the asked size and L0 (at least 1, at most d_sae), unit decoder
    rows, encoder = decoder transposed, decoder bias at the given mean."""
    mean = torch.tensor([0.5, -1.0, 2.0, 0.25])
    c = S.random_control(4, 9, 3, mean, seed=2)
    assert (c.cfg.architecture, c.cfg.d_in, c.cfg.d_sae, c.cfg.k) == ("topk", 4, 9, 3)
    assert torch.equal(c.b_dec.detach(), mean)
    assert torch.allclose(c.W_dec.detach().norm(dim=1), torch.ones(9), atol=1e-5)
    assert torch.allclose(c.W_enc.detach(), c.W_dec.detach().T)
    assert S.random_control(4, 9, 0, mean).cfg.k == 1 and S.random_control(4, 9, 20, mean).cfg.k == 9
    assert not torch.equal(S.random_control(4, 9, 3, mean, seed=3).W_dec, c.W_dec)


def test_featvis_objective_is_each_latents_mean_pre_activation(monkeypatch):
    """Truth: finite differences of the dictionary's own pre-activations, z(row) − z(0), averaged over the map's
    positions by a loop: image b of the batch scores latent ``latents[b]``."""
    from mechscope.cnn.methods import featvis as FV

    d = SparseDictionary(DictionaryConfig(d_in=6, d_sae=8, normalize_activations="expected_average_only_in"),
                         generator=torch.Generator().manual_seed(0))  # fmt: skip
    with torch.no_grad():
        d.in_scale.fill_(2.5)
        d.b_dec.copy_(torch.linspace(-0.3, 0.4, 6))
    got = {}

    def render(model, objective, batch, steps, seed):
        got.update(objective=objective, batch=batch, steps=steps, seed=seed)
        return SimpleNamespace(images=torch.zeros(batch, 1, 28, 28))

    monkeypatch.setattr(FV, "render", render)
    spec, latents = walk(tiny_cnn()), [5, 1, 6]
    S.featvis_latents(spec, d, HOOK, latents, steps=7, seed=3)
    assert (got["batch"], got["steps"], got["seed"]) == (3, 7, 3)
    a = torch.rand(3, 6, 4, 4, generator=torch.Generator().manual_seed(1))
    value = got["objective"]({HOOK: a}).double().numpy()
    with torch.no_grad():
        z0 = d.pre_activations(d.normalise_input(torch.zeros(1, 6)))[0].double().numpy()
        truth = []
        for b, j in enumerate(latents):
            zs = [d.pre_activations(d.normalise_input(a[b, :, yy, xx][None]))[0, j].item() - z0[j]
                  for yy in range(4) for xx in range(4)]  # fmt: skip
            truth.append(np.mean(zs))
    np.testing.assert_allclose(value, truth, rtol=1e-4, atol=1e-6)
    assert S.featvis_latents(spec, d, HOOK, []).shape == (0, 1, 28, 28)


# ---- harvest, train, evaluate -----------------------------------------------------------------------------


def labelled(model, n_train: int = 30, n_test: int = 36) -> ImageDataset:
    """Random images, balanced labels in a seeded order (every class present, not the model's predictions)."""
    g = torch.Generator().manual_seed(9)
    y_train, y_test = torch.randperm(n_train, generator=g) % 3, torch.randperm(n_test, generator=g) % 3
    return ImageDataset("planted", images(n_train, 1), y_train, images(n_test, 2), y_test, ("a", "b", "c"))


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cnn-sae-second")
    model = tiny_cnn(4)
    data = labelled(model)
    _, h = CS.sae_harvest_model(model, data, tmp / "h", split="test", limit=17, batch=8, shard_rows=64,
                                progress=False)  # fmt: skip
    _, t = CS.sae_train_run(tmp / "h", tmp / "sae", k=2, batch_size=64, steps=2, progress=False)
    _, e = CS.sae_evaluate_model(model, data, tmp / "sae", tmp / "ev", limit=30, progress=False)
    return SimpleNamespace(tmp=tmp, model=model, data=data, h=h, t=t, e=e)


def test_harvest_stores_every_test_row_and_its_speeds_agree(chain):
    """Truth: the test images' rows unfolded by a loop from our own hook (the store shuffles them: compared as
    sorted multisets; 17 images in batches of 8: the last holds one); 16 rows per image, so rows per second is 16
    times images per second."""
    from safetensors.torch import load_file

    a, _ = plain_acts(chain.model, chain.data.test_images[:17])
    stored = np.concatenate([load_file(str(p))["activations"].double().numpy()
                             for p in sorted((chain.tmp / "h" / "store").glob("shard-*.safetensors"))])  # fmt: skip
    truth = unfold(a)
    assert stored.shape == truth.shape == (272, 6)
    np.testing.assert_allclose(stored[np.lexsort(stored.T)], truth[np.lexsort(truth.T)], atol=1e-6)
    assert (chain.h.images, chain.h.rows, chain.h.width, chain.h.activation_shape) == (17, 272, 6, (6, 4, 4))
    assert chain.h.rows_per_second == pytest.approx(16 * chain.h.images_per_second)


def test_a_resumed_harvest_counts_its_speed_over_the_images_it_ran(tmp_path, monkeypatch):
    """Truth: 16 rows per image: rows per second stays 16 × images per second when a harvest resumes (both over the
    images that run harvested, not the whole split)."""
    model = tiny_cnn(5)
    data = labelled(model, n_train=40)
    original = interrupt_harvest_after(monkeypatch, 3)
    kw = dict(batch=4, shard_rows=16, buffer_shards=1, progress=False)
    with pytest.raises(KeyboardInterrupt):
        CS.sae_harvest_model(model, data, tmp_path / "h", **kw)
    monkeypatch.setattr(S, "harvest_batches", original)
    _, r = CS.sae_harvest_model(model, data, tmp_path / "h", **kw)
    assert 0 < r.resumed_rows < r.rows == 640
    assert r.rows_per_second == pytest.approx(16 * r.images_per_second)


def test_train_defaults_expansion_16_and_saves_the_hooks_layer(chain):
    """Truth: the documented defaults: d_sae = 16 × the hook's 6 channels, activations normalised (cfg.json holds
    the folded weights, "none" there: the training record keeps the setting), and SAELens' cfg.json naming conv2's
    hook and layer 2."""
    cfg = json.loads((chain.tmp / "sae" / "cfg.json").read_text())
    assert chain.t.d_sae == 96 and cfg["d_sae"] == 96 and cfg["d_in"] == 6
    assert (cfg["hook_name"], cfg["hook_layer"]) == (HOOK, 2)
    assert chain.t.config["normalize_activations"] == "expected_average_only_in"


def test_a_stage_numbered_past_nine_saves_its_whole_number_as_the_layer(chain, tmp_path):
    """Truth: SAELens' hook_layer is the stage's number as written in the hook name ("conv12" is stage 12, not 1);
    the harvest record is edited by hand to name a twelfth stage."""
    shutil.copytree(chain.tmp / "h", tmp_path / "h")
    record = tmp_path / "h" / S.CnnSaeHarvest.FILE
    raw = json.loads(record.read_text())
    record.write_text(json.dumps(raw | {"hook": "conv12.hook_post"}))
    CS.sae_train_run(tmp_path / "h", tmp_path / "sae", k=2, batch_size=64, steps=1, progress=False)
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert (cfg["hook_name"], cfg["hook_layer"]) == ("conv12.hook_post", 12)


def test_evaluate_counts_the_dictionarys_rows_and_images(chain):
    """Truth: 30 test images × 16 positions = 480 rows; the dictionary runs twice over them (spliced in, and for
    the reconstruction metrics); the network three times over the images plus a one-image probe."""
    e = chain.e
    assert e.effect.images == 30 and "(30 images)" in e.dataset
    assert e.work["dictionary"]["rows_per_pass"] == 480 and e.work["dictionary"]["forward_passes"] == 2
    assert e.work["rows_per_pass"] == 30 and e.work["forward_passes"] == pytest.approx(3 + 1 / 30, abs=1e-3)


def test_example_rows_are_image_then_row_then_column():
    """Truth: the module's row layout b*H*W + y*W + x on a 2x3 map; without a receptive field the box is the
    whole (28 high, 20 wide) input."""
    e = CS._example(9, 1.5, [2, 1], (2, 3), None, (1, 28, 20))
    assert (e.image, e.label, e.position, e.box, e.value) == (1, 1, (1, 0), (0, 28, 0, 20), 1.5)


def test_comparison_counts_the_threshold_itself_and_only_alive_latents():
    """Truth: the docstring: digit-selective at an index of at least 0.6; latents counted among the alive only;
    "selective or tuned" the union, counted by hand."""
    ch_tuning = tuple(S.UnitTuningSummary(t, "", "") for t in (False, True, False))
    out = CS._comparison([0.6, 0.59, 0.3], [0.6, 0.2, 0.7, 0.0], np.array([True, True, True, False]),
                         ch_tuning, (1,))  # fmt: skip
    assert out["channels"] == {"units": 3, "selective": 1, "median_index": 0.59, "tuned": 1, "selective_or_tuned": 2}
    assert out["latents"] == {"units": 3, "selective": 2, "median_index": 0.6, "tuned": 1, "selective_or_tuned": 3}


def test_choose_keeps_asked_first_then_the_most_selective_alive():
    """Truth: by hand: latent 2 asked (and the most selective: it stays "asked"); the selective ones in falling
    index among the alive (dead 1 and 4 never shown, though 1 has the highest index); random from the rest."""
    sel = [0.5, 0.95, 0.9, 0.7, 0.8, 0.1]
    alive = np.array([True, False, True, True, False, True])
    chosen = CS._choose([2], sel, alive, 5, 0, 0)
    assert chosen == [(2, "asked"), (3, "most class-selective"), (0, "most class-selective"),
                      (5, "most class-selective")]  # fmt: skip
    rnd = CS._choose([], sel, alive, 1, 9, 0)
    assert rnd[0] == (2, "most class-selective") and sorted(i for i, _ in rnd[1:]) == [0, 3, 5]


# ---- show: a planted dictionary, numpy truths ----------------------------------------------------------------

PLANTED = ({1, 4}, {0, 3, 4, 9}, {2, 5})  # tuned units: channels, latents (9 is dead), the random control


def planted_dictionary() -> SparseDictionary:
    """Latent j = ReLU(channel j), latent 6+j = ReLU(b_j − channel j) for j = 0, 1 (alive) and ReLU(−channel j)
    otherwise (dead: the pooled ReLU map is never negative); random decoder rows."""
    d = SparseDictionary(DictionaryConfig(d_in=6, d_sae=12, l1_coefficient=0.0))
    with torch.no_grad():
        d.W_enc.copy_(torch.cat([torch.eye(6), -torch.eye(6)], 1))
        d.b_enc.zero_()
        d.b_enc[6], d.b_enc[7] = 3.0, 0.65  # L0 about 6.2: rounding and rounding up differ
        d.b_dec.zero_()
        d.W_dec.copy_(torch.randn(12, 6, generator=torch.Generator().manual_seed(3)))
    return d.eval()


def sel_np(per_image: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(class means [U, 3], shifted selectivity index [U]) by loops."""
    cm = np.stack([per_image[y == k].mean(0) for k in range(3)], 1)
    s = cm - cm.min(1, keepdims=True)
    top, rest = s.max(1), (s.sum(1) - s.max(1)) / 2
    return cm, np.array([(t - r) / (t + r) if t + r > 0 else 0.0 for t, r in zip(top, rest, strict=True)])


@pytest.fixture(scope="module")
def shown(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cnn-sae-show")
    model = tiny_cnn(4)
    data = labelled(model)
    sae = planted_dictionary()
    a, _ = plain_acts(model, data.test_images)
    rows = unfold(a)
    lat = np.maximum(rows @ sae.W_enc.detach().double().numpy() + sae.b_enc.detach().double().numpy(), 0)
    y = data.test_labels.numpy()
    lcm, lsel = sel_np(lat.reshape(36, 16, 12).mean(1), y)
    alive = (lat > 0).any(0)
    asked = int(np.argmax(np.where(alive, lsel, -1)))
    calls = []

    def fake(spec, hook, encode, stim, dataset_max, batch=512):
        calls.append(dataset_max.double().numpy())
        tuned = PLANTED[len(calls) - 1]
        return [S.UnitTuningSummary(u in tuned, "planted" if u in tuned else "", "") for u in range(len(dataset_max))]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(S, "tuning_labels", fake)
        saved = save_saelens(sae, tmp / "sae", hook_name=HOOK)
        _, r = CS.sae_show_model(model, data, saved, tmp / "dash", latents=(asked,), n_selective=3, n_random=2, k=4,
                                 featvis_steps=0, progress=False)  # fmt: skip
    return SimpleNamespace(r=r, a=a, rows=rows, lat=lat, y=y, lcm=lcm, lsel=lsel, alive=alive, asked=asked,
                           calls=calls, W_dec=sae.W_dec.detach().double().numpy())  # fmt: skip


def test_show_selectivity_preferences_and_dead_latents_by_numpy(shown):
    """Truth: numpy class means of each unit's per-image mean over positions (loops over classes), the shifted
    index by its formula; the planted dictionary's dead latents and densities."""
    r, alive = shown.r, shown.alive
    ccm, csel = sel_np(shown.a.mean((2, 3)), shown.y)
    np.testing.assert_allclose(r.channel_selectivity, csel, atol=1e-5)
    np.testing.assert_allclose(r.latent_selectivity, shown.lsel, atol=1e-5)
    assert r.channel_preferred == tuple(ccm.argmax(1)) and r.latent_preferred == tuple(shown.lcm.argmax(1))
    assert not alive[8:].any() and alive[6:8].all()
    assert r.dead_fraction == pytest.approx((~alive).mean()) and r.dead_fraction < 0.5
    np.testing.assert_allclose(r.densities, (shown.lat > 0).mean(0))
    assert r.comparison["channels"]["selective"] == int((csel >= 0.6).sum())
    assert r.comparison["channels"]["median_index"] == pytest.approx(np.median(csel), abs=1e-5)
    lt = r.comparison["latents"]
    assert lt["units"] == alive.sum() and lt["median_index"] == pytest.approx(np.median(shown.lsel[alive]), abs=1e-5)
    assert lt["selective"] == int((shown.lsel[alive] >= 0.6).sum())


def test_show_passes_each_units_dataset_maximum_and_counts_the_planted_tuning(shown):
    """Truth: numpy maxima over images and positions (channels, latents); the planted tuning labels counted by
    hand, a dead latent's label not counted."""
    r, alive = shown.r, shown.alive
    np.testing.assert_allclose(shown.calls[0], shown.a.max((0, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(shown.calls[1], shown.lat.max(0), rtol=1e-5)
    assert r.latent_tuned == (0, 3, 4) and [t.tuned for t in r.channel_tuning] == [u in {1, 4} for u in range(6)]
    csel = np.asarray(r.channel_selectivity)
    assert r.comparison["channels"]["tuned"] == 2 and r.comparison["latents"]["tuned"] == 3
    assert r.comparison["channels"]["selective_or_tuned"] == sum(csel[u] >= 0.6 or u in {1, 4} for u in range(6))
    want = sum(1 for u in range(12) if alive[u] and (shown.lsel[u] >= 0.6 or u in {0, 3, 4}))
    assert r.comparison["latents"]["selective_or_tuned"] == want


def test_show_random_control_of_the_dictionarys_l0_centred_on_the_mean(shown):
    """Truth: the L0 of the numpy latents (mean nonzero per row, rounded), the rows' numpy mean as the control's
    decoder bias; its alive units, selective count and median index by numpy; its planted tuning counted."""
    l0_mean = (shown.lat > 0).sum() / len(shown.rows)
    l0 = max(1, round(l0_mean))
    assert 0 < l0_mean - int(l0_mean) < 0.5  # rounded down: a ceiling would differ
    control = S.random_control(6, 12, l0, torch.from_numpy(shown.rows.mean(0)).float(), 0)
    with torch.no_grad():
        c = control.encode(torch.from_numpy(shown.rows).float()).double().numpy()
    c_alive = (c > 0).any(0)
    _, c_sel = sel_np(c.reshape(36, 16, 12).mean(1), shown.y)
    rs = shown.r.comparison["random_sparse"]
    assert (rs["k"], rs["units"]) == (l0, int(c_alive.sum()))
    assert rs["selective"] == int((c_sel[c_alive] >= 0.6).sum())
    assert rs["median_index"] == pytest.approx(np.median(c_sel[c_alive]), abs=1e-5)
    np.testing.assert_allclose(shown.calls[2], c.max(0), rtol=1e-5)
    assert rs["tuned"] == sum(1 for u in (2, 5) if c_alive[u])


def test_show_boards_top_examples_boxes_mixes_and_images_by_hand(shown):
    """Truth: each chosen latent's four largest activations over the rows (numpy, falling), the image and (y, x)
    from the row by the layout, the label of that test image, the receptive field by hand (conv 5, pool 2, conv 5,
    pool 2: 16 pixels, jump 4, start 0, clipped to 28), the five largest |decoder weights|, the class means."""
    r = shown.r
    assert (r.latents[0].latent, r.latents[0].why) == (shown.asked, "asked")
    for b in r.latents:
        v = shown.lat[:, b.latent]
        top = np.argsort(-v, kind="stable")[:4]
        assert [e.value for e in b.top] == pytest.approx(v[top].tolist(), rel=1e-5)
        assert [(e.image, e.position) for e in b.top] == [(t // 16, ((t % 16) // 4, t % 4)) for t in top]
        for e in b.top:
            py, px = e.position
            assert e.label == shown.y[e.image] and e.box == (4 * py, min(4 * py + 16, 28), 4 * px, min(4 * px + 16, 28))
        w = shown.W_dec[b.latent]
        order = np.argsort(-np.abs(w), kind="stable")[:5]
        assert [c for c, _ in b.mixes] == order.tolist() and [m for _, m in b.mixes] == pytest.approx(w[order])
        assert b.class_means == pytest.approx(shown.lcm[b.latent], abs=1e-5)
        assert b.preferred_class == int(shown.lcm[b.latent].argmax()) and b.density == pytest.approx((v > 0).mean())
    images = {e.image for b in r.latents for e in b.top + tuple(e for band in b.bands for e in band)}
    assert set(r.example_images) == images and len(images) > len({e.image for b in r.latents for e in b.top})
