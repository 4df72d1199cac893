"""The CNN replacement model (cnn/methods/replacement.py) and the ``cnn graph`` pipeline's plumbing against outside
truths: each error vector is the stage's own activation minus the dictionary's own forward pass (SparseDictionary's
``forward``, scaled and with a skip path), read by plain torch hooks; the frozen and recomputed interventions against
a forward pass written by hand with ``F.conv2d`` (clean ReLU masks and max-pool winners, or live ones); node ids
built by hand from the stage sizes; a save/load round trip; the pipeline's image, label and class against the .npz
read with numpy."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mechscope.cnn.methods.attribution_graph import CnnGraphSettings
from mechscope.cnn.methods.replacement import CnnReplacement, StageDictionaries, receptive_centres
from mechscope.cnn.models.cnn import CNN, CNNConfig
from mechscope.cnn.pipelines.attribution_graph import graph_model
from mechscope.core.dictionaries import DictionaryConfig, SparseDictionary
from mechscope.core.errors import MechscopeError
from tests.unit.test_attribution_graph_cnn import image, random_dicts, tiny_cnn
from tests.unit.test_work_discovery_universality import noise_npz
from tests.unit.test_work_neurons_graphs import cnn_run

# ---- the error terms: the stage's activation minus the dictionary's own output ------------------------------------


def hooked(model: CNN, x: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    """The activations at ``names`` (HookPoint modules) of one plain forward pass of ``x`` [B,C,H,W], by torch
    forward hooks."""
    got = {}
    handles = [model.get_submodule(n).register_forward_hook(lambda m, a, out, n=n: got.__setitem__(n, out.detach()))
               for n in names]  # fmt: skip
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return got


def scaled_skip_transcoders(model: CNN, seed: int = 5) -> list[SparseDictionary]:
    """Skip transcoders with input and output scales (2.5 and 0.4) and a non-symmetric W_skip, not yet folded."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for c in model.config.channels:
        cfg = DictionaryConfig(d_in=c, d_sae=2 * c + 1, architecture="topk", k=2, transcoder=True, d_out=c, skip=True,
                               normalize_activations="expected_average_only_in")  # fmt: skip
        d = SparseDictionary(cfg, generator=g)
        with torch.no_grad():
            d.b_enc.normal_(0, 0.1, generator=g)
            d.b_dec.normal_(0, 0.1, generator=g)
            d.W_skip.copy_(torch.randn(c, c, generator=g) * 0.3 + torch.triu(torch.ones(c, c)))
            d.in_scale.fill_(2.5)
            d.out_scale.fill_(0.4)
        out.append(d.eval())
    return out


def rows(t: torch.Tensor) -> torch.Tensor:
    """[1,C,h,w] -> [h*w, C], positions y * w + x."""
    return t[0].permute(1, 2, 0).reshape(-1, t.shape[1])


@pytest.mark.parametrize("kind", ["sae", "transcoder"])
def test_errors_and_features_are_the_dictionarys_own_forward_on_the_hooked_activations(kind):
    """Truth: SparseDictionary.forward (raw units, its own scaling and skip path) on the activations read by plain
    hooks at conv{i}.hook_out (an SAE: after the pool) or conv{i}.hook_pre -> hook_post (a transcoder); the error is
    target minus output, the features the nonzero latents (position-major), the grid the hooked map's size."""
    model, x = tiny_cnn("plain"), image(tiny_cnn("plain"))
    raw = scaled_skip_transcoders(model) if kind == "transcoder" else list(random_dicts(model, "sae").layers)
    rep = CnnReplacement(model, StageDictionaries.of(kind, raw), x)
    a, b = ("hook_out", "hook_out") if kind == "sae" else ("hook_pre", "hook_post")
    acts = hooked(model, x[None], [f"conv{i}.{h}" for i in (1, 2) for h in (a, b)])
    for i, d in enumerate(raw):
        xin, y = acts[f"conv{i + 1}.{a}"], acts[f"conv{i + 1}.{b}"]
        assert rep.grid[i] == tuple(y.shape[2:])
        with torch.no_grad():
            out, f = d(rows(xin))
        np.testing.assert_allclose(rep.errors[i].numpy(), (rows(y) - out).numpy(), atol=1e-5)
        pos, idx = np.nonzero(f.numpy())
        m = rep.feature_layer.numpy() == i
        assert rep.feature_pos.numpy()[m].tolist() == pos.tolist()
        assert rep.feature_index.numpy()[m].tolist() == idx.tolist()
        np.testing.assert_allclose(rep.feature_activation.numpy()[m], f.numpy()[pos, idx], rtol=1e-5)
    assert (rep.replacement_logits() - model(x[None])[0].detach()).abs().max() < 1e-5


def test_the_sae_grids_are_the_pooled_maps_and_the_transcoder_grids_the_conv_maps():
    """Truth: sizes by hand for a 12×12 image, 3×3 valid convs and 2×2 pools: 10 -> 5 -> 3 -> 1 (int division)."""
    model, x = tiny_cnn("plain"), image(tiny_cnn("plain"))
    assert CnnReplacement(model, random_dicts(model, "sae"), x).grid == [(5, 5), (1, 1)]
    assert CnnReplacement(model, random_dicts(model, "transcoder"), x).grid == [(10, 10), (3, 3)]


# ---- frozen and recomputed interventions against a forward pass by hand --------------------------------------------


def by_hand(model: CNN, x: torch.Tensor, edit, masks=None, wins=None):
    """The plain CNN (conv, ReLU, 2×2 max pool per stage, then fc) written with F.conv2d; ``edit(stage, post)``
    changes each stage's post-ReLU map; with ``masks`` or ``wins`` (of the clean pass) the ReLUs or the pools are
    frozen to them. Returns (logits [K], masks, pool indices)."""
    h = (x[None] - model.normalize.mean) / model.normalize.std
    got_masks, got_wins = [], []
    for i, block in enumerate(model.stages):
        pre = F.conv2d(h, block.conv.weight, block.conv.bias)
        mask = pre > 0 if masks is None else masks[i]
        post = edit(i, pre * mask)
        _, idx = F.max_pool2d(post, 2, return_indices=True)
        idx = idx if wins is None else wins[i]
        h = post.flatten(2).gather(2, idx.flatten(2)).view(idx.shape)
        got_masks.append(mask)
        got_wins.append(idx)
    return model.fc(h.flatten(1))[0], got_masks, got_wins


def setter(stage: int, pos: int, ch: int, value: float, w: int):
    def edit(i, post):
        if i == stage:
            post = post.clone()
            post[0, ch, pos // w, pos % w] = value
        return post

    return edit


def demean(v: torch.Tensor, c: int) -> float:
    return float(v[c] - v.mean())


def test_frozen_and_recomputed_steering_are_the_hand_forward_with_clean_or_live_pool_winners():
    """Truth: with the CNN's own channels as dictionaries, steering feature (stage 0, pos, ch) to v is writing v into
    the post-ReLU map there; "frozen" keeps the clean max-pool winners of the hand forward (the channels' own ReLUs,
    the dictionaries' encoders, stay live), "recomputed" runs it all live. The feature is the one whose steering moves
    a pool's choice most (the two answers must differ)."""
    model = tiny_cnn("plain", seed=2)
    x = image(model, seed=6)
    rep = CnnReplacement(model, StageDictionaries.channels(model), x)
    with torch.no_grad():
        own, _, wins = by_hand(model, x, lambda i, p: p)
        assert torch.allclose(own, rep.logits, atol=1e-5)  # the hand forward is the CNN
        c = int(own.argmax())
        rep.set_targets([c])
        w = rep.grid[0][1]
        best = None
        for s in range(rep.layer_start[1]):
            pos, ch = int(rep.feature_pos[s]), int(rep.feature_index[s])
            v = 8.0 * float(rep.feature_activation[s]) + 1.0
            fro = demean(by_hand(model, x, setter(0, pos, ch, v, w), wins=wins)[0], c)
            rec = demean(by_hand(model, x, setter(0, pos, ch, v, w))[0], c)
            if best is None or abs(fro - rec) > abs(best[2] - best[3]):
                best = (s, v, fro, rec)
    s, v, fro, rec = best
    assert abs(fro - rec) > 1e-2
    assert rep.demeaned(rep.run("frozen", {s: v})[0], rep.logit_targets)[0] == pytest.approx(fro, abs=1e-4)
    assert rep.demeaned(rep.run("recomputed", {s: v})[0], rep.logit_targets)[0] == pytest.approx(rec, abs=1e-4)


def test_direct_steering_of_a_last_stage_channel_moves_only_through_the_frozen_pool():
    """Truth: the hand forward with the clean pool winners and the last stage's post-ReLU value replaced; an earlier
    stage's feature moves nothing in "direct" mode (the last stage's features are held)."""
    model = tiny_cnn("plain", seed=2)
    x = image(model, seed=6)
    rep = CnnReplacement(model, StageDictionaries.channels(model), x)
    rep.set_targets([1])
    with torch.no_grad():
        _, masks, wins = by_hand(model, x, lambda i, p: p)
        s = rep.layer_start[1]
        pos, ch = int(rep.feature_pos[s]), int(rep.feature_index[s])
        want = demean(by_hand(model, x, setter(1, pos, ch, 3.5, rep.grid[1][1]), masks, wins)[0], 1)
    base = rep.demeaned(rep.run("direct")[0], rep.logit_targets)[0]
    assert rep.demeaned(rep.run("direct", {s: 3.5})[0], rep.logit_targets)[0] == pytest.approx(want, abs=1e-4)
    assert rep.demeaned(rep.run("direct", {0: 9.0})[0], rep.logit_targets)[0] == pytest.approx(float(base), abs=1e-6)


# ---- node ids, targets and bad input --------------------------------------------------------------------------------


def test_node_ids_by_hand_from_the_stage_sizes():
    """Truth: sources are [features | errors of stage 0 (5×5=25) | errors of stage 1 (1) | pixels (12×12=144)]; ids
    STAGE_FEATURE_POS, STAGE_-1_POS for an error, E_0_POS for a pixel."""
    model = tiny_cnn("plain")
    rep = CnnReplacement(model, random_dicts(model, "sae"), image(model))
    nf = rep.n_features
    assert (rep.n_errors, rep.n_inputs) == (26, 144)
    assert rep.source_of("E_0_143") == nf + 26 + 143 and rep.source_id(nf + 26 + 7) == "E_0_7"
    assert rep.source_of("1_-1_0") == nf + 25 and rep.source_id(nf + 25) == "1_-1_0"
    assert rep.source_of("0_-1_24") == nf + 24 and rep.source_id(nf + 24) == "0_-1_24"
    for s in (0, rep.layer_start[1] - 1, rep.layer_start[1], nf - 1):
        fid = f"{int(rep.feature_layer[s])}_{int(rep.feature_index[s])}_{int(rep.feature_pos[s])}"
        assert rep.source_id(s) == fid and rep.source_of(fid) == s
    for bad in ("E_0_144", "0_-1_25", "1_-1_1", "2_-1_0"):
        with pytest.raises(MechscopeError):
            rep.source_of(bad)
    with pytest.raises(MechscopeError, match="a pixel's id is E_0_POS"):  # source_id never writes another middle
        rep.source_of("E_3_5")


def test_targets_are_demeaned_one_hots_and_the_last_class_is_allowed():
    """Truth: logit_c − mean logit has the direction e_c − 1/K (K = 5); class K − 1 is valid, K is not."""
    model = tiny_cnn("plain")
    rep = CnnReplacement(model, random_dicts(model, "sae"), image(model))
    rep.set_targets([4, 1])
    want = np.eye(5)[[4, 1]] - 0.2
    np.testing.assert_allclose(rep.logit_directions.numpy(), want, atol=1e-7)
    v = torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0])
    assert rep.demeaned(v, rep.logit_targets).tolist() == pytest.approx([16 - 6.2, 2 - 6.2])
    with pytest.raises(MechscopeError, match="class"):
        rep.set_targets([5])


def test_a_dictionary_writing_the_wrong_width_a_gelu_cnn_and_two_images_are_refused():
    model = tiny_cnn("plain")
    good = random_dicts(model, "transcoder")
    wide = SparseDictionary(DictionaryConfig(d_in=4, d_sae=8, transcoder=True, d_out=5))
    with pytest.raises(MechscopeError, match="maps 4 -> 5"):
        StageDictionaries("transcoder", (wide, good.layers[1])).check(model)
    gelu = CNN(CNNConfig(n_classes=5, channels=(4, 6), image_size=12, kernel_size=3, activation="gelu"))
    with pytest.raises(MechscopeError, match="gelu"):
        CnnReplacement(gelu, good, image(model))
    with pytest.raises(MechscopeError, match="batch of 2"):
        CnnReplacement(model, good, torch.rand(2, 1, 12, 12))


# ---- save and load ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sae", "transcoder"])
def test_saved_dictionaries_load_back_in_stage_order_with_their_kind(tmp_path, kind):
    """Truth: the dictionaries saved (widths 12 and 18: stage order is visible) and their weights."""
    model = tiny_cnn("plain")
    dicts = random_dicts(model, kind)
    back = StageDictionaries.load(dicts.save(tmp_path / "d", run="r"))
    assert back.kind == kind and back.widths == [12, 18]
    assert [p.rsplit("/", 1)[-1] for p in back.paths] == ["conv1", "conv2"]
    for a, b in zip(dicts.layers, back.layers, strict=True):
        assert torch.equal(a.W_enc, b.W_enc) and torch.equal(a.W_dec, b.W_dec) and torch.equal(a.b_dec, b.b_dec)
    shutil.rmtree(tmp_path / "d" / "conv1")
    with pytest.raises(MechscopeError, match="no dictionary for stage conv1"):
        StageDictionaries.load(tmp_path / "d")


# ---- the pipeline: which image, which label, which class ------------------------------------------------------------


@pytest.fixture(scope="module")
def noise_run(tmp_path_factory):
    """The noise .npz with its training labels shifted by one class, so that no index has one label in both splits."""
    where = tmp_path_factory.mktemp("data")
    z = dict(np.load(noise_npz(where)))
    z["y_train"] = (np.arange(len(z["y_train"])) + 1) % 3
    np.savez(where / "shifted.npz", **z)
    return cnn_run(tmp_path_factory.mktemp("runs") / "run", where / "shifted.npz"), z


@pytest.mark.parametrize("split,index,target", [("train", 5, 1), ("test", 4, None)])
def test_the_pipeline_graphs_the_asked_image_of_the_asked_split(noise_run, split, index, target):
    """Truth: the .npz read with numpy (pixels / 255, labels), and the run's CNN run by hand on those pixels for the
    logit (class ``target``, or the argmax) minus the mean logit."""
    from mechscope.cnn.runs import load_run

    run, z = noise_run
    s = CnnGraphSettings(check_sources=0, batch_size=8)
    _, g = graph_model(run, index, split=split, dictionaries="channels", target=target, settings=s,
                       auto_intervention=False, dashboards=0)  # fmt: skip
    pixels = z[f"x_{split}"][index].astype(np.float64) / 255
    np.testing.assert_allclose(np.asarray(g.settings["image_pixels"]), pixels, atol=6e-4)
    assert g.settings["label"] == int(z[f"y_{split}"][index])
    with torch.no_grad():
        logits = load_run(run).model(torch.tensor(pixels, dtype=torch.float32)[None, None])[0]
    c = int(logits.argmax()) if target is None else target
    assert g.settings["targets"] == [c] and g.title.startswith(f"image {index} of {split}, class {c} ")
    assert g.exactness["logit_demeaned"] == pytest.approx(demean(logits, c), abs=1e-5)
    assert dataclasses.asdict(s).items() <= g.settings.items()
    check_node_places(g, pixels)


def check_node_places(g, pixels: np.ndarray) -> None:
    """Truth by hand for this run (16×16, 3×3 convs with padding 1, 2×2 pools; channels: the conv maps): stage 0's
    position (y, x) of its 16×16 map is centred on pixel (y, x), stage 1's of its 8×8 map on (0.5 + 2y, 0.5 + 2x); a
    pixel node's value is (pixel − 0.1307) / 0.3081, the CNN's normalisation."""
    seen = set()
    for n in g.nodes:
        if n["kind"] in ("feature", "error"):
            y, x = divmod(n["pos"], (16, 8)[n["layer"]])
            assert n["ctx_label"] == f"({y},{x})"
            assert n["rf_centre"] == ([y, x] if n["layer"] == 0 else [0.5 + 2 * y, 0.5 + 2 * x])
            seen.add(n["layer"])
        elif n["kind"] == "input":
            y, x = divmod(n["pos"], 16)
            assert n["value"] == pytest.approx((pixels[y, x] - 0.1307) / 0.3081, abs=1e-4)
            seen.add("input")
    assert seen == {0, 1, "input"}


def test_receptive_centres_with_three_by_three_pools():
    """Truth by hand (20×20 image, 3×3 valid convs, 3×3 pools): a conv moves the centre by 1 jump, a pool by
    (3 − 1) / 2 = 1 jump and triples the jump: SAE grids (2, 3, 6), (8, 9, 1); transcoder grids (1, 1, 18),
    (5, 3, 4)."""
    model = CNN(CNNConfig(image_size=20, channels=(2, 2), kernel_size=3, pool=3))
    assert receptive_centres(model, "sae") == [(2.0, 3, 6), (8.0, 9, 1)]
    assert receptive_centres(model, "transcoder") == [(1.0, 1, 18), (5.0, 3, 4)]


def explained_variance(y: np.ndarray, out: np.ndarray) -> float:
    return 1 - float(((y - out) ** 2).sum() / ((y - y.mean(0)) ** 2).sum())


def test_transcoders_trained_here_fit_the_post_relu_map_and_report_their_quality_on_it(noise_run, tmp_path):
    """Truth: the saved transcoders run on conv{i}.hook_pre of the first 500 test images (plain hooks), against
    conv{i}.hook_post: the explained variance by numpy is the reported one, and it beats the same fit to hook_pre
    (the transcoder's target is the map after the ReLU, not before it)."""
    from mechscope.cnn.methods.attribution_graph import CnnDictionaryTraining
    from mechscope.cnn.runs import load_run

    run, z = noise_run
    tr = CnnDictionaryTraining(kind="transcoder", expansion=2, k=2, images=40, rows=4000, steps=200, batch=128, lr=1e-2)
    out, g = graph_model(run, 0, training=tr, settings=CnnGraphSettings(check_sources=0, batch_size=8),
                         auto_intervention=False, dashboards=0, out=tmp_path / "g")  # fmt: skip
    dicts = StageDictionaries.load(out / "dictionaries")
    model = load_run(run).model
    x = torch.tensor(z["x_test"][:500].astype(np.float32) / 255)[:, None]
    for i, (d, q) in enumerate(zip(dicts.layers, g.dictionaries["quality"], strict=True)):
        acts = hooked(model, x, [f"conv{i + 1}.hook_pre", f"conv{i + 1}.hook_post"])
        pre, post = (acts[f"conv{i + 1}.{n}"].permute(0, 2, 3, 1).flatten(0, 2) for n in ("hook_pre", "hook_post"))
        with torch.no_grad():
            fit = d(pre)[0].numpy()
        pre, post = pre.numpy(), post.numpy()
        assert q["stage"] == f"conv{i + 1}" and q["d_sae"] == 2 * model.config.channels[i]
        assert q["explained_variance"] == pytest.approx(explained_variance(post, fit), abs=1e-4)
        assert explained_variance(post, fit) > max(0.5, explained_variance(pre, fit) + 0.5)


def test_a_numpy_integer_image_index_is_that_image(noise_run):
    """Truth: image 1 of the test split is inside 0..47 whatever integer type names it (np.argmax gives np.int64)."""
    run, z = noise_run
    _, g = graph_model(run, np.int64(1), dictionaries="channels", settings=CnnGraphSettings(check_sources=0),
                       auto_intervention=False, dashboards=0)  # fmt: skip
    assert g.settings["label"] == int(z["y_test"][1])


@pytest.mark.parametrize("writes", ["hook_out", "hook_post"])
def test_a_transcoder_file_reading_the_pooled_map_is_refused(tmp_path, writes):
    """Truth: the files say transcoder (d_out, topk_transcoder) while naming conv<i>.hook_out as their input; this
    module's transcoders read conv<i>.hook_pre (the replacement feeds them hook_pre), so loading refuses the file,
    whatever it writes, instead of feeding it another activation than it was trained on."""
    model = tiny_cnn("plain")
    root = random_dicts(model, "transcoder").save(tmp_path / "d")
    for i in (1, 2):
        cfg = root / f"conv{i}" / "cfg.json"
        cfg.write_text(cfg.read_text().replace(f"conv{i}.hook_pre", f"conv{i}.hook_out").replace(
            f"conv{i}.hook_post", f"conv{i}.{writes}"))  # fmt: skip
    with pytest.raises(MechscopeError, match="a transcoder reads conv1.hook_pre, not conv1.hook_out"):
        StageDictionaries.load(root)


def test_an_sae_file_reading_the_pre_activation_is_refused(tmp_path):
    """Truth: an SAE (no d_out) naming conv<i>.hook_pre: this module's SAEs read conv<i>.hook_out (after the pool),
    so loading names the SAE's hook rather than asking it to write hook_post as a transcoder."""
    model = tiny_cnn("plain")
    root = random_dicts(model, "sae").save(tmp_path / "d")
    for i in (1, 2):
        cfg = root / f"conv{i}" / "cfg.json"
        cfg.write_text(cfg.read_text().replace(f"conv{i}.hook_out", f"conv{i}.hook_pre"))
    with pytest.raises(MechscopeError, match="an SAE reads conv1.hook_out, not conv1.hook_pre"):
        StageDictionaries.load(root)


@pytest.mark.parametrize("image", [1.0, True, "1"])
def test_an_image_index_that_is_not_an_integer_is_named_as_such(noise_run, image):
    """Truth: 1.0 and "1" are not indices by Python's own rule (a list refuses them); True is refused as everywhere
    in mechscope's checks (bool is not an integer field); none of them is "outside" 0..47."""
    with pytest.raises(MechscopeError, match=r"image must be an integer, got"):
        graph_model(noise_run[0], image, dictionaries="channels", dashboards=0)
