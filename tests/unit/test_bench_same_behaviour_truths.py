"""The bench's comparison gate (bench/same_behaviour.py: behaviour unchanged, proven) against outside truths:
hand-built JSON values and safetensors files that agree or disagree in one known place, the relative tolerance by
its formula, and the script's exit status on hand-written outputs.

bench/ is appended to the path unless a ``same_behaviour`` is importable already (a mutated copy put first on
PYTHONPATH), as test_bench_truths does."""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

if importlib.util.find_spec("same_behaviour") is None:
    sys.path.append(str(Path(__file__).resolve().parents[2] / "bench"))

same = importlib.import_module("same_behaviour")

# ---- same_behaviour: the comparison gate ----------------------------------------------------------------------


def test_differences_ignores_timings_work_and_top_headers_only():
    """Outside truth: the module's docstring: seconds, *_seconds, versions, paths and work are not compared, nor the
    top-level schema headers; a schema key deeper down is data."""
    a = {"x": 1, "seconds": 1, "train_seconds": 2, "load_seconds": 3, "versions": "a", "library_versions": "a",
         "path": "p", "paths": ["p"], "work": {"forward_passes": 1}, "schema": "s1", "schema_version": 1}  # fmt: skip
    b = {"x": 1, "seconds": 9, "train_seconds": 8, "load_seconds": 7, "versions": "b", "library_versions": "b",
         "path": "q", "paths": ["q"], "work": {"forward_passes": 2}, "schema": "s2", "schema_version": 2}  # fmt: skip
    assert same.differences(a, b, "f") == []
    assert same.differences({"s": {"schema": 1}}, {"s": {"schema": 2}}, "f") == ["f.s.schema: 1 != 2"]


def test_differences_reports_each_kind_of_disagreement():
    """Outside truth: hand-built disagreeing pairs, each with the line a reader must see."""
    d = same.differences
    assert d({"k": 1}, {}, "f") == ["f.k: only in before"]
    assert d({}, {"k": 1}, "f") == ["f.k: only in after"]
    assert d({"l": [1, 2]}, {"l": [1, 2, 3]}, "f") == ["f.l: length 2 != 3"]
    assert d({"l": [1, 2, 3]}, {"l": [1, 5, 3]}, "f") == ["f.l[1]: 2 != 5"]
    assert d({"v": 1.0}, {"v": 1.0000001}, "f") == ["f.v: 1.0 != 1.0000001"]
    assert d({"v": "a" * 100}, {"v": "b"}, "f") == [f"f.v: {'a' * 80!r} != 'b'"]
    assert d({"v": float("nan")}, {"v": float("nan")}) == []
    assert d({"v": float("nan")}, {"v": 1.0}) == [".v: nan != 1.0"]
    assert d([{"a": 1}, {"b": 2}], [{"a": 1}, {"b": 3}], "f") == ["f[1].b: 2 != 3"]


@pytest.mark.parametrize("rtol", [0.01, 0.00995, 0.0099, 0.0])
def test_differences_relative_tolerance_against_the_larger_value(rtol):
    """Outside truth: |a - b| <= rtol x max(|a|, |b|) by hand: 100 against 101 differ by 1, within 0.01 x 101 = 1.01
    and 0.00995 x 101 = 1.005 (not 0.00995 x 100), but not 0.0099 x 101 = 0.9999; rtol 0 asks for equality."""
    close = abs(100 - 101) <= rtol * 101
    assert (same.differences(100, 101, "v", rtol) == []) == close
    assert close == (rtol in (0.01, 0.00995))


def test_passes_and_header_lines():
    """Outside truth: forward + 2 x backward by hand: 3 + 2 x 2 = 7 and 10 + 2 x 0.5 = 11."""
    a = {"work": {"forward_passes": 3, "backward_passes": 2}}
    b = {"work": {"forward_passes": 10, "backward_passes": 0.5}}
    assert same.passes(a, b) == "; passes 7.0 -> 11.0"
    assert same.passes(a, {}) == ""
    assert same.header({"schema": "x", "schema_version": 2, "y": 1}) == "schema='x', schema_version=2"
    assert same.header({"y": 1}) == "none"


def _weights(path: Path, **tensors) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def test_same_weights_refuses_a_value_a_dtype_a_shape_or_a_name(tmp_path):
    """Outside truth: hand-built tensors that are equal but for one value, the dtype, the shape or one name."""
    w = torch.arange(6.0).reshape(2, 3)
    base = _weights(tmp_path / "a/m.safetensors", w=w, b=torch.ones(3))
    check = lambda **t: same.same_weights(base, _weights(tmp_path / "b/m.safetensors", **t))  # noqa: E731
    assert check(w=w.clone(), b=torch.ones(3)) == []
    assert check(w=w, b=torch.tensor([1.0, 1.0, 1.5])) == ["model.safetensors: b differs"]
    assert check(w=w.double(), b=torch.ones(3)) == ["model.safetensors: w differs"]
    assert check(w=w.reshape(3, 2), b=torch.ones(3)) == ["model.safetensors: w differs"]
    assert check(w=w, c=torch.ones(3)) == ["model.safetensors: tensors ['b', 'c'] differ"]


def _same_main(monkeypatch, tmp_path, only):
    monkeypatch.setattr(same, "worktree", lambda rev, where: where)
    monkeypatch.setattr(same, "check_stamp", lambda *a: None)
    monkeypatch.setattr(same, "run_side", lambda *a: {})
    monkeypatch.setattr(same, "load", lambda: "LOAD-X")
    monkeypatch.setattr(sys, "argv", ["same_behaviour.py", "--before", "x", "--work", str(tmp_path), "--only", only])
    return same.main()


def _json_outputs(tmp_path, steps, after_x=1):
    for side, x in (("before", 1), ("after", after_x)):
        for step in steps:
            for rel in same.OUTPUTS[step]:
                (tmp_path / side / rel).parent.mkdir(parents=True, exist_ok=True)
                (tmp_path / side / rel).write_text(json.dumps({"x": x, "seconds": {"load": 1.0 + x}}))


@pytest.mark.parametrize("after_x, rc", [(1, 0), (2, 1)])
def test_same_behaviour_main_refuses_a_disagreeing_json(monkeypatch, tmp_path, capsys, after_x, rc):
    """Outside truth: three hand-written JSON pairs per side; one field 1 -> 2 in each pair makes three
    differences and exit status 1; equal fields (timings aside) exit 0."""
    _json_outputs(tmp_path, same.GROUPS["lm"], after_x)
    assert _same_main(monkeypatch, tmp_path, "lm") == rc
    out = capsys.readouterr().out
    if rc:
        assert "heads/heads.json: 1 differences" in out and "  heads/heads.json.x: 1 != 2" in out
        assert out.rstrip().endswith("DIFFERENT: 3 differences")
    else:
        assert out.rstrip().splitlines()[-1].startswith("SAME (every field equal")


def test_same_behaviour_main_refuses_different_weights_with_equal_json(monkeypatch, tmp_path, capsys):
    """Outside truth: equal JSON files but weights differing in one value (hand-built) must not read SAME."""
    _json_outputs(tmp_path, same.GROUPS["cnn"])
    _weights(tmp_path / "before/mnist/model.safetensors", w=torch.zeros(2))
    _weights(tmp_path / "after/mnist/model.safetensors", w=torch.tensor([0.0, 1.0]))
    assert _same_main(monkeypatch, tmp_path, "cnn") == 1
    out = capsys.readouterr().out
    assert "model.safetensors: DIFFERENT" in out and "DIFFERENT: 1 differences" in out


def test_differences_tolerance_is_relative_even_for_tiny_numbers():
    """Outside truth: 1e-7 against 2e-7 differ by half the larger value, far outside a 1% relative tolerance."""
    assert same.differences(1e-7, 2e-7, "v", 0.01) == ["v: 1e-07 != 2e-07"]


def test_differences_tells_a_boolean_from_a_number():
    """Outside truth: JSON's true and 1 are different values (json.dumps writes them differently), though Python's
    True == 1; a field turning from one to the other is a difference, in either direction."""
    assert json.dumps(True) != json.dumps(1)
    assert same.differences({"v": True}, {"v": 1}, "f") == ["f.v: True != 1"]
    assert same.differences({"v": 0}, {"v": False}, "f") == ["f.v: 0 != False"]
    assert same.differences({"v": True}, {"v": True}, "f") == []
