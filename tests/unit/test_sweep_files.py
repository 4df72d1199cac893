"""Bad file contents and paths a sweep found reaching a traceback or a silently wrong result (6 December 2026, items
4, 5, 15, 17 and 18): each is one line now. A tracr folder's config.json that claims another model (a huge pad_id,
LayerNorm, GELU, a head wider than d_head, ...), a path the file system cannot look up, a CNN run's absurd
normalisation, and ``lm heads --text`` given to a model with no tokenizer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mechscope.core.errors import MechscopeError
from tests.conftest import shared_data_root
from tests.e2e.test_cli import assert_one_line_error, run_main


def _tracr_copy(tmp_path: Path, change, name: str = "reverse") -> Path:
    root = shared_data_root()
    if root is None or not (root / "tracr" / name / "config.json").is_file():
        pytest.skip("tracr models not found in $MECHSCOPE_DATA or ../shared/data")
    dest = tmp_path / name
    shutil.copytree(root / "tracr" / name, dest)
    for f in dest.iterdir():
        f.chmod(0o644)
    config = json.loads((dest / "config.json").read_text())
    change(config)
    (dest / "config.json").write_text(json.dumps(config))
    return dest


# ---------------------------------------------------------------- item 4: pad_id is range-checked like bos_id


@pytest.mark.parametrize("pad", [2**64, 5, -1, "1", True])
def test_tracr_pad_id_outside_the_vocabulary_is_refused(tmp_path, pad):
    """2**64 loaded, then ``lm discover`` died in an OverflowError padding a batch with it."""
    from mechscope.lm.models.loading import load_model

    d = _tracr_copy(tmp_path, lambda c: c.update(pad_id=pad))
    with pytest.raises(MechscopeError, match="pad_id") as e:
        load_model(d, device="cpu")
    assert "\n" not in str(e.value) and str(d / "config.json") in str(e.value)


def test_tracr_pad_id_cli_is_one_line(tmp_path, capsys):
    d = _tracr_copy(tmp_path, lambda c: c.update(pad_id=2**64))
    code, _, err = run_main(capsys, "lm", "inspect", "--model", str(d))
    assert code == 2
    assert_one_line_error(code, err, "pad_id 18446744073709551616 outside the vocabulary 0..4")


# ---------------------------------------------------------------- item 17: config.json claims another model


def _set_width(c):
    c["head_widths"]["qk"][0] = [2**64]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda c: c.update(layer_norm=True), "'layer_norm' is true"),
        (lambda c: c["mlp"].update(activation="gelu"), "'mlp.activation' is \"gelu\""),
        (lambda c: c.update(mlp=["relu"]), "'mlp' is"),
        (lambda c: c.update(attn_present=[True]), "'attn_present' is [true]; expected n_layers = 4 flags"),
        (lambda c: c.update(mlp_present=[True, False, True, "yes"]), "'mlp_present'"),
        (_set_width, "'head_widths.qk'"),
        (lambda c: c["head_widths"].update(ov=[[15], [0], [0], [3]]), "d_head = 14"),
        (lambda c: c.update(mlp_widths=[14, 42, 12]), "'mlp_widths'"),
        (lambda c: c.update(bos_token="ZZZ"), "'bos_token' is \"ZZZ\""),
        (lambda c: c.update(pad_token="a"), "'pad_token' is \"a\""),
        (lambda c: c["output"].update(vocab=["a", "a", "a"]), "'output.vocab'"),
        (lambda c: c.update(input_vocab=["BOS", "PAD", "a", "a", "c"]), "'input_vocab'"),
        (lambda c: c["tensors"].update({"embed.W_E": [5, 48]}), "'tensors.embed.W_E'"),
        (lambda c: c.update(residual_labels=["one"]), "'residual_labels'"),
    ],
)  # fmt: skip
def test_tracr_config_claiming_another_model_is_refused(tmp_path, change, field):
    """Each ran with exit 0 and the scores of the model the loader builds (no norm, ReLU), not the one claimed."""
    from mechscope.lm.models.loading import load_model

    d = _tracr_copy(tmp_path, change)
    with pytest.raises(MechscopeError) as e:
        load_model(d, device="cpu")
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{d / 'config.json'}: field ") and field in message


# ---------------------------------------------------------------- item 5: a path the file system cannot look up


def test_a_model_path_too_long_for_the_file_system_is_one_line(capsys):
    from mechscope.lm.models.loading import load_model

    with pytest.raises(MechscopeError, match=r"not a usable path \(file name too long\)"):
        load_model("x" * 256)
    with pytest.raises(MechscopeError, match=r"not a usable path \(file name too long\)"):
        load_model("/tmp/" + "x" * 300 + "/model.gguf")
    code, _, err = run_main(capsys, "lm", "inspect", "--model", "x" * 256)
    assert code == 2
    assert_one_line_error(code, err, "not a usable path (file name too long)")
    code, _, err = run_main(capsys, "lm", "heads", "--model", "x" * 256)  # through load_lm
    assert_one_line_error(code, err, "not a usable path (file name too long)")


def test_a_run_path_too_long_for_the_file_system_is_one_line(tmp_path, capsys):
    from mechscope.cnn.runs import load_run

    with pytest.raises(MechscopeError, match=r"run '.*': not a usable path \(file name too long\)"):
        load_run("y" * 300)
    hypothesis = tmp_path / "c.json"
    hypothesis.write_text(json.dumps({"name": "c", "run": "y" * 300, "metric": "accuracy", "samples": 2,
                                      "data": {"n": 50}, "claims": [{"name": "a", "edges": ["input->conv1.*"]}]}))
    code, _, err = run_main(capsys, "scrub", "--hypothesis", str(hypothesis), "--out", str(tmp_path / "o"))
    assert code == 2
    assert_one_line_error(code, err, "not a usable path (file name too long)")


def test_usable_path_accepts_what_merely_does_not_exist(tmp_path):
    from mechscope.core.validate import usable_path

    assert usable_path(tmp_path / "absent" / "deeper") == tmp_path / "absent" / "deeper"
    (tmp_path / "f").write_text("x")
    assert usable_path(tmp_path / "f" / "under-a-file") == tmp_path / "f" / "under-a-file"
    with pytest.raises(MechscopeError, match="file name too long"):
        usable_path(tmp_path / ("z" * 256))


# ---------------------------------------------------------------- item 15: a CNN run's mean and std


@pytest.fixture()
def cnn_run(tmp_path) -> Path:
    """A run folder written by save_run from an untrained small CNN (no training, no data)."""
    from mechscope.cnn.models.cnn import CNN, CNNConfig
    from mechscope.cnn.runs import save_run

    out = tmp_path / "run"
    out.mkdir()
    save_run(out, CNN(CNNConfig(channels=(4, 8))), {"seed": 0, "data": {"name": "mnist", "kind": "builtin"}}, {})
    return out


def _edit_run(run: Path, **model) -> None:
    config = json.loads((run / "config.json").read_text())
    config["model"].update(model)
    (run / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("edit", "said"),
    [
        ({"mean": 1e308}, "field 'model.mean' is 1e+308; expected a finite number (or one per channel) from -1,000 to "
                          "1,000"),
        ({"mean": -1001}, "field 'model.mean' is -1001"),
        ({"std": 1e308}, "field 'model.std' is 1e+308; expected a finite number (or one per channel) above 0 and at "
                         "most 1,000"),
        ({"std": -0.3}, "field 'model.std' is -0.3"),
        ({"std": 1001}, "field 'model.std' is 1001"),
    ],
)  # fmt: skip
def test_cnn_run_normalisation_out_of_range_is_refused(cnn_run, capsys, edit, said):
    """mean 1e308 evaluated to 'loss nan' with exit 0; std 1e308 and -0.3 to chance."""
    from mechscope.cnn.runs import load_run

    load_run(cnn_run)  # as written: fine
    _edit_run(cnn_run, **edit)
    with pytest.raises(MechscopeError, match="model.") as e:
        load_run(cnn_run)
    assert said in str(e.value) and str(cnn_run / "config.json") in str(e.value)
    code, _, err = run_main(capsys, "cnn", "evaluate", "--run", str(cnn_run))
    assert code == 2
    assert_one_line_error(code, err, said)


def test_cnn_config_refuses_absurd_normalisation():
    from mechscope.cnn.models.cnn import CNN, CNNConfig

    CNN(CNNConfig(channels=(4,), mean=0.5, std=0.25))
    for kw in ({"std": -0.3}, {"std": 0.0}, {"std": float("inf")}, {"mean": float("nan")}, {"mean": 1e308}):
        with pytest.raises(MechscopeError, match="pixels scaled to \\[0, 1\\]"):
            CNN(CNNConfig(channels=(4,), **kw))


# ---------------------------------------------------------------- item 18: lm heads --text without a tokenizer


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory) -> Path:
    """A two-step train-toy run on synthetic tokens: a model with no tokenizer (a few seconds)."""
    from mechscope.lm.pipelines.toy import train_toy_run
    from mechscope.lm.toy import ToyConfig

    out = tmp_path_factory.mktemp("toy") / "toy"
    config = ToyConfig(steps=2, d_model=32, n_heads=2, n_ctx=32, vocab=16, batch=8, checkpoints=2, min_span=4)
    train_toy_run(config, out=out, control=False, progress=False)
    return out


@pytest.mark.parametrize(
    ("make", "said"),
    [
        (lambda d: d / "absent" / "x.txt", "text file not found"),
        (lambda d: d, "is a directory"),
        (lambda d: _write(d / "empty.txt", b""), "is empty"),
        (lambda d: _write(d / "blank.txt", b"  \n"), "is empty"),
        (lambda d: _write(d / "bin.txt", b"abc\0def"), "NUL bytes"),
        (lambda d: _write(d / "latin1.txt", b"caf\xe9"), "not UTF-8"),
        (lambda d: _write(d / "ok.txt", b"to be or not to be"), "--text needs a tokenizer; "),
    ],
)  # fmt: skip
def test_heads_text_is_read_and_refused_without_a_tokenizer(toy_run, tmp_path, capsys, make, said):
    """Each exited 0 with a warning that the real-text score was not measured."""
    text = make(tmp_path)
    out = tmp_path / "out"
    code, _, err = run_main(capsys, "lm", "heads", "--model", str(toy_run), "--n", "10", "--batch", "2",
                            "--no-ablation", "--text", str(text), "--out", str(out))  # fmt: skip
    assert code == 2
    assert_one_line_error(code, err, said)
    assert not out.exists()


def test_heads_text_is_checked_before_the_model_is_loaded(tmp_path):
    from mechscope.lm.pipelines.heads import induction_heads

    with pytest.raises(MechscopeError, match="text file not found"):  # not "no such model"
        induction_heads(str(tmp_path / "no-model"), tmp_path / "out", text_file=tmp_path / "absent.txt")


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_json_objects_are_strict_about_repeated_keys_and_plain_about_a_bom(tmp_path):
    """Python's json kept the last of two equal keys (a hypothesis ran with the second "samples" silently); a
    byte-order mark was "Unexpected UTF-8 BOM (decode using utf-8-sig)"; a 5,000-digit number was advice to call
    sys.set_int_max_str_digits()."""
    from mechscope.core.validate import read_json_object

    path = tmp_path / "h.json"
    path.write_text('{"samples": 2, "nested": {"a": 1, "a": 2}}')
    with pytest.raises(MechscopeError, match="key 'a' appears twice in one object"):
        read_json_object(path, "hypothesis")
    path.write_bytes(b'\xef\xbb\xbf{"samples": 2}')
    assert read_json_object(path) == {"samples": 2}
    path.write_text('{"samples": ' + "1" * 5000 + "}")
    with pytest.raises(MechscopeError, match=r"corrupt JSON \(a number of more than 4,300 digits\)") as e:
        read_json_object(path)
    assert "set_int_max_str_digits" not in str(e.value)
