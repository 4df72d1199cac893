"""Run directories: round trip, and every way a run directory can be wrong."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import mechscope
from mechscope.cnn.models.cnn import CNN
from mechscope.cnn.runs import check_out_dir, prepare_out_dir, save_run
from mechscope.core.errors import MechscopeError, RunError


@pytest.fixture()
def run_dir(tmp_path):
    torch.manual_seed(0)
    model = CNN()
    out = prepare_out_dir(tmp_path / "run")
    config = {"training": {"seed": 0}, "seed": 0, "data": {"name": "mnist", "kind": "builtin"}}
    save_run(out, model, config, {"test_accuracy": 0.1})
    return out, model


def test_round_trip(run_dir):
    path, model = run_dir
    run = mechscope.load_run(path)
    x = torch.rand(4, 1, 28, 28)
    torch.testing.assert_close(run.model(x), model.eval()(x), rtol=0, atol=0)
    assert run.config["kind"] == "cnn" and run.config["model"]["channels"] == [16, 32]
    assert "torch" in run.config["versions"] and run.metrics["test_accuracy"] == 0.1
    assert not run.model.training


def test_load_run_leaves_the_global_rng_alone(run_dir):
    """Loading replaces the initial weights, so it draws nothing the caller sees: the numbers drawn after a seed
    are the same with and without a load_run between (outside truth: the same draws with no load)."""
    torch.manual_seed(7)
    expected = torch.rand(5)
    torch.manual_seed(7)
    mechscope.load_run(run_dir[0])
    torch.testing.assert_close(torch.rand(5), expected, rtol=0, atol=0)


def test_missing_directory(tmp_path):
    with pytest.raises(RunError, match="run directory not found"):
        mechscope.load_run(tmp_path / "nothing")


def test_missing_weights(run_dir):
    path, _ = run_dir
    (path / "model.safetensors").unlink()
    with pytest.raises(RunError, match="model.safetensors is missing"):
        mechscope.load_run(path)


def test_missing_config(run_dir):
    path, _ = run_dir
    (path / "config.json").unlink()
    with pytest.raises(RunError, match="not a mechscope run directory"):
        mechscope.load_run(path)


def test_corrupt_weights(run_dir):
    path, _ = run_dir
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(RunError, match="corrupt or not a safetensors file"):
        mechscope.load_run(path)


def test_corrupt_config(run_dir):
    path, _ = run_dir
    (path / "config.json").write_text("{not json")
    with pytest.raises(RunError, match="corrupt JSON"):
        mechscope.load_run(path)


def test_other_architecture(run_dir):
    path, _ = run_dir
    save_file({"conv1.conv.weight": torch.zeros(8, 1, 3, 3)}, str(path / "model.safetensors"))
    with pytest.raises(RunError, match="weights of another architecture.*conv1.conv.weight is \\[8, 1, 3, 3\\]"):
        mechscope.load_run(path)


def test_other_kind(run_dir):
    path, _ = run_dir
    cfg = json.loads((path / "config.json").read_text())
    cfg["kind"] = "transformer"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(RunError, match="expected 'cnn'"):
        mechscope.load_run(path)


def _with_schema(path, schema):
    cfg = json.loads((path / "config.json").read_text())
    if schema is None:
        del cfg["schema"]
    else:
        cfg["schema"] = schema
    (path / "config.json").write_text(json.dumps(cfg))


def test_a_run_records_its_layout_and_a_newer_one_is_refused(run_dir):
    """Truth: the config.json read back with json names its layout, mechscope.cnn_run/1; a run from before the
    header (none) loads as version 1; a /2 (or /10: numbers, not text) run comes from a newer mechscope whose fields
    this one may read wrongly, and another layout or a header that is not text is no run of ours."""
    path, _ = run_dir
    assert json.loads((path / "config.json").read_text())["schema"] == "mechscope.cnn_run/1"
    _with_schema(path, None)
    assert mechscope.load_run(path).config["kind"] == "cnn"
    for schema, message in [("mechscope.cnn_run/2", "newer than this mechscope reads"),
                            ("mechscope.cnn_run/10", "newer than this mechscope reads"),
                            ("mechscope.toy/1", "expected a mechscope.cnn_run/1 record"),
                            (3, "field 'schema'")]:  # fmt: skip
        _with_schema(path, schema)
        with pytest.raises(RunError, match=message) as e:
            mechscope.load_run(path)
        assert "\n" not in str(e.value) and "config.json" in str(e.value)


def test_run_written_before_other_shapes_loads(run_dir):
    """A run from before the shape options (kind mnist-cnn, conv1/conv2_channels, no data record) loads as MNIST."""
    path, model = run_dir
    cfg = json.loads((path / "config.json").read_text())
    cfg["kind"] = "mnist-cnn"
    del cfg["data"]
    cfg["model"] = {k: v for k, v in cfg["model"].items() if k not in ("channels", "batchnorm", "activation",
                                                                       "hidden", "padding")}  # fmt: skip
    cfg["model"].update(conv1_channels=16, conv2_channels=32)
    (path / "config.json").write_text(json.dumps(cfg))
    run = mechscope.load_run(path)
    assert run.model.config.channels == (16, 32)
    assert run.data["name"] == "mnist" and run.class_names == tuple("0123456789")
    x = torch.rand(2, 1, 28, 28)
    torch.testing.assert_close(run.model(x), model.eval()(x), rtol=0, atol=0)


def test_no_overwrite_without_force(run_dir):
    path, _ = run_dir
    with pytest.raises(RunError, match="pass --force"):
        check_out_dir(path)
    assert check_out_dir(path, force=True) == path
    (path / "keep.txt").write_text("user file")
    prepare_out_dir(path, force=True)
    assert (path / "keep.txt").read_text() == "user file"  # --force replaces our files, deletes nothing


def test_a_cnn_run_without_its_data_is_refused(run_dir, tmp_path):
    """A run of kind cnn always records its data; without it the run read as MNIST, and a run of other 28×28
    grey images (Fashion-MNIST from a folder) was scored on MNIST's test set without a word."""
    path, _ = run_dir
    cfg = json.loads((path / "config.json").read_text())
    del cfg["data"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(RunError, match="field 'data' is missing; a cnn run records the dataset it was trained on"):
        mechscope.load_run(path)
    with pytest.raises(MechscopeError, match=r"save_run: config\['data'\] must name the dataset"):
        save_run(tmp_path, CNN(), {"seed": 0}, {})
