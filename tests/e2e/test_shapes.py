"""Other data, other shapes, end to end through the CLI: train, attribute, visualize and explain on generated
datasets (IDX and .npz, grey and RGB 16×16, four named classes) with 1 stage, 3 stages with BatchNorm, a
hidden layer, and SoLU; every report complete."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from mechscope.cnn.methods.attributed import AttributionResult
from mechscope.cnn.methods.explained import ExplainResult
from mechscope.cnn.methods.visualised import FeatvisResult
from mechscope.cnn.training import RunMetrics
from tests.e2e.reports import check_report, render_in_chromium
from tests.e2e.test_cli import assert_one_line_error, run_main
from tests.records import assert_round_trip
from tests.shapes import CLASS_NAMES, splits, write_idx

CASES = {
    "one-stage": (["--dataset", "idx", "--channels", "6"], "idx"),
    "three-bn": (["--channels", "4,8,8", "--kernel-size", "3", "--padding", "1", "--batchnorm"], "npz"),
    "hidden": (["--dataset", "idx", "--channels", "4,8", "--hidden", "16"], "idx"),
    "solu-rgb": (["--channels", "4,8", "--kernel-size", "3", "--padding", "1", "--activation", "solu"], "rgb"),
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    write_idx(root / "idx", splits())
    np.savez(root / "grey.npz", **splits(seed=1))
    np.savez(root / "rgb.npz", **splits(rgb=True, seed=2))
    (root / "names.txt").write_text("\n".join(CLASS_NAMES) + "\n")
    return root


def _data_args(data, kind: str) -> list[str]:
    where = {"idx": ["--data-dir", str(data / "idx")], "npz": ["--dataset", str(data / "grey.npz")],
             "rgb": ["--dataset", str(data / "rgb.npz")]}  # fmt: skip
    return where[kind] + ["--class-names", str(data / "names.txt")]


def _train(capsys, data, tmp, name):
    args, kind = CASES[name]
    run = tmp / name
    extra = [a for a in _data_args(data, kind) if a not in args]
    code, out, err = run_main(
        capsys, "cnn", "train", "--out", str(run), *args, *extra, "--epochs", "8", "--batch-size", "32", "--shift", "1"
    )
    assert code == 0, err
    return run, assert_round_trip(run / "metrics.json", RunMetrics)


@pytest.mark.parametrize("name", list(CASES))
def test_train_attribute_visualize_explain(capsys, data, tmp_path, name):
    run, metrics = _train(capsys, data, tmp_path, name)
    assert metrics["test_accuracy"] > 0.6  # four shapes, a few dozen steps: far above chance (0.25)
    config = json.loads((run / "config.json").read_text())
    assert config["data"]["class_names"] == list(CLASS_NAMES) and config["data"]["shape"][1:] == [16, 16]
    assert config["data"].get("md5") or config["data"].get("sha256")
    n_stages = len(config["model"]["channels"])

    code, _, err = run_main(capsys, "cnn", "attribute", "--run", str(run), "--method", "saliency", "--method", "ig",
                            "--method", "gradcam", "--n", "4", "--n-faithfulness", "8")  # fmt: skip
    assert code == 0, err
    faith = assert_round_trip(run / "attribution" / "faithfulness.json", AttributionResult)
    hidden = ["hidden"] if "--hidden" in CASES[name][0] else []
    layers = ["fc", *hidden, *reversed([f"conv{i + 1}" for i in range(n_stages)])]
    assert faith["randomisation_layers_top_down"] == layers and faith["gradcam_layer"] == f"conv{n_stages}.hook_post"
    assert faith["integrated_gradients_completeness"]["steps"] == 64
    with Image.open(run / "attribution" / "gradcam.png") as img:
        img.load()

    code, _, err = run_main(capsys, "cnn", "visualize", "--run", str(run), "--units", "0,1", "--steps", "8")
    assert code == 0, err
    fv = assert_round_trip(run / "featvis" / "featvis.json", FeatvisResult)
    assert len(fv["units"]) == 2 * (n_stages + 1) and fv["class_names"] == list(CLASS_NAMES)
    for short in [*(f"conv{i + 1}" for i in range(n_stages)), "logits", "units/logits_1"]:
        with Image.open(run / "featvis" / f"{short}.png") as img:
            img.load()

    extra = ["--circuit-layer", "conv1"] if name == "hidden" else []
    code, out, err = run_main(capsys, "cnn", "explain", "--run", str(run), "--test-limit", "120", *extra)
    assert code == 0, err
    m = assert_round_trip(run / "explain" / "mechanisms.json", ExplainResult)
    assert m["schema"] == "mechscope.explain/3" and m["class_names"] == list(CLASS_NAMES)
    assert [s["name"] for s in m["model"]["stages"]] == [f"conv{i + 1}" for i in range(n_stages)]
    assert len(m["circuits"]["circuits"]) == 4 and m["circuits"]["stage"] == ("conv1" if extra else f"conv{n_stages}")
    assert m["circuits"]["closed_form"] == (name != "hidden")
    html = (run / "explain" / "report.html").read_text()
    n_channels = sum(config["model"]["channels"])
    assert check_report(run / "explain" / "report.html") >= 7 + n_channels + 4
    for stage in range(1, n_stages + 1):
        assert f'id="channels-conv{stage}"' in html
    assert "Ankle" not in html and "horizontal" in html  # the data's own class names
    if name == "solu-rgb":
        assert render_in_chromium(run / "explain" / "report.html", tmp_path)["broken"] == []


def test_images_too_small_for_the_network(capsys, data, tmp_path):
    code, _, err = run_main(capsys, "cnn", "train", "--out", str(tmp_path / "r"), *_data_args(data, "idx"),
                            "--dataset", "idx", "--channels", "4,8,8")  # fmt: skip
    assert_one_line_error(code, err, "image size 16 is too small for this network: stage conv3")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--dataset", "cifar10"], "unknown dataset 'cifar10'; expected one of mnist, fashion-mnist"),
        (["--channels", "4,8,8,8,8"], "channels must be 1 to 4 widths of 1 to 4,096"),
        (["--activation", "tanh"], "unknown activation 'tanh'; expected one of relu, gelu, solu"),
        (["--dataset", "{root}/nokey.npz"], "missing y_test; a .npz dataset holds x_train, y_train, x_test, y_test"),
        (["--dataset", "{root}/short.npz"], "320 images but 300 labels in the train split"),
        (["--dataset", "{root}/grey.npz", "--class-names", "{root}/three.txt"], "out of range for 3 class names"),
    ],
)
def test_bad_training_settings(capsys, data, tmp_path, args, fragment):
    s = splits()
    np.savez(data / "nokey.npz", **{k: v for k, v in s.items() if k != "y_test"})
    np.savez(data / "short.npz", **{**s, "y_train": s["y_train"][:300]})
    (data / "three.txt").write_text("a\nb\nc\n")
    args = [a.format(root=data) for a in args]
    base = ["--data-dir", str(data / "idx")] if not any(a.endswith(".npz") for a in args) else []
    code, _, err = run_main(capsys, "cnn", "train", "--out", str(tmp_path / "r"), "--dataset", "idx", *base, *args)
    assert_one_line_error(code, err, fragment)
