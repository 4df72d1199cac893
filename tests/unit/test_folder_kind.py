"""A folder given to the wrong wing: what it holds is read from its files alone, and the refusal names the commands
that take it (core/paths.py: folder_kind, other_wing; the three loaders)."""

from __future__ import annotations

import json

import pytest

from mechscope.core.errors import MechscopeError
from mechscope.core.paths import folder_kind, other_wing
from tests.unit.test_tracr import tracr_root


def _folder(tmp_path, name, files: dict):
    d = tmp_path / name
    d.mkdir()
    for f, content in files.items():
        if f.endswith("/"):
            (d / f).mkdir()
        else:
            (d / f).write_text(json.dumps(content) if not isinstance(content, str) else content)
    return d


def test_each_kind_is_read_from_its_files(tmp_path):
    cnn = _folder(tmp_path, "cnn", {"config.json": {"kind": "cnn", "model": {}}})
    toy = _folder(tmp_path, "toy", {"training.json": {}, "checkpoints/": None})
    clip = _folder(tmp_path, "clip", {"config.json": {"model_type": "clip"}})
    lm = _folder(tmp_path, "lm", {"config.json": {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}})
    bad = _folder(tmp_path, "bad", {"config.json": "{not json"})
    bert = _folder(tmp_path, "bert", {"config.json": {"model_type": "bert", "architectures": ["BertModel"]}})
    kinds = [folder_kind(p) for p in (cnn, toy, clip, lm, bert, bad, tmp_path / "none")]
    assert kinds == ["cnn", "toy", "clip", "lm", None, None, None]
    assert folder_kind(tracr_root() / "length") == "tracr"
    assert other_wing(cnn, "cnn") == "" and other_wing(lm, "lm") == "" and other_wing(bad, "lm") == ""
    assert other_wing(cnn, "lm") == " (it is a CNN run: the cnn commands take it with --run)"
    assert other_wing(toy, "clip") == " (it is a train-toy run: the lm commands take it with --model)"


def test_the_loaders_name_the_commands_that_take_another_wings_folder(tmp_path):
    from mechscope.clip.models.loading import load_clip
    from mechscope.cnn.runs import load_run
    from mechscope.lm.models.loading import load_model

    cnn = _folder(tmp_path, "cnn", {"config.json": {"kind": "cnn", "model": {}}})
    clip = _folder(tmp_path, "clip", {"config.json": {"model_type": "clip"}})
    with pytest.raises(MechscopeError, match="not a transformer the lm commands read .it is a CNN run: the cnn"):
        load_model(str(cnn))
    with pytest.raises(MechscopeError, match="not a CNN run .it is an image–text model: the clip commands"):
        load_run(clip)
    with pytest.raises(MechscopeError, match="not an image–text model .it is a CNN run"):
        load_clip(cnn)
    with pytest.raises(MechscopeError, match="not a CNN run .it is a tracr-compiled transformer"):
        load_run(tracr_root() / "length")


def _dictionary(tmp_path, name, wing: str):
    """A dictionary folder as `cnn sae train` / `lm sae train` write it: cfg.json beside a training.json of its
    wing's layout (the weights are not read to tell what it is)."""
    return _folder(tmp_path, name, {"cfg.json": {"d_in": 4, "d_sae": 8},
                                    "training.json": {"schema": f"mechscope.{wing}-sae-training/1"}})  # fmt: skip


def test_a_dictionary_is_told_from_a_model_and_named_where_a_model_or_the_other_wings_dictionary_is_asked(tmp_path):
    """Truth: the commands that take each (`cnn sae --help`, `lm sae --help`). A CNN dictionary given to lm sae
    evaluate was 'unknown hook point conv2.hook_out; valid names: ...' (every hook of the transformer), and the
    reverse; a dictionary given as a model was read as a train-toy run ('expected a mechscope.toy/1 record')."""
    from mechscope.cnn.pipelines.sae import load_dictionary as cnn_dictionary
    from mechscope.cnn.runs import load_run
    from mechscope.lm.pipelines.loading import load_lm
    from mechscope.lm.pipelines.sae import load_dictionary as lm_dictionary

    cnn, lm = _dictionary(tmp_path, "csae", "cnn"), _dictionary(tmp_path, "lsae", "lm")
    assert (folder_kind(cnn), folder_kind(lm)) == ("cnn-sae", "lm-sae")
    assert folder_kind(_folder(tmp_path, "other", {"cfg.json": {}, "training.json": {"schema": "x/1"}})) is None
    cnn_said = "it is a sparse dictionary of a CNN: cnn sae evaluate and cnn sae show take it with --sae"
    lm_said = "it is a sparse dictionary of a transformer: lm sae evaluate and lm sae show take it with --sae"
    with pytest.raises(MechscopeError, match=f"csae: not a dictionary the lm commands read .{cnn_said}.$"):
        lm_dictionary(cnn)
    with pytest.raises(MechscopeError, match=f"lsae: not a dictionary the cnn commands read .{lm_said}.$"):
        cnn_dictionary(lm)
    for path, said in ((cnn, cnn_said), (lm, lm_said)):
        with pytest.raises(MechscopeError, match=f"not a model .{said}.$"):
            load_lm(str(path))
        with pytest.raises(MechscopeError, match=f"not a CNN run .{said}.$"):
            load_run(path)
