"""The Python API on a user's own CNN: a 3-stage network with BatchNorm, written and trained in plain PyTorch on a
generated dataset, gets a full microscope report, attribution and feature visualisation through
``mechscope.explain/attribute/visualize``; its numbers re-checked by hand; the model left as it was."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mechscope
from mechscope.cnn.methods.explained import ExplainResult
from mechscope.core.errors import MechscopeError
from mechscope.core.hooks import attached_hooks
from tests.e2e.reports import check_report, render_in_chromium
from tests.records import assert_round_trip
from tests.shapes import CLASS_NAMES, splits


class UserCNN(nn.Module):
    """What a user writes: three conv stages with BatchNorm, flattening in forward, a linear head."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        )  # fmt: skip
        self.head = nn.Linear(8 * 2 * 2, 4)

    def forward(self, x):
        return self.head(torch.flatten(self.body(x), 1))


@pytest.fixture(scope="module")
def trained():
    """Trained in plain PyTorch: no mechscope code involved."""
    s = splits(n_train=400, n_test=200, seed=3)
    x_train = torch.tensor(s["x_train"]).float().div(255).unsqueeze(1)
    y_train = torch.tensor(s["y_train"]).long()
    x_test = torch.tensor(s["x_test"]).float().div(255).unsqueeze(1)
    y_test = torch.tensor(s["y_test"]).long()
    torch.manual_seed(0)
    model = UserCNN()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        idx = torch.randint(0, len(x_train), (32,), generator=g)
        loss = nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        assert (model(x_test).argmax(1) == y_test).float().mean() > 0.9
    return model, (x_train, y_train), (x_test, y_test)


@pytest.fixture(scope="module")
def explained(trained, tmp_path_factory):
    model, train, test = trained
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = tmp_path_factory.mktemp("api") / "explain"
    result = mechscope.explain(model, train, test, out=out, class_names=CLASS_NAMES)
    return model, train, test, out, result, before


def test_full_microscope_report_for_a_users_cnn(explained, tmp_path):
    model, _, test, out, r, _ = explained
    assert r.stage_names == ["conv1", "conv2", "conv3"] and r.class_names == CLASS_NAMES
    assert r.model["source"] == "wrapped" and [s["name"] for s in r.model["stages"]] == ["conv1", "conv2", "conv3"]
    assert r.model["stages"][0]["modules"] == {"body.0": "Conv2d", "body.1": "BatchNorm2d", "body.2": "ReLU",
                                               "body.3": "MaxPool2d"}  # fmt: skip
    assert r.overview.n_test == len(test[1]) and r.overview.test_accuracy > 0.9
    assert [c.target for c in r.circuits.circuits] == [0, 1, 2, 3] and r.circuits.closed_form
    assert all(st.mean.shape == (c, 4) for st, c in zip(r.ablation.stages, (6, 8, 8), strict=True))
    assert r.weights.readout_templates.shape == (4, 8, 2, 2) and len(r.weights.connections) == 2
    assert [e.images.shape[:2] for e in r.examples] == [(6, 8), (8, 8), (8, 8)]
    assert r.summary and (out / "mechanisms.json").is_file()
    n = check_report(out / "report.html")
    assert n >= 8 + 6 + 8 + 8 + 4  # overview figures, one per channel, one per class circuit
    html = (out / "report.html").read_text()
    assert "body.1" in html and "box" in html  # the user's module paths and class names
    assert render_in_chromium(out / "report.html", tmp_path) == {"images": n, "broken": []}
    assert assert_round_trip(out / "mechanisms.json", ExplainResult)["class_names"] == list(CLASS_NAMES)


def test_the_users_model_is_left_as_it_was(explained):
    model, *_, before = explained
    assert not model.training and attached_hooks(model) == []
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    model.train()
    mechscope.explain(model, *explained[1:3], out=explained[3].parent / "again", test_limit=100, classes=[0])
    assert model.training  # train mode restored, BatchNorm statistics untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    model.eval()


def test_circuits_and_ablation_rechecked_by_hand(explained):
    """A forward written out from the user's own modules, no mechscope code: circuit sufficiency, and a stage-1 row."""
    model, train, test, _, r, _ = explained
    x, y = test
    n_ref = min(10_000, len(train[1]) // 2)
    with torch.no_grad():
        a1 = model.body[:4](x)
        a3 = model.body[8:](model.body[4:8](a1))
        mean3 = model.body(train[0][:n_ref]).double().mean(0).float()
        mean1 = model.body[:4](train[0][:n_ref]).double().mean(0).float()
        full = model.head(a3.flatten(1)).argmax(1)
    for c in r.circuits.circuits:
        kept = mean3.expand_as(a3).clone()
        kept[:, list(c.channels)] = a3[:, list(c.channels)]
        with torch.no_grad():
            pred = model.head(kept.flatten(1)).argmax(1)
        d = c.target
        assert abs(float((pred[y == d] == d).double().mean()) - c.sufficiency) < 1e-9
        assert abs(float((full[y == d] == d).double().mean()) - c.full_accuracy) < 1e-9
    ablated = a1.clone()
    ablated[:, 2] = mean1[2]
    with torch.no_grad():
        pred = model.head(model.body[4:](ablated).flatten(1)).argmax(1)
    for d in range(4):
        change = float((pred[y == d] == d).double().mean() - (full[y == d] == d).double().mean())
        assert abs(change - float(r.ablation.stage("conv1").mean[2, d])) < 1e-9


def test_attribute_and_visualize_through_the_api(trained, tmp_path):
    model, train, test = trained
    a = mechscope.attribute(model, train, test, out=tmp_path / "attr", methods=["saliency", "gradcam", "deeplift"],
                            n=4, n_faithfulness=8, class_names=CLASS_NAMES)  # fmt: skip
    assert a.gradcam_layer == "conv3.hook_post" and a.faithfulness.layers == ["head", "conv3", "conv2", "conv1"]
    assert sorted(m.method for m in a.faithfulness.methods) == ["deeplift", "gradcam", "saliency"]
    assert (tmp_path / "attr" / "deeplift.png").is_file()
    v = mechscope.visualize(model, train, test, out=tmp_path / "fv", layers=["conv3", "logits"], units=[0, 1], steps=8)
    assert [(u.layer, u.unit) for u in v.units] == [("conv3.hook_post", 0), ("conv3.hook_post", 1),
                                                   ("hook_logits", 0), ("hook_logits", 1)]  # fmt: skip
    assert v.summary.logit_visualisations == 2 and (tmp_path / "fv" / "units" / "conv3_1.png").is_file()
    assert attached_hooks(model) == [] and not model.training


def test_a_dataset_name_or_file_works_too(mnist_root, tmp_path):
    from mechscope.cnn import as_dataset

    data = as_dataset("mnist", data_dir=mnist_root)
    assert data.name == "mnist" and data.shape == (1, 28, 28) and data.class_names == tuple("0123456789")
    import numpy as np

    np.savez(tmp_path / "d.npz", **splits())
    assert as_dataset(tmp_path / "d.npz", class_names=CLASS_NAMES).class_names == CLASS_NAMES


def test_bad_input_through_the_api(trained, tmp_path):
    model, train, test = trained
    with pytest.raises(MechscopeError, match="unknown layer 'conv4'; the stages are conv1, conv2, conv3"):
        mechscope.explain(model, train, test, out=tmp_path / "e", circuit_layer="conv4")
    with pytest.raises(MechscopeError, match="the first convolution .body.0. takes 1 channel.s.; the images have 3"):
        mechscope.explain(model, (train[0].expand(-1, 3, -1, -1), train[1]), (test[0].expand(-1, 3, -1, -1), test[1]),
                          out=tmp_path / "e")  # fmt: skip
    net = nn.Sequential(nn.Conv2d(1, 2, 5), nn.Conv2d(2, 2, 5), nn.Flatten(), nn.Linear(2, 4))
    small = train[0][:, :, :8, :8]
    too_small = r"images of 8×8 do not fit the network: 1 \(Conv2d\) fails on \[2, 4, 4\]"
    with pytest.raises(MechscopeError, match=too_small):
        mechscope.explain(net, (small, train[1]), (small, train[1]), out=tmp_path / "e")
    with pytest.raises(MechscopeError, match="pass test data too"):
        mechscope.explain(model, train, out=tmp_path / "e")
    assert not (tmp_path / "e").exists()


def full_batch_adam(net: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> None:
    """Plain PyTorch training, no mechscope code: Adam at 1e-2 on the whole training set."""
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_a_plain_sequential_with_a_hidden_layer(tmp_path):
    """nn.Sequential, GELU, a non-linear read-out: circuits are searched with forward passes, not the closed form."""
    s = splits(n_train=240, n_test=120, seed=4, rgb=True)
    x = torch.tensor(s["x_train"]).float().div(255).permute(0, 3, 1, 2)
    xt = torch.tensor(s["x_test"]).float().div(255).permute(0, 3, 1, 2)
    y, yt = torch.tensor(s["y_train"]).long(), torch.tensor(s["y_test"]).long()
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(3, 6, 5), nn.GELU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(6 * 6 * 6, 12),
                        nn.GELU(), nn.Linear(12, 4))  # fmt: skip
    full_batch_adam(net, x, y, 120)
    r = mechscope.explain(net.eval(), (x, y), (xt, yt), out=tmp_path / "e", class_names=CLASS_NAMES, classes=[0, 3])
    assert r.stage_names == ["conv1"] and not r.circuits.closed_form and r.weights.readout_templates is None
    assert r.ablation.readout is None  # no closed form through a hidden layer
    assert [c.target for c in r.circuits.circuits] == [0, 3] and all(c.meets_criterion for c in r.circuits.circuits)
    assert check_report(tmp_path / "e" / "report.html") >= 5 + 6 + 2
    a = mechscope.attribute(net, (x, y), (xt, yt), out=tmp_path / "a", n=2, n_faithfulness=2)
    assert set(a.skipped) == {"deeplift", "guided_backprop"} and "GELU" in a.skipped["deeplift"]


class SharedModules(nn.Module):
    """As PyTorch's tutorial writes a CNN: one nn.ReLU and one nn.MaxPool2d module used after both convolutions."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 6, 3, padding=1), nn.Conv2d(6, 8, 3, padding=1)
        self.relu, self.pool, self.fc = nn.ReLU(), nn.MaxPool2d(2), nn.Linear(8 * 4 * 4, 4)

    def forward(self, x):
        x = self.pool(self.relu(self.conv1(x)))
        x = self.pool(self.relu(self.conv2(x)))
        return self.fc(torch.flatten(x, 1))


def test_a_model_calling_one_relu_and_one_pool_module_after_every_convolution(tmp_path):
    """Read in the order forward calls its modules (it was refused): the explain report's stage-1 mean ablation
    against a forward written out from the model's own modules; DeepLIFT equal to it on the same modules laid out
    once per use in an nn.Sequential."""
    s = splits(n_train=240, n_test=120, seed=5)
    x, xt = (torch.tensor(s[k]).float().div(255).unsqueeze(1) for k in ("x_train", "x_test"))
    y, yt = torch.tensor(s["y_train"]).long(), torch.tensor(s["y_test"]).long()
    torch.manual_seed(2)
    net = SharedModules()
    full_batch_adam(net, x, y, 100)
    net.eval()
    r = mechscope.explain(net, (x, y), (xt, yt), out=tmp_path / "e", class_names=CLASS_NAMES, classes=[0])
    assert r.model["stages"][1]["modules"] == {"conv2": "Conv2d", "relu": "ReLU", "pool": "MaxPool2d"}
    assert check_report(tmp_path / "e" / "report.html") >= 5
    with torch.no_grad():
        a1 = net.pool(net.relu(net.conv1(xt)))
        mean1 = net.pool(net.relu(net.conv1(x[: len(y) // 2]))).double().mean(0).float()
        full = net(xt).argmax(1)
        ablated = a1.clone()
        ablated[:, 4] = mean1[4]
        pred = net.fc(net.pool(net.relu(net.conv2(ablated))).flatten(1)).argmax(1)
    for d in range(4):
        change = float((pred[yt == d] == d).double().mean() - (full[yt == d] == d).double().mean())
        assert abs(change - float(r.ablation.stage("conv1").mean[4, d])) < 1e-9
    a = mechscope.attribute(net, (x, y), (xt, yt), out=tmp_path / "a", methods=["deeplift", "guided_backprop"], n=2,
                            n_faithfulness=4)  # fmt: skip
    assert sorted(m.method for m in a.faithfulness.methods) == ["deeplift", "guided_backprop"]
    from mechscope.cnn.methods.attribution import DeepLift

    once = nn.Sequential(net.conv1, nn.ReLU(), nn.MaxPool2d(2), net.conv2, nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         net.fc)  # fmt: skip
    t = full[:8]
    torch.testing.assert_close(DeepLift().attribute(net, xt[:8], t), DeepLift().attribute(once, xt[:8], t))
    assert attached_hooks(net) == []
