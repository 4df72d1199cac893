"""The command line end to end: help, a short training, reload and predict, and bad input."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys

import pytest
import torch

import mechscope
from mechscope.cli import main
from mechscope.cnn.data.mnist import MNIST, load_mnist
from mechscope.cnn.methods.attributed import AttributionResult
from mechscope.cnn.methods.visualised import FeatvisResult
from mechscope.cnn.training import RunMetrics
from tests.records import assert_round_trip


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mechscope", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=300,
    )


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    try:
        main(list(args))
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code != 0
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line, got:\n{err}"
    assert lines[0].startswith("mechscope: error: ")
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0]


def test_help_lists_commands():
    for cmd in (
        [sys.executable, "-m", "mechscope", "--help"],
        [os.path.join(os.path.dirname(sys.executable), "mechscope"), "--help"],
    ):
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0
        assert "mnist" in result.stdout


def test_train_reload_predict(mnist_root, tmp_path):
    out = tmp_path / "run"
    result = cli(
        "mnist",
        "train",
        "--out",
        str(out),
        "--epochs",
        "1",
        "--train-limit",
        "3000",
        "--batch-size",
        "64",
        "--data-dir",
        str(mnist_root),
    )
    assert result.returncode == 0, result.stderr
    assert f"run written to {out}" in result.stdout
    metrics = assert_round_trip(out / "metrics.json", RunMetrics)
    for key in ("test_accuracy", "per_class_accuracy", "confusion_matrix", "train_seconds", "n_parameters"):
        assert key in metrics
    assert len(metrics["per_class_accuracy"]) == 10
    assert sum(map(sum, metrics["confusion_matrix"])) == 10000
    config = json.loads((out / "config.json").read_text())
    assert config["seed"] == 0 and config["training"]["train_limit"] == 3000
    assert set(config["data"]["md5"]) == {
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    }
    assert {"torch", "mechscope", "python"} <= set(config["versions"])

    run = mechscope.load_run(out)
    data = load_mnist(mnist_root)
    with torch.no_grad():
        pred = run.model(MNIST.to_float(data.test_images[:500])).argmax(1)
    accuracy = (pred == data.test_labels[:500]).float().mean().item()
    assert accuracy > 0.8  # 3,000 images, one epoch: well above chance
    assert abs(accuracy - metrics["test_accuracy"]) < 0.05

    again = cli("mnist", "evaluate", "--run", str(out), "--data-dir", str(mnist_root))
    assert again.returncode == 0, again.stderr
    assert f"test accuracy {metrics['test_accuracy']:.4f}" in again.stdout

    refused = cli("mnist", "train", "--out", str(out), "--max-steps", "1", "--data-dir", str(mnist_root))
    assert_one_line_error(refused.returncode, refused.stderr, "already exists", "--force")
    forced = cli(
        "mnist",
        "train",
        "--out",
        str(out),
        "--max-steps",
        "2",
        "--train-limit",
        "256",
        "--data-dir",
        str(mnist_root),
        "--force",
    )
    assert forced.returncode == 0, forced.stderr
    assert assert_round_trip(out / "metrics.json", RunMetrics)["steps"] == 2


def _damage(path, kind):
    raw = gzip.decompress(path.read_bytes())
    if kind == "truncated":
        path.write_bytes(path.read_bytes()[:3000])
    elif kind == "magic":
        path.write_bytes(gzip.compress(b"\x00\x00\x08\x02" + raw[4:]))
    elif kind == "md5":
        path.write_bytes(gzip.compress(raw[:-1] + bytes([(raw[-1] + 1) % 10])))
    elif kind == "count":
        path.write_bytes(gzip.compress(raw[:4] + (9000).to_bytes(4, "big") + raw[8 : 8 + 9000]))
    elif kind == "missing":
        path.unlink()


@pytest.mark.parametrize(
    "kind, fragments",
    [
        ("missing", ["t10k-labels-idx1-ubyte.gz", "download failed", "train-images-idx3-ubyte.gz"]),
        ("truncated", ["truncated or corrupt gzip"]),
        ("magic", ["wrong magic number"]),
        ("md5", ["does not match the published"]),
        ("count", ["holds 9000 items; expected 10000"]),
    ],
)
def test_bad_data_is_one_line(capsys, mnist_copy, tmp_path, kind, fragments):
    _damage(mnist_copy / "mnist" / "t10k-labels-idx1-ubyte.gz", kind)
    code, _, err = run_main(capsys, "mnist", "train", "--out", str(tmp_path / "r"), "--data-dir", str(mnist_copy))
    assert_one_line_error(code, err, *fragments)
    assert not (tmp_path / "r" / "model.safetensors").exists()


def test_unreadable_data_dir_is_one_line(capsys, tmp_path):
    not_a_dir = tmp_path / "data"
    not_a_dir.write_text("")
    code, _, err = run_main(capsys, "mnist", "train", "--out", str(tmp_path / "r"), "--data-dir", str(not_a_dir))
    assert_one_line_error(code, err, "not a directory")


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--epochs", "0"], "epochs must be at least 1"),
        (["--lr", "-1"], "--lr must be in (0, 10]"),
        (["--max-steps", "0"], "--max-steps must be at least 1"),
    ],
)
def test_bad_settings_are_one_line(capsys, tmp_path, args, fragment):
    code, _, err = run_main(capsys, "mnist", "train", "--out", str(tmp_path / "r"), *args)
    assert_one_line_error(code, err, fragment)


def test_bad_run_is_one_line(capsys, quick_run, tmp_path):
    code, _, err = run_main(capsys, "mnist", "evaluate", "--run", str(tmp_path / "absent"))
    assert_one_line_error(code, err, "run directory not found")
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in quick_run.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "model.safetensors").write_bytes(b"\x00" * 20)
    code, _, err = run_main(capsys, "mnist", "evaluate", "--run", str(broken))
    assert_one_line_error(code, err, "corrupt or not a safetensors file")


def test_attribute_writes_grids_and_faithfulness(capsys, quick_run, mnist_root, tmp_path):
    from PIL import Image

    out = tmp_path / "attr"
    code, stdout, err = run_main(
        capsys,
        "mnist",
        "attribute",
        "--run",
        str(quick_run),
        "--method",
        "saliency",
        "--method",
        "ig",
        "--method",
        "gradcam",
        "--n",
        "4",
        "--n-faithfulness",
        "8",
        "--out",
        str(out),
        "--data-dir",
        str(mnist_root),
    )
    assert code == 0, err
    assert "rank" in stdout and f"written to {out}" in stdout
    for name in ("saliency", "integrated_gradients", "gradcam", "faithfulness"):
        with Image.open(out / f"{name}.png") as img:
            img.load()
            assert img.size[0] > 400 and img.size[1] > 300
    result = assert_round_trip(out / "faithfulness.json", AttributionResult)
    assert set(result["methods"]) == {"saliency", "integrated_gradients", "gradcam"}
    for m in result["methods"].values():
        assert 0 <= m["deletion_auc"] <= 1 and 0 <= m["insertion_auc"] <= 1
        assert list(m["randomisation_spearman"]) == ["fc", "conv2", "conv1"]
    assert sorted(result["ranking"]) == sorted(result["methods"])
    assert result["integrated_gradients_completeness"]["max_relative_delta"] < 0.01

    code, _, err = run_main(
        capsys,
        "mnist",
        "attribute",
        "--run",
        str(quick_run),
        "--out",
        str(out),
        "--method",
        "saliency",
        "--data-dir",
        str(mnist_root),
    )
    assert_one_line_error(code, err, "already exists", "--force")


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--method", "lime"], "unknown attribution method 'lime'"),
        (["--n", "0"], "--n must be between 1 and the 10,000 test images"),
        (["--target", "12"], "target '12' out of range; expected pred, label or a class 0..9"),
        (["--layer", "conv7"], "unknown layer 'conv7'; valid layers: hook_input"),
    ],
)
def test_attribute_bad_input(capsys, quick_run, tmp_path, args, fragment):
    code, _, err = run_main(capsys, "mnist", "attribute", "--run", str(quick_run), "--out", str(tmp_path / "o"), *args)
    assert_one_line_error(code, err, fragment)


def test_attribute_missing_run(capsys, tmp_path):
    code, _, err = run_main(capsys, "mnist", "attribute", "--run", str(tmp_path / "none"))
    assert_one_line_error(code, err, "run directory not found")


def test_visualize_writes_grids_and_honesty(capsys, quick_run, mnist_root, tmp_path):
    from PIL import Image

    out = tmp_path / "fv"
    code, stdout, err = run_main(
        capsys,
        "mnist",
        "visualize",
        "--run",
        str(quick_run),
        "--layer",
        "conv2",
        "--layer",
        "logits",
        "--units",
        "0,1",
        "--steps",
        "16",
        "--out",
        str(out),
        "--data-dir",
        str(mnist_root),
    )
    assert code == 0, err
    result = assert_round_trip(out / "featvis.json", FeatvisResult)
    assert len(result["units"]) == 4 and result["summary"]["units"] == 4
    for u in result["units"]:
        if u["dataset_max"] > 0:
            assert u["ratio_to_dataset_max"] == pytest.approx(u["activation"] / u["dataset_max"])
        else:
            assert u["ratio_to_dataset_max"] is None
        assert len(u["top_test_images"]) == 8
    assert all("assigned_class" in u for u in result["units"] if u["layer"] == "hook_logits")
    assert len({u["objective_first"] for u in result["units"]}) == 4  # each unit's own (a batch mean was copied)
    for name in ("conv2", "logits", "units/conv2_1", "units/logits_0"):
        with Image.open(out / f"{name}.png") as img:
            img.load()
    conv = [u for u in result["units"] if u["layer"] == "conv2.hook_post"]
    assert all(len(u["top_receptive_fields"]) == 8 for u in conv)


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--layer", "conv5"], "unknown layer 'conv5'"),
        (["--layer", "conv1", "--units", "16"], "unit 16 out of range for conv1.hook_post: valid units 0..15"),
        (["--steps", "0"], "--steps must be at least 1"),
        (["--units", "a,b"], "--units expects integers"),
    ],
)
def test_visualize_bad_input(capsys, quick_run, tmp_path, args, fragment):
    code, _, err = run_main(capsys, "mnist", "visualize", "--run", str(quick_run), "--out", str(tmp_path / "o"), *args)
    assert_one_line_error(code, err, fragment)
