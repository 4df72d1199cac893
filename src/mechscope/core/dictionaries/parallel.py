"""Data parallelism for harvesting and training: one process group, started from ``torchrun``'s environment.

``torchrun --nproc-per-node N -m mechscope -- COMMAND ...`` starts N processes with ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` set (the ``--`` keeps torchrun from reading the command's
options as its own: it takes ``--run`` for its ``--run-path``); :func:`init_from_env` joins them into the default
group (gloo on the CPU, NCCL when a CUDA device is used). Training then follows
:func:`mechscope.core.dictionaries.train` (each rank reads the same batch stream and trains on its slice of every
batch).

Harvesting: every rank walks the same input batches and computes the activations of its contiguous slice of
each (:func:`split`); :func:`gathered` all-gathers the slices in rank order, so every rank sees exactly the
rows one process would compute, in the same order, and rank 0 alone writes the store. The store is therefore
the one-process store, up to the float rounding of a forward pass on a smaller batch.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist

from mechscope.core.errors import MechscopeError

ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launched_by_torchrun() -> bool:
    """Whether this process was started by ``torchrun`` (or another launcher that sets its variables) with
    more than one process."""
    return all(k in os.environ for k in ENV) and int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(distributed: bool | None = None, device: str | None = None) -> bool:
    """Join the process group ``torchrun`` describes; returns whether this run is data-parallel.

    distributed: True demands it (a one-line error outside torchrun), False refuses it, None detects it.
    """
    if dist.is_available() and dist.is_initialized():
        if distributed is False:
            return False
        return dist.get_world_size() > 1
    launched = launched_by_torchrun()
    if distributed and not launched:
        raise MechscopeError(
            "--distributed expects to run under torchrun (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set with more "
            "than one process): torchrun --nproc-per-node 2 -m mechscope -- followed by the command"
        )
    if distributed is False or not launched:
        return False
    if not dist.is_available():
        raise MechscopeError("this torch build has no torch.distributed")
    cuda = device is not None and str(device).startswith("cuda")
    dist.init_process_group("nccl" if cuda else "gloo")
    return True


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the default group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return rank_world()[0] == 0


def split(n: int, rank: int, world: int) -> slice:
    """The contiguous slice of ``n`` items rank ``rank`` of ``world`` takes (the first ``n % world`` get one
    more)."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


def gathered(local: Iterable[torch.Tensor], width: int | None = None) -> Iterator[torch.Tensor]:
    """The concatenation over ranks (rank order) of each rank's blocks ``[n_r, d]``; every rank must yield
    the same number of blocks (an empty ``[0, d]`` block where it has no rows). Without a process group,
    the blocks themselves."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        yield from local
        return
    world = dist.get_world_size()
    for block in local:
        block = block.detach().contiguous()
        sizes = [torch.zeros(2, dtype=torch.long) for _ in range(world)]
        dist.all_gather(sizes, torch.tensor([block.shape[0], block.shape[1]], dtype=torch.long))
        most = max(int(s[0]) for s in sizes)
        padded = torch.zeros(most, block.shape[1], dtype=block.dtype)
        padded[: block.shape[0]] = block
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
        yield torch.cat([p[: int(s[0])] for p, s in zip(parts, sizes, strict=True)])


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def sum_work(counter) -> None:
    """Add up a :class:`~mechscope.core.torch_utils.WorkCounter`'s counts over the ranks (each counts the passes
    its own process made), so that every rank holds the whole job's; without a process group, nothing to do."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    keys = ("forward_rows", "backward_rows", "forward_calls", "backward_calls")
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, [int(getattr(counter, k)) for k in keys])
    for i, k in enumerate(keys):
        setattr(counter, k, sum(p[i] for p in parts))


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank (an error raised on rank 0 reaches the others as a value)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
