"""What every bench script prints beside its figures (imported as ``benchlib``: the scripts run as
``python bench/NAME.py``, so this folder is on the path)."""

from __future__ import annotations

import os


def load() -> str:
    """The machine's load average (1, 5, 15 minutes) and core count: other processes' load slows every timing."""
    a, b, c = os.getloadavg()
    return f"load {a:.2f} {b:.2f} {c:.2f} ({os.cpu_count()} CPUs)"


def agreement(diff: float, tol: float | None, why: str = "") -> str:
    """The judgement printed after a max |difference| against the reference: PASS within ``tol``, else FAIL;
    ``tol`` None (a half-precision run, whose tolerance would need a GPU to set) says so instead."""
    if tol is None:
        return f"(not judged: {why})"
    return f"(target <= {tol:.0e}: {'PASS' if diff <= tol else 'FAIL'})"
