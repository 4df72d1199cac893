"""draw_all: the same results in the same order whether a helper process draws some of them or not; a helper that
fails or is switched off leaves the work to this process; a caller's script is never re-run by the helper."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from mechscope.core.render import parallel as P
from mechscope.core.render.html import array_uri


def _who(i: int) -> tuple[int, int]:
    return i, os.getpid()


def _fails_in_helper(i: int, parent: int) -> int:
    if os.getpid() != parent:
        raise RuntimeError("the helper cannot draw this")
    return i * i


@pytest.fixture
def two_cores(monkeypatch):
    monkeypatch.setattr(P, "_use_helper", lambda n: n >= 4)  # whatever this machine has


def test_same_figures_with_and_without_the_helper(two_cores, monkeypatch):
    rng = np.random.default_rng(0)
    jobs = [(rng.random((9, 9)), 2) for _ in range(12)]
    shared, other = P.draw_all(array_uri, jobs, meanwhile=lambda: "other work")
    monkeypatch.setenv("MECHSCOPE_FIGURE_PROCESS", "0")
    alone, _ = P.draw_all(array_uri, jobs)
    assert shared == alone == [array_uri(*j) for j in jobs] and other == "other work"


def test_both_processes_draw_and_order_is_kept(two_cores):
    results, _ = P.draw_all(_who, [(i,) for i in range(40)], meanwhile=lambda: __import__("time").sleep(3))
    assert [i for i, _ in results] == list(range(40))
    assert {pid for _, pid in results} - {os.getpid()}, "the helper drew nothing in 3 s"


def test_a_failing_helper_leaves_the_work_here(two_cores):
    jobs = [(i, os.getpid()) for i in range(8)]
    results, _ = P.draw_all(_fails_in_helper, jobs)
    assert results == [i * i for i in range(8)]


def test_the_callers_script_is_not_run_again(tmp_path: Path):
    """A script with no ``if __name__ == "__main__"`` guard (multiprocessing's spawn would re-run it)."""
    marker = tmp_path / "runs.txt"
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(f"""
        import numpy as np
        from mechscope.core.render import parallel as P
        from mechscope.core.render.html import array_uri
        P._use_helper = lambda n: True
        open({str(marker)!r}, "a").write("ran\\n")
        out, _ = P.draw_all(array_uri, [(np.full((4, 4), i / 10),) for i in range(10)])
        assert len(out) == 10
    """))
    subprocess.run([sys.executable, str(script)], check=True, timeout=120, cwd=tmp_path)
    assert marker.read_text() == "ran\n"
