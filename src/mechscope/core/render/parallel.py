"""Drawing many figures on a second core: the same PNGs, drawn by this process and one helper process at once.

A report with dozens of matplotlib figures spends most of its time in Python drawing code, which one process runs
on one core. :func:`draw_all` hands the figures to a helper process (``python -m mechscope.core.render.parallel``,
started fresh: no fork of a process whose torch threads are running, and the caller's ``__main__`` is never
re-imported), one at a time from the front of the list, while this process runs ``meanwhile`` (the report's other
figures) and then takes figures from the back. Both draw with the same matplotlib settings, so every figure is the
one this process would have drawn. If the helper cannot start or fails, this process draws what is left; with one
core, or ``MECHSCOPE_FIGURE_PROCESS=0``, it draws everything itself.
"""

from __future__ import annotations

import importlib
import logging
import os
import pickle
import struct
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

log = logging.getLogger(__name__)
_LENGTH = struct.Struct("<Q")
_SKIP = {"backend", "backend_fallback", "interactive"}  # process settings, not drawing ones


def draw_all(fn: Callable, jobs: Sequence[tuple], meanwhile: Callable[[], Any] = lambda: None) -> tuple[list, Any]:
    """``([fn(*job) for job in jobs], meanwhile())``, with the jobs shared with a helper process where there is a
    second core. ``fn`` is a module-level function and its jobs and results pickle."""
    results: list = [None] * len(jobs)
    helper = _Helper.start(fn, jobs) if _use_helper(len(jobs)) else None
    done = [False] * len(jobs)
    lock = threading.Lock()
    span = [0, len(jobs)]  # the helper takes span[0], this process span[1] - 1

    def claim(front: bool) -> int | None:
        with lock:
            if span[0] >= span[1]:
                return None
            if front:
                span[0] += 1
                return span[0] - 1
            span[1] -= 1
            return span[1]

    def feed() -> None:
        while (i := claim(front=True)) is not None:
            try:
                results[i], done[i] = helper.draw(i), True
            except Exception as e:  # the helper failed: this process draws the rest
                log.debug("figure helper stopped: %s", e)
                return

    thread = threading.Thread(target=feed, daemon=True) if helper else None
    if thread:
        thread.start()
    try:
        other = meanwhile()
        while (i := claim(front=False)) is not None:
            results[i], done[i] = fn(*jobs[i]), True
    except BaseException:  # an error here surfaces as itself, once the helper has stopped (finally)
        with lock:
            span[0] = span[1]  # nothing more for the helper to claim
        raise
    finally:
        if thread:
            thread.join(timeout=120)  # one figure; a helper that hangs is stopped and its figure drawn here
            helper.close()
            thread.join()
    for i in (i for i, d in enumerate(done) if not d):
        results[i] = fn(*jobs[i])
    return results, other


def _use_helper(n_jobs: int) -> bool:
    if os.environ.get("MECHSCOPE_FIGURE_PROCESS", "1") == "0" or n_jobs < 4:
        return False
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return cores >= 2


class _Helper:
    """The helper process: jobs in a pickle file, one index per line on its stdin, one pickled result back."""

    def __init__(self, proc: subprocess.Popen, tmp: tempfile.TemporaryDirectory) -> None:
        self.proc, self.tmp = proc, tmp

    @classmethod
    def start(cls, fn: Callable, jobs: Sequence[tuple]) -> _Helper | None:
        tmp = tempfile.TemporaryDirectory(prefix="mechscope-figures-")
        try:
            path = Path(tmp.name) / "jobs.pkl"
            path.write_bytes(pickle.dumps((fn.__module__, fn.__qualname__, _drawing_settings(), list(jobs))))
            root = str(Path(__file__).resolve().parents[3])  # the folder holding the mechscope package
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
            cmd = [sys.executable, "-m", "mechscope.core.render.parallel", str(path)]
            pipe = subprocess.PIPE
            proc = subprocess.Popen(cmd, stdin=pipe, stdout=pipe, stderr=subprocess.DEVNULL, env=env)
            return cls(proc, tmp)
        except Exception as e:  # cannot pickle, cannot start: draw here
            log.debug("no figure helper: %s", e)
            tmp.cleanup()
            return None

    def draw(self, i: int) -> Any:
        self.proc.stdin.write(f"{i}\n".encode())
        self.proc.stdin.flush()
        head = self.proc.stdout.read(_LENGTH.size)
        if len(head) < _LENGTH.size:
            raise RuntimeError(f"the helper exited ({self.proc.poll()})")
        ok, value = pickle.loads(self.proc.stdout.read(_LENGTH.unpack(head)[0]))
        if not ok:
            raise RuntimeError(value)
        return value

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=10)
        except Exception:
            self.proc.kill()
            self.proc.wait()
        finally:
            self.tmp.cleanup()


def _drawing_settings() -> dict:
    """This process's matplotlib settings that differ from the defaults (a notebook's style, say)."""
    return {
        k: v for k, v in matplotlib.rcParams.items() if k not in _SKIP and v != matplotlib.rcParamsDefault.get(k)
    }  # fmt: skip


def _serve(path: str) -> None:
    """The helper's loop: draw job i for each index read, reply with its pickled (ok, result or error)."""
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything the drawing code prints goes to stderr, not into the replies
    module, name, settings, jobs = pickle.loads(Path(path).read_bytes())
    fn = importlib.import_module(module)
    for part in name.split("."):
        fn = getattr(fn, part)
    with matplotlib.rc_context(settings):
        for line in sys.stdin.buffer:
            try:
                reply = (True, fn(*jobs[int(line)]))
            except Exception as e:
                reply = (False, f"{type(e).__name__}: {e}")
            data = pickle.dumps(reply)
            out.write(_LENGTH.pack(len(data)) + data)
            out.flush()


if __name__ == "__main__":
    _serve(sys.argv[1])
