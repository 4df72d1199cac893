"""Outputs and records checked against truths from outside the code: a process the test started and reaped, the
bytes the file system holds, a digest computed here with hashlib and struct, strict JSON read back, and a
checkpoint folder as Hugging Face lays it out. Each test pins a behaviour whose mutation no test noticed."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from mechscope.core import outputs
from mechscope.core.errors import MechscopeError, RunError
from mechscope.core.outputs import TMP_MARK, atomic_output, weights_hash, write_json, write_text_atomic
from tests.unit.test_outputs import leftovers


def _dead_pid() -> int:
    """The pid of a process this test started and reaped: no process has it now (short of a reuse)."""
    proc = subprocess.Popen([sys.executable, "-c", ""])
    proc.wait()
    return proc.pid


def test_stale_temporaries_of_dead_commands_go_those_of_live_ones_stay(tmp_path):
    """Outside truth: which processes exist. A temporary of this (live) process is another command still writing;
    one of a reaped process was left by a killed command and is removed; another target's temporary is not ours."""
    out = tmp_path / "out"
    dead = _dead_pid()
    live = tmp_path / f".out{TMP_MARK}{os.getpid()}-x"
    live_backup = tmp_path / f".out{TMP_MARK}{os.getpid()}-old-y"
    stale = tmp_path / f".out{TMP_MARK}{dead}-x"
    stale_file = tmp_path / f".out{TMP_MARK}{dead}-z"
    other = tmp_path / f".other{TMP_MARK}{dead}-x"
    for d in (live, live_backup, stale, other):
        d.mkdir()
        (d / "part.json").write_text("{")
    stale_file.write_text("half")
    with atomic_output(out) as tmp:
        (tmp / "x.json").write_text("1")
    assert live.is_dir() and (live / "part.json").exists() and live_backup.is_dir() and other.is_dir()
    assert not stale.exists() and not stale_file.exists()
    assert (out / "x.json").read_text() == "1"


def test_write_text_atomic_keeps_the_old_file_when_interrupted(tmp_path, monkeypatch):
    """Outside truth: the file's bytes on disk. A write that fails while encoding (a lone surrogate is not UTF-8) or
    at the final rename leaves the old content and no temporary; a write straight to the target would truncate it."""
    target = tmp_path / "report.txt"
    target.write_text("old content")
    with pytest.raises(UnicodeEncodeError):
        write_text_atomic(target, "new " * 1000 + "\ud800")
    assert target.read_text() == "old content" and leftovers(tmp_path) == []

    def refuse(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(outputs.os, "replace", refuse)
    with pytest.raises(OSError, match="No space left"):
        write_text_atomic(target, "new content")
    monkeypatch.undo()
    assert target.read_text() == "old content" and leftovers(tmp_path) == []
    assert write_text_atomic(target, "new content") == target and target.read_text() == "new content"


def test_a_failed_move_into_the_target_puts_every_old_file_back(tmp_path, monkeypatch):
    """Outside truth: the files' contents. _commit moves out/a.json aside, tmp/a.json in, out/b.json aside, then
    tmp/b.json in: that last move fails (a full disk), so a.json must be put back too, and nothing left over."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.json").write_text("old a")
    (out / "b.json").write_text("old b")
    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append((os.fspath(src), os.fspath(dst)))
        src_dir = os.path.basename(os.path.dirname(os.fspath(src)))
        new_b_in = os.fspath(src).endswith("b.json") and TMP_MARK in src_dir and "-old-" not in src_dir
        if new_b_in and os.path.dirname(os.fspath(dst)) == os.fspath(out):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(outputs.os, "replace", replace)
    with pytest.raises(RunError, match=r"cannot move the finished outputs into .*out: No space left"):
        with atomic_output(out, force=True) as tmp:
            (tmp / "a.json").write_text("new a")
            (tmp / "b.json").write_text("new b")
    monkeypatch.undo()
    assert any(d == os.fspath(out / "b.json") and TMP_MARK in s for s, d in calls)  # the failing move did happen
    assert (out / "a.json").read_text() == "old a" and (out / "b.json").read_text() == "old b"
    assert sorted(p.name for p in out.iterdir()) == ["a.json", "b.json"] and leftovers(tmp_path) == []


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="Linux reports the umask in /proc")
def test_the_umask_is_read_without_being_changed(monkeypatch):
    """Setting the umask to 0 for a moment to read it would give a file another thread makes in that moment mode
    0666: where Linux reports it, it is read and never set."""

    def no(mask):
        raise AssertionError("the umask was changed to read it")

    old = os.umask(0o027)
    try:
        monkeypatch.setattr(outputs.os, "umask", no)
        assert outputs._umask() == 0o027
    finally:
        monkeypatch.undo()
        os.umask(old)


@pytest.mark.parametrize("mask, folder, file", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)], ids=["022", "027"])
def test_new_outputs_have_the_modes_the_umask_gives(tmp_path, mask, folder, file):
    """Outside truth: what mkdir/open give under this umask (checked here with a plain folder and file), not
    mkdtemp's 0700 or mkstemp's 0600: an output folder others cannot read is no use on a shared machine."""
    old = os.umask(mask)
    try:
        (tmp_path / "plain").mkdir()
        (tmp_path / "plain.txt").write_text("")
        assert (tmp_path / "plain").stat().st_mode & 0o777 == folder
        assert (tmp_path / "plain.txt").stat().st_mode & 0o777 == file
        with atomic_output(tmp_path / "out") as tmp:
            (tmp / "x.json").write_text("1")
        write_text_atomic(tmp_path / "page.html", "<p>")
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == folder
    assert (tmp_path / "page.html").stat().st_mode & 0o777 == file


def test_weights_hash_is_names_and_raw_bytes_in_name_order():
    """Outside truth: the digest computed here from struct-packed little-endian bytes (every name, then its tensor's
    bytes in row-major order, names sorted), for a 0-dim int64, a float32 vector, a transposed int16 matrix and an
    empty tensor, given in an order that is not sorted."""
    assert sys.byteorder == "little"
    state = {
        "b.weight": torch.tensor([1.0, 2.0, -0.5]),
        "a.bias": torch.tensor(7, dtype=torch.int64),
        "d.empty": torch.zeros(0),
        "c.t": torch.tensor([[1, 2], [3, 4]], dtype=torch.int16).t(),  # not contiguous: [[1, 3], [2, 4]]
    }
    expected = hashlib.sha256(
        b"a.bias" + struct.pack("<q", 7) + b"b.weight" + struct.pack("<3f", 1.0, 2.0, -0.5)
        + b"c.t" + struct.pack("<4h", 1, 3, 2, 4) + b"d.empty"
    ).hexdigest()  # fmt: skip
    assert weights_hash(SimpleNamespace(state_dict=lambda: state)) == expected


def test_weights_hash_binds_each_name_to_its_data():
    """Two same-shaped parameters: swapping their data changes the hash, and so does renaming one while keeping the
    name order (the same bytes in the same order: only the names differ)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 3, bias=False), torch.nn.Linear(3, 3, bias=False))
    w0, w1 = (p.detach().clone() for p in net.parameters())
    before = weights_hash(net)
    with torch.no_grad():
        net[0].weight.copy_(w1)
        net[1].weight.copy_(w0)
    assert weights_hash(net) != before
    named = {"0.weight": w0, "1.weight": w1}
    renamed = {"0.weight": w0, "2.weight": w1}
    assert weights_hash(SimpleNamespace(state_dict=lambda: named)) == before
    assert weights_hash(SimpleNamespace(state_dict=lambda: renamed)) != before


def test_non_finite_numbers_are_null_with_a_note_naming_each(tmp_path, caplog):
    """Outside truth: the file read back as standard JSON (NaN and Infinity refused): each non-finite number is null
    and the record's non_finite entry names its field and what it held, in the words write_json documents."""

    def no_constant(name):
        raise ValueError(f"{name} is not JSON")

    with caplog.at_level(logging.WARNING, logger="mechscope.core.outputs"):
        replaced = write_json(tmp_path / "r.json", {"schema": "s", "a": [1.0, float("nan")], "b": float("inf"),
                                                    "c": {"d": [float("-inf")]}})  # fmt: skip
    data = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"), parse_constant=no_constant)
    assert list(data) == ["schema", "versions", "a", "b", "c", "non_finite"]
    assert data["a"] == [1.0, None] and data["b"] is None and data["c"] == {"d": [None]}
    assert data["non_finite"] == {
        "a[1]": "NaN: not a finite number, written as null",
        "b": "+Infinity: not a finite number, written as null",
        "c.d[0]": "-Infinity: not a finite number, written as null",
    }
    assert replaced == {"a[1]": "NaN", "b": "+Infinity", "c.d[0]": "-Infinity"}
    assert "r.json: non-finite numbers written as null: a[1] (NaN), b (+Infinity), c.d[0] (-Infinity)" in caplog.text


def test_a_record_of_another_kind_is_refused(tmp_path):
    """Outside truth: the schema header of a real record (a featvis result), which loads. The same fields under the
    header of another command's record (mechscope.explain/3) are refused, not read as a featvis result."""
    from mechscope.cnn.methods.visualised import FeatvisResult
    from tests.records import featvis_record

    record = featvis_record([("conv1.hook_post", 0, 1.0)], "ab" * 32).to_dict()
    assert record["schema"] == FeatvisResult.SCHEMA == "mechscope.featvis/3"
    write_json(tmp_path / "own.json", record)
    assert FeatvisResult.load(tmp_path / "own.json").weights_sha256 == "ab" * 32
    write_json(tmp_path / "other.json", dict(record, schema="mechscope.explain/3"))
    refused = r"expected a mechscope\.featvis/3 record, got mechscope\.explain/3"
    with pytest.raises(RunError, match=r"other\.json: " + refused):
        FeatvisResult.load(tmp_path / "other.json")
    with pytest.raises(RunError, match=refused):
        FeatvisResult.from_dict(dict(record, schema="mechscope.explain/3"))


def test_a_boolean_is_not_an_integer():
    """Outside truth: JSON's types (true is a boolean; Python's True is an int). Refused where an integer, a list of
    integers or a number is expected, in one line naming the field."""
    from mechscope.core.validate import field

    assert field({"x": 1}, "x", "int", "c.json") == 1
    for kind, value in (("int", True), ("int", False), ("ints", [1, True]), ("number", True)):
        with pytest.raises(MechscopeError, match=r"c\.json: field 'x' is (true|false|\[1, true\]); expected"):
            field({"x": value}, "x", kind, "c.json")


def test_a_gpt2_checkpoint_with_a_boolean_head_count_is_refused(tmp_path):
    """Outside truth: a GPT-2 folder as Hugging Face lays it out (config.json, model.safetensors; written from
    scratch by the fuzz builders, as transformers' own import takes seconds), which loads; given "n_head": true
    (Python reads it as 1, a head count that divides anything), load_model says, of that file and field, that it is
    not an integer."""
    import mechscope.lm
    from tests.fuzz import builders as B

    B.write_hf_dir(tmp_path, tokenizer="none")
    config = json.loads((tmp_path / "config.json").read_text())
    mechscope.lm.load_model(tmp_path, device="cpu")  # the checkpoint as written loads
    (tmp_path / "config.json").write_text(json.dumps(config | {"n_head": True}))
    with pytest.raises(MechscopeError, match=r"config\.json: field 'n_head' is true; expected an integer") as e:
        mechscope.lm.load_model(tmp_path, device="cpu")
    assert "\n" not in str(e.value)
