"""The error line starts a line of its own after a progress bar.

A tqdm bar redraws its line with carriage returns and leaves it open when the work stops with an error; the
``mechscope: error:`` line written after it must still begin a line, so that a log read line by line (``grep
'^mechscope: error:'``, Python's ``splitlines``-free ``split("\\n")``) finds it. Truth: the captured stderr split on
newlines, the way grep reads a file.
"""

from __future__ import annotations

import sys

import pytest
from tqdm import tqdm

import mechscope.cli as cli
from mechscope.core.errors import MechscopeError


def _fail_after_bar(exc: BaseException, leave: bool):
    def scrub(hypothesis, out, force):
        bar = tqdm(total=10, desc="work", leave=leave)
        bar.update(3)
        bar.refresh()
        if not leave:
            bar.close()  # a bar closed with leave=False clears its line and ends on a carriage return
        raise exc

    return scrub


def _run(monkeypatch, capsys, scrub) -> tuple[int, str]:
    monkeypatch.setattr(cli, "_scrub", scrub)
    before = sys.stderr
    with pytest.raises(SystemExit) as e:
        cli.main(["scrub", "--hypothesis", "h.json"])
    assert sys.stderr is before  # the line tracker is taken down again
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize("leave", [True, False])
def test_the_error_line_after_an_open_progress_bar_starts_a_line(monkeypatch, capsys, leave):
    code, err = _run(monkeypatch, capsys, _fail_after_bar(MechscopeError("the work failed"), leave))
    assert code == 2
    assert "\r" in err  # the bar did draw
    lines = err.split("\n")
    assert lines[-1] == "" and lines[-2] == "mechscope: error: the work failed"


def test_interrupted_after_a_progress_bar_starts_a_line(monkeypatch, capsys):
    code, err = _run(monkeypatch, capsys, _fail_after_bar(KeyboardInterrupt(), leave=True))
    assert code == 130
    assert err.split("\n")[-2] == "mechscope: interrupted"


def test_an_error_with_no_bar_before_it_is_the_one_line(monkeypatch, capsys):
    def scrub(hypothesis, out, force):
        raise MechscopeError("no such hypothesis file")

    code, err = _run(monkeypatch, capsys, scrub)
    assert (code, err) == (2, "mechscope: error: no such hypothesis file\n")
