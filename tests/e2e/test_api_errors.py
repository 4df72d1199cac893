"""The same user errors through the Python API and the command line: MechscopeError with the same text.

Each row gives a bad input once to a ``mechscope`` API function and once to the command, and checks that
the API raises :class:`MechscopeError` whose text is exactly what the command prints after
``mechscope: error:`` (the CLI only adds the prefix and joins whitespace).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import mechscope
from mechscope.cli import error_line, main
from mechscope.core.errors import MechscopeError
from tests.fuzz import builders as B


def cli_line(capsys, *args) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    assert e.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    return lines[0]


def api_line(fn) -> str:
    with pytest.raises(MechscopeError) as e:
        fn()
    return error_line(e.value)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    w = tmp_path_factory.mktemp("api")
    npz = B.write_npz(w / "data.npz")
    run = B.write_run(w / "run", npz)
    bad_run = w / "bad_run"
    shutil.copytree(run, bad_run)
    cfg = json.loads((bad_run / "config.json").read_text())
    cfg["model"] = None
    (bad_run / "config.json").write_text(json.dumps(cfg))
    hf = B.write_hf_dir(w / "hf")
    nhead0 = w / "hf_nhead0"
    shutil.copytree(hf, nhead0)
    (nhead0 / "config.json").write_text(json.dumps(B.gpt2_config() | {"n_head": 0}))
    arrays = B.image_arrays()
    arrays["x_test"] = arrays["x_test"].astype(np.float32) / 255
    arrays["x_test"][3, 1, 1] = np.inf
    np.savez(w / "inf.npz", **arrays)
    return {"w": w, "npz": npz, "run": run, "bad_run": bad_run, "hf": hf, "nhead0": nhead0, "inf": w / "inf.npz"}


def test_run_config_error(inputs, capsys):
    api = api_line(lambda: mechscope.load_run(inputs["bad_run"]))
    assert api == cli_line(capsys, "cnn", "evaluate", "--run", inputs["bad_run"])
    assert "field 'model' is null; expected a JSON object" in api


def test_hf_config_error(inputs, capsys):
    api = api_line(lambda: mechscope.lm.load_model(inputs["nhead0"], device="cpu"))
    assert api == cli_line(capsys, "lm", "inspect", "--model", inputs["nhead0"], "--device", "cpu")
    assert "field 'n_head' is 0" in api


def test_hook_that_does_not_fire(inputs, capsys):
    model, tok = mechscope.lm.load_model(inputs["hf"], device="cpu")
    ids = torch.tensor([tok.encode("the")])
    api = api_line(lambda: mechscope.run_with_cache(model, ids, names=["blocks.0.attn.hook_rot_q"]))
    hook = ["--hook", "blocks.0.attn.hook_rot_q", "--prompt", "the", "--device", "cpu"]
    assert api == cli_line(capsys, "lm", "inspect", "--model", inputs["hf"], *hook)


def test_attribute_n_beyond_the_test_set(inputs, capsys, tmp_path):
    run = mechscope.load_run(inputs["run"])
    api = api_line(lambda: mechscope.attribute(run.model, inputs["npz"], out=tmp_path / "a", n=10_000))
    assert api == cli_line(capsys, "cnn", "attribute", "--run", inputs["run"], "--n", "10000", "--out", tmp_path / "c")
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


def test_non_finite_pixel(inputs, capsys, tmp_path):
    run = mechscope.load_run(inputs["run"])
    api = api_line(lambda: mechscope.attribute(run.model, inputs["inf"], out=tmp_path / "a"))
    cli = cli_line(
        capsys, "cnn", "attribute", "--run", inputs["run"], "--dataset", inputs["inf"], "--out", tmp_path / "c"
    )
    assert api == cli and "not finite" in api
    x = torch.rand(8, 1, 8, 8)
    x[0, 0, 0, 0] = float("inf")
    y = torch.arange(8) % 3
    tensors = api_line(lambda: mechscope.attribute(run.model, (x, y), (x, y), out=tmp_path / "t"))
    assert "not finite" in tensors


def test_visualize_bad_steps(inputs, capsys, tmp_path):
    run = mechscope.load_run(inputs["run"])
    api = api_line(lambda: mechscope.visualize(run.model, inputs["npz"], out=tmp_path / "v", steps=0))
    assert api == cli_line(capsys, "cnn", "visualize", "--run", inputs["run"], "--steps", "0", "--out", tmp_path / "v")


def test_explain_unknown_class(inputs, capsys, tmp_path):
    run = mechscope.load_run(inputs["run"])
    api = api_line(lambda: mechscope.explain(run.model, inputs["npz"], out=tmp_path / "e", classes=[7]))
    assert api == cli_line(capsys, "cnn", "explain", "--run", inputs["run"], "--class", "7", "--out", tmp_path / "e")


def test_one_item_for_a_list_and_an_int_class(inputs, tmp_path):
    """A notebook's shortcuts: target=3 (an AttributeError on int.isascii), methods="saliency" (read as the methods
    's', 'a', ...), layers="conv1" and units=0 (a TypeError), patch=(1,) (an IndexError)."""
    model = mechscope.load_run(inputs["run"]).model
    a = mechscope.attribute(model, inputs["npz"], out=tmp_path / "a", methods="saliency", n=2, n_faithfulness=2,
                            target=1)  # fmt: skip
    assert [m.method for m in a.faithfulness.methods] == ["saliency"] and a.target == "1"
    for target, said in ((12, "target 12 out of range: expected 0..2"), (1.5, "target must be pred, label or a")):
        assert said in api_line(lambda t=target: mechscope.attribute(model, inputs["npz"], out=tmp_path / "b", n=2,
                                                                      n_faithfulness=2, methods="saliency",
                                                                      target=t))  # fmt: skip
    v = mechscope.visualize(model, inputs["npz"], out=tmp_path / "v", layers="conv1", units=0, steps=2)
    assert [(u.layer, u.unit) for u in v.units] == [("conv1.hook_post", 0)]
    assert "--n must be an integer, got 2.5" in api_line(
        lambda: mechscope.attribute(model, inputs["npz"], out=tmp_path / "f", methods="saliency", n=2.5))
    assert "--steps must be an integer, got 2.5" in api_line(
        lambda: mechscope.visualize(model, inputs["npz"], out=tmp_path / "w", layers="conv1", units=0, steps=2.5))
    for unit, shown in ((0.5, "0.5"), ("a", '"a"'), (True, "true")):  # an IndexError, a TypeError, a mask before
        assert f"--units: each unit must be an integer, got {shown}" in api_line(
            lambda u=unit: mechscope.visualize(model, inputs["npz"], out=tmp_path / "u", layers="conv1", units=[u]))
    assert "unknown class 1.5; expected 0..2 or a class name" in api_line(
        lambda: mechscope.explain(model, inputs["npz"], out=tmp_path / "c", classes=[1.5]))  # was class 1
    said = api_line(lambda: mechscope.explain(model, inputs["npz"], out=tmp_path / "e", patch=(1,)))
    assert "patch expects two classes (clean, corrupted), got (1,)" in said
    assert "methods must be a list (or one item), got dict" in api_line(
        lambda: mechscope.attribute(model, inputs["npz"], out=tmp_path / "d", methods={"saliency": 1}))
    for bad, said in (({"methods": ["bogus"]}, "bogus"), ({"target": "foo"}, "foo"), ({"layer": "nope"}, "nope"),
                      ({}, "--n-faithfulness must be between 1 and the")):  # fmt: skip
        line = api_line(lambda b=bad: mechscope.attribute(model, inputs["npz"], out=tmp_path / "g", **b))
        assert said in line and ("n-faithfulness" in line) == (not bad)  # the default 64 was said first, for each


def test_a_refused_call_with_out_none_leaves_no_temporary_folder(inputs, tmp_path, monkeypatch):
    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    monkeypatch.setattr("tempfile.tempdir", None)  # read TMPDIR again
    model = mechscope.load_run(inputs["run"]).model
    for call in (lambda: mechscope.attribute(model, inputs["npz"], out=None, methods="nosuch"),
                 lambda: mechscope.explain(model, inputs["npz"], out=None, classes=[42]),
                 lambda: mechscope.visualize(model, inputs["npz"], out=None, layers="conv1", units=99)):  # fmt: skip
        api_line(call)
    assert list((tmp_path / "tmp").iterdir()) == []  # each left an empty mechscope-*-XXXX folder


def test_pipelines_say_what_data_and_out_they_need(inputs, tmp_path):
    """The pipelines take an ImageDataset and an output folder: the (images, labels) tuples explain takes, and
    out=None, gave an AttributeError and pathlib's TypeError."""
    from mechscope.cnn.pipelines.blocks import blocks_model
    from mechscope.cnn.pipelines.sae import sae_harvest_model

    model = mechscope.load_run(inputs["run"]).model
    data = mechscope.load_dataset(str(inputs["npz"]))
    pair = (data.test_float(), data.test_labels)
    assert "data must be an ImageDataset (mechscope.load_dataset(NAME)" in api_line(
        lambda: blocks_model(model, pair, tmp_path / "b", image=0))
    assert "data must be an ImageDataset" in api_line(lambda: sae_harvest_model(model, pair, tmp_path / "h"))
    said = api_line(lambda: blocks_model(model, data, None, image=0))
    assert "an output folder is needed (out=...), got None" in said
    assert not (tmp_path / "b").exists() and not (tmp_path / "h").exists()


def test_a_run_folder_for_a_model_and_unknown_settings(inputs, tmp_path):
    """A run folder where a model goes is loaded (it was an AttributeError deep inside); something else is refused;
    an unknown keyword of a **settings function names the known ones (a dataclass TypeError before)."""
    import mechscope.clip as C
    from mechscope.lm import train_toy

    run = mechscope.load_run(inputs["run"])
    by_path = mechscope.attribute(inputs["run"], inputs["npz"], out=tmp_path / "p", methods="saliency", n=2,
                                  n_faithfulness=2)  # fmt: skip
    by_model = mechscope.attribute(run.model, inputs["npz"], out=tmp_path / "m", methods="saliency", n=2,
                                   n_faithfulness=2)  # fmt: skip
    assert by_path.faithfulness.to_dict() == by_model.faithfulness.to_dict()
    assert "model must be a torch nn.Module or a run folder, got dict" in api_line(
        lambda: mechscope.explain({}, inputs["npz"], out=tmp_path / "e"))
    for call, said in ((lambda: C.train_small(foo=1), "unknown clip.train_small setting 'foo'; the settings are"),
                       (lambda: C.neurons("x", foo=1), "unknown clip.neurons setting 'foo'"),
                       (lambda: C.attack("x", foo=1), "unknown clip.attack setting 'foo'"),
                       (lambda: train_toy(foo=1), "unknown toy setting 'foo'; the settings are layers, data")):
        assert said in api_line(call)
    (tmp_path / "a.txt").write_text("mine")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("mine")
    tiny = dict(steps=1, checkpoints=1, batch=2, d_model=8, n_heads=2, n_ctx=16)
    for call, said in ((lambda: train_toy("x"), "config must be a ToyConfig (or None, with its fields as keywords)"),
                       (lambda: train_toy(**tiny, vocab=1), "vocab must be at least 2, got 1"),  # a RuntimeError
                       (lambda: train_toy(**tiny, out=tmp_path / "a.txt"), "a.txt: exists and is not a directory"),
                       (lambda: train_toy(**tiny, out=tmp_path / "full"), "full: already exists and is not empty")):
        assert said in api_line(call)
    assert (tmp_path / "a.txt").read_text() == "mine" and (tmp_path / "full" / "x").read_text() == "mine"
    from mechscope.lm.methods.scores import HeadScores

    for call, said in ((lambda: mechscope.load_run(None), "run must be a path (a string or a pathlib.Path), got "
                        "NoneType"), (lambda: mechscope.load_run(123), "run must be a path"),
                       (lambda: HeadScores.load(None), "HeadScores record must be a path"),
                       (lambda: C.load(None), "model must be a path"), (lambda: C.inspect(None), "model must be"),
                       (lambda: C.neurons(123), "model must be a path (a string or a pathlib.Path), got int")):
        assert said in api_line(call)  # pathlib's "expected str, bytes or os.PathLike object, not NoneType" before
