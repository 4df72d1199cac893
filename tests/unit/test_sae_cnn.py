"""Sparse dictionaries on a CNN, known answers on tiny random models: an identity SAE spliced in changes nothing,
accuracy recovered against a hand computation, a planted feature found by the dashboards as the top latent at its
receptive field, the rows' layout, the direct class effect, one-line errors and the Python API end to end."""

from __future__ import annotations

import pytest
import torch

from mechscope.cnn.data.images import ImageDataset
from mechscope.cnn.methods import sae as S
from mechscope.cnn.models.cnn import CNN, CNNConfig
from mechscope.cnn.models.spec import walk
from mechscope.cnn.pipelines import sae as CS
from mechscope.core.dictionaries import DictionaryConfig, SparseDictionary, save_saelens
from mechscope.core.errors import MechscopeError
from mechscope.core.hooks import attached_hooks, hooks, run_with_cache

pytestmark = pytest.mark.usefixtures("one_thread")  # small models: one torch thread


def tiny_cnn(seed: int = 0) -> CNN:
    torch.manual_seed(seed)
    return CNN(CNNConfig(channels=(4, 6), n_classes=3)).eval()


def images(n: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def identity_sae(d: int) -> SparseDictionary:
    sae = SparseDictionary(DictionaryConfig(d_in=d, d_sae=2 * d, l1_coefficient=0.0))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae.eval()


def dataset(model, n_train: int = 96, n_test: int = 64) -> ImageDataset:
    """Random images labelled by the model's own predictions (so the clean accuracy is 1)."""
    x_train, x_test = images(n_train, 1), images(n_test, 2)
    with torch.no_grad():
        y_train, y_test = model(x_train).argmax(1), model(x_test).argmax(1)
    return ImageDataset("random", x_train, y_train, x_test, y_test, ("a", "b", "c"))


@pytest.mark.parametrize("hook", ["conv2.hook_out", "conv2.hook_post", "conv1.hook_pre"])
def test_identity_sae_spliced_in_reproduces_the_model_exactly(hook):
    model = tiny_cnn()
    spec = walk(model)
    x = images()
    y = model(x).argmax(1)
    width = S.hook_shape(spec, hook)[0]
    effect, metrics = S.splice_effect(spec, x, y, identity_sae(width), hook, batch=16)
    assert effect.acc_spliced == effect.acc_clean == 1.0
    assert effect.kl_spliced == 0.0
    assert metrics.mse == 0.0
    assert attached_hooks(model) == []


def test_accuracy_recovered_by_hand():
    model, x = tiny_cnn(1), images(80, 3)
    spec = walk(model)
    y = torch.randint(0, 3, (80,), generator=torch.Generator().manual_seed(0))
    hook = "conv2.hook_out"
    sae = SparseDictionary(DictionaryConfig(d_in=6, d_sae=10, architecture="topk", k=2),
                           generator=torch.Generator().manual_seed(0)).eval()  # fmt: skip

    def acc(fn=None):
        with hooks(model, fwd=[(hook, fn)] if fn else []), torch.no_grad():
            return float((model(x).argmax(1) == y).double().mean())

    def splice(a, h):
        rows = a.permute(0, 2, 3, 1).reshape(-1, 6)
        return sae(rows)[0].reshape(a.shape[0], a.shape[2], a.shape[3], 6).permute(0, 3, 1, 2)

    clean, spliced, zero = acc(), acc(splice), acc(lambda a, h: torch.zeros_like(a))
    effect, _ = S.splice_effect(spec, x, y, sae, hook, batch=32)
    assert (effect.acc_clean, effect.acc_spliced, effect.acc_ablated) == (clean, spliced, zero)
    if clean != zero:
        assert effect.accuracy_recovered == pytest.approx((spliced - zero) / (clean - zero))


def test_rows_are_position_major_per_image():
    model = tiny_cnn()
    _, cache = run_with_cache(model, images(3), names=["conv2.hook_post"])
    act = cache["conv2.hook_post"]  # [3, 6, 8, 8]
    rows = S.to_rows(act)
    assert rows.shape == (3 * 64, 6)
    assert torch.equal(rows[2 * 64 + 5 * 8 + 3], act[2, :, 5, 3])
    assert torch.equal(S.from_rows(rows, act), act)


def test_planted_feature_is_the_top_latent_at_its_receptive_field(tmp_path):
    """conv1's channel 0 becomes a detector of bright 5x5 squares (a box filter with a high threshold); five test
    images carry one. The dictionary's latent 2 reads channel 0: its dashboard's top examples are exactly those
    images, each with the square inside the receptive field drawn, and it is the top latent there."""
    model = tiny_cnn(2)
    with torch.no_grad():
        model.conv1.conv.weight[0] = 1.0 / 25
        model.conv1.conv.bias[0] = -(0.9 - 0.1307) / 0.3081  # normalised input: fires only above ~0.9 everywhere
    data = dataset(model, n_test=40)
    x = data.test_images.clone()
    x.mul_(0.5)  # background below the threshold
    planted = {3: (4, 6), 11: (10, 15), 17: (18, 2), 25: (1, 20), 33: (12, 12)}  # image -> (row, col) of a square
    for i, (r, c) in planted.items():
        x[i, 0, r : r + 5, c : c + 5] = 1.0
    data = ImageDataset("planted", data.train_images, data.train_labels, x, data.test_labels, data.class_names)
    sae = SparseDictionary(DictionaryConfig(d_in=4, d_sae=6, architecture="topk", k=2),
                           generator=torch.Generator().manual_seed(0))  # fmt: skip
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.b_enc.zero_()
        sae.b_dec.zero_()
        sae.W_enc[0, 2] = 1.0
        sae.W_enc[1, 4] = 0.01
    sae_dir = save_saelens(sae.eval(), tmp_path / "sae", hook_name="conv1.hook_post")
    _, r = CS.sae_show_model(model, data, sae_dir, tmp_path / "dash", latents=(2,), n_selective=1, n_random=1,
                             tuning=False, featvis_steps=0, progress=False, k=5)  # fmt: skip
    board = next(b for b in r.latents if b.latent == 2)
    assert {e.image for e in board.top} == set(planted)
    for e in board.top:
        row, col = planted[e.image]
        y0, y1, x0, x1 = e.box
        assert y0 <= row and row + 5 <= y1 and x0 <= col and col + 5 <= x1  # the square inside the field
    lat = S.latent_activations(sae, S.activations(walk(model), x, "conv1.hook_post"))
    at_square = [int(torch.tensor([lat.dense(j)[i * 576:(i + 1) * 576].max() for j in range(6)]).argmax())
                 for i in planted]  # fmt: skip
    assert at_square == [2] * len(planted)
    html = (tmp_path / "dash" / "report.html").read_text()
    assert "Latent 2" in html and "data:image/png;base64" in html


def test_direct_class_effect_through_the_linear_readout():
    model = tiny_cnn(3)
    spec = walk(model)
    sae = identity_sae(6)
    effects = S.class_effects(spec, sae, "conv2.hook_out")  # [12, 3]
    w = model.fc.weight.detach().view(3, 6, 4, 4).sum((2, 3))  # [K, C]
    expected = w[:, 1] - w[:, 1].mean()
    assert torch.allclose(effects[1], expected, atol=1e-6)  # latent 1 = +channel 1
    assert torch.allclose(effects[7], -expected, atol=1e-6)  # latent 7 = -channel 1
    assert S.class_effects(spec, sae, "conv2.hook_post") is None  # max pooling: not linear


def test_errors_are_one_line():
    spec = walk(tiny_cnn())
    with pytest.raises(MechscopeError, match="unknown hook point 'conv9.hook_out'") as e:
        S.hook_shape(spec, "conv9.hook_out")
    assert "\n" not in str(e.value)
    with pytest.raises(MechscopeError, match="d_in=5; conv2.hook_out has 6 channels"):
        S.check_dictionary(spec, SparseDictionary(DictionaryConfig(d_in=5, d_sae=8)), "conv2.hook_out")


def test_python_api_end_to_end(tmp_path):
    from mechscope.cnn.methods.sae import CnnSaeDashboards, CnnSaeEvaluation, CnnSaeHarvest, CnnSaeTraining
    from tests.records import assert_round_trip

    model = tiny_cnn(4)
    data = dataset(model)
    out, h = CS.sae_harvest_model(model, data, tmp_path / "h", shard_rows=256, batch=32, progress=False)
    assert h.hook == "conv2.hook_out" and h.rows == 96 * 16 and h.width == 6
    assert_round_trip(out / "harvest.json", CnnSaeHarvest)
    _, t = CS.sae_train_run(out, tmp_path / "sae", d_sae=24, k=3, batch_size=128, epochs=3, progress=False)
    assert t.steps == 3 * (96 * 16 // 128) and t.final["l0"] <= 3.0
    assert_round_trip(tmp_path / "sae" / "training.json", CnnSaeTraining)
    _, e = CS.sae_evaluate_model(model, data, tmp_path / "sae", tmp_path / "ev", progress=False)
    assert e.effect.acc_clean == 1.0 and 0.0 <= e.metrics["l0"] <= 3.0
    assert_round_trip(tmp_path / "ev" / "evaluation.json", CnnSaeEvaluation)
    _, d = CS.sae_show_model(model, data, tmp_path / "sae", tmp_path / "dash", n_selective=2, n_random=1,
                             featvis_steps=4, progress=False)  # fmt: skip
    assert d.comparison["channels"]["units"] == 6 and "tuned" in d.comparison["latents"]
    assert d.latents and d.latents[0].featvis is not None
    assert_round_trip(tmp_path / "dash" / "dashboards.json", CnnSaeDashboards)
    for result, title in ((h, "Activation harvest"), (t, "topk SAE"), (e, "Accuracy recovered"), (d, "Dashboards")):
        assert title in result._repr_html_()


def interrupt_harvest_after(monkeypatch, batches: int):
    """Make the harvest's batches stop with a KeyboardInterrupt (Ctrl-C) after ``batches``; returns the original
    ``harvest_batches`` to put back."""
    original = S.harvest_batches

    def broken(*a, **k):
        for i, rows in enumerate(original(*a, **k)):
            if i == batches:
                raise KeyboardInterrupt
            yield rows

    monkeypatch.setattr(S, "harvest_batches", broken)
    return original


def test_an_interrupted_harvest_resumes_to_the_same_store(tmp_path, monkeypatch):
    """A harvest stopped after three batches leaves OUT.partial; the same command continues from the images
    already stored and writes the shards an uninterrupted harvest writes."""
    from safetensors.torch import load_file

    model = tiny_cnn(5)
    data = dataset(model, n_train=200)
    kw = dict(shard_rows=160, buffer_shards=2, batch=16, progress=False)
    CS.sae_harvest_model(model, data, tmp_path / "whole", **kw)
    original = interrupt_harvest_after(monkeypatch, 12)
    with pytest.raises(KeyboardInterrupt):
        CS.sae_harvest_model(model, data, tmp_path / "resumed", **kw)
    assert (tmp_path / "resumed.partial").is_dir() and not (tmp_path / "resumed").exists()
    monkeypatch.setattr(S, "harvest_batches", original)
    _, r = CS.sae_harvest_model(model, data, tmp_path / "resumed", **kw)
    assert r.resumed_rows > 0 and r.rows == 200 * 16 and not (tmp_path / "resumed.partial").exists()
    done = r.resumed_rows // 16  # images stored before the interruption (16 positions each)
    assert 0 < done < 200  # the resumed run counts only the images it ran, and its two one-image shape probes
    assert r.work["rows_per_pass"] == 200 and r.work["forward_images"] == 200 - done + 2
    for shard in sorted((tmp_path / "whole" / "store").glob("shard-*.safetensors")):
        a = load_file(str(shard))["activations"]
        b = load_file(str(tmp_path / "resumed" / "store" / shard.name))["activations"]
        assert torch.equal(a, b)
