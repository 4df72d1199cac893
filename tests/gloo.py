"""Two gloo processes in a test, and the abort gloo sometimes gives in a process's exit.

Repeating the two-process dictionary-training fixture (5 December 2026), a worker died with SIGABRT ("terminate
called without an active exception") in 8 of 270 runs, and once in a `make test` after a barrier had been added
before ``destroy_process_group``: every time after both ranks had destroyed the group, in the interpreter's exit.
Real ``torchrun`` runs of the commands (90) never aborted. A test's worker therefore calls :func:`done` once its
work is finished and its group destroyed, behind a barrier that every rank passes only after all the work (the
pipelines end at one); :func:`spawn` then takes an abort after that point as a warning. Any other failure, and an
abort before the worker's ``done``, still fails the test.
"""

from __future__ import annotations

import os
import socket
import warnings
from collections.abc import Callable
from pathlib import Path

import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now, for a process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def as_torchrun(rank: int, world: int, port: int) -> None:
    """Give this worker the environment ``torchrun`` would (rank, world size, rendezvous on ``port``)."""
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})  # fmt: skip


def done(marks: str | Path, rank: int) -> None:
    """Record that ``rank`` finished its work and destroyed its process group."""
    (Path(marks) / f"done.{rank}").touch()


def spawn(fn: Callable, args: tuple, marks: str | Path, nprocs: int = 2) -> None:
    """``mp.spawn(fn, args, nprocs)``, where ``fn(rank, *args)`` ends with :func:`done` (``marks``)."""
    try:
        mp.spawn(fn, args=args, nprocs=nprocs, join=True)
    except mp.ProcessExitedException as e:
        if e.signal_name != "SIGABRT" or not (Path(marks) / f"done.{e.error_index}").exists():
            raise
        warnings.warn(f"gloo worker {e.error_index} aborted in its exit, after its work was done", stacklevel=2)
