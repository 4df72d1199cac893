"""Atomic outputs: all new files or the old state, never a mix."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from mechscope.core.errors import RunError
from mechscope.core.outputs import TMP_MARK, atomic_output


def leftovers(parent):
    return [p.name for p in parent.iterdir() if TMP_MARK in p.name]


def test_new_directory_appears_complete(tmp_path):
    out = tmp_path / "a" / "b"
    with atomic_output(out) as tmp:
        (tmp / "x.json").write_text("1")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "y.png").write_bytes(b"png")
        assert not out.exists()  # nothing visible until the block ends
    assert (out / "x.json").read_text() == "1" and (out / "sub" / "y.png").exists()
    assert leftovers(out.parent) == []


def test_error_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ZeroDivisionError), atomic_output(out) as tmp:
        (tmp / "half.json").write_text("{")
        raise ZeroDivisionError
    assert not out.exists() and leftovers(tmp_path) == []


def test_interrupt_keeps_old_outputs(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "x.json").write_text("old")
    (out / "grids").mkdir()
    (out / "grids" / "a.png").write_text("old a")
    with pytest.raises(KeyboardInterrupt), atomic_output(out, force=True) as tmp:
        (tmp / "x.json").write_text("new")
        raise KeyboardInterrupt
    assert (out / "x.json").read_text() == "old" and (out / "grids" / "a.png").read_text() == "old a"
    assert leftovers(tmp_path) == []


def test_force_replaces_only_what_is_written(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("user's file")
    (out / "x.json").write_text("old")
    (out / "grids").mkdir()
    (out / "grids" / "stale.png").write_text("stale")
    with atomic_output(out, force=True) as tmp:
        (tmp / "x.json").write_text("new")
        (tmp / "grids").mkdir()
        (tmp / "grids" / "fresh.png").write_text("fresh")
    assert (out / "mine.txt").read_text() == "user's file"
    assert (out / "x.json").read_text() == "new"
    # a directory the command writes is replaced whole: no stale grid beside the new ones
    assert sorted(p.name for p in (out / "grids").iterdir()) == ["fresh.png"]
    assert leftovers(tmp_path) == []


def test_refusals_happen_before_any_work(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "x").write_text("1")
    with pytest.raises(RunError, match="--force"), atomic_output(out):
        pytest.fail("the block must not run")
    f = tmp_path / "file"
    f.write_text("")
    with pytest.raises(RunError, match="not a directory"), atomic_output(f, force=True):
        pytest.fail("the block must not run")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_location(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(RunError, match="not writable"), atomic_output(ro / "out"):
            pytest.fail("the block must not run")
    finally:
        ro.chmod(0o700)


def test_unwritable_location_as_root(tmp_path, monkeypatch):
    # root ignores permissions: simulate a location where the temporary directory cannot be made
    import tempfile

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    with pytest.raises(RunError, match="cannot write in"), atomic_output(tmp_path / "out"):
        pytest.fail("the block must not run")


def test_empty_existing_directory_is_fine(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with atomic_output(out) as tmp:
        (tmp / "x").write_text("1")
    assert (out / "x").read_text() == "1"


def test_a_record_says_what_made_it(tmp_path, capsys):
    """A JSON record (an object with a schema) carries the versions that computed it, after its schema; other JSON
    (a circuit-tracer graph, a config a user reads elsewhere) is written as given."""
    from importlib import metadata

    import numpy
    import torch

    import mechscope
    from mechscope.cli import main
    from mechscope.core.outputs import versions, write_json

    write_json(tmp_path / "r.json", {"schema": "mechscope.x/1", "a": 1})
    data = json.loads((tmp_path / "r.json").read_text())
    assert list(data) == ["schema", "versions", "a"]
    v = data["versions"]
    assert v["mechscope"] == mechscope.__version__ and v["torch"] == torch.__version__
    pyproject = Path(mechscope.__file__).resolve().parents[2] / "pyproject.toml"
    assert f'\nversion = "{mechscope.__version__}"\n' in pyproject.read_text()  # one version, said twice
    assert v["numpy"] == numpy.__version__ and v["scikit-learn"] == metadata.version("scikit-learn")
    write_json(tmp_path / "g.json", {"nodes": []})
    assert json.loads((tmp_path / "g.json").read_text()) == {"nodes": []}
    write_json(tmp_path / "k.json", {"schema": "s", "versions": {"mechscope": "0.0"}})  # a record's own: kept
    assert json.loads((tmp_path / "k.json").read_text())["versions"] == {"mechscope": "0.0"}
    main(["--version"])  # exit status 0: main returns
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"mechscope {mechscope.__version__} (python ") and f"torch {versions()['torch']}" in line


def test_a_record_is_read_as_strict_json(tmp_path):
    """What write_json never writes is refused when a record is read back, in one line naming the file: NaN and
    Infinity (Python's reader takes them), a key given twice (Python keeps the last)."""
    from dataclasses import dataclass

    from mechscope.core.results import Result

    @dataclass(frozen=True)
    class Rec(Result):
        SCHEMA = "mechscope.test-record/1"
        value: float

    (tmp_path / "ok.json").write_text('{"schema": "mechscope.test-record/1", "value": 1.5}')
    assert Rec.load(tmp_path / "ok.json").value == 1.5
    for text, why in (('{"value": NaN}', "NaN is not JSON"), ('{"value": -Infinity}', "-Infinity is not JSON"),
                      ('{"value": 1, "value": 2}', "key 'value' appears twice")):  # fmt: skip
        (tmp_path / "bad.json").write_text(text)
        with pytest.raises(RunError, match="bad.json: not a readable Rec record") as e:
            Rec.load(tmp_path / "bad.json")
        assert why in str(e.value) and "\n" not in str(e.value)


def test_every_report_page_says_what_made_it():
    """The footer (the JSON records' versions, as a person reads them) goes before the last </body>; a page without
    one gets it at the end; a template's own text is untouched."""
    from mechscope.core.outputs import versions
    from mechscope.core.render.html import with_footer
    from tests.e2e.reports import assert_made_by

    page = with_footer("<html><body><p>a</p></body></html>")
    assert page.startswith("<html><body><p>a</p><footer class=\"made-by\"") and page.endswith("</body></html>")
    assert_made_by(page)
    assert f"mechscope {versions()['mechscope']} · python " in page
    assert with_footer("<p>fragment</p>").startswith("<p>fragment</p><footer")  # (every page's file: check_report)


def test_a_models_default_folder_is_its_path_however_spelled(tmp_path, monkeypatch):
    """``--model ../toy``, ``./toy`` and ``toy/`` wrote to runs/heads/.._toy, runs/heads/._toy (hidden) and
    runs/heads/toy: three folders for one model, past the no-overwrite guard. Folders on the path are kept, so two
    runs' ``control/`` (or checkpoints of one name) stay apart; a hub id or name is made a safe name."""
    from mechscope.core.paths import model_out

    for d in ("toy", "a/control", "b/control"):
        (tmp_path / "work" / d).mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "work" / "toy")
    assert {model_out("heads", s) for s in ("../toy", "../toy/", "./../toy")} == {Path("runs/heads/toy")}
    monkeypatch.chdir(tmp_path / "work")
    assert model_out("heads", "./toy/") == model_out("heads", "toy") == Path("runs/heads/toy")
    assert model_out("heads", "a/control") == Path("runs/heads/a_control") != model_out("heads", "b/control")
    assert model_out("heads", "HuggingFaceTB/SmolLM2-135M") == Path("runs/heads/HuggingFaceTB_SmolLM2-135M")
    assert model_out("heads", "smollm2") == Path("runs/heads/smollm2")
    assert model_out("heads", "x" * 5000).name.startswith("xxx")  # too long for the file system: no OSError here
